"""Elastic resume: continue a run on another number of ranks, ZeRO stage, loader workers or
pipeline stages, with the global batch kept and every sample of the epoch seen once.

DeepSpeed's own checkpoint is written per rank and is "specific to how you split the model":
ZeRO flat partitions, pipeline layer files. So every save also writes the state of each trained
player **independent of the layout**, gathered by the network's parameter names:

    universal_<player>.safetensors   fp32/<name>, exp_avg/<name>, exp_avg_sq/<name>: the fp32
                                     master weights and AdamW's moments of every parameter
    rank_00000.json "optimizers"     per player: AdamW's step count, the LR scheduler's state,
                                     the fp16 dynamic loss scaler's state
    rank_00000.json "batch_request"  the data.batch_size and deepspeed.grad_accum the global
                                     batch was set with (`BatchRequest`)

(EMA, stream position, step and RNG are already whole or rank-independent.) A resume whose
layout (world size, ZeRO stage, offload, pipeline stages, precision, flat_params) equals the
checkpoint's loads DeepSpeed's files as before (bit-identical); another layout builds its
engines fresh and re-partitions these tensors into them through DeepSpeed's `safe_set_full_*` API.

Written at every save rather than converted on resume (DeepSpeed's `ds_to_universal`): the
conversion reads every rank's `torch.save` files of the old layout and writes one `torch.save`
file per parameter and state, i.e. pickle on both ends, and needs the old layout's optimizer
files whole in host memory at resume time; the gather at save costs three all-gathers of the
parameters and 12 bytes per parameter on disk (figures in the README).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import yaml
from torch import nn

from trainer.checkpoint_format import COMPLETE, CheckpointError
from trainer.config import RunConfig
from trainer.ema import unclaimed_keys
from trainer.flat_params import expand, joined, weight_names
from trainer.masters import half_masters

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per parameter (Loshchilov & Hutter 2019)
# What DeepSpeed's dynamic fp16 loss scaler learns while training (deepspeed/runtime/fp16/
# loss_scaler.py); ZeRO-0's wrappers keep all but the hysteresis (in their `loss_scale_config`).
SCALER_STATE = ("cur_scale", "cur_hysteresis", "cur_iter", "last_overflow_iter")
# Keys that set how the model and optimizer are split, not what is trained.
LAYOUT_KEYS = ("deepspeed.zero_stage", "deepspeed.pipeline_stages", "deepspeed.offload_optimizer",
               "deepspeed.offload_params", "deepspeed.sequence_parallel_size")


class ElasticError(CheckpointError):
    pass


def universal_file(player: str) -> str:
    return f"universal_{player}.safetensors"


@dataclass(frozen=True)
class Shape:
    """How a run is split over ranks and what one optimizer step consumes."""

    world_size: int
    batch_size: int
    grad_accum: int
    pipeline_stages: int
    zero_stage: int
    offload: tuple[bool, bool]
    sequence_parallel: int = 1  # ranks of one sequence group read the same samples
    # How DeepSpeed's files hold the weights and optimizer state: the precision sets which
    # wrapper (and its state dict) and dtype they have, flat_params the parameters they list.
    precision: str = "fp32"
    flat_params: bool = False

    @property
    def dp_world(self) -> int:
        return self.world_size // (self.pipeline_stages * self.sequence_parallel)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.dp_world

    def describe(self) -> str:
        return (f"{self.dp_world} data-parallel rank(s) x data.batch_size {self.batch_size} x "
                f"deepspeed.grad_accum {self.grad_accum} = global batch {self.global_batch}")

    def same_layout(self, other: "Shape") -> bool:
        """Whether DeepSpeed's per-rank files of one fit the engines of the other: the split over
        ranks and how the files hold the state (a bf16 ZeRO file loaded into fp32 engines raised
        KeyError 'param_groups' after start; universal files hold fp32 by weight name in any case)."""
        return self.layout() == other.layout()

    def layout(self) -> tuple[Any, ...]:
        return (self.world_size, self.pipeline_stages, self.zero_stage, self.offload, self.sequence_parallel,
                self.precision, self.flat_params)

    def describe_layout(self) -> str:
        offload = [what for what, on in zip(("optimizer", "params"), self.offload) if on]
        return ", ".join([f"{self.world_size} rank(s)", f"ZeRO-{self.zero_stage}",
                          f"{self.pipeline_stages} pipeline stage(s)", *(f"offload {w}" for w in offload),
                          self.precision, *(["flat_params"] if self.flat_params else [])])


def shape_of(cfg: RunConfig, world_size: int) -> Shape:
    ds = cfg.deepspeed
    return Shape(world_size, cfg.data.batch_size, ds.grad_accum, ds.pipeline_stages, ds.zero_stage,
                 (ds.offload_optimizer, ds.offload_params), ds.sequence_parallel_size, ds.precision,
                 cfg.model.flat_params)


def written_shape(directory: Path) -> Shape:
    """The shape of the job that wrote a checkpoint (its COMPLETE.json and config.yaml)."""
    world = int(json.loads((directory / COMPLETE).read_text())["world_size"])
    old = yaml.safe_load((directory / "config.yaml").read_text())
    ds, data = old["deepspeed"], old["data"]
    return Shape(world, int(data["batch_size"]), int(ds["grad_accum"]), int(ds["pipeline_stages"]),
                 int(ds["zero_stage"]), (bool(ds["offload_optimizer"]), bool(ds["offload_params"])),
                 int(ds.get("sequence_parallel_size", 1)),  # checkpoints from before the key: 1
                 str(ds.get("precision", "fp32")), bool(old["model"].get("flat_params", False)))


def written_global_batch(directory: Path, rank0_meta: Mapping[str, Any]) -> int:
    """The global batch a checkpoint was trained with: the one recorded in rank 0's state, or,
    for checkpoints from before the record, the one its config and world size give."""
    if "global_batch" in rank0_meta:
        return int(rank0_meta["global_batch"])
    return written_shape(directory).global_batch


class BatchRequest:
    """The data.batch_size and deepspeed.grad_accum that set a run's global batch, in the
    checkpoint's metadata: a fresh run's own (or those of a resume allowed to change the global
    batch), carried on by every resume that keeps the global batch (derived numbers included).
    It tells a resume on the checkpoint's data-parallel ranks that reruns the command of the
    run (a `--max-restarts` relaunch after an elastic shrink: grad_accum 1 asked, 2 derived and
    checkpointed) from one that changes the batch on purpose (grad_accum 2 asked, 1
    checkpointed): the first is derived again, the second left to the config check."""

    def __init__(self, shape: Shape):
        self.global_batch = shape.global_batch
        self.request = [shape.batch_size, shape.grad_accum]

    def state_dict(self) -> dict[str, Any]:
        return {"batch_request": list(self.request)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "batch_request" in state and state.get("global_batch") == self.global_batch:
            self.request = list(state["batch_request"])


def written_request(directory: Path, was: Shape) -> tuple[int, int]:
    """The (data.batch_size, deepspeed.grad_accum) that set a checkpoint's global batch: its
    `BatchRequest`, or, for checkpoints from before the record, its own numbers."""
    rank0 = directory / "rank_00000.json"
    meta = json.loads(rank0.read_text()) if rank0.is_file() else {}
    batch_size, grad_accum = meta.get("batch_request", (was.batch_size, was.grad_accum))
    return int(batch_size), int(grad_accum)


def keep_global_batch(cfg: RunConfig, world_size: int, directory: Optional[Path]) -> tuple[RunConfig, str]:
    """The config this job resumes `directory` with: `deepspeed.grad_accum` (for the job's
    per-rank batch), else `data.batch_size` (for its grad_accum), derived so that the global
    batch stays the checkpoint's, when the data-parallel ranks changed or the config asks for
    the numbers that set the global batch (`BatchRequest`). Returns the config and one line
    saying what was derived ('' when nothing was). Raises ElasticError, naming both global
    batches, when no whole number keeps it. Any other batch or grad_accum on the checkpoint's
    data-parallel ranks is the user's own change, which the config check lists (and refuses).
    `checkpoint.allow_config_change` lets another global batch through only where the user
    asked for it (data.batch_size or deepspeed.grad_accum changed) or none can be derived,
    and the line then names the old and new global batch; a flag given for another key (the
    learning rate) still keeps the global batch."""
    if directory is None:
        return cfg, ""
    was, now = written_shape(directory), shape_of(cfg, world_size)
    if not was.same_layout(now) and not (directory / universal_file("student")).is_file():
        raise ElasticError(
            f"{directory} was written with checkpoint.universal=false, so it resumes only on its own "
            f"layout: {was.describe_layout()} (this job: {now.describe_layout()})")
    if now.global_batch == was.global_batch:
        return cfg, _note(directory, was, now, "")
    dp, allowed = now.dp_world, cfg.checkpoint.allow_config_change
    asked = (now.batch_size, now.grad_accum) != written_request(directory, was)
    if asked and allowed:  # the user's own batch, which the flag lets through
        return cfg, _batch_change(directory, was, now)
    if asked and dp == was.dp_world:
        return cfg, ""  # a change of the batch on the same ranks: the config check lists it (and refuses)
    if was.global_batch % (now.batch_size * dp) == 0:
        derived = replace(cfg, deepspeed=replace(cfg.deepspeed, grad_accum=was.global_batch // (now.batch_size * dp)))
    elif kept_on(was.global_batch, now):  # by a whole data.batch_size
        derived = replace(cfg, data=replace(cfg.data, batch_size=was.global_batch // (now.grad_accum * dp)))
    elif allowed:
        return cfg, _batch_change(directory, was, now)
    else:
        raise ElasticError(
            f"{directory} was trained with global batch {was.global_batch} ({was.describe()}); this job "
            f"has {world_size} rank(s) and {now.pipeline_stages} pipeline stage(s), global batch "
            f"{now.global_batch} ({now.describe()}), and neither a whole deepspeed.grad_accum (at "
            f"data.batch_size {now.batch_size}) nor a whole data.batch_size (at deepspeed.grad_accum "
            f"{now.grad_accum}) keeps {was.global_batch} on {dp} data-parallel rank(s). Resume on a number "
            f"of ranks that can keep it, set data.batch_size and deepspeed.grad_accum so that it is kept, "
            f"or pass --allow-config-change to train on with global batch {now.global_batch}")
    return derived, _note(directory, was, shape_of(derived, world_size), "derived ")


def kept_on(global_batch: int, now: Shape) -> bool:
    """Whether a whole deepspeed.grad_accum (at now's data.batch_size) or a whole data.batch_size
    (at now's grad_accum) keeps `global_batch` on now's data-parallel ranks (`keep_global_batch`)."""
    return any(global_batch % (n * now.dp_world) == 0 for n in (now.batch_size, now.grad_accum))


def _batch_change(directory: Path, was: Shape, now: Shape) -> str:
    """The line of a resume that trains on with another global batch (allowed by the flag):
    the schedule of samples per step changes, which must never pass unseen."""
    return (f"resuming {directory.name} with another global batch (checkpoint.allow_config_change): "
            f"{was.global_batch} ({was.describe()}) -> {now.global_batch} ({now.describe()})")


def _note(directory: Path, was: Shape, now: Shape, derived: str) -> str:
    if was == now:
        return ""
    return (f"elastic resume of {directory.name}: written with {was.describe()} on {was.describe_layout()}; "
            f"continuing with {derived}{now.describe()} on {now.describe_layout()}")


# ---- gather (save) and re-partition (load) of one player's optimizer state ----------------------

def _full(param: nn.Parameter, key: Optional[str], optimizer: torch.optim.Optimizer,
          master: Optional[torch.Tensor]) -> torch.Tensor:
    """The whole fp32 master (key None) or AdamW moment of a parameter, gathered from its ZeRO
    partitions (collective under ZeRO-3 and over the data-parallel group under ZeRO-1/2);
    without ZeRO the optimizer steps the parameter itself in fp32, or its `master` in bf16/fp16."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if value is None:
        stepped = param if master is None else master
        value = stepped.data if key is None else optimizer.state[stepped][key]
    return value.detach().float()


def _whole_state(params: list[tuple[str, nn.Parameter]], key: Optional[str], optimizer: torch.optim.Optimizer,
                 masters: dict[int, torch.Tensor], held: Optional[Gather] = None) -> dict[str, torch.Tensor]:
    """This rank's trained parameters' whole fp32 masters (key None) or moments by network
    weight name (`_full`, collective; a flat block parameter's by its weights); with `held`, in
    host memory where this rank holds them, else none (each dropped once gathered)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in params:
        value = _full(p, key, optimizer, masters.get(id(p)))
        if held is None or held.holds:
            out.update(expand(name, p, value if held is None else value.cpu()))
    return out


def player_weights(engine: Any, optimizer: torch.optim.Optimizer, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Collective. This rank's share of a player's weights in fp32 by network weight name: each
    trained parameter's fp32 master (the module holds it rounded under bf16/fp16), each frozen
    one as the module holds it (gathered under ZeRO-3)."""
    import deepspeed

    params = list(engine.module.named_parameters())
    out = _whole_state([(names[n], p) for n, p in params if p.requires_grad], None, optimizer, half_masters(engine))
    frozen = [(n, p) for n, p in params if not p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=None):
        out.update({w: t for n, p in frozen for w, t in expand(names[n], p, p.detach().float().clone())})
    return out


@dataclass(frozen=True)
class Gather:
    """How one rank takes part in making a player's tensors whole (collectives on every rank):
    `whole` assembles a pipeline's stages; this rank `holds` what it gathered, for `whole` (rank
    0; under pipeline parallelism the first replica of every stage), and `keeps` the whole
    tensors, in host memory (rank 0: it writes the files and draws the grids). The others drop
    each tensor once its collective is done: every rank holding whole copies of the weights,
    both moments and the EMA (16 bytes a parameter) at each save undid what ZeRO saves."""

    whole: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    holds: bool = True
    keeps: bool = True

    def made_whole(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`whole` of what this rank holds; in host memory where it keeps them, else {}."""
        made = self.whole(local)
        return {name: t.cpu() for name, t in made.items()} if self.keeps else {}


def gather_player(engine: Any, optimizer: torch.optim.Optimizer, names: dict[str, str], gather: Gather
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Collective. (tensors by `kind/network name`, JSON meta) of one trained player: its fp32
    master weights and moments, made whole (`gather`: where they are kept, {} elsewhere)."""
    if not optimizer.state:  # no step applied yet (every one skipped as non-finite): as fresh
        materialize_state(engine, optimizer)
        _set_steps(optimizer, 0)
    params = [(names[n], p) for n, p in engine.module.named_parameters() if p.requires_grad]
    masters = half_masters(engine)
    tensors: dict[str, torch.Tensor] = {}
    for kind, key in (("fp32", None), *((m, m) for m in MOMENTS)):
        local = _whole_state(params, key, optimizer, masters, gather)
        tensors.update({f"{kind}/{name}": t for name, t in gather.made_whole(local).items()})
    steps = {_as_int(s["step"]) for s in optimizer.state.values() if "step" in s}
    if len(steps) > 1:
        raise ElasticError(f"internal: the optimizer's parameters are at different steps {sorted(steps)}")
    meta = {"optimizer_step": steps.pop() if steps else 0, "scheduler": engine.lr_scheduler.state_dict(),
            "global_steps": engine.global_steps, "global_samples": engine.global_samples}
    scaler = dynamic_loss_scaler(engine)
    if scaler is not None:
        meta["loss_scaler"] = {k: getattr(scaler, k) for k in SCALER_STATE if hasattr(scaler, k)}
    return tensors, meta


def dynamic_loss_scaler(engine: Any) -> Optional[Any]:
    """The state object of an engine's dynamic fp16 loss scaler: the ZeRO optimizers'
    `loss_scaler`, ZeRO-0's fp16 wrappers' `loss_scale_config`; None under bf16 and fp32, whose
    scale is a constant 1. Restored on an elastic resume as DeepSpeed's own load restores it:
    a fresh scaler would start again at 2^initial_scale_power and overflow its way down."""
    wrapper = engine.optimizer
    scaler = getattr(wrapper, "loss_scaler", None)
    if scaler is not None and getattr(scaler, "dynamic", False):
        return scaler
    config = getattr(wrapper, "loss_scale_config", None)
    if config is not None and config.dynamic_loss_scale:
        return config
    return None


def _as_int(step: Any) -> int:
    return int(step.item()) if torch.is_tensor(step) else int(step)


def materialize_state(engine: Any, optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state (moments, step) of a fresh engine's partitions, which DeepSpeed and
    torch create lazily at the first step, by one step with zero gradients at learning rate 0:
    no weight moves (AdamW's decoupled decay is lr x wd). Collective (the finite guard). The
    gradients the partitions had are put back: ZeRO-Offload makes its pinned host buffer once,
    with the engine, and copies into it at every step (left None, the first backward failed)."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    zero3 = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if zero3 is not None:  # ZeRO-3 hands the optimizer one sub-group's partition per step
        for i, flat in enumerate(zero3):
            kept, flat.grad = flat.grad, torch.zeros_like(flat)
            engine.optimizer._optimizer_step(i)
            flat.grad = kept
    else:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        kept = [p.grad for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for p, grad in zip(params, kept):
            p.grad = grad
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link the moments
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def load_player(engine: Any, optimizer: torch.optim.Optimizer, names: dict[str, str],
                tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Collective. Re-partition a player's whole fp32 masters and moments into this job's
    engine (any ZeRO stage, any number of ranks, any pipeline stage's layers), then its step
    counts, the schedule's position and the fp16 loss scale. Every parameter must be there at
    its shape (strict). The optimizer's settings stay the config's (trainer/optim.py
    `apply_config`, after every resume)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = [(names[n], p) for n, p in engine.module.named_parameters() if p.requires_grad]
    check_universal_names(params, tensors)

    def saved(kind: str, name: str, p: nn.Parameter) -> torch.Tensor:
        """The saved `kind` of parameter `name` (a flat block parameter's joined from its weights)."""
        try:
            return joined(name, p, {w: tensors[f"{kind}/{w}"] for w in weight_names(name, p)})
        except ValueError as e:
            raise ElasticError(f"the universal state does not fit the model: {e}") from None

    materialize_state(engine, optimizer)
    masters = half_masters(engine)
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
        for name, p in params:  # the weights the forward pass uses (half precision under bf16)
            _copy_checked(p.data, saved("fp32", name, p), name)
    for name, p in params:
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # ZeRO: each rank sets its fragment (maybe none)
            safe_set_full_fp32_param(p, saved("fp32", name, p))
            for m in MOMENTS:
                safe_set_full_optimizer_state(p, saved(m, name, p), m)
        else:  # the optimizer steps the parameter itself (fp32) or its fp32 master (bf16/fp16)
            stepped = masters.get(id(p), p)
            if stepped is not p:
                _copy_checked(stepped.data, saved("fp32", name, p), name)
            for m in MOMENTS:
                _copy_checked(optimizer.state[stepped][m], saved(m, name, p), name)
    _set_steps(optimizer, meta["optimizer_step"])
    engine.lr_scheduler.load_state_dict(meta["scheduler"])
    engine.global_steps, engine.global_samples = meta["global_steps"], meta["global_samples"]
    scaler = dynamic_loss_scaler(engine)
    if scaler is not None:  # a checkpoint of bf16/fp32 (allowed config change) has none: fresh
        for key, value in meta.get("loss_scaler", {}).items():
            if hasattr(scaler, key):
                setattr(scaler, key, value)


def seed_masters(engine: Any, names: dict[str, str], weights: dict[str, torch.Tensor]) -> None:
    """Set a player's fp32 masters to `weights` (whole, by network name): a warm start's
    (checkpoint.init_from). DeepSpeed makes its masters from the module's weights, which under
    bf16/fp16 are already rounded to 16 bits, so a fine-tune would start from the source's
    weights rounded, not from the source. Each rank sets its own fragment (no collective)."""
    from deepspeed.utils import safe_set_full_fp32_param

    masters = half_masters(engine)
    for n, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        name = names[n]
        full = joined(name, p, weights)
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # ZeRO (and bf16's own optimizer)
            safe_set_full_fp32_param(p, full)
        elif id(p) in masters:  # without ZeRO: DeepSpeed's unfused wrapper keeps them apart
            _copy_checked(masters[id(p)].data, full, name)


def copy_frozen(copies: list[tuple[nn.Module, nn.Module]]) -> None:
    """Collective. Make each frozen copy inside a player (`Stage.frozen_copies`) of its source
    again, parameter by parameter, strictly by name and shape (gathered and re-partitioned
    under ZeRO-3): DeepSpeed restores them on a resume of the same layout, the universal files
    of an elastic one hold trained weights only."""
    import deepspeed

    for copy, source in copies:
        params, values = dict(copy.named_parameters()), dict(source.named_parameters())
        if params.keys() != values.keys():
            differ = sorted(set(params) ^ set(values))
            raise CheckpointError(f"a frozen copy no longer matches its source: {differ[:3]} differ")
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            for name, p in params.items():
                p.data.copy_(values[name].detach())  # the same network: the same shapes


def check_universal_names(params: list[tuple[str, nn.Parameter]], tensors: dict[str, torch.Tensor]) -> None:
    """Every parameter's fp32 master and moments must be in the universal state, and the state
    must hold nothing else (strict both ways: tensors of another model.* are an error, never
    dropped). Collective (`unclaimed_keys`: a pipeline stage holds only its own layers)."""
    own = {f"{kind}/{w}" for kind in ("fp32", *MOMENTS) for name, p in params for w in weight_names(name, p)}
    unexpected = unclaimed_keys(tensors, own)  # first: every rank joins the collective before any raises
    missing = sorted(own - set(tensors))
    if missing:
        raise ElasticError(f"the universal state lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    if unexpected:
        raise ElasticError(f"the universal state holds {len(unexpected)} tensors the model does not have, e.g. "
                           f"{unexpected[:3]} (a checkpoint of another model.*)")


def _copy_checked(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise ElasticError(f"{name}: the universal state has shape {tuple(value.shape)}, the model "
                           f"{tuple(target.shape)}")
    target.copy_(value)


def _set_steps(optimizer: torch.optim.Optimizer, step: int) -> None:
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(step)
        elif "step" in state:
            state["step"] = step
