"""`countdown-jax` command line: convert | generate | demo | calibrate | train-predictor | eval.

Each subcommand lives beside the code it drives and exposes ``register(subparsers)``;
this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from countdown_jax.policy import METHODS, MODES, ACCEPTED_IMPLEMENTATIONS as IMPLEMENTATIONS

# module that defines register(subparsers) for each subcommand group
COMMAND_MODULES = ("conversion.convert", "countdown_jax.calibrate", "countdown_jax.predictor",
                   "countdown_jax.evaluate")


def _generate(args):
    from countdown_jax import api

    model = api.load(args.model_dir)
    out = api.generate_text(model, args.prompt, method=args.method, mode=args.mode,
                            sparsity=args.sparsity, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, implementation=args.implementation,
                            attention=args.attention)
    if args.json:
        print(json.dumps({
            "text": out.texts[0], "token_ids": out.token_ids[0], "method": args.method,
            "mode": args.mode, "sparsity_target": args.sparsity,
            "tokens_per_s": out.tokens_per_s, "realised_sparsity": out.realised_sparsity,
            "realised_sparsity_per_layer": out.realised_sparsity_per_layer.tolist(),
        }))
    else:
        print(args.prompt + out.texts[0])
        print(f"[{args.method}/{args.mode} r={args.sparsity}] {len(out.token_ids[0])} tokens, "
              f"{out.tokens_per_s:.1f} tokens/s, realised sparsity {out.realised_sparsity:.3f}")


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text, dense or sparse")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--method", choices=METHODS, default="dense")
    p.add_argument("--mode", choices=MODES, default="ideal")
    p.add_argument("--sparsity", type=float, default=0.0)
    p.add_argument("--implementation", choices=IMPLEMENTATIONS, default="masked")
    p.add_argument("--attention", choices=("xla", "pallas"), default="xla",
                   help="decode attention: XLA, or the Pallas kernel (GPU)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_generate)


def _demo(args):
    from countdown_jax import demo

    demo.main(out_dir=args.out, prompt=args.prompt, max_new_tokens=args.max_new_tokens)


def _add_demo(sub):
    p = sub.add_parser("demo", help="convert the embedded SmolLM2-135M and generate "
                                    "dense and sparse")
    p.add_argument("--out", default=None, help="where the converted model goes")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=_demo)


def build_parser():
    parser = argparse.ArgumentParser(prog="countdown-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _add_generate(sub)
    _add_demo(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"countdown-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
