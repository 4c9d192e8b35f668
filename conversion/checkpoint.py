"""A converted model on disk: orbax-checkpoint arrays + the HF config.json + tokenizer.

    model_dir/
      config.json            the HF config dict (ModelConfig.from_hf rebuilds the config)
      params/data/           orbax checkpoint of the params pytree (layout.py)
      params/manifest.json   every leaf's path, shape and dtype: the abstract tree to
                             restore against, so no device/sharding info is needed
      tokenizer/             tokenizer files (optional)
      trees/<name>/          extra named pytrees beside the params (calibrated thresholds,
                             predictors), same data/ + manifest.json pair; save_tree/load_tree

Trees are nested dicts with string keys and array leaves. Writes go to a temporary folder
that is renamed into place, so a crash never leaves a half-written model or tree.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

import numpy as np

FORMAT = "countdown-jax-tree"
VERSION = 1
_DATA, _MANIFEST = "data", "manifest.json"


class ModelDirError(ValueError):
    """A model directory (or a tree inside it) is malformed."""


# ---------------------------------------------------------------------------- tree <-> leaves

def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
    if not prefix and not isinstance(tree, Mapping):
        raise ValueError(f"a stored tree must be a dict of arrays, got {type(tree).__name__}")
    if isinstance(tree, Mapping):
        if not tree:
            raise ValueError(f"empty dict at {'/'.join(prefix) or '<root>'}: cannot be stored")
        out = {}
        for k, v in tree.items():
            if not isinstance(k, str) or not k or "." in k or "/" in k:
                raise ValueError(f"tree key {k!r} at {'/'.join(prefix) or '<root>'}: keys must be "
                                 "non-empty strings without '.' or '/'")
            out.update(_flatten(v, prefix + (k,)))
        return out
    if tree is None or isinstance(tree, (list, tuple, str, bytes)):
        raise ValueError(f"leaf {'/'.join(prefix) or '<root>'} is a {type(tree).__name__}: trees "
                         "must be nested dicts of arrays")
    return {prefix: tree}


def _unflatten(leaves: Mapping[tuple[str, ...], Any]) -> dict:
    root: dict = {}
    for path, v in leaves.items():
        d = root
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return root


def _as_array(x):
    import jax

    return x if isinstance(x, (np.ndarray, jax.Array)) else np.asarray(x)


# ---------------------------------------------------------------------------- one stored tree

def _json_default(x):
    """meta may hold NumPy/JAX scalars and small arrays: store them as plain JSON."""
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(x, "__array__"):
        return np.asarray(x).tolist()
    raise TypeError(f"tree meta value {x!r} ({type(x).__name__}) is not JSON-serialisable")


def _write_tree(folder: Path, tree, meta: Mapping | None = None):
    """folder/data (orbax) + folder/manifest.json; folder must not exist yet."""
    import orbax.checkpoint as ocp

    leaves = {p: _as_array(v) for p, v in _flatten(tree).items()}
    tree = _unflatten(leaves)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "leaves": {"/".join(p): {"shape": list(np.shape(v)), "dtype": np.dtype(v.dtype).name}
                   for p, v in leaves.items()},
        "meta": dict(meta or {}),
    }
    text = json.dumps(manifest, indent=1, default=_json_default)  # fails before any write
    folder.mkdir(parents=True)
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(str((folder / _DATA).absolute()), tree)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()
    (folder / _MANIFEST).write_text(text)


def _read_manifest(folder: Path) -> dict:
    path = folder / _MANIFEST
    if not path.is_file():
        raise ModelDirError(f"{folder}: no {_MANIFEST} (not a tree written by countdown-jax)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("leaves"), dict):
        raise ModelDirError(f"{path}: not a countdown-jax tree manifest")
    if manifest.get("version") != VERSION:
        raise ModelDirError(f"{path}: manifest version {manifest.get('version')!r}, this code "
                            f"reads version {VERSION}")
    return manifest


def _read_tree(folder: Path, dtype=None):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    manifest = _read_manifest(folder)
    data = folder / _DATA
    if not data.is_dir():
        raise ModelDirError(f"{folder}: no {_DATA}/ checkpoint folder")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
        abstract = {tuple(k.split("/")): jax.ShapeDtypeStruct(
            tuple(v["shape"]), jnp.dtype(v["dtype"]), sharding=sharding)
            for k, v in manifest["leaves"].items()}
    except (KeyError, TypeError) as e:
        raise ModelDirError(f"{folder / _MANIFEST}: malformed leaf entry ({e})") from e
    target = _unflatten(abstract)
    ckptr = ocp.StandardCheckpointer()
    try:
        tree = ckptr.restore(str(data.absolute()), target)
    except Exception as e:  # orbax/tensorstore raise many types for damaged data
        raise ModelDirError(f"{data}: cannot restore the checkpoint ({type(e).__name__}: "
                            f"{str(e)[:500]})") from e
    finally:
        ckptr.close()
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        tree = jax.tree_util.tree_map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    return tree


def _replace_atomically(tmp: Path, final: Path):
    """Move tmp into final's place; an existing final is removed only after tmp is complete."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- model dirs

def is_model_dir(path) -> bool:
    """Whether path looks like a model directory written here: config.json beside a
    params/ tree whose manifest has our format tag."""
    path = Path(path)
    try:
        return (path / "config.json").is_file() and \
            json.loads((path / "params" / _MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _umask_mode(folder: Path):
    """mkdtemp makes 0700 folders; a model directory gets the usual 0777 & ~umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def save_model(out_dir, params, hf_config: Mapping, tokenizer_dir=None, *,
               overwrite: bool = False, keep_trees: bool = True) -> Path:
    """Write params + config.json (+ tokenizer files) as a model directory. overwrite
    replaces only a model directory (``is_model_dir``); keep_trees carries its saved
    trees (thresholds, predictors) into the new one."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to "
                                  "replace)")
        if not is_model_dir(out_dir):
            raise ValueError(f"{out_dir} is not a model directory written by countdown-jax; "
                             "refusing to replace it")
    config_text = json.dumps(dict(hf_config), indent=2, sort_keys=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _umask_mode(tmp)
        _write_tree(tmp / "params", params)
        (tmp / "config.json").write_text(config_text)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        if keep_trees and (out_dir / "trees").is_dir():
            shutil.copytree(out_dir / "trees", tmp / "trees")
        if out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        _replace_atomically(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_config(model_dir) -> dict:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: no config.json (not a model directory written by "
                            "`countdown-jax convert`)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return cfg


def load_model(model_dir, dtype=None):
    """(params, ModelConfig, hf_config dict); dtype casts floating leaves (None: as stored)."""
    from countdown_jax.config import ModelConfig

    model_dir = Path(model_dir)
    hf_config = read_config(model_dir)
    if not (model_dir / "params").is_dir():
        raise ModelDirError(f"{model_dir}: no params/ folder (not a model directory written by "
                            "`countdown-jax convert`)")
    cfg = ModelConfig.from_hf(hf_config)
    shapes = _read_manifest(model_dir / "params")["leaves"]
    want = (cfg.vocab_size, cfg.d_model)
    if tuple(shapes.get("embed", {}).get("shape", ())) != want:
        raise ModelDirError(f"{model_dir}: params/embed has shape "
                            f"{shapes.get('embed', {}).get('shape')}, config.json implies {want}")
    params = _read_tree(model_dir / "params", dtype)
    return params, cfg, hf_config


def params_dtype(model_dir) -> str:
    """dtype the embedding is stored in (the model's storage dtype)."""
    return _read_manifest(Path(model_dir) / "params")["leaves"]["embed"]["dtype"]


# ---------------------------------------------------------------------------- named trees

def _tree_folder(model_dir, name: str) -> Path:
    if not isinstance(name, str) or not name or any(
            part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"bad tree name {name!r}: use non-empty '/'-separated parts")
    # One flat folder per name (quoted), so "a" and "a/b" never nest inside each other.
    return Path(model_dir) / "trees" / urllib.parse.quote(name, safe="")


def save_tree(model_dir, name: str, tree, meta: Mapping | None = None) -> Path:
    """Store a pytree (nested dicts of arrays) under model_dir by name, replacing any old one.

    name may contain '/' (e.g. "thresholds/cats/r0.50"); meta is a JSON-able dict kept
    beside it (read with tree_meta).
    """
    model_dir = Path(model_dir)
    read_config(model_dir)  # refuse to write into something that is not a model dir
    final = _tree_folder(model_dir, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _write_tree(tmp / "t", tree, meta)
        _replace_atomically(tmp / "t", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_tree(model_dir, name: str, dtype=None):
    """The tree saved under name; FileNotFoundError if there is none."""
    folder = _tree_folder(model_dir, name)
    if not folder.is_dir():
        raise FileNotFoundError(f"no tree {name!r} in {model_dir}")
    return _read_tree(folder, dtype)


def tree_meta(model_dir, name: str) -> dict:
    folder = _tree_folder(model_dir, name)
    if not folder.is_dir():
        raise FileNotFoundError(f"no tree {name!r} in {model_dir}")
    return _read_manifest(folder)["meta"]


def list_trees(model_dir) -> list[str]:
    root = Path(model_dir) / "trees"
    if not root.is_dir():
        return []
    return sorted(urllib.parse.unquote(p.name) for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / _MANIFEST).is_file())


def delete_tree(model_dir, name: str) -> None:
    folder = _tree_folder(model_dir, name)
    if folder.is_dir():
        shutil.rmtree(folder)
