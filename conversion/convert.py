"""`countdown-jax convert SRC OUT`: HF checkpoint directory or GGUF file -> model directory.

Both sources become (HF config dict, {HF name: array}); ModelConfig.from_hf checks the
config, conversion.names maps the tensors into our layout, checkpoint.save_model writes it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

DTYPES = ("bfloat16", "float32")

# Files a tokenizer may consist of in an HF checkpoint directory (copied when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def source_kind(src) -> str:
    """'hf' for a checkpoint directory, 'gguf' for a GGUF file; clear error otherwise."""
    from conversion.gguf_io import GGUF_MAGIC

    src = Path(src)
    if src.is_dir():
        return "hf"
    if src.is_file():
        with open(src, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return "gguf"
        raise ValueError(f"{src} is neither a Hugging Face checkpoint directory nor a GGUF file")
    raise FileNotFoundError(f"conversion source not found: {src}")


def _copy_hf_tokenizer(src: Path, dst: Path) -> bool:
    files = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not files:
        return False
    dst.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, dst / f.name)
    return True


# What a model directory holds (checkpoint.py); convert --force replaces only such a
# directory, and carries its saved fits (trees/: thresholds, predictors) over.
MODEL_DIR_ENTRIES = {"config.json", "params", "tokenizer", "trees"}


def check_out_dir(out_dir, overwrite: bool = False) -> None:
    """Refuse an OUT that is a file, that holds anything convert did not write, or that is a
    non-empty model directory without ``overwrite``. Cheap: runs before any weight is read."""
    from conversion.checkpoint import is_model_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} is a file, not a directory")
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"output {out_dir}: {parent} is a file, not a directory")
            break
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not is_model_dir(out_dir):
        raise ValueError(f"{out_dir} exists, is not empty and is not a model directory written "
                         "by countdown-jax convert; refusing to replace it (choose a new or "
                         "empty directory)")
    foreign = sorted(p.name for p in out_dir.iterdir()
                     if p.name not in MODEL_DIR_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise ValueError(f"{out_dir} holds files countdown-jax did not write ("
                         f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); "
                         "refusing to replace it, even with --force")
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (use --force to replace the "
                              "model; its saved thresholds / predictors are kept)")


def read_config_only(src) -> dict:
    """The source's HF config dict without reading any weight."""
    if source_kind(src) == "gguf":
        from conversion.gguf_io import read_gguf_config
        return read_gguf_config(src)
    from conversion.hf_dir import read_hf_config
    return read_hf_config(str(src))


def convert(src, out_dir, dtype: str = "float32", *, tokenizer: bool = True,
            overwrite: bool = False, progress: bool = True) -> Path:
    """Convert SRC (HF dir or .gguf) into a model directory at out_dir; returns out_dir.

    overwrite replaces a model directory convert wrote earlier (never anything else), keeping
    its saved fits (trees/: calibrated thresholds, trained predictors) when the new model has
    the same config and refusing otherwise (delete OUT/trees to convert a different model).
    """
    from conversion.checkpoint import read_config, save_model
    from conversion.names import hf_to_params
    from countdown_jax.config import ModelConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    src, out_dir = Path(src), Path(out_dir)
    kind = source_kind(src)
    check_out_dir(out_dir, overwrite)
    hf_config = read_config_only(src)
    cfg = ModelConfig.from_hf(hf_config)  # refuses what the model does not implement
    if (out_dir / "trees").is_dir() and any((out_dir / "trees").iterdir()) \
            and read_config(out_dir) != json.loads(json.dumps(hf_config)):
        raise ValueError(f"{out_dir} holds saved fits (trees/) for a different model config; "
                         f"they would not fit the new weights: delete {out_dir / 'trees'} "
                         "first to replace this model")
    steps = tqdm(total=4, desc="convert", unit="step", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="countdown-convert-") as tmp:
        steps.set_postfix_str(f"reading {src.name}")
        if kind == "gguf":
            from conversion.gguf_io import read_gguf
            hf_config, tensors = read_gguf(src, progress=progress)
        else:
            from conversion.hf_dir import read_hf_checkpoint
            hf_config, tensors = read_hf_checkpoint(str(src), progress=progress)
        steps.update()

        steps.set_postfix_str("tokenizer")
        tok_dir = Path(tmp) / "tokenizer"
        if tokenizer:
            if kind == "gguf":
                from conversion.gguf_io import save_tokenizer_from_gguf
                save_tokenizer_from_gguf(src, tok_dir)
            elif not _copy_hf_tokenizer(src, tok_dir):
                tok_dir = None
        else:
            tok_dir = None
        steps.update()

        steps.set_postfix_str(f"to {dtype} params")
        params = hf_to_params(cfg, tensors, dtype, progress=progress)
        del tensors
        steps.update()

        steps.set_postfix_str(f"saving {out_dir}")
        save_model(out_dir, params, hf_config, tok_dir, overwrite=overwrite, keep_trees=True)
        steps.update()
    steps.close()
    return out_dir


def _run(args) -> int:
    try:
        out = convert(args.src, args.out, dtype=args.dtype, tokenizer=not args.no_tokenizer,
                      overwrite=args.force)
    except FileExistsError as e:  # the CLI reports ValueErrors as one-line errors
        raise ValueError(str(e)) from e
    print(f"wrote {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face checkpoint directory or a GGUF file",
        description="Convert SRC (a Hugging Face checkpoint directory: config.json + "
                    "safetensors or pytorch_model.bin; or a .gguf file, dequantized) into a "
                    "countdown-jax model directory OUT.")
    p.add_argument("src", metavar="SRC", help="HF checkpoint directory or .gguf file")
    p.add_argument("out", metavar="OUT", help="output model directory")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="storage dtype of the converted params (float32: what the library "
                        "examples and the demo use)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="do not copy / extract the tokenizer")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it is a model directory convert wrote (its saved "
                        "thresholds / predictors are kept); anything else is never replaced")
    p.set_defaults(func=_run)
