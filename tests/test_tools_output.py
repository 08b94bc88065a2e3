"""Output paths of the command-line tools: each writes exactly the path it names and prints it,
and refuses a path it cannot honour with one error line before any work."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool_main(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run_folder(folder: Path, rng: random.Random) -> Path:
    folder.mkdir()
    steps = rng.randint(3, 8)
    with open(folder / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "loss": rng.uniform(1, 5), "lr": 1e-3 * step / steps,
                                "grad_norm": rng.uniform(0.1, 2), "tokens_per_s": rng.uniform(1e3, 1e4)}) + "\n")
    return folder


def test_plot_run_writes_exactly_the_path_it_names_or_refuses_it(tmp_path, seed, capsys):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the 'plot' extra)")
    main = _tool_main("plot_run")
    run = _run_folder(tmp_path / "run", random.Random(seed))
    afile = tmp_path / "afile"
    afile.write_text("mine")
    folder = tmp_path / "plots"
    folder.mkdir()
    for out, words in ((afile, "give an image file name ending in one of"),
                       (tmp_path / "noext", "give an image file name ending in one of"),
                       (folder, "is a folder"),
                       (afile / "x.png", "afile is a file, not a folder"),
                       (tmp_path / "missing" / "x.png", "does not exist")):
        capsys.readouterr()
        assert main([str(run), "--out", str(out)]) == 1, out
        err = capsys.readouterr().err
        assert err.startswith("error: --out ") and len(err.strip().splitlines()) == 1 and words in err, err
        assert "ending in" not in err or (".png" in err and ".pdf" in err and ".pgf" not in err), err
    assert afile.read_text() == "mine" and list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "plots", "run"]

    for name, magic in (("c.png", b"\x89PNG"), ("c.PDF", b"%PDF"), ("c.svg", b"<?xml")):
        capsys.readouterr()
        assert main([str(run), "--out", str(folder / name)]) == 0
        assert capsys.readouterr().out.strip() == f"wrote {folder / name}"
        assert (folder / name).read_bytes().startswith(magic)
    assert sorted(p.name for p in folder.iterdir()) == ["c.PDF", "c.png", "c.svg"]
