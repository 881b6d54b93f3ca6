"""Bad configs through the real commands: `dit launch` refuses before starting a rank, and the
ranks a bare torchrun starts refuse before their process group forms; the message names the
key (or file and line), and a `!!python/object` tag never runs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.trainer.harness import ROOT, TINY, torchrun_cmd, train_env

BAD = {
    "malformed": ("optim:\n  lr: [1, 2\n", "bad.yaml:3': malformed YAML"),
    "unknown_key": ("optim:\n  lrr: 1.0e-3\n", "optim.lrr"),
    "wrong_type": ("data:\n  batch_size: four\n", "data.batch_size"),
    "python_tag": ("run:\n  name: !!python/object/apply:os.system ['touch {marker}']\n", "malformed YAML"),
}


def bad_config(tmp_path, kind: str) -> tuple[str, str]:
    marker = tmp_path / "EXECUTED"
    text, named = BAD[kind]
    path = tmp_path / "bad.yaml"
    path.write_text(text.format(marker=marker))
    return str(path), named


@pytest.mark.parametrize("kind", sorted(BAD))
def test_dit_launch_refuses_before_starting_any_rank(tmp_path, kind):
    config, named = bad_config(tmp_path, kind)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "launch", "--launcher", "torchrun",
                           "--nproc-per-node=2", config, f"run.out_dir={out}"],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert not out.exists() and not (tmp_path / "EXECUTED").exists()


@pytest.mark.slow
def test_ranks_refuse_before_the_process_group_forms(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(torchrun_cmd(2, [f"run.out_dir={out}", "optim.lrr=1e-3"], TINY), cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exitcode  : 2" in output
    assert output.count("optim.lrr") >= 2  # both ranks name the key
    assert "Initializing TorchBackend" not in output and "init_distributed" not in output
    assert not out.exists()
