"""The loader's worker processes: batches in turn, failures surfaced, nothing left behind."""
from __future__ import annotations

import itertools
import os
import platform
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.workers import WorkerPool


@pytest.fixture
def pool_of():
    """WorkerPool(...) that is closed (its workers killed and reaped) also when a test fails."""
    made = []

    def make(*args, **kwargs) -> WorkerPool:
        made.append(WorkerPool(*args, **kwargs))
        return made[-1]

    yield make
    for pool in made:
        pool.close()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_batches_come_in_turn_and_a_finished_worker_is_passed_over(pool_of):
    pool = pool_of(lambda j: ({"j": j, "i": i} for i in range(3 - j)), num_workers=2, prefetch=1)
    assert [(b["j"], b["i"]) for b in pool] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]


class _Finalized:
    """Part of a reference cycle; says in which process it was freed."""

    def __init__(self, log: Path):
        self.log, self.me = log, self

    def __del__(self):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


def test_a_worker_never_frees_the_garbage_it_inherited(pool_of, tmp_path):
    """Garbage cycles of the parent at the fork (a stopped set of workers' ring of slots among
    them, left out of the fork) are not collected in a worker: freeing such a ring there
    unmapped, in the worker, whatever it had mapped at those addresses since (a shard it was
    reading: a segmentation fault)."""
    import gc

    log = tmp_path / "freed"
    gc.disable()  # the cycle stays uncollected in this process until the workers are forked
    try:
        _Finalized(log)
        pool = pool_of(lambda j: iter([{"collected": gc.collect()}]), num_workers=2, prefetch=1)
        assert len(list(pool)) == 2
    finally:
        gc.enable()
    gc.collect()
    assert log.read_text().split() == [str(os.getpid())]  # freed once, here


def test_an_exception_in_a_worker_is_raised_in_the_main_process_with_its_traceback(pool_of):
    def produce(j):
        yield {"j": j}
        raise DataError(f"shard broken in worker {j}")

    pool = pool_of(produce, num_workers=2, prefetch=2)
    with pytest.raises(DataError, match="shard broken in worker 0") as info:
        list(pool)
    assert any("loader worker 0" in note and "produce" in note for note in info.value.__notes__)


def test_a_killed_worker_is_reported_not_waited_for(pool_of):
    def produce(j):
        yield {"j": j}
        if j == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        yield {"j": j}

    pool = pool_of(produce, num_workers=2, prefetch=1)
    with pytest.raises(DataError, match=r"loader worker 1 \(pid \d+\) ended with exit code -9 \(SIGKILL\)"):
        list(pool)


def test_closing_stops_workers_blocked_on_their_credits(pool_of):
    pool = pool_of(lambda j: ({"i": i} for i in range(1000)), num_workers=2, prefetch=1)
    pids = [p.pid for p in pool._procs]
    assert next(iter(pool)) == {"i": 0}
    pool.close()
    assert all(_gone(pid) for pid in pids)


def test_tensors_cross_by_value_in_any_dtype(pool_of):
    """Precomputed latents (bf16 too) arrive bit for bit, also after their worker has exited."""
    made = {"latent": torch.randn(2, 4, 3, 3).to(torch.bfloat16), "mask": torch.tensor([[True, False]]),
            "emb": torch.randn(2, 5)[:, ::2]}
    pool = pool_of(lambda j: iter([dict(made)]), num_workers=1, prefetch=1)
    (got,) = list(pool)
    for name, value in made.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value)


def _faults_per_batch(j):
    """Each batch: 32 samples of 256 x 256 x 3 made, then freed together; the worker's page faults."""
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        held = [np.ones((256, 256, 3), np.uint8) for _ in range(32)]
        del held
        yield {"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages (always) fault the heap in 2 MiB at a "
                                                   "time: page faults no longer count what is reused")
def test_a_worker_reuses_the_memory_of_the_batches_it_freed(pool_of):
    """The first batch faults its 6 MiB in (48 pages a sample); later ones reuse it, where glibc's
    defaults gave it back to the kernel after every batch and faulted it in again."""
    faults = [b["faults"] for b in pool_of(_faults_per_batch, num_workers=1, prefetch=1)]
    assert faults[0] > 32 * 40, faults
    assert max(faults[2:]) < 32, faults


_STUCK = {"marker": None}  # a file: the first forked child that takes it hangs, as python/cpython#112275


def _hang_once_after_fork() -> None:
    marker = _STUCK["marker"]
    if marker is None:
        return
    try:
        os.rename(marker, f"{marker}.taken")  # atomic: exactly one child hangs
    except FileNotFoundError:
        return
    signal.pause()  # stuck before the worker's code runs, until the pool kills it


os.register_at_fork(after_in_child=_hang_once_after_fork)


def test_a_worker_stuck_after_its_fork_is_forked_again(pool_of, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("data_pipeline.workers.START_TIMEOUT_S", 2.0)  # the healthy worker says so in ms
    marker = tmp_path / "hang"
    marker.write_text("")
    _STUCK["marker"] = str(marker)
    try:
        pool = pool_of(lambda j: ({"j": j, "i": i} for i in range(2)), num_workers=2, prefetch=1)
    finally:
        _STUCK["marker"] = None
    assert (tmp_path / "hang.taken").exists()  # a worker did hang
    assert [(b["j"], b["i"]) for b in pool] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert "said nothing 2 s after its fork (attempt 1 of 3)" in caplog.text


def test_a_worker_that_never_starts_is_an_error_not_a_hang(pool_of, tmp_path, monkeypatch):
    monkeypatch.setattr("data_pipeline.workers.START_TIMEOUT_S", 0.5)
    monkeypatch.setattr("data_pipeline.workers.START_ATTEMPTS", 1)
    marker = tmp_path / "hang"
    marker.write_text("")
    _STUCK["marker"] = str(marker)
    try:
        with pytest.raises(DataError, match="loader worker 0 did not start in 1 forks"):
            pool_of(lambda j: iter([{"j": j}]), num_workers=1, prefetch=1)
    finally:
        _STUCK["marker"] = None


def _worker_1_keys(c) -> list[str]:
    """The keys of worker 1's batches (the odd ones) in an epoch of stream config `c`."""
    from data_pipeline.stream import build_stream
    from tests.data.data_helpers import take

    stream = build_stream(c, 0, 1)
    return [k for b in take(stream, stream.batches_per_epoch)[1::2] for k in b["__key__"]]


def _dies_on(monkeypatch, key: str, sig: int, phase: str = "opening") -> None:
    """A worker that begins opening sample `key` (or, with phase "pixels", decoding its pixels,
    which happens when its batch is collated) dies of `sig`, as one whose native decoder
    crashes on a damaged file (workers are forked: they inherit the patched stage)."""
    _on_sample(monkeypatch, {key}, lambda: os.kill(os.getpid(), sig), phase)


def _on_sample(monkeypatch, keys: set[str], act, phase: str = "opening") -> None:
    """A worker that begins opening one of these samples (or decoding its pixels, with phase
    "pixels") calls `act()` first."""
    from data_pipeline import stages

    if phase == "pixels":
        write = stages._write_row

        class Acting:  # the sample's pixels, whose decoder acts
            def write(self, rows):
                act()

        def acting_write(item, *args):
            if item.key in keys:
                item.pixels = Acting()
            return write(item, *args)

        monkeypatch.setattr(stages, "_write_row", acting_write)
        return
    decode = stages.decode_sample

    def acting(raw, shard, counter):
        if raw.key in keys:
            act()
        return decode(raw, shard, counter)

    monkeypatch.setattr(stages, "decode_sample", acting)


def _named(message: str) -> str:
    """The key of the sample a message names as '#INDEX of SHARD.tar'."""
    import re

    from data_pipeline.tar_reader import TarShard

    index, path = re.search(r"#(\d+) of (\S+\.tar)", message).groups()
    return TarShard(path).read(int(index)).key


FAULTS = {  # what a decoder does to its worker on a damaged file -> the skip reason, and what the warning says
    "crash": (lambda: os.kill(os.getpid(), signal.SIGSEGV), "crashed_decoder", "died of SIGSEGV"),
    "hang": (signal.pause, "stalled_decoder", "made no progress for"),  # waits for a signal: none comes
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("phase", ["opening", "pixels"])
@pytest.mark.parametrize("buckets", [[], [0.5, 1.0, 2.0]])
def test_a_worker_that_crashes_or_hangs_on_a_sample_is_forked_again_past_it(cfg, monkeypatch, caplog, buckets,
                                                                              phase, fault):
    """A decoder's segmentation fault on a damaged file kills its worker; one that hangs holds
    it alive for ever, until the worker whose batch is awaited has made no progress for
    data.stall_timeout_s and is killed. Either way that sample is skipped (counted as
    crashed_decoder or stalled_decoder) and named, the worker forked again from the batch it
    owed, and the epoch goes on with every other sample exactly once and as many batches as
    planned. The next epoch skips the sample: one crash a run, however many epochs. A crash
    decoding pixels (when a batch is collated) inside a bucket window is recovered too: the
    sample is grouped again by its header, so the window's batches stay those already handed out."""
    from data_pipeline.stream import build_stream
    from tests.data.data_helpers import dataset_keys, take, valid_keys

    act, reason, says = FAULTS[fault]
    c = cfg(num_workers=2, prefetch_factor=1, aspect_buckets=buckets, stall_timeout_s=2.0)
    target = _worker_1_keys(c)[5]  # in worker 1's second batch
    _on_sample(monkeypatch, {target}, act, phase)
    stream = build_stream(c, 0, 1)
    planned = stream.batches_per_epoch
    batches = take(stream, 2 * planned)
    others = sorted(dataset_keys(Path(c.shards)) - {target})
    for epoch in (batches[:planned], batches[planned:]):
        assert sorted(valid_keys(epoch)) == others
    assert {r: stream.stats()[r] for r in ("crashed_decoder", "stalled_decoder")} == \
        {r: 2 if r == reason else 0 for r in ("crashed_decoder", "stalled_decoder")}
    assert stream.stats()["read"] == 2 * (len(others) + 1)  # a window read again is not counted again
    (warning,) = [r.getMessage() for r in caplog.records if says in r.getMessage()]
    assert f"skipped as {reason}" in warning and _named(warning) == target


def test_a_crash_is_not_skipped_where_other_processes_read_the_same_batches(cfg, monkeypatch):
    """Pipeline stages and sequence groups read a replica's batches each from its own loader
    (skip_unreadable=False): a crash, which need not be the data's, skipped on one of them alone
    would shift its batches against the others'; the epoch ends naming the sample instead."""
    from data_pipeline.stream import build_stream
    from tests.data.data_helpers import take

    c = cfg(num_workers=2, prefetch_factor=1)
    target = _worker_1_keys(c)[5]
    _dies_on(monkeypatch, target, signal.SIGSEGV)
    stream = build_stream(c, 0, 1, skip_unreadable=False)
    with pytest.raises(DataError, match=r"loader worker 1 \(pid \d+\) ended with exit code -11 \(SIGSEGV\)") as e:
        take(stream, stream.batches_per_epoch)
    assert _named(str(e.value)) == target


@pytest.mark.parametrize("buckets", [[], [0.5, 1.0, 2.0]])
def test_a_worker_killed_at_any_moment_loses_at_most_the_sample_it_was_on(cfg, caplog, buckets):
    """SIGSEGV from outside, whenever it lands: between two batches (waiting for a credit)
    nothing is lost; on a sample, that one is skipped and named. Either way the epoch ends
    with every other sample exactly once. With buckets it lands inside the worker's bucket
    window (its samples were read and grouped for its first batch): between batches or while
    decoding pixels, where the window is grouped again as it was."""
    import multiprocessing

    from data_pipeline.stream import build_stream
    from tests.data.data_helpers import dataset_keys, valid_keys

    c = cfg(num_workers=2, prefetch_factor=1, aspect_buckets=buckets)
    stream = build_stream(c, 0, 1)
    it = iter(stream)
    try:
        batches = [next(it), next(it)]  # worker 1 has made its first batch
        (worker_1,) = [p for p in multiprocessing.active_children() if p.name == "data-worker-1"]
        os.kill(worker_1.pid, signal.SIGSEGV)
        batches += list(itertools.islice(it, stream.batches_per_epoch - 2))
    finally:
        it.close()
    (warning,) = [r.getMessage() for r in caplog.records if "died of SIGSEGV" in r.getMessage()]
    lost = set() if "between two batches" in warning else {_named(warning)}
    assert sorted(valid_keys(batches)) == sorted(dataset_keys(Path(c.shards)) - lost)
    assert stream.stats()["crashed_decoder"] == len(lost)


def test_a_worker_killed_on_a_sample_ends_the_epoch_naming_it(cfg, monkeypatch):
    """SIGKILL (a person, the out-of-memory killer) is no decoder's crash: the epoch ends with
    an error naming the signal and the sample, which a resumed run would meet again."""
    from data_pipeline.stream import build_stream
    from tests.data.data_helpers import take

    c = cfg(num_workers=2, prefetch_factor=1)
    target = _worker_1_keys(c)[5]
    _dies_on(monkeypatch, target, signal.SIGKILL)
    stream = build_stream(c, 0, 1)
    with pytest.raises(DataError, match=r"loader worker 1 \(pid \d+\) ended with exit code -9 \(SIGKILL\)") as e:
        take(stream, stream.batches_per_epoch)
    assert "the last sample it began is" in str(e.value) and _named(str(e.value)) == target


def test_a_slow_worker_that_makes_progress_is_not_killed(cfg, monkeypatch):
    """The watch is on progress, not on batches: a worker whose batch takes longer than
    data.stall_timeout_s, each of its samples well under it, is left alone."""
    import time

    from data_pipeline.stream import build_stream
    from tests.data.data_helpers import dataset_keys, take, valid_keys

    c = cfg(num_workers=2, prefetch_factor=1, stall_timeout_s=2.0)
    slow = set(_worker_1_keys(c)[4:8])  # worker 1's second batch: ~2.4 s, a sample each 0.6 s
    _on_sample(monkeypatch, slow, lambda: time.sleep(0.6))
    stream = build_stream(c, 0, 1)
    batches = take(stream, stream.batches_per_epoch)
    assert sorted(valid_keys(batches)) == sorted(dataset_keys(Path(c.shards)))
    assert stream.stats()["stalled_decoder"] == 0


@pytest.mark.timeout(120)
def test_a_stall_is_not_skipped_where_other_processes_read_the_same_batches(cfg, monkeypatch):
    """As with a crash: where each process of a replica reads its batches from its own loader
    (skip_unreadable=False), the hung worker is killed and the epoch ends naming the sample."""
    from data_pipeline.stream import build_stream
    from tests.data.data_helpers import take

    c = cfg(num_workers=2, prefetch_factor=1, stall_timeout_s=2.0)
    target = _worker_1_keys(c)[5]
    _on_sample(monkeypatch, {target}, signal.pause)
    stream = build_stream(c, 0, 1, skip_unreadable=False)
    with pytest.raises(DataError, match=r"loader worker 1 \(pid \d+\) made no progress for \d+ s") as e:
        take(stream, stream.batches_per_epoch)
    assert _named(str(e.value)) == target


def test_a_batch_sent_as_its_stalled_worker_is_killed_is_not_taken(pool_of, tmp_path):
    """The watch looks, sees no progress, kills: a batch the worker sent between the look and
    the kill must not be handed out, or the worker's next turn would read its dead pipe as a
    plain SIGKILL (no stall, so no recovery). The stall is raised at once instead."""
    import time

    from data_pipeline.workers import Watch, WorkerDied

    go, sent = tmp_path / "go", tmp_path / "sent"

    def produce(j):
        while not go.exists():  # until the watch has looked once and found nothing
            time.sleep(0.005)
        yield {"j": j}
        sent.touch()  # resumed after the send
        signal.pause()

    started, looks = [], []  # the watch's looks once the pool has started (not those of its start)

    def progress(j: int) -> int:  # the count stands still; from the second look on, the batch is in the pipe
        if started:
            looks.append(j)
        if len(looks) > 1:
            go.touch()
            while not sent.exists():
                time.sleep(0.005)
        return 0

    pool = pool_of(produce, num_workers=1, prefetch=2, watch=Watch(progress, 0.0))  # any stand-still is a stall
    started.append(True)
    with pytest.raises(WorkerDied, match=r"made no progress for 0 s \(data.stall_timeout_s\)") as died:
        next(iter(pool))
    assert died.value.stalled > 0 and died.value.signal == signal.SIGKILL and len(looks) == 2


@pytest.mark.timeout(120)
def test_a_worker_that_hangs_reading_a_sample_names_that_sample(cfg, monkeypatch, caplog):
    """A read that never returns (a remote store's) holds the worker before the sample is
    handed to the later stages: the mark names the sample being read, so that one is skipped
    unread and the replacement does not read it again."""
    from data_pipeline.manifest import load_manifest
    from data_pipeline.stream import build_stream
    from data_pipeline.tar_reader import ShardReader, TarShard
    from tests.data.data_helpers import dataset_keys, take, valid_keys

    c = cfg(num_workers=2, prefetch_factor=1, stall_timeout_s=2.0)
    target = _worker_1_keys(c)[5]
    paths = load_manifest(c.shards).paths()
    where = next((s, i) for s, path in enumerate(paths) for i, raw in enumerate(TarShard(path)) if raw.key == target)
    read = ShardReader.read

    def hanging(self, shard, index, lazy=False):
        if (shard, index) == where:
            signal.pause()
        return read(self, shard, index, lazy)

    monkeypatch.setattr(ShardReader, "read", hanging)
    stream = build_stream(c, 0, 1)
    batches = take(stream, stream.batches_per_epoch)
    assert sorted(valid_keys(batches)) == sorted(dataset_keys(Path(c.shards)) - {target})
    (warning,) = [r.getMessage() for r in caplog.records if "made no progress" in r.getMessage()]
    assert _named(warning) == target
