"""The EMA averages the fp32 master weights, not the module's bf16 rounding of them, on every
layout where DeepSpeed keeps the masters somewhere else (whole, sliced across ranks by ZeRO 1-2,
padded partitions at ZeRO-3, on the host under offload): 2 real ranks over gloo
(tests/trainer/ema_masters_ranks.py)."""
from __future__ import annotations

import re

import pytest

from tests.trainer.harness import ROOT, run_rank_script
from tests.trainer.ema_masters_ranks import LAYOUTS

pytestmark = pytest.mark.slow


def test_the_ema_follows_the_fp32_masters_on_every_layout():
    out = run_rank_script(ROOT / "tests" / "trainer" / "ema_masters_ranks.py")
    off = {name: float(value) for name, value in re.findall(r"^(\S+) ok (\S+)$", out, re.M)}
    assert off.keys() == LAYOUTS.keys(), out[-6000:]
    # in bf16 the module's weights are the masters rounded: an EMA of them would be off
    assert all(off[name] > 1e-4 for name in LAYOUTS if name.startswith("bf16")), off
    assert all(off[name] == 0.0 for name in LAYOUTS if name.startswith("fp32")), off
