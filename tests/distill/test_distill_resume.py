"""A resumed distillation trains on as the interrupted run would have: the schedule its start
derived from stage.steps and log.sample_steps (both may change on resume), and the teacher it
started with even where the teacher's `latest` moved on; a resume that cannot is refused with
the key named. Stage objects in one process, their state saved and loaded through a file as the
trainer does (stage.safetensors); the resume at the last step is a real run in
test_distill_runs.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.eval.eval_helpers import tiny_config, write_checkpoint
from trainer.config import ConfigError, RunConfig
from trainer.elastic import copy_frozen
from trainer.stages import build_stage
from trainer.stages.checks import check_resumed_stage
from trainer.stages.distillation import DistillationStage

DISTILL = ("stage.rounds=[2,1]", "diffusion.loss_weighting=trunc_snr", "stage.guidance_max=1")  # w = 1: no guidance


def teacher_config(root: Path) -> RunConfig:
    return tiny_config(root, f"checkpoint.dir={root}/checkpoints")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny pretraining checkpoint root (random weights) that no test changes."""
    return write_checkpoint(teacher_config(tmp_path_factory.mktemp("teacher")))


def stage_of(out: Path, teacher: Path, kind: str, *overrides: str) -> DistillationStage:
    return build_stage(tiny_config(out, f"stage.kind={kind}", f"stage.teacher={teacher}", *DISTILL, *overrides))


def saved(stage: DistillationStage, path: Path) -> dict[str, torch.Tensor]:
    """The stage's state after a round trip through a safetensors file, as a checkpoint keeps it."""
    save_file(stage.state_tensors(), str(path))
    return load_file(str(path))


def resumed_with(directory: Path, teacher: Path, kind: str, *overrides: str) -> None:
    """`dit train`'s check, before any process starts, of a resume from `directory` (its
    stage.safetensors) with this config."""
    check_resumed_stage(directory, tiny_config(directory, f"stage.kind={kind}", f"stage.teacher={teacher}", *DISTILL,
                                               *overrides))


def no_weights() -> dict[str, torch.Tensor]:
    raise AssertionError("no round boundary here")


def test_progressive_resume_keeps_the_round_length_it_started_with(tmp_path, teacher):
    """Rounds of 4 steps (stage.steps=8 over 2 rounds): a resume with stage.steps=16 keeps them
    (the last round runs longer), one with 6 would end inside round 2 and is refused."""
    stage = stage_of(tmp_path, teacher, "progressive", "stage.steps=8")
    stage.start_of_step(2, no_weights)
    state = saved(stage, tmp_path / "stage.safetensors")

    longer = stage_of(tmp_path, teacher, "progressive", "stage.steps=16")
    longer.load_state_tensors(state)
    assert [longer.round_of(s) for s in (3, 4, 15)] == [0, 1, 1]
    with pytest.raises(ConfigError, match=r"stage.steps.*stage.steps >= 8"):
        stage_of(tmp_path, teacher, "progressive", "stage.steps=6").load_state_tensors(state)
    resumed_with(tmp_path, teacher, "progressive", "stage.steps=16")  # before any process starts
    with pytest.raises(ConfigError, match=r"stage.steps.*stage.steps >= 8"):
        resumed_with(tmp_path, teacher, "progressive", "stage.steps=6")


def test_adversarial_resume_keeps_its_phases_and_teacher_sampler(tmp_path, teacher):
    """Conditional for the first 15 of 30 steps and a 4-step teacher (log.sample_steps=4): a
    resume with stage.steps=60 and log.sample_steps=50 keeps both; stage.steps=15 would leave no
    unconditional phase and is refused."""
    stage = stage_of(tmp_path, teacher, "adversarial", "stage.steps=30", "log.sample_steps=4")
    stage.start_of_step(20, no_weights)
    state = saved(stage, tmp_path / "stage.safetensors")

    resumed = stage_of(tmp_path, teacher, "adversarial", "stage.steps=60", "log.sample_steps=50")
    assert resumed.teacher_steps == 50
    resumed.load_state_tensors(state)
    resumed.start_of_step(20, no_weights)
    assert resumed.teacher_steps == 4
    assert not resumed.conditional
    with pytest.raises(ConfigError, match=r"stage.steps.*no unconditional phase"):
        stage_of(tmp_path, teacher, "adversarial", "stage.steps=15").load_state_tensors(state)
    resumed_with(tmp_path, teacher, "adversarial", "stage.steps=60")
    with pytest.raises(ConfigError, match=r"stage.steps.*no unconditional phase"):
        resumed_with(tmp_path, teacher, "adversarial", "stage.steps=15")


def same_weights(net: torch.nn.Module, other: dict[str, torch.Tensor]) -> bool:
    ours = net.state_dict()
    return ours.keys() == other.keys() and all(torch.equal(ours[k], other[k]) for k in ours)


def test_resume_distils_the_teacher_it_started_with(tmp_path, teacher):
    """The teacher's run saves step 2 after the distillation started from step 1: the resume
    still distils step 1 (without touching the restored global generator); once step 1 is gone,
    or holds other weights, the resume is refused naming stage.teacher. Another stage.teacher
    (a config change the user allowed) is used as given."""
    cfg = teacher_config(tmp_path / "teacher")
    root = write_checkpoint(cfg, seed=0, step=1)
    out = tmp_path / "run"
    stage = stage_of(out, root, "adversarial")
    started_with = {k: v.clone() for k, v in stage.teacher.net.state_dict().items()}
    state = saved(stage, tmp_path / "stage.safetensors")

    write_checkpoint(cfg, seed=1, step=2)  # `latest` moves on
    resumed = stage_of(out, root, "adversarial")
    assert not same_weights(resumed.teacher.net, started_with)
    rng = torch.get_rng_state()
    resumed.load_state_tensors(state)
    assert same_weights(resumed.teacher.net, started_with)
    assert torch.equal(torch.get_rng_state(), rng)
    assert resumed.teacher_source.directory.endswith("step_00000001")
    # the discriminator's frozen trunk, copied from the teacher `latest` named when the stage was
    # built: an elastic resume (trained weights only) left it so; the resume copies it again
    trunk = resumed.players["disc"].disc.trunk
    assert not same_weights(trunk, started_with)
    copy_frozen(resumed.frozen_copies())
    assert same_weights(trunk, started_with)

    shutil.rmtree(root / "step_00000001")  # retention deleted it
    with pytest.raises(ConfigError, match=r"stage.teacher.*step_00000001.*is gone"):
        stage_of(out, root, "adversarial").load_state_tensors(state)
    write_checkpoint(cfg, seed=2, step=1)  # the same directory, other weights
    with pytest.raises(ConfigError, match=r"stage.teacher.*holds other weights"):
        stage_of(out, root, "adversarial").load_state_tensors(state)
    other = stage_of(out, teacher, "adversarial")
    given = {k: v.clone() for k, v in other.teacher.net.state_dict().items()}
    other.load_state_tensors(state)
    assert same_weights(other.teacher.net, given)
