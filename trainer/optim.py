"""The optimizers and DeepSpeed engines of the trained players: AdamW (fused on CUDA, DeepSpeed's
CPU Adam under ZeRO-Offload) behind a finite-gradient guard, the learning-rate schedule, and the
DeepSpeed JSON config derived from our typed sub-configs."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from trainer.config import DeepSpeedConfig, OptimConfig
from trainer.distributed import DistContext, max_over_ranks
from trainer.numerics import autocast_inside


class FiniteGuard:
    """Mixin for an optimizer: skip the update on every rank when any rank holds a non-finite
    gradient.

    DeepSpeed's ZeRO optimizers call the wrapped optimizer on each rank's partition after
    clipping (on the host for ZeRO-Offload), so one MAX all-reduce of a local flag makes all
    ranks skip together, and NaN or inf (from a non-finite loss or an exploding gradient) never
    reaches the weights. Where the optimizer is torch's fused AdamW the reduced flag is its
    `found_inf` (as torch's GradScaler hands it over): the kernel leaves weights, moments and
    step count as they were, and nothing is read on the host. Elsewhere (the multi-tensor AdamW
    on the host, DeepSpeed's CPU Adam under offload: both step on the host anyway) the flag is
    read and the step skipped here.

    `take_skip()` tells the engine whether the steps since it last asked were skipped: a
    (1,) device flag to read later, or a bool.
    """

    _skip: bool | torch.Tensor = False
    # None: DeepSpeed clips and reports the gradient norm. A number (`clips_in_guard`): the guard
    # computes the norm for the engine to report, and clips to it where > 0 (0: no clipping).
    clip_norm: Optional[float] = None

    @torch.no_grad()
    def step(self, *args, **kwargs):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        local = torch.stack([torch.isfinite(g).all() for g in grads]).all().logical_not() if grads else 0.0
        nonfinite = max_over_ranks(local)
        if self.clip_norm is not None and grads:
            # the whole gradient is on every rank (ZeRO-0): its norm is the global one. The engine
            # reports `_global_grad_norm` (a device value, read on log steps only), with clipping
            # off too: without it, DeepSpeed reported none and every step logged grad_norm 0.
            self._global_grad_norm = torch.nn.utils.get_total_norm(grads)
            if self.clip_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.clip_norm, self._global_grad_norm)
        if self.defaults.get("fused"):
            self.found_inf = nonfinite.reshape(())
            try:
                out = super().step(*args, **kwargs)
            finally:
                del self.found_inf
            self._skip = nonfinite if self._skip is False else torch.maximum(self._skip, nonfinite)
            return out
        if nonfinite.item() > 0:
            self._skip = True
            return None
        return super().step(*args, **kwargs)

    def take_skip(self) -> bool | torch.Tensor:
        skip, self._skip = self._skip, False
        return skip


class FiniteGuardAdamW(FiniteGuard, torch.optim.AdamW):
    """torch's AdamW (fused into one kernel per step on CUDA) behind the finite guard."""


def guarded_cpu_adam() -> type:
    """DeepSpeed's CPU Adam (AdamW mode) behind the finite guard: what ZeRO-Offload steps on the
    host (DeepSpeed refuses client optimizers there; a subclass is its own optimizer)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return type("FiniteGuardCPUAdam", (FiniteGuard, DeepSpeedCPUAdam), {})


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warm-up, then constant or cosine decay to `min_lr_ratio` (SGDR / Loshchilov)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "constant":
        return 1.0
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine


def clips_in_guard(ds: DeepSpeedConfig) -> bool:
    """fp32 weights at ZeRO-0 are clipped by the finite guard, not DeepSpeed: there DeepSpeed
    clips in `clip_fp32_gradients` and drops the norm it computed, so the logged grad_norm was
    0 at every step (it reports an optimizer's `_global_grad_norm`, which the guard now sets).
    Every other layout clips in DeepSpeed's own ZeRO, bf16 or fp16 optimizer, which keeps it."""
    return ds.zero_stage == 0 and ds.precision == "fp32"


def deepspeed_dict(ds: DeepSpeedConfig, optim: OptimConfig, micro_batch: int, dp_world: int) -> dict:
    """The DeepSpeed JSON config derived from our typed sub-configs."""
    zero: dict[str, Any] = {"stage": ds.zero_stage, "reduce_bucket_size": ds.bucket_size,
                            "allgather_bucket_size": ds.bucket_size}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": micro_batch * ds.grad_accum * dp_world,
        "gradient_clipping": 0.0 if clips_in_guard(ds) else optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16":
        # The finite guard skips a step with a non-finite gradient on any rank, from one flag
        # over the flat ZeRO partition. DeepSpeed's own bf16 check tests every gradient tensor
        # apart (628 inf/NaN reductions a step for DiT-XL/2) and reads its flag on the host
        # every step: off. (fp16 keeps it: its loss scaler needs it.)
        cfg["bf16"] = {"enabled": True, "check_grad_overflow": False}
        # Micro-batch gradients accumulate in fp32: DeepSpeed's default is the weights' dtype,
        # and 8 of them summed in bf16 were off the exact sum by 0.4% (norm of 1M random
        # elements), by 13% on an element whose micro-batches cancel
        # (tests/trainer/test_bf16_accumulation.py). ZeRO-1 then steps through DeepSpeed's
        # BF16_Optimizer, ZeRO-2/3 keep fp32 gradient partitions. Set whatever grad_accum is,
        # so an elastic resume that derives another grad_accum keeps the optimizer (and its
        # checkpoint layout). DeepSpeed refuses it without ZeRO (README.md, "Precision").
        if ds.zero_stage > 0:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    elif ds.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}
    return cfg


def player_lr(optim: OptimConfig, player: str) -> float:
    """The base learning rate of a trained player: the adversarial stage's discriminator has its own."""
    return optim.disc_lr if player == "disc" else optim.lr


def adamw_settings(optim: OptimConfig) -> dict[str, Any]:
    """AdamW's settings of every parameter group besides the learning rate (which the schedule sets)."""
    return dict(betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)


def apply_config(engine: Any, optimizer: torch.optim.Optimizer, lr: float, optim: OptimConfig) -> None:
    """Put the config's optimizer settings back into an engine whose state a resume loaded.

    A checkpoint holds the settings it was trained with next to the state: torch's optimizer
    load restores each parameter group's betas, eps and weight decay, the LR scheduler's load
    its `base_lrs`, and DeepSpeed's optimizer loads its `clip_grad`. A resume takes the state
    (moments, step counts, the schedule's position, the loss scale) from the checkpoint and the
    settings from the config in force, on every layout: what `--allow-config-change` promises
    (a lower `optim.lr` after non-finite steps), and without a change they are the same values."""
    for group in optimizer.param_groups:
        group.update(adamw_settings(optim))
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)  # as LambdaLR computes it at each step
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if hasattr(engine.optimizer, "clip_grad"):  # DeepSpeed's wrapper clips (else the engine, from its config)
        engine.optimizer.clip_grad = optim.grad_clip


def schedule_at(engine: Any, step: int) -> None:
    """Put `engine`'s LR schedule at `step` (optimizer steps taken, skipped ones included)
    before a step. A skipped step counts as a step (its batch, the EMA warm-up, the step
    number), so the schedule moves on too, whichever skipped it: DeepSpeed does not step its
    scheduler where its own optimizer skips (a non-finite global norm at ZeRO 1-3, fp16
    overflows), the finite guard's skip it does (ZeRO-0), and the same config ran one step
    late on its schedule after each skip on ZeRO 1-3 only. LambdaLR's rate at `step`."""
    scheduler = engine.lr_scheduler
    if scheduler.last_epoch == step:
        return
    scheduler.last_epoch = step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def build_optimizer(params: list[nn.Parameter], lr: float, optim: OptimConfig, ds: DeepSpeedConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW behind the finite guard: DeepSpeed's CPU Adam when ZeRO-Offload steps on the host,
    else torch's, fused into one kernel per step (which also skips a step without a host read)
    on CUDA or where `optim.fused` asks for it."""
    kwargs = dict(lr=lr, **adamw_settings(optim))
    if ds.offload_optimizer or ds.offload_params:
        return guarded_cpu_adam()(params, adamw_mode=True, **kwargs)
    fused = optim.fused if optim.fused is not None else device.type == "cuda"
    optimizer = FiniteGuardAdamW(params, fused=fused or None, **kwargs)
    if clips_in_guard(ds):
        optimizer.clip_norm = optim.grad_clip
    return optimizer


def build_engine(module: nn.Module, lr: float, optim: OptimConfig, ds: DeepSpeedConfig,
                 micro_batch: int, ctx: DistContext, total_steps: int, device: torch.device):
    import deepspeed

    autocast_inside(module, device, ds.precision)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, lr, optim, ds, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, optim, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        # DeepSpeed's data-parallel group is every rank of a pipeline stage, sequence groups
        # included: ZeRO partitions over all of them (see trainer/sequence_parallel.py).
        config=deepspeed_dict(ds, optim, micro_batch, ctx.world_size // ctx.pipeline_stages),
    )
    undo_initial_step(engine.optimizer, optimizer)
    return engine, optimizer


def undo_initial_step(wrapper: Any, optimizer: torch.optim.Optimizer) -> None:
    """Take back the step DeepSpeed's ZeRO-0 mixed-precision wrapper (FP16_UnfusedOptimizer, of
    bf16 without ZeRO; fp16 without ZeRO is refused) takes on zero gradients when it is built,
    to create the state: AdamW then counted every real step one too many, its bias correction
    made the first update 0.74 of its size (0.86, 0.91 at the next; 20 bf16 steps ended 3x
    further from fp32 than at ZeRO-2), and weight decay shrank the masters once. The state is
    dropped (AdamW makes it at its first real step) and the masters are read again from the
    weights they were copied from."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(wrapper, FP16_UnfusedOptimizer):
        optimizer.state.clear()
        wrapper.refresh_fp32_params()
