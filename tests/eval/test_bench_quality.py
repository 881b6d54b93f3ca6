"""`dit bench quality`: registered under `dit bench`, finds the kept checkpoints by step and
draws the adherence curve (the training and judging themselves are the demo's, tested there)."""
from __future__ import annotations

import pytest
from PIL import Image

from launch.bench_quality import plot_curve, step_dirs
from launch.cli import main as dit


def test_registered_under_bench(capsys):
    with pytest.raises(SystemExit) as done:
        dit(["bench", "quality", "--help"])
    assert done.value.code == 0
    assert "--every" in capsys.readouterr().out


def test_step_dirs_lists_complete_checkpoints_by_step(tmp_path):
    from trainer.checkpoint import COMPLETE

    for step, complete in ((1000, True), (500, True), (1500, False)):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        if complete:
            (d / COMPLETE).write_text("{}")
    (tmp_path / "latest").write_text("step_00001000")
    assert [s for s, _ in step_dirs(tmp_path)] == [500, 1000]


def test_plot_curve_writes_a_png(tmp_path):
    rows = [{"step": s, "accuracy": {"color": a, "shape": a / 2, "overall": a / 3}} for s, a in ((500, 0.4), (1000, 0.9))]
    path = plot_curve(rows, tmp_path / "q" / "quality.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (640, 400)
