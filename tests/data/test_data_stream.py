"""The streaming loader: exactly once per epoch, equal batch counts, exact resume."""
from __future__ import annotations

import multiprocessing
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from tests.data.data_helpers import dataset_keys, json_roundtrip, key_sequence, make_shards, take, valid_keys

from data_pipeline.errors import DataError
from data_pipeline.stream import build_stream


def test_two_ranks_two_workers_see_every_sample_once(cfg, shards):
    """2 ranks x 2 DataLoader workers over 5 uneven shards (28 samples, batches of 4)."""
    c = cfg(num_workers=2)
    streams = [build_stream(c, rank, 2) for rank in range(2)]
    batches = [take(s, s.batches_per_epoch) for s in streams]
    assert [len(b) for b in batches] == [4, 4]  # ceil(28 / (2 * 4)) on every rank
    seen = Counter(k for rank in batches for k in valid_keys(rank))
    assert set(seen) == dataset_keys(shards)
    assert max(seen.values()) == 1
    for b in batches[0] + batches[1]:
        assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.uint8
        assert len(b["caption"]) == len(b["json"]) == 4 and all(b["caption"])
        # metadata crosses from the worker as json bytes and is parsed when read
        assert all(isinstance(m, bytes) for m in b["json"].members)
        assert [j["key"] for j in b["json"]] == b["__key__"]
    # the state already points at the next epoch
    assert streams[0].state_dict()["epoch"] == 1


@pytest.mark.parametrize("sizes,world,workers,batch", [((2, 3), 2, 2, 2), ((1,) * 6, 3, 2, 1), ((13,), 2, 2, 3)])
def test_more_ranks_x_workers_than_shards(tmp_path, cfg, sizes, world, workers, batch):
    """Shards are spread by sample ranges, so any shard count works for any topology."""
    d = make_shards(tmp_path / "few", sizes)
    c = cfg(shards=str(d), num_workers=workers, batch_size=batch)
    streams = [build_stream(c, rank, world) for rank in range(world)]
    counts = {s.batches_per_epoch for s in streams}
    assert len(counts) == 1
    seen = Counter(k for s in streams for k in valid_keys(take(s, s.batches_per_epoch)))
    assert set(seen) == dataset_keys(d) and max(seen.values()) == 1


def test_epochs_are_reshuffled_and_complete(cfg, shards):
    s = build_stream(cfg(), 0, 1)
    n = s.batches_per_epoch
    batches = take(s, 2 * n)
    first, second = key_sequence(batches[:n]), key_sequence(batches[n:])
    assert set(valid_keys(batches[:n])) == set(valid_keys(batches[n:])) == dataset_keys(shards)
    assert first != second


def test_drop_last_serves_only_full_batches(cfg):
    s = build_stream(cfg(drop_last=True, batch_size=5), 0, 2)
    assert s.batches_per_epoch == 2  # 28 // (2 * 5)
    batches = take(s, 2)
    assert all(b["valid"].all() for b in batches)


@pytest.mark.parametrize("stop", [1, 3, 6])
def test_resume_continues_the_exact_key_sequence(cfg, stop):
    """Stop after K batches, rebuild from the saved state, go on: same sequence as uninterrupted
    (K = 6 crosses into the second epoch; 2 real workers per rank)."""
    c = cfg(num_workers=2, batch_size=3)
    reference = key_sequence(take(build_stream(c, 1, 2), 10))
    first = build_stream(c, 1, 2)
    head = take(first, stop)
    state = json_roundtrip(first.state_dict())
    tail = take(build_stream(c, 1, 2, state=state), 10 - stop)
    assert key_sequence(head + tail) == reference


def test_state_is_taken_from_what_was_handed_out_not_prefetched(cfg):
    """Workers prefetch ahead; the state must only count batches the caller received."""
    c = cfg(num_workers=2, batch_size=2, prefetch_factor=4)
    s = build_stream(c, 0, 1)
    it = iter(s)
    got = [next(it) for _ in range(3)]
    state = json_roundtrip(s.state_dict())
    rest = [next(it) for _ in range(4)]
    it.close()
    assert state["segments"][-1][-1] == 3
    resumed = take(build_stream(c, 0, 1, state=state), 4)
    assert key_sequence(resumed) == key_sequence(rest)
    assert key_sequence(got)


def test_iterating_again_continues_where_it_stopped(cfg):
    c = cfg()
    reference = key_sequence(take(build_stream(c, 0, 1), 5))
    s = build_stream(c, 0, 1)
    assert key_sequence(take(s, 2) + take(s, 3)) == reference


@pytest.mark.parametrize("old,new", [((2, 2), (3, 1)), ((3, 1), (2, 2)), ((2, 1), (1, 2))])
def test_resume_after_the_world_size_changed(cfg, shards, old, new):
    """Elastic resume: K steps on `old` (ranks, workers), the rest of the epoch on `new`:
    every sample of the epoch exactly once, equal batch counts on the new ranks."""
    (w0, nw0), (w1, nw1) = old, new
    c0, c1 = cfg(num_workers=nw0, batch_size=2), cfg(num_workers=nw1, batch_size=2)
    before = [build_stream(c0, r, w0) for r in range(w0)]
    seen = Counter(k for s in before for k in valid_keys(take(s, 2)))
    state = json_roundtrip(before[0].state_dict())
    after = [build_stream(c1, r, w1, state=state) for r in range(w1)]
    left = {s._job().segment.batches for s in after}
    assert len(left) == 1
    n = left.pop()
    seen.update(k for s in after for k in valid_keys(take(s, n)))
    assert set(seen) == dataset_keys(shards) and max(seen.values()) == 1
    assert after[0].state_dict()["epoch"] == 1


def test_resampled_stream_is_infinite_weighted_and_resumable(tmp_path, cfg):
    a = make_shards(tmp_path / "a", (6, 6))
    b = make_shards(tmp_path / "b", (5,), start=1000)
    c = cfg(shards=str(a), mixture={str(b): 3.0}, resampled=True, shuffle_buffer=2, batch_size=4)
    s = build_stream(c, 0, 1)
    batches = take(s, 60)  # 240 samples from 17 distinct ones: drawn with replacement
    keys = key_sequence(batches)
    from_b = sum(k >= "000001000" for k in keys) / len(keys)
    assert 0.6 < from_b < 0.9  # weight 3 : 1
    state = json_roundtrip(build_stream(c, 0, 1).state_dict())
    assert state["mode"] == "resampled"
    first = build_stream(c, 0, 1)
    head = take(first, 7)
    tail = take(build_stream(c, 0, 1, state=json_roundtrip(first.state_dict())), 5)
    assert key_sequence(head + tail) == keys[: 12 * 4]


def test_a_sample_drawn_twice_gets_other_noise(tmp_path, cfg):
    """A source smaller than a visit (data.shuffle_buffer draws) repeats its samples within a
    batch; each draw has its own id, which keys its noise: repeats under the sample's id were
    the same training term twice."""
    small = make_shards(tmp_path / "small", (3,))
    batches = take(build_stream(cfg(shards=str(small), resampled=True, shuffle_buffer=32, batch_size=8), 0, 1), 8)
    assert any(len(set(b["__key__"])) < 8 for b in batches)  # repeats within a batch
    ids = [i for b in batches for i in b["__sample__"]]
    assert len(set(ids)) == len(ids)


def test_joined_sources_are_resampled_as_their_union(tmp_path, cfg):
    """"::"-joined sources share the weight of `data.shards` by their sample counts, as an epoch
    covers their union: each had weight 1, so a 3-sample source took half the draws beside 12."""
    a = make_shards(tmp_path / "a", (6, 6))
    b = make_shards(tmp_path / "b", (3,), start=1000)
    keys = key_sequence(take(build_stream(cfg(shards=f"{a}::{b}", resampled=True, shuffle_buffer=2, batch_size=4),
                                          0, 1), 60))
    from_b = sum(k >= "000001000" for k in keys) / len(keys)
    assert 0.08 < from_b < 0.35, from_b  # 3 / 15 = 0.2 of 120 visits (std 0.04)


def test_a_shard_listed_twice_is_refused(tmp_path, cfg, shards):
    """Overlapping sources would read a shard twice per epoch, silently."""
    one = sorted(Path(shards).glob("*.tar"))[0]
    for spec in (f"{shards}::{shards}", f"{shards}::{one}"):
        with pytest.raises(DataError, match="twice"):
            build_stream(cfg(shards=spec), 0, 1)


def test_state_of_another_dataset_is_refused(tmp_path, cfg):
    other = make_shards(tmp_path / "other", (4,))
    state = build_stream(cfg(), 0, 1).state_dict()
    with pytest.raises(DataError, match="another dataset"):
        build_stream(cfg(shards=str(other)), 0, 1, state=state)


def test_clear_errors(tmp_path, cfg):
    with pytest.raises(DataError, match="matches no tar"):
        build_stream(cfg(shards=str(tmp_path / "nothing-*.tar")), 0, 1)
    with pytest.raises(DataError, match="unresolved interpolation"):
        build_stream(cfg(shards="${run.out_dir}/data"), 0, 1)
    with pytest.raises(ValueError, match="data.mixture"):
        build_stream(cfg(mixture={"x": 1.0}), 0, 1)


def test_a_changed_shuffle_buffer_waits_for_the_next_epoch(cfg, shards):
    """The epoch order depends on data.shuffle_buffer: a resume keeps the saved one until the
    epoch ends, so changing it in the config cannot duplicate or drop samples."""
    first = build_stream(cfg(shuffle_buffer=4), 0, 1)
    seen = valid_keys(take(first, 3))
    resumed = build_stream(cfg(shuffle_buffer=16), 0, 1, state=json_roundtrip(first.state_dict()))
    seen += valid_keys(take(resumed, resumed.batches_per_epoch - 3))
    assert sorted(seen) == sorted(dataset_keys(shards))
    assert resumed.state_dict()["shuffle_buffer"] == 16  # the new epoch uses the new value


def _worker_pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children() if p.name.startswith("data-worker-")}


def _shared_mappings(pid: int) -> int:
    """Anonymous shared mappings of a process (the pixel slots and their flags, see transfer.py)."""
    with open(f"/proc/{pid}/maps") as f:
        return sum("/dev/zero" in line for line in f)


def _shared_kib(tensor: torch.Tensor) -> int:
    """KiB of the mapping holding `tensor` that this process shares with another (its forks)."""
    address, shared, inside = tensor.data_ptr(), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head in ("Shared_Clean:", "Shared_Dirty:"):
                shared += int(line.split()[1])
    return shared


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
def test_workers_forked_once_serve_every_epoch_and_share_nothing_made_after(cfg):
    """Workers forked by `start_workers` serve epoch after epoch, and memory the process fills
    afterwards (a trainer's model and optimizer state) is never shared with them: were it, every
    page of it written while they live would be copied (the first step of each epoch copied a
    DiT-B/2's offloaded optimizer state). Workers forked by the first iteration, after the
    memory was filled, share it: that is what the check sees."""
    late = build_stream(cfg(num_workers=2), 0, 1)
    state = torch.ones(16 << 20)  # 64 MiB: mapped on its own
    it = iter(late)
    next(it)
    assert _shared_kib(state) >= 60 << 10
    it.close()

    stream = build_stream(cfg(num_workers=2), 0, 1)
    stream.start_workers()
    forked = _worker_pids()
    assert len(forked) == 2
    state = torch.ones(16 << 20)
    it = iter(stream)
    try:
        for _ in range(3):  # the first batch of epochs 0, 1 and 2
            batch = next(it)
            assert _shared_kib(state) == 0
            state.add_(1)  # the optimizer's step
            for _ in range(stream.batches_per_epoch - 1):
                batch = next(it)
        assert _worker_pids() == forked
        assert stream.epoch == 3 and batch["image"].shape == (4, 3, 32, 32)  # its state: at the next epoch
    finally:
        it.close()
    assert not _worker_pids()  # closing the iterator mid-epoch stopped them


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/PID/maps")
def test_workers_forked_again_map_only_their_own_slots(cfg):
    """A stream iterated again after a break forks new workers while the caller may hold a batch
    over the old ring of slots: they must not keep that ring mapped (and resident)."""
    stream = build_stream(cfg(num_workers=2), 0, 1)
    it = iter(stream)
    held = next(it)
    first = _worker_pids()
    mapped = {_shared_mappings(pid) for pid in first}
    it.close()
    it = iter(stream)
    try:
        again = next(it)
        second = _worker_pids()
        assert len(second) == 2 and not second & first and {_shared_mappings(pid) for pid in second} == mapped
    finally:
        it.close()
    assert held["image"].shape == again["image"].shape == (4, 3, 32, 32)
    assert not _worker_pids()  # closing the iterator stopped them all


def step_keys(streams: list, step_rows: int, steps: int) -> list[set[str]]:
    """The valid keys of each of `steps` optimizer steps: `step_rows` batches of every rank."""
    batches = [take(s, steps * step_rows) for s in streams]  # per rank
    return [{k for rank in batches for b in rank[i * step_rows:(i + 1) * step_rows] for k in valid_keys([b])}
            for i in range(steps)]


def test_an_epoch_ends_with_a_step_in_every_layout_of_the_global_batch(cfg):
    """28 samples in global batches of 8: 2 ranks x batches of 4, or 1 rank x 2 micro-batches of
    4. Each epoch is padded to whole steps, so step k trains on the same samples in both, past
    the epoch's end too (rounded to rows alone, 1 rank's step 4 took the next epoch's first row
    and every later step was shifted by it); a state from before the step rows resumes."""
    c = cfg(batch_size=4)
    two_ranks = step_keys([build_stream(c, rank, 2) for rank in range(2)], 1, 8)
    accumulated = step_keys([build_stream(c, 0, 1, step_rows=2)], 2, 8)
    assert accumulated == two_ranks
    assert sum(len(keys) for keys in two_ranks[:4]) == 28  # epoch 0: four steps, the last one short
    assert build_stream(c, 0, 1, step_rows=2).batches_per_epoch == 8

    old = json_roundtrip(build_stream(c, 0, 1).state_dict())
    old["segments"] = [s[:5] + s[6:] for s in old["segments"]]  # [world, workers, batch, window, drop, consumed]
    assert build_stream(c, 0, 1, state=old).state_dict()["segments"] == [[1, 1, 4, 1, 0, 1, 0]]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_found_corrupt_when_its_batch_is_collated_is_a_hole_like_any_skip(tmp_path, workers):
    """Images are decoded when their batch is collated (bucketed by their header before): one
    whose scan is cut short is counted as corrupt_image, and its row holds a repeat of the
    batch's first good sample, marked invalid; every other sample comes once, in as many
    batches as planned."""
    from tests.data.data_helpers import write_manifest, write_tar

    from data_pipeline.config import DataConfig
    from data_pipeline.synth import synth_sample

    samples = [synth_sample(i, size=64, image_format="jpg") for i in range(12)]
    bad = samples[5]
    bad["jpg"] = bad["jpg"][: len(bad["jpg"]) // 2]  # header intact: only decoding finds it
    write_tar(tmp_path / "shard-000000.tar", samples)
    write_manifest(tmp_path)
    c = DataConfig(shards=str(tmp_path), resolution=32, batch_size=4, num_workers=workers, shuffle_buffer=4)
    stream = build_stream(c, 0, 1)
    batches = take(stream, stream.batches_per_epoch)
    assert sorted(valid_keys(batches)) == sorted(s["__key__"] for s in samples if s is not bad)
    assert stream.stats()["corrupt_image"] == 1
    (batch,) = [b for b in batches if bad["__key__"] in b["__key__"] or not b["valid"].all()]
    hole = int((~batch["valid"]).nonzero()[0, 0])
    (repeat,) = [i for i, key in enumerate(batch["__key__"]) if key == batch["__key__"][hole] and batch["valid"][i]]
    assert bad["__key__"] not in batch["__key__"]
    assert torch.equal(batch["image"][hole], batch["image"][repeat])


def test_a_state_saved_inside_a_window_before_jpegs_were_bucketed_by_header_closes_that_window(tmp_path):
    """Stream states of version 1 grouped a bucket window without the JPEGs found corrupt while
    decoding; this version groups them by their header. Such a state saved inside a window is
    resumed as after a change of layout (its served ids leave the plan) rather than by grouping
    the window again, which served some samples twice and lost others: every sample once."""
    from tests.data.data_helpers import write_manifest, write_tar

    from data_pipeline.config import DataConfig
    from data_pipeline.synth import synth_sample

    samples = [synth_sample(i, size=64, image_format="jpg") for i in range(24)]
    write_tar(tmp_path / "shard-000000.tar", samples)
    write_manifest(tmp_path)
    c = DataConfig(shards=str(tmp_path), resolution=32, batch_size=4, num_workers=0, shuffle_buffer=4,
                   aspect_buckets=[0.5, 1.0, 2.0])
    first = build_stream(c, 0, 1)
    head = take(first, 2)  # inside the first window of 8 batches
    state = json_roundtrip(first.state_dict())
    assert state["version"] == 2 and state["served"][-1]
    for version, segments in ((2, 1), (1, 2)):
        resumed = build_stream(c, 0, 1, state={**state, "version": version})
        assert len(resumed.state_dict()["segments"]) == segments
        tail = take(resumed, first.batches_per_epoch - 2)
        assert sorted(valid_keys(head + tail)) == sorted(s["__key__"] for s in samples)
