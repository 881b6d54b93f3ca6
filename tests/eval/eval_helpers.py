"""Checkpoints for the evaluation tests, written by the trainer's own CheckpointManager from
freshly built stages (no DeepSpeed run): random weights, perturbed so that the zero-initialized
output layers do not make every prediction 0."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from trainer.checkpoint import EMA_FILE, CheckpointManager, RankState
from trainer.config import RunConfig, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "test_tiny.yaml"


def tiny_config(out_dir: Path, *overrides: str) -> RunConfig:
    return load_config(TINY, [f"run.out_dir={out_dir}", f"data.shards={out_dir}/data", *overrides])


def perturbed_weights(cfg: RunConfig, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    from trainer.stages import build_stage

    torch.manual_seed(seed)
    kind = "superres" if cfg.model.superres else "pretrain"  # distilled students: the same network
    net = build_stage(replace(cfg, stage=replace(cfg.stage, kind=kind))).players["student"]
    g = torch.Generator().manual_seed(seed)
    return {k: v.detach() + scale * torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}


def write_checkpoint(cfg: RunConfig, seed: int = 0, step: int = 1) -> Path:
    """A complete checkpoint (config.yaml + ema.safetensors + COMPLETE.json, `latest`) of cfg."""
    manager = CheckpointManager(cfg.checkpoint, rank=0, world_size=1)
    manager.save(step, engines={}, rank_state=RankState({}, {}), config_yaml=to_yaml(cfg),
                 shared={EMA_FILE: perturbed_weights(cfg, seed)})
    return Path(cfg.checkpoint.dir)


def write_cascade(root: Path, sr_options: str = "    noise_aug: 0.2\n") -> Path:
    """A tiny base model (16 px) and super-resolution model (16 -> 32 px) with random weights,
    and a cascade recipe over them (`sr_options`: YAML lines of the second stage)."""
    write_checkpoint(tiny_config(root / "base"))
    write_checkpoint(tiny_config(root / "sr", "stage.kind=superres", "model.superres=true", "data.sr_resolution=32"),
                     seed=1)
    recipe = root / "cascade.yaml"
    recipe.write_text("stages:\n  - checkpoint: base/checkpoints\n  - checkpoint: sr/checkpoints\n" + sr_options)
    return recipe


def write_autoencoder(directory: Path, seed: int = 0, channels: tuple[int, ...] = (32, 64)) -> Path:
    """A random tiny AutoencoderKL saved as the autoencoder stage saves it; it downsamples by
    2 per block after the first (`channels`: one per block)."""
    from trainer.config import AutoencoderConfig
    from trainer.models.autoencoder import Autoencoder, build_kl

    torch.manual_seed(seed)
    vae = build_kl(AutoencoderConfig(kind="kl", block_out_channels=list(channels)))
    Autoencoder(vae, scale=1.3, shift=0.1).save(directory)
    return directory
