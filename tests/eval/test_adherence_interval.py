"""The 95% Wilson interval printed beside every adherence figure."""
from __future__ import annotations

import pytest

from trainer.judge import SampleScore, aggregate, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)  # textbook: 0.8 of 10 -> [0.490, 0.943]
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(256, 256)  # never empty at p = 1, upper bound stays at 1
    assert hi == 1.0 and 0.98 < lo < 1.0
    lo, hi = wilson_interval(0, 256)
    assert lo == 0.0 and 0.0 < hi < 0.02


def test_interval_narrows_with_more_captions():
    width = lambda n: (lambda lo, hi: hi - lo)(*wilson_interval(n // 2, n))  # noqa: E731
    assert width(64) > 0.2 and width(256) < 0.13  # 64 captions: about +-12 points at p = 0.5


def test_report_keeps_counts_behind_each_accuracy():
    ok = SampleScore(counts={"color": [1, 1], "shape": [1, 1]}, count_ok=True)
    bad = SampleScore(counts={"color": [1, 1], "shape": [0, 1]}, count_ok=True)
    report = aggregate([ok, bad, ok, ok])
    assert report.counts["shape"] == [3, 4] and report.counts["overall"] == [3, 4]
    assert report.accuracy["shape"] == 0.75 and report.accuracy["color"] == 1.0
    lo, hi = report.interval("shape")
    assert lo < 0.75 < hi
    assert "[" in report.format(intervals=True) and "[" not in report.format()
