"""`dit data write` inputs that cannot be trained on are skipped and counted, never written."""
from __future__ import annotations

import io
import json

import PIL.Image
import webdataset as wds

from data_pipeline.write import InputReport, folder_samples, jsonl_samples, write_shards


def _png(size: int = 16) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (size, size), (200, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def _written(samples, out) -> list[dict]:
    m = write_shards(samples, str(out), 10, progress=False)
    return list(wds.WebDataset(m.paths(), shardshuffle=False)) if m.shards else []


def test_a_decompression_bomb_is_skipped_and_the_write_goes_on(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_big.png").write_bytes(_png(64))  # 4096 px: over twice the lowered limit
    (src / "b_small.png").write_bytes(_png(16))
    for name in ("a_big", "b_small"):
        (src / f"{name}.txt").write_text("a red square")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    report = InputReport()
    samples = _written(folder_samples(str(src), report), tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["b_small"] and report.skipped["unreadable media"] == 1


def test_captions_that_are_not_text_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    rows = [{"path": "a.png", "caption": None}, {"path": "a.png", "caption": ["red", "dog"]},
            {"path": "a.png", "caption": 7}, {"path": "a.png", "caption": "a red square", "key": "ok"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = InputReport()
    samples = _written(jsonl_samples(str(tmp_path / "list.jsonl"), report), tmp_path / "out")
    assert [(s["__key__"], s["txt"]) for s in samples] == [("ok", b"a red square")]
    assert report.skipped["caption not a string"] == 3


def test_folder_captions_not_in_utf8_are_skipped_and_sidecar_json_keeps_the_caption(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("latin", "plain"):
        (src / f"{name}.png").write_bytes(_png())
    (src / "latin.txt").write_bytes("un caf\xe9 noir".encode("latin-1"))
    (src / "plain.txt").write_text("green square")
    (src / "plain.json").write_text(json.dumps({"caption": "a BLUE circle", "license": "cc0"}))
    report = InputReport()
    samples = _written(folder_samples(str(src), report), tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["plain"] and report.skipped["caption not UTF-8"] == 1
    meta = json.loads(samples[0]["json"])
    assert (meta["caption"], meta["license"], samples[0]["txt"]) == ("green square", "cc0", b"green square")
