"""What `dit plan` (launch/plan.py) plans for: the trained DiT and its frozen helpers of a
config, built on the meta device from their configurations (exact parameter and MAC counts,
no weights read, no memory used).
"""
from __future__ import annotations

from dataclasses import dataclass

from trainer.config import ModelConfig, RunConfig


@dataclass(frozen=True)
class ModelFacts:
    """Sizes of the trained DiT and its frozen helpers, from the config (no weights loaded)."""

    params: int  # trained parameters
    persistent_params: int  # of which below ZeRO-3's persistence threshold
    frozen_params: int  # text encoder + autoencoder
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
    latent_shape: tuple[int, ...]  # (C, [F,] H, W) the DiT sees


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
            raise ValueError(f"model.text.arch: unknown open_clip architecture '{t.arch}'")
        with torch.device("meta"):
            tower = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False))
        length = min(t.max_length, cfg["text_cfg"].get("context_length", 77))
        return cfg["text_cfg"]["width"], cfg["embed_dim"], length, sum(p.numel() for p in tower.parameters())
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    from trainer.models.text import T5_FAMILY, minilm_path

    path = t.path or (minilm_path() if t.kind == "minilm" else "")
    if not path:
        raise ValueError(f"model.text.path: kind={t.kind} needs a local directory or hub id")
    config = AutoConfig.from_pretrained(path)
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
    cluster's folders can be planned anywhere."""
    if cfg.model.autoencoder.kind == "none":
        return 1, 1, 0
    import torch

    from trainer.models.autoencoder import Autoencoder, build_autoencoder, diffusers_class

    with torch.device("meta"):
        if cfg.model.autoencoder.path:
            cls, config = diffusers_class(cfg.model.autoencoder.path)
            ae = Autoencoder(cls.from_config(config))
        else:
            ae = build_autoencoder(cfg.model.autoencoder)
    return ae.downsample_factor, ae.temporal_downsample, sum(p.numel() for p in ae.parameters())


def model_facts(cfg: RunConfig, persistence_threshold: int) -> ModelFacts:
    """Build the DiT of `cfg` on the meta device: exact parameter and MAC counts, no memory."""
    import torch

    from trainer.models.dit import build_dit

    text_dim, pooled_dim, text_len, text_params = text_dims(cfg.model)
    factor, temporal, ae_params = autoencoder_facts(cfg)
    with torch.device("meta"):
        net = build_dit(cfg.model, text_dim, pooled_dim)
    # multi-resolution: the peak is the largest area; a super-resolution model runs at its output size
    pixels = cfg.data.sr_resolution if cfg.model.superres else max([cfg.data.resolution, *cfg.data.resolutions])
    side = pixels // factor
    video = cfg.data.kind == "video"
    latent_frames = 1 + (cfg.data.num_frames - 1) // temporal  # a causal 3-D autoencoder's folder compresses time
    shape = (cfg.model.in_channels, latent_frames, side, side) if video else (cfg.model.in_channels, side, side)
    spec = net.spec
    frames = latent_frames // spec.temporal_patch if video else 1
    numels = [p.numel() for p in net.parameters() if p.requires_grad]
    return ModelFacts(
        params=sum(numels),
        persistent_params=sum(n for n in numels if n < persistence_threshold),
        frozen_params=text_params + ae_params,
        macs_per_sample=net.macs((1, *shape), text_len),
        depth=spec.preset.depth, width=spec.preset.width, heads=spec.preset.heads, mlp_ratio=spec.preset.mlp_ratio,
        tokens=frames * (side // spec.preset.patch) ** 2, text_len=text_len, text_dim=text_dim,
        qk_norm=spec.qk_norm, cross_attention=bool(spec.text_dim), temporal=spec.temporal_blocks and frames > 1,
        split_unit=frames if spec.temporal_blocks and frames > 1 else frames * (side // spec.preset.patch) ** 2,
        latent_shape=shape,
    )
