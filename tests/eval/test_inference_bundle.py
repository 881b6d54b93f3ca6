"""Inference loads only what sampling needs (one network, no teacher, the checkpoint's own kind),
and round exports are written and read through the one checkpoint-format module."""
from __future__ import annotations

import json

import pytest
import torch

import trainer.bundle
from tests.eval.eval_helpers import tiny_config, write_checkpoint
from trainer.cascade import CascadeStageSpec, load_stage
from trainer.checkpoint_format import (
    ROUND_FILE,
    ROUNDS_DIR,
    CheckpointError,
    load_for_inference,
    rounds_exports,
    write_inference_dir,
)
from trainer.config import to_yaml
from trainer.diffusion import SamplerSettings
from trainer.models.text import text_conditioning
from trainer.numerics import PRECISIONS, autocast
from trainer.stages import build_stage
from trainer.stages.checks import read_run_config
from trainer.stages.pretrain import precompute_encoder

CAPTIONS = ["a large red circle at the top left", "a small blue square at the centre", ""]


def test_a_distilled_checkpoint_loads_one_network_and_keeps_its_kind(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "student", "stage.kind=progressive", "stage.teacher=/unused", "stage.rounds=[2]",
                      "model.guidance_embed=true", "diffusion.loss_weighting=trunc_snr")
    directory = write_checkpoint(cfg)
    built = []
    build = trainer.bundle.build_dit
    monkeypatch.setattr(trainer.bundle, "build_dit", lambda *a, **k: built.append(1) or build(*a, **k))
    loaded = load_stage(CascadeStageSpec(str(directory)), SamplerSettings())
    assert len(built) == 1 and loaded.cfg.stage.kind == "progressive" and loaded.distilled
    assert loaded.stage.nets == [loaded.net]


def test_round_export_round_trips_and_is_verified(tmp_path):
    cfg = tiny_config(tmp_path)
    weights = {"w": torch.arange(6.0).view(2, 3)}
    directory = tmp_path / ROUNDS_DIR / "round_1_4steps"
    write_inference_dir(directory, weights, to_yaml(cfg), {ROUND_FILE: json.dumps({"steps": 4})}, step=7)
    config_yaml, loaded = load_for_inference(directory)
    assert torch.equal(loaded["w"], weights["w"]) and read_run_config(config_yaml) == cfg
    assert rounds_exports(tmp_path) == {4: directory}
    assert not list(directory.parent.glob(".tmp-*"))
    (directory / "config.yaml").write_text(config_yaml + "\n")
    with pytest.raises(CheckpointError, match="modified after it was written"):
        load_for_inference(directory)


@pytest.mark.parametrize("text_precision", ["fp32", "bf16"])
def test_training_at_bf16_and_dit_sample_feed_the_model_the_same_text_embeddings(tmp_path, text_precision):
    """Under deepspeed.precision=bf16 the stage's text embeddings (its helpers placed and run as
    the engine places and runs them: bf16, inside the step's autocast) equal, bit for bit, those
    `dit sample` computes for the same captions from the run's checkpoint (`load_stage`, then
    `generate`'s `text_conditioning`) and those `dit data precompute` writes: the text encoder
    computes in model.text.precision in all three. A bf16 encoder in training and a float32 one
    in sampling and precompute differed."""
    cfg = tiny_config(tmp_path, "deepspeed.precision=bf16", f"model.text.precision={text_precision}")
    cpu = torch.device("cpu")
    stage = build_stage(cfg).to(cpu, PRECISIONS["bf16"])  # as trainer.engine places it
    with autocast(cpu, "bf16"):  # the engine's forward context
        trained = stage.text_input({"caption": CAPTIONS})
    loaded = load_stage(CascadeStageSpec(str(write_checkpoint(cfg))), SamplerSettings())  # as `dit sample` does
    sampled, _ = text_conditioning(loaded.stage.text, CAPTIONS)  # as `generate` does
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(cfg))
    precomputed = precompute_encoder(str(config))({"caption": CAPTIONS, "image": torch.zeros(len(CAPTIONS), 3, 16, 16)})
    for name, written in (("tokens", "text_emb"), ("mask", "text_mask"), ("pooled", "text_pooled")):
        assert torch.equal(getattr(trained, name), sampled[name]), name
        assert torch.equal(precomputed[written], sampled[name]), written
    assert {p.dtype for p in stage.text.encoder.parameters()} == {PRECISIONS[text_precision]}
