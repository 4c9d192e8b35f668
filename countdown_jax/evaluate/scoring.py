"""The compiled scorer: dense context prefill once per batch, then every setting's
sparse continuation against that cache (vmapped over the setting's policies)."""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from countdown_jax import model as model_lib
from countdown_jax.evaluate.items import MAX_SCORED_CONTEXT, Item
from countdown_jax.evaluate.settings import Setting

LOGIT_BUDGET_BYTES = 1 << 29   # float32 logits per batch (all stacked settings together)
MAX_ROWS = 64
_CTX_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)
_CONT_BUCKETS = (8, 16, 40, 80, 160, 320)

@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _dense_context(params, cfg, ctx, ctx_len, first, *, cache_len: int):
    """Dense prefill: cache, log p(first | ctx) [B], first == argmax [B]."""
    B = ctx.shape[0]
    cache = model_lib.init_cache(cfg, B, cache_len, params["embed"].dtype)
    logits, cache, _ = model_lib.prefill(params, cfg, ctx, ctx_len, cache,
                                         logits_at=(ctx_len - 1)[:, None])
    lp = jax.nn.log_softmax(logits[:, 0], axis=-1)
    lp_first = jnp.take_along_axis(lp, first[:, None], axis=-1)[:, 0]
    return cache, lp_first, jnp.argmax(logits[:, 0], axis=-1) == first


def _continuation(params, cfg, cache, y_in, y_tgt, start, valid, policy, spec):
    """One setting: per-position log p(y_tgt) [B, T], greedy hit [B, T], per-row kept
    sums over valid positions [L, B]."""
    logits, _, kept = model_lib.extend(params, cfg, y_in, start, cache, spec=spec,
                                       policy=policy)
    lp = jax.nn.log_softmax(logits, axis=-1)
    lp_t = jnp.take_along_axis(lp, y_tgt[..., None], axis=-1)[..., 0]
    hit = jnp.argmax(logits, axis=-1) == y_tgt
    vf = valid.astype(jnp.float32)
    return lp_t * vf, hit | ~valid, jnp.sum(kept * vf[None], axis=2)


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _continuation_sweep(params, cfg, cache, y_in, y_tgt, start, valid, policies, *, spec):
    """``_continuation`` vmapped over stacked policies (leading axis R); dense: R = 1."""
    if spec.is_dense:
        out = _continuation(params, cfg, cache, y_in, y_tgt, start, valid, None, spec)
        return jax.tree.map(lambda a: a[None], out)
    return jax.vmap(lambda p: _continuation(params, cfg, cache, y_in, y_tgt, start, valid, p,
                                            spec))(policies)



@dataclasses.dataclass
class Scores:
    """Per setting index s, per item: lp [n_tokens] (position 0 dense), greedy flags."""

    items: list[Item]
    settings: list[Setting]
    lp: list[list[np.ndarray]]           # [setting][r] -> object array of per-item lp
    hit: list[list[np.ndarray]]
    kept: dict                           # (setting, r, task) -> (sum kept [L], n tokens)
    seconds: float = 0.0

    def token_lp(self, s: int, r: int, i: int) -> np.ndarray:
        return self.lp[s][r][i]

    def item_ll(self, s: int, r: int) -> np.ndarray:
        """Summed log-likelihood of each item's scored tokens (index >= score_from)."""
        return np.array([self.lp[s][r][i][it.score_from:].sum()
                         for i, it in enumerate(self.items)])

    def item_greedy(self, s: int, r: int) -> np.ndarray:
        return np.array([bool(self.hit[s][r][i][it.score_from:].all())
                         for i, it in enumerate(self.items)])

    def item_count(self) -> np.ndarray:
        return np.array([len(it.continuation) - it.score_from for it in self.items])

    def realised_sparsity(self, s: int, r: int, task: str) -> tuple[float, np.ndarray]:
        k, n = self.kept.get((s, r, task), (None, 0))
        if n == 0:
            return float("nan"), None
        per_layer = 1.0 - k / n
        return float(per_layer.mean()), per_layer


def _bucket(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def _batches(items: list[Item], vocab: int, stacked: int, max_rows: int = MAX_ROWS):
    """Group item indices by (context bucket, continuation bucket): (ctx_len, cont_len,
    cache_len, rows, indices). Rows per continuation bucket are fixed (a power of two with
    the logits of ``stacked`` settings under LOGIT_BUDGET_BYTES) so a continuation shape
    compiles once across tasks."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        n_in = len(it.continuation) - 1
        cb = 0 if n_in == 0 else _bucket(n_in, _CONT_BUCKETS)
        if cb and len(it.context) > MAX_SCORED_CONTEXT:
            raise ValueError(f"item {it.task}/{it.doc}: context of {len(it.context)} tokens "
                             f"exceeds MAX_SCORED_CONTEXT={MAX_SCORED_CONTEXT} (truncate it)")
        groups.setdefault((_bucket(len(it.context), _CTX_BUCKETS), cb), []).append(i)
    out = []
    for (tc, tn), idx in sorted(groups.items()):
        per_row = max(tn, 1) * vocab * 4 * max(stacked, 1)
        rows = max(1, min(max_rows, LOGIT_BUDGET_BYTES // per_row))
        rows = 1 << int(math.floor(math.log2(rows)))
        if tn == 0:  # prefill only: size the batch to the group
            rows = min(rows, 1 << int(math.ceil(math.log2(len(idx)))))
        cache_len = (MAX_SCORED_CONTEXT + tn) if tn else tc + 1
        for s in range(0, len(idx), rows):
            out.append((tc, tn, cache_len, rows, idx[s:s + rows]))
    return out


def score(params, cfg, items: list[Item], settings: list[Setting], *,
          progress: bool = True, desc: str = "score", max_rows: int = MAX_ROWS) -> Scores:
    """Log-probabilities of every item's continuation under every setting."""
    t0 = time.perf_counter()
    lp = [[[None] * len(items) for _ in range(st.size)] for st in settings]
    hit = [[[None] * len(items) for _ in range(st.size)] for st in settings]
    kept: dict = {}
    stacked = max(st.size for st in settings)
    batches = _batches(items, cfg.vocab_size, stacked, max_rows)
    total = sum(len(b[4]) for b in batches)
    bar = tqdm(total=total, desc=desc, unit="item", disable=not progress)
    L = cfg.num_layers
    for tc, tn, cache_len, rows, idx in batches:
        nb = len(idx)
        ctx = np.zeros((rows, tc), np.int32)
        clen = np.ones((rows,), np.int32)
        first = np.zeros((rows,), np.int32)
        y_in = np.zeros((rows, max(tn, 1)), np.int32)
        y_tgt = np.zeros((rows, max(tn, 1)), np.int32)
        valid = np.zeros((rows, max(tn, 1)), bool)
        for j, i in enumerate(idx):
            it = items[i]
            c, y = it.context, it.continuation
            ctx[j, :len(c)] = c
            clen[j] = len(c)
            first[j] = y[0]
            n = len(y) - 1
            y_in[j, :n] = y[:-1]
            y_tgt[j, :n] = y[1:]
            valid[j, :n] = True
        cache, lp0, hit0 = _dense_context(params, cfg, jnp.asarray(ctx), jnp.asarray(clen),
                                          jnp.asarray(first), cache_len=cache_len)
        lp0, hit0 = np.asarray(lp0), np.asarray(hit0)
        for s, st in enumerate(settings):
            if tn == 0:
                outs = (np.zeros((st.size, rows, 1)), np.ones((st.size, rows, 1), bool),
                        np.zeros((st.size, L, rows)))
            else:
                outs = _continuation_sweep(params, cfg, cache, jnp.asarray(y_in),
                                           jnp.asarray(y_tgt), jnp.asarray(clen),
                                           jnp.asarray(valid), st.policies, spec=st.spec)
                outs = [np.asarray(o) for o in outs]
            lpr, hitr, keptr = outs
            for r in range(st.size):
                for j, i in enumerate(idx):
                    n = len(items[i].continuation) - 1
                    lp[s][r][i] = np.concatenate([[lp0[j]], lpr[r, j, :n]])
                    hit[s][r][i] = np.concatenate([[hit0[j]], hitr[r, j, :n]])
                if tn == 0:
                    continue
                for j, i in enumerate(idx):
                    task = items[i].task
                    k0, n0 = kept.get((s, r, task), (np.zeros(L), 0.0))
                    kept[(s, r, task)] = (k0 + keptr[r, :, j], n0 + float(valid[j].sum()))
        bar.update(nb)
    bar.close()
    return Scores(items, settings, lp, hit, kept, time.perf_counter() - t0)
