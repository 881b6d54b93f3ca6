"""Data faults through the real trainer on 2 ranks: uneven shards never hang or unbalance the
ranks, bad samples are skipped, counted by reason and logged with shard and key, a run past
the error budget stops with a clear message, and pickled members never run."""
from __future__ import annotations

import json
import pickle
from collections import Counter

import pytest

from tests.data.data_helpers import TouchOnUnpickle, make_shards, write_manifest, write_tar
from tests.trainer.harness import assert_ok, base, metrics, rank_exit_codes, run_train, step_keys
from data_pipeline.synth import synth_sample

pytestmark = pytest.mark.slow


def test_three_uneven_shards_over_two_ranks_give_equal_batch_counts(reference_run):
    keys = step_keys(reference_run)  # 40 + 30 + 26 samples
    assert sorted(keys) == [0, 1]
    assert [len(steps) for steps in keys.values()] == [12, 12]
    assert all(len(k) == 4 for steps in keys.values() for k in steps.values())


def test_one_shard_over_two_ranks_and_two_workers_each(tmp_path):
    shards = make_shards(tmp_path / "one", sizes=(24,), size=16)
    out = tmp_path / "run"
    assert_ok(run_train(2, base(shards, out, "stage.steps=6", "checkpoint.every=6", "data.num_workers=2",
                                "log.sample_keys=true"), timeout=240))
    keys = step_keys(out)
    assert [sorted(steps) for steps in keys.values()] == [list(range(1, 7))] * 2
    for epoch in (range(1, 4), range(4, 7)):  # 24 samples = 3 steps of 2 x 4
        seen = [k for steps in keys.values() for s in epoch for k in steps[s]]
        assert len(seen) == len(set(seen)) == 24


def test_too_few_samples_for_a_full_batch_is_refused_at_start(tmp_path):
    shards = make_shards(tmp_path / "tiny", sizes=(6,), size=16)
    proc = run_train(2, base(shards, tmp_path / "run", "data.drop_last=true"))
    assert rank_exit_codes(proc) == {5}, proc.stderr[-3000:]
    assert "6 samples make no full step (2 ranks x 1 batches of 4)" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """24 samples in 2 shards: one of each kind of damage, pickles in two good samples, and a
    second shard cut inside sample 9. Returns (dir, marker, expected key -> reason)."""
    root = tmp_path_factory.mktemp("hostile")
    directory, marker = root / "shards", root / "EXECUTED"
    directory.mkdir()
    payload = pickle.dumps(TouchOnUnpickle(root / "control"))
    pickle.loads(payload)
    assert (root / "control").exists()  # the payload does write its marker when unpickled
    payload = pickle.dumps(TouchOnUnpickle(marker))
    first = [synth_sample(i, size=16, image_format="jpg") for i in range(12)]
    fate = {}
    first[1]["jpg"] = b""
    first[2]["jpg"] = first[2]["jpg"][: len(first[2]["jpg"]) // 2]
    first[3]["txt"] = b"  "
    del first[4]["txt"]
    first[4]["json"] = json.dumps({"note": "no caption"}).encode()
    del first[5]["jpg"]
    first[5]["mp4"] = b"\x00\x00\x00\x18ftypmp42" + bytes(200)
    first[6]["__key__"] = first[0]["__key__"]  # a key the shard already used
    for s in first[7:9]:
        s.update(pyd=payload, pkl=payload, pth=payload)
    for i, reason in ((1, "corrupt_image"), (2, "corrupt_image"), (3, "empty_caption"),
                      (4, "missing_caption"), (5, "corrupt_video")):
        fate[first[i]["__key__"]] = reason
    fate["#6"] = "duplicate_key"  # logged by position: its key names another sample
    write_tar(directory / "shard-000000.tar", first)
    second = [synth_sample(i, size=16, image_format="jpg") for i in range(12, 24)]
    write_tar(directory / "shard-000001.tar", second)
    write_manifest(directory)
    tar = directory / "shard-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: data.index(b"000000021.jpg") + 700])  # cut inside sample 21's image
    return directory, marker, fate


@pytest.fixture(scope="module")
def hostile_run(hostile, tmp_path_factory):
    directory = hostile[0]
    out = tmp_path_factory.mktemp("hostile_run") / "run"
    proc = run_train(2, base(directory, out, "stage.steps=3", "checkpoint.every=3", "data.error_budget=0.5",
                             "data.min_errors_before_budget=4"))
    return out, proc


def test_bad_samples_are_skipped_counted_by_reason_and_logged(hostile, hostile_run):
    directory, _, fate = hostile
    out, proc = hostile_run
    assert_ok(proc)
    output = proc.stdout + proc.stderr
    for key, reason in fate.items():
        assert f"skipped sample '{key}' of {directory / 'shard-000000.tar'}: {reason}" in output
    assert "key '000000000' of sample #6 already named sample #0" in output
    assert f"of {directory / 'shard-000001.tar'}: truncated_tar" in output
    expected = Counter(fate.values()) + Counter(truncated_tar=3)
    last = [r for r in metrics(out) if "data/read" in r][-1]
    assert {reason: last[f"data/{reason}"] for reason in expected} == dict(expected)
    assert last["data/read"] == 24


def test_pickled_members_never_run(hostile, hostile_run):
    _, marker, _ = hostile
    out, proc = hostile_run
    assert_ok(proc)
    assert not marker.exists()
    last = [r for r in metrics(out) if "data/read" in r][-1]
    assert last["data/rejected_unsafe_member"] == 6  # pyd, pkl and pth of two samples


def test_past_the_error_budget_the_run_stops_with_a_clear_message(hostile, tmp_path):
    directory = hostile[0]
    proc = run_train(2, base(directory, tmp_path / "run", "stage.steps=3", "data.error_budget=0.1",
                             "data.min_errors_before_budget=4"))
    assert 5 in rank_exit_codes(proc), proc.stderr[-3000:]
    assert "more than data.error_budget=0.1" in proc.stderr
    assert "dit data inspect" in proc.stderr
