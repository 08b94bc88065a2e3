"""Trains the bundled SentencePiece BPE tokenizer (agentflan/assets/tokenizer.model by default).

    python tools/train_tokenizer.py --corpus data.jsonl --out my.model --vocab-size 8000

Needs the sentencepiece package (pip install 'agentflan[tools]'); agentflan's own tokenizer
does not. The agentflan template's markers become user-defined pieces (see
agentflan/data/tokenizer_training.py for every setting).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agentflan.cli import ArgumentParser
from agentflan.data.defaults import DEFAULT_CORPUS, DEFAULT_TOKENIZER
from agentflan.data.templates import AGENTFLAN_SPECIAL_PIECES
from agentflan.output_paths import OutputPathError, check_output_file

# Control pieces (<unk>, <s>, </s>), the 256 byte-fallback pieces and the markers come first.
MIN_VOCAB_SIZE = 3 + 256 + len(AGENTFLAN_SPECIAL_PIECES) + 1


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="Agent-FLAN JSONL to train on")
    parser.add_argument("--out", default=str(DEFAULT_TOKENIZER), help="output .model path")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help=f"number of pieces, at least {MIN_VOCAB_SIZE} (default 4096)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (as the bundled tokenizer is)")
    args = parser.parse_args(argv)

    if not Path(args.corpus).is_file():
        print(f"error: --corpus {args.corpus}: no such file", file=sys.stderr)
        return 1
    if args.vocab_size < MIN_VOCAB_SIZE:
        print(f"error: --vocab-size {args.vocab_size}: must be at least {MIN_VOCAB_SIZE} "
              "(3 control pieces, 256 byte pieces, the template markers and one more)", file=sys.stderr)
        return 1
    try:
        check_output_file(args.out, "--out", overwrite=args.overwrite, inputs=[("--corpus", args.corpus)])
    except OutputPathError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not Path(args.out).parent.is_dir():
        print(f"error: --out {args.out}: the folder {Path(args.out).parent} does not exist", file=sys.stderr)
        return 1
    try:
        from agentflan.data.tokenizer_training import train_tokenizer
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size)
    except (ValueError, RuntimeError) as err:  # a bad record, or sentencepiece refusing the settings
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
