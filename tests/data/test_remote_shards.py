"""Shards read from object storage and HTTP through fsspec, and from `pipe:` commands.

A real S3 server (moto's threaded server) and a ranged HTTP file server run on 127.0.0.1;
an HTTP proxy in front of moto counts the bytes served and injects 5xx answers."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from tests.data.data_helpers import dataset_keys, make_shards, take, valid_keys
from tests.data.remote_servers import ALWAYS, file_server, proxy

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.manifest import load_manifest, resolve_source, scan_manifest
from data_pipeline.remote import RemoteOptions, forget_filesystems, redact
from data_pipeline.stream import Stream
from data_pipeline.tar_reader import ShardReader, TarShard, sample_offsets
from launch.cli import main as dit

KEY_ID = "AKIDREMOTESHARDS0TEST"
SECRET = "remote-shards-secret-7f3a9c"
SIZES = (3, 9, 5, 7, 4)
NAMES = [f"shard-{n:06d}.tar" for n in range(len(SIZES))]
FAST = dict(remote_retries=3, remote_backoff=0.01)


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("remote-src"), SIZES)


@pytest.fixture(scope="module")
def s3(local):
    """moto's S3 server behind a counting proxy; shards uploaded to s3://laion/shards/ (no
    manifest); credentials and endpoint in the environment only, as in production."""
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    front = proxy(host, port)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": front.url, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
        client.create_bucket(Bucket="laion")
        for name in NAMES:
            client.upload_file(str(local / name), "laion", f"shards/{name}")
        forget_filesystems()  # made after the environment points at the proxy
        yield front, client
        forget_filesystems()
    front.stop()
    moto.stop()


@pytest.fixture(scope="module")
def s3_manifest(s3):
    """`dit data inspect s3://laion/shards --write-manifest` (counts, sha256, byte index)."""
    assert dit(["data", "inspect", "s3://laion/shards", "--write-manifest", "--max-samples", "4"]) == 0
    return load_manifest("s3://laion/shards")


def config(shards: str, **kw) -> DataConfig:
    base = DataConfig(shards=shards, resolution=32, batch_size=4, num_workers=0, shuffle_buffer=4, **FAST)
    return dataclasses.replace(base, **kw)


def epoch_keys(cfg: DataConfig) -> tuple[list[str], dict]:
    stream = Stream(cfg, 0, 1)
    keys = valid_keys(take(stream, stream.batches_per_epoch))
    return keys, stream.stats()


def test_inspect_writes_manifest_with_byte_index(s3, s3_manifest, local):
    front, client = s3
    assert [s.name for s in s3_manifest.shards] == NAMES
    assert [s.samples for s in s3_manifest.shards] == list(SIZES)
    local_manifest = load_manifest(str(local))
    assert [s.sha256 for s in s3_manifest.shards] == [s.sha256 for s in local_manifest.shards]
    for info, name in zip(s3_manifest.shards, NAMES):
        assert info.offsets == sample_offsets(str(local / name)) and info.offsets[0] == 0
    text = client.get_object(Bucket="laion", Key="shards/manifest.json")["Body"].read().decode()
    assert KEY_ID not in text and SECRET not in text and json.loads(text)["num_samples"] == sum(SIZES)
    assert dit(["data", "inspect", "s3://laion/shards", "--verify", "--max-samples", "0"]) == 0


@pytest.mark.parametrize("spec", ["s3://laion/shards", "s3://laion/shards/shard-{000000..000004}.tar"])
def test_s3_epoch_is_exactly_once(s3, s3_manifest, local, spec):
    """Two forked workers read the S3 shards: every sample once (directory and brace pattern)."""
    keys, stats = epoch_keys(config(spec, num_workers=2))
    assert sorted(keys) == sorted(dataset_keys(local))
    assert stats["read"] >= sum(SIZES) and stats["unreadable_shard"] == 0
    assert resolve_source(spec).offsets() == [s.offsets for s in s3_manifest.shards]


def test_byte_index_reads_only_the_sample(s3, s3_manifest, local):
    """Reading the last sample of a shard fetches its bytes (one ranged read) and nothing before."""
    front, _ = s3
    info = s3_manifest.shards[1]
    path = "/laion/shards/" + info.name
    start = info.offsets[-1]
    served, requests = [], []
    for offsets, expect_from in ((info.offsets, start), (None, 0)):
        front.recorder.reset()
        shard = TarShard("s3://laion/shards/" + info.name, offsets, RemoteOptions(block_size=1024))
        sample = shard.read(info.samples - 1)
        shard.close()
        assert sample.key == sorted(dataset_keys(local))[3 + info.samples - 1]
        ranges = front.recorder.ranges[path]
        assert min(r[0] for r in ranges) == expect_from
        served.append(front.recorder.bytes[path])
        requests.append(len(ranges))
    # with the index: the sample's bytes plus at most one read-ahead block; without it every
    # earlier header was visited (a ranged read each, as the samples exceed the block size)
    assert served[0] <= info.bytes - start + 1024
    assert requests[1] >= info.samples + requests[0] - 1 and served[1] > served[0]


def test_resumed_stream_reads_only_its_byte_ranges(s3, s3_manifest, local):
    """Half an epoch, then a fresh stream from the state: exactly-once across the two, and every
    ranged read of the resumed stream starts inside a sample it was planned to read (or at the
    header that ends one): no shard is read from its start."""
    front, _ = s3
    cfg = config("s3://laion/shards", remote_block_size=1024, shuffle_buffer=1)
    first = Stream(cfg, 0, 1)
    half = first.batches_per_epoch // 2
    before = valid_keys(take(first, half))
    state = first.state_dict()
    front.recorder.reset()
    second = Stream(cfg, 0, 1, state)
    after = valid_keys(take(second, second.batches_per_epoch - half))
    assert sorted(before + after) == sorted(dataset_keys(local))
    key_to_sample = {}
    index = iter(sorted(dataset_keys(local)))
    for n, size in enumerate(SIZES):
        for i in range(size):
            key_to_sample[next(index)] = (n, i)
    spans: dict[str, list[tuple[int, int]]] = {}
    for key in after:
        n, i = key_to_sample[key]
        offs = s3_manifest.shards[n].offsets + [s3_manifest.shards[n].bytes]
        spans.setdefault("/laion/shards/" + NAMES[n], []).append((offs[i], offs[i + 1]))
    for path, ranges in front.recorder.ranges.items():
        if not path.endswith(".tar"):
            continue
        for start, _ in ranges:
            assert any(lo <= start <= hi for lo, hi in spans.get(path, [])), (path, start, spans.get(path))
    total = sum(s.bytes for s in s3_manifest.shards)
    assert 0 < front.recorder.total() < 0.8 * total


def test_transient_failures_are_retried(s3, s3_manifest, local, caplog):
    front, _ = s3
    front.recorder.reset()
    front.recorder.fail["/laion/shards/" + NAMES[1]] = 2
    front.recorder.fail["/laion/shards/" + NAMES[3]] = 3
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        keys, stats = epoch_keys(config("s3://laion/shards"))
    assert sorted(keys) == sorted(dataset_keys(local)) and stats["unreadable_shard"] == 0
    assert front.recorder.failed["/laion/shards/" + NAMES[1]] == 2
    assert front.recorder.failed["/laion/shards/" + NAMES[3]] == 3
    assert "retry 3 of 3" in caplog.text
    assert SECRET not in caplog.text and KEY_ID not in caplog.text


def test_always_failing_shard_is_skipped_and_counted(s3, s3_manifest, local):
    front, _ = s3
    front.recorder.reset()
    bad = "/laion/shards/" + NAMES[1]
    front.recorder.fail[bad] = ALWAYS
    keys, stats = epoch_keys(config("s3://laion/shards", error_budget=0.5, shuffle_buffer=100))
    lost = sorted(dataset_keys(local))[3:3 + SIZES[1]]
    assert sorted(keys) == sorted(set(dataset_keys(local)) - set(lost))
    assert stats["unreadable_shard"] == SIZES[1]
    # 4 attempts for the first sample; the shard is then given up (no further requests)
    assert front.recorder.failed[bad] == 4
    front.recorder.fail[bad] = ALWAYS
    with pytest.raises(DataError, match="unreadable_shard=.*error_budget=0.1"):
        epoch_keys(config("s3://laion/shards", error_budget=0.1, min_errors_before_budget=1, shuffle_buffer=100))
    # where other processes read the same batches (pipeline stages, a sequence group), this
    # process alone skipping the shard would pair different samples: the stream stops instead
    front.recorder.fail[bad] = ALWAYS
    stream = Stream(config("s3://laion/shards", error_budget=0.5, shuffle_buffer=100), 0, 1, skip_unreadable=False)
    with pytest.raises(DataError, match=f"{NAMES[1]}.*not skipped: other ranks read the same samples"):
        take(stream, stream.batches_per_epoch)
    front.recorder.reset()


@pytest.fixture(scope="module")
def http(local, tmp_path_factory):
    """The shards on a local ranged HTTP server, with a manifest (byte index) written next to
    them by scanning their URLs (plain HTTP cannot list or be written to)."""
    root = tmp_path_factory.mktemp("http")
    for sub in ("shards", "web"):
        shutil.copytree(local, root / sub)
    server = file_server(root)
    manifest = scan_manifest([f"{server.url}/shards/{n}" for n in NAMES], checksums=True)
    assert manifest.root == f"{server.url}/shards"
    body = json.dumps(manifest.to_json())
    (root / "web" / "manifest.json").write_text(body)
    yield server
    server.stop()


def test_http_source_with_failures(http, local):
    """An HTTP directory URL with manifest.json: exactly-once, a failing shard retried, one
    that always fails skipped and counted."""
    http.recorder.reset()
    http.recorder.fail["/web/" + NAMES[0]] = 2
    keys, stats = epoch_keys(config(http.url + "/web", remote_block_size=2048))
    assert sorted(keys) == sorted(dataset_keys(local)) and http.recorder.failed["/web/" + NAMES[0]] == 2
    assert load_manifest(http.url + "/web").shards[2].offsets == sample_offsets(str(local / NAMES[2]))
    http.recorder.reset()
    http.recorder.fail["/web/" + NAMES[4]] = ALWAYS
    keys, stats = epoch_keys(config(http.url + "/web", error_budget=0.5, shuffle_buffer=100))
    assert stats["unreadable_shard"] == SIZES[4] and len(keys) == sum(SIZES) - SIZES[4]
    http.recorder.reset()


def test_pipe_source_is_read_forward(local):
    """`pipe:cat ...{a..b}.tar`: one command per shard, read forward only."""
    spec = f"pipe:cat {local}/shard-{{000000..000004}}.tar"
    m = resolve_source(spec)
    assert [s.samples for s in m.shards] == list(SIZES) and m.root == ""
    keys, stats = epoch_keys(config(spec, num_workers=2))
    assert sorted(keys) == sorted(dataset_keys(local))
    shard = TarShard(f"pipe:cat {local}/{NAMES[1]}")
    assert [shard.read(i).key for i in (5, 1)] == [sorted(dataset_keys(local))[3 + i] for i in (5, 1)]
    shard.close()


def test_failing_pipe_is_retried_then_skipped(local, tmp_path):
    shard = TarShard(f"pipe:cat {tmp_path}/absent.tar", options=RemoteOptions(retries=1, backoff=0.01))
    with pytest.raises(Exception, match="unreadable_shard"):
        shard.read(0)


def test_redact():
    assert redact("https://user:pw@host/x.tar?X-Amz-Signature=abc") == "https://host/x.tar?<redacted>"
    assert redact("s3://bucket/a.tar") == "s3://bucket/a.tar"


@pytest.mark.slow
def test_two_ranks_train_on_s3_killed_and_resumed_exactly_once(s3, shapes_shards, tmp_path):
    """`dit train` on 2 ranks reads its shards from S3 (manifest with byte index written by
    `dit data inspect URL --write-manifest`); rank 1 is SIGKILLed in step 3, the relaunch
    resumes from step 2 and the sample-key audit shows every sample of steps 1-4 once. No
    credential string lands in any file of the run."""
    from tests.trainer.harness import assert_ok, base, run_train, step_keys

    front, client = s3
    for tar in sorted(shapes_shards.glob("*.tar")):
        client.upload_file(str(tar), "laion", f"tiny/{tar.name}")
    assert dit(["data", "inspect", "s3://laion/tiny", "--write-manifest", "--max-samples", "0"]) == 0
    out = tmp_path / "run"
    args = base("s3://laion/tiny", out, "stage.steps=4", "checkpoint.every=2", "log.sample_keys=true",
                "data.num_workers=1", "data.shuffle_buffer=8", "data.remote_block_size=1024")
    t0 = time.monotonic()
    crashed = run_train(2, args, timeout=240, DIT_INJECT_KILL_AT="1@3")
    print(f"killed run: {time.monotonic() - t0:.1f} s")
    assert crashed.returncode != 0
    front.recorder.reset()
    t0 = time.monotonic()
    resumed = run_train(2, args, timeout=240)
    print(f"resumed run: {time.monotonic() - t0:.1f} s")
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    keys = step_keys(out)
    assert sorted(keys) == [0, 1] and all(sorted(steps) == list(range(1, 5)) for steps in keys.values())
    seen = [k for steps in keys.values() for s in sorted(steps) for k in steps[s]]
    assert len(seen) == len(set(seen)) == 32
    served = front.recorder.total()
    # the relaunch reads steps 3-4 and its prefetch: well under the 96 samples of the shards
    assert 0 < served < 0.6 * sum(t.stat().st_size for t in shapes_shards.glob("*.tar")), served
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert KEY_ID.encode() not in data and SECRET.encode() not in data, path
    for text in (crashed.stdout + crashed.stderr, resumed.stdout + resumed.stderr):
        assert KEY_ID not in text and SECRET not in text


def test_bench_loader_on_s3(s3, s3_manifest, capsys):
    front, _ = s3
    front.recorder.reset()
    assert dit(["bench", "loader", "--shards", "s3://laion/shards", "--workers", "1", "--main-workers", "1",
                "--repeats", "1", "--resolution", "32", "--batch-size", "4"]) == 0
    assert "loader/raw_decode = " in capsys.readouterr().out
    assert front.recorder.total() >= 2 * sum(s.bytes for s in s3_manifest.shards) * 0.9  # both sides read S3


def test_a_store_without_its_fsspec_package_is_a_data_error():
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(DataError, match=r"gs:// needs `pip install \.\[gcs\]`"):
        resolve_source("gs://bucket/laion")


def test_shard_cache_downloads_each_shard_once_atomically_within_its_limit(s3, s3_manifest, local, tmp_path):
    """Epoch 1 fills the cache (each shard downloaded whole, once), epoch 2 reads no byte from
    S3; a leftover temporary of a killed download is never read and is cleared; a shard that
    fails leaves no file; a small limit evicts the least recently used shards."""
    front, _ = s3
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / ".part-killed"
    stale.write_bytes(b"half a shard")
    os.utime(stale, (time.time() - 7200,) * 2)
    total = sum(s.bytes for s in s3_manifest.shards)
    cfg = config("s3://laion/shards", cache_dir=str(cache), cache_max_gb=10 * total / 1e9)
    front.recorder.reset()
    for epoch in range(2):
        keys, stats = epoch_keys(cfg)
        assert sorted(keys) == sorted(dataset_keys(local)) and stats["unreadable_shard"] == 0
        assert front.recorder.total() == total  # all in epoch 0, nothing more in epoch 1
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == len(NAMES) and all(f.endswith(tuple(NAMES)) for f in files)  # the stale part is gone
    for f in cache.iterdir():
        assert KEY_ID.encode() not in f.read_bytes() and SECRET.encode() not in f.read_bytes()
    front.recorder.fail["/laion/shards/" + NAMES[2]] = ALWAYS
    broken = config("s3://laion/shards", cache_dir=str(tmp_path / "c2"), error_budget=0.5, cache_max_gb=1.0)
    _, stats = epoch_keys(broken)
    assert stats["unreadable_shard"] == SIZES[2]
    assert not [p for p in (tmp_path / "c2").iterdir() if p.name.endswith(NAMES[2]) or p.name.startswith(".part")]
    front.recorder.reset()
    two = sorted(s.bytes for s in s3_manifest.shards)[-2:]
    small = config("s3://laion/shards", cache_dir=str(tmp_path / "c3"), cache_max_gb=sum(two) / 1e9)
    keys, _ = epoch_keys(small)
    assert sorted(keys) == sorted(dataset_keys(local))
    assert 0 < sum(p.stat().st_size for p in (tmp_path / "c3").iterdir()) <= sum(two)


def test_the_next_shard_is_opened_ahead_at_its_first_planned_sample(s3, s3_manifest):
    """Announced while shard 0 is read, shard 1 is fetched in the background from its planned
    sample on; the read then goes on from there: the same byte ranges as without read-ahead."""
    front, _ = s3
    urls, offsets, path = s3_manifest.paths(), s3_manifest.offsets(), "/laion/shards/" + NAMES[1]
    ranges = {}
    for readahead in (False, True):
        front.recorder.reset()
        reader = ShardReader(urls, offsets=offsets, options=RemoteOptions(block_size=1024, readahead=readahead))
        reader.read(0, 0)
        reader.prefetch(1, 4)
        if readahead:
            reader._ahead[1].result()  # the read-ahead thread's work is done before shard 1 is read
            assert [start for start, _ in front.recorder.ranges[path]] == [offsets[1][4]]
        else:
            assert path not in front.recorder.ranges
        assert reader.read(1, 4).key == f"{SIZES[0] + 4:09d}"
        ranges[readahead] = list(front.recorder.ranges[path])
        reader.close()
    assert ranges[True] == ranges[False]


def test_write_and_precompute_to_s3(s3, tmp_path, capsys):
    """`dit data synth|precompute --out s3://...`: shards uploaded with a manifest (byte index
    included) that the loader streams; no credential in any object written."""
    _, client = s3
    assert dit(["data", "synth", "--out", "s3://laion/synth", "--num", "12", "--shard-size", "5", "--size", "32"]) == 0
    manifest = load_manifest("s3://laion/synth")
    assert [s.samples for s in manifest.shards] == [5, 5, 2] and all(len(s.offsets) == s.samples for s in manifest.shards)
    keys, _ = epoch_keys(config("s3://laion/synth"))
    assert sorted(keys) == [f"{i:09d}" for i in range(12)]
    capsys.readouterr()
    assert dit(["data", "synth", "--out", "s3://laion/synth", "--num", "2", "--prefix", "more"]) == 1
    assert "already holds s3://laion/synth/manifest.json" in capsys.readouterr().err  # never next to existing data
    assert dit(["data", "precompute", "s3://laion/synth", "--out", "s3://laion/latents", "--resolution", "16",
                "--batch-size", "4"]) == 0
    latents = load_manifest("s3://laion/latents")
    assert latents.kind == "latent" and latents.num_samples == 12
    for prefix in ("synth/", "latents/"):
        for obj in client.list_objects_v2(Bucket="laion", Prefix=prefix)["Contents"]:
            body = client.get_object(Bucket="laion", Key=obj["Key"])["Body"].read()
            assert KEY_ID.encode() not in body and SECRET.encode() not in body, obj["Key"]
    assert not list(tmp_path.iterdir())  # nothing staged was left in the working area


def test_a_cache_without_room_fails_naming_the_key():
    with pytest.raises(ValueError, match=r"^data\.cache_max_gb"):
        Stream(DataConfig(shards="s3://laion/shards", cache_dir="/tmp/x", cache_max_gb=0), 0, 1)
