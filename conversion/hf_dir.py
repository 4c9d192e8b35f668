"""Read a Hugging Face checkpoint directory: config.json + safetensors (single or sharded)
or PyTorch ``pytorch_model*.bin`` (loaded with ``weights_only=True`` only).

Returns the config dict and name -> numpy array (bf16 via ml_dtypes). Every failure names
the file: missing config.json, no weights, a truncated/corrupt file, an index that points
at missing shards, a tensor stored twice, a pickle that is not plain weights.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads it)
import numpy as np
from tqdm.auto import tqdm


class CheckpointError(ValueError):
    """The checkpoint directory is incomplete or unreadable."""


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from e


def _read_index(index_path: str) -> dict[str, str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid index (needs 'weight_map'): {e}") from e
    folder = os.path.dirname(index_path)
    missing = sorted({s for s in weight_map.values()
                      if not os.path.isfile(os.path.join(folder, s))})
    if missing:
        raise CheckpointError(f"{index_path} references missing shard files: {missing}")
    return weight_map


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(file)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _read_torch_bin(file: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{file}: reading PyTorch .bin checkpoints needs torch "
                              "(pip install torch), or convert the checkpoint to safetensors"
                              ) from e
    try:
        # weights_only: the unpickler accepts tensors and plain containers, never callables.
        sd = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError for disallowed globals, RuntimeError for bad zips
        raise CheckpointError(f"{file}: refused or unreadable PyTorch checkpoint "
                              f"(only plain weights are loaded, weights_only=True): {e}") from e
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{file}: expected a state dict, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{file}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = _torch_to_numpy(v)
    return out


def _weight_files(path: str) -> tuple[list[str], dict[str, str] | None, str]:
    """(files, weight_map or None, kind) for the checkpoint's weights."""
    for kind, index_name, single, pattern in (
            ("safetensors", "model.safetensors.index.json", "model.safetensors", "*.safetensors"),
            ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin")):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            weight_map = _read_index(index)
            return sorted({os.path.join(path, s) for s in weight_map.values()}), weight_map, kind
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)], None, kind
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if files:
            return files, None, kind
    raise CheckpointError(f"{path}: no weight files (looked for model.safetensors[.index.json], "
                          "*.safetensors, pytorch_model*.bin)")


def read_hf_checkpoint(path: str, *, progress: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, {tensor name: numpy array}) of a HF checkpoint directory."""
    hf_config = read_hf_config(path)
    files, weight_map, kind = _weight_files(path)
    reader = _read_safetensors if kind == "safetensors" else _read_torch_bin
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for file in tqdm(files, desc="reading weights", unit="file", disable=not progress,
                     leave=False):
        for name, arr in reader(file).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is stored twice: in "
                                      f"{os.path.basename(origin[name])} and "
                                      f"{os.path.basename(file)}")
            tensors[name] = arr
            origin[name] = file
    if weight_map is not None:
        absent = sorted(n for n in weight_map if n not in tensors)
        if absent:
            raise CheckpointError(f"tensors listed in the index but absent from their shards: "
                                  f"{absent[:20]}")
        misplaced = sorted(n for n, s in weight_map.items()
                           if os.path.basename(origin[n]) != os.path.basename(s))
        if misplaced:
            raise CheckpointError(f"tensors found in a different shard than the index says: "
                                  f"{misplaced[:20]}")
    return hf_config, tensors
