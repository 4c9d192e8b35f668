"""countdown-jax: COUNTDOWN contextual activation sparsity for gated-MLP decoders in JAX.

    import countdown_jax as cj
    model = cj.load(model_dir)                      # a directory from `countdown-jax convert`
    out = cj.generate_text(model, "The capital of France is", method="m_countdown",
                           sparsity=0.7, max_new_tokens=16)
    outs = cj.sweep(model, "The capital of France is", method="m_countdown",
                    sparsities=[0.5, 0.7, 0.9])     # one vmapped program, one result per r

Lower level: ``generate`` (jitted, one program), ``SparseSpec`` + ``make_policy`` /
``stack_policies`` (the static rule and the traced per-layer values), ``sparsity_setup``.
Top-level names load lazily, so importing a submodule (e.g. ``countdown_jax.kernels``)
does not pull in the model, the tokenizer stack or transformers. ``__all__`` and ``dir()``
list them all the same (for IDEs and tab completion).
"""

import importlib

_EXPORTS = {
    "Model": "countdown_jax.api", "TextOutput": "countdown_jax.api",
    "generate_text": "countdown_jax.api", "load": "countdown_jax.api",
    "sparsity_setup": "countdown_jax.api", "sweep": "countdown_jax.api",
    "calibrate_proxy": "countdown_jax.calibrate", "calibrate_thresholds": "countdown_jax.calibrate",
    "Generation": "countdown_jax.generate", "Sampling": "countdown_jax.generate",
    "generate": "countdown_jax.generate",
    "DecodePath": "countdown_jax.decode_path", "PORTABLE": "countdown_jax.decode_path",
    "DENSE": "countdown_jax.policy", "Method": "countdown_jax.policy",
    "SparseSpec": "countdown_jax.policy",
    "make_policy": "countdown_jax.policy", "stack_policies": "countdown_jax.policy",
    "METHODS": "countdown_jax.policy", "MODES": "countdown_jax.policy",
    "stack_layers": "countdown_jax.model", "unstack_layers": "countdown_jax.model",
    "SparseGatedMLP": "countdown_jax.modules", "CountdownLM": "countdown_jax.modules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'countdown_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
