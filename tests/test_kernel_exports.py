"""The package's functional entry points: `import agentflan.kernels as K; K.rms_norm(...)`
calls the function, lazily (importing the package does not import Triton), also after
the submodule of the same name has been imported, and the submodules stay importable."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest
import torch

import agentflan.kernels as K
from triton_harness import DEVICE, assert_close, fresh_seed, poisoned_outputs, randn, rng

ENTRY_POINTS = {
    "rms_norm": "agentflan.kernels.rms_norm",
    "swiglu": "agentflan.kernels.swiglu",
    "apply_rope": "agentflan.kernels.rope",
    "cross_entropy": "agentflan.kernels.cross_entropy",
    "fused_linear_cross_entropy": "agentflan.kernels.fused_linear_cross_entropy",
    "flash_attn_varlen": "agentflan.kernels.flash_attention",
}


def test_importing_the_package_does_not_import_triton():
    code = (
        "import sys, agentflan.kernels as K\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert set(K.__all__) >= {'rms_norm', 'flash_attn_varlen', 'resolve_ops', 'reference'}\n"
        "assert callable(K.rms_norm) and 'triton' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_is_the_function_under_both_spellings(name):
    module = importlib.import_module(ENTRY_POINTS[name])  # the submodule, also when named like its function
    assert isinstance(module, types.ModuleType) and module.__name__ == ENTRY_POINTS[name]
    fn = getattr(K, name)
    assert isinstance(fn, types.FunctionType), f"agentflan.kernels.{name} is {type(fn).__name__}"
    assert fn is getattr(module, name)
    namespace: dict = {}
    exec(f"from {ENTRY_POINTS[name]} import {name} as direct", namespace)
    exec(f"from agentflan.kernels import {name} as packaged", namespace)
    assert namespace["direct"] is namespace["packaged"] is fn
    assert sys.modules[ENTRY_POINTS[name]] is module


def test_all_and_dir_are_honest():
    for name in K.__all__:
        assert hasattr(K, name), name
    assert set(ENTRY_POINTS) <= set(dir(K))
    with pytest.raises(AttributeError, match="no attribute 'not_a_kernel'"):
        K.not_a_kernel  # noqa: B018


def test_package_function_computes():
    """K.rms_norm(...) is called, not a module: it gives the reference's answer."""
    seed = fresh_seed()
    g = rng(seed)
    x, w = randn(4, 24, gen=g), randn(24, gen=g)
    with poisoned_outputs():
        y = K.rms_norm(x, w, 1e-5)
    assert_close(y, K.reference.rms_norm(x.double(), w.double(), 1e-5), 1e-5, "K.rms_norm", seed)
    assert y.device.type == torch.device(DEVICE).type
