"""Shared pytest fixtures. Real-model fixtures (session-scoped) live in tests/real_models.py."""

from tests.real_models import gemma3_dir, gemma3_hf, smollm2_dir, smollm2_hf  # noqa: F401
