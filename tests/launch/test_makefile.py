"""The Makefile's install step as each target runs it, with a fake venv whose python and dit
record the DS_ACCELERATOR they were started with."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.trainer.harness import ROOT

RECORDER = '#!/bin/sh\necho "$(basename "$0") DS_ACCELERATOR=${DS_ACCELERATOR-unset} $*" >> "$CALLS"\n'


def make(target: str, tmp_path: Path) -> list[str]:
    for name in ("Makefile", "setup.cfg", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True, exist_ok=True)
    for tool in ("python", "dit"):
        (bin_ / tool).write_text(RECORDER)
        (bin_ / tool).chmod(0o755)
    (tmp_path / ".venv" / ".installed").unlink(missing_ok=True)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "MAKEFLAGS", "MAKELEVEL")}
    subprocess.run(["make", "-s", target], cwd=tmp_path, env={**env, "CALLS": str(calls)}, check=True,
                   capture_output=True, text=True, timeout=60)
    return calls.read_text().splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_gpu_check_installs_and_runs_without_an_empty_ds_accelerator(tmp_path):
    """DeepSpeed's setup.py raises on DS_ACCELERATOR='' (`must be one of [...]`): a fresh clone's
    `make gpu-check` failed at its install."""
    calls = make("gpu-check", tmp_path)
    installs = [c for c in calls if "pip install" in c]
    assert len(installs) == 2 and all("DS_ACCELERATOR=unset" in c for c in installs), calls
    assert not any("create_op_builder" in c for c in calls)  # no CPU ops for the GPU check
    assert calls[-1] == "dit DS_ACCELERATOR=unset bench gpu", calls


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_demo_installs_on_the_cpu_accelerator_and_builds_its_ops(tmp_path):
    calls = make("demo", tmp_path)
    installs = [c for c in calls if "pip install" in c]
    assert len(installs) == 2 and all("DS_ACCELERATOR=cpu" in c for c in installs), calls
    assert any("create_op_builder" in c for c in calls)
    assert calls[-1] == "dit DS_ACCELERATOR=cpu demo configs/demo.yaml", calls
