"""The trainer, as components with one job each.

- ``config``: the TrainConfig dataclass, YAML config files, command-line flags, option checks
- ``plan``: turns a config into a RunPlan by reading small files only (recipe, manifest,
  checkpoint config, tokenizer); every mistake is found here, before any heavy work
- ``run_dir``: the run folder: lock, resume/overwrite policy, config diff, atomic writes
- ``checkpointing``: resumable training checkpoints (torch.distributed.checkpoint), atomic, keep-last-k
- ``data``: the training data of a plan (files, a prepared folder, or a recipe prepared once)
- ``model_io``: model construction (agentflan.builder: sharded --init-from, activation
  checkpointing, FSDP/DDP) and the final Hugging Face export with its tokenizer files
- ``optim``: AdamW and the learning-rate schedule
- ``step``: one optimizer step over a global batch
- ``faults``: preemption signals, the non-finite guard, test-only fault injection
- ``metrics``: metrics.jsonl, summary.json, TensorBoard, progress lines
- ``collective``: agreement of all ranks on errors and flags
- ``loop``: ``train(cfg)``, the loop that ties them together
- ``dry_run``: ``--dry-run``: the checks, model size, FLOPs and memory per rank of a planned run
- ``plot``: loss, LR, grad-norm and throughput curves of runs (``tools/plot_run.py``)
"""
