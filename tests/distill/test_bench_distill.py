"""`dit bench distill`'s timing and table, with a fake sampler (no checkpoint needed)."""
from __future__ import annotations

import torch

from launch.bench_distill import Row, format_table, run_sampler


def test_the_warm_up_batch_is_as_large_as_the_timed_ones():
    """A warm-up on 1 prompt left the first timed batch of --batch-size to warm up its shapes."""
    sizes = []

    def sample(batch, generator):
        sizes.append(len(batch))
        return torch.zeros(len(batch), 3, 4, 4)

    pixels, seconds = run_sampler(sample, [f"p{i}" for i in range(10)], 4, seed=0)
    assert sizes == [4, 4, 4, 2] and pixels.shape[0] == 10 and seconds >= 0


def test_each_row_says_its_sampling_precision():
    rows = [Row("teacher", 50, 100, 0.2, "bf16", {"color": 1.0}), Row("adversarial", 1, 1, 0.01, "fp32", {"color": 0.5})]
    lines = format_table(rows, ["color"]).splitlines()
    assert "precision" in lines[0]
    assert lines[2].split()[4] == "bf16" and lines[3].split()[4] == "fp32", lines
