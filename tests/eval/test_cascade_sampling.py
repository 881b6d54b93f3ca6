"""`dit sample`: a cascade of a tiny base (16 px) and a tiny super-resolution model (16 -> 32 px)
samples end to end at the target size, writing PNGs, a grid and samples.json."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.cli import main as dit
from tests.eval.eval_helpers import tiny_config, write_cascade, write_checkpoint
from trainer.cascade import Cascade, SampleSize, load_cascade_spec
from trainer.config import ConfigError
from trainer.media import NonFinitePixels, image_grid, save_video_grid, to_uint8
from trainer.sampling import SamplerSettings

PROMPTS = ["a large red circle at the top left", "a small blue square in the centre"]


@pytest.fixture(scope="module")
def cascade_yaml(tmp_path_factory) -> Path:
    return write_cascade(tmp_path_factory.mktemp("cascade"), "    steps: 3\n    cfg: 1.5\n    noise_aug: 0.2\n")


def test_cascade_samples_at_target_size(cascade_yaml, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# two prompts\n" + "\n".join(PROMPTS) + "\n")
    out = tmp_path / "samples"
    assert dit(["sample", str(cascade_yaml), "--prompts-file", str(prompts_file), "--num-per-prompt", "2",
                        "--steps", "2", "--out", str(out)]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["prompts"] == [p for p in PROMPTS for _ in range(2)]
    assert [Image.open(out / f).size for f in record["files"]] == [(32, 32)] * 4
    assert (out / "grid.png").is_file()
    base, sr = record["stages"]
    assert (base["steps"], base["cfg_scale"]) == (2, 3.0) and (sr["steps"], sr["cfg_scale"]) == (3, 1.5)
    assert sr["noise_aug"] == 0.2 and "noise_aug" not in base  # the level the low-res input was noised at


def test_cascade_stages_are_checked(cascade_yaml):
    cascade = Cascade.load(cascade_yaml, SamplerSettings(steps=2))
    base, sr = cascade.stages
    assert sr.cfg.stage.noise_aug_sample == 0.2 and cascade.resolution == 32
    with pytest.raises(ValueError, match="super-resolution"):
        Cascade([sr])
    with pytest.raises(ValueError, match="not a super-resolution"):
        Cascade([base, base])


def test_a_cascade_noise_aug_is_validated_as_the_stage_setting_it_sets(cascade_yaml, tmp_path):
    """A recipe's `noise_aug` is the super-resolution stage's stage.noise_aug_sample and is held
    to the range that stage trained at (it was set after validation: 0.9, or 3.0, sampled a
    model trained up to 0.5); on a stage without it, it is refused, not ignored."""
    for level in (0.9, 3.0):
        recipe = write_cascade(tmp_path / f"at_{level}", f"    noise_aug: {level}\n")
        with pytest.raises(ConfigError, match=r"stage.noise_aug_sample.*noise_aug_max=0.5"):
            Cascade.load(recipe, SamplerSettings(steps=2))
    root, recipe = cascade_yaml.parent, tmp_path / "base_aug.yaml"
    recipe.write_text(f"stages:\n  - checkpoint: {root}/base/checkpoints\n    noise_aug: 0.3\n"
                      f"  - checkpoint: {root}/sr/checkpoints\n")
    with pytest.raises(ConfigError, match="the pretrain stage ignores it"):
        Cascade.load(recipe, SamplerSettings(steps=2))


def test_a_video_cascade_upsamples_the_base_clip_at_its_length(tmp_path):
    """`--frames` sets the base clip's length; a super-resolution stage upsamples that clip as it
    is (it took its own data.num_frames and stretched the base clip in time to it, silently). An
    image super-resolution model after a video base is refused when the cascade is built."""
    video = ("model.video=true", "data.kind=video", "data.num_frames=4")
    sr = ("stage.kind=superres", "model.superres=true", "data.sr_resolution=32")
    write_checkpoint(tiny_config(tmp_path / "base", *video))
    write_checkpoint(tiny_config(tmp_path / "sr", *video, *sr), seed=1)
    write_checkpoint(tiny_config(tmp_path / "sr_image", *sr), seed=2)
    recipe = tmp_path / "cascade.yaml"
    recipe.write_text("stages:\n  - checkpoint: base/checkpoints\n  - checkpoint: sr/checkpoints\n")
    cascade = Cascade.load(recipe, SamplerSettings(steps=2))
    for frames in (2, 4):
        out = cascade.sample(["a red circle"], torch.Generator().manual_seed(0), size=SampleSize(frames=frames))
        assert tuple(out.shape) == (1, 3, frames, 32, 32)
    recipe.write_text("stages:\n  - checkpoint: base/checkpoints\n  - checkpoint: sr_image/checkpoints\n")
    with pytest.raises(ValueError, match="image model after the video base model"):
        Cascade.load(recipe, SamplerSettings(steps=2))


def test_a_video_cascade_plays_at_its_base_models_rate(tmp_path):
    """The super-resolution stage keeps the base's frames, so the clip moves, and is saved, at
    the base's data.fps (it was saved at the last stage's: 2x slow after a 16 fps base and an
    8 fps super-resolution stage); a stage that learned from clips at another rate is refused."""
    video = ("model.video=true", "data.kind=video", "data.num_frames=4")
    sr = ("stage.kind=superres", "model.superres=true", "data.sr_resolution=32")
    write_checkpoint(tiny_config(tmp_path / "base", *video, "data.fps=16"))
    write_checkpoint(tiny_config(tmp_path / "sr", *video, *sr, "data.fps=16"), seed=1)
    write_checkpoint(tiny_config(tmp_path / "sr8", *video, *sr, "data.fps=8"), seed=2)
    recipe = tmp_path / "cascade.yaml"
    recipe.write_text("stages:\n  - checkpoint: base/checkpoints\n  - checkpoint: sr/checkpoints\n")
    assert Cascade.load(recipe, SamplerSettings(steps=2)).fps == 16
    recipe.write_text("stages:\n  - checkpoint: base/checkpoints\n  - checkpoint: sr8/checkpoints\n")
    with pytest.raises(ValueError, match="learned from clips at 8 fps and the base model makes them at 16 fps"):
        Cascade.load(recipe, SamplerSettings(steps=2))


def test_sizes_a_later_stage_cannot_take_are_refused_before_sampling(tmp_path, capsys):
    """A pixel base and a latent super-resolution stage (autoencoder factor 8, patch 2): at 20 px
    the base samples, but its output cannot be encoded whole for the second stage (the floored
    latent was stretched over the output, 25% off); at 18 px the second stage's 72 px do not
    patchify (it failed after the base had sampled, with a traceback). Both are refused first,
    naming the stage; `dit sample` says it in one line."""
    from tests.eval.eval_helpers import write_autoencoder

    ae = write_autoencoder(tmp_path / "ae8", channels=(32, 32, 32, 32))
    write_checkpoint(tiny_config(tmp_path / "base"))
    write_checkpoint(tiny_config(tmp_path / "sr", "stage.kind=superres", "model.superres=true", "data.sr_resolution=64",
                                 "model.autoencoder.kind=kl", f"model.autoencoder.path={ae}", "model.in_channels=4"),
                     seed=1)
    recipe = tmp_path / "cascade.yaml"
    recipe.write_text("stages:\n  - checkpoint: base/checkpoints\n  - checkpoint: sr/checkpoints\n")
    cascade = Cascade.load(recipe, SamplerSettings(steps=2))
    with pytest.raises(ValueError, match=r"^stage 2 .*low-resolution input's height, 20 px, is not a multiple of "
                                         r"its autoencoder's downsampling 8"):
        cascade.sample(["a red circle"], torch.Generator().manual_seed(0), size=SampleSize(20, 20))
    assert dit(["sample", str(recipe), "--prompt", "a red circle", "--height", "18", "--width", "18", "--steps", "2",
                "--out", str(tmp_path / "out")]) == 2  # an argument the cascade cannot take, as a bad key
    err = capsys.readouterr().err  # on a line of its own once the loading bar is cleared
    assert re.search(r"[\r\n]dit sample: stage 2 .*height 72 px is not a positive multiple of 16", err, re.M), err
    out = cascade.sample(["a red circle"], torch.Generator().manual_seed(0), size=SampleSize(24, 32))
    assert tuple(out.shape) == (1, 3, 96, 128)


def test_a_checkpoint_that_is_not_there_is_said_so(tmp_path, capsys):
    """A missing checkpoint (a cascade stage's, an export's source) was 'not a complete
    checkpoint (no COMPLETE.json)', as if a save had been cut short."""
    from trainer.cascade import resolve_checkpoint
    from trainer.checkpoint_format import CheckpointError, verify

    with pytest.raises(FileNotFoundError, match=r"/gone does not exist; pass a checkpoint root"):
        resolve_checkpoint(tmp_path / "gone")
    with pytest.raises(CheckpointError, match=r"/gone does not exist$"):
        verify(tmp_path / "gone")
    (tmp_path / "cut").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a complete checkpoint"):
        resolve_checkpoint(tmp_path / "cut")
    assert dit(["export", str(tmp_path / "gone"), "--out", str(tmp_path / "out")]) == 2
    assert "gone does not exist" in capsys.readouterr().err


def test_cascade_yaml_names_unknown_keys(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("stages:\n  - checkpoint: x\n    stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_cascade_spec(recipe)


def test_a_stage_overrides_only_where_its_weights_live(tmp_path):
    """A stage's `overrides` relocate the weights its config points at; any other key (the
    prediction, the schedule) sampled a v-prediction checkpoint as an x0 one with no word: it is
    refused when the recipe is read, naming the stage's key, as is an override without `=`."""
    recipe = tmp_path / "cascade.yaml"
    for overrides, why in (("[diffusion.prediction=x0, diffusion.schedule=cosine]",
                            r"'diffusion.prediction' cannot be overridden: .* trained with"),
                           ("[model.autoencoder.path]", "'model.autoencoder.path' is not key=value")):
        recipe.write_text(f"stages:\n  - checkpoint: base\n  - checkpoint: sr\n    overrides: {overrides}\n")
        with pytest.raises(ConfigError, match=re.escape(f"'{recipe}:stages[1].overrides': ") + why):
            load_cascade_spec(recipe)
    recipe.write_text(f"stages:\n  - checkpoint: base\n    overrides: [model.autoencoder.path={tmp_path}/ae, "
                      f"model.text.path={tmp_path}/text]\n")
    (stage,) = load_cascade_spec(recipe).stages
    assert stage.overrides == [f"model.autoencoder.path={tmp_path}/ae", f"model.text.path={tmp_path}/text"]


@pytest.mark.parametrize("fps, plays_at", [(0, 8), (12, 12)])
def test_video_model_writes_mp4_and_gif_grid(tmp_path, fps, plays_at):
    """Videos play at the rate the model's clips were sampled at (data.fps), 8 fps without one."""
    import av

    checkpoint = write_checkpoint(tiny_config(tmp_path / "video", "model.video=true", "data.kind=video",
                                              "data.num_frames=4", f"data.fps={fps}"))
    out = tmp_path / "samples"
    assert dit(["sample", str(checkpoint), "--prompt", "a large red circle moving left", "--steps", "2",
                        "--out", str(out)]) == 0
    with av.open(str(out / "00000.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24", threads=1) for f in container.decode(video=0)]
        assert container.streams.video[0].average_rate == plays_at
    assert len(frames) == 4 and frames[0].shape == (16, 16, 3)
    with Image.open(out / "grid.gif") as grid:
        assert grid.n_frames == 4 and abs(grid.info["duration"] - 1000 / plays_at) < 10  # GIF: 10 ms units


@pytest.mark.parametrize("fps", [8, 24])
def test_gif_grid_plays_at_its_frame_rate(tmp_path, fps):
    """GIF counts in 10 ms: frames of 125 ms (8 fps) or 41.7 ms (24 fps) each rounded to 120 or
    40 ms played the clip at 8.33 or 25 fps; rounded where each frame ends, the clip lasts F / fps."""
    frames = 12
    videos = torch.rand(2, 3, frames, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with Image.open(save_video_grid(videos, ["a", "b"], tmp_path / "grid.gif", fps)) as grid:
        shown = []
        for i in range(grid.n_frames):
            grid.seek(i)
            shown.append(grid.info["duration"])
    assert len(shown) == frames and abs(sum(shown) - 1000 * frames / fps) < 10


def test_grid_keeps_the_aspect_of_its_images():
    """A 16x32 px sample (`dit sample --height 16 --width 32`) is shown 128x64 in its grid cell,
    each pixel a 4x4 block; it was squeezed into 128x128."""
    image = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = np.asarray(image_grid(image, ["a wide one"], cell=128))
    block = np.kron(to_uint8(image)[0], np.ones((4, 4, 1), np.uint8))  # (64, 128, 3)
    assert np.array_equal(grid[2: 2 + 64, 2: 2 + 128], block)
    assert not np.array_equal(grid[2 + 64, 2: 2 + 128], block[-1])  # the caption block starts below


def test_distilled_student_samples_at_its_step_count(tmp_path):
    cfg = tiny_config(tmp_path / "student", "stage.kind=progressive", "stage.teacher=/unused", "stage.rounds=[2]",
                      "model.guidance_embed=true", "diffusion.loss_weighting=trunc_snr")
    cascade = Cascade.load(write_checkpoint(cfg), SamplerSettings())
    (student,) = cascade.stages
    assert student.distilled and student.settings.steps == 2 and student.net.spec.guidance
    assert cascade.sample(PROMPTS, torch.Generator().manual_seed(0)).shape == (2, 3, 16, 16)


def test_a_distilled_student_records_the_settings_it_sampled_with(tmp_path, capsys):
    """A student samples with DDIM and no CFG whatever --sampler and --guidance-rescale say:
    samples.json records that, and the command says those options did not apply."""
    cfg = tiny_config(tmp_path / "student", "stage.kind=progressive", "stage.teacher=/unused", "stage.rounds=[2]",
                      "model.guidance_embed=true", "diffusion.loss_weighting=trunc_snr")
    out = tmp_path / "samples"
    assert dit(["sample", str(write_checkpoint(cfg)), "--prompt", PROMPTS[0], "--sampler", "euler",
                "--guidance-rescale", "0.3", "--cfg", "2.0", "--out", str(out)]) == 0
    (stage,) = json.loads((out / "samples.json").read_text())["stages"]
    assert (stage["steps"], stage["sampler"], stage["guidance_rescale"], stage["cfg_scale"]) == (2, "ddim", 0.0, 2.0)
    said = capsys.readouterr().out
    assert "sampler euler and guidance rescale 0.3 asked for do not apply" in said
    assert "CFG scale" not in said  # its guidance input


def test_a_cfg_scale_a_student_without_guidance_input_ignores_is_said_so(tmp_path, capsys):
    """Without model.guidance_embed a student samples the guidance baked in when it was distilled,
    with no CFG: --cfg 1 and --cfg 7 gave the same images without a word; the scale asked for is
    noted as not applying (the default, not asked for, is not)."""
    cfg = tiny_config(tmp_path / "student", "stage.kind=progressive", "stage.teacher=/unused", "stage.rounds=[2]",
                      "stage.guidance_min=3", "stage.guidance_max=3", "diffusion.loss_weighting=trunc_snr")
    checkpoint = write_checkpoint(cfg)
    (student,) = Cascade.load(checkpoint, SamplerSettings(cfg_scale=7.0, sampler="euler")).stages
    assert student.settings.cfg_scale == 1.0
    assert "so the sampler euler and CFG scale 7.0 asked for do not apply" in capsys.readouterr().out
    Cascade.load(checkpoint, SamplerSettings())
    assert "do not apply" not in capsys.readouterr().out


def test_sampling_precision_is_the_runs_on_an_accelerator_or_as_asked(tmp_path):
    """`--precision auto`: the stage's deepspeed.precision on an accelerator, fp32 on the CPU;
    asked for, it holds on any device. bf16 sampling runs the DiT under autocast: its samples
    differ from fp32's by rounding only, and samples.json records the precision per stage."""
    from trainer.cascade import sampling_precision

    assert sampling_precision("auto", "bf16", torch.device("cpu")) == "fp32"
    assert sampling_precision("auto", "bf16", torch.device("cuda")) == "bf16"
    assert sampling_precision("bf16", "fp32", torch.device("cpu")) == "bf16"
    checkpoint = write_checkpoint(tiny_config(tmp_path, "deepspeed.precision=bf16"))
    drawn = {}
    for precision in ("fp32", "bf16"):
        cascade = Cascade.load(checkpoint, SamplerSettings(steps=3), precision=precision)
        assert cascade.stages[0].precision == precision
        drawn[precision] = cascade.sample(PROMPTS, torch.Generator().manual_seed(0))
    assert drawn["bf16"].dtype == torch.float32
    difference = (drawn["bf16"] - drawn["fp32"]).abs()
    assert 0 < difference.max() and difference.mean() < 0.05, (difference.max(), difference.mean())
    out = tmp_path / "samples"
    assert dit(["sample", str(checkpoint), "--prompt", PROMPTS[0], "--steps", "2", "--precision", "bf16",
                "--out", str(out)]) == 0
    assert [s["precision"] for s in json.loads((out / "samples.json").read_text())["stages"]] == ["bf16"]


def test_non_finite_samples_stop_the_command_naming_what_to_change(tmp_path, capsys):
    """fp16 overflows past 65504 where bf16 and fp32 do not: its inf and NaN pixels were written
    as black and white images (and scored by the judge) without a word. Here the output layer
    is scaled so that the network's prediction reaches ~1e6: finite in fp32 and bf16, not fp16."""
    from tests.eval.eval_helpers import perturbed_weights
    from trainer.checkpoint import CheckpointManager, RankState
    from trainer.checkpoint_format import EMA_FILE
    from trainer.config import to_yaml

    cfg = tiny_config(tmp_path / "run")
    weights = perturbed_weights(cfg, seed=0)
    weights["head.linear.weight"] *= 1e6  # the prediction's last layer
    CheckpointManager(cfg.checkpoint, rank=0, world_size=1).save(
        1, engines={}, rank_state=RankState({}, {}), config_yaml=to_yaml(cfg), shared={EMA_FILE: weights})
    checkpoint = Path(cfg.checkpoint.dir)
    sample = ["sample", str(checkpoint), "--prompt", PROMPTS[0], "--steps", "2", "--out", str(tmp_path / "out")]
    assert dit([*sample, "--precision", "fp16"]) == 2
    assert "'--precision'" in (err := capsys.readouterr().err) and "bf16 or fp32" in err
    assert not (tmp_path / "out").exists()
    for precision in ("fp32", "bf16"):
        assert dit([*sample, "--precision", precision]) == 0


def test_infinite_samples_are_not_clamped_into_pictures(tmp_path, capsys):
    """A decode reaching +inf without NaN (fp16 overflowing in a VAE's last convolution) was
    clamped to 1, a white image that passed the finite check after the clamp. Here the
    autoencoder's output convolution is zero with an infinite bias: every pixel +inf."""
    from trainer.config import AutoencoderConfig
    from trainer.models.autoencoder import build_autoencoder

    torch.manual_seed(0)
    ae = build_autoencoder(AutoencoderConfig(kind="kl", block_out_channels=[8, 16], latent_channels=4))
    ae.vae.decoder.conv_out.weight.data.zero_()
    ae.vae.decoder.conv_out.bias.data.fill_(float("inf"))
    ae.save(tmp_path / "ae")
    cfg = tiny_config(tmp_path / "run", "model.autoencoder.kind=kl", f"model.autoencoder.path={tmp_path / 'ae'}",
                      "model.in_channels=4")
    out = tmp_path / "out"
    assert dit(["sample", str(write_checkpoint(cfg)), "--prompt", PROMPTS[0], "--steps", "2", "--precision", "fp32",
                "--out", str(out)]) == 2
    assert "non-finite pixels" in capsys.readouterr().err and not out.exists()
    with pytest.raises(NonFinitePixels, match="3 of 3 pixel values"):
        to_uint8(torch.tensor([float("inf"), float("nan"), -float("inf")]).view(1, 3, 1, 1))
