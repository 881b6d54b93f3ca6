"""Run by tests/trainer/test_sequence_parallel.py on 2 ranks (torchrun, gloo): for each DiT
variant, one forward + backward on the same batch in one process (S = 1, the plain model) and
with the sequence split over both ranks (S = 2); prints one JSON line per variant on rank 0 with
the largest loss and gradient differences, and exits 1 when any exceeds the float tolerance."""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from tests.models.test_dit_model import make_text, randomize_, tiny
from trainer.distributed import init_distributed
from trainer.sequence_parallel import parallelize_sequence, sequence_group

TOLERANCE = 1e-5

# name -> (model overrides, input shape (B, C, [F,] H, W))
VARIANTS = {
    "full-rope-video": ({"video": True, "attention": "full", "positions": "rope"}, (2, 4, 4, 4, 6)),
    "factorized-video": ({"video": True, "checkpoint_policy": "attention"}, (2, 4, 4, 4, 6)),
    "factorized-image": ({"video": True, "positions": "rope"}, (2, 4, 4, 6)),
}


def loss_and_grads(net: torch.nn.Module, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    x, target = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = torch.rand(shape[0], generator=gen)
    net.zero_grad()
    loss = (net(x, t, make_text(shape[0], [3, 0])) - target).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


def main() -> int:
    ctx = init_distributed(1, 60, sequence_parallel=2)
    assert ctx.world_size == 2 and ctx.dp_rank == 0 and ctx.dp_world == 1
    group = sequence_group(ctx)
    failed = False
    for name, (overrides, shape) in VARIANTS.items():
        torch.manual_seed(0)
        single = randomize_(tiny(**overrides))
        split = copy.deepcopy(single)
        parallelize_sequence(split, group)
        ref_loss, ref_grads = loss_and_grads(single, shape)
        loss, grads = loss_and_grads(split, shape)
        for g in grads.values():  # what DeepSpeed does with the ranks' gradients: the mean
            dist.all_reduce(g, group=group)
            g /= 2
        grad_err = max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads)
        grad_scale = max(float(g.abs().max()) for g in ref_grads.values())
        loss_err = float((loss - ref_loss).abs())
        failed |= not (loss_err <= TOLERANCE and grad_err <= TOLERANCE * max(1.0, grad_scale))
        if ctx.is_main:
            print(json.dumps({"variant": name, "loss": float(ref_loss), "loss_err": loss_err,
                              "grad_err": grad_err, "grad_max": grad_scale}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
