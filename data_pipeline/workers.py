"""Loader worker processes: forked producers handing batches to the main process in turn.

torch's DataLoader did this before, at a cost measured at ~70-100 us of main-process CPU per
batch for its protocol alone (an index queue, a result queue with a feeder thread in each
worker, a profiler record per batch, a pin-memory thread) on top of unpickling: with two
workers on two cores that time is taken from decoding. Here each worker has one pipe to the
main process and a semaphore of credits:

    worker j                                      main process
    credits[j].acquire()   (<= prefetch in flight)
    put pixels into a free slot (transfer.py)
    pipe j <- ("batch", small dict)       ->      recv from worker t % n for batch t
                                                  credits[j].release()

Batch t of the rank comes from worker t % n, as with DataLoader's in-order iterable mode; a
worker that has no more batches says so and is passed over from then on. An exception in a
worker reaches the main process as the same exception (its worker traceback as a note); a
worker that dies without a word (killed, out of memory, a native decoder's crash) is found by
its exit code while the main process waits, and raised as `WorkerDied` unless the pool's
`recover` gives a producer to fork it again with in its place (stream.py: past the sample a
decoder crashed on). Workers exit when their parent is gone, and the pool terminates them
when it is closed (the caller stopped iterating) or garbage collected.

A worker alive but stuck (a native decoder hung on a damaged file: a forked worker once hung in
FFmpeg's scaler teardown) would hold the rank for ever, and the other ranks until their
collectives time out. With a `Watch`, the worker whose batch the main process waits for is
killed once its progress count (stream.SampleMarks: bumped as it begins, reads or decodes a
sample) has stood still for `Watch.seconds`, and raised as `WorkerDied` with `stalled` set, for
`recover` to fork it again past that sample as after a crash.

A worker's first message says it started. Forking a process that runs other threads can leave
the child stuck before it runs a line of Python: CPython up to 3.11 takes a runtime lock in
`PyOS_AfterFork_Child` before resetting it, so a child forked while another thread held it
waits forever (python/cpython#112275, fixed in 3.12). A trainer rank has such threads (gloo's,
DeepSpeed's, logging), and a stuck worker hung a 2-rank run of `make demo` at an epoch
boundary. A worker that has not said it started within `START_TIMEOUT_S` has done nothing
yet, so it is killed and forked again (`START_ATTEMPTS` times in all) with a warning.

A worker never frees what it inherited (`gc.freeze()` first): its garbage collector would free
the parent's garbage cycles too, and one holding a ring of slots left out of the fork
(transfer.py, MADV_DONTFORK) unmapped that address range in the worker, where the worker's own
map of a shard may lie by then: its next read of the shard was a segmentation fault. (Also,
collections no longer touch the inherited objects, so their pages stay shared.)

A worker keeps the memory it frees (`keep_freed_memory`): a batch's pixels are allocated sample
by sample and freed together once the batch is in its slot, and with glibc's defaults that
memory went back to the kernel and was faulted in again by the next batch: ~20 page faults a
sample at 256 px against raw decode's 1 (`dit bench loader` there: ~0.67 before, ~0.82 after).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import math
import os
import pickle
import platform
import select
import signal
import time
import traceback
import weakref
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from data_pipeline.errors import DataError
from data_pipeline.transfer import FORK

WAIT_S = 5.0  # how often a waiting side checks that the other is still there
START_TIMEOUT_S = 30.0  # a started worker says so in milliseconds; one silent this long is stuck
START_ATTEMPTS = 3
# glibc's mallopt parameters (malloc.h) and the values a worker sets (see keep_freed_memory)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: a block this large or larger is still mapped alone
TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap kept, up to this much

log = logging.getLogger("data_pipeline")

Producer = Callable[[int], Iterator[dict]]  # worker index -> its batches


class WorkerDied(DataError):
    """A worker ended without a word: killed by a signal (a decoder's segmentation fault, the
    out-of-memory killer) or exited."""

    def __init__(self, worker: int, pid: int, exitcode: Optional[int], stalled: float = 0.0):
        self.worker = worker
        self.signal = -exitcode if exitcode is not None and exitcode < 0 else None  # what killed it
        self.stalled = stalled  # > 0: killed here after making no progress for this many seconds
        if stalled:
            super().__init__(f"loader worker {worker} (pid {pid}) made no progress for {stalled:.0f} s "
                             f"(data.stall_timeout_s) and was killed (a decoder that hung?)")
            return
        how = f"exit code {exitcode}"
        if self.signal in signal.valid_signals():
            how += f" ({signal.Signals(self.signal).name})"
        super().__init__(f"loader worker {worker} (pid {pid}) ended with {how} before its batches were done "
                         f"(a decoder that crashed? killed? out of memory?)")


class Watch(NamedTuple):
    """How the pool tells a stuck worker: `progress(j)`, a count worker j bumps as it works
    (read from shared memory), standing still for `seconds`."""

    progress: Callable[[int], int]
    seconds: float

    def poll_ms(self) -> float:
        """How long one wait for a message lasts: often enough to see a stall within a tenth
        of `seconds` late, at most `WAIT_S`."""
        return min(WAIT_S, self.seconds / 10) * 1000


UNWATCHED = Watch(lambda j: 0, math.inf)  # a pool without a watch: waits for ever, polling every WAIT_S


# (the death, batches the pool has handed out) -> a producer to fork the worker again with, or None
Recover = Callable[[WorkerDied, int], Optional[Producer]]


class WorkerPool:
    """`num_workers` forked processes running `produce(j)`; iterate for their batches in turn.

    Fork only: the producer (and the shared memory it writes into) is inherited, not pickled."""

    def __init__(self, produce: Producer, num_workers: int, prefetch: int, recover: Optional[Recover] = None,
                 watch: Optional[Watch] = None):
        self._parent = os.getpid()
        self._produce, self._prefetch, self._recover = produce, prefetch, recover
        self._watch = watch or UNWATCHED
        self._conns, self._procs, self._credits, self._polls = [], [], [], []
        self.handed = 0  # batches handed out by iterating, over all iterations: the round-robin turn
        try:
            for j in range(num_workers):
                self._start(j)
            for j in range(num_workers):
                self._await_start(j)
        except BaseException:
            self.close()
            raise
        # also at garbage collection and at interpreter exit, before multiprocessing's own exit
        # hook would SIGTERM and join them (a worker may ignore SIGTERM: see close)
        self._stop = weakref.finalize(self, _stop, self._procs, self._conns)

    def _start(self, j: int) -> None:
        """Fork worker j (again, in its place, when it is there already)."""
        receive, send = FORK.Pipe(duplex=False)
        credits = FORK.Semaphore(self._prefetch)
        readers = [c for i, c in enumerate(self._conns) if i != j] + [receive]  # for the worker to close
        proc = FORK.Process(target=_work, args=(self._produce, j, send, credits, self._parent, readers),
                            name=f"data-worker-{j}", daemon=True)
        proc.start()
        send.close()  # the worker's end: the main process keeps only its reading end
        # in place of a worker j that is there already, else appended: the same slice assignment
        self._conns[j: j + 1], self._procs[j: j + 1] = [receive], [proc]
        self._credits[j: j + 1], self._polls[j: j + 1] = [credits], [_poller(receive)]

    def _await_start(self, j: int) -> None:
        """Wait for worker j's first message; fork it again while it stays silent (module doc)."""
        for attempt in range(1, START_ATTEMPTS + 1):
            if self._polls[j](START_TIMEOUT_S * 1000):
                self._receive(j)  # "started"; DataError with its exit code where it died instead
                return
            proc = self._procs[j]
            log.warning("loader worker %d (pid %d) said nothing %.0f s after its fork (attempt %d of %d): "
                        "stuck before running any code (python/cpython#112275); forking it again",
                        j, proc.pid, START_TIMEOUT_S, attempt, START_ATTEMPTS)
            _stop([proc], [self._conns[j]])
            if attempt < START_ATTEMPTS:
                self._start(j)
        raise DataError(f"loader worker {j} did not start in {START_ATTEMPTS} forks of {START_TIMEOUT_S:.0f} s "
                        f"each (see the warnings above)")

    def __iter__(self) -> Iterator[dict]:
        live = list(range(len(self._procs)))
        while live:
            j = live[self.handed % len(live)]
            try:
                kind, payload = self._receive(j)
            except WorkerDied as died:
                self._replace(j, died, self.handed)
                continue  # the same turn: worker j's next batch, from its replacement
            if kind == "end":
                live.remove(j)
                continue  # the same turn goes to the next live worker
            if kind == "error":
                raise payload
            self._credits[j].release()
            self.handed += 1
            yield _from_wire(payload)

    def _replace(self, j: int, died: WorkerDied, handed: int) -> None:
        """Fork worker j again with the producer `recover` gives for its death, or raise it."""
        produce = self._recover(died, handed) if self._recover is not None else None
        if produce is None:
            raise died
        _stop([self._procs[j]], [self._conns[j]])
        self._produce = produce
        self._start(j)
        self._await_start(j)

    def _receive(self, j: int) -> tuple[str, object]:
        conn, proc = self._conns[j], self._procs[j]
        if (stalled := self._await(j)) is not None:  # killed: a batch it sent meanwhile is made again
            raise WorkerDied(j, proc.pid, proc.exitcode, stalled)
        try:
            return pickle.loads(conn.recv_bytes())
        except EOFError:
            proc.join(WAIT_S)
            raise WorkerDied(j, proc.pid, proc.exitcode) from None

    def _await(self, j: int) -> Optional[float]:
        """Wait until worker j's pipe has a message or EOF (a dead worker's pipe reads as EOF: no
        need to wait for it); where its progress count stands still for the watch's seconds
        first, kill it and return how long it stood still (None otherwise). Its pipe is not read
        then: a batch it sent between the last look and the kill is one the replacement makes
        again (`recover` forks it from the batches handed out)."""
        proc, ready, watch = self._procs[j], self._polls[j], self._watch
        seen, since = watch.progress(j), time.monotonic()
        while not ready(watch.poll_ms()):
            if proc.exitcode is not None and not ready(0):
                return None
            count = watch.progress(j)
            now = time.monotonic()
            if count != seen:
                seen, since = count, now
            elif now - since >= watch.seconds:
                proc.kill()
                proc.join(WAIT_S)  # not for ever: a process in uninterruptible I/O dies once it returns
                return now - since
        return None

    def close(self) -> None:
        """Stop the workers (they may be blocked on a credit or mid-batch) and reap them."""
        if hasattr(self, "_stop"):
            self._stop()
        else:
            _stop(self._procs, self._conns)


def _poller(conn) -> Callable[[float], list]:
    """`ready(ms)`: whether `conn` has data (or EOF) within ms milliseconds. One poll object per
    pipe, made once: `Connection.poll` builds a selector each call, ~50 us of the main
    process per batch on a loaded machine against ~1 us."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return poller.poll


def _stop(procs: list, conns: list) -> None:
    """SIGKILL and reap: a worker holds nothing to clean up, and it inherited the trainer's
    handlers of SIGTERM/SIGUSR1 (preemption), which would only set a flag."""
    for proc in procs:
        if proc.exitcode is None:
            proc.kill()
    for proc in procs:
        proc.join()
    for conn in conns:
        conn.close()


def keep_freed_memory() -> bool:
    """Make this process's allocator keep what it frees for its next allocations (glibc; elsewhere
    nothing changes and False is returned).

    glibc maps a block of 128 KiB or more on its own, and gives free memory at the top of the
    heap over 128 KiB back to the kernel. Its thresholds adapt (freeing a mapped block of S bytes
    raises them to S and 2S), but a batch is freed all at once: at 256 px the 32 samples freed
    together (6 MiB) went back to the kernel every batch and the next batch faulted them in,
    zero-filled, again. Fixed here (mallopt(3)): blocks under `MMAP_THRESHOLD` come from the
    heap, and the heap keeps up to `TRIM_THRESHOLD` free. A worker's memory then stays at the
    most it held at once, which it reached anyway."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _work(produce: Producer, j: int, conn, credits, parent: int, inherited: list) -> None:
    """The body of worker j: "started", its batches, each sent once a credit allows, then "end"."""
    gc.freeze()  # what the parent left is never freed here: see the module doc
    _send(conn, ("started", None))
    keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    for reading in inherited:  # only the main process reads: a write then fails once it is gone
        reading.close()
    torch.set_num_threads(1)  # as DataLoader does: the workers already use every core
    try:
        for batch in produce(j):
            if not wait_with_parent(lambda s: credits.acquire(timeout=s), parent):
                return
            _send(conn, ("batch", _to_wire(batch)))
        _send(conn, ("end", None))
    except Exception as e:  # noqa: BLE001 - every failure goes to the main process, which raises it
        _send(conn, ("error", _portable(e, f"loader worker {j} (pid {os.getpid()})")))
    finally:
        conn.close()


def wait_with_parent(ready: Callable[[float], bool], parent: int) -> bool:
    """In a worker: wait until `ready(seconds)` says yes (True), asking every `WAIT_S` seconds,
    or until the parent process is gone (False)."""
    while not ready(WAIT_S):
        if os.getppid() != parent:
            return False
    return True


def _send(conn, message: tuple) -> None:
    """Plain pickle, not multiprocessing's: that one would move tensors through a new
    shared-memory file each, handed over by a thread of the (soon exiting) worker."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


class _WireTensor(NamedTuple):
    """A tensor's bytes as a uint8 array (pickled as one buffer), its dtype and shape. A tuple:
    unpickled by one call, where a plain object's state is set attribute by attribute."""

    data: object  # np.ndarray of uint8
    dtype: str
    shape: tuple

    @classmethod
    def of(cls, t: torch.Tensor) -> "_WireTensor":
        data = t.contiguous().view(-1).view(torch.uint8).numpy()  # bf16 too: numpy has no bf16
        return cls(data, str(t.dtype).removeprefix("torch."), tuple(t.shape))

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.data).view(getattr(torch, self.dtype)).view(self.shape)


def _to_wire(batch):
    if not isinstance(batch, dict):
        return batch
    return {k: _WireTensor.of(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _from_wire(batch):
    if not isinstance(batch, dict):
        return batch
    return {k: v.tensor() if isinstance(v, _WireTensor) else v for k, v in batch.items()}


def _portable(error: Exception, where: str) -> Exception:
    """`error` with its traceback as a note, if it survives pickling; else a DataError with both."""
    text = traceback.format_exc()
    error.add_note(f"(raised in {where}:)\n{text}")
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - e.g. an exception class whose __init__ takes other arguments
        return DataError(f"{where} failed:\n{text}")
