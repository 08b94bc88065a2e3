"""Trains the bundled SentencePiece BPE tokenizer (agentflan/assets/tokenizer.model by default)."""

import argparse

from agentflan.data.defaults import DEFAULT_CORPUS, DEFAULT_TOKENIZER
from agentflan.data.tokenizer_training import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="Agent-FLAN JSONL to train on")
    parser.add_argument("--out", default=str(DEFAULT_TOKENIZER), help="output .model path")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
