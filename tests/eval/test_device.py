"""`--device` of `dit sample`, `dit eval ...`, `dit export` and `dit bench model`, and the cascade's
device path.

On a CPU-only machine: the flag's default resolves to cpu, `--device cpu` is accepted, a bad
value stops the command at parsing with one error line and exit 2, and a whole cascade (base,
noise-augmented super-resolution, distilled student) samples with every tensor on a fake `cuda`
device (tests/trainer/test_device_path.py explains the fake device). With a GPU, samples on it
match the CPU's for the same seed, the diffusers export verifies there and the memorization
audit agrees with the CPU's.
"""
from __future__ import annotations

import re
import json
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

from launch.cli import build_parser
from launch.cli import main as dit
from tests.eval.eval_helpers import tiny_config, write_autoencoder, write_cascade, write_checkpoint
from tests.trainer.test_device_path import CUDA, fake_cuda
from trainer.cascade import Cascade
from trainer.sampling import SamplerSettings

PROMPTS = ["a large red circle at the top left", "a small blue square in the centre"]
COMMANDS = {  # each command that runs a model, with its required arguments
    "sample": ["sample", "CKPT", "--out", "OUT"],
    "eval adherence": ["eval", "adherence", "CKPT"],
    "eval distance": ["eval", "distance", "CKPT"],
    "eval memorization": ["eval", "memorization", "CKPT"],
    "export": ["export", "CKPT", "--out", "OUT"],
    "bench model": ["bench", "model"],
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is false)")


@pytest.fixture(scope="module")
def cascade_yaml(tmp_path_factory) -> Path:
    """A tiny base model (16 px) and super-resolution model (16 -> 32 px) with random weights."""
    return write_cascade(tmp_path_factory.mktemp("device_cascade"))


# ------------------------------------------------------------------------------- the flag


@pytest.mark.parametrize("command", COMMANDS)
def test_default_device_is_the_accelerator_else_cpu(command):
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert build_parser().parse_args(COMMANDS[command]).device == expected
    assert build_parser().parse_args([*COMMANDS[command], "--device", "cpu"]).device == torch.device("cpu")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("bad, says", [("gpu", "'gpu' is not a device"), ("meta", "no meta device"),
                                       ("cuda:99", "cuda")])
def test_bad_device_is_refused_at_parsing(command, bad, says, capsys):
    if bad.startswith("cuda") and not torch.cuda.is_available():
        says = "no cuda device"
    with pytest.raises(SystemExit) as stop:
        dit([*COMMANDS[command], "--device", bad])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"dit {command}: error: argument --device: ") and says in last, last


@pytest.mark.parametrize("command", ["sample", "eval adherence", "eval distance", "eval memorization"])
@pytest.mark.parametrize("option, bad, says", [("--steps", "0", "must be at least 1"),
                                               ("--batch-size", "0", "must be at least 1"),
                                               ("--cfg", "-5", "a guidance scale is at least 0"),
                                               ("--guidance-rescale", "7", "a fraction in [0, 1]")])
def test_bad_sampler_numbers_are_refused_at_parsing(command, option, bad, says, capsys):
    """They crashed with a traceback once the models were loaded (a zero batch, zero steps), or
    sampled silently with a rescale phi of 7."""
    with pytest.raises(SystemExit) as stop:
        dit([*COMMANDS[command], option, bad])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"dit {command}: error: argument {option}: ") and says in last, last


def test_more_steps_than_the_schedule_stop_sampling_with_one_line(cascade_yaml, tmp_path, capsys):
    assert dit(["sample", str(cascade_yaml), "--prompt", "x", "--steps", "5000", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"[\r\n]dit sample: 5000 sampling steps: .* 1 to diffusion.num_timesteps=1000", err, re.M), err


def test_sample_on_explicit_cpu(cascade_yaml, tmp_path, capsys):
    out = tmp_path / "samples"
    assert dit(["sample", str(cascade_yaml), "--prompt", PROMPTS[0], "--steps", "2", "--device", "cpu",
                "--out", str(out)]) == 0
    assert json.loads((out / "samples.json").read_text())["device"] == "cpu"
    assert " on cpu in " in capsys.readouterr().out


# ------------------------------------------------------------------------------- fake cuda


@pytest.fixture
def host_time_grid(monkeypatch):
    """The sampler's time grid built from real tensors (host arithmetic by design; fake tensors
    have no values to read), as in test_device_path.test_latent_step_and_sampling_on_device."""
    import trainer.sampling
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from trainer.diffusion import samplers

    def on_host(build):
        def run(*args, **kwargs):
            with unset_fake_temporarily():
                return build(*args, **kwargs)
        return run

    monkeypatch.setattr(trainer.sampling, "sampling_timesteps", on_host(trainer.sampling.sampling_timesteps))
    monkeypatch.setattr(samplers, "_Grid", on_host(samplers._Grid))


def on_fake_cuda(cascade: Cascade) -> Cascade:
    """The stages moved as `load_stage(device=...)` moves them (checkpoint files cannot be read
    inside the fake mode, so they are loaded on the host first): `Stage.to` must carry the
    loaded network, which is the stage's player."""
    for s in cascade.stages:
        s.stage.to(CUDA)
        assert next(s.net.parameters()).device.type == "cuda"
    assert cascade.device.type == "cuda"
    return cascade


def test_cascade_samples_on_fake_cuda(cascade_yaml, host_time_grid):
    cascade = Cascade.load(cascade_yaml, SamplerSettings(steps=2), device="cpu")
    with fake_cuda():
        pixels = on_fake_cuda(cascade).sample(PROMPTS, torch.Generator().manual_seed(0))
        assert pixels.device.type == "cuda" and tuple(pixels.shape) == (2, 3, 32, 32)
        batched = cascade.sample_batched(PROMPTS, torch.Generator().manual_seed(0), batch_size=1,
                                         finite=False)  # a fake tensor's values cannot be read
        assert batched.device.type == "cpu" and tuple(batched.shape) == (2, 3, 32, 32)  # back for saving


def test_distilled_student_samples_on_fake_cuda(tmp_path, host_time_grid):
    cfg = tiny_config(tmp_path / "student", "stage.kind=progressive", "stage.teacher=/unused", "stage.rounds=[2]",
                      "model.guidance_embed=true", "diffusion.loss_weighting=trunc_snr")
    cascade = Cascade.load(write_checkpoint(cfg), SamplerSettings(), device="cpu")
    with fake_cuda():
        pixels = on_fake_cuda(cascade).sample(PROMPTS, torch.Generator().manual_seed(0))
        assert pixels.device.type == "cuda" and tuple(pixels.shape) == (2, 3, 16, 16)


def test_a_helper_left_on_the_host_is_caught(cascade_yaml, host_time_grid):
    cascade = Cascade.load(cascade_yaml, SamplerSettings(steps=2), device="cpu")
    sr = cascade.stages[1].stage
    sr.helpers = lambda: [sr.autoencoder]  # the bug: the text encoder is not listed, so not moved
    with fake_cuda(), pytest.raises(FakeTensorDeviceMismatchError):
        on_fake_cuda(cascade).sample(PROMPTS, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------- real GPU


@needs_cuda
def test_cuda_samples_match_cpu_for_a_seed(cascade_yaml):
    """CPU generators: the same noise on both devices, so only float rounding differs."""
    samples = {device: Cascade.load(cascade_yaml, SamplerSettings(steps=3), device=device)
               .sample_batched(PROMPTS, torch.Generator().manual_seed(0)) for device in ("cpu", "cuda")}
    assert samples["cuda"].device.type == "cpu"
    assert float((samples["cuda"] - samples["cpu"]).abs().max()) < 1e-3


@needs_cuda
@pytest.mark.parametrize("trained", ["fp32", "bf16"])
def test_diffusers_export_verifies_on_cuda(tmp_path, capsys, trained):
    """A run trained in bf16 too: the check compares with our sampler in float32, as the pipeline
    runs (not in the bf16 autocast `dit sample` uses there: 1.5e-2 apart)."""
    ae = write_autoencoder(tmp_path / "autoencoder")
    cfg = tiny_config(tmp_path / "run", "model.in_channels=4", "model.autoencoder.kind=kl",
                      f"model.autoencoder.path={ae}", f"deepspeed.precision={trained}")
    checkpoint = write_checkpoint(cfg)
    assert dit(["export", str(checkpoint), "--format", "diffusers", "--device", "cuda",
                "--out", str(tmp_path / "diffusers")]) == 0
    assert "diffusers check on cuda" in capsys.readouterr().out


@needs_cuda
def test_memorization_audit_on_cuda_agrees_with_cpu(tmp_path):
    from data_pipeline.synth import synth_samples
    from data_pipeline.write import write_shards
    from trainer.evaluate import memorization_audit

    write_shards(synth_samples(48, seed=0, size=16), str(tmp_path / "data"), shard_size=24, progress=False)
    checkpoint = write_checkpoint(tiny_config(tmp_path))
    reports = {device: memorization_audit(Cascade.load(checkpoint, SamplerSettings(steps=2), device=device),
                                          num=8, reference_steps=10) for device in ("cpu", "cuda")}
    assert reports["cuda"].closed_form["near_copy_fraction"] == reports["cpu"].closed_form["near_copy_fraction"]
    assert reports["cuda"].heldout == pytest.approx(reports["cpu"].heldout, abs=1e-4)
