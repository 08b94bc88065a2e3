"""Plot loss, learning rate, gradient norm and throughput of one or several runs into one PNG.

    python tools/plot_run.py runs/default                     # -> runs/default/curves.png
    python tools/plot_run.py runs/a runs/b --out compare.png  # runs overlaid
    python tools/plot_run.py runs/a --out curves.pdf          # the suffix picks the format

Needs matplotlib (pip install 'agentflan[plot]').
"""

from __future__ import annotations

import sys
from pathlib import Path

from agentflan.cli import ArgumentParser
from agentflan.output_paths import OutputPathError, check_output_file, same_file
from agentflan.trainer.errors import TrainError
from agentflan.trainer.plot import plot_runs


def image_suffixes() -> list[str]:
    """The file suffixes matplotlib writes without LaTeX (.png, .pdf, .svg, ...; not .pgf).
    Raises TrainError without matplotlib (how to install it)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise TrainError("plotting needs matplotlib: pip install 'agentflan[plot]'") from None
    return [f".{ext}" for ext in FigureCanvasBase.get_supported_filetypes() if ext != "pgf"]


def check_image_path(out: Path) -> None:
    """Raises OutputPathError unless ``out`` is a file path with an image suffix in an existing
    folder (an existing image there is replaced: plots are derived from the runs' metrics)."""
    check_output_file(out, "--out", overwrite=None)
    suffixes = image_suffixes()
    if out.suffix.lower() not in suffixes:
        raise OutputPathError(f"--out {out}: give an image file name ending in one of {', '.join(suffixes)}")
    if not out.parent.is_dir():
        raise OutputPathError(f"--out {out}: the folder {out.parent} does not exist")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (holding metrics.jsonl)")
    parser.add_argument("--out", help="image to write, replaced if it exists; its suffix picks the format "
                                      "(.png, .pdf, .svg, ...; default: RUN_DIR/curves.png of the first run)")
    args = parser.parse_args(argv)
    try:
        for i, run in enumerate(args.run_dirs):  # one run twice would draw the same curves twice
            if any(same_file(run, other) for other in args.run_dirs[:i]):
                raise OutputPathError(f"RUN_DIR {run}: given twice; give each run once")
        out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "curves.png"
        if args.out:
            check_image_path(out)
        out = plot_runs(args.run_dirs, out)
    except (TrainError, OutputPathError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
