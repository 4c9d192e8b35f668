"""Real-weight fixtures shared by the suite: SmolLM2-135M (Llama family, SwiGLU) and
Gemma-3-270M (GeGLU) from their PyPI GGUF packages, converted once per machine, and the
transformers oracle loaded from the same GGUF.

Locating and converting the GGUFs is conversion/registry_models.py (cached under
$COUNTDOWN_CACHE keyed by the GGUF's sha256). The oracle is transformers' own GGUF load in
float32; that load takes 30-70 s on 2 cores, so its state is cached once as an ordinary
safetensors checkpoint beside the converted models (keyed by GGUF sha256 and transformers
version) and later runs load that instead.

Use from a test module either through the session fixtures (tests/conftest.py imports
them) or the functions directly:

    def test_x(smollm2_dir, smollm2_hf): ...
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from conversion.registry_models import (GEMMA3, SMOLLM2, cache_dir, converted, gemma3_gguf,
                                        gguf_path, sha256, smollm2_gguf)

__all__ = ["SMOLLM2", "GEMMA3", "smollm2_gguf", "gemma3_gguf", "gguf_path", "converted",
           "hf_oracle", "tokenizer", "gguf_sha", "smollm2_dir", "gemma3_dir", "smollm2_hf",
           "gemma3_hf"]


@functools.lru_cache(maxsize=None)
def gguf_sha(name: str) -> str:
    return sha256(gguf_path(name))


@functools.lru_cache(maxsize=None)
def converted_dir(name: str, dtype: str = "float32") -> Path:
    """converted() once per process (it hashes the GGUF on every call)."""
    return converted(name, dtype)


def _oracle_dir(name: str) -> Path:
    import transformers

    return cache_dir() / f"{name}-{gguf_sha(name)[:16]}-hf{transformers.__version__}-float32"


def _build_oracle_checkpoint(name: str, out: Path) -> None:
    """transformers' GGUF load, re-saved as a plain float32 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    src = gguf_path(name)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                  dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model
    # built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"oracle state mismatch: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        fresh.save_pretrained(str(tmp / "m"))
        if not out.exists():
            os.replace(tmp / "m", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def hf_oracle(name: str):
    """transformers' float32 model of the GGUF (eval mode, eager attention), once per process."""
    import torch
    from transformers import AutoModelForCausalLM

    # One torch thread: with XLA's threads in the same process (and other jobs on a 2-core
    # machine) torch's OpenMP pool oversubscribes and small matmuls run ~10x slower.
    torch.set_num_threads(1)
    d = _oracle_dir(name)
    if not (d / "config.json").is_file():
        _build_oracle_checkpoint(name, d)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval()


@functools.lru_cache(maxsize=None)
def tokenizer(name: str):
    """The tokenizer saved in the converted model directory (extracted from the GGUF)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(converted_dir(name) / "tokenizer"))


# -- session fixtures (re-exported by tests/conftest.py) ------------------------------------
@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return converted_dir(SMOLLM2)


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    return converted_dir(GEMMA3)


@pytest.fixture(scope="session")
def smollm2_hf():
    return hf_oracle(SMOLLM2)


@pytest.fixture(scope="session")
def gemma3_hf():
    return hf_oracle(GEMMA3)
