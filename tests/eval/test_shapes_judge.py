"""The shapes judge: prompt parsing, >= 98% on real held-out data read through the data
pipeline (PNG images, MP4 videos), near chance on noise, and low on mismatched prompts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.synth import caption, sample_attributes
from trainer.heldout import heldout_set
from trainer.judge import Mention, chance_levels, judge, noise_like, parse_prompt


@pytest.fixture(scope="module")
def real_images(tmp_path_factory) -> tuple[torch.Tensor, list[str]]:
    data = DataConfig(shards="unused", resolution=32, num_workers=0)
    return heldout_set(data, 160, workdir=tmp_path_factory.mktemp("judge_images"))


@pytest.fixture(scope="module")
def real_videos(tmp_path_factory) -> tuple[torch.Tensor, list[str]]:
    data = DataConfig(shards="unused", kind="video", resolution=32, num_frames=8, num_workers=0)
    return heldout_set(data, 40, workdir=tmp_path_factory.mktemp("judge_videos"))


def test_parse_prompt_recovers_synth_attributes():
    for i in range(200):
        attrs = sample_attributes(np.random.default_rng([3, i]), video=i % 4 == 0)
        mentions = parse_prompt(caption(attrs))
        expected = []
        for s in attrs["shapes"]:
            fields = {k: s[k] for k in ("shape", "color", "size")}
            fields.update({"direction": s["direction"]} if "direction" in s else {"position": s["position"]})
            expected.append(Mention(**fields))
        assert mentions == expected, caption(attrs)


def test_parse_prompt_accepts_free_wording():
    assert parse_prompt("A large green triangle at the center") == [Mention("triangle", "green", "large", "centre")]
    assert parse_prompt("a red circle") == [Mention("circle", "red")]
    assert parse_prompt("a photo of a cat") == []


def test_judge_reads_real_images(real_images):
    pixels, captions = real_images
    assert pixels.shape[1:] == (3, 32, 32)
    report = judge(pixels, captions)
    assert set(report.accuracy) == {"color", "shape", "size", "position", "count", "overall"}
    assert min(report.accuracy.values()) == 1.0, report.format()  # PNG is lossless: every attribute exact
    lo, _ = report.interval("overall")
    assert lo > 0.97, report.format(intervals=True)


def test_judge_reads_real_mp4_videos(real_videos):
    pixels, captions = real_videos
    assert pixels.shape[1:] == (3, 8, 32, 32)
    report = judge(pixels, captions)
    assert {"color", "shape", "size", "direction", "overall"} <= set(report.accuracy)
    assert min(report.accuracy.values()) >= 0.98, report.format()


@pytest.mark.parametrize("kind", ["images", "videos"])
def test_judge_is_near_chance_on_noise(kind, real_images, real_videos):
    pixels, captions = real_images if kind == "images" else real_videos
    report = judge(noise_like(pixels, torch.Generator().manual_seed(0)), captions)
    chance = chance_levels()
    assert report.accuracy["overall"] <= 0.05, report.format()
    for key, value in report.accuracy.items():
        if key in chance:
            assert value <= chance[key] + 0.2, (key, report.format())


def test_judge_rejects_mismatched_prompts(real_images):
    pixels, captions = real_images
    shuffled = captions[1:] + captions[:1]
    assert judge(pixels, shuffled).accuracy["overall"] <= 0.05


def test_judge_leaves_shape_out_at_16px(tmp_path):
    pixels, captions = heldout_set(DataConfig(shards="unused", resolution=16, num_workers=0), 48, workdir=tmp_path)
    report = judge(pixels, captions)
    assert "shape" not in report.accuracy and "16 px" in report.note
    assert report.accuracy["overall"] >= 0.98, report.format()


@pytest.mark.parametrize("fps", [4, 16])
def test_heldout_clips_are_full_length_at_a_target_fps(tmp_path, fps):
    """The held-out videos are made long enough for a whole clip at data.fps (4 fps of the
    synthetic 8 fps videos takes every other frame: 11 source frames for 6)."""
    data = DataConfig(shards="unused", kind="video", resolution=16, num_frames=6, num_workers=0, fps=fps)
    pixels, captions = heldout_set(data, 3, workdir=tmp_path)
    assert tuple(pixels.shape) == (3, 3, 6, 16, 16) and len(captions) == 3
