"""The tar reader of local shards: memory-mapped, samples located before their bytes are read,
and the byte index that lets a worker jump to its own samples."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from data_pipeline.errors import SkipSample
from data_pipeline.manifest import load_manifest
from data_pipeline.stream import build_stream
from data_pipeline.synth import synth_sample
from data_pipeline.tar_reader import LazySample, RawSample, TarShard, _unsigned_sum, byte_index, sample_offsets
from tests.data.data_helpers import dataset_keys, take, valid_keys, write_manifest, write_tar


def _shard(directory, samples) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "shard-000000.tar"
    write_tar(path, samples)
    return str(path)


def test_a_lazy_local_sample_reads_its_bytes_on_load_also_after_the_shard_is_closed(tmp_path):
    path = _shard(tmp_path / "d", [synth_sample(i, size=32) for i in range(5)])
    eager = TarShard(path).read(3)
    shard = TarShard(path)
    lazy = shard.read(3, lazy=True)
    shard.close()
    assert isinstance(lazy, LazySample) and lazy.key == eager.key
    assert lazy.load().members == eager.members
    piped = TarShard(f"pipe:cat {path}").read(3, lazy=True)  # a remote source is read at once
    assert isinstance(piped, RawSample) and piped.members == eager.members


def test_the_byte_index_is_left_out_where_a_key_repeats(tmp_path):
    samples = [synth_sample(i, size=32) for i in range(5)]
    path = _shard(tmp_path / "d", samples)
    assert byte_index(path) == (5, sample_offsets(path))
    repeat = dict(samples[4], __key__=samples[1]["__key__"])
    path = _shard(tmp_path / "dup", samples[:4] + [repeat])
    assert byte_index(path) == (5, [])


def test_with_the_byte_index_a_read_jumps_over_the_headers_before_it(tmp_path):
    path = _shard(tmp_path / "d", [synth_sample(i, size=32) for i in range(5)])
    offsets = sample_offsets(path)
    data = bytearray(open(path, "rb").read())
    data[offsets[1]] ^= 0xFF  # sample 1's header no longer matches its checksum
    open(path, "wb").write(bytes(data))
    assert TarShard(path, offsets).read(3).key == f"{3:09d}"
    with pytest.raises(SkipSample, match="checksum"):
        TarShard(path).read(3)  # walking there parses sample 1's header


@pytest.mark.parametrize("workers", [0, 2])
def test_a_repeated_key_is_skipped_and_every_other_sample_served_once(tmp_path, cfg, workers):
    samples = [synth_sample(i, size=32, image_format="jpg") for i in range(12)]
    samples[10] = dict(samples[10], __key__=samples[8]["__key__"])
    _shard(tmp_path / "dup", samples[:7])
    write_tar(tmp_path / "dup" / "shard-000001.tar", samples[7:])
    write_manifest(tmp_path / "dup")
    assert [len(s.offsets) for s in load_manifest(str(tmp_path / "dup")).shards] == [7, 0]  # walked, not jumped
    stream = build_stream(cfg(shards=str(tmp_path / "dup"), batch_size=4, num_workers=workers,
                              shuffle_buffer=8, error_budget=0.5), 0, 1)
    batches = take(stream, stream.batches_per_epoch)
    assert stream.stats()["duplicate_key"] == 1 and stream.stats()["read"] == 12
    assert sorted(valid_keys(batches)) == sorted(dataset_keys(tmp_path / "dup"))  # 11 keys, each once


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_without_a_byte_index_serves_the_same_samples(tmp_path, shards, cfg, workers):
    """Manifests written before the index (or without it) are read by walking the headers."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for s in manifest["shards"]:
        s.pop("offsets", None)
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in shards.glob("*.tar"):
        (plain / p.name).write_bytes(p.read_bytes())
    (plain / "manifest.json").write_text(json.dumps(manifest))
    assert all(not s.offsets for s in load_manifest(str(plain)).shards)

    def epoch(directory) -> list[str]:
        stream = build_stream(cfg(shards=str(directory), num_workers=workers), 0, 1)
        return [k for b in take(stream, stream.batches_per_epoch) for k in b["__key__"]]

    assert epoch(plain) == epoch(shards)


def test_the_header_checksum_is_tarfiles():
    """`_unsigned_sum` (Adler-32 over three pieces) against tarfile's own checksum, on random
    headers and on the largest byte sums a header can have."""
    rng = np.random.default_rng(0)
    headers = [rng.integers(0, 256, 512, dtype=np.uint8).tobytes() for _ in range(200)]
    headers += [b"\xff" * 512, bytes(512), b"\x80" * 512]
    for hdr in headers:
        assert _unsigned_sum(hdr) == tarfile.calc_chksums(hdr)[0]


@pytest.mark.timeout(20)  # the record of length 0 looped forever: a hung worker, a hung `dit data inspect`
@pytest.mark.parametrize("record", [b"0 a=b\n", b"1 a=b\n", b"99 a=b\n", b"-3 a=b\n"])
def test_a_pax_record_of_an_impossible_length_is_a_corrupt_tar(tmp_path, record):
    """A pax record's length counts the whole record, its digits included: 0, one that ends
    inside its own digits, or one past the header's data is a corrupt shard (skipped and
    counted), for the reader and for the walk that counts and indexes a shard's samples."""
    sample = synth_sample(0, size=16)
    pax = tarfile.TarInfo("PaxHeader/x")
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    data = pax.tobuf(format=tarfile.USTAR_FORMAT) + record + bytes(-len(record) % 512)
    for ext, value in sample.items():
        if ext != "__key__":
            info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
            info.size = len(value)
            data += info.tobuf(format=tarfile.USTAR_FORMAT) + value + bytes(-len(value) % 512)
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(data + bytes(1024))
    with pytest.raises(SkipSample) as skipped:
        list(TarShard(str(path)))
    assert skipped.value.reason == "corrupt_tar"
    assert byte_index(str(path)) == (0, [])
