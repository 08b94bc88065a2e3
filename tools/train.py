"""Train a Llama on Agent-FLAN data.

    torchrun --nproc_per_node=1 tools/train.py                 # tiny model on the bundled corpus
    torchrun --nproc_per_node=8 tools/train.py --init-from Llama-2-7b-hf \
        --tokenizer Llama-2-7b-hf/tokenizer.model --data data/*.jsonl --pack-len 8192 --lr 2e-5
"""

from agentflan.train import main

if __name__ == "__main__":
    main()
