"""Models: DiT (image/video, base/super-resolution), text encoders, autoencoders, discriminator.

Plain single-device PyTorch; distribution is applied from outside (trainer/engine.py).
Heavy libraries (transformers, open_clip, diffusers) are imported when a builder needs them.
"""
from trainer.models.autoencoder import Autoencoder, PixelSpace, build_autoencoder
from trainer.models.discriminator import DiscriminatorHeads
from trainer.models.dit import DIT_PRESETS, DiT, DiTPreset, DiTSpec, TextEmbedding, build_dit, dit_preset, patchify, unpatchify
from trainer.models.text import TextEncoder, build_text_encoder

__all__ = [
    "DIT_PRESETS",
    "Autoencoder",
    "DiT",
    "DiTPreset",
    "DiTSpec",
    "DiscriminatorHeads",
    "PixelSpace",
    "TextEmbedding",
    "TextEncoder",
    "build_autoencoder",
    "build_dit",
    "build_text_encoder",
    "dit_preset",
    "patchify",
    "unpatchify",
]
