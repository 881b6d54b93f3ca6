"""The shard cache's names: one file per object, whatever the URL's signature."""
from __future__ import annotations

import os

import fsspec
import pytest

from data_pipeline.errors import DataError
from data_pipeline.remote import RemoteOptions
from data_pipeline.shard_cache import Recorded, cache_name, cached_copy
from data_pipeline.tar_reader import TarShard
from tests.data.data_helpers import make_shards


def test_objects_addressed_by_query_get_their_own_copies(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/hd-cache/get?id=0", b"shard zero")
    fs.pipe_file("/hd-cache/get?id=1", b"shard one, longer")
    with cached_copy("memory://hd-cache/get?id=0", str(tmp_path), 1 << 20) as zero, \
            cached_copy("memory://hd-cache/get?id=1", str(tmp_path), 1 << 20) as one:
        assert (zero.read(), one.read()) == (b"shard zero", b"shard one, longer")
    assert len(list(tmp_path.iterdir())) == 2


def test_a_download_counts_as_progress_block_by_block(tmp_path, monkeypatch):
    """A worker downloading a large shard into the cache waits on the store, not on a hung
    decoder: each block it copies is a step of progress on its mark, which the stall watch
    (workers.Watch) reads, so a long download is not taken for a stall."""
    import array

    from data_pipeline import progress, remote

    fsspec.filesystem("memory").pipe_file("/hd-progress/big.tar", bytes(40_000))
    monkeypatch.setattr(remote, "DOWNLOAD_BLOCK", 4096)
    mark = memoryview(array.array("q", [-1] * 4))
    progress.track(mark)
    try:
        with cached_copy("memory://hd-progress/big.tar", str(tmp_path), 1 << 20) as copy:
            assert len(copy.read()) == 40_000
    finally:
        progress.track(None)
    assert mark[progress.PROGRESS] == -1 + 10  # ceil(40000 / 4096) blocks


def test_the_read_ahead_threads_blocks_count_only_while_the_worker_waits_for_them():
    """A decoder hung in the worker's own thread is a stall even while the next shard downloads
    in the read-ahead thread; once the worker waits for that download, its blocks are progress."""
    import array
    import threading

    from data_pipeline import progress

    mark = memoryview(array.array("q", [-1] * 4))

    def in_another_thread():
        thread = threading.Thread(target=progress.step)
        thread.start()
        thread.join()

    progress.track(mark)
    try:
        in_another_thread()
        assert mark[progress.PROGRESS] == -1
        with progress.waiting():
            in_another_thread()
        assert mark[progress.PROGRESS] == 0
        in_another_thread()
        progress.step()
        assert mark[progress.PROGRESS] == 1
    finally:
        progress.track(None)


def test_a_large_member_read_from_a_pipe_counts_as_progress_block_by_block(tmp_path):
    """A member of many blocks arriving from a store or a pipe is read a remote_block_size at a
    time, each block a step of progress: a 64 KiB member read in 4 KiB blocks is at least 16."""
    import array
    import io
    import tarfile

    from data_pipeline import progress

    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.txt", b"a caption"), ("a.bin", os.urandom(64 << 10))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    mark = memoryview(array.array("q", [-1] * 4))
    progress.track(mark)
    try:
        (sample,) = TarShard(f"pipe:cat {path}", options=RemoteOptions(block_size=4096, readahead=False))
    finally:
        progress.track(None)
    assert len(sample.members["bin"]) == 64 << 10
    assert mark[progress.PROGRESS] + 1 >= 16 + 3  # the member's blocks, and at least the 3 headers' reads


def test_a_copy_is_handed_out_open_so_another_workers_eviction_cannot_take_it(tmp_path):
    """Two shards, room for one: each worker's download evicts the other's copy, whose reader,
    holding it open, reads it whole (a path handed out, then opened, failed once evicted)."""
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/hd-race/a.tar", b"a" * 1000)
    fs.pipe_file("/hd-race/b.tar", b"b" * 1000)
    with cached_copy("memory://hd-race/a.tar", str(tmp_path), 1500) as a:
        with cached_copy("memory://hd-race/b.tar", str(tmp_path), 1500) as b:  # evicts a's copy
            assert [p.name.endswith("b.tar") for p in tmp_path.iterdir()] == [True]
            assert (a.read(), b.read()) == (b"a" * 1000, b"b" * 1000)


def test_signing_parameters_and_credentials_are_no_part_of_the_name():
    plain = cache_name("https://host/data/shard-000000.tar")
    signed = [
        "https://host/data/shard-000000.tar?X-Amz-Signature=abc&X-Amz-Date=20260101T000000Z&X-Amz-Expires=60",
        "https://host/data/shard-000000.tar?Expires=1&Signature=xyz&Key-Pair-Id=K",
        "https://host/data/shard-000000.tar?sv=2022&se=2026&sig=SECRET&sp=r",
        "https://user:SECRET@host/data/shard-000000.tar?token=SECRET",
    ]
    assert {cache_name(u) for u in signed} == {plain}
    assert plain.endswith("-shard-000000.tar") and "SECRET" not in plain
    assert cache_name("https://host/data/shard-000000.tar?version=2&sig=a") != plain


def _keys(shard) -> list[str]:
    return [raw.key for raw in shard]


def test_a_shard_rewritten_at_its_url_is_fetched_again_by_the_manifests_size(tmp_path):
    """The cache holds v1; the manifest now records v2's size: v2 is read, not the stale copy.
    A store still serving another size than the manifest's is a DataError, cached or not."""
    fs = fsspec.filesystem("memory")
    url = "memory://hd-cache/ds/shard-000000.tar"
    local = make_shards(tmp_path / "v", (3, 9))  # 10240 and 30720 bytes
    v1, v2 = (local / "shard-000000.tar", local / "shard-000001.tar")
    options = RemoteOptions(cache_dir=str(tmp_path / "cache"), cache_max_bytes=1 << 30)
    fs.put_file(str(v1), "/hd-cache/ds/shard-000000.tar")
    assert _keys(TarShard(url, options=options, recorded=Recorded(v1.stat().st_size))) == _keys(TarShard(str(v1)))
    fs.put_file(str(v2), "/hd-cache/ds/shard-000000.tar")
    assert _keys(TarShard(url, options=options, recorded=Recorded(v2.stat().st_size))) == _keys(TarShard(str(v2)))
    with pytest.raises(DataError, match="manifest records 1"):
        _keys(TarShard(url, options=options, recorded=Recorded(1)))
    with pytest.raises(DataError, match="manifest records 1"):
        _keys(TarShard(url, recorded=Recorded(1)))


def test_a_cached_shard_rewritten_at_its_url_in_the_same_size_is_read_anew(tmp_path):
    """Tar pads to 10 KiB records, so a rewrite mostly keeps the shard's size: the cached copy
    of the old bytes was read (at the new manifest's offsets) because only the size was checked.
    The copy is named by the manifest's sha256 too, and a download that is not the manifest's
    digest is a DataError: the store serving other bytes than its manifest describes."""
    from data_pipeline.config import DataConfig
    from data_pipeline.stream import build_stream
    from tests.data.data_helpers import take

    fs = fsspec.filesystem("memory")
    v1, v2 = make_shards(tmp_path / "v1", (3,)), make_shards(tmp_path / "v2", (3,), seed=1)
    assert (v1 / "shard-000000.tar").stat().st_size == (v2 / "shard-000000.tar").stat().st_size
    cfg = DataConfig(shards="memory://hd-rewrite/ds", resolution=16, batch_size=3, num_workers=0,
                     cache_dir=str(tmp_path / "cache"))

    def captions() -> list[str]:
        return list(take(build_stream(cfg, 0, 1), 1)[0]["caption"])

    def upload(directory) -> None:
        for f in directory.iterdir():
            fs.put_file(str(f), f"/hd-rewrite/ds/{f.name}")

    upload(v1)
    first = captions()
    upload(v2)  # the shard and its manifest rewritten
    second = captions()
    assert second != first and sorted(second) == sorted(s["txt"].decode() for s in _samples(v2))
    fs.put_file(str(v1 / "shard-000000.tar"), "/hd-rewrite/ds/shard-000000.tar")  # v2's manifest, v1's bytes
    for copy in (tmp_path / "cache").iterdir():
        copy.unlink()
    with pytest.raises(DataError, match="has sha256 .* but its manifest records"):
        captions()


def _samples(directory) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(str(directory / "shard-000000.tar"), shardshuffle=False, empty_check=False))


def test_the_stream_refuses_a_remote_shard_rewritten_after_its_manifest(tmp_path):
    """The loader hands the manifests' sizes to its readers: a shard replaced at its URL by one
    of another size (its byte index and counts no longer describe it) stops the run."""
    from data_pipeline.config import DataConfig
    from data_pipeline.stream import build_stream
    from tests.data.data_helpers import take

    fs = fsspec.filesystem("memory")
    local = make_shards(tmp_path / "v", (3, 9))
    fs.put(str(local), "/hd-stream/ds", recursive=True)
    cfg = DataConfig(shards="memory://hd-stream/ds", resolution=16, batch_size=3, num_workers=0)
    assert len(take(build_stream(cfg, 0, 1), 1)) == 1
    fs.put_file(str(local / "shard-000001.tar"), "/hd-stream/ds/shard-000000.tar")  # another size, same name
    with pytest.raises(DataError, match="manifest records"):
        take(build_stream(cfg, 0, 1), 4)


def test_a_download_cut_short_by_a_server_without_content_length_is_not_cached(tmp_path):
    """A server that sends no Content-Length ends a body by closing the connection, so a
    connection lost midway reads as a whole shard; with no size from a manifest either, the
    copy must end as a tar archive ends (two zero blocks), else the download is an error and
    nothing is cached. Cut inside a block and cut on a block boundary; the whole shard is kept."""
    from tests.data.remote_servers import close_delimited_server

    local = make_shards(tmp_path / "ds", (6,))
    data = (local / "shard-000000.tar").read_bytes()
    first_member_end = 512 + 512 * -(-int(data[124:135], 8) // 512)  # header + data blocks of member 0
    cut = {"/ds/shard-000000.tar": 700}
    server = close_delimited_server(tmp_path, cut)
    cache = tmp_path / "cache"
    try:
        url = f"{server.url}/ds/shard-000000.tar"
        for at in (700, first_member_end):
            cut["/ds/shard-000000.tar"] = at
            with pytest.raises(OSError, match=f"ended at {at} bytes without a tar archive's end"):
                cached_copy(url, str(cache), 1 << 30)
            assert server.recorder.bytes["/ds/shard-000000.tar"] > 0 and list(cache.iterdir()) == []
            server.recorder.reset()
        del cut["/ds/shard-000000.tar"]
        with cached_copy(url, str(cache), 1 << 30) as copy:
            assert copy.read() == data
        assert _keys(TarShard(url, options=RemoteOptions(cache_dir=str(cache), cache_max_bytes=1 << 30))) == \
            _keys(TarShard(str(local / "shard-000000.tar")))
    finally:
        server.stop()


def test_a_shard_served_without_content_length_is_read_as_a_stream_and_a_cut_copy_is_retried(tmp_path):
    """Without data.cache_dir such a shard is read front to back (fsspec's stream cannot seek;
    its `fileno` failed, retried, and every sample was skipped as unreadable), a sample of the
    byte index jumped to forward and an earlier one read by downloading again. With the cache
    and a manifest size, a download cut short is a transient error to retry, not a shard
    "rewritten after its manifest"."""
    from data_pipeline.tar_reader import ShardReader, sample_offsets
    from tests.data.remote_servers import close_delimited_server

    local = make_shards(tmp_path / "ds", (6,))
    shard = local / "shard-000000.tar"
    size = shard.stat().st_size
    cut: dict[str, int] = {}
    server = close_delimited_server(tmp_path, cut)
    try:
        url = f"{server.url}/ds/shard-000000.tar"
        assert _keys(TarShard(url)) == _keys(TarShard(str(shard)))
        offsets = sample_offsets(str(shard))
        reader, keys = ShardReader([url], offsets=[offsets]), _keys(TarShard(str(shard)))
        assert [reader.read(0, i).key for i in (4, 1, 5)] == [keys[4], keys[1], keys[5]]
        reader.close()
        cut["/ds/shard-000000.tar"] = size // 2
        with pytest.raises(OSError, match=f"stopped at {size // 2} of the {size} bytes its manifest records"):
            cached_copy(url, str(tmp_path / "cache"), 1 << 30, Recorded(size))
    finally:
        server.stop()
