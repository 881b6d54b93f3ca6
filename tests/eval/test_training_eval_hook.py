"""The hook the trainer calls every log.eval_every steps: judge metrics of the fixed prompts."""
from __future__ import annotations

from tests.eval.eval_helpers import perturbed_weights, tiny_config
from trainer.evaluate import adherence_during_training
from trainer.stages import build_stage


def test_adherence_during_training_returns_judge_metrics(tmp_path):
    cfg = tiny_config(tmp_path, "log.sample_steps=2")
    metrics = adherence_during_training(build_stage(cfg), perturbed_weights(cfg, 0), cfg.log)
    assert {"eval/adherence/color", "eval/adherence/position", "eval/adherence/overall"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_superres_stage_is_not_judged_alone(tmp_path):
    cfg = tiny_config(tmp_path, "stage.kind=superres", "model.superres=true", "data.sr_resolution=32")
    assert adherence_during_training(build_stage(cfg), None, cfg.log) == {}
