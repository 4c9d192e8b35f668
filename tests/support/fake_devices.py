"""Run a test module as a worker process on N fake CPU devices (XLA's host platform
device count is fixed at start-up, so multi-device checks need their own process) and
read back the JSON it prints on a ``RESULT `` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def worker_main(worker, devices: int = 4):
    """A worker module's ``__main__``: N fake CPU devices unless XLA_FLAGS already asks for
    a count (``run_worker`` does), the repository on the path, then ``worker()``."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    sys.path.insert(0, str(ROOT))
    worker()


def run_worker(path, devices: int = 4, timeout: int = 900) -> dict:
    env = dict(os.environ)
    # LLVM -O0 roughly halves the compile time that dominates these workers (reference and
    # sharded runs compile alike, so comparisons are unaffected).
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={devices}"
                        " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(path)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"fake-device worker failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])
