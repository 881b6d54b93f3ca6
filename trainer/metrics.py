"""Training metrics: JSONL + TensorBoard on rank 0, a progress bar with ETA, throughput figures.

Throughput follows the usual accounting: a training step costs 3 forward passes (forward +
backward = 2x forward), i.e. 6 FLOPs per multiply-accumulate of the forward pass (Kaplan et
al. 2020; the DiT paper's "6 x GMACs per image"). Tokens and MACs are those of each
micro-batch's real shape (`MetricsLogger.computed`): with resolution, aspect or frame buckets a
batch may cost several times the configured square's.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from tqdm import tqdm

from trainer.config import LogConfig

NUM_T_BUCKETS = 4
T_BUCKET_KEYS = tuple(f"loss_t{b / NUM_T_BUCKETS:.2f}" for b in range(NUM_T_BUCKETS))  # loss_t0.00 ... loss_t0.75


# A metric of one micro-batch: a number, a 0-dim tensor (read only on log steps, so the step
# never waits for the device), or a (sum, count) pair for a mean over a varying count.
Metric = Union[float, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def valid_mean(loss: torch.Tensor, weight: torch.Tensor) -> Metric:
    """A micro-batch's mean over its valid samples (`loss`, e.g. `masked_mean` with `weight`
    (B,): 1 for real samples, 0 for the loader's padding repeats) as a (sum, count) pair, so
    that the logged mean is over the valid samples of every micro-batch: one made only of
    padding (its masked mean is 0) counts for nothing instead of logging a 0."""
    count = weight.detach().float().sum()
    return loss.detach().float() * count, count


def timestep_bucket_losses(per_sample: torch.Tensor, t: torch.Tensor,
                           weight: Optional[torch.Tensor] = None) -> dict[str, Metric]:
    """Loss per quarter of the time axis, where the model is weak (low or high noise), as
    (sum, count) pairs: a quarter no sample fell in is left out of the logged mean. `weight`
    (B,) is 1 for real samples and 0 for the loader's padding repeats (`batch["valid"]`),
    which then count in no quarter."""
    idx = (t.clamp(0, 1 - 1e-6) * NUM_T_BUCKETS).long()  # (B,)
    w = torch.ones_like(per_sample, dtype=torch.float32) if weight is None else weight.detach().float()  # (B,)
    sums = per_sample.new_zeros(NUM_T_BUCKETS, dtype=torch.float32).index_add_(0, idx, per_sample.float() * w)  # (4,)
    counts = per_sample.new_zeros(NUM_T_BUCKETS, dtype=torch.float32).index_add_(0, idx, w)  # (4,)
    return {key: (sums[b], counts[b]) for b, key in enumerate(T_BUCKET_KEYS)}


class StepTimer:
    """Splits wall time into waiting for data and computing (data-wait fraction).

    Only the time spent inside `waiting()` (around `next(batches)`) is data wait. Counting all
    the time since the previous mark instead (as a mark after `next` did) took compute for data
    wait: with grad_accum > 1 the previous micro-batch's forward, backward and step; since the
    engine settles a step one step late, the whole step after each log step (~1 / log.every of
    the time); and checkpoint saves, sample grids and evaluations between steps (measured on a
    tiny run whose loader was ahead: 26-29%, 86% at grad_accum 4, against 0.2-1.3%)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.data_s = 0.0
        self.total_s = 0.0
        self._clock = clock
        self._t0 = clock()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Time spent in the block is data wait (wrap the loader's `next`)."""
        start = self._clock()
        try:
            yield
        finally:
            self.data_s += self._clock() - start

    def step_done(self) -> None:
        now = self._clock()
        self.total_s += now - self._t0
        self._t0 = now

    def pop(self) -> tuple[float, float]:
        out = (self.data_s, self.total_s)
        self.data_s = self.total_s = 0.0
        return out


class KeyLog:
    """The sample keys each step consumed on one data-parallel rank, as JSON lines
    `{"step": S, "keys": [...]}` in `logs/keys/rank_R.jsonl` (padding of a short batch left out).
    A resumed run appends the steps it redoes: the last record of a step is the one that counts."""

    def __init__(self, cfg: LogConfig, dp_rank: int):
        directory = Path(cfg.dir) / "keys"
        directory.mkdir(parents=True, exist_ok=True)
        self.file = open(directory / f"rank_{dp_rank:05d}.jsonl", "a")

        self.pending: list[str] = []

    def add(self, batch: dict) -> None:
        self.pending += [k for k, valid in zip(batch["__key__"], batch["valid"].tolist()) if valid]

    def step_done(self, step: int) -> None:
        """One record per finished step (all its micro-batches); a step cut short writes none."""
        self.file.write(json.dumps({"step": step, "keys": self.pending}) + "\n")
        self.file.flush()
        self.pending = []

    def close(self) -> None:
        self.file.close()


def summed(values: list) -> list[float]:
    """Numbers or 0-dim tensors summed over every rank in float64, as floats: one collective
    (and the one read of device values) when a process group runs, on the backend's device."""
    if not (values and dist.is_initialized() and dist.get_world_size() > 1):  # nothing, or nothing to sum over
        return [float(v) for v in values]
    from trainer.distributed import comm_device

    flat = torch.stack([torch.as_tensor(v).detach().to(comm_device(), torch.float64).reshape(()) for v in values])
    dist.all_reduce(flat)
    return flat.tolist()


class LogWindow:
    """Per key, the sums and counts of the metrics added since the last log step (a record is
    their quotient, each summed over every rank first). Checkpointed: a run saved between two
    log steps and resumed logs at the next one the mean of the same steps as the uninterrupted
    run; begun empty, the resumed window averaged only the steps after the resume (0.430
    against 0.421 at log.every=3 after a save at step 4). Saved as the totals over every rank
    (`state_dict` is collective), loaded on rank 0 with zeros elsewhere under the same keys, so
    any layout resumes it and every rank reduces the same keys."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = defaultdict(float)  # floats or device tensors until a log step
        self.counts: dict[str, Any] = defaultdict(int)

    def add(self, metrics: dict[str, Metric]) -> None:
        """Accumulate one micro-batch's or step's metrics; tensors stay on their device."""
        for k, v in metrics.items():
            total, count = v if isinstance(v, tuple) else (v, 1)
            self.sums[k] = self.sums[k] + (total.detach() if isinstance(total, torch.Tensor) else total)
            self.counts[k] = self.counts[k] + count

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def state_dict(self) -> dict[str, Any]:
        keys = sorted(self.sums)
        totals = summed([self.sums[k] for k in keys] + [self.counts[k] for k in keys])
        return {"log_window": {"keys": keys}, "log_window_totals": torch.tensor(totals, dtype=torch.float64)}

    def load_state_dict(self, state) -> None:
        """Absent from checkpoints written before it: the window then begins empty."""
        self.clear()
        if "log_window" not in state:
            return
        keys, totals = state["log_window"]["keys"], state["log_window_totals"].tolist()
        first = not dist.is_initialized() or dist.get_rank() == 0
        for k, total, count in zip(keys, totals[: len(keys)], totals[len(keys):]):
            self.sums[k], self.counts[k] = (total, count) if first else (0.0, 0)


class MetricsLogger:
    """Aggregates per-step metrics (into `window`, the trainer's checkpointed one, else its
    own) and writes them every `cfg.every` steps (rank 0 only)."""

    def __init__(self, cfg: LogConfig, rank: int, total_steps: int, start_step: int, samples_per_step: int,
                 window: Optional[LogWindow] = None):
        self.cfg = cfg
        self.rank = rank
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        self.window = window if window is not None else LogWindow()
        self.work = [0, 0]  # this rank's tokens and forward MACs since the last log step (host ints)
        self.timer = StepTimer()
        self.steps_since = 0  # steps timed since the last log step or this logger's start (throughput)
        self.jsonl = None
        self.tb = None
        self.bar: Optional[tqdm] = None
        if rank == 0:
            Path(cfg.dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(cfg.dir) / "metrics.jsonl", "a")
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(cfg.dir)
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=2.0)

    def add(self, metrics: dict[str, Metric]) -> None:
        self.window.add(metrics)

    def computed(self, tokens: int, macs: int) -> None:
        """Count a micro-batch's work: its tokens and forward multiply-accumulates at its real
        shape (`Stage.work`), padding repeats included (they are computed too). Host ints, so
        counting never waits for the device. One rank of each data-parallel replica counts
        (the engine's `reads_data`): the other ranks of a pipeline or sequence group share the
        same samples, and the totals are summed over ranks."""
        self.work[0] += tokens
        self.work[1] += macs

    def reduced(self) -> tuple[dict[str, float], list[float]]:
        """The accumulated means over every rank and the work (tokens, MACs) summed over them,
        in one collective (the one read of the device's values per log step): each key's sums
        and counts are summed over the ranks before dividing, so the logged loss is the global
        batch's, not rank 0's share of it, while the work stays a total. Collective when a
        process group runs (every rank calls it on the same log steps, with the same keys: the
        stage's)."""
        window = self.window
        keys = sorted(window.sums)
        values = summed([window.sums[k] for k in keys] + [window.counts[k] for k in keys] + self.work)
        sums, counts, work = values[: len(keys)], values[len(keys): 2 * len(keys)], values[2 * len(keys):]
        out = {}
        for k, total, count in zip(keys, sums, counts):
            if float(count) > 0:
                out[k] = float(total) / float(count)
        return out, work

    def is_log_step(self, step: int) -> bool:
        """Every `every` steps, and the last step (its window's steps were never written)."""
        return step % self.cfg.every == 0 or step == self.total_steps

    def step_done(self, step: int, extra: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Close a step (a skipped one too: it took its time and its batch); on log steps
        (`is_log_step`) return (and on rank 0 write) the record averaged since the last."""
        self.timer.step_done()
        self.steps_since += 1
        if self.bar is not None:
            self.bar.update(1)
        if not self.is_log_step(step):
            return None
        data_s, total_s = self.timer.pop()
        record, (tokens, macs) = self.reduced()
        samples = self.samples_per_step * self.steps_since  # the global batch's
        record.update(extra)
        record.update(
            step=step,
            samples_per_s=samples / max(total_s, 1e-9),
            tokens_per_s=tokens / max(total_s, 1e-9),
            tflops=6 * macs / max(total_s, 1e-9) / 1e12,
            data_wait=data_s / max(total_s, 1e-9),
            time=time.time(),
        )
        self.window.clear()
        self.work = [0, 0]
        self.steps_since = 0
        if self.rank == 0:
            self._write(step, record)
        return record

    def _write(self, step: int, record: dict[str, Any]) -> None:
        assert self.jsonl is not None
        self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                 lr=f"{record.get('lr', 0):.2e}", refresh=False)

    def event(self, step: int, record: dict[str, Any]) -> None:
        """A one-off record (evaluation, sample grid path, skipped step)."""
        if self.rank == 0 and self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **record}, sort_keys=True) + "\n")
            self.jsonl.flush()
            if self.tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)):
                        self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
