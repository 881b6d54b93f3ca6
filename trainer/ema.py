"""Exponential moving average of trained weights, correct under ZeRO-3.

Under ZeRO-3 every rank holds only its partition of each parameter (`param.ds_tensor`), so the
EMA is kept per partition as well: the same memory split as the weights themselves, and no
gather on the hot path. `full_state_dict()` gathers the partitions (a collective: every rank
must call it) when a checkpoint, a sample grid or an export needs whole tensors.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import EMAConfig
from trainer.distributed import comm_device
from trainer.flat_params import expand, joined, weight_names


def _local_tensor(p: nn.Parameter) -> torch.Tensor:
    """The part of `p` this rank owns: the ZeRO-3 partition, else the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _is_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


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


class EMA:
    """EMA of a module's trainable parameters (Polyak averaging, as in DiT / LDM training)."""

    def __init__(self, module: nn.Module, cfg: EMAConfig, names: Optional[dict[str, str]] = None):
        """`names` maps the module's parameter names to the names the EMA is kept and saved
        under (a pipeline stage's `3.attn.qkv.weight` -> the network's `blocks.2.attn.qkv.weight`);
        default: the module's own names."""
        self.cfg = cfg
        self.num_updates = 0
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        self.names = {n: (names or {}).get(n, n) for n in trainable}
        self._module = module
        tracked = list(self._params(module))
        self._tracked = [p for _, p in tracked]
        local = [_local_tensor(p).detach() for p in self._tracked]
        # One fp32 buffer, the shadows views of it in order: an update is a few kernels (update)
        device = local[0].device if local else None
        self._flat = torch.empty(sum(t.numel() for t in local), dtype=torch.float32, device=device)
        self.shadow: dict[str, torch.Tensor] = {}
        start = 0
        for (name, _), t in zip(tracked, local):
            self.shadow[name] = self._flat[start: start + t.numel()].view(t.shape)
            self.shadow[name].copy_(t)
            start += t.numel()
        self._groups = list(_groups([t.numel() for t in local], UPDATE_GROUP_ELEMENTS))

    @property
    def shadow_device(self) -> torch.device:
        """Where the shadows live: beside the weights they follow (the accelerator, or the host
        for ZeRO-3 partitions offloaded there)."""
        return next(iter(self.shadow.values())).device

    def _params(self, module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """(saved name, parameter) of every tracked parameter."""
        params = dict(module.named_parameters())
        for own, name in self.names.items():
            yield name, params[own]

    def decay(self) -> float:
        """Warm-up as in `torch-ema` / LDM: min(decay, (1 + n) / (10 + n)) for the first steps."""
        n = self.num_updates
        if n < self.cfg.warmup_steps:
            return min(self.cfg.decay, (1 + n) / (10 + n))
        return self.cfg.decay

    @torch.no_grad()
    def update(self, module: nn.Module, skipped: bool | torch.Tensor = False) -> None:
        """One step of the average, s <- s + (1 - d)(p - s). A skipped (non-finite) step leaves
        the shadows as they were and still counts toward the warm-up; `skipped` may be a device
        flag, never read here: it zeroes the step's weight on the device. `module` is the one
        the EMA was made for.

        The weights are joined a group at a time (`UPDATE_GROUP_ELEMENTS`) and the group's
        slice of the flat shadow follows them with one lerp: three kernels a group, where a cast
        and a lerp per parameter were 1,256 launches a step for DiT-XL/2's 628 parameters (host
        time of the update with the compute made negligible: 3.4 ms on this project's CPU, now
        1.2 ms, spent listing the parameters' current tensors)."""
        if module is not self._module:
            raise ValueError("EMA.update got another module than the one its shadows follow")
        weight: float | torch.Tensor = 1.0 - self.decay()
        if isinstance(skipped, torch.Tensor):
            weight = (1.0 - skipped.to(self.shadow_device, torch.float32).reshape(())) * weight
        if skipped is not True:
            local = [_local_tensor(p).reshape(-1) for p in self._tracked]
            for params, elements in self._groups:
                parts = local[params]
                target = (torch.cat(parts) if len(parts) > 1 else parts[0]).float()  # (elements,) fp32
                self._flat[elements].lerp_(target, weight)  # s <- d s + (1 - d) p
        self.num_updates += 1

    def _gather(self, p: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
        """Reassemble a ZeRO-3 parameter from the equal-size (padded) partitions of all ranks
        (on the backend's device: an offloaded partition lives on the host, NCCL gathers on
        the accelerator); the whole tensor comes back on the shadow's device."""
        local = local.to(comm_device())
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape).to(self.shadow_device)

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Whole EMA tensors by weight name (a flat block parameter's by the weights it holds;
        collective under ZeRO-3)."""
        out = {}
        for n, p in self._params(module):
            local = self.shadow[n]
            out.update(expand(n, p, self._gather(p, local) if _is_partitioned(p) else local.clone()))
        return out

    def _partition(self, p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a whole tensor, laid out as ZeRO-3 partitions it (padded flat)."""
        part = p.ds_tensor.numel()
        flat = torch.zeros(part * dist.get_world_size(), dtype=full.dtype, device=full.device)
        flat[: full.numel()] = full.flatten()
        rank = dist.get_rank()
        return flat[rank * part: (rank + 1) * part]

    @torch.no_grad()
    def restart(self, module: nn.Module) -> None:
        """Begin the average again at `module`'s current weights (a resume that turned the EMA
        on: the checkpoint has none to go on from)."""
        for name, p in self._params(module):
            self.shadow[name].copy_(_local_tensor(p))
        self.num_updates = 0

    def load_full_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """Restore from whole tensors (the checkpoint's ema.safetensors), re-partitioning them
        under ZeRO-3; every name and shape must match, both ways (collective: `unclaimed_keys`)."""
        own = {w for n, p in self._params(module) for w in weight_names(n, p)}
        unexpected = unclaimed_keys(state, own)  # first: every rank joins the collective before any raises
        missing = own - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        if unexpected:
            raise KeyError(f"EMA state holds {len(unexpected)} tensors the model does not have, e.g. "
                           f"{unexpected[:3]} (a checkpoint of another model.*)")
        for n, p in self._params(module):
            full = joined(n, p, state)
            if tuple(full.shape) != tuple(getattr(p, "ds_shape", p.shape)):
                raise ValueError(f"EMA tensor {n}: checkpoint shape {tuple(full.shape)} does not match the model")
            self.shadow[n].copy_(self._partition(p, full) if _is_partitioned(p) else full)
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
