"""`countdown-jax convert` never destroys what it did not write (issue #14): OUT a file,
foreign files, --force on a model directory keeps its saved fits, the architecture is
refused before any weight is read, folders get the umask's mode, float32 by default."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conversion import convert as convert_mod
from conversion.checkpoint import load_model, load_tree, params_dtype, save_tree
from countdown_jax import cli
from tests.support import tiny_hf


@pytest.fixture
def src(tmp_path):
    return tiny_hf.save(tiny_hf.build("llama", seed=1), tmp_path / "src")


def run(capsys, *argv):
    rc = cli.main(["convert", *map(str, argv)])
    return rc, capsys.readouterr().err


def test_out_is_a_file(tmp_path, src, capsys):
    f = tmp_path / "x.bin"
    f.write_text("mine")
    rc, err = run(capsys, src, f)
    assert rc == 2 and "is a file" in err and "Traceback" not in err
    rc, err = run(capsys, src, f / "sub", "--force")
    assert rc == 2 and "is a file" in err
    assert f.read_text() == "mine"


def test_force_keeps_fits_and_refuses_foreign_files(tmp_path, src, capsys):
    out = tmp_path / "model"
    assert cli.main(["convert", str(src), str(out)]) == 0
    assert params_dtype(out) == "float32"                  # the default, as the library uses
    save_tree(out, "thresholds/cats/r0.70", {"threshold": np.arange(2, dtype=np.float32)})
    assert cli.main(["convert", str(src), str(out), "--force"]) == 0
    np.testing.assert_array_equal(
        np.asarray(load_tree(out, "thresholds/cats/r0.70")["threshold"]), [0, 1])
    load_model(out)

    (out / "notes.txt").write_text("keep me")
    rc, err = run(capsys, src, out, "--force")
    assert rc == 2 and "notes.txt" in err
    assert (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()

    # a different model over saved fits: refused, nothing touched
    other = tiny_hf.save(tiny_hf.build("llama", seed=1, num_hidden_layers=5), tmp_path / "o")
    rc, err = run(capsys, other, out, "--force")
    assert rc == 2 and "saved fits" in err
    assert load_tree(out, "thresholds/cats/r0.70")["threshold"].shape == (2,)


def test_unsupported_architecture_refused_before_reading_weights(tmp_path, src, capsys,
                                                                  monkeypatch):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))

    def no_read(*a, **k):
        raise AssertionError("weights read before the config was checked")
    import conversion.hf_dir
    monkeypatch.setattr(conversion.hf_dir, "read_hf_checkpoint", no_read)
    rc, err = run(capsys, src, tmp_path / "out")
    assert rc == 2 and "gpt2" in err


def test_output_folders_follow_the_umask(tmp_path, src):
    old = os.umask(0o022)
    try:
        convert_mod.convert(src, tmp_path / "m", progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
