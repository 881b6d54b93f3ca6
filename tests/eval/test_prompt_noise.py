"""What `dit sample` / `dit eval` sample with.

- Per-prompt noise: prompt i's sample depends on (seed, i, cascade stage) only, not on the batch
  size or the prompts beside it, through every draw of a cascade (the super-resolution input's
  noise augmentation, the initial noise, DDPM's step noise).
- A progressive step directory saved mid-run samples with the step count of the round its
  student was trained in (read from its stage.safetensors), not the run's last round.
- `--steps` asked for a distilled student is honoured (with a warning when the student was not
  trained for it), also when it equals the default 25.
- `--raw` verifies config.yaml against COMPLETE.json, as the EMA path does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.cli import main as dit
from tests.eval.eval_helpers import perturbed_weights, tiny_config, write_cascade, write_checkpoint
from trainer.cascade import Cascade, CascadeStageSpec, PromptSeeds, load_stage
from trainer.checkpoint import EMA_FILE, STAGE_FILE, CheckpointManager, RankState
from trainer.checkpoint_format import ROUND_FILE, CheckpointError, write_inference_dir
from trainer.config import to_yaml
from trainer.diffusion import SamplerSettings
from trainer.elastic import universal_file

PROMPTS = ["a large red circle at the top left", "a small blue square in the centre", "a green triangle"]
STUDENT = ("stage.kind=progressive", "stage.teacher=/unused", "model.guidance_embed=true",
           "diffusion.loss_weighting=trunc_snr")
TOL = 1e-5  # float rounding of batched matmuls


@pytest.fixture(scope="module")
def ddpm_cascade(tmp_path_factory) -> Cascade:
    """Base (16 px) + noise-augmented super-resolution (32 px), both sampled with DDPM: every
    kind of draw a cascade makes."""
    recipe = write_cascade(tmp_path_factory.mktemp("noise"), "    noise_aug: 0.3\n")
    return Cascade.load(recipe, SamplerSettings(steps=3, sampler="ddpm"))


# ------------------------------------------------------------------------------- per-prompt noise


def test_a_prompts_sample_does_not_depend_on_the_batch_size(ddpm_cascade):
    """Before per-prompt noise, one generator fed the batch in order: batch sizes 3, 2 and 1
    gave prompt 1 and 2 other noise at every draw (up to 2.0 apart in pixels)."""
    together = ddpm_cascade.sample_batched(PROMPTS, 7, batch_size=3, progress=False)  # (3, 3, 32, 32)
    alone = ddpm_cascade.sample_batched(PROMPTS, 7, batch_size=1, progress=False)
    assert together.shape == (3, 3, 32, 32) and float((together - alone).abs().max()) < TOL
    # a generator stands for the seed it was seeded with (what trainer.evaluate passes), in chunks of 2
    pairs = ddpm_cascade.sample_batched(PROMPTS, torch.Generator().manual_seed(7), batch_size=2, progress=False)
    assert float((together - pairs).abs().max()) < TOL


def test_prompt_seeds_differ_by_seed_prompt_and_stage():
    seeds = PromptSeeds(3, first=2)
    draw = [torch.randn(4, generator=g) for g in seeds.generators(0, 2)]  # prompts 2 and 3 at stage 0
    assert torch.equal(draw[0], torch.randn(4, generator=PromptSeeds(3).generators(0, 3)[2]))
    assert not torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], torch.randn(4, generator=seeds.generators(1, 1)[0]))  # stage 1
    assert not torch.equal(draw[0], torch.randn(4, generator=PromptSeeds(4, first=2).generators(0, 1)[0]))
    assert PromptSeeds.of(torch.Generator().manual_seed(3)) == PromptSeeds(3) == PromptSeeds.of(3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_seed_generator_keeps_the_draws_on_the_gpu(tmp_path):
    """Generators on the sampling device: per-prompt CUDA generators fill CUDA tensors (a host
    tensor meeting a device one would raise), and the batch size still does not matter."""
    recipe = write_cascade(tmp_path, "    noise_aug: 0.3\n")
    cascade = Cascade.load(recipe, SamplerSettings(steps=3, sampler="ddpm"), device="cuda")
    seed = torch.Generator("cuda").manual_seed(7)
    together = cascade.sample_batched(PROMPTS, seed, batch_size=3, progress=False)
    alone = cascade.sample_batched(PROMPTS, seed, batch_size=1, progress=False)
    assert float((together - alone).abs().max()) < 1e-3  # as test_device: GPU kernels round per batch shape
    assert float((cascade.sample_batched(PROMPTS, 7, 3, False) - together).abs().max()) > 0.05  # CPU streams


def test_dit_sample_gives_the_same_images_for_every_batch_size(tmp_path):
    checkpoint = write_checkpoint(tiny_config(tmp_path / "run"))
    images = {}
    for batch in (1, 3):
        out = tmp_path / f"bs{batch}"
        assert dit(["sample", str(checkpoint), *[a for p in PROMPTS for a in ("--prompt", p)], "--steps", "2",
                    "--sampler", "ddpm", "--batch-size", str(batch), "--seed", "5", "--out", str(out)]) == 0
        images[batch] = np.stack([np.asarray(Image.open(out / f"{i:05d}.png"), dtype=np.int16) for i in range(3)])
    assert np.abs(images[1] - images[3]).max() <= 1  # uint8: rounding may flip a level


# ------------------------------------------------------------------------------- distilled step counts


def progressive_step_dir(root: Path, state: dict[str, torch.Tensor] | None) -> Path:
    """A step directory of a progressive run over rounds [8, 4], with `state` as its
    stage.safetensors (None: none)."""
    cfg = tiny_config(root, *STUDENT, "stage.rounds=[8,4]", "stage.steps=600")
    shared = {EMA_FILE: perturbed_weights(cfg, seed=0)}
    if state is not None:
        shared[STAGE_FILE] = state
    CheckpointManager(cfg.checkpoint, rank=0, world_size=1).save(
        300, engines={}, rank_state=RankState({}, {}), config_yaml=to_yaml(cfg), shared=shared)
    return Path(cfg.checkpoint.dir)


@pytest.mark.parametrize("state, steps", [
    ({"step": torch.tensor(299), "round_length": torch.tensor(300)}, 8),  # round 1 (no `round` saved)
    ({"step": torch.tensor(300), "round_length": torch.tensor(300), "round": torch.tensor(1)}, 4),
])
def test_a_mid_run_progressive_checkpoint_samples_with_its_rounds_steps(tmp_path, capsys, state, steps):
    from trainer.stages.checks import teacher_steps

    directory = progressive_step_dir(tmp_path, state)
    loaded = load_stage(CascadeStageSpec(str(directory)), SamplerSettings())
    assert loaded.settings.steps == steps
    assert f"sampling it with {steps} steps" in capsys.readouterr().out
    # as the teacher of a later distillation, the same count (its targets are its DDIM steps)
    assert teacher_steps(str(directory), loaded.cfg.stage) == steps


def test_a_round_export_samples_with_its_configs_last_round(tmp_path):
    cfg = tiny_config(tmp_path, *STUDENT, "stage.rounds=[8]")  # the round 1 export of an [8, 4] run
    export = write_inference_dir(tmp_path / "rounds" / "round_1_8steps", perturbed_weights(cfg, seed=0),
                                 to_yaml(cfg), {ROUND_FILE: json.dumps({"round": 1, "steps": 8})})
    assert load_stage(CascadeStageSpec(str(export)), SamplerSettings()).settings.steps == 8


def test_a_progressive_step_dir_without_its_stage_state_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"which round's student.*rounds/round_<r>_<N>steps"):
        load_stage(CascadeStageSpec(str(progressive_step_dir(tmp_path, None))), SamplerSettings())


def test_steps_asked_for_a_student_are_honoured_even_at_the_default(tmp_path, capsys):
    checkpoint = write_checkpoint(tiny_config(tmp_path / "student", *STUDENT, "stage.rounds=[2]"))
    out = tmp_path / "samples"
    assert dit(["sample", str(checkpoint), "--prompt", PROMPTS[0], "--steps", "25", "--out", str(out)]) == 0
    (stage,) = json.loads((out / "samples.json").read_text())["stages"]
    printed = capsys.readouterr().out
    assert stage["steps"] == 25 and "warning:" in printed and "distilled for 2 steps" in printed
    spec = CascadeStageSpec(str(checkpoint))
    assert load_stage(spec, SamplerSettings()).settings.steps == 2  # none asked: its own
    assert load_stage(spec, SamplerSettings(), steps=2).settings.steps == 2
    assert "warning" not in capsys.readouterr().out
    assert load_stage(spec, SamplerSettings(), steps=3).settings.steps == 3
    printed = capsys.readouterr().out
    assert "warning:" in printed and "distilled for 2 steps" in printed and "the 3 asked for" in printed


# ------------------------------------------------------------------------------- --raw verification


def test_raw_weights_verify_the_config_too(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    CheckpointManager(cfg.checkpoint, rank=0, world_size=1).save(
        1, engines={}, rank_state=RankState({}, {}), config_yaml=to_yaml(cfg),
        shared={EMA_FILE: perturbed_weights(cfg, seed=0),
                universal_file("student"): {f"fp32/{k}": v for k, v in perturbed_weights(cfg, seed=1).items()}})
    spec = CascadeStageSpec(str(Path(cfg.checkpoint.dir)))
    assert load_stage(spec, SamplerSettings(), ema=False).weights == "raw"
    config = next(Path(cfg.checkpoint.dir).glob("step_*")) / "config.yaml"
    config.write_text(config.read_text() + "# edited after it was written\n")
    for ema in (True, False):
        with pytest.raises(CheckpointError, match="config.yaml is missing or was modified"):
            load_stage(spec, SamplerSettings(), ema=ema)


def test_a_guidance_input_outside_the_distilled_range_is_warned_of(tmp_path, capsys):
    checkpoint = write_checkpoint(tiny_config(tmp_path / "student", *STUDENT, "stage.rounds=[2]",
                                              "stage.guidance_min=1.0", "stage.guidance_max=4.0"))
    spec = CascadeStageSpec(str(checkpoint))
    assert load_stage(spec, SamplerSettings(cfg_scale=4.0)).settings.cfg_scale == 4.0
    assert "warning" not in capsys.readouterr().out
    assert load_stage(spec, SamplerSettings(cfg_scale=7.0)).settings.cfg_scale == 7.0  # honoured, with a warning
    printed = capsys.readouterr().out
    assert "warning:" in printed and "w on [1, 4]" in printed and "w=7" in printed
