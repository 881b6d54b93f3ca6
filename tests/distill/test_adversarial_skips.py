"""The adversarial stage's players skip a non-finite step apart: one rank of a real run (DeepSpeed
ZeRO-2 over gloo, tar shards), one player's loss NaN at one step. The EMA follows the student's
step whenever it was applied, the metrics of the player that stepped are logged, and the skip
event names the player that skipped (trainer/engine.py, `Trainer.settle_step`)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distill.test_distill_runs import player_weights, same
from tests.distill.test_distill_stage import teacher  # noqa: F401  (the module's fixture: a tiny random teacher)
from tests.trainer.harness import ROOT, TINY, metrics, train_env

pytestmark = pytest.mark.slow


def ema_at(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:08d}" / "ema.safetensors"))


@pytest.fixture(scope="module")
def runs(shapes_shards, teacher, tmp_path_factory) -> dict[str, Path]:
    """3 steps of the adversarial stage on one rank, the discriminator's loss NaN at step 2 and
    the student's at step 3, with the host's multi-tensor AdamW (optim.fused null: it reads its
    flag and skips, a host bool) and the fused one (what CUDA gets: it skips on a device flag
    read a step late); both runs in one worker process. Their output directories by optim.fused."""
    root = tmp_path_factory.mktemp("skips")
    common = [f"data.shards={shapes_shards}", f"stage.teacher={teacher}", "stage.kind=adversarial",
              "stage.rounds=[1]", "stage.steps=3", "checkpoint.every=1", "checkpoint.keep=3",
              "diffusion.loss_weighting=trunc_snr", "data.batch_size=2", "stage.guidance_max=1"]
    outs = {fused: root / fused for fused in ("null", "true")}
    own = [arg for fused, out in outs.items() for arg in ("--", f"run.out_dir={out}", f"optim.fused={fused}")]
    proc = subprocess.run([sys.executable, "-m", "tests.distill.adversarial_skip_worker", "disc@2,student@3",
                           str(TINY), *common, *own], cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return outs


@pytest.mark.parametrize("fused", ["null", "true"])
def test_each_player_skips_alone(runs, fused):
    """Each skipped step counts as skipped, once, naming its player, and the other player's
    step, metrics and (for the student) EMA go on."""
    out = runs[fused]
    student = {s: player_weights(out, "student", f"step_{s:08d}") for s in (1, 2, 3)}
    disc = {s: player_weights(out, "disc", f"step_{s:08d}") for s in (1, 2, 3)}
    assert same(disc[1], disc[2]) and not same(disc[2], disc[3])
    assert not same(student[1], student[2]) and same(student[2], student[3])
    ema = {s: ema_at(out, s) for s in (1, 2, 3)}
    for name, shadow in ema[2].items():  # ema.decay 0.9: s <- s + 0.1 (p - s) at the student's step 2
        torch.testing.assert_close(shadow, ema[1][name].lerp(student[2][name].float(), 0.1))
    assert same(ema[2], ema[3])  # the student's step 3 was skipped

    records = metrics(out)
    events = {r["step"]: r.get("skipped_players") for r in records if r.get("skipped_nonfinite_step")}
    assert events == {2: ["disc"], 3: ["student"]}
    logged = {r["step"]: r for r in records if "samples_per_s" in r}
    assert "loss" in logged[2] and "loss_disc" not in logged[2]
    assert "loss_disc" in logged[3] and "loss" not in logged[3]
    assert logged[3]["skipped_steps"] == 2
