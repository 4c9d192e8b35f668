"""Greedy agreement with dense on the real SmolLM2-135M: every oracle (ideal) rule at
r in {0.5, 0.7, 0.9}, tokens matched before the first divergence, over BoolQ-passage
prompts (dense prefill, every generated token sparse). One compile per method; the
sparsity levels run as one vmap.

    python experiments/agreement_smollm2.py [--prompts 16] [--tokens 24]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
from pathlib import Path

from countdown_jax import api
from countdown_jax import evaluate as E

spec = importlib.util.spec_from_file_location(
    "reproduce_quality", Path(__file__).with_name("reproduce_quality.py"))
rq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rq)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args(argv)
    from conversion.registry_models import SMOLLM2, converted

    model = api.load(converted(SMOLLM2, "float32"))
    rs = (0.5, 0.7, 0.9)
    settings = [E.dense_setting()] + [E.ideal_setting(model.cfg.num_layers, m, rs)
                                      for m in ("cats", "m_countdown", "d_countdown",
                                                "dejavu", "s_countdown")]
    prompts, lengths = rq.agreement_prompts(model.tokenizer, args.prompts)
    res = E.agreement(model.params, model.cfg, prompts, lengths, settings,
                      max_new_tokens=args.tokens)
    rows = E.agreement_rows(res, settings, model="smollm2-135m", max_new_tokens=args.tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "agreement_smollm2.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"Greedy agreement with dense, SmolLM2-135M (float32, CPU), {len(prompts)} BoolQ-"
             f"passage prompts of {prompts.shape[1]} tokens, {args.tokens} generated tokens: "
             "fraction of tokens matched before the first divergence (± standard error).", "",
             "| method (ideal) | r | realised | agreement |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['sparsity_target']} | {r['sparsity_realised']:.3f} | "
                     f"{r['score']:.3f} ± {r['stderr']:.3f} |")
    (out / "agreement_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
