"""Memory of real DeepSpeed engines, per rank, for `dit plan`'s figures to be checked against.

Run on every rank by torchrun: `python -m torch.distributed.run --nproc-per-node N -m
tests.launch.memory_probe OUT CONFIG CASE [CASE ...]`, CASE = "PRESET,ZERO,PRECISION". For each
case it builds the DiT of CONFIG with that preset and the engine exactly as the trainer does
(`trainer.engine.build_engine`), runs two optimizer steps on random inputs and records:

- `model_states`: bytes of the tensor storages that appeared since just before the DiT was
  built, at the end of the second backward (parameters, gradients, fp32 master weights, Adam
  states: all alive then), without the communication buckets;
- `buckets`: bytes of DeepSpeed's gradient-reduction buffers (storages of exactly
  reduce_bucket_size elements) at that moment;
- `activations` (rank 0, fp32 cases): bytes of the distinct non-parameter storages autograd
  saved during one forward of one micro-batch (`saved_tensors_hooks`).

`forward_saved_bytes` measures the same in process, without an engine, for any precision and
checkpointing policy (bf16 on the CPU keeps qk-norm's fp32 copies: a case fp32 cannot show).

Rank 0 writes OUT as JSON (a list of records).
"""
from __future__ import annotations

import gc
import json
import sys
from typing import Iterator

import torch
import torch.distributed as dist

from launch.plan import zero_settings
from launch.plan_model import text_dims
from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.models.dit import TextEmbedding, build_dit
from trainer.optim import build_engine
from trainer.parallel import prepare_for_training
from trainer.train_state import seed_everything


def live_storages() -> dict[int, int]:
    """data_ptr -> nbytes of every CPU tensor storage reachable from Python objects."""
    gc.collect()
    out: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.nbytes():
                out[storage.data_ptr()] = storage.nbytes()
    return out


def cases(specs: list[str]) -> Iterator[tuple[str, int, str]]:
    for spec in specs:
        preset, zero, precision = spec.split(",")
        yield preset, int(zero), precision


def measure(config: str, preset: str, zero: int, precision: str, ctx) -> dict:
    cfg = load_config(config, [f"model.preset={preset}", f"deepspeed.zero_stage={zero}",
                               f"deepspeed.precision={precision}", "data.shards=unused"])
    seed_everything(cfg.run.seed)
    text_dim, pooled_dim, text_len, _ = text_dims(cfg.model)
    B, r, dtype = cfg.data.batch_size, cfg.data.resolution, torch.float32 if precision == "fp32" else torch.bfloat16
    x = torch.randn(B, cfg.model.in_channels, r, r, dtype=dtype)
    t = torch.rand(B, dtype=dtype)
    text = TextEmbedding(torch.randn(B, text_len, text_dim, dtype=dtype), torch.ones(B, text_len, dtype=torch.bool),
                         torch.randn(B, pooled_dim, dtype=dtype))
    before = live_storages()
    net = prepare_for_training(build_dit(cfg.model, text_dim, pooled_dim), cfg.model)
    engine, _ = build_engine(net, cfg.optim.lr, cfg.optim, cfg.deepspeed, B, ctx, 10, torch.device("cpu"))
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Parameters are looked up now: ZeRO-3 gathers them into new storages for the forward.
        weights = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def step(hooked: bool) -> dict[int, int]:
        if hooked:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = engine(x, t, text).float().pow(2).mean()
        else:
            loss = engine(x, t, text).float().pow(2).mean()
        engine.backward(loss)
        return live_storages()

    step(precision == "fp32")
    engine.step()
    # The reduce buckets live during backward: look once more as the first layer's gradient is done.
    during: list[dict[int, int]] = []
    handle = net.embed.x_embedder.register_full_backward_hook(lambda *_: during.append(live_storages()))
    snapshots = [{p: n for p, n in snap.items() if p not in before} for snap in (step(False), *during)]
    handle.remove()
    engine.step()
    bucket = zero_settings(cfg, zero).reduce_bucket_size * (4 if precision == "fp32" else 2)
    buckets = max(sum(n for n in snap.values() if n == bucket) for snap in snapshots)
    states = max(sum(n for n in snap.values() if n != bucket) for snap in snapshots)
    record = {"preset": preset, "zero_stage": zero, "precision": precision, "world": ctx.world_size,
              "micro_batch": B, "model_states": states, "buckets": buckets,
              "activations": sum(saved.values()) if saved else None}
    del engine, net
    gc.collect()
    return record


def forward_saved_bytes(cfg, batch: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one training forward of
    `cfg`'s DiT on `batch` random samples on the CPU: cast to the training precision under its
    autocast, with `cfg`'s checkpointing policy (a checkpoint's inputs counted once, where the
    block's other operations save them)."""
    from launch.plan_model import model_facts

    m = model_facts(cfg, 0, "cpu")
    text_dim, pooled_dim, text_len, _ = text_dims(cfg.model)
    seed_everything(0)
    half = cfg.deepspeed.precision != "fp32"
    net = prepare_for_training(build_dit(cfg.model, text_dim, pooled_dim), cfg.model).to(
        torch.bfloat16 if half else torch.float32)
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(batch, *m.latent_shape)
    text = TextEmbedding(torch.randn(batch, text_len, text_dim), torch.ones(batch, text_len, dtype=torch.bool),
                         torch.randn(batch, pooled_dim))
    with torch.autocast("cpu", torch.bfloat16, enabled=half), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x, torch.rand(batch), text)  # kept alive: its graph holds what is saved
    del out
    return sum(saved.values())


def main(out: str, config: str, *specs: str) -> None:
    cfg = load_config(config, ["data.shards=unused"])
    ctx = init_distributed(1, cfg.deepspeed.comm_timeout_s)
    records = [measure(config, preset, zero, precision, ctx) for preset, zero, precision in cases(list(specs))]
    if ctx.rank == 0:
        with open(out, "w") as f:
            json.dump(records, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
