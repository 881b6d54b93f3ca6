"""Progressive and adversarial distillation as real `dit train` jobs on 2 ranks (DeepSpeed ZeRO-2
over gloo), from a teacher trained by `dit train` itself: both players update, the round schedule
hands the student over as teacher, exports load, and resume after SIGKILL is exact."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.harness import metrics, run_train
from trainer.checkpoint import LATEST, load_for_inference

pytestmark = pytest.mark.slow


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def player_weights(out: Path, player: str, step: str | None = None) -> dict[str, torch.Tensor]:
    """A player's whole weights in a checkpoint (ZeRO-2 keeps them in rank 0's model file)."""
    root = out / "checkpoints"
    step = step or (root / LATEST).read_text().strip()
    return torch.load(root / step / player / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def per_step(out: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics(out) if key in r}


def kill_and_resume(args: list[str], killed: Path, kill_at: int) -> None:
    crashed = run_train(2, args + [f"run.out_dir={killed}"], DIT_INJECT_KILL_AT=str(kill_at))
    assert crashed.returncode != 0
    resumed = run_train(2, args + [f"run.out_dir={killed}"])
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr


PROGRESSIVE = ["stage.kind=progressive", "stage.rounds=[2,1]", "stage.steps=8", "model.guidance_embed=true",
               "diffusion.loss_weighting=trunc_snr", "checkpoint.every=5", "data.num_workers=1"]
ADVERSARIAL = ["stage.kind=adversarial", "stage.rounds=[1]", "stage.steps=30", "data.batch_size=8", "optim.lr=5e-4",
               "optim.disc_lr=2e-3", "diffusion.loss_weighting=trunc_snr", "checkpoint.every=10", "data.num_workers=1",
               "stage.guidance_min=4", "stage.guidance_max=4"]  # no guidance input: CFG at w = 4 baked in


def straight_run(kind: list[str], shards: Path, teacher: Path, out: Path) -> tuple[list[str], Path]:
    args = [f"data.shards={shards}", f"stage.teacher={teacher}", *kind]
    assert_ok(run_train(2, args + [f"run.out_dir={out}"]))
    return args, out


@pytest.fixture(scope="module")
def progressive_run(shapes_shards, tiny_teacher, tmp_path_factory) -> tuple[list[str], Path]:
    """rounds [2, 1] over 8 steps on 2 ranks with a guidance-conditioned student."""
    return straight_run(PROGRESSIVE, shapes_shards, tiny_teacher, tmp_path_factory.mktemp("progressive"))


@pytest.fixture(scope="module")
def adversarial_run(shapes_shards, tiny_teacher, tmp_path_factory) -> tuple[list[str], Path]:
    """30 steps of a 1-step student: conditional discrimination for steps 1-15, then unconditional."""
    return straight_run(ADVERSARIAL, shapes_shards, tiny_teacher, tmp_path_factory.mktemp("adversarial"))


def test_progressive_rounds_hand_over_export_and_resume_across_a_round(progressive_run, tmp_path):
    """The round changes at step 4, each round is exported and loads as an inference
    checkpoint, round 2's EMA starts at round 1's last student, and a run killed in round 2
    resumes (its teacher from stage.safetensors) to the same losses and weights."""
    args, straight = progressive_run
    rounds = per_step(straight, "round")
    assert [rounds[s] for s in range(1, 9)] == [1.0] * 4 + [2.0] * 4
    exports = straight / "checkpoints" / "rounds"
    for name, steps, kind in (("round_1_2steps", 2, "raw"), ("round_2_1steps", 1, "ema")):
        meta = json.loads((exports / name / "round.json").read_text())
        assert (meta["steps"], meta["weights"]) == (steps, kind)
        config_yaml, weights = load_for_inference(exports / name)
        assert "guidance_embed: true" in config_yaml and any("guidance_embedder" in k for k in weights)
    grids = [r["sample_grid"] for r in metrics(straight) if "sample_grid" in r]
    assert grids and Path(grids[-1]).is_file()
    # ema.decay 0.9: one step after the restart at the round's first weights w4, 0.9 w4 + 0.1 w5
    first = load_for_inference(exports / "round_1_2steps")[1]  # w4, raw
    fifth = player_weights(straight, "student", "step_00000005")
    ema = load_file(str(straight / "checkpoints" / "step_00000005" / "ema.safetensors"))
    assert ema.keys() == first.keys()
    for name, shadow in ema.items():
        torch.testing.assert_close(shadow, first[name].float().lerp(fifth[name].float(), 0.1))

    killed = tmp_path / "killed"
    kill_and_resume(args, killed, kill_at=8)  # checkpoints at 5 and 8: resumes inside round 2
    a, b = per_step(straight, "loss"), per_step(killed, "loss")
    assert [a[s] for s in (7, 8)] == [b[s] for s in (7, 8)]
    assert same(player_weights(straight, "student"), player_weights(killed, "student"))


def test_progressive_resume_at_the_last_step_exports_the_last_round(progressive_run, tmp_path):
    """A run preempted at its last step (saved, exit 42 before the end-of-run export) resumes
    at step == stage.steps, where no step runs: the resume still exports the last round, the
    export the straight run wrote."""
    args, straight = progressive_run
    preempted = tmp_path / "preempted"
    shutil.copytree(straight / "checkpoints", preempted / "checkpoints")
    last = Path("rounds") / "round_2_1steps"
    shutil.rmtree(preempted / "checkpoints" / last)
    resumed = run_train(2, args + [f"run.out_dir={preempted}"])
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr
    exported, expected = preempted / "checkpoints" / last, straight / "checkpoints" / last
    assert (exported / "round.json").read_text() == (expected / "round.json").read_text()
    assert same(load_for_inference(exported)[1], load_for_inference(expected)[1])


def rise_and_return(acc: dict[int, float], gap: dict[int, float], steps: range) -> tuple[int, int] | None:
    """(s1, s2), s1 < s2 in `steps`: accuracy >= 0.75 at s1, then back to <= 0.5 at s2 with the
    real-minus-fake logit gap less than half of what it was at s1; None if no such pair."""
    for s1 in steps:
        for s2 in steps:
            if s1 < s2 and acc[s1] >= 0.75 and acc[s2] <= 0.5 and gap[s2] < 0.5 * gap[s1]:
                return s1, s2
    return None


def test_adversarial_two_ranks_both_players_learn_and_resume_exactly(adversarial_run, tiny_teacher, tmp_path):
    """Both players change (the trunk stays the teacher's), the discriminator's accuracy rises
    above chance and the generator brings it back within a phase, and a run killed at step 25
    resumes from step 20 to identical losses and weights."""
    args, straight = adversarial_run
    teacher = load_for_inference(tiny_teacher)[1]
    student, student_20 = player_weights(straight, "student"), player_weights(straight, "student", "step_00000020")
    disc, disc_20 = player_weights(straight, "disc"), player_weights(straight, "disc", "step_00000020")
    assert not same(student, student_20) and not same(student, teacher)
    heads = [k for k in disc if k.startswith("disc.heads.")]
    assert heads and any(not torch.equal(disc[k], disc_20[k]) for k in heads)
    assert all(torch.equal(disc[f"disc.trunk.{k}"], v) for k, v in teacher.items())

    acc, phase = per_step(straight, "disc_acc"), per_step(straight, "conditional")
    real, fake = per_step(straight, "logit_real"), per_step(straight, "logit_fake")
    gap = {s: real[s] - fake[s] for s in real}
    assert [phase[s] for s in (1, 15, 16, 30)] == [1.0, 1.0, 0.0, 0.0]
    pairs = [rise_and_return(acc, gap, steps) for steps in (range(1, 16), range(16, 31))]
    assert any(pairs), (acc, gap)

    killed = tmp_path / "killed"
    kill_and_resume(args, killed, kill_at=25)
    for key in ("loss", "loss_disc", "disc_acc"):
        a, b = per_step(straight, key), per_step(killed, key)
        assert [a[s] for s in range(21, 31)] == [b[s] for s in range(21, 31)], key
    for player in ("student", "disc"):
        assert same(player_weights(straight, player), player_weights(killed, player)), player


def test_bench_distill_prints_the_table(tiny_teacher, progressive_run, adversarial_run, capsys):
    """`dit bench distill` on the tiny teacher and the two runs' students (4 held-out captions)."""
    from launch.bench_cli import register_distill

    parser = argparse.ArgumentParser()
    register_distill(parser.add_subparsers())
    args = parser.parse_args([
        "distill", "--teacher", str(tiny_teacher), "--teacher-steps", "4", "--num", "4", "--batch-size", "4",
        "--progressive", str(progressive_run[1] / "checkpoints"), "--progressive-steps", "2", "1",
        "--adversarial", str(adversarial_run[1] / "checkpoints"), "--adversarial-steps", "1", "2"])
    assert args.func(args) == 0  # imports launch.bench_distill on the call
    out = capsys.readouterr().out
    cells = [line.split() for line in out.splitlines()]
    rows = [c for c in cells if len(c) > 2 and c[0] in ("teacher", "progressive", "adversarial") and c[1].isdigit()]
    assert [r[:3] for r in rows] == [["teacher", "4", "8"], ["progressive", "2", "2"], ["progressive", "1", "1"],
                                     ["adversarial", "1", "1"], ["adversarial", "2", "2"]]
    assert "NFE" in out and "% teacher" in out and "target adversarial 1-step" in out
