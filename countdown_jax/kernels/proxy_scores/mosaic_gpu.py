"""Mosaic GPU (Pallas plgpu) kernel for the proxy scores |act(x Gq^T) * (x Uq^T)| at 4 bits."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from countdown_jax.proxy import proxy_format

__all__ = ["MgpuConfig", "prepare", "proxy_scores_mgpu", "supports"]

BM = 64                  # rows per program: one wgmma M tile (a warpgroup's 64 rows)
TK = 128                 # inputs per tile of the tiled layout


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    tk: int = 128          # inputs per TMA tile (divides the scale group)
    nsub: int = 2          # tiles per pipeline step (one wgmma wait per step)
    stages: int = 3        # pipeline steps in flight per program
    relabel: bool = True   # read loaded codes as the wgmma fragment (W stored permuted to
                           # match); False: Mosaic's shuffling relayout, x permuted instead
    dry: bool = False      # probe only: stream the tiles, skip the maths (wrong scores)


def supports(proxy, d: int) -> bool:
    """Whether the tiled kernel takes this proxy: 4 bits, d and the scale group multiples
    of TK (Llama / Qwen widths; SmolLM2's 576 is not)."""
    bits, group = proxy_format(proxy, d)
    return bits == 4 and d % TK == 0 and group % TK == 0


@functools.partial(jax.jit, static_argnames=("d", "tiled"))
def prepare(proxy, d: int, tiled: bool = True):
    """Canonical proxy (planar uint8 codes, bf16 scale per group) -> the kernel's copy:
    {"w": int4 [2, m, d] (code - 8; inside each block of 32 inputs in ``_perm`` order, so
    that a thread's 8 consecutive codes are its wgmma fragment), "scale": bf16
    [2, d / group, m]}. ``tiled``: "w" is [2, d / TK, m, TK] instead, so that a [BM, TK]
    tile is one contiguous 4 KB block. Plain JAX; run once per layer, outside the decode
    step."""
    packed, scale = proxy["packed"], proxy["scale"]
    bits, group = proxy_format(proxy, d)
    if bits != 4:
        raise NotImplementedError(f"the Mosaic GPU proxy kernel takes 4-bit proxies, got {bits}")
    codes = jnp.concatenate([packed & 0xF, packed >> 4], axis=-1)       # planar: low, high
    w = _perm((codes.astype(jnp.int8) - 8)).astype(jnp.int4)
    if tiled:
        if d % TK or group % TK:
            raise NotImplementedError(f"tiled layout: d={d} and group={group} must be "
                                      f"multiples of {TK}")
        w = jnp.swapaxes(w.reshape(w.shape[:-1] + (d // TK, TK)), -3, -2)
    return {"w": w, "scale": jnp.swapaxes(scale.astype(jnp.bfloat16), -1, -2)}


def _act(name, g):
    # written out: the Mosaic GPU lowering has exp / tanh but no logistic
    if name == "silu":
        return g / (1.0 + jnp.exp(-g))
    if name == "gelu_tanh":
        return 0.5 * g * (1.0 + jnp.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    raise ValueError(f"unsupported activation {name!r}")


def _swizzle(row_bytes: int) -> int:
    for s in (128, 64, 32, 16):
        if row_bytes % s == 0:
            return s
    raise ValueError(f"a tile row of {row_bytes} bytes fits no TMA swizzle")


def _transforms(cols: int, bits: int):
    s = _swizzle(cols * bits // 8)
    return (plgpu.TilingTransform((8, s * 8 // bits)), plgpu.SwizzleTransform(s))


def _relabel(a):
    """[BM, k] in WGMMA_UPCAST_4X -> the same registers read as WGMMA_LAYOUT:
    logically a column permutation inside each 32-column block (see _perm), no shuffles."""
    import numpy as np
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA_UPCAST_4X,),
                       return_type=plgpu.ShapeDtypeStruct(a.shape, a.dtype,
                                                          layout=plgpu.Layout.WGMMA))
    def f(_, arr):
        regs = arr.registers                       # [..., col tiles of 32, ..., 1]
        new_shape = fa.WGMMA_LAYOUT.registers_shape(arr.shape)
        new = np.empty(new_shape, dtype=object)
        for idx, r in np.ndenumerate(regs):
            for j in range(4):                     # 8 codes -> 4 wgmma registers of 2
                nidx = (idx[0], idx[1] * 4 + j, *idx[2:])
                new[nidx] = utils.vector_slice(r, slice(2 * j, 2 * j + 2))
        return fa.FragmentedArray(_registers=new, _layout=fa.WGMMA_LAYOUT,
                                  _is_signed=arr.is_signed)
    return f(a)


def _perm(x):
    """[..., d] -> inside each block of 32, position 8q + 2j + e takes column 8j + 2q + e
    (an involution): the order in which a relabelled WGMMA_UPCAST_4X load holds W."""
    lead, d = x.shape[:-1], x.shape[-1]
    x = x.reshape(lead + (d // 32, 4, 4, 2))                # [blk, j, q, e]
    return jnp.swapaxes(x, -3, -2).reshape(lead + (d,))     # -> [blk, q, j, e]


def _kernel(w_gmem, x_gmem, s_gmem, o_gmem, s_smem, bar, *, act, d, group, n, cfg):
    tk = cfg.tk
    row0 = lax.axis_index("m") * BM
    rows = pl.ds(row0, BM)
    # every scale of this block's rows at once ([2, d / group, BM]): one TMA
    plgpu.copy_gmem_to_smem(s_gmem.at[:, :, rows], s_smem, bar)
    plgpu.barrier_wait(bar)
    zero = plgpu.layout_cast(jnp.zeros((BM, n), jnp.float32), plgpu.Layout.WGMMA)

    def codes(ref):
        """int4 tile -> bf16 wgmma operand (exact: |code - 8| <= 7)."""
        a = plgpu.load(ref, (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
        if cfg.relabel:
            return _relabel(a.astype(jnp.bfloat16))
        return plgpu.layout_cast(a, plgpu.Layout.WGMMA).astype(jnp.bfloat16)

    ns = cfg.nsub
    tiled = w_gmem.ndim == 4

    def step(idx, *refs):
        (k,) = idx
        carry = refs[-1]
        if tiled:       # one [2, ns, BM, tk] codes tile and one [ns, n, tk] x tile
            wts = [refs[0].at[mat, j] for mat in range(2) for j in range(ns)]
            xts = [refs[1].at[j] for j in range(ns)]
        else:           # ns gate tiles, ns up tiles, ns x tiles
            wts, xts = refs[:2 * ns], refs[2 * ns:3 * ns]
        if cfg.dry:
            return carry
        xbs = [plgpu.transpose_ref(xs, (1, 0)) for xs in xts]   # [n, tk] as [tk, n]

        def mma(*accs):
            for j, (acc, w) in enumerate(zip(accs, wts)):   # convert j+1 while j runs
                plgpu.wgmma(acc, codes(w), xbs[j % ns])
            return tuple(acc[...] for acc in accs)          # one wait for all

        parts = pl.run_scoped(mma, *[plgpu.ACC((BM, n), jnp.float32)] * (2 * ns))
        out = list(carry)
        for j in range(ns):
            gi = (k * ns + j) * tk // group                 # a tile lies in one group
            for mat in range(2):
                sc = plgpu.load(s_smem.at[mat, gi], (), layout=plgpu.Layout.WGMMA.reduce(1),
                                optimized=False).astype(jnp.float32)
                out[mat] = out[mat] + parts[mat * ns + j] * lax.broadcast_in_dim(
                    sc, (BM, n), (0,))
        return tuple(out)

    if tiled:
        # a step's codes are 2 * ns contiguous 4 KB blocks: one TMA; x likewise
        in_specs = [plgpu.BlockSpec((2, ns, BM, tk), lambda k: (0, k, 0, 0),
                                    transforms=_transforms(tk, 4)),
                    plgpu.BlockSpec((ns, n, tk), lambda k: (k, 0, 0),
                                    transforms=_transforms(tk, 16))]
        gmem = (w_gmem.at[:, :, rows], x_gmem)
    else:
        def specs(shape, bits):
            return [plgpu.BlockSpec(shape, lambda k, j=j: (0, k * ns + j),
                                    transforms=_transforms(tk, bits)) for j in range(ns)]
        in_specs = specs((BM, tk), 4) * 2 + specs((n, tk), 16)
        gmem = (*[w_gmem.at[0, rows]] * ns, *[w_gmem.at[1, rows]] * ns, *[x_gmem] * ns)
    g, u = plgpu.emit_pipeline(step, grid=(d // (tk * ns),), in_specs=in_specs,
                               max_concurrent_steps=cfg.stages,
                               init_carry=(zero, zero))(*gmem)
    o_gmem[rows, :] = jnp.abs(_act(act, g) * u)


@functools.partial(jax.jit, static_argnames=("act", "config"))
def _scores_prepared(w, scale_t, x, *, act, config):
    cfg = config
    t, d = x.shape
    m = w.shape[2] if w.ndim == 4 else w.shape[1]
    group = d // scale_t.shape[1]
    tk = w.shape[3] if w.ndim == 4 else min(cfg.tk, group)
    if d % (tk * cfg.nsub):
        cfg = dataclasses.replace(cfg, nsub=1)     # small widths: one tile per step
    if group % tk or tk % 64 or d % (tk * cfg.nsub):
        raise NotImplementedError(f"d={d}, scale group {group} with {cfg.nsub} tiles of "
                                  f"{cfg.tk} inputs")
    cfg = dataclasses.replace(cfg, tk=tk)
    n = max(8, -(-t // 8) * 8)                                  # wgmma N: multiple of 8
    xp = jnp.zeros((n, d), jnp.bfloat16).at[:t].set(x.astype(jnp.bfloat16))
    if not cfg.relabel:
        xp = _perm(xp)            # W is stored permuted; a logical load keeps that order
    if w.ndim == 4:
        xp = jnp.swapaxes(xp.reshape(n, d // tk, tk), 0, 1)       # [d / tk, n, tk]
    nb = -(-m // BM)
    kern = functools.partial(_kernel, act=act, d=d, group=group, n=n, cfg=cfg)
    out = plgpu.kernel(
        kern, out_type=jax.ShapeDtypeStruct((nb * BM, n), jnp.float32),
        grid=(nb,), grid_names=("m",),
        scratch_types=[plgpu.SMEM((2, d // group, BM), jnp.bfloat16),
                       plgpu.Barrier(num_arrivals=1)],
    )(w, xp, scale_t)
    return out[:m, :t].T


def proxy_scores_mgpu(proxy, x, *, act: str = "silu", config: MgpuConfig | None = None,
                      tiled: bool = True):
    """|s_hat| float32 [..., m] for x [..., d] (bf16) and one layer's proxy: the canonical
    {"packed", "scale"} (re-laid out on every call: for checks) or ``prepare``'s copy."""
    cfg = config or MgpuConfig()
    d = x.shape[-1]
    if "packed" in proxy:
        proxy = prepare(proxy, d, tiled=tiled)
    w, s = proxy["w"], proxy["scale"]
    lead = x.shape[:-1]
    out = _scores_prepared(w, s, x.reshape(-1, d), act=act, config=cfg)
    return out.reshape(lead + (out.shape[-1],))
