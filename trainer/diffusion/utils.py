"""Broadcasting and noise helpers shared by the diffusion modules."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dims, as k-diffusion `utils.append_dims`."""
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a {v.ndim}-d tensor to {ndim} dims")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def coef(c: Tensor, like: Tensor) -> Tensor:
    """A per-sample coefficient (B,) shaped to multiply `like` (B, ...).

    The dtype is float32 or `like`'s dtype when wider: bf16/fp16 activations are combined
    with the schedule in float32 (alpha near 1 has no bf16 digits to spare), float64 stays.
    """
    dtype = torch.promote_types(like.dtype, torch.float32)
    return append_dims(c, like.ndim).to(device=like.device, dtype=dtype)


def batch_t(t: Tensor | float, x: Tensor) -> Tensor:
    """A scalar or (B,) time as a (B,) float32 tensor on x's device."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def randn_like(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device, then moved.

    Drawing on the generator's own device keeps a seeded CPU generator usable (and its
    stream identical) when x lives on an accelerator.
    """
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
