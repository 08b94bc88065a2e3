"""Train a Llama on Agent-FLAN data (``--help`` lists every flag).

    torchrun --nproc_per_node=1 tools/train.py                          # tiny model, bundled corpus
    torchrun --nproc_per_node=2 tools/train.py --config configs/default.yaml --parallel fsdp
    torchrun --nnodes=2 --nproc_per_node=8 ... tools/train.py --config configs/llama2-7b-agentflan.yaml
    python tools/train.py --config configs/llama2-70b-agentflan.yaml --dry-run --world-size 128 --gpu H100
"""

from agentflan.train import main

if __name__ == "__main__":
    main()
