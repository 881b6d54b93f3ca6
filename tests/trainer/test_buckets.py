"""Multi-resolution, multi-aspect buckets in training and sampling: the SNR shift of each batch's
shape, the DiT on non-square grids, `dit sample --height --width [--frames]`. The real 2-rank
`dit train` over two pixel areas x three aspects that resumes on exactly the planned samples is a
cell of the support matrix (tests/trainer/test_support_matrix.py, `check_buckets`)."""
from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch

from launch.cli import main as dit
from tests.eval.eval_helpers import tiny_config, write_cascade, write_checkpoint
from trainer.config import ConfigError, DiffusionConfig, validate
from trainer.diffusion import make_schedule, schedule_for_shape, shape_size
from trainer.models.layers import sincos_table

BUCKETS = [(3, 24, 8), (3, 16, 16), (3, 8, 24), (3, 48, 24), (3, 32, 32), (3, 24, 48)]  # (C, h, w)
SHIFT = DiffusionConfig(shift_base_resolution=16, shift_base_frames=1)


# ---- the SNR shift of a batch shape ----------------------------------------------------------

def test_shift_follows_each_bucket_as_the_formula_says():
    """lambda'(t) = lambda(t) - 2 log(sqrt(h w) / 16) - log(F / 1): pixel count over the base's."""
    plain = make_schedule(DiffusionConfig())
    t = torch.linspace(0.05, 0.95, 7)
    shifts = {}
    for shape in [*BUCKETS, (3, 4, 16, 16), (3, 2, 24, 48)]:
        frames = shape[1] if len(shape) == 4 else 1
        expected = -math.log(shape[-2] * shape[-1] / 16**2) - math.log(frames)
        schedule = schedule_for_shape(SHIFT, shape)
        assert schedule.logsnr_shift == pytest.approx(expected, abs=1e-12)
        assert torch.allclose(schedule.log_snr(t) - plain.log_snr(t), torch.full_like(t, expected), atol=1e-5)
        shifts[shape] = schedule.logsnr_shift
    assert shifts[(3, 16, 16)] == 0.0 and shifts[(3, 24, 8)] == shifts[(3, 8, 24)] > 0  # smaller area: less noise
    assert shifts[(3, 48, 24)] < shifts[(3, 32, 32)] < 0 and len({round(v, 9) for v in shifts.values()}) == 5
    assert shifts[(3, 4, 16, 16)] == pytest.approx(shifts[(3, 32, 32)])  # as many pixels: the same shift
    assert shape_size((3, 32, 32)) == (32.0, 1) and shape_size((3, 4, 24, 48)) == (math.sqrt(1152), 4)
    # a square shape reads the same schedule as the single configured resolution did
    assert schedule_for_shape(SHIFT, (3, 32, 32)).logsnr_shift == make_schedule(SHIFT, 32, 1).logsnr_shift


def test_stage_noises_each_batch_with_its_own_shape_shift(tmp_path):
    from trainer.stages import build_stage

    stage = build_stage(tiny_config(tmp_path, "diffusion.shift_base_resolution=16"))
    for shape in [(3, 16, 16), (3, 24, 48), (3, 8, 24)]:
        x0 = torch.zeros(4, *shape)
        t, _, alpha, sigma, _ = stage.noised(x0, torch.Generator().manual_seed(1))
        want = schedule_for_shape(stage.diffusion, shape).alpha_sigma(t)
        assert torch.equal(alpha, want[0]) and torch.equal(sigma, want[1])
        if shape != (3, 16, 16):
            assert not torch.allclose(alpha, stage.schedule.alpha_sigma(t)[0])  # not the configured square's
    assert stage.sample_shape(8, 24) == (3, 8, 24) and stage.sample_shape() == (3, 16, 16)
    with pytest.raises(ValueError, match="height 9 px"):
        stage.sample_shape(9, 16)


# ---- the DiT on non-square grids -------------------------------------------------------------

def test_positions_are_the_token_coordinates_of_any_grid():
    """The sin-cos table is a fixed function of (frame, row, col): a token at (r, c) of a 4 x 12
    grid gets the row (r, c) of a 12 x 12 grid (no interpolation, no parameters per grid)."""
    wide, square, tall = (sincos_table(g, 64, torch.device("cpu"), torch.float64) for g in
                          [(1, 4, 12), (1, 12, 12), (1, 12, 4)])
    as_square = square.view(12, 12, 64)
    assert torch.equal(wide.view(4, 12, 64), as_square[:4]) and torch.equal(tall.view(12, 4, 64), as_square[:, :4])
    assert not torch.equal(wide, tall.view(12, 4, 64).transpose(0, 1).reshape(48, 64))  # rows and cols differ


def test_one_dit_runs_on_every_bucket_and_loads_strictly(tmp_path):
    from trainer.models.text import TextEmbedding
    from trainer.stages import build_stage

    stage = build_stage(tiny_config(tmp_path))
    net = stage.players["student"]
    g = torch.Generator().manual_seed(0)
    for p in net.parameters():  # leave the zero init so outputs depend on the input
        p.data.add_(0.05 * torch.randn(p.shape, generator=g))
    text = TextEmbedding(torch.randn(2, 16, stage.text.dim), torch.ones(2, 16, dtype=torch.bool),
                         torch.randn(2, stage.text.pooled_dim))
    outs = {}
    for shape in BUCKETS:
        x = torch.randn(2, *shape, generator=g)
        outs[shape] = net(x, torch.full((2,), 0.5), text)
        assert outs[shape].shape == x.shape and torch.isfinite(outs[shape]).all()
    twin = stage.sampling_net(net.state_dict())  # strict load: no parameter depends on the grid
    x = torch.randn(2, 3, 8, 24, generator=g)
    assert torch.allclose(twin(x, torch.full((2,), 0.5), text), net(x, torch.full((2,), 0.5), text), atol=1e-6)


# ---- dit sample at a non-square shape --------------------------------------------------------

def test_dit_sample_height_width_uses_the_shift_of_that_shape(tmp_path, capsys):
    from trainer.cascade import Cascade, SampleSize
    from trainer.sampling import SamplerSettings, generate

    checkpoint = write_checkpoint(tiny_config(tmp_path / "base", "diffusion.shift_base_resolution=16"))
    out = tmp_path / "samples"
    assert dit(["sample", str(checkpoint), "--prompt", "a red circle", "--steps", "2", "--height", "8",
                "--width", "24", "--out", str(out)]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert (record["height"], record["width"]) == (8, 24)
    image = np.asarray(PIL.Image.open(out / record["files"][0]))
    assert image.shape == (8, 24, 3)
    # the same pixels as sampling that shape by hand with the schedule shifted for (8, 24)
    cascade = Cascade.load(checkpoint, SamplerSettings(steps=2))
    loaded = cascade.stages[0]
    ours = cascade.sample(["a red circle"], torch.Generator().manual_seed(0), SampleSize(8, 24))
    shifted = schedule_for_shape(loaded.cfg.diffusion, (3, 8, 24))
    assert shifted.logsnr_shift == pytest.approx(-math.log(8 * 24 / 256))
    x0 = generate(loaded.net, loaded.stage.text, shifted, "v", ["a red circle"], (3, 8, 24), loaded.settings,
                  torch.Generator().manual_seed(0))
    assert torch.equal(ours, loaded.stage.decode(x0).clamp(-1, 1))
    assert dit(["sample", str(checkpoint), "--prompt", "x", "--height", "9", "--out", str(tmp_path / "bad")]) == 2
    assert "height 9 px" in capsys.readouterr().err


def test_cascade_keeps_the_aspect_through_super_resolution(tmp_path):
    recipe = write_cascade(tmp_path)
    out = tmp_path / "samples"
    assert dit(["sample", str(recipe), "--prompt", "a red circle", "--steps", "2", "--height", "8",
                "--width", "24", "--out", str(out)]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert PIL.Image.open(out / record["files"][0]).size == (48, 16)  # (w, h): 16 -> 32 px doubles both


def test_video_samples_at_frames_height_width(tmp_path):
    import av

    checkpoint = write_checkpoint(tiny_config(tmp_path / "video", "model.video=true", "data.kind=video",
                                              "data.num_frames=4", "diffusion.shift_base_frames=4"))
    out = tmp_path / "samples"
    assert dit(["sample", str(checkpoint), "--prompt", "a red circle moving left", "--steps", "2", "--frames", "2",
                "--height", "16", "--width", "32", "--out", str(out)]) == 0
    with av.open(str(out / "00000.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24", threads=1) for f in container.decode(video=0)]
    assert len(frames) == 2 and frames[0].shape == (16, 32, 3)


def test_a_clip_length_that_does_not_patchify_in_time_is_refused_before_sampling(tmp_path, capsys):
    """3 frames into temporal patches of 2: refused naming --frames (it crashed mid-sampling)."""
    checkpoint = write_checkpoint(tiny_config(tmp_path / "video", "model.video=true", "data.kind=video",
                                              "data.num_frames=4", "model.temporal_patch=2"))
    assert dit(["sample", str(checkpoint), "--prompt", "x", "--steps", "2", "--frames", "3",
                "--out", str(tmp_path / "s")]) == 2
    assert ("3 frames are 3 latent frames, not a multiple of the DiT's model.temporal_patch=2 (--frames)"
            in capsys.readouterr().err)
    assert dit(["sample", str(checkpoint), "--prompt", "x", "--steps", "2", "--frames", "4",
                "--out", str(tmp_path / "s")]) == 0


def test_bad_bucket_combinations_fail_naming_the_key(tmp_path):
    for overrides in (["data.resolutions=[16,32]", "stage.kind=progressive", "stage.teacher=/x"],
                      ["data.resolutions=[16,32]", "deepspeed.pipeline_stages=2", "deepspeed.zero_stage=1"],
                      ["data.resolutions=[8,32]"]):  # data.resolution=16 is not among them
        with pytest.raises(ConfigError, match="data.resolutions"):
            validate(tiny_config(tmp_path, *overrides))


def test_a_superres_preview_is_sampled_at_its_own_bucket(tmp_path):
    """The sample grid of a superres run super-resolves the preview batch, whichever bucket the
    loader gave first (here clips of 2 frames at 2:1): it was sampled at the configured square and
    data.num_frames, its low-resolution input stretched to that without a word."""
    from data_pipeline.stream import batch_to_device
    from trainer.stages import build_stage

    cfg = tiny_config(tmp_path, "stage.kind=superres", "model.superres=true", "data.sr_resolution=32",
                      "model.video=true", "data.kind=video", "data.num_frames=4", "data.frame_buckets=[2]",
                      "log.sample_steps=1")
    stage = build_stage(cfg)
    g = torch.Generator().manual_seed(0)
    stage.preview = batch_to_device({"caption": ["a red circle", "a blue square"],
                                     "video": torch.randint(0, 256, (2, 3, 2, 32, 64), dtype=torch.uint8, generator=g),
                                     "video_lr": torch.randint(0, 256, (2, 3, 2, 16, 32), dtype=torch.uint8,
                                                               generator=g),
                                     "valid": torch.ones(2, dtype=torch.bool)}, torch.device("cpu"))
    sampled, sample_pixels = [], stage.bundle.sample_pixels

    def recorded(*args, **kwargs):
        sampled.append(sample_pixels(*args, **kwargs))
        return sampled[-1]

    stage.bundle.sample_pixels = recorded
    assert stage.write_samples(None, cfg.log, tmp_path / "grid.png").is_file()
    assert [tuple(x.shape) for x in sampled] == [(2, 3, 2, 32, 64)]  # (n, 3, F, H, W) of the preview's clips
