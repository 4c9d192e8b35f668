"""Shared pytest fixtures. The real-model fixtures (session-scoped) live in
tests/support/real_models.py; they are bound here so every test module sees them."""

import pytest

from countdown_jax.kernels._platform import interpret_mode
from tests.support import real_models

gemma3_dir = real_models.gemma3_dir
gemma3_hf = real_models.gemma3_hf
smollm2_dir = real_models.smollm2_dir
smollm2_hf = real_models.smollm2_hf


@pytest.fixture
def pallas_interpret():
    """Run every Pallas kernel in the interpreter during the test (CPU), as on a GPU."""
    with interpret_mode(True):
        yield
