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


def test_attribute_interval_counts_samples_not_mentions():
    """Two mentions of one image are one draw: 20 two-shape samples, each with both shapes
    right or both wrong, are worth 20 trials, not 40 (the interval of 15 of 20)."""
    both_right = SampleScore(counts={"shape": [2, 2]}, count_ok=True)
    both_wrong = SampleScore(counts={"shape": [0, 2]}, count_ok=True)
    report = aggregate([both_right] * 15 + [both_wrong] * 5)
    assert report.counts["shape"] == [30, 40] and report.accuracy["shape"] == 0.75  # the figure is unchanged
    assert report.interval("shape") == pytest.approx(wilson_interval(15, 20))
    assert report.effective["shape"] == pytest.approx(20.0)
    assert report.interval("shape")[1] - report.interval("shape")[0] > 1.3 * (
        wilson_interval(30, 40)[1] - wilson_interval(30, 40)[0])  # what per-mention counting claimed


def test_attribute_interval_of_independent_mentions_is_plain_wilson():
    """One mention per sample (and the per-sample `count`/`overall` rows): exactly Wilson on
    the samples; mentions that disagree within a sample are worth no more than the mentions."""
    single = [SampleScore(counts={"color": [1, 1]}, count_ok=True)] * 7 + \
             [SampleScore(counts={"color": [0, 1]}, count_ok=False)] * 3
    report = aggregate(single)
    for key in ("color", "count", "overall"):
        assert report.interval(key) == pytest.approx(wilson_interval(7, 10)), key
    mixed = aggregate([SampleScore(counts={"color": [1, 2]}, count_ok=True)] * 10)  # no spread between samples
    assert 10 <= mixed.effective["color"] <= 20
    perfect = aggregate([SampleScore(counts={"color": [2, 2]}, count_ok=True)] * 10)  # p = 1: the samples
    assert perfect.interval("color") == pytest.approx(wilson_interval(10, 10))
