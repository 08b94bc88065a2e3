"""Tokenize and pack a data recipe into a folder of memory-mapped shards for training.

    python tools/prepare_data.py out/agentflan --recipe recipes/agentflan.yaml \\
        --tokenizer /models/Llama-2-7b-hf/tokenizer.model
    python tools/prepare_data.py out/sharegpt --source sharegpt.json --format sharegpt \\
        --template llama2-chat --pack-len 4096 --skip-bad

Either a recipe (recipes/*.yaml; see agentflan/data/recipe.py for its keys) or source
files on the command line (each taken once). The flags below override the recipe's keys.
Prints what was read, skipped and truncated per file and a summary; exits 1 with the
file, line or byte offset and reason on bad input.
"""

from __future__ import annotations

import argparse
import sys
import time

from agentflan.data.conversation import DataFormatError
from agentflan.data.loader import PreparedDataset
from agentflan.data.packing import OVERLONG_POLICIES
from agentflan.data.prepare import prepare
from agentflan.data.recipe import MIX_UNITS, PACKINGS, RecipeError, load_recipe, recipe_from_files
from agentflan.data.sources import FORMATS
from agentflan.data.templates import TEMPLATES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("out", help="output folder (created; replaced only with --overwrite)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", help="YAML recipe")
    what.add_argument("--source", nargs="+", help="source files (or use a recipe)")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="format of --source files")
    parser.add_argument("--root", help="folder the recipe's source paths are relative to")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: the recipe's, else the bundled one)")
    parser.add_argument("--template", choices=list(TEMPLATES))
    parser.add_argument("--pack-len", type=int)
    parser.add_argument("--overlong", choices=list(OVERLONG_POLICIES))
    parser.add_argument("--packing", choices=list(PACKINGS),
                        help="ffd: whole documents; fill: also cut documents to fill the packs' room")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--mix-by", choices=list(MIX_UNITS))
    parser.add_argument("--skip-bad", action="store_true", default=None,
                        help="skip and count bad records instead of stopping at the first")
    parser.add_argument("--num-threads", type=int, default=0, help="tokenizer threads (0 = all cores)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 28, help="most tokens in one shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    args = parser.parse_args(argv)

    overrides = {key: value for key, value in [
        ("root", args.root), ("tokenizer", args.tokenizer), ("template", args.template),
        ("pack_len", args.pack_len), ("overlong", args.overlong), ("packing", args.packing), ("seed", args.seed), ("mix_by", args.mix_by),
        ("skip_bad", args.skip_bad)] if value is not None}
    start = time.perf_counter()
    try:
        if args.recipe:
            recipe = load_recipe(args.recipe, overrides)
        else:
            if args.root:
                parser.error("--root applies to recipes only")
            recipe = recipe_from_files(args.source, args.format, **overrides)
        prepare(recipe, args.out, num_threads=args.num_threads, shard_tokens=args.shard_tokens,
                overwrite=args.overwrite, log=print)
    except (RecipeError, DataFormatError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    dataset = PreparedDataset(args.out)
    print(dataset.summary())
    for cut in dataset.manifest["truncations"]:
        print(f"note: {cut['path']} is truncated at byte {cut['offset']} (line {cut['line']}): {cut['reason']}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
