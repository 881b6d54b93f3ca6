"""`dit eval memorization`: the closed-form ideal denoiser of the training set reproduces
training samples (100% near-copies); held-out real data and an untrained model do not."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.eval.eval_helpers import tiny_config, write_checkpoint
from trainer.cascade import Cascade
from trainer.evaluate import memorization_audit, nearest_training
from trainer.sampling import SamplerSettings


@pytest.fixture(scope="module")
def run_with_shards(tmp_path_factory) -> Path:
    """A random-weight checkpoint whose run config points at 96 real 16 px shapes shards."""
    from data_pipeline.synth import synth_samples
    from data_pipeline.write import write_shards

    root = tmp_path_factory.mktemp("memorization")
    write_shards(synth_samples(96, seed=0, size=16), str(root / "data"), shard_size=24, progress=False)
    return write_checkpoint(tiny_config(root))


def test_nearest_training_streams_like_brute_force():
    g = torch.Generator().manual_seed(0)
    samples, data = torch.randn(5, 3, 4, 4, generator=g), torch.randn(23, 3, 4, 4, generator=g)
    batches = ((data[i: i + 7], [f"k{j}" for j in range(i, min(i + 7, 23))]) for i in range(0, 23, 7))
    found = nearest_training(samples, batches)
    d = torch.cdist(samples.flatten(1).double(), data.flatten(1).double()) / 48 ** 0.5
    top = d.topk(2, dim=1, largest=False)
    assert torch.allclose(found.distance, top.values[:, 0]) and torch.allclose(found.second, top.values[:, 1])
    assert found.keys == [f"k{j}" for j in top.indices[:, 0].tolist()]


def test_closed_form_memorizes_and_heldout_does_not(run_with_shards):
    cascade = Cascade.load(run_with_shards, SamplerSettings(steps=2))
    report = memorization_audit(cascade, num=24, reference_steps=20)
    assert report.closed_form is not None and report.closed_form["near_copy_fraction"] == 1.0
    assert report.heldout["near_copy_fraction"] <= 0.25  # the synthetic set's own exact repeats
    assert report.generated["near_copy_fraction"] == 0.0  # random weights copy nothing
    assert all(key for key in report.nearest_keys)


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory) -> Path:
    """A random-weight checkpoint whose run trained on latents precomputed from 24 pixel
    samples (as the demo does), the pixel shards left where precompute read them."""
    from data_pipeline.config import DataConfig
    from data_pipeline.precompute import precompute, toy_encoder
    from data_pipeline.synth import synth_samples
    from data_pipeline.write import write_shards

    root = tmp_path_factory.mktemp("memorization_latents")
    write_shards(synth_samples(24, seed=0, size=16), str(root / "data"), shard_size=8, progress=False)
    precompute(str(root / "data"), str(root / "latents"), toy_encoder(), DataConfig(resolution=16), progress=False)
    return write_checkpoint(tiny_config(root, f"data.shards={root}/latents"))


def test_audit_of_a_latent_run_reads_the_pixel_shards_behind_it(latent_run):
    """`dit eval memorization` on a run trained on precomputed latents (the README's demo
    command) compares against the pixel shards the latents were encoded from."""
    from trainer.heldout import pixel_source

    root = latent_run.parent
    assert pixel_source(str(root / "latents")) == str(root / "data")
    assert pixel_source(str(root / "data")) == str(root / "data")  # pixel shards stay
    assert pixel_source(str(root / "latents" / "shard-00000{0,2}.tar")) == "::".join(
        str(root / "data" / f"shard-00000{i}.tar") for i in (0, 2))  # a subset: the same shards of pixels
    report = memorization_audit(Cascade.load(latent_run, SamplerSettings(steps=1)), num=4, reference_steps=0)
    assert report.generated["near_copy_fraction"] == 0.0 and all(report.nearest_keys)


def test_audit_says_so_when_the_pixel_shards_are_gone(latent_run, tmp_path):
    import json
    import shutil

    from trainer.heldout import pixel_source

    latents = tmp_path / "latents"
    shutil.copytree(latent_run.parent / "latents", latents)
    manifest = json.loads((latents / "manifest.json").read_text())
    manifest["extra"]["source"] = str(tmp_path / "gone")
    (latents / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"encoded from {tmp_path / 'gone'}, which cannot be read"):
        pixel_source(str(latents))
    del manifest["extra"]["source"]
    (latents / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="records no pixel source"):
        pixel_source(str(latents))


def test_a_latent_space_audit_needs_its_own_near_copy_distance(latent_run, capsys):
    """NEAR_COPY_RMS is a distance between pixels: a latent-space audit without --threshold is
    refused before anything is sampled; with one, it runs in latent space."""
    from launch.cli import main

    assert main(["eval", "memorization", str(latent_run), "--space", "latent", "--num", "4"]) == 2
    assert "--threshold" in capsys.readouterr().err
    cascade = Cascade.load(latent_run, SamplerSettings(steps=1))
    with pytest.raises(ValueError, match="latents are on another scale"):
        memorization_audit(cascade, num=4, space="latent", reference_steps=0)
    report = memorization_audit(cascade, num=4, space="latent", threshold=0.5, reference_steps=0)
    assert report.space == "latent" and report.generated["threshold"] == 0.5
