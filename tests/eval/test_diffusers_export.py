"""`dit export`: safetensors + config JSON, and a diffusers directory whose pipeline, loaded back
by diffusers, samples what our DDIM sampler samples from the same noise."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.cli import main as dit
from tests.eval.eval_helpers import tiny_config, write_autoencoder, write_checkpoint
from trainer.checkpoint import load_for_inference, load_init_weights
from trainer.export import compare_with_pipeline, load_pipeline

PROMPTS = ["a large red circle at the top left", "a small blue square in the centre"]


@pytest.fixture(scope="module")
def latent_checkpoint(tmp_path_factory) -> Path:
    """A latent DiT (16 px images, 8x8x4 latents of a random AutoencoderKL with scale and shift)."""
    root = tmp_path_factory.mktemp("latent")
    ae = write_autoencoder(root / "autoencoder")
    cfg = tiny_config(root / "run", "model.in_channels=4", "model.autoencoder.kind=kl", f"model.autoencoder.path={ae}")
    return write_checkpoint(cfg)


def test_safetensors_export_holds_the_ema_weights(latent_checkpoint, tmp_path):
    assert dit(["export", str(latent_checkpoint), "--format", "safetensors", "--out", str(tmp_path)]) == 0
    _, ema = load_for_inference(latent_checkpoint)
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["weights"] == "ema" and config["run_config"]["model"]["in_channels"] == 4
    assert config["dit_spec"]["preset"]["depth"] == 4


def test_diffusers_export_matches_dit_sample(latent_checkpoint, tmp_path):
    out = tmp_path / "diffusers"
    assert dit(["export", str(latent_checkpoint), "--format", "diffusers", "--out", str(out)]) == 0  # verifies itself
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["rescale_betas_zero_snr"], scheduler["timestep_spacing"]) == (
        "v_prediction", True, "trailing")
    pipe = load_pipeline(out)
    assert type(pipe.vae).__name__ == "AutoencoderKL" and pipe.vae.config.scaling_factor == pytest.approx(1.3)
    images = pipe(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and float((images[0] - images[1]).abs().max()) > 0.05  # not trivial
    assert compare_with_pipeline(pipe, latent_checkpoint, PROMPTS, steps=10) < 1e-4
    # 7 does not divide T = 1000: DDIMScheduler.step would go to t - 142, off the trailing grid (0.04 apart)
    assert compare_with_pipeline(pipe, latent_checkpoint, PROMPTS, steps=7) < 1e-4
    # the scheduler's own trailing grid at 61 steps ends in the index -1 (float error in its
    # arange): its next-to-last step went back to nearly pure noise (pixels 1.0 apart)
    assert compare_with_pipeline(pipe, latent_checkpoint, PROMPTS, steps=61) < 1e-4
    # an empty or blank prompt is the null caption in both (the pipeline encoded it: 0.79 apart)
    assert compare_with_pipeline(pipe, latent_checkpoint, ["", "  ", PROMPTS[0]], steps=4) < 1e-4
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    assert compare_with_pipeline(pipe, latent_checkpoint, PROMPTS, steps=10) > 1e-2  # the check can fail


@pytest.mark.parametrize("dtype, within", [(torch.bfloat16, 0.05), (torch.float16, 0.01)], ids=["bf16", "fp16"])
def test_the_pipeline_samples_in_the_dtype_it_is_loaded_in(latent_checkpoint, tmp_path, dtype, within):
    """`from_pretrained(..., torch_dtype=torch.bfloat16)`, diffusers' usual way to halve memory:
    transformer, text encoder and VAE load in that dtype and sample under its autocast, the
    steps in fp32. It failed at the first forward (fp32 latents into bf16 weights). Measured:
    0.020 (bf16) and 0.0026 (fp16) from the fp32 pipeline at most, where the two prompts'
    images are 0.16 apart on average."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "diffusers"
    assert dit(["export", str(latent_checkpoint), "--format", "diffusers", "--out", str(out), "--no-verify"]) == 0
    images = {}
    for loaded in (torch.float32, dtype):
        pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True, torch_dtype=loaded)
        assert {pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {loaded}
        pipe.set_progress_bar_config(disable=True)
        images[loaded] = pipe(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                              output_type="pt").images  # (2, 3, 16, 16)
    full, half = images[torch.float32], images[dtype]
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert float((half - full).abs().max()) < within
    assert float((half - full).abs().mean()) < 0.1 * float((full[0] - full[1]).abs().mean())


def test_a_vae_with_per_channel_latent_statistics_decodes_as_ours(tmp_path):
    """A 2-D AutoencoderKL whose config carries latents_mean / latents_std (as Playground's and
    SDXL-style VAEs do): we decode with them (`Autoencoder.decode`), and so must the pipeline
    (without them its samples were 0.55 apart in pixels)."""
    ae = write_autoencoder(tmp_path / "autoencoder")
    config = json.loads((ae / "config.json").read_text())
    config.update(latents_mean=[0.5, -0.3, 0.2, 0.1], latents_std=[2.0, 0.5, 1.5, 0.8])
    (ae / "config.json").write_text(json.dumps(config))
    checkpoint = write_checkpoint(tiny_config(tmp_path / "run", "model.in_channels=4", "model.autoencoder.kind=kl",
                                              f"model.autoencoder.path={ae}"))
    out = tmp_path / "diffusers"
    assert dit(["export", str(checkpoint), "--format", "diffusers", "--out", str(out), "--device", "cpu"]) == 0
    assert load_pipeline(out).vae.config.latents_std == [2.0, 0.5, 1.5, 0.8]


def test_learned_null_exports_to_both_formats(tmp_path):
    """model.text.null=learned: the DiT's null caption is in model.safetensors and in the diffusers
    transformer, whose pipeline's unconditional branch uses it as our sampler does."""
    cfg = tiny_config(tmp_path / "run", "model.text.null=learned")
    checkpoint = write_checkpoint(cfg)  # perturbed weights: the null is nonzero
    assert dit(["export", str(checkpoint), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    exported, (_, ema) = load_file(str(tmp_path / "st" / "model.safetensors")), load_for_inference(checkpoint)
    assert torch.count_nonzero(ema["embed.null_tokens"]) > 0
    assert all(torch.equal(exported[k], ema[k]) for k in ("embed.null_tokens", "embed.null_pooled"))
    out = tmp_path / "diffusers"
    assert dit(["export", str(checkpoint), "--format", "diffusers", "--out", str(out), "--no-verify"]) == 0
    pipe = load_pipeline(out)  # checked below, against our sampler
    assert pipe.transformer.config.learned_null
    assert torch.equal(pipe.transformer.dit.embed.null_pooled.detach(), ema["embed.null_pooled"])
    assert compare_with_pipeline(pipe, checkpoint, PROMPTS, steps=4) < 1e-4
    with torch.no_grad():
        pipe.transformer.dit.embed.null_pooled.zero_()
        pipe.transformer.dit.embed.null_tokens.zero_()
    assert compare_with_pipeline(pipe, checkpoint, PROMPTS, steps=4) > 1e-3  # the check can fail


def test_a_bf16_text_encoder_exports_to_what_dit_sample_samples(tmp_path):
    """model.text.precision=bf16: a bf16 encoder's states depend on the batch they are computed in
    (0.008 apart between 2 and 16 captions); the pipeline encodes in our sampler's chunks, so the
    export's own check passes (it failed at 1.3e-3 encoding the 2 prompts alone) at any batch."""
    checkpoint = write_checkpoint(tiny_config(tmp_path / "run", "model.text.precision=bf16"))
    out = tmp_path / "diffusers"
    assert dit(["export", str(checkpoint), "--format", "diffusers", "--out", str(out), "--device", "cpu"]) == 0
    pipe = load_pipeline(out)
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert compare_with_pipeline(pipe, checkpoint, PROMPTS[:1], steps=4) < 1e-4


def test_a_distilled_student_is_refused_before_anything_is_written(tmp_path, capsys):
    """The pipeline runs CFG over the scheduler's steps (25 by default); a few-step student takes
    neither, so its export would not sample what `dit sample` does: refused naming stage.kind."""
    cfg = tiny_config(tmp_path / "student", "stage.kind=progressive", "stage.teacher=/unused", "stage.rounds=[2]",
                      "model.guidance_embed=true", "diffusion.loss_weighting=trunc_snr")
    checkpoint = write_checkpoint(cfg)
    for verify in ([], ["--no-verify"]):
        out = tmp_path / f"diffusers{len(verify)}"
        assert dit(["export", str(checkpoint), "--format", "diffusers", "--out", str(out), *verify]) == 2
        assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
        assert "stage.kind" in (err := capsys.readouterr().err) and "--format safetensors" in err
    assert dit(["export", str(checkpoint), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0


@pytest.mark.parametrize("given, why", [(["--format", "safetensors", "--verify-steps", "20"], "--format safetensors"),
                                        (["--format", "diffusers", "--no-verify", "--tolerance", "1e-3"], "--no-verify"),
                                        (["--verify-steps", "10", "--tolerance", "0.1"], "--format safetensors")])
def test_options_of_a_check_that_does_not_run_are_refused(tmp_path, capsys, given, why):
    """--verify-steps and --tolerance set the diffusers export's check: with --format safetensors
    (the default) or --no-verify they were ignored without a word; refused as arguments (exit 2)
    before the checkpoint is read, even at their default values."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        dit(["export", str(tmp_path / "not_read"), "--out", str(out), *given])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and not out.exists()
    assert all(flag in err for flag in given if flag in ("--verify-steps", "--tolerance")) and why in err


def test_an_export_replaces_an_earlier_one_whole_and_refuses_a_folder_of_other_files(tmp_path, capsys):
    """A diffusers export written into a folder holding a safetensors export of another run kept
    that run's model.safetensors beside it, which a warm start from the folder loaded while its
    record named the new checkpoint. An export now replaces an earlier one whole, and a folder
    holding anything else (or a file) is refused before any work, naming --out."""
    first = write_checkpoint(tiny_config(tmp_path / "first"))
    second = write_checkpoint(tiny_config(tmp_path / "second"), seed=1)
    out = tmp_path / "export"
    assert dit(["export", str(first), "--format", "safetensors", "--out", str(out)]) == 0
    assert dit(["export", str(second), "--format", "diffusers", "--out", str(out), "--no-verify"]) == 0
    assert not (out / "model.safetensors").exists() and (out / "transformer").is_dir()
    ema = load_for_inference(second)[1]
    assert all(torch.equal(w, ema[name]) for name, w in load_init_weights(out).items())  # the record's checkpoint
    assert dit(["export", str(first), "--format", "safetensors", "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()} and not (out / "transformer").exists()
    (out / "README.md").write_text("a model card")  # added to an export: not replaced away
    assert dit(["export", str(first), "--format", "safetensors", "--out", str(out)]) == 2
    assert "did not write (README.md)" in capsys.readouterr().err and (out / "README.md").is_file()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    for target in (notes, notes / "mine.txt"):
        assert dit(["export", str(first), "--format", "safetensors", "--out", str(target)]) == 2
        assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in notes.iterdir()) == ["mine.txt"] and not list(tmp_path.glob(".tmp-*"))


def test_an_export_through_a_link_replaces_its_target_and_never_the_working_directory(tmp_path, monkeypatch,
                                                                                        capsys):
    """--out a link (exports/latest -> v3) became a real folder beside a stray link; --out . pulled
    the shell's working directory away. The link's target is replaced; a folder holding the
    working directory is refused."""
    checkpoint = write_checkpoint(tiny_config(tmp_path / "run"))
    (tmp_path / "v3").mkdir()
    (tmp_path / "latest").symlink_to("v3")
    assert dit(["export", str(checkpoint), "--out", str(tmp_path / "latest")]) == 0
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "v3" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run", "v3"]
    monkeypatch.chdir(tmp_path / "v3")
    for out in (".", str(tmp_path)):
        assert dit(["export", str(checkpoint), "--out", out]) == 2
        assert "holds the working directory" in capsys.readouterr().err
