"""What `dit plan` (launch/plan.py) plans for: the trained network(s) and frozen helpers of a
config's stage as `trainer.stages.build_stage` builds them, built on the meta device from their
configurations (exact parameter and MAC counts, no weights read, no memory used).

Per stage.kind: pretrain and superres train the DiT beside the frozen text encoder and
autoencoder; progressive adds the frozen teacher; adversarial the teacher, and a second player,
the discriminator: trained heads on a frozen copy of the teacher trunk; autoencoder trains the
KL autoencoder alone, nothing frozen. A DiT's activations and MACs are counted from its blocks
(launch/plan.py); the autoencoder's, a convolutional network, are measured in one forward of the
stage's loss on fake tensors (shapes and dtypes, no memory): the bytes of what autograd saves for
backward and torch's FLOP counter.

Errors of the config's networks (an unknown text encoder or one not found, a teacher that does
not fit this run) are ConfigErrors naming the key.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

from trainer.config import ModelConfig, RunConfig, meta_autoencoder
from trainer.config_errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SavedActivations:
    """What autograd keeps for backward in one training forward of a network measured rather
    than counted (the autoencoder stage's), in the config's precision: fixed + per_sample x B
    bytes for a micro-batch of B samples (fixed: casts of parameters, reductions)."""

    per_sample: float
    fixed: float

    def bytes(self, micro_batch: int) -> float:
        return self.fixed + self.per_sample * micro_batch


@dataclass(frozen=True)
class ModelFacts:
    """Sizes of the trained network and its frozen helpers, from the config (no weights loaded).
    The DiT's geometry (depth ... split_unit) is 0 where the stage trains no DiT (`saved` set)."""

    params: int  # trained parameters of the student (the player a pipeline splits)
    persistent_params: int  # of which below ZeRO-3's persistence threshold
    frozen_params: int  # frozen helpers, whole on every rank: text encoder, autoencoder, teacher
    text_params: int  # of which the text encoder's (kept in model.text.precision)
    macs_per_sample: int  # forward multiply-accumulates of one sample
    depth: int
    width: int
    heads: int
    mlp_ratio: float
    tokens: int  # N per sample
    text_len: int  # L
    text_dim: int  # Dt
    qk_norm: bool
    cross_attention: bool
    temporal: bool  # factorized video blocks with more than one latent frame
    split_unit: int  # what a sequence split S must divide: the latent frames of factorized clips, else N
    latent_shape: tuple[int, ...]  # (C, [F,] H, W) the trained network sees (the autoencoder: pixels)
    disc: Optional["PlayerFacts"] = None  # the adversarial stage's discriminator
    helper_forwards: float = 0.0  # forwards of teacher-sized frozen DiTs per sample and step
    teacher_macs: int = 0  # forward multiply-accumulates of one sample through the teacher
    saved: Optional[SavedActivations] = None  # measured activations of a network that is not a DiT
    attention_macs: int = 0  # of macs_per_sample, those in the blocks' attentions (checkpoint_policy=attention recomputes them)


@dataclass(frozen=True)
class PlayerFacts:
    """A second trained player with its own DeepSpeed engine (never pipelined): its trained
    parameters, and the frozen ones inside it, which its engine casts to the training precision
    and ZeRO-3 partitions like the trained ones."""

    params: int
    persistent_params: int  # trained ones below ZeRO-3's persistence threshold
    frozen_params: int
    frozen_persistent: int  # frozen ones below it


def text_dims(model: ModelConfig) -> tuple[int, int, int, int]:
    """(token width, pooled width, max length, parameter count) of the text encoder, read from
    its configuration without loading weights."""
    import torch

    t = model.text
    if t.kind == "open_clip":
        import open_clip
        from open_clip.model import _build_text_tower

        cfg = open_clip.get_model_config(t.arch)
        if cfg is None:
            raise ConfigError("model.text.arch", f"unknown open_clip architecture '{t.arch}'")
        with torch.device("meta"):
            tower = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False))
        length = min(t.max_length, cfg["text_cfg"].get("context_length", 77))
        return cfg["text_cfg"]["width"], cfg["embed_dim"], length, sum(p.numel() for p in tower.parameters())
    from trainer.models.text_source import T5_FAMILY, check_text_source, minilm_path, runs_without_transformers

    check_text_source(t)  # a folder that is not there is said as `dit train` says it, not as the hub's error
    path = t.path or (minilm_path() if t.kind == "minilm" else "")
    if runs_without_transformers(t):  # torch's layers without BertModel's pooler (trainer/models/bert.py)
        from trainer.models.bert import BertEncoder

        config = json.loads((Path(path) / "config.json").read_text())
        with torch.device("meta"):
            net = BertEncoder(config)
        return config["hidden_size"], config["hidden_size"], t.max_length, sum(p.numel() for p in net.parameters())
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:  # no such folder, no config.json in it, a hub id not in the offline cache
        raise ConfigError("model.text.path", f"{path}: {str(e).splitlines()[0]}") from None
    t5 = t.kind == "t5" or config.model_type in T5_FAMILY
    if config.model_type == "clip":  # a whole CLIP folder: the encoder loads its text tower
        config = config.text_config
    with torch.device("meta"):
        net = T5EncoderModel(config) if t5 else AutoModel.from_config(config)
    dim = config.d_model if t5 else config.hidden_size
    return dim, dim, t.max_length, sum(p.numel() for p in net.parameters())


def autoencoder_facts(cfg: RunConfig) -> tuple[int, int, int]:
    """(spatial downsampling factor, temporal factor, parameter count) of the frozen autoencoder
    (1, 1, 0: pixels), built on the meta device as the trainer builds it (`build_autoencoder`, as
    trainer/bundle.py calls it: a fresh one is the 2-D AutoencoderKL, which encodes a clip frame by
    frame, whatever data.kind); a folder's config.json alone is enough (no weights are read), so a
    cluster's folders can be planned anywhere. A folder not written yet is the output of an
    autoencoder stage to come, built fresh from the settings, as `trainer.config.validate` takes it."""
    ae = meta_autoencoder(cfg.model.autoencoder)
    if ae is None:
        return 1, 1, 0
    return ae.downsample_factor, ae.temporal_downsample, sum(p.numel() for p in ae.parameters())


# The discriminator's frozen trunk per sample and step, in teacher forwards: the student's pass
# through D and D's own on the real and the fake sample, each with a reference pass over x_t in
# the conditional phase (a share CONDITIONAL_FRACTION of the steps); the backward of the first
# to the student's input (no weight gradients) costs about one more forward, D's own reaches the
# heads only.
TRUNK_PASSES, TRUNK_BACKWARD = 3, 1


def counts(params: Iterable["torch.nn.Parameter"], threshold: int) -> tuple[int, int]:
    """(elements of `params`, those in tensors below ZeRO-3's persistence threshold)."""
    numels = [p.numel() for p in params]
    return sum(numels), sum(n for n in numels if n < threshold)


def teacher_of(cfg: RunConfig) -> tuple[ModelConfig, Optional[int]]:
    """The network config of stage.teacher and the step count it was distilled into (None: a
    full diffusion model, sampled with CFG), from its config.yaml as the trainer reads it. Where
    the teacher is not on this machine: this run's network (distillation keeps it; the student's
    own options, a guidance embedder, may differ by a few parameters) sampled with CFG, the
    costlier teacher."""
    from trainer.checkpoint_format import resolve
    from trainer.stage_config import stage_settings
    from trainer.stages.checks import PREFLIGHT, read_run_config, teacher_steps

    directory = stage_settings(cfg.stage).teacher
    step = resolve(directory) if directory and Path(directory).exists() else None
    if step is None or not (step / "config.yaml").is_file():
        return cfg.model, None
    PREFLIGHT[cfg.stage.kind](cfg)  # the teacher is here: `dit train`'s checks of this run against it
    teacher = read_run_config((step / "config.yaml").read_text())
    return teacher.model, teacher_steps(directory, teacher.stage)


def teacher_forwards(cfg: RunConfig, distilled: Optional[int]) -> float:
    """Forwards of teacher-sized frozen DiTs per sample and step. Progressive: a student step is
    two teacher DDIM steps, with CFG (two forwards each) in the first round when the teacher is a
    full diffusion model, then the distilled student of the round before. Adversarial: the
    teacher's path over a student step of an N-step sampler spans teacher_steps / N steps, N
    cycling through the step counts, and the discriminator's trunk passes."""
    from trainer.stage_config import stage_settings
    from trainer.stages.adversarial import CONDITIONAL_FRACTION
    from trainer.stages.checks import teacher_steps_for

    s = stage_settings(cfg.stage)
    guided = 2 if distilled is None and not s.guidance_min == s.guidance_max == 1 else 1
    if cfg.stage.kind == "progressive":
        return 2 * (guided + len(s.rounds) - 1) / len(s.rounds)
    step_counts = sorted(set(s.rounds), reverse=True)
    teacher_steps = teacher_steps_for(step_counts, distilled, cfg.log.sample_steps)
    path = guided * sum(teacher_steps / n for n in step_counts) / len(step_counts)
    return path + TRUNK_PASSES * (1 + CONDITIONAL_FRACTION) + TRUNK_BACKWARD


def discriminator_facts(teacher: "torch.nn.Module", threshold: int, student_guidance: bool) -> PlayerFacts:
    """The adversarial stage's second player as it builds it: heads on a frozen teacher trunk
    (with their own guidance embedding for a guidance-conditioned student of a CFG teacher)."""
    import torch

    from trainer.stages.adversarial import discriminator_heads

    with torch.device("meta"):
        disc = discriminator_heads(teacher, student_guidance)
    trained = counts((p for p in disc.parameters() if p.requires_grad), threshold)
    frozen = counts((p for p in disc.parameters() if not p.requires_grad), threshold)
    return PlayerFacts(*trained, *frozen)


def peak_bucket(cfg: RunConfig) -> tuple[int, int]:
    """(h, w) in pixels of the largest image a step trains on, the loader's own bucket sizes
    (`bucket_sizes`): the largest area, where sides rounded to data.bucket_multiple can hold more
    than resolution² (256 px at ratios 0.5-2 rounded to 64: 384 x 192, 12.5% more tokens); a
    super-resolution model runs at its output size."""
    from data_pipeline.config import bucket_sizes

    base, sr = bucket_sizes(cfg.data)
    sizes = sr if cfg.model.superres and sr else base
    return max(sizes, key=lambda hw: hw[0] * hw[1])


def model_facts(cfg: RunConfig, persistence_threshold: int, device: str = "cuda") -> ModelFacts:
    """Build the networks of `cfg`'s stage on the meta device: exact parameter and MAC counts,
    no memory. `device` ("cuda", "cpu"): whose autocast rules and attention kernels a measured
    network (the autoencoder stage's) is traced with."""
    if cfg.stage.kind == "autoencoder":
        return autoencoder_stage_facts(cfg, persistence_threshold, device)
    import torch

    from trainer.models.dit import build_dit

    text_dim, pooled_dim, text_len, text_params = text_dims(cfg.model)
    factor, temporal, ae_params = autoencoder_facts(cfg)
    with torch.device("meta"):
        net = build_dit(cfg.model, text_dim, pooled_dim)
    h, w = (side // factor for side in peak_bucket(cfg))
    video = cfg.data.kind == "video"
    latent_frames = 1 + (cfg.data.num_frames - 1) // temporal  # a causal 3-D autoencoder's folder compresses time
    shape = (cfg.model.in_channels, latent_frames, h, w) if video else (cfg.model.in_channels, h, w)
    spec = net.spec
    frames = latent_frames // spec.temporal_patch if video else 1
    tokens = frames * (h // spec.preset.patch) * (w // spec.preset.patch)
    trained = counts((p for p in net.parameters() if p.requires_grad), persistence_threshold)
    frozen, disc, forwards, teacher_macs = text_params + ae_params, None, 0.0, 0
    if cfg.stage.kind in ("progressive", "adversarial"):
        teacher_model, distilled = teacher_of(cfg)
        with torch.device("meta"):
            teacher = build_dit(teacher_model, text_dim, pooled_dim)
        frozen += sum(p.numel() for p in teacher.parameters())
        forwards, teacher_macs = teacher_forwards(cfg, distilled), teacher.macs((1, *shape), text_len)
        if cfg.stage.kind == "adversarial":
            disc = discriminator_facts(teacher, persistence_threshold, cfg.model.guidance_embed)
    return ModelFacts(
        params=trained[0],
        persistent_params=trained[1],
        frozen_params=frozen,
        text_params=text_params,
        macs_per_sample=net.macs((1, *shape), text_len), attention_macs=net.attention_macs((1, *shape), text_len),
        depth=spec.preset.depth, width=spec.preset.width, heads=spec.preset.heads, mlp_ratio=spec.preset.mlp_ratio,
        tokens=tokens, text_len=text_len, text_dim=text_dim,
        qk_norm=spec.qk_norm, cross_attention=bool(spec.text_dim), temporal=spec.temporal_blocks and frames > 1,
        split_unit=frames if spec.temporal_blocks and frames > 1 else tokens,
        latent_shape=shape, disc=disc, helper_forwards=forwards, teacher_macs=teacher_macs,
    )


# ---------------------------------------------------------------------------------------------
# The autoencoder stage: a convolutional network, measured.

# Micro-batches the autoencoder's forward is traced at: what grows between them is per sample
# (a batch of one can alias tensors that two do not).
TRACED_BATCHES = (2, 4)


def pixel_shape(cfg: RunConfig) -> tuple[int, ...]:
    """(3, [F,] H, W): one sample as the loader hands it to the autoencoder stage."""
    h, w = peak_bucket(cfg)
    return (3, cfg.data.num_frames, h, w) if cfg.data.kind == "video" else (3, h, w)


@contextlib.contextmanager
def device_autocast(device: str, precision: str) -> Iterator[None]:
    """The precision's autocast (`trainer.numerics.autocast`) with torch's rules for `device`,
    even where no such device is present: torch.autocast turns itself off without CUDA, so the
    per-device autocast state is set directly, as its __enter__ sets it. Nothing for fp32."""
    import torch

    from trainer.numerics import PRECISIONS

    if precision == "fp32":
        yield
        return
    before = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    torch.set_autocast_enabled(device, True)
    torch.set_autocast_dtype(device, PRECISIONS[precision])
    try:
        yield
    finally:
        torch.set_autocast_enabled(device, before[0])
        torch.set_autocast_dtype(device, before[1])
        torch.clear_autocast_cache()


def _sdpa_macs_x2(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> "torch.utils.flop_counter.FlopCounterMode":
    """torch's FLOP counter, which knows the CUDA attention kernels but not the CPU's flash
    kernel: without this formula the attentions' two matmuls were left out of a CPU trace (the
    demo autoencoder's two mid-block attentions: 248,139,776 MACs a sample against 264,916,992
    on CUDA). Counting, not switching kernels: the saved tensors traced alongside stay the CPU's."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_macs_x2})


def traced_forward(cfg: RunConfig, device: str, batch: int) -> tuple[int, int]:
    """(bytes of the tensors autograd saves for backward, parameters excluded; forward MACs) of
    the student's loss of `cfg`'s stage over a micro-batch of `batch` samples, traced on fake
    tensors (shapes and dtypes only: no memory, no weights) as the trainer runs it: the player
    cast to the training precision (its DeepSpeed engine's module), float32 pixels as the loader
    hands them, the whole loss under the precision's autocast on `device`, whose rules and
    attention kernels decide what is saved in which dtype."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainer.numerics import PRECISIONS
    from trainer.stages import build_stage

    saved: dict[int, int] = {}  # storage -> bytes: the views of one tensor count once

    def pack(t: "torch.Tensor") -> "torch.Tensor":
        storage = t.untyped_storage()
        saved[storage._cdata] = storage.nbytes()
        return t

    with FakeTensorMode(), torch.device(device):
        stage = build_stage(cfg)
        player = stage.players["student"]
        for t in (*player.parameters(), *player.buffers()):  # as module.to(dtype), which cannot swap fake ones
            t.data = t.data.to(PRECISIONS[cfg.deepspeed.precision])
        pixels = torch.empty(batch, *pixel_shape(cfg))  # (B, 3, [F,] H, W)
        with device_autocast(device, cfg.deepspeed.precision), flop_counter() as flops, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for _player, _loss, _info in stage.losses({cfg.data.kind: pixels}, None):
                pass
        params = {p.untyped_storage()._cdata for p in player.parameters()}
    return sum(n for storage, n in saved.items() if storage not in params), flops.get_total_flops() // 2


def autoencoder_stage_facts(cfg: RunConfig, persistence_threshold: int, device: str) -> ModelFacts:
    """The autoencoder stage: the KL autoencoder alone, trained, nothing frozen (no text encoder,
    no DiT), never pipelined, split or checkpointed. Its parameters counted on the meta device,
    its activations and MACs traced (`traced_forward`) at two micro-batches."""
    import torch

    from trainer.models.autoencoder import build_kl

    with torch.device("meta"):
        trained = counts(build_kl(cfg.model.autoencoder).parameters(), persistence_threshold)
    (small, saved_small, macs_small), (large, saved_large, macs_large) = (
        (b, *traced_forward(cfg, device, b)) for b in TRACED_BATCHES)
    per_sample = (saved_large - saved_small) / (large - small)
    return ModelFacts(
        params=trained[0], persistent_params=trained[1], frozen_params=0, text_params=0,
        macs_per_sample=(macs_large - macs_small) // (large - small),
        depth=0, width=0, heads=0, mlp_ratio=0.0, tokens=0, text_len=0, text_dim=0, qk_norm=False,
        cross_attention=False, temporal=False, split_unit=0, latent_shape=pixel_shape(cfg),
        saved=SavedActivations(per_sample, saved_small - small * per_sample),
    )
