"""Multi-resolution buckets: several pixel areas, each with its aspect ratios (data.resolutions)."""
from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipeline.config import DataConfig, validate_data_config
from data_pipeline.stream import build_stream, handed_over
from data_pipeline.transforms import TransformSpec, area_index, bucket_size, image_pixels
from tests.data.data_helpers import json_roundtrip, take, valid_keys, write_manifest, write_tar

AREAS = (16, 32)
RATIOS = (0.5, 1.0, 2.0)
# (width, height) of the sources and the bucket each belongs to: the largest area not above the
# source's pixel area (the smallest when below all), then the nearest ratio.
SOURCES = {
    (16, 16): (16, 1.0),   # 256 px: area 16
    (32, 16): (16, 2.0),   # 512 px: still below 32 x 32
    (16, 32): (16, 0.5),
    (32, 32): (32, 1.0),   # exactly 32 x 32
    (64, 32): (32, 2.0),
    (32, 64): (32, 0.5),
}


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """48 real PNGs, 8 of each source size, over three uneven shards; key `<i>_<w>x<h>`."""
    root = tmp_path_factory.mktemp("mixed")
    shapes = list(SOURCES)
    samples = []
    for i in range(48):
        w, h = shapes[i * 5 % len(shapes)]
        samples.append({"__key__": f"{i:04d}_{w}x{h}", "png": _png(w, h, i), "txt": b"noise"})
    for n, (a, b) in enumerate([(0, 11), (11, 30), (30, 48)]):
        write_tar(root / f"shard-{n:06d}.tar", samples[a:b])
    write_manifest(root)
    return root, [s["__key__"] for s in samples]


def _cfg(root, **overrides) -> DataConfig:
    base = DataConfig(shards=str(root), resolution=16, resolutions=list(AREAS), aspect_buckets=list(RATIOS),
                      batch_size=2, bucket_window=8, num_workers=0, shuffle_buffer=8)
    return dataclasses.replace(base, **overrides)


def _native(key: str) -> tuple[int, int]:
    w, h = key.split("_")[1].split("x")
    return int(w), int(h)


def _expected_hw(key: str) -> tuple[int, int]:
    side, ratio = SOURCES[_native(key)]
    return bucket_size(side, ratio)


def test_the_largest_area_not_above_the_source_is_chosen():
    assert area_index(16, 16, AREAS) == 0 and area_index(31, 33, AREAS) == 0  # 1023 px < 32 x 32
    assert area_index(32, 32, AREAS) == 1 and area_index(640, 480, AREAS) == 1
    assert area_index(8, 8, AREAS) == 0  # below every area: the smallest (upscaled)
    spec = TransformSpec.from_config(_cfg("unused"))
    assert spec.sizes == tuple(bucket_size(a, r) for a in AREAS for r in RATIOS)
    for (w, h), (side, ratio) in SOURCES.items():
        pixels = image_pixels(PIL.Image.open(io.BytesIO(_png(w, h, 0))), spec, (0.5, 0.5, 0.5))
        assert pixels.frames.shape == (1, *bucket_size(side, ratio), 3), (w, h)


def test_single_area_configs_are_unchanged():
    old = TransformSpec.from_config(DataConfig(resolution=32, aspect_buckets=[0.5, 1.0, 2.0]))
    assert old.sizes == tuple(bucket_size(32, r) for r in (0.5, 1.0, 2.0)) and old.areas == (32,)
    assert TransformSpec.from_config(DataConfig(resolution=32, resolutions=[32])).sizes == ((32, 32),)


def test_two_areas_give_batches_of_every_bucket_each_sample_once(mixed):
    root, keys = mixed
    stream = build_stream(_cfg(root), 0, 1)
    batches = take(stream, stream.batches_per_epoch)
    assert sorted(valid_keys(batches)) == sorted(keys)  # every sample exactly once
    shapes = Counter(tuple(b["image"].shape[2:]) for b in batches)  # one (h, w) per batch by construction
    assert set(shapes) == {bucket_size(a, r) for a in AREAS for r in RATIOS}
    own = sum(all(_expected_hw(k) == tuple(b["image"].shape[2:]) for k in b["__key__"]) for b in batches)
    # 24 batches in 3 windows of 8: per window at most 6 leftovers (one per bucket) are forced
    # into 3 batches of another bucket; all other batches hold their own bucket's samples only.
    assert own >= len(batches) - 3 * 3


@pytest.mark.parametrize("stop", [3, 11])
def test_resume_mid_epoch_continues_exactly(mixed, stop):
    root, _ = mixed
    cfg = _cfg(root, num_workers=2)
    total = build_stream(cfg, 0, 1).batches_per_epoch
    reference = take(build_stream(cfg, 0, 1), total)
    first = build_stream(cfg, 0, 1)
    head = take(first, stop)
    tail = take(build_stream(cfg, 0, 1, state=json_roundtrip(first.state_dict())), total - stop)
    assert [b["__key__"] for b in head + tail] == [b["__key__"] for b in reference]
    assert [b["image"].shape for b in head + tail] == [b["image"].shape for b in reference]


def test_a_resume_on_another_layout_inside_windows_serves_each_sample_once(mixed, caplog):
    """Inside a bucketing window the samples a batch took depend on the data: the state records
    the ids of the batches handed out of an unfinished window, and the plan on another layout
    leaves them out. Each sample comes once (before the record, the 3 batches of 2 handed out
    came again, with a warning)."""
    root, keys = mixed
    first = build_stream(_cfg(root, num_workers=1), 0, 1)
    head = take(first, 3)  # inside the first window of 8 batches
    other = _cfg(root, num_workers=2)
    with caplog.at_level("WARNING", logger="data_pipeline"):
        second = build_stream(other, 0, 1, state=json_roundtrip(first.state_dict()))
    _assert_once(valid_keys(head) + _finish([second]), keys)
    assert "served again" not in caplog.text


def _ranks(cfg: DataConfig, world: int, state=None) -> list:
    return [build_stream(cfg, r, world, state=state) for r in range(world)]


def _take_each(streams: list, n: int) -> list[str]:
    """The valid keys of the next n batches of every rank's stream."""
    return [k for s in streams for k in valid_keys(take(s, n))]


def _finish(streams: list) -> list[str]:
    """The valid keys of the rest of the epoch on every rank (the same number of batches each)."""
    counts = {s._job().segment.batches for s in streams}
    assert len(counts) == 1  # no rank waits for another
    keys = _take_each(streams, counts.pop())
    assert all(s.state_dict()["epoch"] == 1 for s in streams)
    return keys


def _state(streams: list) -> dict:
    """What every rank's checkpoint holds: the ranks' records joined (as the trainer's gather does)."""
    return json_roundtrip(handed_over([s.state_dict() for s in streams]))


def _assert_once(seen: list[str], keys: list[str]) -> None:
    counts = Counter(seen)
    assert sorted(counts) == sorted(keys) and max(counts.values()) == 1, \
        {k: n for k, n in counts.items() if n > 1}


def test_two_changes_of_layout_inside_windows_serve_each_sample_once(mixed, caplog):
    """2 ranks x 2 workers (windows of 3) -> 3 ranks x 1 worker (windows of 4) -> 1 rank x 2
    workers (windows of 2), each change with windows open on every rank: every new rank
    leaves out every old rank's recorded samples, and all ranks plan as many batches."""
    root, keys = mixed
    first = _ranks(_cfg(root, num_workers=2, bucket_window=3), 2)
    seen = _take_each(first, 5)  # worker 0: one window done; worker 1: 2 of 3 batches
    second = _ranks(_cfg(root, num_workers=1, bucket_window=4), 3, _state(first))
    seen += _take_each(second, 2)
    with caplog.at_level("WARNING", logger="data_pipeline"):
        third = _ranks(_cfg(root, num_workers=2, bucket_window=2), 1, _state(second))
    _assert_once(seen + _finish(third), keys)
    assert "served again" not in caplog.text


def test_a_resume_on_the_same_layout_keeps_the_record_of_its_open_windows(mixed):
    """Resumed on its own layout inside windows (exactly, as always), a rank still records the
    batches handed out before the resume while their windows are open, as an uninterrupted run
    does: a later change of layout leaves them out too."""
    root, keys = mixed
    cfg = _cfg(root, num_workers=2, bucket_window=3)
    first = build_stream(cfg, 0, 1)
    seen = valid_keys(take(first, 4))  # both workers 2 batches into their first window
    again = build_stream(cfg, 0, 1, state=json_roundtrip(first.state_dict()))
    seen += valid_keys(take(again, 1))  # worker 0's window closes, worker 1's stays open
    uninterrupted = build_stream(cfg, 0, 1)
    take(uninterrupted, 5)
    assert again.state_dict() == uninterrupted.state_dict()  # the record too
    later = _ranks(_cfg(root, num_workers=1), 2, _state([again]))
    _assert_once(seen + _finish(later), keys)


def test_a_state_without_the_record_still_resumes_and_warns(mixed, caplog):
    """A state saved before the record (no "served"): the open windows' samples come again,
    counted by the warning; none is lost."""
    root, keys = mixed
    first = build_stream(_cfg(root, num_workers=1), 0, 1)
    head = take(first, 3)
    old = {k: v for k, v in json_roundtrip(first.state_dict()).items() if k != "served"}
    with caplog.at_level("WARNING", logger="data_pipeline"):
        second = build_stream(_cfg(root, num_workers=2), 0, 1, state=old)
    seen = Counter(valid_keys(head) + _finish([second]))
    assert set(seen) == set(keys) and sum(n - 1 for n in seen.values()) == 6
    assert "6 samples already trained on this epoch are served again" in caplog.text


def _gloo_rank(rank: int, world: int, root: str, out: str) -> None:
    """One rank of a bucketed stream: 2 batches into a window, then the state the trainer
    saves for it (every rank's record joined in)."""
    from trainer.train_state import StreamState

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        stream = build_stream(_cfg(root, bucket_window=3), rank, world)
        keys = valid_keys(take(stream, 2))
        state = StreamState(stream).state_dict()["stream"]
        Path(out, f"rank{rank}.json").write_text(json.dumps({"keys": keys, "state": state}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_gloo_rank_saves_every_ranks_record(mixed, tmp_path):
    """In real ranks the trainer's stream state gathers the open windows' ids of all: one rank's
    state (what a resume on another layout reads) lets a single rank serve the rest exactly once."""
    root, keys = mixed
    mp.start_processes(_gloo_rank, args=(2, str(root), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["state"] == ranks[1]["state"] and len(ranks[0]["state"]["served"][-1]) == 8
    alone = build_stream(_cfg(root, bucket_window=3), 0, 1, state=ranks[0]["state"])
    _assert_once(ranks[0]["keys"] + ranks[1]["keys"] + _finish([alone]), keys)


@pytest.mark.parametrize("overrides, message", [
    ({"resolutions": [16, 20]}, "multiple of 8"),
    ({"resolutions": [16, 16, 32]}, "distinct"),
    ({"resolutions": [16, 32], "resolution": 24}, "must include data.resolution"),
    ({"resolutions": [16, 32], "resolution": 16, "sr_resolution": 64}, "sr_resolution"),
])
def test_bad_resolutions_fail_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=rf"^data\.resolutions: .*{message}"):
        validate_data_config(DataConfig(**{"resolution": 32, **overrides}))


def test_a_forced_batch_of_stills_and_clips_keeps_the_clips_moving(tmp_path):
    """Joint image and video training (`kind: video` over stills and clips) at a window of one
    batch, where leftovers meet in nearly every batch: no clip reaches the model as one frame
    (cut to the shortest member beside a still, 14% of clips did at the default window); a
    still among clips is a static clip; every sample comes once."""
    from data_pipeline.synth import synth_sample

    samples = [synth_sample(i, 0, 16, video=i % 3 != 0, num_frames=6) for i in range(24)]
    write_tar(tmp_path / "shard-000000.tar", samples)
    write_manifest(tmp_path)
    cfg = DataConfig(shards=str(tmp_path), kind="video", resolution=16, num_frames=4, batch_size=4,
                     bucket_window=1, num_workers=0)
    stream = build_stream(cfg, 0, 1)
    batches = take(stream, stream.batches_per_epoch)
    assert sorted(valid_keys(batches)) == sorted(s["__key__"] for s in samples)
    lengths, mixed = Counter(), 0
    for b in batches:
        moving = ["num_frames" in meta for meta in b["json"]]
        mixed += len(set(moving)) > 1
        for clip, is_video, valid in zip(b["video"], moving, b["valid"].tolist()):  # (3, F, h, w)
            lengths[is_video, clip.shape[1]] += valid
            if not is_video and clip.shape[1] > 1:
                assert (clip == clip[:, :1]).all()  # a still repeated
    assert mixed >= 2  # the case under test happened
    assert lengths[True, 4] == sum(n for (is_video, _), n in lengths.items() if is_video) == 16


def test_a_clip_that_fits_its_batch_is_not_copied():
    """`refit` makes a still a static clip and cuts a longer clip; a clip already of the batch's
    length and size (every still of an image batch) comes back itself: copying it cost 5 us a
    sample of the loader at 128 px."""
    from data_pipeline.transforms import refit

    still = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(1, 8, 8, 3)
    assert refit(still, 1, (8, 8)) is still
    static = refit(still, 3, (8, 8))
    assert static.shape == (3, 8, 8, 3) and (static == still).all()
    clip = np.arange(5 * 8 * 8 * 3, dtype=np.uint8).reshape(5, 8, 8, 3) % 251
    assert np.shares_memory(refit(clip, 2, (8, 8)), clip) and (refit(clip, 2, (8, 8)) == clip[:2]).all()
