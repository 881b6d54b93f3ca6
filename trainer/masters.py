"""Where DeepSpeed keeps this rank's fp32 master weights of each trained parameter.

Under bf16/fp16 the module holds its weights rounded to 16 bits and the optimizer steps fp32
masters kept apart, partitioned over the data-parallel ranks once ZeRO is on. What must read
the weights at full precision every step (the EMA, trainer/ema.py) reads them here, in place:

    layout                                 fp32 master of parameter p on this rank
    fp32 without ZeRO                      p itself, whole
    bf16/fp16 without ZeRO                 its own fp32 copy, whole           (FP16_UnfusedOptimizer)
    ZeRO-1/2 (bf16 ZeRO-1: BF16_Optimizer) a slice of the flat fp32 partition  (p._hp_mapping; none
                                           of its param group, maybe empty     where p lies elsewhere)
    ZeRO-3                                 its partition, all of equal size,   (fp32_partitioned_
                                           the last ones padded past p's end    groups_flat)

A fragment is a view of the optimizer's own storage, on the host where the optimizer is
offloaded. Under ZeRO the views stay good while the optimizer's flat fp32 buffers do
(`Masters.buffers`): DeepSpeed 0.19 copies a loaded checkpoint into them in place (stage3.py,
stage_1_and_2.py, bf16_optimizer.py), and only its `offload_states`, which the trainer never
calls, would move them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Fragment:
    """Elements [start, start + values.numel()) of a parameter's flattened fp32 master, held by
    this rank; where `partitioned`, the other ranks of `group` (None: the world) hold the rest
    and `values` is 1-D (maybe empty), else `values` is the whole master at the parameter's
    shape. Detached: ZeRO's flat masters are parameters, and a copy of them would join a graph."""
    values: torch.Tensor
    start: int = 0
    partitioned: bool = False
    group: Optional[Any] = None


def half_masters(engine: Any) -> dict[int, torch.Tensor]:
    """id(half-precision parameter) -> its fp32 master, where DeepSpeed keeps them apart without
    ZeRO (its unfused bf16/fp16 wrapper: the client optimizer steps the masters); else empty."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrapper = engine.optimizer
    if not isinstance(wrapper, FP16_UnfusedOptimizer):
        return {}
    return {id(lp): hp for lps, hps in zip(wrapper.fp16_groups, wrapper.fp32_groups) for lp, hp in zip(lps, hps)}


def _mapped(p: nn.Parameter) -> Fragment:
    """ZeRO-1/2 and BF16_Optimizer: the slice of p's flattened elements inside this rank's flat
    fp32 partition (`lp_fragment_address`), as DeepSpeed's `get_full_hp_param` places it."""
    mapping = p._hp_mapping
    if mapping is None:  # p lies wholly in other ranks' partitions
        return Fragment(torch.empty(0, dtype=torch.float32), 0, True, p._dp_group)
    return Fragment(mapping.hp_fragment.detach(), mapping.lp_fragment_address.start, True, p._dp_group)


def _zero3(p: nn.Parameter) -> Fragment:
    """ZeRO-3: this rank's fp32 partition of p, `partition_numel` elements at rank x that in the
    flattened parameter, cut where the parameter ends (the last ranks' partitions are padding)."""
    optimizer = p._z3_optimizer
    group_index, offset, numel = optimizer.grad_position[optimizer.get_param_id(p)]
    partition = optimizer.fp32_partitioned_groups_flat[group_index].detach().narrow(0, offset, numel)  # (numel,)
    group = getattr(p, "ds_process_group", optimizer.dp_process_group)
    start = dist.get_rank(group=group) * numel
    return Fragment(partition[: max(0, min(numel, p.ds_numel - start))], start, True, group)


# The flat fp32 buffers ZeRO's fragments are views of: ZeRO-3, ZeRO-1/2, BF16_Optimizer.
FLAT_BUFFERS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")


class Masters:
    """This rank's fp32 master of each trained parameter of `engine.module` (table above);
    without an engine, each parameter itself, whole (a module trained without DeepSpeed's
    wrappers)."""

    def __init__(self, engine: Any = None):
        self.engine = engine
        self.halves = half_masters(engine) if engine is not None else {}

    def __call__(self, p: nn.Parameter) -> Fragment:
        if hasattr(p, "ds_id"):
            return _zero3(p)
        if hasattr(p, "_hp_mapping"):
            return _mapped(p)
        if id(p) in self.halves:
            return Fragment(self.halves[id(p)].data)
        if self.engine is not None and p.dtype != torch.float32:
            raise RuntimeError(f"internal: no fp32 master of a {p.dtype} parameter of shape {tuple(p.shape)} in "
                               f"DeepSpeed's {type(self.engine.optimizer).__name__}: the EMA would average its "
                               f"rounded weights")
        return Fragment(p.data)

    def buffers(self) -> Optional[tuple[int, ...]]:
        """The addresses of the optimizer's flat fp32 buffers, or None where the masters are
        tensors of their own (no ZeRO): fragments taken while these stay the same are views of
        the live masters."""
        optimizer = getattr(self.engine, "optimizer", None)
        flats = [t for name in FLAT_BUFFERS for t in getattr(optimizer, name, None) or ()]
        return tuple(t.data_ptr() for t in flats) if flats else None
