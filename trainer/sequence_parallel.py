"""Sequence parallelism for the DiT, applied from outside the model (DeepSpeed-Ulysses: Jacobs et
al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long
Sequence Transformer Models").

S consecutive ranks form a sequence group and hold the same samples. `parallelize_sequence`
changes a plain `DiT` in place, as torchtitan's `parallelize` does, without touching its code:

    embed (whole x on every rank) --keep this rank's run of N / S tokens--> h (B, N/S, D)
    each block: adaLN, MLP, cross-attention to the text: per token, local
                self-attention: q, k, v (B, N/S, H, Dh) --all-to-all--> (B, N, H/S, Dh),
                attention over every token with H / S heads, --all-to-all--> (B, N/S, H, Dh)
    head's linear (B, N/S, P) --all-gather--> (B, N, P) --unpatchify--> the whole prediction

Factorized video attention splits a clip between whole frames (F' / S per rank): spatial
attention within a frame is local, temporal attention is exchanged as above over the frames
axis; an image (one frame) is exchanged over all its tokens. Every rank of a group computes the
same loss on the gathered prediction, so a rank's gradient is that of its own tokens.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.config import split_refusal
from trainer.distributed import DistContext
from trainer.models.dit import DiT, Tokens
from trainer.models.layers import Attend, Grid, Rope


def sequence_group(ctx: DistContext) -> dist.ProcessGroup:
    """This rank's sequence group: ranks dp * S ... dp * S + S - 1. Collective (every rank
    creates every group, as torch.distributed.new_group requires)."""
    S = ctx.sequence_parallel
    mine = None
    for first in range(0, ctx.world_size, S):
        group = dist.new_group(list(range(first, first + S)))
        if first <= ctx.rank < first + S:
            mine = group
    assert mine is not None
    return mine


class Shard:
    """The split of the current forward: group, rank in it, and the token grid of the batch
    (recorded by the embedding hook, read by the attention that depends on it)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.grid = (1, 1, 1)

    def local(self, h: Tensor, grid: Grid, factorized: bool) -> Tensor:
        """This rank's contiguous run of N / S tokens of h (B, N, D), as its own tensor (the
        whole h is freed). Tokens are ordered (frame, row, col): whole frames when F' % S == 0."""
        self.grid = grid
        refusal = split_refusal(tuple(grid), self.size, factorized)
        if refusal is not None:
            raise ValueError(refusal)
        n = h.shape[1] // self.size
        return h.narrow(1, self.rank * n, n).clone()  # (B, N/S, D)


class GatherTokens(torch.autograd.Function):
    """(B, N/S, P) on each rank of the group -> (B, N, P) on all of them, in rank order.

    Backward: every rank computes the same loss from the gathered tensor, so the gradient of a
    rank's own tokens is its slice of the (identical) incoming gradient. It is multiplied by S:
    each rank's parameters then hold S times the gradient of its own tokens, and DeepSpeed's mean
    over all ranks - the S ranks of each group and the data-parallel replicas - is the sum over
    the group's tokens (the whole sample's gradient) averaged over the replicas.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, shard: Shard) -> Tensor:
        ctx.shard, ctx.n = shard, x.shape[1]
        parts = [torch.empty_like(x) for _ in range(shard.size)]
        dist.all_gather(parts, x.contiguous(), group=shard.group)
        return torch.cat(parts, dim=1)  # (B, N, P)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        shard = ctx.shard
        return grad.narrow(1, shard.rank * ctx.n, ctx.n) * shard.size, None  # (B, N/S, P)


class UlyssesAttend(nn.Module):
    """`Attend` between two all-to-alls (DeepSpeed's `DistributedAttention`): q, k, v
    (B', N/S, H, Dh) -> (B', N, H/S, Dh), attention over the whole sequence, and back.

    `only_images`: wrap the spatial attention of a factorized model, which is exchanged only
    for an image (one frame split between ranks); a clip's frames are whole on each rank.
    """

    def __init__(self, attend: Attend, shard: Shard, only_images: bool = False):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.shard, self.only_images = shard, only_images
        self.local = attend
        # Heads are dim 2 (scattered), the sequence dim 1 (gathered); batch first.
        self.exchange = DistributedAttention(attend, shard.group, scatter_idx=2, gather_idx=1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, rope: Optional[Rope] = None) -> Tensor:
        if self.only_images and self.shard.grid[0] > 1:
            return self.local(q, k, v, rope)  # (B F'/S, S_hw, H, Dh): whole frames
        return self.exchange(q, k, v, 0, None, rope)  # (B', N/S, H, Dh)


def parallelize_sequence(net: DiT, group: dist.ProcessGroup) -> Shard:
    """Split `net`'s token sequence over the ranks of `group`, in place (hooks and wrapped
    `Attend` modules: parameter names, state dicts and the model's code are unchanged)."""
    shard = Shard(group)
    factorized = net.spec.temporal_blocks

    def split(_module: nn.Module, _inputs: Any, state: Tokens) -> Tokens:
        return state._replace(h=shard.local(state.h, state.grid, factorized))

    def gather(_module: nn.Module, _inputs: Any, out: Tensor) -> Tensor:
        return GatherTokens.apply(out, shard)  # (B, N, P)

    net.embed.register_forward_hook(split)
    net.head.linear.register_forward_hook(gather)
    for block in net.blocks:
        block.attn.attend = UlyssesAttend(block.attn.attend, shard, only_images=factorized)
        if block.temporal is not None:
            block.temporal.attn.attend = UlyssesAttend(block.temporal.attn.attend, shard)
    return shard
