"""Tokenize and pack a data recipe into a folder of memory-mapped shards for training.

    python tools/prepare_data.py out/agentflan --recipe recipes/agentflan.yaml \\
        --tokenizer /models/Llama-2-7b-hf/tokenizer.model
    python tools/prepare_data.py out/sharegpt --source sharegpt.json --format sharegpt \\
        --template llama2-chat --pack-len 4096 --skip-bad

Either a recipe (recipes/*.yaml; see agentflan/data/recipe.py for its keys) or source
files on the command line (each taken once). The flags below override the recipe's keys;
a key given nowhere takes the default the trainer uses too (agentflan.data.defaults).
Prints what was read, skipped and truncated per file and a summary; exits 1 with one
"error: ..." line (the file, line or byte offset and reason) on bad input.

    python tools/prepare_data.py out/agentflan --verify

checks every shard file of a prepared folder against the sha256 in its manifest.
"""

from __future__ import annotations

import argparse
import sys
import time

from agentflan.cli import ArgumentParser
from agentflan.data.conversation import DataFormatError
from agentflan.data.loader import PreparedDataset
from agentflan.data.packing import OVERLONG_POLICIES
from agentflan.data.prepare import BATCH_CHARS, SHARD_TOKENS, check_replaceable, prepare
from agentflan.data.recipe import (
    MIX_UNITS,
    PACKINGS,
    RECIPE_DEFAULTS,
    Recipe,
    RecipeError,
    load_recipe,
    recipe_from_files,
)
from agentflan.data.sources import FORMATS
from agentflan.data.templates import TEMPLATES


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("out", help="output folder (created; replaced only with --overwrite)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", help="YAML recipe")
    what.add_argument("--source", nargs="+", help="source files (or use a recipe)")
    what.add_argument("--verify", action="store_true",
                      help="check the prepared folder OUT against its manifest's sizes and sha256s, and exit")
    parser.add_argument("--format", choices=["auto", *FORMATS], help="format of --source files (default: auto)")
    parser.add_argument("--root", help="folder the recipe's source paths are relative to")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: the recipe's, else the bundled one)")
    parser.add_argument("--template", choices=list(TEMPLATES),
                        help=f"chat template (default: the recipe's, else {RECIPE_DEFAULTS['template']})")
    parser.add_argument("--pack-len", type=int,
                        help=f"tokens a pack (default: the recipe's, else {RECIPE_DEFAULTS['pack_len']})")
    parser.add_argument("--overlong", choices=list(OVERLONG_POLICIES),
                        help="documents longer than a pack "
                             f"(default: the recipe's, else {RECIPE_DEFAULTS['overlong']})")
    parser.add_argument("--packing", choices=list(PACKINGS),
                        help="ffd: whole documents; fill: also cut documents to fill the packs' room "
                             f"(default: the recipe's, else {RECIPE_DEFAULTS['packing']})")
    parser.add_argument("--seed", type=int,
                        help="seed of the weighted sources' sampling (a recipe with a 'weight' source only)")
    parser.add_argument("--mix-by", choices=list(MIX_UNITS),
                        help="unit the weights are measured in (a recipe with a 'weight' source only)")
    parser.add_argument("--skip-bad", action="store_true", default=None,
                        help="skip and count bad records instead of stopping at the first")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="tokenizer threads, or with --verify hashing threads (default 0: all cores)")
    parser.add_argument("--shard-tokens", type=int, help=f"most tokens in one shard (default {SHARD_TOKENS})")
    parser.add_argument("--batch-chars", type=int,
                        help=f"characters of text tokenized at once; bounds memory (default {BATCH_CHARS})")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing prepared dataset")
    args = parser.parse_args(argv)
    try:
        _check_flags(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.verify:
        return _verify(args.out, args.num_threads)

    overrides = {key: value for key, value in [
        ("root", args.root), ("tokenizer", args.tokenizer), ("template", args.template),
        ("pack_len", args.pack_len), ("overlong", args.overlong), ("packing", args.packing), ("seed", args.seed),
        ("mix_by", args.mix_by), ("skip_bad", args.skip_bad)] if value is not None}
    options = {key: value for key, value in [("shard_tokens", args.shard_tokens), ("batch_chars", args.batch_chars),
                                             ("overwrite", args.overwrite)] if value is not None}
    start = time.perf_counter()
    try:
        if args.recipe:
            recipe = load_recipe(args.recipe, overrides)
        else:
            recipe = recipe_from_files(args.source, args.format or "auto", **overrides)
        _check_mix_flags(args, recipe)
        check_replaceable(args.out, bool(args.overwrite), how="--overwrite")
        prepare(recipe, args.out, num_threads=args.num_threads, log=print, **options)
    except (RecipeError, DataFormatError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    dataset = PreparedDataset(args.out)
    print(dataset.summary())
    for cut in dataset.manifest["truncations"]:
        print(f"note: {cut['path']} is truncated at byte {cut['offset']} (line {cut['line']}): {cut['reason']}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


# Flags that shape how a recipe is prepared, which --verify (it only reads a prepared folder) does not take.
PREPARE_FLAGS = ("root", "tokenizer", "template", "pack_len", "overlong", "packing", "seed", "mix_by", "skip_bad",
                 "format", "shard_tokens", "batch_chars", "overwrite")


def _check_flags(args: argparse.Namespace) -> None:
    """Raises ValueError naming a flag that is out of range or does not apply to the mode."""
    if args.num_threads < 0:
        raise ValueError(f"--num-threads must be >= 0, got {args.num_threads}")
    if args.verify:
        extra = [name for name in PREPARE_FLAGS if getattr(args, name) is not None]
        if extra:
            raise ValueError(f"--{extra[0].replace('_', '-')} does not apply to --verify")
        return
    for flag, value in (("--shard-tokens", args.shard_tokens), ("--batch-chars", args.batch_chars),
                        ("--pack-len", args.pack_len)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.recipe and args.format:
        raise ValueError("--format applies to --source files only (a recipe gives each source's format)")
    if args.source and args.root is not None:
        raise ValueError("--root applies to recipes only (--source paths are relative to the current folder)")
    if args.source:
        for flag, value in (("--seed", args.seed), ("--mix-by", args.mix_by)):
            if value is not None:
                raise ValueError(f"{flag} applies to recipes only (--source files are each taken once, "
                                 f"with no weights to sample or measure)")


def _check_mix_flags(args: argparse.Namespace, recipe: Recipe) -> None:
    """--seed and --mix-by shape only the sampling of 'weight' sources: refuse them without one."""
    if any(source.weight is not None for source in recipe.sources):
        return
    for flag, value in (("--seed", args.seed), ("--mix-by", args.mix_by)):
        if value is not None:
            raise RecipeError(f"{flag} shapes the sampling of 'weight' sources, and {recipe.name} has none "
                              f"(every source is repeated whole)")


def _verify(folder: str, num_threads: int) -> int:
    start = time.perf_counter()
    try:
        dataset = PreparedDataset(folder)
        dataset.verify(num_threads or None)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    files = sum(len(entry["files"]) for entry in dataset.manifest["shards"])
    print(f"{folder}: {files} shard files match the manifest ({dataset.summary()}); "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
