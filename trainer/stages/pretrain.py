"""Text-to-image / text-to-video pretraining of a latent or pixel DiT.

v-prediction on a zero-terminal-SNR schedule by default (Lin et al. 2023), optional min-SNR
weighting (Hang et al. 2023), classifier-free-guidance dropout of the caption (Ho & Salimans
2022). Images in video mode are 1-frame clips, so one model trains jointly on both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from data_pipeline.errors import DataError
from trainer.config import DataConfig, DiffusionConfig, LogConfig, ModelConfig, RunConfig
from trainer.bundle import InferenceBundle, frozen
from trainer.diffusion import NoiseSchedule, SamplerSettings, add_noise, diffusion_loss, randn, sample_timesteps
from trainer.encoder_record import encoder_identity
from trainer.media import save_grid
from trainer.metrics import T_BUCKET_KEYS, Metric, timestep_bucket_losses, valid_mean
from trainer.models.autoencoder import build_autoencoder
from trainer.models.text import TEXT_CHUNK, CachedTextEncoder, TextEmbedding, build_text_encoder
from trainer.stage_config import PretrainSettings
from trainer.stages.base import PlayerLoss, Stage, cfg_keep, drop_text

EVAL_REPEATS = 4  # samples per prompt of the training-time adherence evaluation


def precompute_encoder(config: str, overrides: Sequence[str] = (), device: str = "cpu") -> Callable[[dict], dict]:
    """The run's frozen autoencoder and text encoder as a `dit data precompute` encoder
    (`--encoder trainer.stages.pretrain:precompute_encoder --encoder-arg config=RUN.yaml`):
    per sample `latent` (C, [F,] h, w), `text_emb` (L, Dt), `text_mask` (L,), `text_pooled` (Dp,),
    which training on the written shards uses instead of calling the encoders. A caption is
    encoded once however often it occurs (datasets repeat captions: 1286 of the demo's 2000 are
    distinct), `TEXT_CHUNK` new captions per encoder call (as in training: a bf16 encoder's
    states depend on the batch)."""
    from trainer.config import load_config

    cfg = load_config(config, list(overrides))
    text = CachedTextEncoder(frozen(build_text_encoder(cfg.model.text)).to(device), chunk=TEXT_CHUNK)
    autoencoder = frozen(build_autoencoder(cfg.model.autoencoder)).to(device)
    pixels_key = "video" if cfg.data.kind == "video" else "image"

    @torch.no_grad()
    def encode(batch: dict) -> dict[str, Tensor]:
        emb = text.encode(list(batch["caption"]))
        latent = autoencoder.encode(batch[pixels_key].to(device)).float()
        return {"latent": latent, "text_emb": emb.tokens, "text_mask": emb.mask, "text_pooled": emb.pooled}

    encode.encoded_by = encoder_identity(cfg.model)  # `dit data precompute` records it in the manifest
    return encode


class PretrainStage(Stage):
    @classmethod
    def from_config(cls, cfg: RunConfig, settings: PretrainSettings) -> "PretrainStage":
        return cls(cfg.model, cfg.diffusion, settings, cfg.data)

    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, stage: PretrainSettings, data: DataConfig):
        super().__init__()
        self.model_cfg, self.diffusion, self.stage_cfg, self.data = model, diffusion, stage, data
        self.bundle = InferenceBundle(model, diffusion, data)  # text encoder, autoencoder, schedules, shapes
        self.text, self.autoencoder, self.schedule = self.bundle.text, self.bundle.autoencoder, self.bundle.schedule
        self.players = {"student": self.bundle.network(None)}
        self._work: dict[tuple[int, ...], tuple[int, int]] = {}  # `work` per input shape
        self._pipe_losses: list[dict[str, Metric]] = []  # this step's micro-batch losses by key, at the pipe's end

    def helpers(self) -> list[torch.nn.Module]:
        return self.bundle.helpers()

    def counters(self) -> dict[str, int]:
        """Captions cut at model.text.max_length (none are encoded here on precomputed shards)."""
        return {"truncated_captions": self.text.encoder.truncated_captions}

    def to(self, device: torch.device, helper_dtype: torch.dtype = torch.float32) -> "PretrainStage":
        super().to(device, helper_dtype)  # the bundle's helpers are ours: moved there once
        self.bundle.moved_to(device)
        return self

    # ---- shapes (the bundle's) --------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.bundle.resolution

    def sample_shape(self, height: Optional[int] = None, width: Optional[int] = None,
                     frames: Optional[int] = None) -> tuple[int, ...]:
        return self.bundle.sample_shape(height, width, frames)

    def latent_frames(self, frames: int) -> int:
        return self.bundle.latent_frames(frames)

    def schedule_for(self, shape: Sequence[int]) -> NoiseSchedule:
        return self.bundle.schedule_for(shape)

    def input_shape(self, batch: dict[str, Any]) -> tuple[int, ...]:
        """(B, C, [F,] h, w) of the student's input on `batch`, from its tensors' shapes: the
        precomputed latents', or that of the pixels (their bucket's size and clip length) once
        encoded."""
        if "latent" in batch:
            return tuple(batch["latent"].shape)
        pixels = batch["video" if self.data.kind == "video" else "image"].shape  # (B, 3, [F,] H, W)
        return (pixels[0], *self.sample_shape(pixels[-2], pixels[-1], pixels[2] if len(pixels) == 5 else None))

    def work(self, batch: dict[str, Any]) -> tuple[int, int]:
        """The student's tokens and forward MACs on `batch` (the student's only: not the
        teacher's or a discriminator's forward in the stages that distil), cached per shape: a
        run has a few (its buckets), and this is asked on every micro-batch."""
        shape = self.input_shape(batch)
        if shape not in self._work:
            student = self.players["student"]
            frames, area = student.token_grid(shape)
            self._work[shape] = shape[0] * frames * area, student.macs(shape, self.text.max_length)
        return self._work[shape]

    # ---- data -> x0 -------------------------------------------------------------------------
    @torch.no_grad()
    def clean_input(self, batch: dict[str, Any]) -> Tensor:
        """x0 in float32: precomputed latents, or pixels (encoded when the model is latent)."""
        if "latent" in batch:
            return batch["latent"].float()
        return self.autoencoder.encode(batch["video"] if self.data.kind == "video" else batch["image"]).float()

    def text_input(self, batch: dict[str, Any]) -> TextEmbedding:
        """The captions' embeddings: precomputed ones from latent shards (`text_emb`, `text_mask`,
        `text_pooled`: the encoder is not called), else the frozen encoder's (cached)."""
        if "text_emb" not in batch:
            with torch.no_grad():
                return self.text.encode(batch["caption"])
        missing = [k for k in ("text_mask", "text_pooled") if k not in batch]
        if missing:
            raise DataError(f"precomputed text embeddings lack {', '.join(missing)}; precompute with "
                            f"trainer.stages.pretrain:precompute_encoder (it writes text_emb, text_mask, text_pooled)")
        tokens, pooled = batch["text_emb"].float(), batch["text_pooled"].float()  # (B, L, Dt), (B, Dp)
        if tokens.shape[1:] != (self.text.max_length, self.text.dim) or pooled.shape[1:] != (self.text.pooled_dim,):
            raise DataError(f"precomputed text embeddings are {tuple(tokens.shape[1:])} + {tuple(pooled.shape[1:])}, "
                            f"the configured encoder gives ({self.text.max_length}, {self.text.dim}) + "
                            f"({self.text.pooled_dim},); precompute with this run's model.text")
        return TextEmbedding(tokens, batch["text_mask"].bool(), pooled)

    def condition(self, batch: dict[str, Any], generator: torch.Generator) -> TextEmbedding:
        """The batch's text embeddings with CFG dropout (`stage.cfg_dropout`) applied on the device."""
        text = self.text_input(batch)
        if self.stage_cfg.cfg_dropout <= 0:
            return text
        B = text.tokens.shape[0]
        keep = cfg_keep(B, self.stage_cfg.cfg_dropout, generator, self.device)  # (B,)
        return drop_text(text, self.text.null_embedding(B), keep)

    # ---- loss -------------------------------------------------------------------------------
    def noised(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        t = sample_timesteps(self.diffusion, x0.shape[0], generator, x0.device)  # (B,)
        eps = randn(tuple(x0.shape), generator, x0.device)
        alpha, sigma = self.schedule_for(x0.shape[1:]).alpha_sigma(t)  # (B,), (B,) at this batch's bucket
        return t, eps, alpha, sigma, add_noise(x0, eps, alpha, sigma)

    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[dict[str, Any], tuple[Tensor, ...]]:
        """Network inputs and loss targets of one batch: (x_t, t, text, extras),
        (x0, eps, x_t, alpha, sigma, weight); weight 0 marks the loader's padding repeats."""
        x0 = self.clean_input(batch)  # (B, C, h, w) or (B, C, F, h, w)
        text = self.condition(batch, generator)
        t, eps, alpha, sigma, x_t = self.noised(x0, generator)
        weight = batch["valid"].to(x0.dtype) if "valid" in batch else x0.new_ones(x0.shape[0])  # (B,)
        return {"x": x_t, "t": t, "text": text}, (x0, eps, x_t, alpha, sigma, weight)

    def weighted_loss(self, pred: Tensor, targets: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """(scalar loss over the valid samples, per-sample loss (B,))."""
        x0, eps, x_t, alpha, sigma, weight = targets
        per_sample = diffusion_loss(pred, x0, eps, x_t, alpha, sigma, self.diffusion.prediction,
                                    self.diffusion.loss_weighting, self.diffusion.min_snr_gamma)  # (B,)
        return (per_sample * weight).sum() / weight.sum().clamp(min=1.0), per_sample

    def losses(self, batch: dict[str, Any], generator: torch.Generator) -> Iterator[PlayerLoss]:
        inputs, targets = self.prepare(batch, generator)
        extras = {k: v for k, v in inputs.items() if k not in ("x", "t", "text")}
        pred = self.run("student", inputs["x"], inputs["t"], inputs["text"], **extras)
        loss, per_sample = self.weighted_loss(pred, targets)
        weight = targets[-1]  # (B,): every `prepare` ends its targets with the valid-sample weight
        yield "student", loss, {"loss": valid_mean(loss, weight),
                                **timestep_bucket_losses(per_sample.detach(), inputs["t"], weight)}

    # ---- pipeline parallelism: noising before the pipe, the loss at its end -------------------
    def pipeline_batch(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[dict[str, Any], tuple[Tensor, ...]]:
        """The network's inputs by name (the engine packs them for the pipe) and the loss
        targets, the timesteps (B,) last: the pipe's end logs the loss per timestep quarter."""
        inputs, targets = self.prepare(batch, generator)
        return inputs, (*targets, inputs["t"])

    def pipeline_loss(self, pred: Tensor, targets: tuple[Tensor, ...]) -> Tensor:
        """The loss at the pipe's last stage, once per micro-batch; its logged shares are kept
        as (sum, count) pairs over the valid samples (`take_pipeline_metrics`)."""
        *targets, t = targets
        loss, per_sample = self.weighted_loss(pred, tuple(targets))
        weight = targets[-1]
        self._pipe_losses.append({"loss": valid_mean(loss, weight),
                                  **timestep_bucket_losses(per_sample.detach(), t, weight)})
        return loss

    def take_pipeline_metrics(self) -> dict[str, Metric]:
        """The step's logged losses under pipeline parallelism, as `losses` logs them: means over
        the valid samples of all micro-batches, the loss and its timestep quarters (they were
        missing). DeepSpeed's `train_batch` returns the plain mean of the micro-batch losses, in
        which one made of padding alone (an epoch's tail) counted as a 0. The stages before the
        last compute no loss and give (0, 0) under the same keys: the logger's sums over the
        ranks are then the last stages' alone."""
        records, self._pipe_losses = self._pipe_losses, []
        if not records:
            return {key: (0.0, 0.0) for key in ("loss", *T_BUCKET_KEYS)}
        return {key: (sum(r[key][0] for r in records), sum(r[key][1] for r in records)) for key in records[0]}

    # ---- samples and evaluation -------------------------------------------------------------
    def sampling_net(self, weights: Optional[dict[str, Tensor]]) -> torch.nn.Module:
        """A plain (unpartitioned) copy of the student carrying `weights`."""
        return self.bundle.network(weights).to(self.device)

    def decode(self, x0: Tensor) -> Tensor:
        return self.bundle.decode(x0)

    def write_samples(self, weights: Optional[dict[str, Tensor]], log: LogConfig, path: Path) -> Optional[Path]:
        settings = SamplerSettings(steps=log.sample_steps, cfg_scale=log.sample_cfg)
        pixels = self.bundle.sample_pixels(self.sampling_net(weights), log.prompts, settings,
                                           torch.Generator().manual_seed(0))
        return save_grid(pixels, log.prompts, path, self.data.fps)

    def eval_metrics(self, weights: Optional[dict[str, Tensor]], log: LogConfig) -> dict[str, float]:
        """The shapes judge (trainer.judge) on `log.prompts`, each sampled EVAL_REPEATS times
        (fixed seed) with the log's sampler settings: `eval/adherence/<attribute>`."""
        from trainer.judge import judge

        prompts = [p for p in log.prompts for _ in range(EVAL_REPEATS)]
        settings = SamplerSettings(steps=log.sample_steps, cfg_scale=log.sample_cfg)
        pixels = self.bundle.sample_pixels(self.sampling_net(weights), prompts, settings,
                                           torch.Generator().manual_seed(0))
        return judge(pixels, prompts).as_metrics("eval/adherence")
