"""The results file of an evaluation: the scores first, then what produced them.

``results_document`` puts the scores (``run.SCORES``, in percent) at the top level, then
the model (folder, template, form and where the form came from, device, dtype, generation
limits), split, seed, versions and generation counts, then the rest of the results
(counts, breakdowns, per-task and per-negative records). ``write_json_atomic`` writes it
so that a reader or a crash never sees half a file.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

import agentflan
from agentflan.evaluate.agent import GeneratorAgent
from agentflan.evaluate.run import SCORES


def versions() -> dict[str, str]:
    return {"agentflan": agentflan.__version__, "torch": torch.__version__, "python": platform.python_version()}


def results_document(results: dict[str, Any], agent: GeneratorAgent, folder: str | os.PathLike, form_source: str,
                     wall_s: float) -> dict[str, Any]:
    """The results of ``evaluate`` for a model folder, ready to write (module doc)."""
    rest = {k: v for k, v in results.items() if k not in SCORES}
    model = agent.generator.model
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    settings = results["settings"]
    return {
        **{key: results[key] for key in SCORES},
        "model": {"folder": str(Path(folder).resolve()), "template": agent.generator.template,
                  "form": settings["form"], "form_source": form_source,
                  "device": str(next(model.parameters()).device), "dtype": dtype,
                  "max_new_tokens": agent.max_new_tokens, "batch": agent.max_batch},
        "split": settings["split"], "seed": settings["seed"], "versions": versions(),
        "generation": agent.stats.to_dict(), "wall_s": round(wall_s, 1),
        **rest,
    }


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Writes ``obj`` as JSON to ``path`` through a temporary file renamed over it; respects the umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
