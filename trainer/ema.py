"""Exponential moving average of the trained weights' fp32 masters, partitioned as they are.

The average follows the optimizer's fp32 master weights (trainer/masters.py), not the module's
weights: under bf16/fp16 those are the masters rounded to 16 bits, and an average of rounded
weights carries the rounding (up to 0.83 bf16 ulp of slow late-training drift). Each rank keeps
the shadow of the masters it holds: whole without ZeRO, its partition under ZeRO 1-3 (the same
memory split as the masters, on the host where the optimizer is offloaded), so the update reads
nothing of another rank. `full_state_dict()` assembles whole tensors (a collective: every rank
must call it) when a checkpoint, a sample grid or an export needs them.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import EMAConfig
from trainer.distributed import comm_device
from trainer.flat_params import expand, joined, weight_names
from trainer.masters import Masters

# Elements of the weights joined for one lerp of the update (a transient fp32 copy of 256 MB
# at most, not of the whole model); a larger tensor is a group of its own.
UPDATE_GROUP_ELEMENTS = 1 << 26


def _groups(sizes: list[int], max_elements: int) -> Iterator[tuple[slice, slice]]:
    """Runs of consecutive tensors of these sizes, each of at most `max_elements` elements (or
    one larger tensor): (slice of the tensors, slice of their elements laid end to end)."""
    first = start = size = 0
    for i, n in enumerate(sizes):
        if i > first and size + n > max_elements:
            yield slice(first, i), slice(start, start + size)
            first, start, size = i, start + size, 0
        size += n
    if first < len(sizes):
        yield slice(first, len(sizes)), slice(start, start + size)


class _Place(NamedTuple):
    """Where a shadow sits in its parameter's flattened elements (trainer.masters.Fragment)."""
    start: int
    numel: int
    partitioned: bool
    group: Optional[Any]


def _whole_shape(p: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 parameter's own shape is empty


class EMA:
    """EMA of a module's trainable parameters (Polyak averaging, as in DiT / LDM training)."""

    def __init__(self, module: nn.Module, cfg: EMAConfig, names: Optional[dict[str, str]] = None,
                 masters: Optional[Masters] = None):
        """`names` maps the module's parameter names to the names the EMA is kept and saved
        under (a pipeline stage's `3.attn.qkv.weight` -> the network's `blocks.2.attn.qkv.weight`);
        default: the module's own names. `masters` finds this rank's fp32 master of a parameter
        (`trainer.masters.Masters(engine)`); default: the parameter itself."""
        self.cfg = cfg
        self.num_updates = 0
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        self.names = {n: (names or {}).get(n, n) for n in trainable}
        self._module = module
        self._masters = masters or Masters()
        self._held_views: Optional[tuple[tuple[int, ...], list[torch.Tensor]]] = None  # (`_held`)
        tracked = list(self._params(module))
        self._tracked = [p for _, p in tracked]
        fragments = [self._masters(p) for p in self._tracked]
        self._places = [_Place(f.start, f.values.numel(), f.partitioned, f.group) for f in fragments]
        held = [f.values for f in fragments if f.values.numel()]
        device = held[0].device if held else comm_device()
        # One fp32 buffer, the shadows views of it in order: an update is a few kernels (update)
        self._flat = torch.empty(sum(place.numel for place in self._places), dtype=torch.float32, device=device)
        self.shadow: dict[str, torch.Tensor] = {}
        start = 0
        for (name, _), f in zip(tracked, fragments):
            self.shadow[name] = self._flat[start: start + f.values.numel()].view(f.values.shape)
            self.shadow[name].copy_(f.values)
            start += f.values.numel()
        self._groups = list(_groups([place.numel for place in self._places], UPDATE_GROUP_ELEMENTS))

    @property
    def shadow_device(self) -> torch.device:
        """Where the shadows live: beside the masters they follow (the accelerator, or the host
        where the optimizer is offloaded)."""
        return self._flat.device

    def _params(self, module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """(saved name, parameter) of every tracked parameter."""
        params = dict(module.named_parameters())
        for own, name in self.names.items():
            yield name, params[own]

    def _held(self) -> list[torch.Tensor]:
        """The masters' current values of every tracked parameter, 1-D, as the shadows hold them.
        Views of ZeRO's flat buffers are taken again only when those move (`Masters.buffers`):
        with DiT-XL/2's 628 tensors the update's host time on this project's CPU is 0.11 ms at
        ZeRO-3, where looking the fragments up every step took 4.18 ms (README)."""
        buffers = self._masters.buffers()
        if buffers is not None and self._held_views is not None and self._held_views[0] == buffers:
            return self._held_views[1]
        held = []
        for p, place in zip(self._tracked, self._places):
            now = self._masters(p)
            if (now.start, now.values.numel()) != (place.start, place.numel):
                raise RuntimeError(f"internal: the fp32 master of a parameter of shape {_whole_shape(p)} moved "
                                   f"after the EMA was made (elements {place.start}+{place.numel}, "
                                   f"now {now.start}+{now.values.numel()})")
            held.append(now.values.reshape(-1))
        self._held_views = (buffers, held) if buffers is not None else None
        return held

    def decay(self) -> float:
        """The coming update's decay; during the warm-up (its first `ema.warmup_steps` updates)
        min(decay, (1 + n) / (10 + n)), n counting this update, as torch-ema's
        `ExponentialMovingAverage` and LDM's `LitEma` count it: 2/11 at the first. (diffusers'
        `EMAModel` counts one fewer, and takes the weights whole at its first update.)"""
        n = self.num_updates + 1
        if n <= self.cfg.warmup_steps:
            return min(self.cfg.decay, (1 + n) / (10 + n))
        return self.cfg.decay

    @torch.no_grad()
    def update(self, module: nn.Module, skipped: bool | torch.Tensor = False) -> None:
        """One step of the average, s <- s + (1 - d)(p - s), p the fp32 masters after the
        optimizer's step. A skipped (non-finite) step leaves the shadows as they were and still
        counts toward the warm-up; `skipped` may be a device flag, never read here: it zeroes
        the step's weight on the device. `module` is the one the EMA was made for.

        The masters are joined a group at a time (`UPDATE_GROUP_ELEMENTS`) and the group's
        slice of the flat shadow follows them with one lerp: a few kernels a group, where a
        lerp per parameter was 628 launches a step for DiT-XL/2."""
        if module is not self._module:
            raise ValueError("EMA.update got another module than the one its shadows follow")
        weight: float | torch.Tensor = 1.0 - self.decay()
        if isinstance(skipped, torch.Tensor):
            weight = (1.0 - skipped.to(self.shadow_device, torch.float32).reshape(())) * weight
        if skipped is not True:
            held = self._held()
            for params, elements in self._groups:
                parts = [t for t in held[params] if t.numel()]
                if parts:
                    target = (torch.cat(parts) if len(parts) > 1 else parts[0]).float()  # (elements,) fp32
                    self._flat[elements].lerp_(target, weight)  # s <- d s + (1 - d) p
        self.num_updates += 1

    def _whole(self, p: nn.Parameter, place: _Place, shadow: torch.Tensor) -> torch.Tensor:
        """A parameter's whole average from every rank's fragment of it: each rank writes its
        elements into zeros and a sum over the group assembles them, exactly (x + 0 = x); on the
        backend's device for the collective, returned on the shadow's."""
        if not place.partitioned:
            return shadow.clone()
        shape = _whole_shape(p)
        whole = torch.zeros(math.prod(shape), dtype=torch.float32, device=comm_device())  # (numel,)
        whole[place.start: place.start + shadow.numel()] = shadow.reshape(-1)
        dist.all_reduce(whole, group=place.group)
        return whole.view(shape).to(self.shadow_device)

    def full_state_dict(self, module: nn.Module, holds: bool = True) -> dict[str, torch.Tensor]:
        """Whole EMA tensors by weight name (a flat block parameter's by the weights it holds;
        collective where the masters are partitioned), in host memory where this rank `holds`
        them (elastic.Gather), else {}: each is dropped once its collective is done."""
        out = {}
        for (n, p), place in zip(self._params(module), self._places):
            whole = self._whole(p, place, self.shadow[n])
            if holds:
                out.update(expand(n, p, whole.cpu()))
        return out

    @torch.no_grad()
    def restart(self, module: nn.Module) -> None:
        """Begin the average again at the current fp32 masters (a resume that turned the EMA
        on: the checkpoint has none to go on from)."""
        for (name, _), held in zip(self._params(module), self._held()):
            self.shadow[name].view(-1).copy_(held)
        self.num_updates = 0

    def load_full_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """Restore from whole tensors (the checkpoint's ema.safetensors), each rank taking its
        fragments; every name and shape must match, both ways (collective: `unclaimed_keys`)."""
        own = {w for n, p in self._params(module) for w in weight_names(n, p)}
        unexpected = unclaimed_keys(state, own)  # first: every rank joins the collective before any raises
        missing = own - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        if unexpected:
            raise KeyError(f"EMA state holds {len(unexpected)} tensors the model does not have, e.g. "
                           f"{unexpected[:3]} (a checkpoint of another model.*)")
        for (n, p), place in zip(self._params(module), self._places):
            full = joined(n, p, state)
            if tuple(full.shape) != _whole_shape(p):
                raise ValueError(f"EMA tensor {n}: checkpoint shape {tuple(full.shape)} does not match the model")
            shadow = self.shadow[n]
            shadow.view(-1).copy_(full.reshape(-1)[place.start: place.start + shadow.numel()])
        self.num_updates = num_updates


def unclaimed_keys(keys: Iterable[str], claimed: set[str]) -> list[str]:
    """The keys of a whole-network file (every rank reads the same one) that no rank's module
    claims: what a load that checks only for missing tensors drops silently (a qk_norm
    checkpoint resumed without it lost 48 tensors). Collective when a process group runs: a
    pipeline stage claims only its own layers."""
    ordered = sorted(keys)
    flags = torch.tensor([k in claimed for k in ordered], dtype=torch.int32, device=comm_device())  # (K,)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [k for k, claimed_somewhere in zip(ordered, flags.tolist()) if not claimed_somewhere]
