"""Shared pytest fixtures. Real-model fixtures (session-scoped) live in tests/real_models.py."""

import pytest

from countdown_jax.kernels._platform import interpret_mode
from tests.real_models import gemma3_dir, gemma3_hf, smollm2_dir, smollm2_hf  # noqa: F401


@pytest.fixture
def pallas_interpret():
    """Run every Pallas kernel in the interpreter during the test (CPU), as on a GPU."""
    with interpret_mode(True):
        yield
