"""The command line as a new user meets it (issue #14): help with defaults, bad input
refused before any model is loaded (exit 2, one line), interrupts (exit 130), and on the
real SmolLM2: prompt files / stdin, --chat, --stream, eval --format json, few-shot and
lm-eval task names."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from countdown_jax import api, cli
from countdown_jax.evaluate import items as items_mod

ROOT = Path(__file__).resolve().parents[1]


def _subparsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices


def test_every_option_shows_its_default():
    for name, p in _subparsers().items():
        text = " ".join(p.format_help().split())
        for a in p._actions:
            if not a.option_strings or a.default in (None, False) or a.default is \
                    __import__("argparse").SUPPRESS:
                continue
            default = " ".join(str(a.default).split())
            assert f"(default: {default})" in text, f"{name} {a.option_strings[0]}"


def test_modes_explained_in_help():
    """eval's ideal|practical vs generate's ideal|topk|threshold|predictor: each help says
    how they map."""
    subs = _subparsers()
    ev = " ".join(subs["eval"].format_help().split())
    assert "generate's threshold" in ev and "generate's predictor" in ev
    gen = " ".join(subs["generate"].format_help().split())
    assert "saved by `calibrate`" in gen and "saved by `train-predictor`" in gen


@pytest.fixture
def fake_model_dir(tmp_path, monkeypatch):
    """Enough of a model directory for the checks that run before loading; loading it
    fails the test (validation must come first)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was validated")
    monkeypatch.setattr(api, "load", no_load)
    return d


def err_of(capsys, *argv):
    rc = cli.main([*map(str, argv)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize("argv, message", [
    (["generate", "{d}", "--prompt", "x", "--method", "cats"], "needs a sparsity"),
    (["generate", "{d}", "--prompt", "x", "--method", "cats", "--sparsity", "1.2"],
     "sparsity must be in [0, 1)"),
    (["generate", "{d}", "--prompt", "x", "--method", "cats", "--mode", "threshold",
      "--sparsity", "0.704"], "0.01 grid"),
    (["generate", "{d}", "--prompt", "x", "--method", "cats", "--mode", "threshold",
      "--sparsity", "0.7"], "no calibrated thresholds"),
    (["generate", "{d}", "--prompt", "x", "--sparsity", "0.5"], "no effect with --method dense"),
    (["generate", "{d}", "--prompt-file", "{d}/absent.txt"], "prompt file not found"),
    (["generate", "{d}", "--prompt", "x", "--stream", "--json"], "--stream"),
    (["eval", "{d}", "--out", "/missing/dir/x.csv"], "does not exist"),
    (["eval", "{d}", "--sparsity", "0.5", "1.5"], "sparsity must be in [0, 1)"),
    (["eval", "{d}", "--method", "cats", "--mode", "practical", "--sparsity", "0.7"],
     "no calibrated thresholds"),
    (["eval", "{d}", "--method", "s_countdown", "--mode", "practical"], "no practical mode"),
    (["eval", "{d}", "--tasks", "arc_easy", "boolq", "--num-fewshot", "5"], "zero-shot only"),
    (["calibrate", "{d}", "--method", "cats", "--sparsity", "0.704"], "0.01 grid"),
    (["calibrate", "{d}", "--method", "cats", "--proxy-bits", "4", "--sparsity", "0.7"],
     "--proxy-bits calibrates D-COUNTDOWN's proxy mode"),
    (["eval", "{d}", "--method", "m_countdown", "--mode", "proxy", "--sparsity", "0.7"],
     "--mode proxy is D-COUNTDOWN's low-bit proxy"),
    (["eval", "{d}", "--method", "d_countdown", "--mode", "proxy", "--sparsity", "0.7"],
     "needs thresholds calibrated on its proxy"),
    (["generate", "{d}", "--prompt", "x", "--method", "d_countdown", "--mode", "proxy",
      "--sparsity", "0.7"], "--proxy-bits 4"),
    (["generate", "{d}/absent", "--prompt", "x"], "model directory not found"),
])
def test_bad_input_refused_before_loading(fake_model_dir, capsys, argv, message):
    rc, err = err_of(capsys, *[a.format(d=fake_model_dir) for a in argv])
    assert rc == 2 and message in err and err.count("\n") == 1


def test_argparse_errors_exit_2(fake_model_dir, capsys):
    for argv in (["eval", str(fake_model_dir), "--n", "0"],
                 ["generate", str(fake_model_dir), "--prompt", "x", "--max-new-tokens", "0"],
                 ["generate", str(fake_model_dir)],                    # no prompt
                 ["eval", str(fake_model_dir), "--num-fewshot", "3"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


def test_interrupt_exits_130(fake_model_dir, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(api, "load", interrupted)
    rc, err = err_of(capsys, "generate", fake_model_dir, "--prompt", "x")
    assert rc == 130 and "interrupted" in err


def test_task_names_and_fewshot_resolution():
    assert items_mod.canonical_tasks(["lambada_openai", "arc_easy", "lambada"]) == \
        ["lambada", "arc_easy"]
    for t in ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "openbookqa",
              "boolq", "lambada_openai"):
        assert t in items_mod.task_names()
    assert items_mod.canonical_tasks(["arc_challenge"], 5) == ["arc_challenge"]
    with pytest.raises(ValueError, match="unknown task"):
        items_mod.canonical_tasks(["mmlu"])


def test_eval_json_report_shape():
    from countdown_jax.evaluate.command import json_report

    rows = [dict(model="m", method="dense", mode="dense", setting="dense", sparsity_target=0.0,
                 sparsity_realised=0.0, task="arc_easy", n_examples=2, metric="acc",
                 score=0.5, stderr=0.1, dense_score=0.5, diff_stderr=0.0),
            dict(model="m", method="cats", mode="ideal", setting="cats/ideal",
                 sparsity_target=0.7, sparsity_realised=0.69, task="arc_easy", n_examples=2,
                 metric="acc", score=0.25, stderr=0.1, dense_score=0.5, diff_stderr=0.1)]
    rep = json_report(rows, {"tasks": ["arc_easy"]})
    assert rep["results"]["dense"]["arc_easy"]["acc,none"] == 0.5
    assert rep["results"]["cats/ideal/r0.70"]["arc_easy"]["acc_stderr,none"] == 0.1
    assert rep["results"]["cats/ideal/r0.70"]["arc_easy"]["sparsity_realised"] == 0.69
    json.dumps(rep)


# ---------------------------------------------------------------------------- real model

@pytest.mark.slow
def test_fewshot_items_use_the_5shot_requests(smollm2_dir):
    from countdown_jax import data

    tok = api.load_tokenizer(smollm2_dir)
    zero, gold0 = items_mod.build_items(tok, ["arc_easy"], 3)
    five, gold5 = items_mod.build_items(tok, ["arc_easy"], 3, num_fewshot=5)
    assert gold0 == gold5 and [(i.doc, i.choice) for i in zero] == [(i.doc, i.choice) for i in five]
    assert all(len(f.context) > len(z.context) for z, f in zip(zero, five))
    shots = data.mc_docs("arc_easy", "rc_5shot")
    assert shots[0].contexts[0].count("Question:") == 6


@pytest.mark.slow
def test_prompt_file_stdin_chat_json(smollm2_dir, capsys, monkeypatch, tmp_path):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("The capital of France is\n\nWater boils at\n"))
    assert cli.main(["generate", str(smollm2_dir), "--prompt-file", "-", "--json",
                     "--max-new-tokens", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["The capital of France is", "Water boils at"]
    assert lines[0]["text"].startswith(" Paris")
    assert lines[0]["tokens_per_s"] > 0 and lines[0]["prefill_tokens_per_s"] > 0

    f = tmp_path / "prompts.txt"
    f.write_text("What is the capital of France?\n")
    assert cli.main(["generate", str(smollm2_dir), "--prompt-file", str(f), "--chat",
                     "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "<|im_start|>" not in out


@pytest.mark.slow
def test_stream_prints_the_same_text(smollm2_dir, capsys):
    base = ["generate", str(smollm2_dir), "--prompt", "The capital of France is",
            "--max-new-tokens", "10"]
    assert cli.main(base + ["--json"]) == 0
    want = json.loads(capsys.readouterr().out)["text"]
    assert cli.main(base + ["--stream", "--stream-every", "3"]) == 0
    out = capsys.readouterr().out
    assert out == "The capital of France is" + want + "\n"


@pytest.mark.slow
def test_eval_json_fewshot_alias(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["eval", str(smollm2_dir), "--tasks", "arc_easy", "--num-fewshot", "5",
                     "--n", "2", "--sparsity", "0.5", "--format", "json", "--out",
                     str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["config"]["num_fewshot"] == 5
    assert set(rep["results"]) == {"dense", "m_countdown/ideal/r0.50"}
    assert 0.0 <= rep["results"]["dense"]["arc_easy"]["acc,none"] <= 1.0


def _console_script(args, prelude: str = ""):
    """The `countdown-jax` console script in a child process (argv from sys.argv); SIGINT
    handled even when this test runs in a background job, where it starts ignored."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"{prelude}from countdown_jax.__main__ import main\nsys.exit(main())\n")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _wait_for(proc, stream, text: bytes, timeout: float = 600.0) -> bytes:
    """Read the child's pipe until ``text`` appears (the event to act on); fails if the
    child exits first or nothing comes within ``timeout``."""
    import select

    seen, deadline = b"", time.monotonic() + timeout
    while text not in seen:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            proc.kill()
            pytest.fail(f"no {text!r} within {timeout} s; got {seen[-500:]!r}")
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            pytest.fail(f"exited ({proc.wait()}) before {text!r}; got {seen[-2000:]!r}")
        seen += chunk
    return seen


def _interrupt(proc) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return err.decode()


@pytest.mark.slow
def test_ctrl_c_exits_130_without_traceback(smollm2_dir):
    """Ctrl-C while the model compiles / decodes: the streamed prompt on stdout is printed
    after the handler is installed, so the signal is sent on that event."""
    p = _console_script(["generate", smollm2_dir, "--prompt", "Once upon a time", "--stream",
                         "--max-new-tokens", "400"])
    _wait_for(p, p.stdout, b"Once upon a time")
    err = _interrupt(p)
    assert p.returncode == 130
    assert "Traceback" not in err and re.search(r"interrupted", err)
    assert len(err.strip().splitlines()) <= 3


@pytest.mark.parametrize("module", ["jax", "countdown_jax.calibrate"])
def test_ctrl_c_during_start_up_exits_130(tmp_path, module):
    """Ctrl-C while the command line's imports run (jax: importing the CLI itself; the
    calibrate module: building the parser). An import hook announces the import on stderr
    and waits there, so the signal lands inside it."""
    prelude = ("import importlib.abc, time\n"
               "class Hold(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               f"        if name == {module!r}:\n"
               "            sys.stderr.write('importing ' + name + '\\n'); sys.stderr.flush()\n"
               "            time.sleep(300)\n"
               "sys.meta_path.insert(0, Hold())\n")
    p = _console_script(["generate", tmp_path, "--prompt", "x"], prelude)
    _wait_for(p, p.stderr, f"importing {module}".encode(), timeout=300)
    err = _interrupt(p)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert len(err.strip().splitlines()) <= 3


def test_proxy_mode_calibrate_then_generate(smollm2_dir, tmp_path, capsys):
    """The proxy rule on the user's path: `calibrate --proxy-bits` saves per-layer
    thresholds beside the model, `generate --mode proxy` reads them (the proxy itself is
    rebuilt from the weights) and decodes near the target sparsity."""
    import json

    d = tmp_path / "model"
    d.mkdir()
    for part in ("params", "tokenizer"):                 # the weights stay in the cache
        (d / part).symlink_to(smollm2_dir / part)
    (d / "config.json").write_text((smollm2_dir / "config.json").read_text())
    assert cli.main(["calibrate", str(d), "--method", "d_countdown", "--proxy-bits", "4",
                     "--sparsity", "0.7", "--rows", "4",
                     "--held-out-rows", "2", "--seq-len", "64"]) == 0
    saved = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    assert saved[0]["proxy_bits"] == 4 and saved[0]["proxy_group"] == 64   # from d = 576
    assert abs(saved[0]["realised_held_out"] - 0.7) < 0.15
    assert cli.main(["generate", str(d), "--prompt", "The capital of France is",
                     "--method", "d_countdown", "--mode", "proxy", "--sparsity", "0.7",
                     "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["mode"] == "proxy" and abs(out["realised_sparsity"] - 0.7) < 0.15
