"""Writers never destroy or hide data already there: precompute/write outputs, manifests."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.manifest import load_manifest, resolve_source, scan_manifest
from data_pipeline.precompute import precompute, toy_encoder
from launch.cli import main
from tests.data.data_helpers import dataset_keys, make_shards, write_manifest


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_precompute_into_its_own_source_is_refused_and_touches_nothing(tmp_path, shards, capsys):
    src = tmp_path / "src"
    shutil.copytree(shards, src)
    before = _digests(src)
    assert main(["data", "precompute", str(src), "--out", str(src), "--resolution", "32"]) == 1
    assert "is the source directory" in capsys.readouterr().err
    assert _digests(src) == before


def test_precompute_into_a_directory_holding_shards_is_refused(tmp_path, shards, capsys):
    out = make_shards(tmp_path / "other", (2,))
    before = _digests(out)
    assert main(["data", "precompute", str(shards), "--out", str(out), "--resolution", "32"]) == 1
    assert "already holds" in capsys.readouterr().err
    assert _digests(out) == before


def test_precompute_that_encodes_nothing_exits_1(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "shard-000000.tar").write_bytes(b"\0" * 10240)  # an empty tar: no sample
    write_manifest(src)
    assert main(["data", "precompute", str(src), "--out", str(tmp_path / "lat"), "--resolution", "32"]) == 1
    assert "no sample was encoded" in capsys.readouterr().err


def test_precompute_keeps_shards_of_the_same_name_in_different_folders_apart(tmp_path):
    from trainer.heldout import pixel_source

    src = tmp_path / "src"
    make_shards(src / "a", (3,))
    make_shards(src / "b", (5,), start=100)
    scan_manifest(sorted(str(p) for p in src.rglob("*.tar"))).write()  # a/shard-000000.tar, b/shard-000000.tar
    lat = tmp_path / "lat"
    m = precompute(str(src), str(lat), toy_encoder(), DataConfig(resolution=32), progress=False)
    assert [(s.name, s.samples) for s in m.shards] == [("a/shard-000000.tar", 3), ("b/shard-000000.tar", 5)]
    assert {p.relative_to(lat).as_posix() for p in lat.rglob("*.tar")} == {"a/shard-000000.tar", "b/shard-000000.tar"}
    assert dataset_keys(lat / "a") == dataset_keys(src / "a") and dataset_keys(lat / "b") == dataset_keys(src / "b")
    assert pixel_source(str(lat)) == str(src)


def test_write_with_another_prefix_into_a_written_directory_is_refused(tmp_path, capsys):
    out = make_shards(tmp_path / "out", (5,))
    manifest = (out / "manifest.json").read_text()
    assert main(["data", "synth", "--out", str(out), "--num", "2", "--size", "16", "--prefix", "more"]) == 1
    assert "already holds" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == manifest and not list(out.glob("more-*"))
    assert [s.samples for s in resolve_source(str(out)).shards] == [5]


def test_write_next_to_a_lone_manifest_is_refused(tmp_path):
    from data_pipeline.write import write_shards

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(DataError, match="manifest.json"):
        write_shards([], str(out), 10)
    assert load_manifest(str(out)).shards == []


def test_write_manifest_keeps_what_precompute_recorded(tmp_path, shards, capsys):
    lat = tmp_path / "lat"
    precompute(str(shards), str(lat), toy_encoder(), DataConfig(resolution=32), progress=False)
    before = load_manifest(str(lat))
    assert main(["data", "inspect", str(lat), "--write-manifest"]) == 0
    after = load_manifest(str(lat))
    assert (after.kind, after.created_by, after.extra) == ("latent", "dit data precompute", before.extra)
    assert [(s.name, s.samples, s.sha256, s.offsets) for s in after.shards] == [
        (s.name, s.samples, s.sha256, s.offsets) for s in before.shards]


def test_write_manifest_of_a_url_pattern_naming_part_of_a_directory_is_refused(shards, capsys):
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in sorted(shards.glob("*.tar"))[:3]:
        fs.put_file(str(p), f"/hd-outputs/ds/{p.name}")
    assert main(["data", "inspect", "memory://hd-outputs/ds", "--write-manifest"]) == 0
    whole = fs.cat_file("/hd-outputs/ds/manifest.json")
    assert main(["data", "inspect", "memory://hd-outputs/ds/shard-00000{0..1}.tar", "--write-manifest"]) == 1
    assert "names 2 of the 3 shards" in capsys.readouterr().err
    assert fs.cat_file("/hd-outputs/ds/manifest.json") == whole
    assert resolve_source("memory://hd-outputs/ds").num_samples == 3 + 9 + 5


def test_write_manifest_of_a_local_pattern_is_taken_as_a_url_pattern_is(tmp_path, capsys):
    """A local brace/glob pattern (the help offers one) was taken for a directory: "no shards to
    scan". Like a URL pattern it now writes the manifest into its shards' directory when it names
    them all, and is refused, writing nothing, when it names only some; a pipe: command's output
    has no folder for a manifest, which is refused as a usage error (exit 2)."""
    d = make_shards(tmp_path / "d", (2, 1, 3))
    (d / "manifest.json").unlink()
    assert main(["data", "inspect", str(d / "shard-00000{0..1}.tar"), "--write-manifest"]) == 1
    assert "names 2 of the 3 shards" in capsys.readouterr().err
    assert not (d / "manifest.json").exists()
    assert main(["data", "inspect", str(d / "shard-*.tar"), "--write-manifest"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(d / "shard-*.tar"), "--verify"]) == 0  # against the manifest written
    assert "all 3 shards match" in capsys.readouterr().out
    written = load_manifest(str(d))
    assert [(s.name, s.samples, len(s.sha256)) for s in written.shards] == [
        ("shard-000000.tar", 2, 64), ("shard-000001.tar", 1, 64), ("shard-000002.tar", 3, 64)]
    assert main(["data", "inspect", f"pipe:cat {d}/shard-000000.tar", "--write-manifest"]) == 2
    assert "a pipe: command's output has none" in capsys.readouterr().err
