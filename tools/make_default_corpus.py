"""Writes the bundled tool-use corpus (agentflan/assets/agentflan_tooluse.jsonl and its manifest).

Raw AgentInstruct- and ToolBench-shaped trajectories of the tool world's train split, built
by the same code as tools/build_corpus.py (agentflan.corpus.default); deterministic by seed.
"""

import sys

from agentflan.cli import ArgumentParser
from agentflan.corpus.build import BuildError
from agentflan.corpus.default import DEFAULT_SEED, DEFAULT_SIZE, manifest_path, write_corpus
from agentflan.data.defaults import DEFAULT_CORPUS


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_CORPUS), help="output JSONL path (missing folders are created)")
    parser.add_argument("--n", type=int, default=DEFAULT_SIZE, help="number of conversations")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed")
    parser.add_argument("--raw-dir", help="also keep the raw AgentInstruct / ToolBench files built from in this "
                                          "folder, created if missing (inputs for tools/build_corpus.py)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output, manifest or raw file (as the bundled corpus is)")
    args = parser.parse_args(argv)
    if args.n < 4:
        print(f"error: --n must be at least 4, got {args.n}", file=sys.stderr)
        return 1
    if args.seed < 0:
        print(f"error: --seed must be >= 0, got {args.seed}", file=sys.stderr)
        return 1
    try:
        manifest = write_corpus(args.out, n=args.n, seed=args.seed, raw_dir=args.raw_dir, overwrite=args.overwrite)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    forms = ", ".join(f"{n} {form}" for form, n in manifest["forms"].items())
    print(f"wrote {manifest['conversations']} conversations to {args.out} ({forms}); manifest {manifest_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
