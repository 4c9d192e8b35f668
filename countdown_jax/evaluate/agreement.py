"""Greedy generation agreement with dense: tokens matched before the first divergence."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from countdown_jax.evaluate.metrics import _mode_label, mean_stderr
from countdown_jax.evaluate.settings import Setting

def agreement(params, cfg, prompts: np.ndarray, lengths: np.ndarray, settings: list[Setting],
              *, max_new_tokens: int = 32, progress: bool = True) -> dict:
    """Greedy generation per setting vs dense: {(setting, r): tokens matched before the
    first divergence [P]} plus realised decode sparsity; prefill dense, every generated
    token sparse (generate.generate)."""
    from countdown_jax.generate import generate

    key = jax.random.PRNGKey(0)
    args = (params, cfg, jnp.asarray(prompts), jnp.asarray(lengths), key)
    ref = np.asarray(generate(*args, None, max_new_tokens=max_new_tokens).tokens)
    out = {}
    for s, st in enumerate(tqdm(settings, desc="agreement", disable=not progress)):
        if st.spec.is_dense:
            toks = ref[None]
            sp = np.zeros((1, cfg.num_layers))
        else:
            gen = _vmapped_generate(*args, st.policies, spec=st.spec,
                                    max_new_tokens=max_new_tokens)
            toks = np.asarray(gen[0])
            sp = np.asarray(gen[1])
        for r in range(st.size):
            same = toks[r] == ref
            matched = np.where(same.all(axis=1), max_new_tokens, np.argmin(same, axis=1))
            out[(s, r)] = (matched, sp[r])
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "max_new_tokens"))
def _vmapped_generate(params, cfg, prompts, lengths, key, policies, *, spec, max_new_tokens):
    from countdown_jax.generate import generate

    def one(p):
        g = generate(params, cfg, prompts, lengths, key, p, max_new_tokens=max_new_tokens,
                     spec=spec)
        return g.tokens, g.realised_sparsity

    return jax.vmap(one)(policies)


def agreement_rows(result: dict, settings: list[Setting], *, model: str,
                   max_new_tokens: int) -> list[dict]:
    rows = []
    for (s, r), (matched, sp) in result.items():
        st = settings[s]
        v, se = mean_stderr(matched / max_new_tokens)
        rows.append(dict(model=model, method=st.spec.method, mode=_mode_label(st.spec),
                         setting=st.name, sparsity_target=st.sparsities[r],
                         sparsity_realised=0.0 if st.spec.is_dense else float(np.mean(sp)),
                         task="generation", metric="agreement", score=v, stderr=se,
                         dense_score=1.0, diff_stderr=se, n_examples=len(matched)))
    return rows
