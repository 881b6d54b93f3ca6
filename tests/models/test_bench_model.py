"""`dit bench model` through the real CLI, at a tiny size: fp32 with the presets table, bf16
autocast on an explicit `--device cpu`, and on the GPU where there is one."""
from __future__ import annotations

import re

import pytest
import torch

from launch.cli import main

TINY = "bench model --width 64 --depth 2 --heads 2 --latent 8 --text-len 8 --text-dim 32 --batch 1 --warmup 1 --reps 2"
RATIO = re.compile(r"^dit/pixart step time = \d+\.\d{3}$", re.M)


def test_bench_model_prints_ratio_and_checks_xl2(capsys):
    code = main(f"{TINY} --presets DiT-S/2 DiT-XL/2".split())
    out = capsys.readouterr().out
    assert code == 0, out
    assert RATIO.search(out), out
    assert "DiT-XL/2 vs published" in out and "-> OK" in out


def test_bench_model_bf16_on_cpu(capsys):
    code = main(f"{TINY} --device cpu --dtype bf16 --presets".split())
    out = capsys.readouterr().out
    assert code == 0, out
    assert "bf16 autocast (fp32 weights)" in out and "CPU threads" in out and RATIO.search(out), out
    assert "presets at 256 px" not in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is false)")
def test_bench_model_bf16_on_cuda(capsys):
    code = main(f"{TINY} --device cuda --dtype bf16 --presets".split())
    out = capsys.readouterr().out
    assert code == 0, out
    assert "bf16 autocast" in out and ", cuda (" in out and RATIO.search(out), out
