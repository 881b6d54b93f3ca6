"""`dit plan` counts what the trainer builds, for every stage kind and precision: its trained and
frozen parameters are those of the modules `trainer.stages.build_stage` makes (a tiny
checkpoint as the distillations' teacher), and its frozen bytes those the trainer holds: the
helpers (text encoder, autoencoder, teacher) as `Stage.to` places them, in the training
precision, and the adversarial discriminator's frozen trunk copy as its real DeepSpeed engine
keeps it (one rank over gloo, built by `trainer.optim.build_engine` as the trainer builds it).
Its step time counts the frozen DiT forwards a distillation step runs: counted here on the real
stage's losses, per sample, over the rounds / step counts and the discriminator's phases. The
autoencoder stage's activations and MACs are those of a real forward of its loss; rounds that do
not fit a distilled teacher are refused on one line, as `dit train` refuses them."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from launch.cli import main
from launch.plan import Hardware, Layout, estimate, plan, zero_settings
from launch.plan_model import TRUNK_BACKWARD, autoencoder_stage_facts, model_facts
from tests.eval.eval_helpers import tiny_config, write_checkpoint
from tests.trainer.harness import ROOT, TINY, one_rank_group
from trainer.config import RunConfig, load_config
from trainer.distributed import DistContext
from trainer.numerics import PRECISIONS, autocast
from trainer.optim import build_engine
from trainer.stages import build_stage
from trainer.stages.base import Stage
from trainer.stages.distillation import DistillationStage

DISTILL = ("stage.rounds=[2,1]", "diffusion.loss_weighting=trunc_snr")
GUIDED = ("stage.guidance_min=4", "stage.guidance_max=4")  # a student without the guidance input: CFG at w = 4
KINDS = {
    "pretrain": (),
    "pretrain, bf16 text encoder": ("model.text.precision=bf16",),
    "superres": ("stage.kind=superres", "model.superres=true", "data.sr_resolution=32"),
    "autoencoder": ("stage.kind=autoencoder",),
    "progressive": ("stage.kind=progressive", *DISTILL, *GUIDED),
    "adversarial": ("stage.kind=adversarial", *DISTILL, *GUIDED),
    # a guidance-conditioned student of a CFG teacher: the heads embed w themselves
    "adversarial, guidance": ("stage.kind=adversarial", *DISTILL, "model.guidance_embed=true"),
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny pretraining checkpoint root (config.yaml + random EMA weights)."""
    root = tmp_path_factory.mktemp("teacher")
    return write_checkpoint(tiny_config(root, f"checkpoint.dir={root}/checkpoints"))


@pytest.fixture(scope="module")
def one_rank() -> Iterator[DistContext]:
    with one_rank_group() as ctx:
        yield ctx


def parameters(module: nn.Module, trained: bool) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad == trained]


def nbytes(params: list[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_plan_counts_the_parameters_and_frozen_bytes_the_trainer_holds(kind, precision, teacher, one_rank,
                                                                      tmp_path):
    distilled = (f"stage.teacher={teacher}",) if kind.startswith(("progressive", "adversarial")) else ()
    cfg = tiny_config(tmp_path, *KINDS[kind], *distilled, f"deepspeed.precision={precision}", "deepspeed.zero_stage=1")
    stage = build_stage(cfg).to(torch.device("cpu"), PRECISIONS[precision])  # as trainer.engine places it
    # The second player's engine, as the trainer builds it (the student's holds no frozen parameter).
    engines = {name: build_engine(module, cfg.optim.lr, cfg.optim, cfg.deepspeed, cfg.data.batch_size, one_rank,
                                  cfg.stage.steps, torch.device("cpu"))[0]
               for name, module in stage.players.items() if name != "student"}
    m = model_facts(cfg, zero_settings(cfg, 3).persistence_threshold)
    e = estimate(cfg, m, Hardware(gpus=1, cpu=True), Layout(1, 1, "none"))

    trained = {name: sum(p.numel() for p in parameters(module, True)) for name, module in stage.players.items()}
    assert trained == {"student": m.params, **({"disc": m.disc.params} if m.disc else {})}
    frozen_in_players = [p for module in stage.players.values() for p in parameters(module, False)]
    assert sum(p.numel() for module in stage.helpers() for p in module.parameters()) == m.frozen_params
    assert sum(p.numel() for p in frozen_in_players) == (m.disc.frozen_params if m.disc else 0)
    held = sum(nbytes(list(module.parameters())) for module in stage.helpers()) + \
        sum(nbytes(parameters(engine.module, False)) for engine in engines.values())
    assert e.frozen == held, f"{kind} {precision}: planned {e.frozen:,.0f} B, the trainer holds {held:,} B"


def samples_through(net: nn.Module, calls: list[int]) -> torch.utils.hooks.RemovableHandle:
    """Append the batch size of every pass through `net`'s blocks (its first block's input)."""
    return net.blocks[0].register_forward_pre_hook(lambda _module, args: calls.append(args[0].shape[0]))


def frozen_forwards(stage: DistillationStage, cfg: RunConfig, steps: list[int], batch_size: int = 2) -> float:
    """Samples the stage's frozen DiTs (teacher, discriminator trunk) run forward per trained
    sample, averaged over one batch at each of `steps` (0-based step counts)."""
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(batch_size, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1,
             "caption": ["a red circle"] * batch_size}
    calls: list[int] = []
    for step in steps:
        stage.start_of_step(step, lambda: stage.players["student"].state_dict())
        nets = [stage.teacher.net, *([stage.players["disc"].disc.trunk] if "disc" in stage.players else [])]
        handles = [samples_through(net, calls) for net in nets]
        for _player, loss, _info in stage.losses(batch, generator):
            loss.backward()
        for handle in handles:
            handle.remove()
    return sum(calls) / (batch_size * len(steps))


@pytest.mark.parametrize("kind", ["progressive", "adversarial"])
def test_step_time_counts_the_frozen_forwards_of_a_distillation_step(kind, teacher, tmp_path):
    """Progressive, rounds [2, 1] over 8 steps: round 1's teacher (a CFG diffusion model) takes
    two guided steps (4 forwards), round 2's (the student before it) two plain ones. Adversarial:
    the teacher's path for each step count, and the trunk's passes in both phases of D (steps
    0-3 conditional, 4-7 not); the plan adds the trunk's backward to the student's input."""
    cfg = tiny_config(tmp_path, *KINDS[kind], f"stage.teacher={teacher}")
    stage = build_stage(cfg)
    m = model_facts(cfg, zero_settings(cfg, 3).persistence_threshold)
    steps = [0, 4] if kind == "progressive" else [0, 1, 4, 5]
    counted = frozen_forwards(stage, cfg, steps) + (TRUNK_BACKWARD if kind == "adversarial" else 0)
    assert m.helper_forwards == pytest.approx(counted, rel=1e-12)
    assert m.teacher_macs == stage.teacher.net.macs((1, *m.latent_shape), m.text_len)


@pytest.fixture(scope="module")
def two_step_teacher(tmp_path_factory, teacher) -> Path:
    """A progressive run of one round over `teacher`: a 2-step distilled sampler."""
    root = tmp_path_factory.mktemp("two_step")
    return write_checkpoint(tiny_config(root, f"checkpoint.dir={root}/checkpoints", "stage.kind=progressive",
                                        "stage.rounds=[2]", *DISTILL[1:], "stage.guidance_max=1",
                                        f"stage.teacher={teacher}"))


@pytest.mark.parametrize("kind, rounds, why", [
    ("progressive", "[8,4]", "the first round's student has 1 steps, not 8"),
    ("adversarial", "[4,3]", "every student step count in [4, 3] must divide 2"),
])
def test_rounds_that_do_not_fit_the_teacher_are_one_line_naming_the_key(kind, rounds, why, two_step_teacher,
                                                                        tmp_path, capsys):
    """stage.rounds against a teacher distilled into 2 steps: `dit plan` refuses them as `dit
    train` does, on one line naming stage.rounds, exit 2, like validation's errors."""
    overrides = [f"run.out_dir={tmp_path}", f"data.shards={tmp_path}/data", f"stage.kind={kind}",
                 f"stage.rounds={rounds}", *DISTILL[1:], "stage.guidance_max=1", f"stage.teacher={two_step_teacher}"]
    assert main(["plan", str(TINY), *overrides, "--gpus", "2"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("dit plan: config error at 'stage.rounds': ") and why in out and out.count("\n") == 1, out


AUTOENCODER = ROOT / "configs" / "demo_autoencoder.yaml"


def real_forward(stage: Stage, batch: dict[str, torch.Tensor], precision: str) -> tuple[int, int]:
    """(bytes of the tensors autograd saves, parameters excluded; MACs) of the stage's loss
    computed for real on this CPU, the player in the training precision under its autocast.
    The MACs are counted in a second forward through SDPA's math kernel: its matmuls are
    operations torch's FLOP counter knows, the CPU flash kernel is not one."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    player = stage.players["student"].to(PRECISIONS[precision])
    params = {p.untyped_storage().data_ptr() for p in player.parameters()}
    with autocast(torch.device("cpu"), precision), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _player, _loss, _info in stage.losses(batch, torch.Generator().manual_seed(0)):
            pass
    with autocast(torch.device("cpu"), precision), FlopCounterMode(display=False) as flops, \
            sdpa_kernel(SDPBackend.MATH):
        for _player, _loss, _info in stage.losses(batch, torch.Generator().manual_seed(0)):
            pass
    return sum(n for ptr, n in saved.items() if ptr not in params), flops.get_total_flops() // 2


def test_the_autoencoder_stage_counts_the_same_macs_on_either_device():
    """The CPU trace counts the attentions' matmuls as the CUDA trace does (torch's FLOP
    counter has no formula for the CPU flash kernel: the mid-block attentions were left out)."""
    cfg = load_config(AUTOENCODER, ["run.out_dir=unused"])
    cpu, cuda = (autoencoder_stage_facts(cfg, 0, device).macs_per_sample for device in ("cpu", "cuda"))
    assert cpu == cuda


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_autoencoder_stage_plans_the_autoencoder_it_trains(precision, tmp_path, capsys):
    """configs/demo_autoencoder.yaml (its autoencoder not written yet): the plan reports the
    parameters of the autoencoder the stage trains, activations of the bytes autograd saves in
    a real forward of the stage's loss (a micro-batch of 3, one the plan did not trace), its
    forward MACs, and no layout with checkpointing or a pipeline (nothing splits the autoencoder)."""
    overrides = [f"run.out_dir={tmp_path}", f"deepspeed.precision={precision}", "data.batch_size=3"]
    cfg = load_config(AUTOENCODER, overrides)
    stage = build_stage(cfg)
    trained = sum(p.numel() for p in parameters(stage.players["student"], True))
    image = torch.rand(3, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    saved, macs = real_forward(stage, {"image": image}, precision)

    m, estimates = plan(cfg, Hardware(gpus=2, cpu=True))
    assert m.params == trained and m.frozen_params == 0
    assert {e.activations for e in estimates} == {saved}
    assert 3 * m.macs_per_sample == macs
    assert {(e.layout.pipeline_stages, e.layout.checkpoint_policy) for e in estimates} == {(1, "none")}
    assert main(["plan", str(AUTOENCODER), *overrides, "--gpus", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"model kl autoencoder [32, 64] x1 (autoencoder): {trained / 1e6:.1f}M trained parameters")
