"""Real weights: our float32 model vs transformers' load of the same GGUF (float32, eager).

SmolLM2-135M (Llama family, SwiGLU, no BOS) and Gemma-3-270M (GeGLU, BOS, q/k norms,
sandwich norms, 5:1 sliding-window layers with window 512, two RoPE bases). Logits must
agree to 1e-3 relative error on real prompts, one of them longer than Gemma's window, and
greedy decoding through prefill + decode_step (the KV-cache path generation uses) must pick
the same 20 tokens as transformers' own greedy loop.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conversion.checkpoint import load_model
from countdown_jax import model as M
from countdown_jax.data import boolq_passages
from tests.support import real_models as rm

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Water boils at a lower temperature on a mountain because",
]
N_NEW = 20
RTOL = 1e-3

_forward = jax.jit(M.forward, static_argnames=("cfg", "spec"))
_prefill = jax.jit(M.prefill, static_argnames=("cfg", "spec"))
_decode = jax.jit(M.decode_step, static_argnames=("cfg", "spec"))


@functools.lru_cache(maxsize=None)
def _ours(name):
    params, cfg, _ = load_model(rm.converted_dir(name))
    return params, cfg


def _encode(name, text):
    return rm.tokenizer(name).encode(text, add_special_tokens=True)


def _long_text(name, min_tokens=640):
    """Real prose longer than Gemma's 512-token sliding window."""
    text = ""
    for p in boolq_passages():
        text += p + "\n\n"
        if len(_encode(name, text)) >= min_tokens:
            return text
    raise AssertionError("not enough BoolQ text")


def _rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def _padded(rows):
    """Right-padded int32 batch + lengths (one compile serves every prompt)."""
    T = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return jnp.asarray(tokens), jnp.asarray([len(r) for r in rows], jnp.int32)


def _our_greedy(params, cfg, rows, n_new):
    """Batched greedy decoding: prefill the padded prompts, then decode_step per token."""
    tokens, lengths = _padded(rows)
    cache = M.init_cache(cfg, len(rows), tokens.shape[1] + n_new, jnp.float32)
    logits, cache, _ = _prefill(params, cfg, tokens, lengths, cache,
                                logits_at=(lengths - 1)[:, None])
    out = [jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)]
    for step in range(n_new - 1):
        logits, cache, _ = _decode(params, cfg, out[-1], lengths + step, cache)
        out.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return np.stack([np.asarray(o) for o in out], axis=1).tolist()


def _hf_greedy(hf, ids, n_new):
    """transformers' greedy loop with its KV cache (argmax of the last position)."""
    # The cache argument was renamed past_key_values -> cache during transformers 5.x.
    kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    out, past, x = [], None, torch.tensor([list(ids)])
    with torch.no_grad():
        for _ in range(n_new):
            o = hf(input_ids=x, use_cache=True, **({kw: past} if past is not None else {}))
            past = getattr(o, "cache", None)
            if past is None:
                past = o.past_key_values
            out.append(int(o.logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
    return out


@pytest.mark.parametrize("name", [rm.SMOLLM2, rm.GEMMA3])
def test_bos_convention(name):
    _, cfg = _ours(name)
    ids = _encode(name, "The capital of France is")
    if name == rm.GEMMA3:
        assert ids[0] == cfg.bos_token_id == 2
    else:
        assert cfg.bos_token_id not in ids


@pytest.mark.parametrize("name", [rm.SMOLLM2, rm.GEMMA3])
def test_logits_match_transformers(name, request):
    hf = request.getfixturevalue(f"{name}_hf")
    params, cfg = _ours(name)
    # The short prompts as one right-padded batch, the long text on its own.
    for batch in ([_encode(name, t) for t in PROMPTS], [_encode(name, _long_text(name))]):
        tokens, lengths = _padded(batch)
        ours, _ = _forward(params, cfg, tokens, lengths)
        for i, ids in enumerate(batch):
            got = np.asarray(ours[i, :len(ids)])
            ref = _hf_logits(hf, ids)
            assert got.shape == ref.shape == (len(ids), cfg.vocab_size)
            err = _rel_err(got, ref)
            assert err <= RTOL, f"{name} {len(ids)} tokens: relative error {err:.2e}"
            # Not a vacuous match: the model is confident about some next tokens.
            assert np.max(ref) - np.median(ref) > 5


@pytest.mark.parametrize("name", [rm.SMOLLM2, rm.GEMMA3])
def test_greedy_tokens_match_transformers(name, request):
    hf = request.getfixturevalue(f"{name}_hf")
    params, cfg = _ours(name)
    tok = rm.tokenizer(name)
    rows = [_encode(name, t) for t in PROMPTS]
    ours = _our_greedy(params, cfg, rows, N_NEW)
    for text, ids, got in zip(PROMPTS, rows, ours):
        ref = _hf_greedy(hf, ids, N_NEW)
        assert got == ref, (f"{name} {text!r}:\n ours {tok.decode(got)!r}\n "
                            f"hf   {tok.decode(ref)!r}")
        if name == rm.SMOLLM2 and text == "The capital of France is":
            assert tok.decode(got).startswith(" Paris.")
        if name == rm.GEMMA3 and text == "The capital of France is":
            assert "France" in tok.decode(got)
