"""Shard writing, manifests, inspection, and compatibility with webdataset, tar, img2dataset."""
from __future__ import annotations

import io
import json
import subprocess
import tarfile

import av
import numpy as np
import PIL.Image
import pytest
import webdataset as wds

from data_pipeline.config import DataConfig
from data_pipeline.decode import open_image
from data_pipeline.errors import DataError, SkipSample
from data_pipeline.inspect_shards import format_report, inspect_shards
from data_pipeline.manifest import file_digest, load_manifest
from data_pipeline.stream import build_stream
from data_pipeline.synth import synth_sample, synth_samples
from data_pipeline.transforms import TransformSpec, image_pixels
from data_pipeline.write import InputReport, folder_samples, jsonl_samples, write_shards
from tests.data.data_helpers import take, valid_keys, write_manifest, write_tar


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_shards(synth_samples(23, seed=1, size=32), str(out), shard_size=10, progress=False)
    return out


def test_synth_shards_have_a_manifest_with_counts_and_checksums(synth_dir):
    m = load_manifest(str(synth_dir))
    assert [s.samples for s in m.shards] == [10, 10, 3] and m.kind == "image"
    for info, path in zip(m.shards, m.paths()):
        assert file_digest(path) == (info.bytes, info.sha256)


def test_synth_shards_are_read_by_plain_webdataset_and_tar(synth_dir):
    urls = sorted(str(p) for p in synth_dir.glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 23
    assert samples[0]["png"].size == (32, 32) and isinstance(samples[0]["txt"], str)
    assert json.loads(json.dumps(samples[0]["json"]))["caption"] == samples[0]["txt"]
    listing = subprocess.run(["tar", "-tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == ["000000000.json", "000000000.png", "000000000.txt"]


def test_writing_is_deterministic(tmp_path):
    for name in ("a", "b"):
        write_shards(synth_samples(5, seed=2, size=16), str(tmp_path / name), 3, progress=False)
    assert [s.sha256 for s in load_manifest(str(tmp_path / "a")).shards] == \
           [s.sha256 for s in load_manifest(str(tmp_path / "b")).shards]


def _jpeg(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_an_img2dataset_shard_is_read_unchanged(tmp_path, cfg):
    """img2dataset's layout: 00000.jpg, 00000.txt, 00000.json (+ .parquet/_stats.json beside),
    written by tarfile with pax headers; no manifest.json."""
    d = tmp_path / "img2dataset"
    d.mkdir()
    with tarfile.open(d / "00000.tar", "w") as tar:
        for i in range(7):
            key = f"{i:05d}"
            meta = {"url": f"http://x/{i}.jpg", "key": key, "status": "success", "caption": f"photo {i}",
                    "width": 40, "height": 30, "original_width": 400, "original_height": 300}
            for ext, data in (("jpg", _jpeg((i * 30, 0, 0))), ("txt", f"photo {i}".encode()),
                              ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1.7e9 + 0.5  # float mtime: a pax header per member
                tar.addfile(info, io.BytesIO(data))
    (d / "00000_stats.json").write_text("{}")
    stream = build_stream(cfg(shards=str(d), batch_size=7), 0, 1)
    batch = take(stream, 1)[0]
    assert sorted(valid_keys([batch])) == [f"{i:05d}" for i in range(7)]
    assert batch["image"].shape == (7, 3, 32, 32)
    assert {j["status"] for j in batch["json"]} == {"success"}


def test_write_from_a_folder_with_sidecar_captions(tmp_path, cfg):
    src = tmp_path / "src" / "sub"
    src.mkdir(parents=True)
    for i in range(4):
        (src / f"img.{i}.jpg").write_bytes(_jpeg((0, 60 * i, 0)))
        (src / f"img.{i}.txt").write_text(f"green {i}\n")
    (src / "orphan.jpg").write_bytes(_jpeg((1, 2, 3)))  # no caption: skipped and reported
    (src / "img.0.json").write_text(json.dumps({"license": "cc0"}))
    (src / "IMG_7.HEIC").write_bytes(b"\0\0\0\x18ftypheic")  # captioned, a type the loader cannot read: reported
    (src / "IMG_7.txt").write_text("an iPhone photo\n")
    (src / "README.md").write_text("not an input\n")  # no caption: not an input at all
    report = InputReport()
    m = write_shards(folder_samples(str(tmp_path / "src"), report), str(tmp_path / "out"), 3, progress=False)
    assert m.num_samples == 4 and report.skipped["missing caption"] == 1
    (unsupported,) = [r for r in report.skipped if r.startswith("unsupported type")]
    assert unsupported.startswith("unsupported type .heic (convert to ") and report.skipped[unsupported] == 1
    assert sum(report.skipped.values()) == 2
    samples = list(wds.WebDataset(m.paths(), shardshuffle=False))
    keys = [s["__key__"] for s in samples]
    assert keys[0] == "sub_img_0" and all("." not in k for k in keys)
    meta = json.loads(samples[0]["json"])
    assert meta["caption"] == "green 0" and meta["license"] == "cc0" and meta["width"] == 40
    stream = build_stream(cfg(shards=str(tmp_path / "out"), batch_size=2), 0, 1)
    assert len(valid_keys(take(stream, 2))) == 4


def test_write_from_jsonl(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg((200, 0, 0)))
    (tmp_path / "b.png").write_bytes(_jpeg((0, 0, 200)))  # wrong suffix: PIL sniffs, still an image
    lines = [{"path": "a.jpg", "caption": "red"}, {"path": str(tmp_path / "missing.jpg"), "caption": "x"},
             {"path": "b.png", "caption": "blue", "key": "bee"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    report = InputReport()
    m = write_shards(jsonl_samples(str(tmp_path / "list.jsonl"), report), str(tmp_path / "out"), 10, progress=False)
    assert m.num_samples == 2 and report.skipped["unreadable media"] == 1
    assert [s["__key__"] for s in wds.WebDataset(m.paths(), shardshuffle=False)] == ["000000000", "bee"]
    (tmp_path / "bad.jsonl").write_text('{"caption": "no path"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        list(jsonl_samples(str(tmp_path / "bad.jsonl"), InputReport()))


def test_inspect_counts_and_verify_finds_bad_shards(tmp_path):
    d = tmp_path / "d"
    write_shards(synth_samples(12, size=32), str(d), 5, progress=False)
    report = inspect_shards(str(d), verify=True, progress=False)
    text = format_report(report)
    assert "samples:     12" in text and "32x32 (12)" in text and not report.bad_shards
    assert "words min" in text and "all 3 shards match" in text
    shard = d / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    (d / "shard-000002.tar").write_bytes(b"")
    report = inspect_shards(str(d), verify=True, progress=False)
    assert set(report.bad_shards) == {"shard-000001.tar", "shard-000002.tar"}
    assert "BAD" in format_report(report)


def test_inspect_reads_captions_by_the_loaders_rule(tmp_path):
    """Captions kept only in the json (`{"caption": ...}`) were reported missing, and text the
    loader skips as not UTF-8 was counted as a caption: inspect takes each sample's caption as
    the loader does and counts the samples it would skip, by reason."""
    samples = [synth_sample(i, size=16) for i in range(10)]  # txt and json both hold the caption
    for s in samples[:6]:
        del s["txt"]
    samples[6]["txt"], samples[7]["txt"] = b"  ", b"caf\xe9"
    del samples[8]["txt"], samples[8]["json"]
    (tmp_path / "d").mkdir()
    write_tar(tmp_path / "d" / "shard-000000.tar", samples)
    write_manifest(tmp_path / "d")
    report = inspect_shards(str(tmp_path / "d"), progress=False)
    assert len(report.caption_words) == 7
    assert dict(report.caption_skips) == {"empty_caption": 1, "corrupt_text": 1, "missing_caption": 1}
    assert "skipped by the loader: corrupt_text 1, empty_caption 1, missing_caption 1" in format_report(report)


def test_video_shards_inspect(tmp_path):
    d = tmp_path / "v"
    write_shards(synth_samples(3, size=32, video=True, num_frames=5), str(d), 10, progress=False)
    report = inspect_shards(str(d), progress=False)
    assert report.manifest.kind == "video" and report.frames == [5, 5, 5]
    assert report.resolutions["32x32"] == 3


def test_phone_media_are_written_and_loaded_avif_and_mov(tmp_path, cfg):
    """What phones and modern sites store: an AVIF photo (turned by its orientation, which
    Pillow reads from AVIF's own rotation box) and a QuickTime .mov clip."""
    photos, clips = tmp_path / "photos", tmp_path / "clips"
    photos.mkdir()
    clips.mkdir()
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.new("RGB", (48, 32), (200, 30, 30)).save(photos / "a.avif", exif=exif.tobytes())
    (photos / "a.txt").write_text("a red photo")
    with av.open(str(clips / "b.mov"), "w", format="mov") as container:  # QuickTime, as phones write
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(5):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8))))
        container.mux(stream.encode())
    (clips / "b.txt").write_text("a clip")
    m = write_shards(folder_samples(str(photos), InputReport()), str(tmp_path / "p"), 4, progress=False)
    assert m.kind == "image" and m.num_samples == 1
    sample = next(iter(wds.WebDataset(m.paths(), shardshuffle=False)))
    assert "avif" in sample and json.loads(sample["json"])["width"] == 32  # upright: 32 wide, 48 tall
    batch = take(build_stream(cfg(shards=str(tmp_path / "p"), batch_size=1, aspect_buckets=[2 / 3, 1.5]), 0, 1), 1)[0]
    assert batch["image"].shape[2] > batch["image"].shape[3]  # (B, 3, H, W): portrait
    assert abs(batch["image"][0, 0].float().mean().item() - 200) < 8  # AVIF is lossy
    m = write_shards(folder_samples(str(clips), InputReport()), str(tmp_path / "c"), 4, progress=False)
    assert m.kind == "video" and m.num_samples == 1
    batch = take(build_stream(cfg(shards=str(tmp_path / "c"), kind="video", num_frames=4, batch_size=1), 0, 1), 1)[0]
    assert batch["video"].shape[:3] == (1, 3, 4) and valid_keys([batch]) == ["b"]


def test_a_damaged_avif_is_skipped_not_raised():
    """libavif reports damaged data as RuntimeError, which would have ended a loader worker
    (and the run): a sample whose AVIF payload is zeros is skipped as corrupt_image."""
    buf = io.BytesIO()
    PIL.Image.new("RGB", (48, 32), (0, 90, 200)).save(buf, format="AVIF")
    data = buf.getvalue()
    payload = data.index(b"mdat") + 4
    spec = TransformSpec.from_config(DataConfig(shards="unused", resolution=32))
    with pytest.raises(SkipSample) as e:
        image_pixels(open_image(data[:payload] + bytes(len(data) - payload)), spec, (0.5, 0.5, 0.0))
    assert e.value.reason == "corrupt_image" and "color planes" in e.value.detail
