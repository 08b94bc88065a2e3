"""Evaluate a model as an agent in the tool world: facet scores, task success, hallucination.

    python tools/evaluate.py runs/default/final
    python tools/evaluate.py runs/default/final --output runs/default/eval.json --tasks 200 --negatives 200
    python tools/evaluate.py runs/arm_a/final --form react --max-steps 6

MODEL_DIR is one of our runs' final/ folders or any Hugging Face Llama-2 folder (config.json,
safetensors weights, tokenizer.model). The chat template is the one the run trained with,
else agentflan (--template overrides it); the agent form is the one the run's corpus was
mostly built in (its manifests say; chat when they cannot be found; --form overrides it).

On --tasks held-out tasks the model is scored step by step with the gold history given
(instruct: well-formed replies; retrieve: the right tool, or none when it is time to
answer; understand: the right arguments; reason: the right final answer) and runs each
task end to end in its world (success: the right answer and the world left as the gold
calls leave it). On --negatives held-out queries whose right reply is a direct answer it
measures hallucination: h_react (a tool-call form), h_general (a tool use announced in
plain words) and hscore = 0.5 * ((100 - h_react) + (100 - h_general)). All scores are
percentages. Replies are greedy, so a run is a function of its options.

--output writes the scores at the top level of a JSON object, with the counts, breakdowns
by novelty (held-out template or entity) and negative kind, the settings, versions, and
every task's and negative's record: prompt, replies, parsed steps, verdicts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from agentflan.cli import ArgumentParser
from agentflan.data.templates import TEMPLATES
from agentflan.evaluate import EvalSettings, evaluate, format_table, load_agent, trained_form
from agentflan.evaluate.agent import DEFAULT_MAX_NEW_TOKENS
from agentflan.evaluate.output import results_document, write_json_atomic
from agentflan.evaluate.run import MAX_DRAWS
from agentflan.generate import check_model_folder, resolve_device, resolve_dtype
from agentflan.toolworld.protocol import CHAT, FORMS
from agentflan.toolworld.tables import SPLITS

DEFAULTS = EvalSettings()


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model folder (config.json, weights, tokenizer.model)")
    parser.add_argument("--output", metavar="FILE.json", help="write the results as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--split", choices=SPLITS, default=DEFAULTS.split,
                        help=f"tool-world split to evaluate on (default {DEFAULTS.split})")
    parser.add_argument("--tasks", type=int, default=DEFAULTS.tasks, metavar="N",
                        help=f"tasks to score, at most {MAX_DRAWS:,} (default {DEFAULTS.tasks}; 0: negatives only)")
    parser.add_argument("--negatives", type=int, default=DEFAULTS.negatives, metavar="N",
                        help=f"negative samples, both kinds alternating, at most {MAX_DRAWS:,} "
                             f"(default {DEFAULTS.negatives}; 0: none)")
    parser.add_argument("--form", choices=FORMS,
                        help="agent form: chat (Agent-FLAN's aligned turns), react or json "
                             "(default: the one the run trained for, else chat)")
    parser.add_argument("--max-steps", type=int, metavar="N",
                        help=f"tool calls a task's episode may make before it fails (default {DEFAULTS.max_steps})")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                        help=f"tokens a reply may have at most (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--batch", type=int, default=32, metavar="N",
                        help="conversations generated at once (default 32)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help=f"which tasks and negatives are drawn (default {DEFAULTS.seed})")
    parser.add_argument("--template", choices=list(TEMPLATES),
                        help="chat template (default: the one the run trained with, else agentflan)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, default), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights and compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def check_output(path: str | None, overwrite: bool) -> Path | None:
    """The --output path, after checking it can be written; raises ValueError."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--output {path} is a folder; give a file name")
    if not out.parent.is_dir():
        raise ValueError(f"--output {path}: folder {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise ValueError(f"--output {path} exists (use --overwrite to replace it)")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"--output {path}: folder {out.parent} is not writable")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch", args.batch)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        for flag, value in (("--tasks", args.tasks), ("--negatives", args.negatives), ("--seed", args.seed)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if args.tasks == 0 and args.negatives == 0:
            raise ValueError("--tasks and --negatives are both 0: nothing to evaluate")
        for flag, value in (("--tasks", args.tasks), ("--negatives", args.negatives)):
            if value > MAX_DRAWS:
                raise ValueError(f"{flag} must be at most {MAX_DRAWS:,} (the tool world numbers them in five "
                                 f"digits), got {value}")
        if args.max_steps is not None and args.tasks == 0:
            raise ValueError("--max-steps bounds the tasks' episodes, and --tasks is 0 (negatives take one reply)")
        max_steps = DEFAULTS.max_steps if args.max_steps is None else args.max_steps
        if max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {max_steps}")
        if args.overwrite and args.output is None:
            raise ValueError("--overwrite applies to --output, which is not given")
        output = check_output(args.output, args.overwrite)
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        info = check_model_folder(args.model_dir)
        if args.form is not None:
            form, form_source = args.form, "--form"
        else:
            found = trained_form(args.model_dir)
            form, form_source = found if found is not None else (CHAT, "default (the run's corpus manifests not found)")
        settings = EvalSettings(args.split, args.tasks, args.negatives, form, max_steps, args.seed)
        settings.check()
        agent = load_agent(args.model_dir, device=device, dtype=dtype, template=args.template,
                           max_new_tokens=args.max_new_tokens, max_batch=args.batch)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    template = agent.generator.template
    print(f"evaluating {info.folder} ({template} template, {form} form: {form_source}) on {settings.tasks} "
          f"{settings.split} tasks and {settings.negatives} negatives, seed {settings.seed}", file=sys.stderr)
    started = time.perf_counter()
    progress = None if args.quiet else (lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    try:
        results = evaluate(agent, settings, progress)
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    wall = time.perf_counter() - started
    results = results_document(results, agent, info.folder, form_source, wall)
    print(format_table(results))
    stats = agent.stats
    print(f"{stats.replies} replies, {stats.new_tokens:,} tokens generated ({stats.cut_at_limit} cut at "
          f"--max-new-tokens, {stats.beyond_context} beyond the context) in {wall:.0f} s")
    if output is not None:
        write_json_atomic(output, results)
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
