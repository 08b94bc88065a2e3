"""Kernel test setup: run Triton kernels under the interpreter where there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit decorator runs (the decorator
reads it), i.e. before the kernel modules are imported; pytest imports this file
before any test module, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from triton_harness import install_bf16_emulation  # noqa: E402  (must follow the environment setup)

install_bf16_emulation()


def pytest_configure(config):
    # Interpreted kernels compute with numpy, which warns where exp overflows to inf (e.g.
    # sigmoid of a large negative value, whose result 0 is right; the GPU does the same
    # silently). Test assertions check outputs are finite, so the warning adds nothing.
    config.addinivalue_line("filterwarnings", "ignore:overflow encountered in exp:RuntimeWarning")
