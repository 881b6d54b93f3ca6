"""Classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al. 2023).

The conditional and unconditional predictions come from ONE batched forward pass over
[cond; uncond]: half the kernel launches of two passes, and batch-coupled numerics identical
for both halves.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from trainer.diffusion.utils import coef

CondModel = Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]

_STD_FLOOR = 1e-12  # a constant guided prediction (std 0) is left unscaled instead of NaN


def apply_guidance(cond_pred: Tensor, uncond_pred: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """u + s (c - u), then guidance rescale phi (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", sec. 3.4):
        rescaled = g * std(c) / std(g),   out = phi rescaled + (1 - phi) g,
    std per sample over all non-batch dims. At scale 1, g = c and so out = c for any phi.
    Combined in float32 (or wider) whatever the predictions' dtype: a bf16 teacher's c and u
    are exact, their bf16 combination and a bf16 scale (3.7 -> 3.703125) are not. (B, ...)
    """
    dtype = torch.promote_types(cond_pred.dtype, torch.float32)
    cond_pred, uncond_pred = cond_pred.to(dtype), uncond_pred.to(dtype)
    guided = uncond_pred + scale * (cond_pred - uncond_pred)  # (B, ...)
    if rescale == 0.0:
        return guided
    std_c = cond_pred.flatten(1).std(dim=1)  # (B,)
    std_g = guided.flatten(1).std(dim=1).clamp(min=_STD_FLOOR)  # (B,)
    rescaled = guided * coef(std_c / std_g, guided)  # (B, ...)
    return rescale * rescaled + (1 - rescale) * guided


def _concat_cond(cond: dict[str, Tensor], uncond: dict[str, Tensor], batch: int) -> dict[str, Tensor]:
    """Each entry as [cond; uncond] along the batch; an uncond entry of batch 1 (a shared null
    embedding) is expanded to `batch`."""
    if cond.keys() != uncond.keys():
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    both = {}
    for key, c in cond.items():
        u = uncond[key]
        if u.shape[0] == 1 and batch > 1:
            u = u.expand(batch, *u.shape[1:])
        if c.shape[0] != batch or u.shape[1:] != c.shape[1:]:
            raise ValueError(
                f"conditioning '{key}': cond {tuple(c.shape)} and uncond {tuple(u.shape)} must be "
                f"batch-first with batch {batch} (uncond may have batch 1) and equal trailing shapes"
            )
        both[key] = torch.cat([c, u])  # (2B, ...)
    return both


def cfg_model(
    model: CondModel, cond: dict[str, Tensor], uncond: dict[str, Tensor], scale: float, rescale: float = 0.0
) -> Callable[[Tensor, Tensor], Tensor]:
    """A guided denoiser `(x, t) -> prediction` from `model(x, t, cond_dict)`.

    Works in whatever parametrization the model predicts (Lin et al. rescale the v-prediction).
    At scale 1 the result is the conditional prediction, computed without the uncond half.
    """

    def guided(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0:
            return model(x, t, cond)
        both = _concat_cond(cond, uncond, x.shape[0])
        pred = model(torch.cat([x, x]), torch.cat([t, t]), both)  # (2B, ...)
        cond_pred, uncond_pred = pred.chunk(2)  # (B, ...), (B, ...)
        return apply_guidance(cond_pred, uncond_pred, scale, rescale)

    return guided
