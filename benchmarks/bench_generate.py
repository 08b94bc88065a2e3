"""Generation throughput: agentflan's KV-cache engine against transformers' `generate`.

    python benchmarks/bench_generate.py                          # CPU: tiny preset and a larger shape
    python benchmarks/bench_generate.py --shape 7b-8l            # CUDA: Llama-2-7B layers (8 of them), bf16

One randomly initialised model per shape is saved with agentflan.checkpoint.save_hf and
loaded by both engines from that folder. Both run the same prompts (random token ids
after a BOS, one of 64 tokens at batch 1, mixed lengths 16..256 at batch 16), greedy, the
same max_new_tokens, neither stopping at EOS (a random model would end some sequences
after a few tokens), so both generate exactly the same number of tokens. tokens/s counts
generated tokens over wall time, prefill included; each cell is the best of --reps timed
runs after one warm-up run, the two engines taking turns (the machines this runs on are
often shared; the best run is the one least disturbed). transformers runs as users call it: `model.generate(input_ids,
attention_mask=...)` with left padding and its default dynamic cache.

Sanity check: greedy tokens must agree. In fp32 the timed outputs are compared directly;
in bf16 (where the two engines round differently) a shorter fp32 run of the same shape
and prompts is compared instead. "same tokens" counts prompts whose generated ids are
identical; on a mismatch the first differing position is printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from agentflan.checkpoint import load_hf, save_hf
from agentflan.config import ModelConfig, get_preset
from agentflan.generate import SamplingParams, generate
from agentflan.model import Llama

SHAPES: dict[str, ModelConfig] = {
    "tiny": get_preset("tiny"),
    # A larger CPU shape: Llama-2's vocabulary, 6 layers of a 768-wide GQA model (86M parameters),
    # whose batch-1 decode reads its weights from memory rather than cache.
    "cpu-large": ModelConfig(dim=768, n_layers=6, n_heads=12, n_kv_heads=4, ffn_dim=2048, max_seq_len=4096),
    # Llama-2-7B layers (dim 4096, 32 heads, ffn 11008, vocabulary 32000), 8 of its 32 layers.
    "7b-8l": get_preset("llama2-7b", n_layers=8),
}


def make_prompts(batch: int, vocab: int, gen: torch.Generator) -> list[list[int]]:
    if batch == 1:
        lengths = [64]
    else:
        lengths = torch.randint(16, 257, (batch,), generator=gen).tolist()
    # Ids from 3 up: no BOS / EOS inside a prompt.
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=gen).tolist() for n in lengths]


def run_ours(model: Llama, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=new_tokens)
    return [c.token_ids for c in generate(model, prompts, params)]


def run_hf(model, prompts: list[list[int]], new_tokens: int, device: torch.device) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as transformers wants for decoder-only generation
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(
            ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, temperature=None, top_p=None, top_k=None,
        )
    return out[:, width:].tolist()


def timed_pair(fns: list, reps: int, device: torch.device) -> list[tuple[float, list[list[int]]]]:
    """Best-of-reps seconds and output of each fn, the fns interleaved rep by rep (after one
    warm-up run each) so that load from other processes hits all of them alike."""
    for fn in fns:
        fn()
    best = [(float("inf"), None)] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[i] = min(best[i], (time.perf_counter() - t0, out), key=lambda r: r[0])
    return best


def compare(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, list[str]]:
    same, notes = 0, []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            same += 1
            continue
        at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        notes.append(f"prompt {i}: first difference at generated token {at} (lengths {len(a)} / {len(b)})")
    return same, notes


def load_both(folder: str, dtype: torch.dtype, device: torch.device):
    import transformers

    ours = load_hf(folder, dtype=dtype, device=device).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None  # generate max_new_tokens, as our engine does without stop ids
    return ours, hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", choices=list(SHAPES),
                        help="model shapes (default: tiny and cpu-large on CPU, 7b-8l on CUDA)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16], help="batch sizes (default: 1 16)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="max new tokens per prompt (default: 64 on CPU, 256 on CUDA)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per cell (best of)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both engines (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("bench_generate: needs transformers (pip install -e .[test]), skipping (no numbers)")
        return 0
    from common import device_header, print_table

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shape or (["7b-8l"] if device.type == "cuda" else ["tiny", "cpu-large"])
    new_tokens = args.new_tokens or (256 if device.type == "cuda" else 64)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    print(f"{device_header()} | transformers {transformers.__version__} | {torch.get_num_threads()} threads")
    print(f"greedy, max_new_tokens {new_tokens}, {str(dtype).removeprefix('torch.')}, best of {args.reps}")
    rows = []
    for shape in shapes:
        cfg = SHAPES[shape]
        gen = torch.Generator().manual_seed(args.seed)
        with tempfile.TemporaryDirectory() as folder:
            with torch.device(device):
                model = Llama(cfg)
            model.init_weights(seed=args.seed)
            save_hf(model, folder)
            del model
            ours, hf = load_both(folder, dtype, device)
            for batch in args.batch:
                prompts = make_prompts(batch, cfg.vocab_size, gen)
                (t_ours, out_ours), (t_hf, out_hf) = timed_pair(
                    [lambda: run_ours(ours, prompts, new_tokens), lambda: run_hf(hf, prompts, new_tokens, device)],
                    args.reps, device,
                )
                n_ours, n_hf = sum(map(len, out_ours)), sum(map(len, out_hf))
                if dtype != torch.float32:
                    check_tokens = min(new_tokens, 32)
                    ours32, hf32 = load_both(folder, torch.float32, device)
                    out_ours = run_ours(ours32, prompts, check_tokens)
                    out_hf = run_hf(hf32, prompts, check_tokens, device)
                    del ours32, hf32
                same, notes = compare(out_ours, out_hf)
                rows.append({
                    "shape": shape, "params": f"{cfg.num_params() / 1e6:.0f}M", "batch": batch,
                    "prompt tokens": sum(map(len, prompts)), "new tokens": n_ours,
                    "agentflan tok/s": n_ours / t_ours, "transformers tok/s": n_hf / t_hf,
                    "speedup": (n_ours / t_ours) / (n_hf / t_hf), "same tokens": f"{same}/{batch}",
                })
                for note in notes:
                    print(f"  {shape} batch {batch}: {note}")
                print_table(rows[-1:])
            del ours, hf
    print()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
