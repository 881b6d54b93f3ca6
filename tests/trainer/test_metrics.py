"""The figures of logs/metrics.jsonl: the data-wait share of step time and the means over ranks."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from trainer.config import LogConfig
from trainer.metrics import MetricsLogger, StepTimer, timestep_bucket_losses


def test_data_wait_is_only_the_time_waiting_for_data():
    """grad_accum=2, data always ready, 30 ms of compute a micro-batch: the data wait is ~0,
    not the first micro-batch's compute that a mark after `next` used to count (50%)."""
    timer = StepTimer()
    for _ in range(2):  # steps
        for _ in range(2):  # micro-batches
            with timer.waiting():
                batch = object()  # next(batches): already prefetched
            time.sleep(0.03)  # forward, backward, step of `batch`
        timer.step_done()
    data_s, total_s = timer.pop()
    assert total_s > 0.1 and data_s / total_s < 0.05, (data_s, total_s)


def test_data_wait_counts_a_slow_loader():
    timer = StepTimer()
    with timer.waiting():
        time.sleep(0.05)  # the loader is behind
    time.sleep(0.05)
    timer.step_done()
    data_s, total_s = timer.pop()
    assert 0.3 < data_s / total_s < 0.7, (data_s, total_s)


def test_means_are_over_every_rank(monkeypatch, tmp_path):
    """Two data-parallel ranks: the logged loss is the mean over both ranks' micro-batches and
    the timestep-quarter losses pool both ranks' samples, not rank 0's share alone."""
    other_rank = {"loss": (10.0, 2), "loss_t0.00": (8.0, 2), "loss_t0.25": (0.0, 0), "loss_t0.50": (0.0, 0),
                  "loss_t0.75": (6.0, 3)}

    def all_reduce(tensor, *args, **kwargs):  # SUM with rank 1's flat [sums..., counts...]
        keys = sorted(other_rank)
        tensor += torch.tensor([other_rank[k][0] for k in keys] + [other_rank[k][1] for k in keys],
                               dtype=tensor.dtype)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    logger = MetricsLogger(LogConfig(dir=str(tmp_path), every=1, tensorboard=False), rank=0, total_steps=1,
                           start_step=0, samples_per_step=8, tokens_per_sample=4, macs_per_sample=1)
    t = torch.tensor([0.1, 0.1])  # both samples of this rank in the first quarter
    for loss in (1.0, 3.0):  # rank 0's two micro-batches
        logger.add({"loss": torch.tensor(loss), **timestep_bucket_losses(torch.tensor([loss, loss]), t)})
    record = logger.step_done(1, {})
    assert record["loss"] == (1.0 + 3.0 + 10.0) / 4  # not rank 0's 2.0
    assert record["loss_t0.00"] == (1 + 1 + 3 + 3 + 8.0) / 6
    assert record["loss_t0.75"] == 2.0  # only the other rank had samples there
    assert "loss_t0.25" not in record  # no sample on any rank
    logger.close()


def test_timestep_quarters_leave_out_padding_repeats():
    """The loader fills holes with repeats marked valid=False (a batch may be all filler): they
    must not count in the per-quarter losses."""
    per_sample = torch.tensor([1.0, 5.0, 5.0, 2.0])
    t = torch.tensor([0.1, 0.1, 0.1, 0.9])
    valid = torch.tensor([True, False, False, True])
    out = timestep_bucket_losses(per_sample, t, valid.float())
    means = {k: float(s) / float(c) for k, (s, c) in out.items() if float(c) > 0}
    assert means == {"loss_t0.00": 1.0, "loss_t0.75": 2.0}
    unweighted = timestep_bucket_losses(per_sample, t)
    assert float(unweighted["loss_t0.00"][0]) / float(unweighted["loss_t0.00"][1]) == 11 / 3
