"""The package builds as a wheel with the right layout, and CMakeLists.txt builds the extension on its own."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_copy(dst: Path) -> Path:
    """A copy of the tracked sources, so the build sees what a clean clone sees."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout: cannot tell tracked sources from build outputs")
    for name in files.stdout.splitlines():
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    return dst


@pytest.mark.slow
def test_wheel_maps_kernels_under_agentflan(tmp_path):
    src = _tracked_copy(tmp_path / "src")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("agentflan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    unexpected = {t for t in top_level if t != "agentflan" and not t.endswith(".dist-info")}
    assert not unexpected, f"{wheel.name} installs top-level {sorted(unexpected)}; only agentflan belongs there"
    assert any(n.startswith("agentflan/_C.") and n.endswith((".so", ".pyd")) for n in names)
    for required in ["agentflan/kernels/__init__.py", "agentflan/kernels/reference.py",
                     "agentflan/assets/tokenizer.model", "agentflan/assets/agentflan_tooluse.jsonl",
                     "agentflan/toolworld/__init__.py", "agentflan/corpus/build.py",
                     "agentflan/trainer/loop.py", "agentflan/generate/__init__.py"]:
        assert required in names, f"{required} missing from {wheel.name}"


@pytest.mark.slow
def test_cmake_alone_builds_the_extension(tmp_path):
    if shutil.which("cmake") is None or shutil.which("ninja") is None:
        pytest.skip("cmake and ninja are needed on PATH for the standalone C++ build")
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DPython_EXECUTABLE={sys.executable}"]
    for cmd in (configure, ["cmake", "--build", str(build)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    built = list(build.glob("_C.*"))
    assert built, f"no _C module in {build}"
    probe = f"import sys; sys.path.insert(0, {str(build)!r}); import _C; print(_C.__doc__)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0 and "agentflan" in proc.stdout, proc.stderr
