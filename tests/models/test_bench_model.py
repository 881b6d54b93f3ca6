"""`dit bench model` through the real CLI, at a tiny size."""
from __future__ import annotations

import re

from launch.cli import main


def test_bench_model_prints_ratio_and_checks_xl2(capsys):
    code = main(
        "bench model --width 64 --depth 2 --heads 2 --latent 8 --text-len 8 --text-dim 32 "
        "--batch 1 --warmup 1 --reps 2 --presets DiT-S/2 DiT-XL/2".split()
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"^dit/pixart step time = \d+\.\d{3}$", out, re.M), out
    assert "DiT-XL/2 vs published" in out and "-> OK" in out
