"""`countdown-jax convert SRC OUT`: HF checkpoint directory or GGUF file -> model directory.

Both sources become (HF config dict, {HF name: array}); ModelConfig.from_hf checks the
config, conversion.names maps the tensors into our layout, checkpoint.save_model writes it.
"""

from __future__ import annotations

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


def convert(src, out_dir, dtype: str = "bfloat16", *, tokenizer: bool = True,
            overwrite: bool = False, progress: bool = True) -> Path:
    """Convert SRC (HF dir or .gguf) into a model directory at out_dir; returns out_dir."""
    from conversion.checkpoint import save_model
    from conversion.names import hf_to_params
    from countdown_jax.config import ModelConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    src, out_dir = Path(src), Path(out_dir)
    kind = source_kind(src)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (use --force to replace it)")
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
        cfg = ModelConfig.from_hf(hf_config)  # refuses what the model does not implement

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
        save_model(out_dir, params, hf_config, tok_dir, overwrite=overwrite)
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
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="storage dtype of the converted params (default bfloat16)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="do not copy / extract the tokenizer")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_run)
