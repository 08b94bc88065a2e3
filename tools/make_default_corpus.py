"""Writes the bundled tool-use corpus (agentflan/assets/agentflan_tooluse.jsonl by default)."""

import argparse

from agentflan.data.defaults import DEFAULT_CORPUS
from agentflan.data.synthetic import DEFAULT_SEED, DEFAULT_SIZE, write_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(DEFAULT_CORPUS), help="output JSONL path")
    parser.add_argument("--n", type=int, default=DEFAULT_SIZE, help="number of conversations")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed")
    args = parser.parse_args()
    size = write_corpus(args.out, n=args.n, seed=args.seed)
    print(f"wrote {args.n} conversations ({size} bytes) to {args.out}")


if __name__ == "__main__":
    main()
