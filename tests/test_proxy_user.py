"""The proxy rule as a new user meets it on the embedded SmolLM2 (d = 576): the proxy's
default group fits the width, `calibrate_proxy` saves what `calibrate --proxy-bits` saves
and `generate_text(mode="proxy")` reads it with no other step, and `countdown-jax demo`
shows it next to dense, the oracle and M's thresholds (calibrated once, then cached)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from countdown_jax import api, calibrate, cli, demo


@pytest.mark.parametrize("d, group", [(576, 64), (640, 128), (2048, 128), (4096, 128),
                                      (96, 32), (100, 4), (7, 1)])
def test_default_group_is_the_largest_power_of_two_up_to_128_dividing_d(d, group):
    assert calibrate.default_proxy_group(d) == group


def test_default_group_bad_width():
    with pytest.raises(ValueError, match="positive int"):
        calibrate.default_proxy_group(0)


def _model_copy(smollm2_dir, tmp_path, weights: bool = True):
    """A model directory of its own (fits are saved in it); the weights stay in the cache."""
    d = tmp_path / "model"
    d.mkdir()
    for part in ("params", "tokenizer") if weights else ():
        (d / part).symlink_to(smollm2_dir / part)
    shutil.copy(smollm2_dir / "config.json", d / "config.json")
    return d


def test_explicit_group_not_dividing_d_refused_before_loading(smollm2_dir, tmp_path, capsys):
    d = _model_copy(smollm2_dir, tmp_path, weights=False)     # loading would fail
    rc = cli.main(["calibrate", str(d), "--method", "d_countdown", "--proxy-bits", "4",
                   "--proxy-group", "128", "--sparsity", "0.7"])
    err = capsys.readouterr().err
    assert rc == 2 and "proxy group 128 must divide the model width d=576" in err
    assert "default: 64" in err and err.count("\n") == 1


@pytest.mark.slow
def test_calibrate_proxy_then_generate(smollm2_dir, tmp_path):
    from conversion.checkpoint import load_tree, tree_meta

    import countdown_jax as cj

    model = cj.load(_model_copy(smollm2_dir, tmp_path))
    fit = cj.calibrate_proxy(model, 0.7, rows=4, seq_len=64, held_out_rows=2,
                             progress=False)
    name = api.policy_name("proxy", "d_countdown", 0.7)
    tree = load_tree(model.path, name)
    assert int(tree["bits"]) == 4 and int(tree["group"]) == 64          # chosen from d
    np.testing.assert_allclose(np.asarray(tree["threshold"]), fit.threshold, rtol=1e-6)
    assert tree_meta(model.path, name) == fit.meta
    assert fit.meta["proxy_group"] == 64 and fit.meta["calib_tokens"] == 4 * 64
    assert abs(fit.realised_held_out - 0.7) < 0.05 and fit.path.is_dir()
    out = cj.generate_text(model, "The capital of France is", method="d_countdown",
                           mode="proxy", sparsity=0.7, max_new_tokens=6)
    assert out.mode == "proxy" and abs(out.realised_sparsity - 0.7) < 0.1
    assert out.texts[0].startswith(" Paris")


@pytest.mark.slow
def test_demo_calibrates_once_and_compares(smollm2_dir, tmp_path, capsys):
    from conversion.checkpoint import list_trees

    d = _model_copy(smollm2_dir, tmp_path)
    rows = demo.main(out_dir=d, max_new_tokens=4)
    out = capsys.readouterr().out
    assert "calibrating d_countdown proxy" in out and "calibrating m_countdown" in out
    assert {"proxy/d_countdown/r0.70", "thresholds/m_countdown/r0.70"} <= set(list_trees(d))
    by = {r["mode"] if r["method"] != "dense" else "dense": r for r in rows}
    assert [r["method"] for r in rows] == ["dense", "d_countdown", "m_countdown",
                                           "d_countdown"]
    assert by["dense"]["realised"] == 0.0 and by["dense"]["bytes_share"] == 1.0
    assert by["ideal"]["realised"] == pytest.approx(0.7, abs=2e-3)
    for mode in ("threshold", "proxy"):
        assert abs(by[mode]["realised"] - 0.7) < 0.05, mode
    # bytes: proxy (0.177 + kept) < M's (1 + 2 kept) / 3 < the oracle's (2 + kept) / 3
    assert by["proxy"]["bytes_share"] < by["threshold"]["bytes_share"] \
        < by["ideal"]["bytes_share"] < 1.0
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1.0 for r in rows)
    assert by["ideal"]["ppl"] > by["dense"]["ppl"]          # sparsity costs some quality
    assert by["dense"]["text"].startswith(" Paris") and "D proxy 4-bit g64" in out
    again = demo.main(out_dir=d, max_new_tokens=4)             # cached: no calibration
    out = capsys.readouterr().out
    assert "calibrating" not in out and "calibration was saved" in out
    assert [r["ppl"] for r in again] == pytest.approx([r["ppl"] for r in rows], rel=1e-5)
