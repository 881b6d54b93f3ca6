"""`dit bench sequence`: peak memory per rank of one training step of a long clip, the whole
sequence on one rank (S = 1) against the sequence split over S ranks (DeepSpeed-Ulysses, S = 2
by default), on CPU over gloo:

    peak activations per rank, S=2 / S=1 = R        (Ulysses: about 1 / S plus what stays whole)

One forward + backward of the same DiT on the same clip, with the block checkpointing policy of
`--policy`; the losses must agree within LOSS_RTOL (else exit 1: the split computes something
else). Memory is what torch's `MemTracker` counts for the step: every tensor the step allocates,
by kind (activations: kept for backward; temporaries; gradients), the peak of each over the step
(`KindPeaks`), and the peak of their sum.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from trainer.config import ModelConfig
from trainer.models.dit import DiT, TextEmbedding, build_dit, dit_preset
from trainer.parallel import apply_checkpointing

TEXT_DIM, TEXT_LEN = 64, 16
MIB = 2**20
LOSS_RTOL = 1e-4  # S=1 and S=2 in fp32: the same sums in another order, ~1e-7 apart


@dataclass(frozen=True)
class Clip:
    preset: str
    depth: int
    attention: str
    policy: str
    frames: int
    size: int
    channels: int

    def model(self) -> DiT:
        torch.manual_seed(0)
        preset = replace(dit_preset(self.preset), depth=self.depth)
        cfg = ModelConfig(preset=self.preset, in_channels=self.channels, video=True, attention=self.attention,
                          positions="rope")
        net = apply_checkpointing(build_dit(cfg, TEXT_DIM, TEXT_DIM, preset=preset), self.policy)
        with torch.no_grad():  # off the zero init, so every branch computes
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return net

    def tokens(self) -> int:
        patch = dit_preset(self.preset).patch
        return self.frames * (self.size // patch) ** 2

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, TextEmbedding]:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(1, self.channels, self.frames, self.size, self.size, generator=gen)  # (1, C, F, H, W)
        text = TextEmbedding(torch.randn(1, TEXT_LEN, TEXT_DIM, generator=gen), torch.ones(1, TEXT_LEN, dtype=torch.bool),
                             torch.randn(1, TEXT_DIM, generator=gen))
        return x, torch.full((1,), 0.5), text


def kind_peaks():
    """A MemTracker that also keeps the peak of each kind (Activation, Temp, Gradient, ...) by
    device, updated after every operator as its own peak is. Its "peak" snapshot is the whole
    breakdown at the moment the total peaked (in backward, when most activations were already
    freed: a 4x8x8 clip held 2.1 MiB of activations after the forward and that snapshot 0.01)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class KindPeaks(MemTracker):
        def __init__(self) -> None:
            super().__init__()
            self.kind_peaks: dict[torch.device, dict[str, int]] = {}

        def _update_peak_stats(self, peak_state) -> None:
            super()._update_peak_stats(peak_state)
            for dev, snap in self._curr_mem_snap.items():
                peaks = self.kind_peaks.setdefault(dev, {})
                for kind, n in snap.items():
                    key = getattr(kind, "value", kind)
                    peaks[key] = max(peaks.get(key, 0), n)

    return KindPeaks()


def measure(net: DiT, clip: Clip) -> dict[str, float]:
    """Loss and MiB of one forward + backward (parameters excluded): the peak of each kind over
    the step, and the peak of the step's total."""
    x, t, text = clip.inputs()
    tracker = kind_peaks()
    tracker.track_external(net)
    with tracker:
        loss = net(x, t, text).square().mean()
        loss.backward()
    peak = tracker.kind_peaks[x.device]
    at_total = {getattr(k, "value", k): v for k, v in tracker.get_tracker_snapshot("peak")[x.device].items()}
    return {"loss": float(loss.detach()), "activations_mib": peak["Activation"] / MIB, "temporaries_mib": peak["Temp"] / MIB,
            "gradients_mib": peak["Gradient"] / MIB, "total_mib": (at_total["Total"] - at_total["Parameter"]) / MIB}


def losses_agree(whole: float, split: float) -> bool:
    return abs(split - whole) <= LOSS_RTOL * abs(whole)


def split_rank(rank: int, size: int, port: int, clip: Clip, out: str) -> None:
    """One rank of the sequence group (torch.multiprocessing.spawn target)."""
    import deepspeed
    import torch.distributed as dist

    from trainer.sequence_parallel import parallelize_sequence

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(size))
    deepspeed.init_distributed(dist_backend="gloo")  # its all-to-all goes through deepspeed.comm
    try:
        net = clip.model()
        parallelize_sequence(net, dist.group.WORLD)
        result = measure(net, clip)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def bench_sequence(args: argparse.Namespace) -> int:
    import torch.multiprocessing as mp

    from launch.job import free_port

    clip = Clip(args.preset, args.depth, args.attention, args.policy, args.frames, args.size, args.channels)
    heads = dit_preset(args.preset).heads
    if heads % args.ranks or clip.tokens() % args.ranks:
        print(f"dit bench sequence: --ranks {args.ranks} must divide the {heads} heads and {clip.tokens()} tokens")
        return 2
    print(f"{args.preset} depth {args.depth}, {args.attention} attention, checkpointing {args.policy}: "
          f"a clip of {args.frames} x {args.size} x {args.size} latents = {clip.tokens()} tokens; CPU, gloo")
    whole = measure(clip.model(), clip)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(split_rank, args=(args.ranks, free_port(), clip, out), nprocs=args.ranks, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.ranks)]
    split = max(ranks, key=lambda r: r["activations_mib"])
    print(f"{'per rank':<10}" + "".join(f"{k[:-4]:>14}" for k in whole if k.endswith("_mib")) + "   (peak MiB)")
    for name, row in (("S=1", whole), (f"S={args.ranks}", split)):
        print(f"{name:<10}" + "".join(f"{v:14.1f}" for k, v in row.items() if k.endswith("_mib")))
    ratio = split["activations_mib"] / whole["activations_mib"]
    total = split["total_mib"] / whole["total_mib"]
    print(f"peak activations per rank, S={args.ranks} / S=1 = {ratio:.3f}   (all step memory: {total:.3f})")
    worst = max((r["loss"] for r in ranks), key=lambda v: abs(v - whole["loss"]))
    agree = all(losses_agree(whole["loss"], r["loss"]) for r in ranks)
    verdict = "agree" if agree else "DIFFER: the split does not compute the same step"
    print(f"loss S=1 {whole['loss']:.7g}, S={args.ranks} {worst:.7g} (must agree within {LOSS_RTOL:g} relative): "
          f"{verdict}")
    return 0 if agree else 1
