"""Per-sample random streams: a training sample's noise, timestep and CFG dropout depend only
on (run seed, step, the sample's id), never on the rank, micro-batch or loader worker that
carries it, so a run resumed on another layout draws the numbers the uninterrupted run drew.

A batch's draws come from a list of generators, one per sample, in the convention of
diffusers' `randn_tensor` (a list of generators seeds each batch element on its own): a draw
of shape (B, ...) takes shape[1:] numbers from each sample's generator, in order. Each sample
therefore sees the same sequence of draws (CFG mask, t, eps, ...) whatever else shares its
batch. The generators live on the training device: CUDA generators fill CUDA tensors, with no
host round trip.

Seeds are mixed with SplitMix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom
number generators"), whose finalizer maps nearby inputs (step k and k + 1, sample i and
i + 1) to unrelated 64-bit seeds.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / golden ratio


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def sample_seed(seed: int, step: int, sample: int) -> int:
    """A 64-bit seed for one sample's draws at one step (each value mixed in turn)."""
    h = 0
    for value in (seed, step, sample):
        h = _splitmix64(h ^ (value & _MASK))
    return h


def sample_generators(seed: int, step: int, samples: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One generator per sample of a batch (B of them, in batch order), on `device`."""
    return [torch.Generator(device).manual_seed(sample_seed(seed, step, int(s))) for s in samples]


def per_sample(draw: Callable[..., Tensor], shape: tuple[int, ...], generators: list[torch.Generator],
               pin_memory: bool = False) -> Tensor:
    """(B, ...) from B generators: row i is `draw((1, *shape[1:]), generator=generators[i],
    device=...)`, made on the generators' device (in pinned host memory with `pin_memory`)."""
    if not shape or shape[0] != len(generators):
        raise ValueError(f"a per-sample draw of shape {shape} needs one generator per row; "
                         f"got {len(generators)} generators")
    device = generators[0].device
    rows = [draw((1, *shape[1:]), generator=g, device=device) for g in generators]  # B x (1, ...)
    out = torch.empty(shape, dtype=rows[0].dtype, device=device, pin_memory=pin_memory)
    return torch.cat(rows, out=out)  # (B, ...)
