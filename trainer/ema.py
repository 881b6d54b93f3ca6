"""Exponential moving average of trained weights, correct under ZeRO-3.

Under ZeRO-3 every rank holds only its partition of each parameter (`param.ds_tensor`), so the
EMA is kept per partition as well: the same memory split as the weights themselves, and no
gather on the hot path. `full_state_dict()` gathers the partitions (a collective: every rank
must call it) when a checkpoint, a sample grid or an export needs whole tensors.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import EMAConfig
from trainer.distributed import comm_device


def _local_tensor(p: nn.Parameter) -> torch.Tensor:
    """The part of `p` this rank owns: the ZeRO-3 partition, else the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _is_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


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
        self.shadow: dict[str, torch.Tensor] = {
            n: _local_tensor(p).detach().float().clone() for n, p in self._params(module)
        }

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
        """One step of the average. A skipped (non-finite) step leaves the shadows as they were
        and still counts toward the warm-up; `skipped` may be a device flag, never read here:
        it zeroes the step's weight on the device."""
        weight: float | torch.Tensor = 1.0 - self.decay()
        if isinstance(skipped, torch.Tensor):
            weight = (1.0 - skipped.to(self.shadow_device, torch.float32).reshape(())) * weight
        if skipped is not True:
            for n, p in self._params(module):
                self.shadow[n].lerp_(_local_tensor(p).float(), weight)  # s <- d s + (1 - d) p
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
        """Whole EMA tensors by parameter name (collective under ZeRO-3)."""
        out = {}
        for n, p in self._params(module):
            local = self.shadow[n]
            out[n] = self._gather(p, local) if _is_partitioned(p) else local.clone()
        return out

    def _partition(self, p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a whole tensor, laid out as ZeRO-3 partitions it (padded flat)."""
        part = p.ds_tensor.numel()
        flat = torch.zeros(part * dist.get_world_size(), dtype=full.dtype, device=full.device)
        flat[: full.numel()] = full.flatten()
        rank = dist.get_rank()
        return flat[rank * part: (rank + 1) * part]

    def load_full_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """Restore from whole tensors (the checkpoint's ema.safetensors), re-partitioning them
        under ZeRO-3; every name and shape must match."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for n, p in self._params(module):
            full = state[n]
            if tuple(full.shape) != tuple(getattr(p, "ds_shape", p.shape)):
                raise ValueError(f"EMA tensor {n}: checkpoint shape {tuple(full.shape)} does not match the model")
            self.shadow[n].copy_(self._partition(p, full) if _is_partitioned(p) else full)
        self.num_updates = num_updates
