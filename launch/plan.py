"""`dit plan CONFIG [overrides] --gpus N`: memory per rank and step time, before renting GPUs.

For every layout - ZeRO stage 0-3, pipeline split p (ZeRO 0/1 only, a DeepSpeed limit) or
sequence split S (DeepSpeed-Ulysses, S dividing the heads), under each activation checkpointing
policy (model.checkpoint_policy none | attention | full: "no ckpt", "ckpt attn", "ckpt full") -
it estimates per rank:

model states (P trained parameters, N data-parallel ranks = GPUs / p, P / p per pipeline
stage; w = 4 bytes in fp32, 2 in bf16/fp16; Adam's m and v in fp32). This is DeepSpeed
0.19's accounting as measured on real engines (tests/launch/test_plan.py), which keeps an fp32
master partition even in fp32 training:

    stage   params             grads        fp32 master   Adam m, v
    0       w P                w P          4 P (mixed)   8 P        fp32: 4+4+8, mixed: 2+2+4+8 = 16 P
    1, 2    w P                w P / N      4 P / N       8 P / N    mixed: 2 P + 14 P / N
    3       w P / N + w Ppers  w P / N      4 P / N       8 P / N    mixed: (2 + 2 + 12) P / N

(Ppers: ZeRO-3 keeps parameters below its persistence threshold whole on every rank.)
bf16 at ZeRO 1-3 accumulates gradients in fp32 (trainer/optim.py, grad_accum_dtype): the
gradient partition is 4 P / N at ZeRO 2-3, and ZeRO-1 steps through DeepSpeed's BF16_Optimizer,
which keeps whole bf16 and fp32 gradients on every rank: 6 P (8 P + 12 P / N in all).
ZeRO-1 here partitions gradients as ZeRO-2 does (DeepSpeed reduces them into the owner's
partition at once); the ZeRO paper's ZeRO-1 keeps them whole (2 P + 2 P + 12 P / N).
ZeRO-Offload moves states to the host, where the plan counts them apart (host GB per GPU, not
in the GPU's total): deepspeed.offload_optimizer the fp32 master and Adam partitions and the
reduced gradient partition (fp32 at ZeRO 1-2 and in bf16, w bytes at ZeRO-3 otherwise; ZeRO-1
keeps DeepSpeed's ZeRO optimizer there, not BF16_Optimizer), which DeepSpeed's CPU Adam
steps there; deepspeed.offload_params (ZeRO-3) the parameter partition too (Ppers stays).

communication buckets: DeepSpeed's reduce bucket (deepspeed.bucket_size elements, 5e7 by
default; w bytes each, two with overlap_comm) during backward at ZeRO 1-3 (not where bf16
ZeRO-1 steps through BF16_Optimizer), plus ZeRO-3's prefetch bucket.

activations of one micro-batch: the tensors autograd saves, counted per DiT block from the
model's code (layers.py) - in units of B N D values (B micro-batch, N tokens, D width):
residual-stream and norm inputs 4, adaLN modulations 2, fused qkv 3, normalized q and k 2,
attention output 1, the two gated branch outputs 2, MLP 2 x mlp_ratio, cross-attention 5
(+ keys and values over the L text tokens). On a CPU torch's rms_norm (the qk-norm) is a
composite that also keeps x * rsqrt(mean x^2) (+1 a normed tensor: +3), and in bf16/fp16 runs
in fp32, keeping an fp32 copy of q and k and that product in fp32 (+8 a block, +6 for a
temporal attention, over fp32's count: DiT-S/2 at 64 px measured 727.8 MB, planned 572.2 MB
without them). On a GPU in bf16/fp16, autocast runs layer_norm in fp32, so the
outputs of the norms that the adaLN modulation keeps (two a block, the temporal and the final
one) are fp32: one more w-byte unit each (the CPU's autocast keeps them in bf16). With them
the plan accounts for the H200's measured peak of DiT-XL/2 (batch 64, ZeRO-2: 49.1 GB against
44.7 GB planned without them, and the qk-norm outputs then fp32 too, since fixed: +4.2 GB).
With full checkpointing every block keeps only its input (1), and one block is recomputed at a
time; with attention checkpointing a block keeps what lies outside its attentions (each
attention's input among it), not their qkv, normalized q and k, outputs, text keys and values
and temporal attention, and one attention is recomputed at a time (DiT-S/2 at 32 px in fp32 on
the CPU: 1156.6 MB saved without, 691.1 MB with it; 689.0 planned plus the recomputed one). Pipeline stages hold up to p micro-batches of their layers
(1F1B). Activations of frozen modules are not counted (no grad).
The autoencoder stage trains no DiT: its KL autoencoder (convolutions, group norms, a mid-block
attention) is measured instead (launch/plan_model.py): the bytes autograd saves in one forward
of the stage's loss traced on fake tensors with the device's autocast rules, and torch's FLOP
counter for its MACs; it is never pipelined, split or checkpointed, so only ZeRO 0-3 are planned.

frozen modules (launch/plan_model.py, per stage.kind: text encoder, autoencoder, a distillation's
teacher), w bytes a parameter, whole on every rank: the trainer places them in the training
precision, the text encoder in its own (model.text.precision). The adversarial discriminator's
frozen trunk copy sits in its player: its engine casts it to w bytes and partitions it at
ZeRO-3; that player's trained heads add their own model states and buckets (its engine's),
never pipelined.
A sequence split S keeps N / S tokens per rank in every block and the head (attention sees N
tokens with H / S heads: the same size), so the N D terms shrink by S; ZeRO still partitions
over all GPUs / p ranks.

global batch: the config's on the GPUs, as the trainer counts it (micro-batch x grad_accum x
GPUs / (p S) of the config's p and S; --micro-batch replaces the config's micro-batch). Every
layout keeps it: with p pipeline stages and a sequence split S there are GPUs / (p S)
replicas, each running p S times the micro-batches, and the suggested overrides say so
(deepspeed.grad_accum). A layout whose replicas cannot keep it with a whole grad_accum, or that
the trainer's config validation refuses (offload at ZeRO-0 or with a pipeline, model.compile or
model.flat_params at ZeRO-3, a stage that splits no DiT...), is left out.

all-to-all volume (S > 1): each attention (full, or the temporal one of factorized blocks; a
clip's spatial attention stays on its rank) exchanges q, k, v and its output, B N D / S values
per rank each, (S - 1) / S of them leaving the rank; again in backward (and in the recompute
of either checkpointing policy): 8 (12) x w B N D (S - 1) / S^2 bytes per attention per micro-batch.

step time: 6 x forward MACs per sample (forward + backward) plus 2 x those recomputed (all of
them under full checkpointing: 8 x; the attentions' projections and matmuls under attention)
x the global batch, over GPUs x peak x MFU, stretched by the pipeline bubble (p - 1) / (m + p - 1),
plus the all-to-all volume over the link bandwidth (--link-gbs, not overlapped), plus 2 x
forward MACs per forward of a distillation's frozen teacher-sized DiTs (teacher steps, with CFG
for a full diffusion teacher; the discriminator trunk's passes), per sample of the global batch.

The suggestion is the fitting layout with the shortest step; among equals, one without ZeRO-3
(its parameter all-gathers cost 1.5x the communication of ZeRO 0-2), then the least memory.
A sequence split is suggested only for a micro-batch of one sample (a clip too long for one
rank): otherwise a smaller micro-batch shrinks activations as much, without an all-to-all.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from typing import Any, Optional

from launch.plan_model import ModelFacts, model_facts
from trainer.config import DeepSpeedConfig, RunConfig, load_config, validate
from trainer.config_errors import ConfigError

GB = 1e9
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM
DEFAULT_MFU = 0.4
ADAM_BYTES = 8  # fp32 m and v
MASTER_BYTES = 4  # fp32 master weights
# Per DiT block, in units of B N D saved values (see the module docstring): outside its attentions,
SELF_OUTSIDE = 4 + 2 + 2  # norm inputs/outputs, modulations (one the self-attention's input), gated outputs
CROSS_OUTSIDE = 2  # the cross-attention's norm input and output (its input)
TEMPORAL_OUTSIDE = 1  # the temporal attention's input
# and inside them (what checkpoint_policy=attention recomputes):
SELF_INSIDE = 3 + 1  # fused qkv, attention output
QK_NORMED = 2  # normalized q and k, the attention's inputs
CROSS_INSIDE = 2  # q, attention output (+1 normalized q)
TEMPORAL_INSIDE = 7  # factorized video blocks: temporal attention with its reshapes (+ QK_NORMED)
# torch's CPU rms_norm (qk-norm) is a composite that keeps x * rsqrt(mean x^2) besides its input:
# one more unit per normed tensor; in bf16/fp16 it computes in fp32 and keeps an fp32 copy of
# the input and that product in fp32, 2 units each, for the input itself (kept anyway as a view
# of the fused qkv / kv, except the cross-attention's q): measured per bf16 block of DiT-S/2, +8
# units over fp32's count (+6 temporal)
CPU_RMS_NORM = 1
CPU_RMS_NORM_HALF = 4
HEAD = 3  # final norm input and output, modulation
POLICIES = ("none", "attention", "full")  # model.checkpoint_policy, what a layout recomputes
CKPT_NAMES = {"none": "no ckpt", "attention": "ckpt attn", "full": "ckpt full"}
AUTOCAST_NORMS = 2  # GPU bf16/fp16: norm1 and norm2 outputs in fp32 (+1 unit each; +1 temporal, +1 head)


# ---------------------------------------------------------------------------------------------
# Memory.


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed ZeRO knobs that size memory, as DeepSpeed resolves the trainer's config."""

    reduce_bucket_size: int
    overlap_comm: bool
    prefetch_bucket_size: int
    persistence_threshold: int


def zero_settings(cfg: RunConfig, zero_stage: int) -> ZeroSettings:
    """Read through DeepSpeed's own config model, so its defaults are the ones used."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from trainer.optim import deepspeed_dict

    ds = deepspeed_dict(cfg.deepspeed, cfg.optim, cfg.data.batch_size, 1)["zero_optimization"]
    z = DeepSpeedZeroConfig(**{**ds, "stage": zero_stage})
    overlap = z.overlap_comm if z.overlap_comm is not None else zero_stage == 3
    return ZeroSettings(int(z.reduce_bucket_size), bool(overlap), int(z.prefetch_bucket_size),
                        int(z.param_persistence_threshold))


def param_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_state_bytes(params: int, zero_stage: int, dp: int, precision: str,
                      persistent: int = 0) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients, fp32 master weights and Adam states."""
    w = param_bytes(precision)
    mixed = precision != "fp32"
    if zero_stage == 0:
        return {"params": w * params, "grads": w * params,
                "master": MASTER_BYTES * params if mixed else 0, "optimizer": ADAM_BYTES * params}
    shard = params / dp
    return {
        "params": w * (shard + persistent) if zero_stage == 3 else w * params,
        "grads": grad_bytes(params, zero_stage, dp, precision),
        "master": MASTER_BYTES * shard,
        "optimizer": ADAM_BYTES * shard,
    }


def grad_bytes(params: int, zero_stage: int, dp: int, precision: str) -> float:
    """Per-rank gradient bytes at ZeRO 1-3: the partition in w bytes; under bf16 in fp32
    (grad_accum_dtype), and whole in bf16 and fp32 at ZeRO-1 (BF16_Optimizer)."""
    if precision != "bf16":
        return param_bytes(precision) * params / dp
    if zero_stage == 1:
        return (param_bytes(precision) + MASTER_BYTES) * params
    return MASTER_BYTES * params / dp


def offloaded(states: dict[str, float], params: int, zero_stage: int, dp: int, precision: str,
              persistent: int, optimizer: bool, parameters: bool) -> tuple[dict[str, float], dict[str, float]]:
    """`model_state_bytes` split into (device, host) under ZeRO-Offload: offload_optimizer keeps
    the fp32 master and Adam partitions and the reduced gradient partition (fp32 at ZeRO 1-2, in
    the training precision at ZeRO-3) on the host; offload_params (ZeRO-3) the parameter
    partition too, the persistent parameters stay whole on the device."""
    device, host = dict(states), {key: 0.0 for key in states}
    shard = params / dp
    if optimizer and zero_stage > 0:
        host["master"], host["optimizer"] = device["master"], device["optimizer"]
        host["grads"] = (MASTER_BYTES if zero_stage < 3 or precision == "bf16" else param_bytes(precision)) * shard
        device["master"] = device["optimizer"] = device["grads"] = 0.0
    if parameters and zero_stage == 3:
        host["params"] = param_bytes(precision) * shard
        device["params"] = float(param_bytes(precision) * persistent)
    return device, host


def player_states(params: int, persistent: int, zero_stage: int, dp: int, precision: str,
                  ds: DeepSpeedConfig) -> tuple[dict[str, float], dict[str, float]]:
    """(device, host) model states of one player's engine: `model_state_bytes`, `offloaded`."""
    return offloaded(model_state_bytes(params, zero_stage, dp, precision, persistent), params, zero_stage, dp,
                     precision, persistent, ds.offload_optimizer, ds.offload_params)


def frozen_bytes(m: ModelFacts, zero_stage: int, dp: int, precision: str, offload_params: bool,
                 text_precision: str = "fp32") -> tuple[float, float]:
    """(device, host) bytes of the frozen parameters per rank. The stage's helpers (autoencoder,
    teacher) are whole on every rank in the training precision, the text encoder in
    `text_precision` (model.text.precision), as `trainer.bundle.place` places them; the
    discriminator's trunk copy is as its engine keeps it: cast to the training precision,
    partitioned at ZeRO-3 (tensors below the persistence threshold whole), that partition on the
    host with offload_params."""
    w = param_bytes(precision)
    device, host = float(w * (m.frozen_params - m.text_params) + param_bytes(text_precision) * m.text_params), 0.0
    if m.disc is None:
        return device, host
    if zero_stage < 3:
        return device + w * m.disc.frozen_params, host
    shard = w * m.disc.frozen_params / dp
    device += w * m.disc.frozen_persistent
    return (device, host + shard) if offload_params else (device + shard, host)


def ema_bytes(cfg: RunConfig, params: int, zero_stage: int, dp: int) -> tuple[float, float]:
    """(device, host) bytes of the EMA's fp32 shadow (trainer/ema.py) of `params` trained
    parameters (a pipeline stage's). It sits beside the fp32 masters it follows, split as they
    are: whole on every rank without ZeRO, a rank's partition at ZeRO 1-3, on the host where
    the optimizer is offloaded. (Its update's fp32 copy of at most 256 MB comes after the
    backward pass has freed the activations: no peak of its own.)"""
    if not cfg.ema.enabled:
        return 0.0, 0.0
    shadow = 4.0 * (params / dp if zero_stage > 0 else params)
    return (0.0, shadow) if zero_stage > 0 and cfg.deepspeed.offload_optimizer else (shadow, 0.0)


def bucket_bytes(zero_stage: int, precision: str, z: ZeroSettings, params: int, offload: bool = False) -> float:
    """DeepSpeed's gradient-reduction buffers (allocated whole, whatever the model's size) and
    ZeRO-3's prefetch of gathered parameters (at most the model). None without ZeRO, nor where
    bf16 at ZeRO-1 steps through BF16_Optimizer (no offload), which reduces its whole gradients."""
    if zero_stage == 0 or (zero_stage == 1 and precision == "bf16" and not offload):
        return 0.0
    w = param_bytes(precision)
    buckets = 2 if z.overlap_comm and zero_stage < 3 else 1
    prefetch = min(z.prefetch_bucket_size, params) if zero_stage == 3 else 0
    return float(w * (buckets * z.reduce_bucket_size + prefetch))


def attention_units(m: ModelFacts, cpu: bool, fp32_norms: bool = False,
                    half: bool = False) -> list[tuple[float, float]]:
    """Saved values inside each attention submodule of one DiT block (self, cross, temporal)
    per sample: (units of N D, units of L D), without the attention's input (counted outside
    it: a checkpoint keeps it). `half`: bf16/fp16 training (on the CPU, qk-norm's fp32 copies)."""
    qk = QK_NORMED if m.qk_norm else 0
    rms = (CPU_RMS_NORM_HALF if half else CPU_RMS_NORM) if cpu and m.qk_norm else 0
    parts = [(SELF_INSIDE + qk + 2 * rms, 0.0)]
    if m.cross_attention:  # q (normalized, its composite's: the raw q not kept in half), output; k, v
        q = qk // 2 + rms - (1 if rms and half else 0)
        parts.append((CROSS_INSIDE + q, 2 + qk // 2 + rms))
    if m.temporal:
        parts.append((TEMPORAL_INSIDE + qk + 2 * rms + (1 if fp32_norms else 0), 0.0))
    return parts


def block_units(m: ModelFacts, cpu: bool, fp32_norms: bool = False, half: bool = False) -> tuple[float, float]:
    """Saved values of one DiT block per sample: (units of N D, units of L D); `fp32_norms`:
    mixed precision on a GPU (autocast's layer_norm in fp32); `half`: bf16/fp16 training."""
    nd = SELF_OUTSIDE + 2 * m.mlp_ratio + (AUTOCAST_NORMS if fp32_norms else 0)
    nd += (CROSS_OUTSIDE if m.cross_attention else 0) + (TEMPORAL_OUTSIDE if m.temporal else 0)
    parts = attention_units(m, cpu, fp32_norms, half)
    return nd + sum(n for n, _ in parts), sum(l for _, l in parts)


def activation_bytes(m: ModelFacts, micro_batch: int, precision: str, policy: str,
                     layers: Optional[int] = None, cpu: bool = False, in_flight: int = 1,
                     sequence_parallel: int = 1) -> float:
    """Bytes autograd holds for `in_flight` micro-batches over `layers` blocks (default: all)
    under the checkpointing `policy` (model.checkpoint_policy): none keeps every block's saved
    values; full only its input, and one block at a time is recomputed with all of them;
    attention what the block keeps outside its attentions, and one attention at a time is
    recomputed. A sequence split S keeps N / S tokens per rank. A network that is not a DiT has
    its measured bytes (`m.saved`, traced in the config's precision on the device `cpu` names)."""
    if policy not in POLICIES:
        raise ValueError(f"checkpointing policy {policy!r}; one of {', '.join(POLICIES)}")
    if m.saved is not None:  # a measured network (the autoencoder stage's), in the config's precision
        return float(in_flight * m.saved.bytes(micro_batch))
    layers = m.depth if layers is None else layers
    half = precision != "fp32"
    fp32_norms = half and not cpu
    nd, ld = block_units(m, cpu, fp32_norms, half)
    ND, LD = m.tokens * m.width / sequence_parallel, m.text_len * m.width
    block = nd * ND + ld * LD
    attentions = [n * ND + l * LD for n, l in attention_units(m, cpu, fp32_norms, half)]
    head = (HEAD + (1 if fp32_norms else 0)) * ND
    per_block, recomputed = {"none": (block, 0.0), "full": (ND, block),
                             "attention": (block - sum(attentions), max(attentions))}[policy]
    kept = layers * per_block + head + m.text_len * m.text_dim
    return float(micro_batch * param_bytes(precision) * (in_flight * kept + recomputed))


def all_to_all_bytes(m: ModelFacts, micro_batches: int, micro_batch: int, precision: str, policy: str,
                     sequence_parallel: int) -> float:
    """Bytes each rank sends per step in the all-to-alls of a sequence split S (0 for S = 1):
    q, k, v and the output of each block's exchanged attention, forward, backward and the
    recompute of either checkpointing policy (both run the attention again), (S - 1) / S of
    B N D / S values each."""
    S = sequence_parallel
    passes = 8 if policy == "none" else 12
    per_attention = passes * micro_batch * m.tokens * m.width * (S - 1) / S**2
    return float(m.depth * micro_batches * per_attention * param_bytes(precision))


# ---------------------------------------------------------------------------------------------
# Layouts.


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_mem_gb: float = 80.0
    peak_tflops: float = H100_BF16_TFLOPS
    mfu: float = DEFAULT_MFU
    headroom: float = 0.1  # kept free: allocator fragmentation, CUDA/NCCL context
    cpu: bool = False  # activations as the CPU kernels keep them (for measuring on a CPU)
    link_gb_s: float = 450.0  # all-to-all bandwidth per GPU (H100 NVLink, one direction)

    @property
    def usable_bytes(self) -> float:
        return self.gpu_mem_gb * GB * (1 - self.headroom)


@dataclass(frozen=True)
class Layout:
    zero_stage: int
    pipeline_stages: int
    checkpoint_policy: str  # none | attention | full (model.checkpoint_policy)
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        if self.checkpoint_policy not in POLICIES:
            raise ValueError(f"checkpoint_policy {self.checkpoint_policy!r}; one of {', '.join(POLICIES)}")

    def replicas(self, gpus: int) -> int:
        """Data-parallel replicas: each pipeline (p GPUs) or sequence group (S GPUs) is one."""
        return gpus // (self.pipeline_stages * self.sequence_parallel)

    def grad_accum(self, global_batch: int, micro_batch: int, gpus: int) -> Optional[int]:
        """The micro-batches per step each replica runs for `global_batch` (p S times the
        config's when it had neither split); None when no whole number keeps it."""
        per_micro_step = micro_batch * self.replicas(gpus)
        return global_batch // per_micro_step if global_batch % per_micro_step == 0 else None

    def settings(self, cfg: RunConfig, micro_batch: int, grad_accum: int) -> dict[str, Any]:
        """The config keys of this layout: its ZeRO stage, splits and checkpointing policy, and
        the micro-batch, grad_accum and sequence split where they differ from `cfg`'s. The policy
        is model.checkpoint_policy; a config's model.activation_checkpointing=true would make it
        full whatever the policy (trainer.parallel.checkpoint_policy), so it is turned off."""
        ds = cfg.deepspeed
        keys: dict[str, Any] = {"deepspeed.zero_stage": self.zero_stage,
                                "deepspeed.pipeline_stages": self.pipeline_stages}
        if self.sequence_parallel != ds.sequence_parallel_size:
            keys["deepspeed.sequence_parallel_size"] = self.sequence_parallel
        if grad_accum != ds.grad_accum:
            keys["deepspeed.grad_accum"] = grad_accum
        if micro_batch != cfg.data.batch_size:
            keys["data.batch_size"] = micro_batch
        keys["model.checkpoint_policy"] = self.checkpoint_policy
        if cfg.model.activation_checkpointing:
            keys["model.activation_checkpointing"] = False
        return keys

    def overrides(self, cfg: RunConfig, micro_batch: int, grad_accum: int) -> str:
        """`settings` as command-line overrides."""
        return " ".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                        for key, value in self.settings(cfg, micro_batch, grad_accum).items())

    def applied(self, cfg: RunConfig, micro_batch: int, grad_accum: int) -> RunConfig:
        """`cfg` with this layout's settings, as the trainer would load it with the overrides."""
        for key, value in self.settings(cfg, micro_batch, grad_accum).items():
            section, name = key.split(".")
            cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{name: value})})
        return cfg

    def name(self) -> str:
        split = (f"pipe {self.pipeline_stages}" if self.pipeline_stages > 1 else
                 f"seq {self.sequence_parallel}" if self.sequence_parallel > 1 else "no pipe")
        return f"ZeRO-{self.zero_stage}, {split}, {CKPT_NAMES[self.checkpoint_policy]}"


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    states: dict[str, float]
    buckets: float
    activations: float
    frozen: float
    step_s: float
    samples_per_step: int  # the global batch
    micro_batch: int
    grad_accum: int  # micro-batches per step of each replica
    host: dict[str, float]  # model states ZeRO-Offload keeps on the host, per rank
    all_to_all: float = 0.0  # bytes sent per rank per step (sequence split)
    ema: float = 0.0  # the EMA's fp32 shadow of the student on the device

    @property
    def model_states(self) -> float:
        return sum(self.states.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())

    @property
    def total(self) -> float:
        return self.model_states + self.buckets + self.activations + self.frozen + self.ema


def layouts(gpus: int, depth: int, heads: int = 1, split_unit: int = 1) -> list[Layout]:
    """Every layout DeepSpeed accepts: pipeline splits p dividing the GPUs (p <= depth) run
    with ZeRO 0 or 1 only; sequence splits S dividing the GPUs, the heads and the split unit
    (latent frames of a factorized clip, else tokens), without a pipeline."""
    splits = [p for p in range(1, min(gpus, depth) + 1) if gpus % p == 0]
    seqs = [s for s in range(2, min(gpus, heads) + 1) if gpus % s == 0 and heads % s == 0 and split_unit % s == 0]
    return [Layout(z, p, ckpt) for ckpt in POLICIES for p in splits for z in range(4) if p == 1 or z <= 1] + \
        [Layout(z, 1, ckpt, s) for s in seqs for ckpt in POLICIES for z in range(4)]


def step_seconds(m: ModelFacts, samples: int, hw: Hardware, layout: Layout, micro_batches: int) -> float:
    """6 x MACs per sample plus 2 x those recomputed (the whole forward's under full
    checkpointing, the attentions' under attention) over the GPUs' sustained FLOP/s, stretched
    by the pipeline bubble (p - 1) / (m + p - 1), plus 2 x the MACs of the frozen teacher-sized
    DiTs' forwards of a distillation stage (run before the student's pass, outside the pipe)."""
    recomputed = {"none": 0, "attention": m.attention_macs, "full": m.macs_per_sample}[layout.checkpoint_policy]
    flops = (6 * m.macs_per_sample + 2 * recomputed) * samples
    helper_flops = 2 * m.helper_forwards * m.teacher_macs * samples
    p = layout.pipeline_stages
    bubble = (p - 1) / (micro_batches + p - 1)
    return (flops / (1 - bubble) + helper_flops) / (hw.gpus * hw.peak_tflops * 1e12 * hw.mfu)


def global_batch(cfg: RunConfig, gpus: int, micro_batch: Optional[int] = None) -> int:
    """The config's global batch on `gpus` ranks as the trainer counts it, with `micro_batch`
    samples per rank when given."""
    from trainer.elastic import shape_of

    shape = shape_of(cfg, gpus)
    return replace(shape, batch_size=micro_batch or shape.batch_size).global_batch


def estimate(cfg: RunConfig, m: ModelFacts, hw: Hardware, layout: Layout,
             micro_batch: Optional[int] = None) -> Estimate:
    """Per-rank memory and step time of `layout`. The global batch stays the config's: the
    GPUs / (p S) replicas of p pipeline stages or a sequence split S each run p S times the
    micro-batches of a replica without them."""
    micro = micro_batch or cfg.data.batch_size
    p, S = layout.pipeline_stages, layout.sequence_parallel
    dp = hw.gpus // p
    samples = global_batch(cfg, hw.gpus, micro)
    micro_batches = layout.grad_accum(samples, micro, hw.gpus)
    if micro_batches is None:
        raise ValueError(f"{layout.name()}: no whole deepspeed.grad_accum keeps the global batch {samples} "
                         f"on {layout.replicas(hw.gpus)} replicas of micro-batch {micro}")
    precision, ds = cfg.deepspeed.precision, cfg.deepspeed
    z = zero_settings(cfg, layout.zero_stage)
    zero3 = layout.zero_stage == 3
    states, host = player_states(math.ceil(m.params / p), m.persistent_params if zero3 else 0, layout.zero_stage, dp,
                                 precision, ds)
    buckets = bucket_bytes(layout.zero_stage, precision, z, math.ceil(m.params / p), ds.offload_optimizer)
    if m.disc is not None:  # the second player's engine: never pipelined, its own buckets
        d = m.disc
        disc_states, disc_host = player_states(d.params, d.persistent_params if zero3 else 0, layout.zero_stage,
                                               dp, precision, ds)
        states = {key: states[key] + disc_states[key] for key in states}
        host = {key: host[key] + disc_host[key] for key in host}
        buckets += bucket_bytes(layout.zero_stage, precision, z, d.params + d.frozen_params, ds.offload_optimizer)
    frozen, frozen_host = frozen_bytes(m, layout.zero_stage, dp, precision, ds.offload_params,
                                       cfg.model.text.precision)
    host["params"] += frozen_host
    ema, host["ema"] = ema_bytes(cfg, math.ceil(m.params / p), layout.zero_stage, dp)
    acts = activation_bytes(m, micro, precision, layout.checkpoint_policy, math.ceil(m.depth / p), hw.cpu,
                            in_flight=min(p, micro_batches), sequence_parallel=S)  # 1F1B: the first stage holds up to p
    exchanged = all_to_all_bytes(m, micro_batches, micro, precision, layout.checkpoint_policy, S) if S > 1 else 0.0
    step = step_seconds(m, samples, hw, layout, micro_batches) + exchanged / (hw.link_gb_s * GB)
    return Estimate(layout, states, buckets, acts, frozen, step, samples, micro, micro_batches, host, exchanged, ema)


def suggest(estimates: list[Estimate], hw: Hardware, micro_batch: int) -> Optional[Estimate]:
    """The fitting layout with the shortest step (no recomputation, no pipeline bubble, no
    all-to-all when possible); among equals one without ZeRO-3 (whose parameter gathers add
    half the communication of the others), then the one with the most memory left. A sequence
    split only when the micro-batch is one sample: else a smaller micro-batch shrinks the
    activations as much without an all-to-all."""
    fitting = [e for e in estimates if e.total <= hw.usable_bytes
               and (e.layout.sequence_parallel == 1 or micro_batch == 1)]
    key = lambda e: (round(e.step_s, 9), e.layout.zero_stage == 3, e.total)  # noqa: E731
    return min(fitting, key=key) if fitting else None


def accepted(cfg: RunConfig, layout: Layout, gpus: int, micro_batch: int) -> bool:
    """Whether the trainer runs `layout` for `cfg` with the config's global batch: a whole
    grad_accum keeps it, and the config's validation takes the layout's settings."""
    grad_accum = layout.grad_accum(global_batch(cfg, gpus, micro_batch), micro_batch, gpus)
    if grad_accum is None:
        return False
    try:
        validate(layout.applied(cfg, micro_batch, grad_accum), gpus)
    except ConfigError:
        return False
    return True


def candidate_layouts(m: ModelFacts, gpus: int) -> list[Layout]:
    """`layouts` of a DiT; ZeRO 0-3 alone for a network that is not one (the autoencoder's:
    nothing pipelines, splits or checkpoints it)."""
    if m.saved is not None:
        return [Layout(zero_stage, 1, "none") for zero_stage in range(4)]
    return layouts(gpus, m.depth, m.heads, m.split_unit)


def plan(cfg: RunConfig, hw: Hardware, micro_batch: Optional[int] = None) -> tuple[ModelFacts, list[Estimate]]:
    """The estimates of every layout the trainer accepts for `cfg` on `hw`. Raises ConfigError
    naming the key where the config's networks cannot be built (or its teacher does not fit)."""
    threshold = zero_settings(cfg, 3).persistence_threshold
    m = model_facts(cfg, threshold, "cpu" if hw.cpu else "cuda")
    micro = micro_batch or cfg.data.batch_size
    return m, [estimate(cfg, m, hw, layout, micro) for layout in candidate_layouts(m, hw.gpus)
               if accepted(cfg, layout, hw.gpus, micro)]


# ---------------------------------------------------------------------------------------------
# Report.


def gb(x: float) -> str:
    return f"{x / GB:8.2f}"


# What each stage kind keeps frozen (launch/plan_model.py).
FROZEN = {"pretrain": "text encoder, autoencoder", "superres": "text encoder, autoencoder",
          "progressive": "text encoder, autoencoder, teacher",
          "adversarial": "text encoder, autoencoder, teacher, discriminator trunk", "autoencoder": "nothing"}


def model_line(cfg: RunConfig, m: ModelFacts) -> str:
    """What is trained and frozen, and the input the trained network sees."""
    trained = m.params + (m.disc.params if m.disc else 0)
    frozen = m.frozen_params + (m.disc.frozen_params if m.disc else 0)
    if m.saved is None:
        name, seen = cfg.model.preset, f"{m.latent_shape}, {m.tokens} tokens, {m.text_len} text tokens"
    else:
        ae = cfg.model.autoencoder
        name = f"{ae.kind} autoencoder {list(ae.block_out_channels)} x{ae.layers_per_block}"
        seen = f"{m.latent_shape} pixels; activations measured, {m.saved.per_sample / GB:.3f} GB per sample"
    return (f"model {name} ({cfg.stage.kind}): {trained / 1e6:.1f}M trained parameters, {frozen / 1e6:.1f}M "
            f"frozen ({FROZEN[cfg.stage.kind]}); input {seen}")


def format_plan(cfg: RunConfig, m: ModelFacts, estimates: list[Estimate], hw: Hardware) -> str:
    micro, ds = estimates[0].micro_batch, cfg.deepspeed
    offload = " + ".join(what for what, on in (("optimizer", ds.offload_optimizer), ("params", ds.offload_params))
                         if on)
    lines = [
        model_line(cfg, m),
        f"forward {m.macs_per_sample / 1e9:.2f} GMACs per sample; "
        f"training ~ {6 * m.macs_per_sample / 1e9:.1f} GFLOPs per sample"
        + (f" + {2 * m.helper_forwards * m.teacher_macs / 1e9:.1f} in {m.helper_forwards:.3g} frozen DiT forwards"
           if m.helper_forwards else ""),
        f"{hw.gpus} GPUs x {hw.gpu_mem_gb:g} GB ({(1 - hw.headroom) * 100:.0f}% usable), {cfg.deepspeed.precision}, "
        f"micro-batch {micro}, grad_accum {cfg.deepspeed.grad_accum}, global batch {estimates[0].samples_per_step}; "
        f"peak {hw.peak_tflops:g} TFLOP/s at {hw.mfu:.0%} MFU"
        + (f"; offload ({offload}): host GB per GPU apart" if offload else ""),
        "",
        f"{'layout':<28}{'params':>8} {'grads':>8} {'optim':>8} {'ema':>8} {'buckets':>8} {'activ':>8} "
        f"{'frozen':>8} {'total GB':>8}  fits  {'step s':>7} {'a2a GB':>7} {'host GB':>7}",
    ]
    for e in estimates:
        s = e.states
        fits = "yes" if e.total <= hw.usable_bytes else "no"
        lines.append(f"{e.layout.name():<28}{gb(s['params'])} {gb(s['grads'])} {gb(s['master'] + s['optimizer'])} "
                     f"{gb(e.ema)} {gb(e.buckets)} {gb(e.activations)} {gb(e.frozen)} {gb(e.total)}  {fits:<4}  "
                     f"{e.step_s:7.3f} {e.all_to_all / GB:7.2f} {e.host_total / GB:7.2f}")
    best = suggest(estimates, hw, micro)
    lines.append("")
    if best is None:
        offload_hint = ("" if ds.offload_optimizer and ds.offload_params else
                        ", or offload the parameters too (deepspeed.zero_stage=3 deepspeed.offload_params=true)"
                        if ds.offload_optimizer else ", or offload (deepspeed.offload_optimizer=true)")
        lines.append("nothing fits: lower data.batch_size (raise deepspeed.grad_accum to keep the global "
                     f"batch), add GPUs{offload_hint}")
    else:
        host = f", {best.host_total / GB:.1f} GB of host memory per GPU" if best.host_total else ""
        lines.append(f"suggested: {best.layout.name()}: {best.total / GB:.1f} GB per GPU{host}, {best.step_s:.3f} s "
                     f"per step, {best.samples_per_step / best.step_s:.0f} samples/s")
        lines.append(f"  overrides: {best.layout.overrides(cfg, best.micro_batch, best.grad_accum)}")
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    hw = Hardware(args.gpus, args.gpu_mem, args.peak_tflops, args.mfu, args.headroom, args.device == "cpu",
                  args.link_gbs)
    if hw.gpus < 1:
        print("dit plan: --gpus must be at least 1", flush=True)
        return 2
    try:
        validate(cfg, hw.gpus)
        m, estimates = plan(cfg, hw, args.micro_batch)
    except ConfigError as e:
        print(f"dit plan: {e}", flush=True)
        return 2
    if not estimates and not args.json:
        print(f"dit plan: no layout on {hw.gpus} GPU(s) keeps the global batch "
              f"{global_batch(cfg, hw.gpus, args.micro_batch)} with a whole deepspeed.grad_accum at micro-batch "
              f"{args.micro_batch or cfg.data.batch_size}", flush=True)
        return 2
    if args.json:
        print(json.dumps([{"layout": e.layout.__dict__, **e.states, "ema": e.ema, "buckets": e.buckets,
                           "activations": e.activations, "frozen": e.frozen, "total": e.total,
                           "step_s": e.step_s, "all_to_all": e.all_to_all, "host": e.host,
                           "global_batch": e.samples_per_step, "grad_accum": e.grad_accum,
                           "overrides": e.layout.overrides(cfg, e.micro_batch, e.grad_accum)} for e in estimates],
                         indent=1))
    else:
        print(format_plan(cfg, m, estimates, hw))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `dit plan` to the top-level subcommands of `dit`."""
    p = sub.add_parser("plan", help="memory and step-time planner for a config on N GPUs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML run config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.preset=DiT-XL/2")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GB (default 80)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                   help=f"peak dense TFLOP/s per GPU (default {H100_BF16_TFLOPS:g}, H100 bf16)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilization (default 0.4)")
    p.add_argument("--micro-batch", type=int, help="micro-batch per GPU (default: data.batch_size)")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of GPU memory kept free (default 0.1)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="whose attention kernels to assume for activations (cpu: as measured on a CPU)")
    p.add_argument("--link-gbs", type=float, default=450.0,
                   help="all-to-all bandwidth per GPU in GB/s for sequence splits (default 450, H100 NVLink)")
    p.add_argument("--json", action="store_true", help="print every layout as JSON")
    p.set_defaults(func=run_plan)
