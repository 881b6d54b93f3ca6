"""Export a checkpoint for users: safetensors + config JSON, or a directory `diffusers` loads.

    safetensors/  model.safetensors (EMA weights of the DiT), config.json (resolved run config,
                  the DiT's resolved spec, source checkpoint and step)
    diffusers/    model_index.json            pipeline = pipeline.py:DiTTextToImagePipeline
                  pipeline.py                 shim importing the pipeline class below
                  transformer/                DiTTransformer (ModelMixin + ConfigMixin wrapper of our
                                              DiT): config.json, diffusion_pytorch_model.safetensors,
                                              dit_transformer.py (shim importing the class below)
                  scheduler/                  DDIMScheduler: our prediction type, betas, zero terminal
                                              SNR (rescale_betas_zero_snr) and trailing spacing
                  vae/                        AutoencoderKL with scaling_factor / shift_factor and any per-channel
                                              latents_mean / latents_std (latent models)
                  text_encoder/, tokenizer/   the transformers text encoder and its tokenizer
                  dit_train.json              source checkpoint and step

    pipe = DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)
    images = pipe(["a large red circle at the top left"], num_inference_steps=25).images

The DiT is our own architecture, not a diffusers class, so the two shims import it from this
package: loading needs `dit-train` installed (diffusers' custom-component mechanism, see
"Load community pipelines and components" in the diffusers docs). Time convention: the DiT takes
t in [0, 1] and diffusers' timestep index i is t = (i + 1) / T (trainer/diffusion/schedules.py);
the wrapper converts. The pipeline steps DDIM from each of the scheduler's timesteps to the
next (`ddim_step`): diffusers' DDIMScheduler.step goes to i - T // S, which matches ours only
where the step count S divides T.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file
from torch import Tensor

from trainer.checkpoint_format import ENCODERS_FILE, replace_dir, temporary_dir, verify
from trainer.config_errors import ConfigError
from trainer.diffusion.timesteps import table_steps
from trainer.models.autoencoder import Autoencoder
from trainer.models.dit import DiT, DiTPreset, DiTSpec, TextEmbedding
from trainer.models.text import TEXT_CHUNK
from trainer.numerics import PRECISIONS, autocast

if TYPE_CHECKING:
    from trainer.cascade import LoadedStage

FORMATS = ("safetensors", "diffusers")
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
TRANSFORMER_MODULE = "dit_transformer"
PIPELINE_MODULE = "pipeline"
PROVENANCE = "dit_train.json"  # source checkpoint and step of an export
_SHIM = '"""{doc}"""\nfrom trainer.export import {name}  # noqa: F401\n'


def half_precision(dtype: torch.dtype, device: torch.device):
    """The autocast of a component loaded in half precision (`from_pretrained(...,
    torch_dtype=torch.bfloat16)`): its fp32 inputs, and the fp32 tensors it makes inside (time
    and position embeddings), meet half-precision weights; nothing for fp32."""
    names = {dtype: name for name, dtype in PRECISIONS.items()}
    return autocast(device, names.get(dtype, "fp32"))


class DiTTransformer(ModelMixin, ConfigMixin):
    """Our DiT as a diffusers model: config.json holds the resolved `DiTSpec` plus what a
    pipeline needs to call it (training timesteps, text length and pooling)."""

    @register_to_config
    def __init__(self, depth: int = 4, width: int = 128, heads: int = 4, patch: int = 2, mlp_ratio: float = 4.0,
                 in_channels: int = 4, out_channels: int = 4, text_dim: int = 384, pooled_dim: int = 384,
                 qk_norm: bool = True, rope: bool = False, sample_size: int = 32, num_train_timesteps: int = 1000,
                 text_max_length: int = 32, text_normalize_pooled: bool = True, learned_null: bool = False):
        super().__init__()
        spec = DiTSpec(DiTPreset(depth, width, heads, patch, mlp_ratio), in_channels, out_channels, text_dim,
                       pooled_dim, rope=rope, qk_norm=qk_norm, learned_null=learned_null)
        self.dit = DiT(spec)

    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                encoder_attention_mask: Tensor, pooled_projections: Tensor) -> Tensor:
        """x (B, C, H, W), diffusers timestep indices (B,) or scalar, text tokens (B, L, Dt),
        mask (B, L), pooled (B, Dp) -> the prediction (B, C, H, W)."""
        t = (timestep.float().reshape(-1) + 1) / self.config.num_train_timesteps  # (B,) or (1,) in (0, 1]
        t = t.expand(hidden_states.shape[0])  # (B,)
        text = TextEmbedding(encoder_hidden_states, encoder_attention_mask.bool(), pooled_projections)
        with half_precision(self.dtype, hidden_states.device):  # loaded with torch_dtype=torch.bfloat16 / float16
            return self.dit(hidden_states, t, text).float()


class DiTTextToImagePipeline(DiffusionPipeline):
    """Text -> (latent) image with a DiTTransformer, classifier-free guidance with rescale
    (Lin et al. 2023) and the scheduler's steps; vae=None for pixel-space models."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: DiTTransformer, scheduler, text_encoder, tokenizer, vae=None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, vae=vae)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens (B, L, Dt) zero on padding, mask (B, L), pooled (B, Dp)): the masked mean of
        the token states, L2-normalized when the text encoder was (sentence-transformers). An
        empty or blank prompt is the null caption (`null_prompt`), as in training and `dit
        sample`: encoded, it was [CLS] [SEP] states the model never saw (0.79 apart in pixels).
        Encoded TEXT_CHUNK captions per call, as our sampler does (a bf16 encoder's states
        depend on the batch they are computed in: `TEXT_CHUNK`)."""
        chunks = [self._encode_chunk(prompts[i: i + TEXT_CHUNK]) for i in range(0, len(prompts), TEXT_CHUNK)]
        encoded = tuple(torch.cat(parts) for parts in zip(*chunks))
        blanks = [not p.strip() for p in prompts]
        if not any(blanks):
            return encoded
        blank = torch.tensor(blanks, device=self._execution_device)  # (B,)
        return tuple(torch.where(blank.view(-1, *[1] * (e.dim() - 1)), null, e)
                     for e, null in zip(encoded, self.null_prompt(len(prompts))))

    def _encode_chunk(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """At most TEXT_CHUNK prompts, padded with empty ones to TEXT_CHUNK for the encoder call:
        (tokens (B, L, Dt) zero on padding, mask (B, L), pooled (B, Dp)) of the B prompts."""
        cfg, n = self.transformer.config, len(prompts)
        batch = self.tokenizer(list(prompts) + [""] * (TEXT_CHUNK - n), padding="max_length", truncation=True,
                               max_length=cfg.text_max_length, return_tensors="pt")
        device = self._execution_device  # where CPU offload runs each component
        mask = batch["attention_mask"].to(device)  # (TEXT_CHUNK, L)
        states = self.text_encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        weights = mask[..., None].to(states.dtype)  # (TEXT_CHUNK, L, 1)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (TEXT_CHUNK, Dt)
        if cfg.text_normalize_pooled:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return (states.float() * weights)[:n], mask.bool()[:n], pooled.float()[:n]

    def latent_decoder(self) -> Autoencoder:
        """The VAE as our sampler decodes with it (`Autoencoder.decode`): its scaling_factor and
        shift_factor, then the per-channel latents_mean / latents_std its config may carry (a
        VAE with them decoded 0.55 apart in pixels when they were left out). Only its statistics
        are moved to the pipeline's device: the VAE stays where it is (CPU offload moves it)."""
        config = self.vae.config
        decoder = Autoencoder(self.vae, config.scaling_factor, config.get("shift_factor") or 0.0)
        for name, statistic in list(decoder.named_buffers(recurse=False)):
            setattr(decoder, name, statistic.to(self._execution_device))
        return decoder

    def null_prompt(self, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """The empty caption as the model was trained on it: zero states and pooled vector with
        only the first token marked real (text.null=zeros), or none marked (text.null=learned:
        the transformer puts its learned null caption there, `DiTEmbed.fill_null`)."""
        cfg, device = self.transformer.config, self._execution_device
        tokens = torch.zeros(batch, cfg.text_max_length, cfg.text_dim, device=device)
        mask = torch.zeros(batch, cfg.text_max_length, dtype=torch.bool, device=device)
        mask[:, 0] = not cfg.learned_null
        return tokens, mask, torch.zeros(batch, cfg.pooled_dim, device=device)

    def timesteps(self, num_inference_steps: int) -> list[int]:
        """The scheduler's timestep indices of a sampler of `num_inference_steps`, as ours (in the
        scheduler's spacing) picks them, not as `set_timesteps` does (`table_steps`); host
        integers: no device read a step."""
        config = self.scheduler.config
        return [int(j) - 1 for j in table_steps(config.num_train_timesteps, num_inference_steps,
                                                 config.timestep_spacing)]

    def ddim_step(self, pred: Tensor, t: int, following: Optional[int], x: Tensor) -> Tensor:
        """DDIM without noise (eta 0; Song et al. 2021, eq. 12) from timestep t to `following`,
        the next of the scheduler's timesteps (None: to the clean sample). DDIMScheduler.step
        goes to t - T // S instead, which is that next timestep only where the step count S
        divides T: at S = 7 of 1000 the samples were up to 0.04 (v), 0.74 (eps) from ours. The
        timesteps are host integers: a device index would be read back at every step."""
        abar = self.scheduler.alphas_cumprod.to(x.device)
        a = abar[t]
        a_next = abar[following] if following is not None else torch.as_tensor(self.scheduler.final_alpha_cumprod)
        kind = self.scheduler.config.prediction_type
        if kind == "v_prediction":
            x0, eps = a.sqrt() * x - (1 - a).sqrt() * pred, a.sqrt() * pred + (1 - a).sqrt() * x
        elif kind == "sample":
            x0, eps = pred, (x - a.sqrt() * pred) / (1 - a).sqrt()
        else:  # epsilon
            x0, eps = (x - (1 - a).sqrt() * pred) / a.sqrt(), pred
        return a_next.to(x.device).sqrt() * x0 + (1 - a_next.to(x.device)).sqrt() * eps

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str]], num_inference_steps: int = 25, guidance_scale: float = 3.0,
                 guidance_rescale: float = 0.7, generator: Optional[torch.Generator] = None,
                 latents: Optional[Tensor] = None, output_type: str = "pil") -> ImagePipelineOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        cfg = self.transformer.config
        shape = (len(prompts), cfg.in_channels, cfg.sample_size, cfg.sample_size)
        device = self._execution_device  # where CPU offload runs each component
        # drawn on the generator's device, then moved: a CPU generator serves any device; x and
        # the steps stay fp32 whatever dtype the components were loaded in (their outputs are cast)
        x = latents if latents is not None else randn_tensor(shape, generator=generator, device=device)
        x = x.to(device, torch.float32) * self.scheduler.init_noise_sigma
        cond = self.encode_prompt(prompts)
        guided = guidance_scale != 1.0
        text = [torch.cat(pair) for pair in zip(cond, self.null_prompt(len(prompts)))] if guided else list(cond)
        timesteps = self.timesteps(num_inference_steps)
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = torch.cat([x, x]) if guided else x
            pred = self.transformer(model_in, torch.full((model_in.shape[0],), t, device=device), *text)
            if guided:
                pred_text, pred_null = pred.chunk(2)
                pred = pred_null + guidance_scale * (pred_text - pred_null)
                if guidance_rescale > 0:
                    pred = rescale_noise_cfg(pred, pred_text, guidance_rescale)
            x = self.ddim_step(pred, t, timesteps[i + 1] if i + 1 < len(timesteps) else None, x)
        if output_type == "latent":
            return ImagePipelineOutput(images=x)
        if self.vae is not None:
            with half_precision(self.vae.dtype, x.device):
                x = self.latent_decoder().decode(x).float()  # (B, 3, H, W)
        images = (x / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
        if output_type == "pil":
            return ImagePipelineOutput(images=self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().float().numpy()))
        return ImagePipelineOutput(images=images)


# ------------------------------------------------------------------------------- export


def _load(checkpoint: str | Path, ema: bool) -> tuple["LoadedStage", int]:
    """(LoadedStage, step) of a checkpoint, with default sampler settings."""
    from trainer.cascade import CascadeStageSpec, load_stage
    from trainer.diffusion import SamplerSettings

    loaded = load_stage(CascadeStageSpec(str(checkpoint)), SamplerSettings(), ema=ema)
    step = verify(loaded.checkpoint, ())["step"]
    return loaded, step


def export_safetensors(checkpoint: str | Path, out: str | Path, ema: bool = True) -> Path:
    """`out`/model.safetensors (the DiT's EMA weights) and `out`/config.json."""
    from trainer.config import to_dict

    loaded, step = _load(checkpoint, ema)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in loaded.net.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
    spec = asdict(loaded.net.spec)
    record = {"source_checkpoint": str(loaded.checkpoint), "step": step, "weights": loaded.weights,
              "dit_spec": spec, "run_config": to_dict(loaded.cfg)}
    (out / "config.json").write_text(json.dumps(record, indent=1) + "\n")
    copy_encoder_record(loaded.checkpoint, out)
    return out


def copy_encoder_record(checkpoint: Path, out: Path) -> None:
    """The checkpoint's encoders.json beside the exported weights: a warm start from the export
    (checkpoint.init_from) is checked against the encoders the network learned with, as one
    from the checkpoint is (a checkpoint from before the record has none to copy). Not in a
    diffusers export, which carries its own copies of the encoders: re-saved, their files are
    not those the record names, and a warm start pointed at them was refused."""
    if (checkpoint / ENCODERS_FILE).is_file():
        (out / ENCODERS_FILE).write_bytes((checkpoint / ENCODERS_FILE).read_bytes())


def _check_diffusers_exportable(loaded: "LoadedStage") -> None:
    """Refuse, before anything is written, what the text-to-image pipeline cannot sample as we do."""
    cfg = loaded.cfg
    if loaded.distilled:  # the pipeline runs CFG over the scheduler's steps; a student takes neither
        raise ConfigError("stage.kind", f"the checkpoint is a {cfg.stage.kind} student, which samples in its own "
                                        f"few steps with no CFG; the diffusers pipeline runs CFG over the scheduler's "
                                        f"steps, so export it as --format safetensors (or sample it with dit sample)")
    problems = [
        (cfg.model.video, "model.video", "video models"),
        (cfg.model.superres, "model.superres", "super-resolution stages"),
        (cfg.model.guidance_embed, "model.guidance_embed", "guidance-conditioned students"),
        (cfg.model.learn_sigma, "model.learn_sigma", "learned-variance models"),
        (cfg.model.text.kind == "open_clip", "model.text.kind", "open_clip text encoders"),
        (getattr(loaded.stage.autoencoder, "causal_3d", False), "model.autoencoder", "3-D autoencoders"),
    ]
    for bad, key, what in problems:
        if bad:
            raise ConfigError(key, f"the diffusers export covers text-to-image models; {what} export as "
                                   f"--format safetensors")


def scheduler_config(loaded: "LoadedStage") -> dict:
    """DDIMScheduler arguments equal to our schedule; an SNR-shifted table goes as trained_betas."""
    d = loaded.cfg.diffusion
    config = dict(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                  beta_schedule=BETA_SCHEDULES[d.schedule], prediction_type=PREDICTION_TYPES[d.prediction],
                  rescale_betas_zero_snr=d.zero_terminal_snr, timestep_spacing="trailing", clip_sample=False,
                  set_alpha_to_one=True, steps_offset=0)
    schedule = loaded.stage.schedule
    if schedule.logsnr_shift != 0.0:
        abar = schedule.alphas_cumprod  # (T,) float64, shifted
        alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
        config["trained_betas"] = (1 - alphas).tolist()
    return config


def export_diffusers(checkpoint: str | Path, out: str | Path, ema: bool = True) -> Path:
    """A directory `DiffusionPipeline.from_pretrained(out, trust_remote_code=True)` loads."""
    from diffusers import DDIMScheduler

    loaded, step = _load(checkpoint, ema)
    _check_diffusers_exportable(loaded)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec, text = loaded.net.spec, loaded.stage.text
    transformer = DiTTransformer(
        depth=spec.preset.depth, width=spec.preset.width, heads=spec.preset.heads, patch=spec.preset.patch,
        mlp_ratio=spec.preset.mlp_ratio, in_channels=spec.in_channels, out_channels=spec.out_channels,
        text_dim=spec.text_dim, pooled_dim=spec.pooled_dim, qk_norm=spec.qk_norm, rope=spec.rope,
        sample_size=loaded.stage.resolution, num_train_timesteps=loaded.cfg.diffusion.num_timesteps,
        text_max_length=text.max_length, text_normalize_pooled=bool(getattr(text, "normalize", False)),
        learned_null=spec.learned_null)
    transformer.dit.load_state_dict(loaded.net.state_dict())
    transformer.save_pretrained(str(out / "transformer"), safe_serialization=True)
    (out / "transformer" / f"{TRANSFORMER_MODULE}.py").write_text(
        _SHIM.format(doc="The DiT of dit-train as a diffusers model.", name="DiTTransformer"))
    DDIMScheduler(**scheduler_config(loaded)).save_pretrained(str(out / "scheduler"))
    text_encoder, tokenizer = text.transformers_parts()
    text_encoder.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    components = {
        "transformer": [TRANSFORMER_MODULE, "DiTTransformer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", type(text_encoder).__name__],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "vae": [None, None],
    }
    if loaded.stage.autoencoder.vae is not None:
        loaded.stage.autoencoder.save(out / "vae")
        components["vae"] = ["diffusers", type(loaded.stage.autoencoder.vae).__name__]
    (out / f"{PIPELINE_MODULE}.py").write_text(
        _SHIM.format(doc="Text-to-image pipeline of a dit-train DiT.", name="DiTTextToImagePipeline"))
    import diffusers

    index = {"_class_name": [PIPELINE_MODULE, "DiTTextToImagePipeline"], "_diffusers_version": diffusers.__version__,
             **components}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / PROVENANCE).write_text(json.dumps({"source_checkpoint": str(loaded.checkpoint), "step": step,
                                              "weights": loaded.weights}, indent=1) + "\n")
    return out


def exported_weights(directory: str | Path) -> str:
    """Which weights an export holds, as its record says: ema, or raw (asked for, or the
    checkpoint kept no EMA)."""
    for name in (PROVENANCE, "config.json"):
        if (Path(directory) / name).is_file():
            return json.loads((Path(directory) / name).read_text())["weights"]
    raise FileNotFoundError(f"{directory} is not an export (no {PROVENANCE} or config.json)")


def export(checkpoint: str | Path, fmt: str, out: str | Path, ema: bool = True) -> Path:
    """The export, written beside `out` and renamed over it when complete: an earlier export
    there is replaced whole (one of the other format left beside it was what a warm start from
    the folder loaded, while its record named the new checkpoint), a folder holding anything
    else (a model card, samples) is refused before any work, and a kill midway leaves the old
    export or the new one. A link is followed: its target is replaced."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    out = Path(out).resolve()
    check_export_folder(out)
    tmp = temporary_dir(out)
    try:
        (export_safetensors if fmt == "safetensors" else export_diffusers)(checkpoint, tmp, ema)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, out)  # a failed rename leaves the finished export under its temporary name


# What `export_safetensors` and `export_diffusers` write into their folder.
EXPORT_ENTRIES = frozenset({"config.json", "model.safetensors", ENCODERS_FILE, "transformer", "scheduler",
                            "text_encoder", "tokenizer", "vae", f"{PIPELINE_MODULE}.py", "model_index.json",
                            PROVENANCE})


def check_export_folder(out: Path) -> None:
    """ConfigError naming --out unless `out` (resolved) is new, empty or an earlier export holding
    only what an export writes, and the working directory is not inside it."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} is a file: give a new or empty folder")
    here = Path.cwd().resolve()
    if out == here or out in here.parents:
        raise ConfigError("--out", f"{out} holds the working directory; an export replaces its folder whole: give "
                                   f"another folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_ENTRIES)
    if foreign or not is_export(out):
        what = ", ".join(foreign) if foreign else "no export's record"
        raise ConfigError("--out", f"{out} holds files dit export did not write ({what}); each export replaces the "
                                   f"folder whole: give a new or empty folder")


def is_export(directory: Path) -> bool:
    """Whether `directory` holds a `dit export` (its record: config.json with the DiT's spec, or
    the diffusers export's provenance file)."""
    if (directory / PROVENANCE).is_file():
        return True
    record = directory / "config.json"
    try:
        return record.is_file() and "dit_spec" in json.loads(record.read_text())
    except (ValueError, UnicodeDecodeError):
        return False


# ------------------------------------------------------------------------------- verification


def load_pipeline(directory: str | Path, device: torch.device | str = "cpu") -> DiTTextToImagePipeline:
    return DiffusionPipeline.from_pretrained(str(directory), trust_remote_code=True).to(device)


@torch.no_grad()
def compare_with_pipeline(pipe: DiTTextToImagePipeline, checkpoint: str | Path, prompts: list[str], steps: int = 10,
                          cfg_scale: float = 3.0, guidance_rescale: float = 0.7, seed: int = 0,
                          ema: bool = True) -> float:
    """Max |difference| in [0, 1] pixels between a diffusers pipeline and our own DDIM sampler
    on `checkpoint`, both started from the same noise (drawn with a CPU generator) and run on
    the pipeline's device in float32: the pipeline runs so, and our sampler's default on an
    accelerator, the autocast of the run's training precision (`sampling_precision`), would
    differ from it by ~1e-2 under bf16 whatever the export."""
    from trainer.cascade import Cascade, CascadeStageSpec, load_stage
    from trainer.diffusion import SamplerSettings, randn

    settings = SamplerSettings(steps=steps, cfg_scale=cfg_scale, guidance_rescale=guidance_rescale, sampler="ddim")
    loaded = load_stage(CascadeStageSpec(str(checkpoint)), settings, ema=ema, device=pipe.device, precision="fp32")
    ours = Cascade([loaded]).sample(prompts, torch.Generator().manual_seed(seed))  # (B, 3, H, W) in [-1, 1]
    noise = randn((len(prompts), *loaded.stage.sample_shape()), torch.Generator().manual_seed(seed), pipe.device)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, num_inference_steps=steps, guidance_scale=cfg_scale, guidance_rescale=guidance_rescale,
                  latents=noise, output_type="pt").images  # (B, 3, H, W) in [0, 1]
    return float(((ours.cpu() + 1) / 2 - theirs.cpu()).abs().max())


def verify_diffusers_export(directory: str | Path, checkpoint: str | Path, prompts: list[str], steps: int = 10,
                            ema: bool = True, device: torch.device | str = "cpu") -> float:
    """Load the export with diffusers on `device` and compare it with our sampler there
    (`compare_with_pipeline`)."""
    return compare_with_pipeline(load_pipeline(directory, device), checkpoint, prompts, steps, ema=ema)
