"""Build an Agent-FLAN corpus from raw AgentInstruct / ToolBench trajectories.

    python tools/build_corpus.py --input data/agentinstruct.jsonl --input data/toolbench.json \\
        --output out/agentflan.jsonl
    python tools/build_corpus.py --input raw.jsonl --output out/arm_c.jsonl --arm full \\
        --general ShareGPT_V3_unfiltered_cleaned_split.json

Writes OUT.jsonl, OUT.manifest.json (counts, trained tokens per facet before and after the
weights, skips by reason, the options and the seed) and, with --general, OUT.recipe.yaml
(build it with tools/prepare_data.py --recipe). Each input's format is detected.

Arms of the replication, from the same raw files (flags given explicitly override them):
  react    (A) ReAct form only; no weights, no negatives, no instruction samples
  aligned  (B) aligned chat, 10% ReAct, instruction samples, facet weights 1 : 0.25 : 0.75
  full     (C) aligned plus negatives and the general mix (needs --general)
Without --arm the build is "aligned" plus negatives, and the general mix if --general is given.
"""

from __future__ import annotations

import argparse
import sys

from agentflan.cli import ArgumentParser
from agentflan.corpus.build import ARMS, BuildError, BuildOptions, arm_options, build_corpus
from agentflan.corpus.facets import parse_facet_weights
from agentflan.data.conversation import DataFormatError


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--input", action="append", required=True, metavar="RAW",
                        help="raw AgentInstruct or ToolBench file (JSONL or a JSON array); repeat for more")
    parser.add_argument("--output", required=True, help="output Agent-FLAN JSONL")
    parser.add_argument("--arm", choices=ARMS, help="preset of the replication's arms (see below)")
    parser.add_argument("--react-share", type=float, help="share of trajectories kept in ReAct form (default 0.1)")
    parser.add_argument("--instruct-samples", type=int,
                        help="strict ReAct/JSON instruction-following samples (default: 5.8%% of the trajectories)")
    parser.add_argument("--negatives", type=int,
                        help="negative samples, both kinds alternating (default: 2.2%% of the trajectories)")
    parser.add_argument("--facet-weights", type=str,
                        help="reason:retrieve:understand or facet=w,... in [0, 1] (default 1:0.25:0.75)")
    parser.add_argument("--general", action="append", metavar="SHAREGPT", help="general chat file for the mix")
    parser.add_argument("--general-ratio", type=float, help="general tokens per agent token (default 1.0)")
    parser.add_argument("--seed", type=int, help="seed of every draw (default 0)")
    parser.add_argument("--skip-bad", action="store_true", default=None, help="skip and count bad records")
    parser.add_argument("--tokenizer", help="SentencePiece model for token counts (default: the bundled one)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")
    args = parser.parse_args(argv)

    if args.general_ratio is not None and not args.general:
        print("error: --general-ratio sets the general mix and needs --general SHAREGPT", file=sys.stderr)
        return 1
    try:
        overrides = {key: value for key, value in [
            ("react_share", args.react_share), ("instruct_samples", args.instruct_samples),
            ("negatives", args.negatives), ("general", tuple(args.general) if args.general else None),
            ("general_ratio", args.general_ratio), ("seed", args.seed), ("skip_bad", args.skip_bad),
            ("tokenizer", args.tokenizer), ("overwrite", args.overwrite)] if value is not None}
        if args.facet_weights is not None:
            overrides["facet_weights"] = parse_facet_weights(args.facet_weights)
        options = arm_options(args.arm, **overrides) if args.arm else BuildOptions(**overrides)
        manifest = build_corpus(args.input, args.output, options)
    except (BuildError, DataFormatError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    for source in manifest["inputs"]:
        skipped = ", ".join(f"{n} {kind}" for kind, n in source["skipped"].items())
        print(f"{source['path']}: {source['trajectories']} trajectories ({source['format']})"
              + (f", skipped {skipped}" if skipped else ""))
    forms = ", ".join(f"{n} {form}" for form, n in manifest["forms"].items())
    print(f"wrote {manifest['conversations']} conversations to {args.output}: {forms}")
    tokens = manifest["trained_tokens"]
    print(f"trained tokens {tokens['before']:,} -> {tokens['after']:,} after the facet weights")
    for facet, row in manifest["facets"].items():
        if row["turns"]:
            print(f"  {facet:<10} {row['trained_turns_after']:>7,} of {row['trained_turns_before']:>7,} turns trained, "
                  f"{row['trained_tokens_after']:>9,} tokens")
    if manifest["general"]:
        print(f"general mix: {manifest['general']['recipe']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
