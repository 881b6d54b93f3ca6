"""Safe decoding: pickles are never executed; bad members are skipped, counted, logged."""
from __future__ import annotations

import io
import json
import pathlib
import pickle
from collections import Counter

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.stream import build_stream
from data_pipeline.synth import synth_sample
from tests.data.data_helpers import TouchOnUnpickle, take, valid_keys, write_manifest, write_tar


def _object_npy(payload) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([payload], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _epoch(cfg) -> tuple[list[dict], object]:
    stream = build_stream(cfg, 0, 1)
    return take(stream, stream.batches_per_epoch), stream


def test_pickle_members_are_rejected_never_executed(tmp_path, cfg):
    marker = tmp_path / "EXECUTED"
    payload = pickle.dumps(TouchOnUnpickle(marker))
    pickle.loads(pickle.dumps(TouchOnUnpickle(tmp_path / "control")))  # the payload does work
    assert (tmp_path / "control").exists()
    samples = [synth_sample(i, size=32) for i in range(6)]
    for s in samples[:2]:
        s.update({"pyd": payload, "pkl": payload, "pth": payload})
    samples[2]["extra.npy"] = _object_npy(TouchOnUnpickle(marker))
    (tmp_path / "d").mkdir()
    write_tar(tmp_path / "d" / "shard-000000.tar", samples)
    write_manifest(tmp_path / "d")
    batches, stream = _epoch(cfg(shards=str(tmp_path / "d"), batch_size=2))
    assert not marker.exists()
    stats = stream.stats()
    assert stats["rejected_unsafe_member"] == 6  # three members on each of two samples
    assert stats["corrupt_array"] == 1  # the object .npy needs pickle: refused, sample skipped
    assert sorted(valid_keys(batches)) == sorted(s["__key__"] for i, s in enumerate(samples) if i != 2)


def _bad_dataset(directory: pathlib.Path) -> dict[str, str]:
    """Two shards with one bad sample of each kind and a truncated tail; returns key -> fate."""
    directory.mkdir()
    good = [synth_sample(i, size=32, image_format="jpg") for i in range(16)]
    fate = {s["__key__"]: "ok" for s in good}
    good[1]["jpg"] = good[1]["jpg"][: len(good[1]["jpg"]) // 2]
    fate[good[1]["__key__"]] = "corrupt_image"
    good[3]["txt"] = b"   "
    fate[good[3]["__key__"]] = "empty_caption"
    del good[5]["txt"]
    good[5]["json"] = json.dumps({"note": "no caption here"}).encode()
    fate[good[5]["__key__"]] = "missing_caption"
    good[6]["json"] = b"{not json"
    fate[good[6]["__key__"]] = "corrupt_json"
    write_tar(directory / "shard-000000.tar", good[:8])
    write_tar(directory / "shard-000001.tar", good[8:])
    write_manifest(directory)  # the manifest of the intact shard ...
    tar = directory / "shard-000001.tar"
    data = tar.read_bytes()
    cut = data.index(b"000000013.jpg") + 700  # ... then it is cut inside sample 13's image data
    tar.write_bytes(data[:cut])
    for i in (13, 14, 15):
        fate[f"{i:09d}"] = "truncated_tar"
    return fate


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_the_stream_goes_on(tmp_path, cfg, caplog, workers):
    fate = _bad_dataset(tmp_path / "bad")
    batches, stream = _epoch(cfg(shards=str(tmp_path / "bad"), batch_size=4, num_workers=workers,
                                 error_budget=0.6))
    assert len(batches) == 4  # the planned count: bad samples leave invalid holes, not fewer batches
    assert sorted(valid_keys(batches)) == sorted(k for k, f in fate.items() if f == "ok")
    stats = stream.stats()
    expected = Counter(f for f in fate.values() if f != "ok")
    assert {r: stats[r] for r in expected} == dict(expected)
    assert stats["read"] == 16
    if workers == 0:  # worker processes log to their own stderr
        assert "000000001" in caplog.text and "shard-000000.tar" in caplog.text


def test_error_budget_stops_the_run_with_a_clear_message(tmp_path, cfg):
    fate = _bad_dataset(tmp_path / "bad")
    assert sum(f != "ok" for f in fate.values()) / len(fate) > 0.2
    with pytest.raises(DataError, match="error_budget"):
        _epoch(cfg(shards=str(tmp_path / "bad"), batch_size=4, error_budget=0.2, min_errors_before_budget=8))


def test_error_budget_also_stops_worker_processes(tmp_path, cfg):
    _bad_dataset(tmp_path / "bad")
    with pytest.raises(Exception, match="error_budget"):
        _epoch(cfg(shards=str(tmp_path / "bad"), batch_size=4, num_workers=2, error_budget=0.0,
                   min_errors_before_budget=1))
