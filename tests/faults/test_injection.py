"""The fault injection of the fault suite is installed on a trainer only when a DIT_INJECT_*
variable asks for it, and then only on the rank it targets (trainer/faults.py)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

from trainer import faults


def fake_trainer(rank: int, root: Path) -> SimpleNamespace:
    """What `faults.install` touches of a Trainer: its rank, step, stage losses and checkpoints."""

    def losses(batch, generator):
        yield "student", 1.0, {}

    ckpt = SimpleNamespace(latest=lambda: root / "step_00000008", before_commit=None, before_write=None)
    return SimpleNamespace(ctx=SimpleNamespace(rank=rank), state=SimpleNamespace(step=0),
                           stage=SimpleNamespace(losses=losses), ckpt=ckpt)


def clear_injections(monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith(faults.PREFIX)]:
        monkeypatch.delenv(name)


def test_nothing_is_installed_without_a_dit_inject_variable(monkeypatch, tmp_path):
    clear_injections(monkeypatch)
    trainer = fake_trainer(0, tmp_path)
    losses, latest = trainer.stage.losses, trainer.ckpt.latest
    faults.install(trainer)
    assert trainer.stage.losses is losses and trainer.ckpt.latest is latest
    assert trainer.ckpt.before_commit is None and trainer.ckpt.before_write is None


def test_a_nan_and_a_latest_tag_reach_the_targeted_rank_only(monkeypatch, tmp_path):
    clear_injections(monkeypatch)
    monkeypatch.setenv("DIT_INJECT_NAN", "1@3")
    monkeypatch.setenv("DIT_INJECT_LATEST", "1@step_00000004")
    ranks = [fake_trainer(rank, tmp_path) for rank in (0, 1)]
    for trainer in ranks:
        faults.install(trainer)
        trainer.state.step = 2  # the loop is in step 3
    assert [loss for _, loss, _ in ranks[0].stage.losses({}, None)] == [1.0]
    assert all(math.isnan(loss) for _, loss, _ in ranks[1].stage.losses({}, None))
    ranks[1].state.step = 3
    assert [loss for _, loss, _ in ranks[1].stage.losses({}, None)] == [1.0]
    assert ranks[0].ckpt.latest() == tmp_path / "step_00000008"
    assert ranks[1].ckpt.latest() == tmp_path / "step_00000004"
