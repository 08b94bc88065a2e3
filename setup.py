"""Builds agentflan, its C++ extension (through CMake + Ninja) and maps kernels/ to agentflan.kernels."""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with Ninja, placing the module where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DAGENTFLAN_OUTPUT_DIR={output.parent}",
        ]
        # Let a pip-installed ninja be found even when its bin folder is not on PATH.
        try:
            import ninja

            configure.append(f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}")
        except ImportError:
            pass
        subprocess.run(configure, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        built = next(output.parent.glob("_C.*"), None)
        if built is None:
            raise RuntimeError(f"CMake did not produce agentflan/_C in {output.parent}")
        if built.resolve() != output:
            built.replace(output)


setup(
    # Every subpackage of agentflan/, plus kernels/ installed as agentflan.kernels.
    packages=["agentflan", *(f"agentflan.{p}" for p in find_packages("agentflan")), "agentflan.kernels"],
    package_dir={"agentflan": "agentflan", "agentflan.kernels": "kernels"},
    package_data={"agentflan": ["assets/*"]},
    ext_modules=[CMakeExtension("agentflan._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
