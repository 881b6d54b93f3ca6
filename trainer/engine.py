"""The training loop: DeepSpeed engines from the typed config, EMA, checkpoints, metrics.

`train(cfg)` is what `dit train` runs on every rank. Distribution is applied here and only
here: stages and models are plain PyTorch; this module wraps each trained player of a stage
in its own DeepSpeed engine (own optimizer, own ZeRO partitioning) and drives them.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from data_pipeline.errors import DataError
from data_pipeline.stream import batch_to_device
from trainer import faults
from trainer.checkpoint import CheckpointError, CheckpointManager, init_network
from trainer.checkpoint_format import ENCODERS_FILE
from trainer.codes import EXIT_CHECKPOINT, EXIT_DATA, EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE
from trainer.config import RunConfig, to_yaml, unread_settings, validate
from trainer.diffusion.noise import sample_generators
from trainer.distributed import (LateRead, PreemptionFlag, comm_device, compute_device, init_distributed,
                                 max_over_ranks, wait_for_rank0)
from trainer.elastic import (LAYOUT_KEYS, BatchRequest, Gather, Shape, copy_frozen, dynamic_loss_scaler,
                             keep_global_batch, player_weights, seed_masters, shape_of, written_shape)
from trainer.ema import EMA
from trainer.flat_params import weight_names
from trainer.masters import Masters
from trainer.metrics import KeyLog, LogWindow, Metric, MetricsLogger, summed
from trainer.numerics import PRECISIONS, autocast, autocast_each, inference_numerics
from trainer.optim import FiniteGuard, apply_config, build_engine, player_lr, schedule_at
from trainer.parallel import parallelize, pipeline_inputs
from trainer.train_state import (EMAState, LoopState, PlayersState, RNGState, ShapeRecord, StageState,
                                 Stateful, StreamState, load_states, save_states, seed_everything)

# Keys that may change between a checkpoint and its resume without changing the experiment.
RESUMABLE_CHANGES = ("stage.steps", "checkpoint", "log", "run.out_dir", "data.num_workers", "data.prefetch_factor",
                     "data.stall_timeout_s", "deepspeed.comm_timeout_s", "deepspeed.rank0_timeout_s", *LAYOUT_KEYS)


def resumable_changes(cfg: RunConfig) -> tuple[str, ...]:
    """RESUMABLE_CHANGES, and the settings this run does not read (`unread_settings`): a key an
    older checkpoint's config set there, removed to resume (a new run refuses it), is no change."""
    return RESUMABLE_CHANGES + unread_settings(cfg)


# Prefix of the profiler ranges a step is cut into (batch, forward, backward, step, pipeline,
# ema): what `dit bench gpu --profile` sums per phase. Without a profiler a range costs ~6 us.
PHASE = "dit."


def global_batch(cfg: RunConfig, world_size: int) -> int:
    """Samples per optimizer step over all data-parallel replicas."""
    return shape_of(cfg, world_size).global_batch


def preflight_resume(cfg: RunConfig, world_size: int) -> tuple[RunConfig, str]:
    """Before any process group starts: the config this job resumes with (the checkpoint's
    global batch kept on this number of ranks, trainer/elastic.py) and the line saying what
    was derived; raises CheckpointError when the global batch cannot be kept or (unless
    allowed) the config changed."""
    from trainer.checkpoint import CheckpointManager, preflight
    from trainer.encoder_record import check_encoders
    from trainer.stages.checks import check_resumed_stage

    directory = CheckpointManager(cfg.checkpoint, 0, world_size).latest() if cfg.checkpoint.resume else None
    if directory is not None:
        check_encoders(directory, cfg.model, "resuming it")
        check_resumed_stage(directory, cfg)
        check_same_network(directory, cfg)
    cfg, note = keep_global_batch(cfg, world_size, directory)
    preflight(cfg.checkpoint, to_yaml(cfg), world_size, global_batch(cfg, world_size), resumable_changes(cfg))
    return cfg, note


def check_same_network(directory: Path, cfg: RunConfig) -> None:
    """A resume continues the checkpoint's network: model.* keys changed under
    checkpoint.allow_config_change (without it `check_compatible` refuses any change) that
    change the DiT's weights (model.qk_norm, the preset, ...) are refused, as a resume on another
    layout refuses weights that do not fit (CheckpointError), before any process starts; on the
    same layout DeepSpeed's load_state_dict raised a bare RuntimeError in every rank. Both DiTs
    are built on the meta device, no weights read."""
    import yaml
    from omegaconf import OmegaConf

    from trainer.config import ModelConfig, flatten, to_dict
    from trainer.models.dit import build_dit

    if cfg.stage.kind == "autoencoder" or not cfg.checkpoint.allow_config_change:  # no DiT; the change is refused
        return
    try:
        written = yaml.safe_load((directory / "config.yaml").read_text())["model"]
        schema = OmegaConf.structured(ModelConfig)
        old: ModelConfig = OmegaConf.to_object(OmegaConf.merge(schema, written))  # type: ignore[assignment]
    except Exception:  # noqa: BLE001 (an unreadable config.yaml is check_compatible's to report)
        return
    was, now = flatten(to_dict(old)), flatten(to_dict(cfg.model))
    changed = [f"model.{k}" for k in now if was.get(k) != now[k]]
    if not changed:
        return

    def shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):  # any text widths: the encoders are checked against encoders.json
            return {k: tuple(v.shape) for k, v in build_dit(model, 64, 64).state_dict().items()}

    before, after = shapes(old), shapes(cfg.model)
    differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if differ:
        raise CheckpointError(f"{directory} holds another network than this config builds ({len(differ)} weights "
                              f"differ, e.g. {differ[:3]}): {', '.join(changed)} changed, and a resume continues "
                              f"the checkpoint's network; set them back, or start a new run from it with "
                              f"checkpoint.init_from")


def network_names(net: nn.Module, trained: nn.Module) -> dict[str, str]:
    """The trained module's parameter names -> the network's: a PipelineModule's `3.attn.qkv.weight`
    is the DiT's `blocks.2.attn.qkv.weight` (its layers are the network's own modules)."""
    by_id = {id(p): n for n, p in net.named_parameters()}
    return {n: by_id[id(p)] for n, p in trained.named_parameters()}


# One step's metrics: (player, the metrics of one of its losses), for each loss in step order.
PlayerInfos = list[tuple[str, dict[str, Metric]]]
# Whether each player's optimizer skipped the step, by player: a bool, or a device flag not read yet.
PlayerSkips = dict[str, bool | torch.Tensor]


def late_flags(skips: PlayerSkips) -> tuple[bool, ...] | LateRead:
    """The players' skip flags as `Pending` keeps them: host bools as they are; where any is a
    device flag, all of them stacked into one (P,) device flag (a host bool written by a fill,
    which waits for nothing) read one step late in one copy."""
    flags = list(skips.values())
    devices = [f.device for f in flags if isinstance(f, torch.Tensor)]
    if not devices:
        return tuple(bool(f) for f in flags)
    return LateRead(torch.cat([f.detach().to(devices[0], torch.float32).reshape(1) if isinstance(f, torch.Tensor)
                               else torch.full((1,), float(f), device=devices[0]) for f in flags]))  # (P,)


def searching_loss_scale(engine: Any) -> bool:
    """Whether an fp16 engine's skip is its dynamic loss scaler's search for a scale: an overflow
    spends the hysteresis, then halves the scale, so a run starting at 2^12 whose gradients
    overflow at 2^11 skips three steps in a row and trains on (it stopped there, at the default
    `stage.max_nonfinite_in_row`). It stops counting as search two halvings above the floor:
    DeepSpeed raises at the next overflow at its minimum scale, and the stop here, read a step
    late, comes first."""
    scaler = dynamic_loss_scaler(engine)
    return scaler is not None and scaler.cur_scale > scaler.min_scale * scaler.scale_factor


def forward_nonfinite(infos: PlayerInfos, players: list[str]) -> bool:
    """Whether the forward itself failed on some rank: a metric (loss, ...) of one of these
    players' micro-batches was not finite there, not only a gradient. Collective: every rank
    calls it at the same step (the skip flags it follows are the same on every rank)."""
    totals = [(v[0] if isinstance(v, tuple) else v) for player, info in infos if player in players
              for v in info.values()]
    on_device = [t.detach().float().reshape(()) for t in totals if isinstance(t, torch.Tensor)]
    flag: float | torch.Tensor = float(any(not math.isfinite(t) for t in totals if not isinstance(t, torch.Tensor)))
    if not flag and on_device:
        flag = torch.stack(on_device).isfinite().all().logical_not().float()
    return bool(max_over_ranks(flag).item())


def nonfinite_advice(precision: str, forward: bool) -> str:
    """What to try after the steps a run stopped on: fp16's loss scale only keeps the backward
    in range; a forward past fp16's largest value (65504) stays infinite at any scale."""
    if forward and precision == "fp16":
        return ("The loss itself was not finite: in fp16 activations past 65504 overflow, whatever "
                "the loss scale (deepspeed.precision=bf16 has float32's range), or the data holds NaNs.")
    return "Lower the learning rate (optim.lr, resuming with --allow-config-change) or check the data."


@dataclass
class Pending:
    """A step recorded but not yet settled: its metrics by player, and which players' optimizers
    skipped it (host bools, or the (P,) device flag's `LateRead`, in the order of `players`)."""

    step: int
    infos: PlayerInfos
    players: tuple[str, ...]
    flags: tuple[bool, ...] | LateRead
    lrs: dict[str, float]  # the learning rate each player's optimizer stepped with

    def skipped_players(self) -> list[str]:
        flags = self.flags.get().tolist() if isinstance(self.flags, LateRead) else self.flags
        return [player for player, flag in zip(self.players, flags) if flag]


class Trainer:
    """Owns the engines, stream, EMA, checkpoints and metrics of one stage on this rank."""

    def __init__(self, cfg: RunConfig):
        from data_pipeline.stream import build_stream
        from trainer.stages import build_stage
        from trainer.encoder_record import encoders_record

        self.cfg = cfg
        self.ctx = init_distributed(cfg.deepspeed.pipeline_stages, cfg.deepspeed.comm_timeout_s,
                                    cfg.deepspeed.sequence_parallel_size, cfg.deepspeed.rank0_timeout_s)
        validate(cfg, world_size=self.ctx.world_size)
        self.device = compute_device()  # chosen once: everything of a step lives here
        self.precision = cfg.deepspeed.precision
        # data errors first; the ranks of one replica (pipeline stages, a sequence group) read the
        # same batches, each from its own stream, so none of them may skip a shard on its own
        self.stream = build_stream(cfg.data, self.ctx.dp_rank, self.ctx.dp_world,
                                   skip_unreadable=self.ctx.world_size == self.ctx.dp_world,
                                   step_rows=cfg.deepspeed.grad_accum, pin=self.device.type == "cuda")
        self.stream.start_workers()  # forked before the model and optimizer state exist: none of it is shared
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        self.stage = build_stage(cfg).to(self.device, PRECISIONS[self.precision])
        init_weights = None
        if cfg.checkpoint.init_from and not self.will_resume():  # warm start of a fresh run
            init_weights = init_network(self.stage.players["student"], cfg.checkpoint.init_from)
            if self.ctx.is_main:
                print(f"initialized the student from {cfg.checkpoint.init_from}", flush=True)
        elif self.stage.student_from_weights and self.precision != "fp32" and not self.will_resume():
            # a distillation student, the teacher's copy: its fp32 weights seed the masters and
            # the EMA, which DeepSpeed would make of the module cast to half precision
            student = self.stage.players["student"].state_dict()
            init_weights = {k: v.detach().to("cpu", copy=True) for k, v in student.items()}
        if self.stage.preview_samples and self.ctx.is_main:
            self.stage.preview = preview_batch(cfg, self.stage.preview_samples, self.device)
        # every rank here before the first collective of the accelerator's group (the engines'
        # weight broadcast): what each did alone until now (its loader's workers, a text encoder
        # of some GB read from a shared filesystem, rank 0's preview) would count against
        # deepspeed.comm_timeout_s; the host group's wait is bounded by rank0_timeout_s
        wait_for_rank0()
        self.pipeline = self.ctx.pipeline_stages > 1
        trainable = parallelize(dict(self.stage.trainable()), self.stage, cfg, self.ctx)
        self.engines: dict[str, Any] = {}
        self.optimizers: dict[str, FiniteGuard] = {}
        for name, module in trainable.items():
            self.engines[name], self.optimizers[name] = build_engine(
                module, player_lr(cfg.optim, name), cfg.optim, cfg.deepspeed, cfg.data.batch_size, self.ctx,
                cfg.stage.steps, self.device)
        self.stage.bind(self.engines, writes_files=self.ctx.is_main)
        self.net = self.stage.players["student"]  # the whole network, built on every rank
        self.ema_module = trainable["student"]  # what this rank trains of it (a pipeline stage's layers)
        self.names = network_names(self.net, self.ema_module)
        self.ema = (EMA(self.ema_module, cfg.ema, self.names, Masters(self.engines["student"]))
                    if cfg.ema.enabled else None)
        if init_weights is not None:
            self.warm_start(init_weights)
        # rank 0 commits; the autoencoder stage trains the autoencoder at its path (no input of it)
        records = self.ctx.rank == 0 and cfg.stage.kind != "autoencoder"
        texts = {ENCODERS_FILE: encoders_record(cfg.model)} if records else {}
        self.ckpt = CheckpointManager(cfg.checkpoint, self.ctx.rank, self.ctx.world_size, texts)
        self.state = LoopState()
        self.batch_request = BatchRequest(shape_of(cfg, self.ctx.world_size))
        self.log_window = LogWindow()  # the metrics since the last log step (MetricsLogger's)
        self.pending: list[Pending] = []  # steps recorded, not yet settled
        self.step_lrs: dict[str, float] = {}  # the learning rates of the step in progress (`train_step`)
        self.config_yaml = to_yaml(cfg)
        # Pipeline stage 0 owns the data (the last stage reads the same batches for its labels);
        # of a sequence group, which reads one batch on every rank, its first rank accounts for it.
        self.reads_data = self.ctx.reads_data
        self.key_log = KeyLog(cfg.log, self.ctx.dp_rank) if cfg.log.sample_keys and self.reads_data else None

    def warm_start(self, weights: dict[str, torch.Tensor]) -> None:
        """The fp32 state of a warm start from the source's own weights (the module holds them
        rounded under bf16/fp16): the student's masters and the EMA's shadows. Collective (the
        EMA's strict load)."""
        seed_masters(self.engines["student"], self.names, weights)
        self.restart_ema(weights)

    def restart_ema(self, weights: dict[str, torch.Tensor]) -> None:
        """Begin the EMA again at the student's whole fp32 `weights`. Collective."""
        if self.ema is not None:
            trained = {w for n, p in self.net.named_parameters() if p.requires_grad for w in weight_names(n, p)}
            self.ema.load_full_state_dict(self.ema_module, {k: v for k, v in weights.items() if k in trained}, 0)

    def start_of_step(self) -> None:
        """The stage's start of a step, given the student's fp32 weights to read (collective, and
        only where it asks); where it starts a new training (a progressive round), the EMA begins
        again at those weights."""
        read: dict[str, torch.Tensor] = {}

        def student_weights() -> dict[str, torch.Tensor]:
            read.update(self.raw_weights())
            return read

        if self.stage.start_of_step(self.state.step, student_weights):  # on every rank at once
            wait_for_rank0()  # it wrote the finished round's export
            if self.ema is not None:
                self.restart_ema(read or self.raw_weights())

    # ---- checkpoint ---------------------------------------------------------------------------
    def will_resume(self) -> bool:
        """Whether `run` will resume from this run's own `latest` (then a warm start is moot)."""
        from trainer.checkpoint import LATEST

        return self.cfg.checkpoint.resume and (Path(self.cfg.checkpoint.dir) / LATEST).is_file()

    def stateful(self) -> dict[str, Stateful]:
        """Everything this rank checkpoints besides the DeepSpeed engines, as one dict
        (trainer/train_state.py); `players` (whole optimizer states) is written when
        checkpoint.universal, for elastic resumes."""
        states: dict[str, Stateful] = {"loop": self.state, "rng": RNGState(),
                                       "stream": StreamState(self.stream), "stage": StageState(self.stage),
                                       "shape": ShapeRecord(shape_of(self.cfg, self.ctx.world_size)),
                                       "batch_request": self.batch_request, "log_window": self.log_window}
        if self.ema is not None:
            states["ema"] = EMAState(self.ema, self.ema_module, self.gather_of("student"))
        states["players"] = PlayersState(self.engines, self.optimizers, self.player_names, self.gather_of,
                                         enabled=self.cfg.checkpoint.universal)
        return states

    def save(self) -> Path:
        """Collective: the checkpoint of this step; rank 0 says how long it took (what a SLURM
        job's --shutdown-timeout must leave room for, besides two steps)."""
        start = time.perf_counter()
        directory = save_states(self.ckpt, self.state.step, self.engines, self.stateful(), self.config_yaml)
        if self.ctx.is_main:
            print(f"checkpoint {directory.name} saved in {time.perf_counter() - start:.1f} s", flush=True)
        return directory

    def player_names(self, player: str) -> dict[str, str]:
        """A trained module's parameter names -> the names its state is saved under."""
        if player == "student":
            return self.names
        return {n: n for n, _ in self.engines[player].module.named_parameters()}

    def gather_of(self, player: str) -> Gather:
        """How this rank takes part in making a player's tensors whole: the student's pipeline
        stages are assembled (`whole`) from the first replica of each; the other players are
        never pipelined. Rank 0 keeps the result (it writes the files, draws the grids)."""
        piped = player == "student" and self.pipeline
        holds = self.ctx.dp_rank == 0 if piped else self.ctx.rank == 0
        return Gather(self.whole if piped else (lambda local: local), holds, keeps=self.ctx.rank == 0)

    def resume(self) -> bool:
        directory = self.ckpt.resume_target() if self.cfg.checkpoint.resume else None
        if directory is None:
            return False
        self.ckpt.verify(directory)
        changes = self.ckpt.check_compatible(directory, self.config_yaml, resumable_changes(self.cfg),
                                             global_batch(self.cfg, self.ctx.world_size))
        if self.ctx.is_main:
            for change in changes:  # allowed (checkpoint.allow_config_change), else it had raised
                print(f"dit train: resuming with a changed config: {change}", flush=True)
        was = written_shape(directory)
        states = self.stateful()
        if was.same_layout(shape_of(self.cfg, self.ctx.world_size)):
            try:
                for name, engine in self.engines.items():
                    self.ckpt.load_engine(engine, directory, name)
                del states["players"]
                load_states(self.ckpt, directory, states)
            except RuntimeError as e:  # load_state_dict's mismatch: weights of another network
                if isinstance(e, CheckpointError) or "in loading state_dict" not in str(e):
                    raise
                first = str(e).strip().splitlines()[0]
                raise CheckpointError(f"{directory} does not fit this run's networks ({first}): a resume continues "
                                      f"the checkpoint's network; set the changed model.* keys back, or start a "
                                      f"new run from it with checkpoint.init_from") from None
        else:
            self.load_elastic(directory, was, states)
        copy_frozen(self.stage.frozen_copies())
        for name, engine in self.engines.items():
            apply_config(engine, self.optimizers[name], player_lr(self.cfg.optim, name), self.cfg.optim)
        if self.ctx.is_main:
            print(f"resumed from {directory} at step {self.state.step}", flush=True)
        return True

    def load_elastic(self, directory: Path, was: Shape, states: dict[str, Stateful]) -> None:
        """Resume a checkpoint of another layout: each player's fp32 masters and moments
        re-partitioned from the universal files; the step, stream position (which every rank
        kept alike) and counters from rank 0's state. The stage's draws need nothing: they are
        per sample (trainer/diffusion/noise.py). The host generators (Python, NumPy, torch)
        keep their streams while the data-parallel ranks are the same (the first rank of
        dp_rank d's sequence group on pipeline stage 0, rank d * S, wrote them); else they
        stay as the run's seed set them."""
        rng = {"rng": states.pop("rng")}
        # the weights first: an EMA the checkpoint lacks starts at them (EMAState)
        load_states(self.ckpt, directory, {"players": states.pop("players"), **states}, rank=0)
        if was.dp_world == self.ctx.dp_world:
            load_states(self.ckpt, directory, rng, rank=self.ctx.dp_rank * was.sequence_parallel)

    # ---- one step -----------------------------------------------------------------------------
    def micro_batch_losses(self, batches: Iterator[dict]) -> Iterator[tuple[str, dict[str, Metric]]]:
        """Forward/backward/step of every player on each of the grad_accum micro-batches. Each
        player's forward runs under the precision's autocast; backward and step outside it."""
        for _ in range(self.cfg.deepspeed.grad_accum):
            batch, draws = self.next_batch(batches)
            for player, loss, info in self.autocast_each(self.stage.losses(batch, draws)):
                with record_function(f"{PHASE}backward"):
                    self.engines[player].backward(loss)
                with record_function(f"{PHASE}step"):
                    self.engines[player].step()
                yield player, info

    def autocast_each(self, items: Iterator[Any]) -> Iterator[Any]:
        """Advance a generator of forward passes under autocast, handing each item out of it."""
        while True:
            with autocast(self.device, self.precision), record_function(f"{PHASE}forward"):
                item = next(items, None)
            if item is None:
                return
            yield item

    def next_batch(self, batches: Iterator[dict]) -> tuple[dict, list[torch.Generator]]:
        """The next batch on the device and its per-sample generators (trainer/diffusion/noise.py)."""
        with self.logger.timer.waiting():  # only the wait for the loader is data wait
            batch = next(batches)
        if self.key_log is not None:
            self.key_log.add(batch)
        if self.reads_data:  # one rank of a replica counts its work (its shape: the bucket's)
            self.logger.computed(*self.stage.work(batch))
        with record_function(f"{PHASE}batch"):
            draws = sample_generators(self.cfg.run.seed, self.state.step + 1, batch["__sample__"], self.device)
            return batch_to_device(batch, self.device), draws

    def pipeline_step(self, batches: Iterator[dict]) -> PlayerInfos:
        """One PipelineEngine.train_batch over grad_accum micro-batches noised before the pipe."""

        def micro_batch() -> tuple[tuple, Any]:
            inputs, targets = self.stage.pipeline_batch(*self.next_batch(batches))
            return pipeline_inputs(self.net, **inputs), targets

        with record_function(f"{PHASE}pipeline"):
            self.engines["student"].train_batch(data_iter=autocast_each(micro_batch, self.device, self.precision))
        return [("student", self.stage.take_pipeline_metrics())]

    def train_step(self, batches: Iterator[dict]) -> tuple[PlayerInfos, PlayerSkips]:
        """One optimizer step of every player: the micro-batches' metrics by player, and whether
        each player's step was skipped on every rank (a bool, or a device flag not read yet:
        `Pending`). The players skip apart: each has its own optimizer and finite guard."""
        for engine in self.engines.values():
            schedule_at(engine, self.state.step)
        self.step_lrs = self.learning_rates()  # read before the engines step their LR schedulers
        infos = self.pipeline_step(batches) if self.pipeline else list(self.micro_batch_losses(batches))
        return infos, {name: self.player_skip(name) for name in self.engines}

    def player_skip(self, player: str) -> bool | torch.Tensor:
        """Whether `player`'s step was skipped: a skip shows either in our guard or, where
        DeepSpeed's ZeRO optimizer found the global gradient norm invalid (an overflow) and
        skipped by itself, in the engine."""
        skip = self.optimizers[player].take_skip()
        return True if skip is True or not self.engines[player].was_step_applied() else skip

    def learning_rates(self) -> dict[str, float]:
        """The learning rate each player's next optimizer step will use. DeepSpeed steps the LR
        scheduler right after the optimizer, so this is read before a step (`train_step`): read
        after it, it is the following step's (each warm-up step logged the next one's rate)."""
        return {name: engine.get_lr()[0] for name, engine in self.engines.items()}

    def optimizer_metrics(self, lrs: dict[str, float]) -> dict[str, float]:
        """Gradient norm (of the last step), learning rate (`lrs`: what that step used,
        `Pending.lrs`) and, under fp16, the dynamic loss scale per player, and the accelerator's
        peak memory so far; read on log steps only (the norm is a device value). A scale halved
        by a burst of overflows regains one doubling per DeepSpeed's window of clean steps."""
        metrics: dict[str, float] = {}
        if self.device.type == "cuda":
            metrics["mem_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        for name, engine in self.engines.items():
            suffix = "" if name == "student" else f"/{name}"
            norm = engine.get_global_grad_norm()
            metrics[f"grad_norm{suffix}"] = float(norm) if norm is not None else 0.0
            metrics[f"lr{suffix}"] = lrs[name]
            scaler = dynamic_loss_scaler(engine)
            if scaler is not None:
                metrics[f"loss_scale{suffix}"] = float(scaler.cur_scale)
        return metrics

    def record_step(self, infos: PlayerInfos, skips: PlayerSkips) -> None:
        """A finished step: the EMA, which follows the student alone, follows the student's
        step on the device (not at all where that was skipped, whatever the other players did),
        and the rest of its bookkeeping waits in `pending` until its flags are read (`settle`)."""
        self.state.step += 1
        if self.key_log is not None:
            self.key_log.step_done(self.state.step)
        if self.ema is not None:
            with record_function(f"{PHASE}ema"):
                self.ema.update(self.ema_module, skips["student"])
        self.pending.append(Pending(self.state.step, infos, tuple(skips), late_flags(skips), self.step_lrs))

    def settle(self, everything: bool) -> Optional[int]:
        """The bookkeeping of the recorded steps, all of them or all but the newest: the newest
        step's skip flag is read one step late, so that no step waits for the device. An exit
        code when the run must stop."""
        while len(self.pending) > (0 if everything else 1):
            code = self.settle_step(self.pending.pop(0))
            if code:
                return code
        return None

    def settle_step(self, done: Pending) -> Optional[int]:
        """A step counts as skipped (`skipped_steps`, `nonfinite_in_row`, the event naming the
        players that skipped) when any player's optimizer skipped it: a stage whose discriminator
        keeps failing is not training either. The metrics of the players whose step was applied
        are added all the same; a skipped player's are not (they may be the non-finite values).
        A step closes whatever skipped: a log step that was skipped wrote no record, and its
        window's metrics went into the next window's mean."""
        skipped = done.skipped_players()
        for player, info in done.infos:
            if player not in skipped:
                self.logger.add(info)
        if skipped:
            self.state.skipped_steps += 1
            self.state.nonfinite_in_row += 1
            searching = all(searching_loss_scale(self.engines[p]) for p in skipped)
            self.logger.event(done.step, {"skipped_nonfinite_step": 1, "skipped_players": skipped,
                                          **({"loss_scale_overflow": 1} if searching else {})})
            if self.state.nonfinite_in_row >= self.cfg.stage.max_nonfinite_in_row and not searching:
                scaled = " (the fp16 loss scale is at its floor)" if self.precision == "fp16" else ""
                advice = nonfinite_advice(self.precision, forward_nonfinite(done.infos, skipped))
                print(f"dit train: {self.state.nonfinite_in_row} steps in a row had a non-finite loss or "
                      f"gradient{scaled} (last at step {done.step}); stopping. {advice} The last checkpoint "
                      f"holds finite weights.", file=sys.stderr, flush=True)
                return EXIT_NONFINITE
        else:
            self.state.nonfinite_in_row = 0
        extra: dict[str, float] = {"skipped_steps": self.state.skipped_steps}
        if self.logger.is_log_step(done.step):
            extra.update(self.optimizer_metrics(done.lrs))
            extra.update(self.data_stats())
        self.logger.step_done(done.step, extra)
        return None

    def data_stats(self) -> dict[str, float]:
        """Samples read and skipped per reason by this job since it started, and the stage's
        counters (captions cut at model.text.max_length), summed over ranks. Collective."""
        stats = {**self.stream.stats(), **self.stage.counters()}
        totals = summed([float(v) if self.reads_data else 0.0 for v in stats.values()])
        return {f"data/{k}": v for k, v in zip(stats, totals)}

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.resume()
        except CheckpointError as e:
            print(f"dit train: {e}", file=sys.stderr, flush=True)
            return EXIT_CHECKPOINT
        total = self.cfg.stage.steps
        self.logger = MetricsLogger(self.cfg.log, self.ctx.rank, total, self.state.step,
                                    global_batch(self.cfg, self.ctx.world_size), self.log_window)
        try:
            code = self.loop(total)
        except CheckpointError as e:  # raised on every rank together (see CheckpointManager.save)
            print(f"dit train: {e}", file=sys.stderr, flush=True)
            code = EXIT_CHECKPOINT
        finally:
            self.logger.close()
            if self.key_log is not None:
                self.key_log.close()
        return code

    def preempted(self, what: str) -> int:
        """The requeue code, said once: what this run saved (or did not need to)."""
        if self.ctx.is_main:
            rerun = ("Rerun the same command to resume." if self.cfg.checkpoint.resume else
                     "Rerun it with checkpoint.resume=true to resume (this config starts over).")
            print(f"dit train: preempted; {what}, exiting with {EXIT_REQUEUE} (requeue). {rerun}",
                  file=sys.stderr, flush=True)
        return EXIT_REQUEUE

    def loop(self, total: int) -> int:
        """Steps until `total`, a stop code, or an agreed preemption (saved first)."""
        preempt = PreemptionFlag()
        if preempt.before_start():  # a signal while the ranks started: nothing trained since `latest`
            self.stream.close()
            return self.preempted("signalled before its first step, nothing new to save")
        batches = iter(self.stream)
        code = EXIT_OK
        drawn = -1  # the step of the last sample grid drawn here
        while self.state.step < total:
            self.start_of_step()
            self.record_step(*self.train_step(batches))
            step, preempted = self.state.step, preempt.agreed()
            saving = preempted or step % self.cfg.checkpoint.every == 0 or step == total
            code = self.settle(everything=saving or step % self.cfg.log.every == 0) or EXIT_OK
            if code:
                break
            if preempted and step < total:  # at the last step the run is done: no requeue
                self.save()
                code = self.preempted(f"saved step {step}")
                break
            if saving:
                self.save()
            if self.cfg.log.sample_every and self.state.step % self.cfg.log.sample_every == 0:
                self.write_samples()
                drawn = self.state.step
            if self.cfg.log.eval_every and self.state.step % self.cfg.log.eval_every == 0:
                self.evaluate()
        batches.close()
        self.stream.close()  # its workers, idle from here on
        if code == EXIT_OK and drawn != self.state.step:  # the last step's grid, unless just drawn
            self.write_samples()
        return code

    def raw_weights(self) -> dict[str, torch.Tensor]:
        """The student's whole current weights by the network's names in fp32: its fp32 masters,
        as `dit export --raw` reads them (a progressive round's export and next teacher were the
        module's bf16 rounding of them), gathered under ZeRO, assembled from every stage under
        pipeline parallelism. Collective."""
        return self.whole(player_weights(self.engines["student"], self.optimizers["student"], self.names))

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Whole weights of the student for rank 0's grids and evals: the EMA when enabled (in
        host memory on rank 0, {} on the others), else the raw ones. Collective."""
        if self.ema is None:
            return self.raw_weights()
        gather = self.gather_of("student")
        return gather.made_whole(self.ema.full_state_dict(self.ema_module, gather.holds))

    def whole(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole network's tensors from what this rank holds. Under pipeline parallelism each
        stage holds its layers only: the first data-parallel replica of every stage writes them
        into one flat zero buffer, and a SUM all-reduce assembles it on every rank. Collective."""
        if not self.pipeline:
            return local
        shapes = {n: p.shape for n, p in self.net.named_parameters() if p.requires_grad}
        flat = torch.zeros(sum(math.prod(s) for s in shapes.values()), device=comm_device())
        views = dict(zip(shapes, flat.split([math.prod(s) for s in shapes.values()])))
        if self.ctx.dp_rank == 0:
            for name, tensor in local.items():
                views[name].copy_(tensor.flatten())
        dist.all_reduce(flat)
        return {n: views[n].view(shape).clone() for n, shape in shapes.items()}

    def evaluate(self) -> None:
        """The adherence judge on `log.prompts` with the EMA weights (collective gather, rank 0
        judges while the others wait: `wait_for_rank0`), logged to JSONL and TensorBoard."""
        weights = self.full_weights()
        if self.ctx.is_main:
            from trainer.evaluate import adherence_during_training

            with inference_numerics(self.device, self.precision), torch.random.fork_rng(devices=[]), \
                    self.non_finite_pixels("evaluation"):
                metrics = adherence_during_training(self.stage, weights, self.cfg.log)
                if metrics:
                    self.logger.event(self.state.step, metrics)
        wait_for_rank0()

    @contextlib.contextmanager
    def non_finite_pixels(self, what: str) -> Iterator[None]:
        """Samples drawn in training that hold NaN or inf (`NonFinitePixels`) skip the `what`
        of this step, logged as `nonfinite_samples` and said on stderr; training goes on (its
        loss may be finite where a sampler's many forwards in fp16 overflow)."""
        from trainer.media import NonFinitePixels

        try:
            yield
        except NonFinitePixels as e:
            fix = "sample the checkpoints in bf16 or fp32 (dit sample --precision)" if self.precision == "fp16" \
                else "from the weights or the sampler's settings (a diverged run? log.sample_cfg?)"
            self.logger.event(self.state.step, {"nonfinite_samples": what})
            print(f"step {self.state.step}: the {what} was skipped: its samples under deepspeed.precision="
                  f"{self.precision} are not finite ({e}); {fix}", file=sys.stderr, flush=True)

    def write_samples(self) -> Optional[Path]:
        """EMA (else raw) sample grid for the fixed prompts (collective gather, rank 0 draws while
        the others wait: `wait_for_rank0`).
        Grids and evals draw from a fork of the global RNG (building the sampling network draws
        its initial weights there): the RNG state checkpoints save moved with each grid, and a
        resumed run's later checkpoints differed from an uninterrupted one's."""
        weights = self.full_weights()
        out = None
        if self.ctx.is_main:
            path = Path(self.cfg.log.dir) / "samples" / f"step_{self.state.step:08d}.png"
            with inference_numerics(self.device, self.precision), torch.random.fork_rng(devices=[]), \
                    self.non_finite_pixels("sample grid"):
                out = self.stage.write_samples(weights, self.cfg.log, path)
            if out is not None:
                self.logger.event(self.state.step, {"sample_grid": str(out)})
                print(f"samples: {out}", flush=True)
        wait_for_rank0()
        return out


def preview_batch(cfg: RunConfig, samples: int, device: torch.device) -> dict:
    """The first `samples` samples of the run's data in the epoch-0 order, as one batch on
    `device`: the inputs a stage draws its samples from when it needs any
    (`Stage.preview_samples`: the low-resolution images a super-resolution stage upsamples, the
    images the autoencoder stage reconstructs and fits its latent scale on). They depend on the
    data config alone, so they are the same at every step, after a resume, and for whoever
    reloads a checkpoint."""
    from data_pipeline.stream import build_stream

    data = replace(cfg.data, batch_size=samples, num_workers=0)
    return batch_to_device(next(iter(build_stream(data, 0, 1))), device)


def train(cfg: RunConfig) -> int:
    try:
        trainer = Trainer(cfg)
        faults.install(trainer)  # only when a DIT_INJECT_* variable is set (the fault suite)
        code = trainer.run()
    except DataError as e:  # maybe on this rank alone: exit now, the others fail on the lost peer
        print(f"dit train: {e}", file=sys.stderr, flush=True)
        return EXIT_DATA
    except CheckpointError as e:  # checkpoint.init_from unusable (every rank reads the same files)
        print(f"dit train: {e}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT
    if dist.is_initialized():
        dist.barrier()
    return code
