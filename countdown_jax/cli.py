"""`countdown-jax` command line: convert | generate | demo | calibrate | train-predictor | eval |
lm-eval.

Each subcommand lives beside the code it drives and exposes ``register(subparsers)``;
this file lists them, checks what can be checked before any model is loaded, and turns
errors into one line (exit 2) and Ctrl-C into exit 130.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from countdown_jax.argtypes import positive_int
from countdown_jax.decode_path import (ATTENTIONS, AUTO, IMPLEMENTATIONS, LAYER_FORMS,
                                       PROJECTIONS)
from countdown_jax.policy import METHODS, MODES

# module that defines register(subparsers) for each subcommand group
COMMAND_MODULES = ("conversion.convert", "countdown_jax.calibrate_command",
                   "countdown_jax.predictor", "countdown_jax.evaluate",
                   "countdown_jax.evaluate.harness_command")

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130


def _no_default(action) -> bool:
    return action.default is None or action.default is False \
        or action.default is argparse.SUPPRESS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option with a default shows it, also options registered without a help
    string; None / off-by-default flags show none."""

    def _format_action(self, action):
        if not action.help and action.option_strings and not _no_default(action):
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        if _no_default(action):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


# ---------------------------------------------------------------------------- generate

def _read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        text = path.read_text(encoding="utf-8")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {args.prompt_file} (one prompt per non-empty line)")
    return prompts


def _check_generate(args):
    from countdown_jax import api

    args.prompts = _read_prompts(args)
    if args.stream and (args.json or len(args.prompts) > 1):
        raise ValueError("--stream prints one prompt's text as it is produced; it does not "
                         "combine with --json or several prompts")
    if args.budget is not None:
        from countdown_jax.policy import Budget

        args.sparsity = Budget(args.budget)        # the per-layer allocation saved for it
    if args.method == "dense" and args.sparsity not in (None, 0.0):
        raise ValueError(f"--sparsity {args.sparsity} has no effect with --method dense; "
                         "pick a sparse --method")
    api.check_setup(args.model_dir, args.method, args.mode, args.sparsity)


def _generate(args):
    from countdown_jax import api
    from countdown_jax.decode_path import DecodePath
    from countdown_jax.generate import Sampling

    model = api.load(args.model_dir)

    def show(pieces):
        print(pieces[0], end="", flush=True)

    if args.stream and not args.chat:
        print(args.prompts[0], end="", flush=True)
    out = api.generate_text(model, args.prompts, method=args.method, mode=args.mode,
                            sparsity=args.sparsity, max_new_tokens=args.max_new_tokens,
                            sampling=Sampling(args.temperature, args.top_k, args.top_p),
                            seed=args.seed,
                            path=DecodePath(layers=args.layers, ffn=args.implementation,
                                            attention=args.attention,
                                            projections=args.projections), chat=args.chat,
                            stream=show if args.stream else None,
                            stream_every=args.stream_every)
    if args.json:  # one JSON object per prompt (JSON Lines)
        for i, prompt in enumerate(args.prompts):
            print(json.dumps({
                "prompt": prompt, "text": out.texts[i], "token_ids": out.token_ids[i],
                "method": args.method, "mode": args.mode, "sparsity_target": out.sparsity,
                "budget": args.budget,
                "tokens_per_s": out.tokens_per_s,
                "prefill_tokens_per_s": out.prefill_tokens_per_s, "seconds": out.seconds,
                "path": out.path.as_dict(),
                "realised_sparsity": out.realised_sparsity,
                "realised_sparsity_per_layer": out.realised_sparsity_per_layer.tolist(),
            }))
        return
    if args.stream:
        print()
    else:
        for i, prompt in enumerate(args.prompts):
            if len(args.prompts) > 1:
                print(f"--- prompt {i + 1}")
            print(out.texts[i] if args.chat else prompt + out.texts[i])
    n = sum(len(ids) for ids in out.token_ids)
    path = out.path
    kernel = f" ({path.batch_kernel})" if path.ffn == "pallas" and len(args.prompts) > 1 else ""
    amount = f"bytes {args.budget}, mean r={out.sparsity:.3f}" if args.budget else \
        f"r={out.sparsity}"
    print(f"[{args.method}/{args.mode} {amount}] {n} tokens; prefill "
          f"{out.prefill_tokens_per_s:.1f} tokens/s, decode {out.tokens_per_s:.1f} tokens/s "
          f"(compile {out.seconds['compile']:.1f} s, not counted); realised sparsity "
          f"{out.realised_sparsity:.3f}; decode path: layers {path.layers}, FFN "
          f"{path.ffn}{kernel}, attention {path.attention}, projections "
          f"{path.projections}", file=sys.stderr if args.stream else sys.stdout)


def _add_generate(sub):
    p = sub.add_parser(
        "generate", help="generate text, dense or sparse",
        description="Generate from a prompt (or a batch of prompts, one per line of a file or "
                    "stdin), dense or with a sparse FFN rule in the decode steps. --mode: "
                    "ideal / topk rank per token (oracle), threshold uses thresholds saved by "
                    "`calibrate`, predictor uses a predictor saved by `train-predictor`.")
    p.add_argument("model_dir", help="a directory written by `countdown-jax convert`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", metavar="FILE",
                     help="one prompt per non-empty line, run as one batch ('-': stdin)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn with the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="tokens generated per prompt (at most)")
    p.add_argument("--method", choices=METHODS, default="dense", help="FFN selection rule")
    p.add_argument("--mode", choices=MODES, default="ideal",
                   help="ideal/topk: per-token oracle; threshold: calibrated thresholds "
                        "(cats, m_countdown); predictor: trained predictor (d_countdown, "
                        "dejavu)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--sparsity", type=float, default=None, metavar="R",
                        help="fraction of FFN neurons skipped per decode token, in [0, 1); "
                             "a sparse --method needs it or --budget")
    amount.add_argument("--budget", type=float, default=None, metavar="B",
                        help="FFN weight bytes per decode token as a share of dense: the "
                             "per-layer allocation `calibrate --budget` saved")
    p.add_argument("--implementation", choices=(AUTO,) + IMPLEMENTATIONS, default=AUTO,
                   help="the decode FFN's implementation: auto (the fastest exact one for "
                        "the backend: on a GPU pallas where the rule skips work, else "
                        "masked); masked: float reference; xla: XLA index lists; pallas: "
                        "kernels")
    p.add_argument("--attention", choices=(AUTO,) + ATTENTIONS, default=AUTO,
                   help="decode attention: auto (pallas on a GPU), XLA, or the Pallas "
                        "kernel (GPU)")
    p.add_argument("--projections", choices=(AUTO,) + PROJECTIONS, default=AUTO,
                   help="decode q/k/v/o projections: auto (XLA until the GEMV is measured), "
                        "XLA, or the Pallas GEMV kernel (GPU)")
    p.add_argument("--layers", choices=(AUTO,) + LAYER_FORMS, default=AUTO,
                   help="layer layout for generation: auto (unstacked on a GPU: a copy of "
                        "the weights, faster decode), stacked (as stored), unstacked, "
                        "fused_qkv (unstacked, q/k/v as one weight), transposed "
                        "(unstacked, q/k/v/o one row per output)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stream", action="store_true",
                   help="print the text as it is produced (decoded in chunks of "
                        "--stream-every steps)")
    p.add_argument("--stream-every", type=positive_int, default=8, metavar="N",
                   help="decode steps per streamed chunk")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (JSON Lines)")
    p.set_defaults(func=_generate, check=_check_generate)


# ---------------------------------------------------------------------------- demo

def _demo(args):
    from countdown_jax import demo

    demo.main(out_dir=args.out, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
              sparsity=args.sparsity)


def _check_demo(args):
    from countdown_jax.api import policy_name

    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"--out {args.out} exists and is not a directory")
    if not 0.0 < args.sparsity < 1.0:
        raise ValueError(f"--sparsity must lie in (0, 1), got {args.sparsity}")
    policy_name("proxy", "d_countdown", args.sparsity)     # fits are saved on a 0.01 grid


def _add_demo(sub):
    p = sub.add_parser("demo", help="convert the embedded SmolLM2-135M, calibrate the proxy "
                                    "rule (once) and compare it with dense, the D-COUNTDOWN "
                                    "oracle and M-COUNTDOWN's thresholds")
    p.add_argument("--out", default=None,
                   help="where the converted model goes (default: the per-user cache)")
    p.add_argument("--prompt", default="The capital of France is", help="the prompt text")
    p.add_argument("--max-new-tokens", type=positive_int, default=24,
                   help="tokens generated per run")
    p.add_argument("--sparsity", type=float, default=0.7, metavar="R",
                   help="fraction of FFN neurons skipped per token by every sparse rule")
    p.set_defaults(func=_demo, check=_check_demo)


# ---------------------------------------------------------------------------- checks

def _precheck(args):
    """What every command can check before loading anything: the model directory, the
    sparsity values (saved fits live on a 0.01 grid), then the command's own checks."""
    from conversion.checkpoint import read_config
    from countdown_jax.api import policy_name

    if getattr(args, "model_dir", None) is not None:
        read_config(args.model_dir)
    if args.command in ("calibrate", "train-predictor"):
        for r in args.sparsity or ():          # calibrate --budget: none
            policy_name("thresholds", "check", r)
    check = getattr(args, "check", None)
    if check is not None:
        check(args)


def build_parser():
    parser = Parser(prog="countdown-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _add_generate(sub)
    _add_demo(sub)
    return parser


def _one_line_warnings(command):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"countdown-jax {command}: warning: {message}", file=sys.stderr)
    warnings.showwarning = show


def _exit_on_interrupt(command):
    """Run as a program, Ctrl-C ends the process at once: exit 130 and one line, also while
    a compiled program runs (Python would only see the signal when it returns, or lose it
    inside a GC callback) and without the interpreter teardown that makes the checkpoint
    library's background threads print errors. SIGINT is blocked in this thread (and the
    threads started after it) and taken by a waiting thread instead."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
            signal, "pthread_sigmask"):
        return

    def wait():
        signal.sigwait({signal.SIGINT})
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.write(2, f"\ncountdown-jax {command}: interrupted\n".encode())
        os._exit(EXIT_INTERRUPTED)

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Thread(target=wait, name="countdown-jax-interrupt", daemon=True).start()


def _persistent_compile_cache():
    """Run as a program: keep compiled programs across runs (the per-user cache folder the
    converted registry models use), unless the user set JAX's own cache setting."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    from conversion.registry_models import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv=None):
    try:       # building the parser imports every subcommand's module (jax, transformers)
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("\ncountdown-jax: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if argv is None:
        _exit_on_interrupt(args.command)
        _persistent_compile_cache()
    old_show = warnings.showwarning
    _one_line_warnings(args.command)
    try:
        _precheck(args)
        args.func(args)
    except KeyboardInterrupt:  # called as a function (argv given): report and return
        print(f"\ncountdown-jax {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as e:  # includes FileNotFoundError, NotADirectoryError
        print(f"countdown-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        warnings.showwarning = old_show
    return 0


if __name__ == "__main__":
    sys.exit(main())
