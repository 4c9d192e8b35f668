"""What every kernel op shares: the implementation vocabulary, backend resolution, the
interpret-mode setting, and the flat view of the model's stacked weights.

One vocabulary for every op (``sparse_ffn``, ``fused_sparse_ffn``, ``decode_attention``,
``proxy_scores``):

    "xla"         plain JAX (the op's reference, or its XLA form)
    "pallas"      the Pallas kernel of the running platform; where the op has none (CPU, or
                  a backend the op lacks) the XLA path, with a warning once - unless
                  interpret mode is on, which runs the GPU kernel in the Pallas interpreter
    "pallas_gpu"  the Triton-lowered kernel (compiled on GPU, or interpreted anywhere)
    "pallas_tpu"  the Mosaic TPU kernel (compiled on TPU, or interpreted anywhere)

Interpret mode is an explicit option: each op takes ``interpret=`` (True / False), and
``interpret=None`` (the default) reads this module's setting, which CPU tests switch on
with ``interpret_mode(True)`` (never set in production). The model and the FFN pass
nothing, so one setting covers every kernel they reach.
"""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp

from countdown_jax.gated import MLP_KEYS
from countdown_jax.selection import mask_to_indices

__all__ = ["IMPLEMENTATIONS", "MAX_FLAT_ELEMENTS", "check_implementation", "flat_mlp",
           "flat_stack", "index_list", "interpret_enabled", "interpret_mode", "layer_slice",
           "pallas_backend", "reset_fallback_warnings", "resolve", "warn_once"]

IMPLEMENTATIONS = ("xla", "pallas", "pallas_gpu", "pallas_tpu")

# The Pallas GPU kernels address elements with int32 offsets.
MAX_FLAT_ELEMENTS = 2 ** 31 - 1

_interpret = False
_warned: set[str] = set()


def interpret_enabled(interpret: bool | None = None) -> bool:
    """An op's ``interpret=`` argument, or the setting when it is None."""
    return _interpret if interpret is None else bool(interpret)


@contextlib.contextmanager
def interpret_mode(enabled: bool = True):
    """Run the Pallas kernels in the interpreter (CPU tests) while the block is open. Read
    at trace time: functions jitted before the switch keep their compiled form."""
    global _interpret
    before, _interpret = _interpret, bool(enabled)
    try:
        yield
    finally:
        _interpret = before


def warn_once(what: str):
    if what not in _warned:
        _warned.add(what)
        warnings.warn(what, stacklevel=4)


def reset_fallback_warnings():
    """Forget which fallbacks have warned (each warns once per process)."""
    _warned.clear()


def check_implementation(implementation: str, op: str):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown {op} implementation {implementation!r}; expected one of "
                         f"{IMPLEMENTATIONS}")


def pallas_backend(interpret: bool | None = None) -> str | None:
    """The Pallas backend "pallas" means here: the platform's, "pallas_gpu" on CPU in
    interpret mode, else None (no Pallas)."""
    native = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend())
    if native is None and interpret_enabled(interpret):
        return "pallas_gpu"
    return native


def resolve(implementation: str, interpret: bool | None, op: str,
            backends=("pallas_gpu", "pallas_tpu")) -> str:
    """The backend that runs: "pallas" -> the platform's Pallas backend when ``op`` has one
    (``backends``), else "xla" with a warning once; explicit names are checked and kept."""
    check_implementation(implementation, op)
    if implementation != "pallas":
        if implementation != "xla" and implementation not in backends:
            raise ValueError(f"{op} has no {implementation!r} backend; use one of "
                             f"{('xla', 'pallas') + tuple(backends)}")
        return implementation
    backend = pallas_backend(interpret)
    if backend in backends:
        return backend
    platform = jax.default_backend()
    why = (f"Pallas kernels need a GPU or TPU (backend is {platform!r})" if backend is None
           else f"{op} has no Pallas kernel for {platform!r}")
    warn_once(f"{why}; {op} falls back to the XLA reference")
    return "xla"


def layer_slice(ws, layer):
    """This layer's [m, d] matrices out of [L, m, d] stacks (XLA copies the slice)."""
    return tuple(jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False) for w in ws)


def flat_stack(ws, layer, op: str = "sparse_ffn"):
    """Stacked [L, m, d] weights -> flat [L*m, d] views (free reshapes), the row offset of
    ``layer`` and m; ``layer=None`` -> the [m, d] weights as given, offset 0, m None.
    A stack too large for int32 element offsets gives the layer's own slice instead
    (XLA copies it: correct, but slower)."""
    if layer is None:
        if any(w.ndim != 2 for w in ws):
            raise ValueError(f"{op}: stacked [L, m, d] weights need layer=")
        return ws, 0, None
    if any(w.ndim != 3 for w in ws) or len({w.shape for w in ws}) != 1:
        raise ValueError(f"{op}: layer= needs three [L, m, d] stacks, got "
                         f"{[w.shape for w in ws]}")
    nl, m, d = ws[0].shape
    if nl * m * d > MAX_FLAT_ELEMENTS:
        return layer_slice(ws, layer), 0, m
    return tuple(w.reshape(nl * m, d) for w in ws), jnp.asarray(layer, jnp.int32) * m, m


def flat_mlp(mlp, layer, op: str):
    """``flat_stack`` of an MLP's {"gate", "up", "down"} weights, kept as a dict."""
    ws, off, m = flat_stack(tuple(mlp[k] for k in MLP_KEYS), layer, op)
    return dict(zip(MLP_KEYS, ws)), off, m


def index_list(keep, capacity: int):
    """Boolean keep [N, m] -> (idx [N, min(capacity, m)] int32, count [N] int32), on device.

    The model's compaction (``selection.mask_to_indices``: ascending kept indices, padded),
    except that count is the true number kept (may exceed capacity; kernels then use the
    first ``capacity`` entries, so compare count with capacity to detect overflow).
    """
    idx, _ = mask_to_indices(keep, capacity)
    return idx, jnp.sum(keep, axis=-1, dtype=jnp.int32)
