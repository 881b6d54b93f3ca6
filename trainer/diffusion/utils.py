"""Broadcasting and noise helpers shared by the diffusion modules."""
from __future__ import annotations

from functools import partial
from typing import Optional, Union

import torch
from torch import Tensor

from trainer.diffusion.noise import per_sample

# One generator for the batch, or one per sample (trainer.diffusion.noise: layout-independent draws)
Generators = Union[torch.Generator, list[torch.Generator], None]


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
    """A scalar or (B,) time as a (B,) float32 tensor on x's device. A Python number is filled in
    on the device: `as_tensor` would copy it from the host, waiting for the device's queue."""
    if not isinstance(t, Tensor):
        return torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    t = t.to(device=x.device, dtype=torch.float32)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def draw_device(generator: Generators, device: Optional[torch.device | str]) -> torch.device:
    """Where a draw happens: on the generator's device (the first one's, for a list)."""
    if isinstance(generator, list):
        return generator[0].device
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _draw(fn, shape: tuple[int, ...], generator: Generators, device: Optional[torch.device]) -> Tensor:
    """`fn(shape)` on the generator's device (row by row from per-sample generators), returned
    on `device`. A host draw bound for CUDA is made in pinned memory and copied without waiting:
    a plain copy makes the host wait for the device's queue, once per step of a DDPM or DDIM-eta
    sampler driven by seeded CPU generators."""
    where = draw_device(generator, device)
    target = torch.device(device) if device is not None else where
    pin = where.type == "cpu" and target.type == "cuda"
    if isinstance(generator, list):
        draw = per_sample(fn, shape, generator, pin_memory=pin)  # (B, ...)
    else:
        draw = fn(shape, generator=generator, device=where, pin_memory=pin)
    return draw.to(target, non_blocking=pin)


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device) -> Tensor:
    """Standard normal float32 noise drawn on the generator's device, returned on `device`.

    The draw must happen where the generator lives (a CUDA generator cannot fill a host tensor,
    nor a CPU generator a CUDA one); the trainer's generator lives on the accelerator, so the
    move is a no-op there, while a seeded CPU generator still serves any device."""
    return _draw(torch.randn, shape, generator, device)


def rand(shape: tuple[int, ...], generator: Generators, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32, drawn on the generator's device, returned on `device`."""
    return _draw(torch.rand, shape, generator, device)


def randint(high: int, shape: tuple[int, ...], generator: Generators, device: torch.device) -> Tensor:
    """Uniform integers in [0, high) (int64), drawn on the generator's device, returned on `device`."""
    return _draw(partial(torch.randint, 0, high), shape, generator, device)


def randn_like(x: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise shaped like x, on x's device, in float32 or x's wider dtype."""
    return randn(tuple(x.shape), generator, x.device).to(torch.promote_types(x.dtype, torch.float32))
