"""The accelerator path without an accelerator: one training step of every stage and one
sampling call with every tensor on a fake `cuda` device.

Under `FakeTensorMode` a CPU-only build of torch creates tensors on `cuda` (shapes and devices,
no data) and raises `FakeTensorDeviceMismatchError` the moment a tensor left on the host meets a
device tensor; a read of a device value on the host (`.item()`, `float()`, `bool()`) raises
`DataDependentOutputException`, so a step that passes here also has no host sync. The stage is
built on the host as the trainer builds it, then moved by `Stage.to`, and the batch goes through
the loader's `batch_to_device`, exactly as the engine does it. (Backward and the DeepSpeed
engines need a real device; CPU runs of those are in test_precision_offload.py.)
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, FakeTensorDeviceMismatchError,
                                           unset_fake_temporarily,
                                          FakeTensorMode)
from torch.utils._python_dispatch import TorchDispatchMode

from data_pipeline.stream import batch_to_device
from tests.eval.eval_helpers import tiny_config, write_checkpoint
from trainer.config import DeepSpeedConfig
from trainer.diffusion import sampling_timesteps
from trainer.flat_params import flatten_parameters
from trainer.models import layers
from trainer.sampling import SamplerSettings, generate
from trainer.stages import build_stage
from trainer.stages.base import Stage

CUDA = torch.device("cuda")
CAPTIONS = ["a large red circle at the top left", "a small blue square at the centre", "", "two green triangles"]


def uint8_batch(*shape: int, **extra: torch.Tensor) -> dict:
    """A loader batch as the stream hands it over: uint8 pixels, captions, keys, valid flags."""
    g = torch.Generator().manual_seed(0)
    B = shape[0]
    return {"__key__": [f"k{i}" for i in range(B)], "caption": CAPTIONS[:B], "json": [{}] * B,
            "valid": torch.tensor([True] * (B - 1) + [False]),
            **{k: torch.randint(0, 256, v, generator=g, dtype=torch.uint8) for k, v in
               {"image" if len(shape) == 4 else "video": shape}.items()},
            **extra}


@contextmanager
def fake_cuda() -> Iterator[None]:
    """Fake tensors on a fake `cuda` (reentrant); position tables cached for it are dropped
    afterwards."""
    if isinstance(torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE), FakeTensorMode):
        yield
        return
    layers.sincos_table.cache_clear()
    layers.rope_table.cache_clear()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        layers.sincos_table.cache_clear()
        layers.rope_table.cache_clear()


def one_step_on_fake_cuda(stage: Stage, batch: dict) -> list[str]:
    """The engine's step body on `cuda`: every loss, and every tensor metric, on the device."""
    with fake_cuda():
        stage.to(CUDA)
        players = []
        for player, loss, info in stage.losses(batch_to_device(batch, CUDA), torch.Generator().manual_seed(0)):
            assert loss.device.type == "cuda" and loss.dim() == 0, player
            for name, value in info.items():
                for v in value if isinstance(value, tuple) else (value,):
                    assert not isinstance(v, torch.Tensor) or v.device.type == "cuda", (player, name)
            players.append(player)
        return players


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny pretraining checkpoint (random weights) for the distillation stages."""
    root = tmp_path_factory.mktemp("teacher")
    return write_checkpoint(tiny_config(root, f"checkpoint.dir={root}/checkpoints"))


def test_pretrain_image_step_on_device(tmp_path):
    stage = build_stage(tiny_config(tmp_path))
    assert one_step_on_fake_cuda(stage, uint8_batch(4, 3, 16, 16)) == ["student"]


def test_flat_block_parameters_step_on_device(tmp_path):
    """Flattened on the host and moved (the views follow the flat parameter to the device)."""
    stage = build_stage(tiny_config(tmp_path, "model.flat_params=true"))
    for block in stage.players["student"].blocks:
        flatten_parameters(block)
    assert one_step_on_fake_cuda(stage, uint8_batch(4, 3, 16, 16)) == ["student"]
    assert {block.flat_params.device.type for block in stage.players["student"].blocks} == {"cuda"}


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_pretrain_video_step_on_device(tmp_path, attention):
    cfg = tiny_config(tmp_path, "model.video=true", "data.kind=video", "data.num_frames=4",
                      f"model.attention={attention}", "model.positions=rope")
    assert one_step_on_fake_cuda(build_stage(cfg), uint8_batch(2, 3, 4, 16, 16)) == ["student"]


def test_an_image_batch_of_a_video_model_ties_its_temporal_attention_on_device(tmp_path):
    """Joint image-video training: a still runs the temporal attention on one token, weighted 0,
    as the engine prepares the student (`trainer.parallel.tie_idle_temporal`); on the device too.
    The bucket's noise schedule is built on the host first, once, as in a run."""
    from trainer.parallel import prepare_for_training

    cfg = tiny_config(tmp_path, "model.video=true", "data.kind=video", "data.num_frames=4", "model.positions=rope")
    stage = build_stage(cfg)
    prepare_for_training(stage.players["student"], cfg.model)
    stage.schedule_for((3, 1, 16, 16))
    assert one_step_on_fake_cuda(stage, uint8_batch(2, 3, 1, 16, 16)) == ["student"]


def test_superres_step_on_device(tmp_path):
    cfg = tiny_config(tmp_path, "stage.kind=superres", "model.superres=true", "data.sr_resolution=32")
    lowres = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert one_step_on_fake_cuda(build_stage(cfg), uint8_batch(4, 3, 32, 32, image_lr=lowres)) == ["student"]


def test_progressive_step_on_device(tmp_path, teacher):
    cfg = tiny_config(tmp_path, "stage.kind=progressive", f"stage.teacher={teacher}", "stage.rounds=[2,1]",
                      "model.guidance_embed=true", "diffusion.loss_weighting=trunc_snr")
    assert one_step_on_fake_cuda(build_stage(cfg), uint8_batch(4, 3, 16, 16)) == ["student"]


def test_adversarial_step_on_device(tmp_path, teacher):
    cfg = tiny_config(tmp_path, "stage.kind=adversarial", f"stage.teacher={teacher}", "stage.rounds=[2,1]",
                      "diffusion.loss_weighting=trunc_snr", "stage.guidance_min=4", "stage.guidance_max=4")  # CFG
    assert one_step_on_fake_cuda(build_stage(cfg), uint8_batch(4, 3, 16, 16)) == ["student", "disc"]


def on_host(build):
    """`build` run on real tensors inside fake_cuda(): the sampler's time grid is host arithmetic."""
    def run(*args, **kwargs):
        with unset_fake_temporarily():
            return build(*args, **kwargs)
    return run


def test_latent_step_and_sampling_on_device(tmp_path, monkeypatch):
    """Precomputed latents (no encoder call) and the sampler with CFG, both on the device. The
    sampler's time grid is host arithmetic by design (floats read once per call, no device
    value): it is built from real tensors here, as fake ones have no values to read."""
    import trainer.sampling
    from trainer.diffusion import samplers

    monkeypatch.setattr(trainer.sampling, "sampling_timesteps", on_host(sampling_timesteps))
    monkeypatch.setattr(samplers, "_Grid", on_host(samplers._Grid))
    stage = build_stage(tiny_config(tmp_path, "model.in_channels=3"))
    latents = torch.randn(4, 3, 16, 16)
    batch = {k: v for k, v in uint8_batch(4, 3, 16, 16, latent=latents).items() if k != "image"}
    with fake_cuda():
        assert one_step_on_fake_cuda(stage, batch) == ["student"]
        x0 = generate(stage.players["student"], stage.text, stage.schedule, "v", CAPTIONS[:2], (3, 16, 16),
                      SamplerSettings(steps=3, cfg_scale=3.0), torch.Generator().manual_seed(0))
        assert x0.device.type == "cuda" and tuple(x0.shape) == (2, 3, 16, 16)
        assert stage.decode(x0).device.type == "cuda"


class HostTensorStage(Stage):
    """A stage with one tensor made on the host by mistake: the harness must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.players = {"student": torch.nn.Linear(3, 1)}

    def losses(self, batch, generator):
        pred = self.run("student", batch["image"].mean((2, 3)))  # (B, 1)
        weight = torch.ones(pred.shape[0])  # the bug: should be pred.new_ones(...)
        yield "student", (pred[:, 0] * weight).mean(), {}


def test_a_host_tensor_in_a_stage_is_caught():
    with pytest.raises(FakeTensorDeviceMismatchError):
        one_step_on_fake_cuda(HostTensorStage(), uint8_batch(4, 3, 16, 16))


def test_video_superres_step_on_device(tmp_path):
    """Clips with their low-resolution pairs (`video_lr`, as the loader names them)."""
    cfg = tiny_config(tmp_path, "stage.kind=superres", "model.superres=true", "data.sr_resolution=32",
                      "model.video=true", "data.kind=video", "data.num_frames=4")
    lowres = torch.randint(0, 256, (2, 3, 4, 16, 16), dtype=torch.uint8)
    assert one_step_on_fake_cuda(build_stage(cfg), uint8_batch(2, 3, 4, 32, 32, video_lr=lowres)) == ["student"]


def test_video_autoencoder_step_on_device(tmp_path):
    """The autoencoder stage on clips trains the 2-D autoencoder on their frames."""
    cfg = tiny_config(tmp_path, "stage.kind=autoencoder", "data.kind=video", "data.num_frames=4",
                      f"model.autoencoder.path={tmp_path / 'ae'}")
    stage = build_stage(cfg)
    batch = uint8_batch(2, 3, 4, 16, 16)
    assert tuple(stage.pixels(batch_to_device(batch, torch.device("cpu"))).shape) == (8, 3, 16, 16)
    assert one_step_on_fake_cuda(stage, batch) == ["student"]


@pytest.mark.parametrize("zero, grad_clip", [(2, 1.0), (0, 1.0), (0, 0.0)])
def test_optimizer_step_and_ema_update_stay_on_the_device(zero, grad_clip):
    """The finite guard, torch's fused AdamW behind it and the EMA update read nothing on the
    host: the skip flag reaches the fused kernel (`found_inf`) and the EMA's weight on the
    device; a host read of a fake value would raise DataDependentOutputException. At ZeRO-0
    (fp32) the guard also computes the gradient norm, and clips to it, on the device."""
    from trainer.config import EMAConfig, OptimConfig
    from trainer.ema import EMA
    from trainer.optim import build_optimizer

    with fake_cuda(), torch.device(CUDA):
        net = torch.nn.Linear(4, 4)
        opt = build_optimizer(list(net.parameters()), 1e-3, OptimConfig(grad_clip=grad_clip),
                              DeepSpeedConfig(zero_stage=zero), CUDA)
        ema = EMA(net, EMAConfig())
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        skipped = opt.take_skip()
        assert isinstance(skipped, torch.Tensor) and skipped.device.type == "cuda"
        ema.update(net, skipped)
        assert all(s.device.type == "cuda" for s in ema.shadow.values())
        with pytest.raises(DataDependentOutputException):
            bool(skipped)  # what the guard used to do every step


def test_process_group_backend_follows_deepspeeds_accelerator(monkeypatch):
    """A job on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, as here) keeps its tensors on
    the host, so its process group is gloo even on a machine where torch sees a GPU: NCCL would
    refuse the first collective's host tensor."""
    from deepspeed.accelerator import get_accelerator

    from trainer.distributed import process_group_backend

    assert get_accelerator().device_name() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_group_backend() == "gloo"


class BlockingCopies(TorchDispatchMode):
    """Records the host-to-device copies made without `non_blocking`: torch makes each one wait
    for the device's queue (it syncs the stream after the copy), which FakeTensorMode cannot see."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            src, dst, blocking = args[0], kwargs.get("device"), not kwargs.get("non_blocking", False)
        elif func is torch.ops.aten.copy_.default:
            src, dst, blocking = args[1], args[0].device, not (args[2] if len(args) > 2 else kwargs.get("non_blocking"))
        else:
            src = dst = None
        if (isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst is not None
                and torch.device(dst).type == "cuda" and blocking):
            self.copies.append(tuple(src.shape))
        return func(*args, **(kwargs or {}))


def test_per_step_times_reach_the_device_without_waiting_for_it():
    """A sampler step's times and a distillation step's time grid are made on the device (a
    fill) or copied there non-blocking: a blocking copy from the host, three per sampler step
    and one per distillation micro-step, would keep the host from queueing ahead of the GPU."""
    from trainer.config import DiffusionConfig
    from trainer.diffusion import make_schedule
    from trainer.diffusion.distill import student_step_times
    from trainer.diffusion.utils import batch_t

    schedule = make_schedule(DiffusionConfig())
    with fake_cuda():
        x, k = torch.zeros(4, 3, 8, 8, device=CUDA), torch.zeros(4, dtype=torch.long, device=CUDA)
        t = torch.full((), 0.25, device=CUDA)
        with BlockingCopies() as copies:
            times = [batch_t(0.5, x), batch_t(t, x), *student_step_times(schedule, 2, 2, k)]
    assert all(t.device.type == "cuda" and tuple(t.shape) == (4,) for t in times)
    assert copies.copies == []


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("per_prompt", [False, True])
def test_step_noise_from_host_generators_reaches_the_device_without_waiting_for_it(monkeypatch, sampler, per_prompt):
    """DDPM and DDIM-eta draw fresh noise each step from seeded CPU generators (the same samples
    on every device): the initial noise and each step's reach the GPU from pinned memory,
    non-blocking; a plain copy would make the host wait for the device's queue every step."""
    from trainer.config import DiffusionConfig
    from trainer.diffusion import make_schedule
    from trainer.diffusion import samplers
    from trainer.diffusion.utils import randn

    monkeypatch.setattr(samplers, "_Grid", on_host(samplers._Grid))
    schedule = make_schedule(DiffusionConfig())
    ts = sampling_timesteps(schedule, 4, "trailing")
    seeds = [torch.Generator().manual_seed(i) for i in range(2)] if per_prompt else torch.Generator().manual_seed(0)
    kwargs = {"eta": 1.0} if sampler == "ddim" else {}
    with fake_cuda():
        with BlockingCopies() as copies:
            x = randn((2, 4, 8, 8), seeds, CUDA)  # (B, C, h, w)
            out = samplers.SAMPLERS[sampler](lambda x, t: torch.zeros_like(x), x, ts, schedule, "v", generator=seeds, **kwargs)
    assert out.device.type == "cuda"
    assert copies.copies == []


@contextmanager
def cuda_autocast() -> Iterator[None]:
    """CUDA's bf16 autocast on this CPU-only build (torch.autocast("cuda") refuses to start
    without a GPU; its rules are registered all the same)."""
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.set_autocast_enabled("cuda", True)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", False)


def test_queries_and_keys_reach_attention_in_bf16_under_cuda_autocast(tmp_path, monkeypatch):
    """Under CUDA's bf16 autocast q, k and v reach attention in bf16: CUDA's autocast runs
    rms_norm (the qk-norm) in float32, and a float32 rotary table promotes q and k, which then
    take twice the memory and are cast back by attention's own rule. (The DiT's attention: the
    text encoder computes in its own precision, float32 here.)"""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, *args, **kwargs)

    cfg = tiny_config(tmp_path, "model.video=true", "data.kind=video", "data.num_frames=4", "model.positions=rope")
    stage = build_stage(cfg)
    with fake_cuda():
        stage.to(CUDA)
        batch = batch_to_device(uint8_batch(2, 3, 4, 16, 16), CUDA)
        stage.text.encode(batch["caption"])  # cached now: the text encoder's attention (model.text.precision) is not the DiT's
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        with cuda_autocast():
            for _ in stage.losses(batch, torch.Generator().manual_seed(0)):
                pass
    assert seen and set(seen) == {(torch.bfloat16,) * 3}, set(seen)
