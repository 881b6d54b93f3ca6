"""`dit sample` and `dit eval adherence` on a checkpoint written by a real (single-process,
DeepSpeed ZeRO-2) `dit train` run: EMA by default, the raw DeepSpeed weights with --raw."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main as dit
from tests.trainer.harness import ROOT, TINY, shapes_shards, train_env  # noqa: F401  (session fixture)


@pytest.fixture(scope="module")
def trained(shapes_shards, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("trained")
    cmd = [sys.executable, "-m", "launch.cli", "train", str(TINY), f"data.shards={shapes_shards}",
           f"run.out_dir={out}", "stage.steps=2", "checkpoint.every=2", "log.sample_steps=2"]
    done = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "checkpoints"


@pytest.mark.slow
def test_sample_ema_and_raw_weights(trained, tmp_path):
    prompt = ["--prompt", "a large red circle at the top left", "--steps", "2"]
    assert dit(["sample", str(trained), *prompt, "--out", str(tmp_path / "ema")]) == 0
    assert dit(["sample", str(trained), *prompt, "--raw", "--out", str(tmp_path / "raw")]) == 0
    ema, raw = ((tmp_path / d / "00000.png").read_bytes() for d in ("ema", "raw"))
    assert ema != raw  # EMA decay 0.9 over 2 steps: different weights, different pixels
    assert json.loads((tmp_path / "raw" / "samples.json").read_text())["weights"] == "raw"


@pytest.mark.slow
def test_eval_adherence_on_a_trained_checkpoint(trained, tmp_path):
    assert dit(["eval", "adherence", str(trained), "--num", "8", "--num-real", "48", "--steps", "2",
                      "--out", str(tmp_path)]) == 0  # 0: the judge is reliable on the real data
    report = json.loads((tmp_path / "adherence.json").read_text())
    assert report["reliable"] and report["real"]["accuracy"]["overall"] >= 0.98
    assert set(report["generated"]["accuracy"]) >= {"color", "size", "position", "overall"}
    assert (tmp_path / "samples" / "grid.png").is_file()


@pytest.mark.slow
def test_demo_evaluation_prints_adherence(trained, tmp_path, capsys):
    from launch.eval_cmd import demo_evaluation

    report = demo_evaluation(str(trained), str(tmp_path), ["a large red circle at the top left"], steps=2, num=8)
    assert {"color", "overall"} <= set(report.accuracy)
    lo, hi = report.interval("overall")
    assert 0.0 <= lo <= report.accuracy["overall"] <= hi <= 1.0
    printed = capsys.readouterr().out
    assert "generated" in printed and "real" in printed and "95% CI" in printed
    assert (tmp_path / "samples" / "grid.png").is_file()
