"""The loader's worker processes: batches in turn, failures surfaced, nothing left behind."""
from __future__ import annotations

import os
import signal

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
    with pytest.raises(DataError, match=r"loader worker 1 \(pid \d+\) ended with exit code -9"):
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
