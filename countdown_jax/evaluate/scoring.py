"""The compiled scorer: dense context prefill once per batch, then every setting's
sparse continuation against that cache (vmapped over the setting's policies)."""

from __future__ import annotations

import concurrent.futures
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
_CONT_BUCKETS = (8, 16, 40, 80, 160, 320, 640)

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
    """Per setting s, policy r and item i: log p of each continuation token (position 0
    from the dense context) and greedy flags, kept as the per-batch blocks the scorer
    produced (per-item arrays for 10^5 items x 10^2 settings would cost minutes of
    Python); ``item_ll`` / ``item_greedy`` reduce the blocks vectorised."""

    items: list[Item]
    settings: list[Setting]
    blocks: list[dict]                   # idx, score_from, n_in, lp0, hit0 [nb];
                                         # lp/hit: [s] -> [R, nb, T]
    kept: dict                           # (setting, r, task) -> (sum kept [L], n tokens)
    seconds: float = 0.0
    compile_seconds: float = 0.0

    def __post_init__(self):
        self._where = {}
        for b, blk in enumerate(self.blocks):
            for j, i in enumerate(blk["idx"]):
                self._where[int(i)] = (b, j)

    def token_lp(self, s: int, r: int, i: int) -> np.ndarray:
        b, j = self._where[i]
        blk, n = self.blocks[b], len(self.items[i].continuation) - 1
        return np.concatenate([[blk["lp0"][j]], blk["lp"][s][r, j, :n]])

    def _reduce(self, s: int, r: int, greedy: bool) -> np.ndarray:
        out = np.zeros(len(self.items), bool if greedy else np.float64)
        for blk in self.blocks:
            idx, sf, n_in = blk["idx"], blk["score_from"], blk["n_in"]
            t = np.arange(blk["lp"][s].shape[-1])[None, :]
            scored = (t >= np.maximum(sf - 1, 0)[:, None]) & (t < n_in[:, None])
            if greedy:
                rest = np.all(blk["hit"][s][r] | ~scored, axis=1)
                out[idx] = rest & (blk["hit0"] | (sf > 0))
            else:
                rest = np.sum(np.where(scored, blk["lp"][s][r], 0.0), axis=1)
                out[idx] = rest + np.where(sf == 0, blk["lp0"], 0.0)
        return out

    def item_ll(self, s: int, r: int) -> np.ndarray:
        """Summed log-likelihood of each item's scored tokens (index >= score_from)."""
        return self._reduce(s, r, greedy=False)

    def item_greedy(self, s: int, r: int) -> np.ndarray:
        return self._reduce(s, r, greedy=True)

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


def _batches(items: list[Item], vocab: int, stacked: int, max_rows: int = MAX_ROWS,
             logit_budget: int = LOGIT_BUDGET_BYTES):
    """Group item indices by (context bucket, continuation bucket): (ctx_len, cont_len,
    cache_len, rows, indices). Rows per continuation bucket are fixed (a power of two with
    the logits of ``stacked`` settings under ``logit_budget``) so a continuation shape
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
        rows = max(1, min(max_rows, logit_budget // per_row))
        rows = 1 << int(math.floor(math.log2(rows)))
        if tn == 0:  # prefill only: size the batch to the group
            rows = min(rows, 1 << int(math.ceil(math.log2(len(idx)))))
        cache_len = (MAX_SCORED_CONTEXT + tn) if tn else tc + 1
        for s in range(0, len(idx), rows):
            out.append((tc, tn, cache_len, rows, idx[s:s + rows]))
    return out


class _Programs:
    """One compiled executable per (function, static args, shapes), compiled ahead of the
    loop (``warm``: in parallel threads; XLA compiles outside the GIL), so the scoring loop
    never stalls on a compile and never retraces."""

    def __init__(self, params, cfg):
        self.params, self.cfg, self.exe = params, cfg, {}
        self.seconds = 0.0

    def _lower(self, key):
        kind, a, b, rows, _, spec, pols = key
        i32 = jax.ShapeDtypeStruct
        if kind == "ctx":
            tc, cache_len = a, b
            args = (i32((rows, tc), jnp.int32), i32((rows,), jnp.int32), i32((rows,), jnp.int32))
            return _dense_context.lower(self.params, self.cfg, *args, cache_len=cache_len)
        tn, cache_len = a, b
        cache = jax.eval_shape(lambda: model_lib.init_cache(self.cfg, rows, cache_len,
                                                            self.params["embed"].dtype))
        t = i32((rows, tn), jnp.int32)
        return _continuation_sweep.lower(self.params, self.cfg, cache, t, t,
                                         i32((rows,), jnp.int32), i32((rows, tn), jnp.bool_),
                                         pols, spec=spec)

    def warm(self, keys, threads: int):
        todo = list({k[:5]: k for k in keys if k[:5] not in self.exe}.values())
        t0 = time.perf_counter()

        def build(k):
            return k[:5], self._lower(k).compile()

        if threads > 1:
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                done = list(pool.map(build, todo))
        else:
            done = [build(k) for k in todo]
        self.exe.update(done)
        self.seconds += time.perf_counter() - t0

    def __call__(self, key, *args):
        if key[:5] not in self.exe:
            self.warm([key], 1)
        return self.exe[key[:5]](*args)


def _keys(batches, settings):
    """Every program the loop will run: (kind, len, cache_len, rows, setting, spec, pols)."""
    keys = []
    for tc, tn, cache_len, rows, _ in batches:
        keys.append(("ctx", tc, cache_len, rows, -1, None, None))
        if tn:
            keys += [("cont", tn, cache_len, rows, s, st.spec, st.policies)
                     for s, st in enumerate(settings)]
    return keys


def score(params, cfg, items: list[Item], settings: list[Setting], *,
          progress: bool = True, desc: str = "score", max_rows: int = MAX_ROWS,
          logit_budget: int = LOGIT_BUDGET_BYTES, compile_threads: int = 1) -> Scores:
    """Log-probabilities of every item's continuation under every setting.

    Every program is compiled first (``compile_threads`` > 1: in parallel), then each batch
    runs its dense context once and every setting against that cache, dispatched together
    so the device never waits on the host between settings."""
    t0 = time.perf_counter()
    kept: dict = {}
    stacked = max(st.size for st in settings)
    batches = _batches(items, cfg.vocab_size, stacked, max_rows, logit_budget)
    programs = _Programs(params, cfg)
    programs.warm(_keys(batches, settings), compile_threads)
    total = sum(len(b[4]) for b in batches)
    bar = tqdm(total=total, desc=desc, unit="item", disable=not progress)
    L = cfg.num_layers
    tasks = np.array([it.task for it in items])
    blocks = []
    for tc, tn, cache_len, rows, idx in batches:
        nb = len(idx)
        T = max(tn, 1)
        ctx = np.zeros((rows, tc), np.int32)
        clen = np.ones((rows,), np.int32)
        first = np.zeros((rows,), np.int32)
        y_in = np.zeros((rows, T), np.int32)
        y_tgt = np.zeros((rows, T), np.int32)
        valid = np.zeros((rows, T), bool)
        for j, i in enumerate(idx):
            c, y = items[i].context, items[i].continuation
            ctx[j, :len(c)] = c
            clen[j] = len(c)
            first[j] = y[0]
            n = len(y) - 1
            y_in[j, :n] = y[:-1]
            y_tgt[j, :n] = y[1:]
            valid[j, :n] = True
        cache, lp0, hit0 = programs(("ctx", tc, cache_len, rows, -1), params, ctx, clen,
                                    first)
        outs = []
        for s, st in enumerate(settings):
            if tn == 0:
                outs.append((np.zeros((st.size, rows, 1)), np.ones((st.size, rows, 1), bool),
                             np.zeros((st.size, L, rows))))
            else:
                outs.append(programs(("cont", tn, cache_len, rows, s), params, cache, y_in,
                                     y_tgt, clen, valid, st.policies))
        blk = {"idx": np.asarray(idx), "lp0": np.asarray(lp0)[:nb],
               "score_from": np.array([items[i].score_from for i in idx]),
               "n_in": np.array([len(items[i].continuation) - 1 for i in idx]),
               "hit0": np.asarray(hit0)[:nb], "lp": [], "hit": []}
        row_task = tasks[idx]
        n_valid = valid[:nb].sum(axis=1).astype(np.float64)
        for s, (lpr, hitr, keptr) in enumerate(outs):
            blk["lp"].append(np.asarray(lpr)[:, :nb])
            blk["hit"].append(np.asarray(hitr)[:, :nb])
            if tn == 0:
                continue
            keptr = np.asarray(keptr)[:, :, :nb]
            for task in np.unique(row_task):
                on = row_task == task
                for r in range(settings[s].size):
                    k0, n0 = kept.get((s, r, task), (np.zeros(L), 0.0))
                    kept[(s, r, task)] = (k0 + keptr[r][:, on].sum(axis=1),
                                          n0 + float(n_valid[on].sum()))
        blocks.append(blk)
        bar.update(nb)
    bar.close()
    return Scores(items, settings, blocks, kept, time.perf_counter() - t0, programs.seconds)
