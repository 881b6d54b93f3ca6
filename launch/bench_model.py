"""`dit bench model`: our DiT against diffusers' PixArt-alpha transformer, side by side.

Both models get the same width, depth, heads, patch, token count, cross-attention length,
device (`--device`, default: the accelerator if present, else cpu), precision (`--dtype`:
fp32, or bf16 autocast around both forwards with fp32 weights, as training runs) and thread
count; one forward + backward step of each is timed alternately (interleaved, so machine load
hits both alike) after warm-up, the device synchronized before each clock reading, and the
medians are compared:

    dit/pixart step time = R        (R < 1: ours is faster)

Then a table of the presets: parameters and forward GMACs, class-conditional as in the DiT
paper (Table 4) and text-conditioned (cross-attention to MiniLM tokens), with DiT-XL/2 checked
against the published 675M parameters / 118.6 GMACs at 256 px.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable, ContextManager

import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.models.dit import DiT, TextEmbedding, build_dit, dit_preset

# DiT paper, Table 4: (parameters, GFLOPs [fvcore's count, i.e. MACs]) at 256 px, 32x32x4 latent.
PUBLISHED = {"DiT-S/2": (33e6, 6.06e9), "DiT-B/2": (130e6, 23.01e9), "DiT-L/2": (458e6, 80.71e9), "DiT-XL/2": (675e6, 118.64e9)}
PARAM_TOLERANCE = 0.005
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class BenchShape:
    width: int
    depth: int
    heads: int
    patch: int
    latent: int
    channels: int
    text_len: int
    text_dim: int
    batch: int


def build_ours(s: BenchShape) -> DiT:
    """Our DiT in PixArt's configuration: sin-cos positions, no QK-norm, eps-style output."""
    preset = replace(dit_preset("DiT-S/2"), depth=s.depth, width=s.width, heads=s.heads, patch=s.patch)
    cfg = ModelConfig(in_channels=s.channels, qk_norm=False, positions="sincos")
    return build_dit(cfg, text_dim=s.text_dim, pooled_dim=s.text_dim, preset=preset)


def build_pixart(s: BenchShape) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=s.heads,
        attention_head_dim=s.width // s.heads,
        in_channels=s.channels,
        out_channels=s.channels,
        num_layers=s.depth,
        cross_attention_dim=s.width,
        sample_size=s.latent,
        patch_size=s.patch,
        caption_channels=s.text_dim,
        use_additional_conditions=False,
    )


def perturb_(model: nn.Module, seed: int) -> None:
    """Move zero-initialized weights off zero so no branch is trivially skipped or sparse."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def precision(device: torch.device, dtype: torch.dtype) -> Callable[[], ContextManager]:
    """The context of each forward: bf16/fp16 autocast on the device (fp32 weights), or none."""
    if dtype == torch.float32:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously), so a clock read after
    it times the work; nothing to wait for on the CPU."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def make_steps(s: BenchShape, device: torch.device = torch.device("cpu"),
               dtype: torch.dtype = torch.float32) -> tuple[dict[str, Callable[[], None]], dict[str, int]]:
    """One fwd+bwd closure per model on the same inputs, all on `device`, forwards in `dtype`
    (losses in fp32), and their parameter counts."""
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(s.batch, s.channels, s.latent, s.latent, generator=gen, device=device)  # (B, C, H, W)
    t = torch.rand(s.batch, generator=gen, device=device)  # (B,)
    tokens = torch.randn(s.batch, s.text_len, s.text_dim, generator=gen, device=device)  # (B, L, Dt)
    mask = torch.ones(s.batch, s.text_len, dtype=torch.bool, device=device)  # (B, L)
    mask[:, s.text_len * 2 // 3 :] = False  # realistic padding
    pooled = torch.randn(s.batch, s.text_dim, generator=gen, device=device)  # (B, Dt)
    ours, pixart = build_ours(s), build_pixart(s)
    perturb_(ours, 1)
    perturb_(pixart, 2)
    ours, pixart = ours.to(device), pixart.to(device)
    text = TextEmbedding(tokens, mask, pooled)
    autocast = precision(device, dtype)

    def step_ours() -> None:
        ours.zero_grad(set_to_none=True)
        with autocast():
            out = ours(x, t, text)
        out.float().square().mean().backward()

    def step_pixart() -> None:
        pixart.zero_grad(set_to_none=True)
        with autocast():
            out = pixart(
                x,
                encoder_hidden_states=tokens,
                timestep=t * 1000,
                encoder_attention_mask=mask.float(),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0]
        out.float().square().mean().backward()

    counts = {"dit": ours.count_parameters(), "pixart": sum(p.numel() for p in pixart.parameters())}
    return {"dit": step_ours, "pixart": step_pixart}, counts


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, reps: int,
                     device: torch.device = torch.device("cpu")) -> dict[str, list[float]]:
    """Seconds per step of each closure, alternating them rep by rep (order flipped each rep);
    the device is synchronized before each clock reading, so a step's queued kernels count."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps):
        order = list(steps) if rep % 2 == 0 else list(reversed(steps))
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def preset_rows(names: list[str], text_dim: int, text_len: int) -> list[tuple[str, int, float, int, float]]:
    """(name, class-cond params, class-cond GMACs, text-cond params, text-cond GMACs) at 256 px.

    Class-conditional: the paper's model (learned sigma, no QK-norm, no cross-attention; the
    label table is a Linear on one-hot labels, same size). Text-conditioned: our default model."""
    rows = []
    for name in names:
        paper = ModelConfig(preset=name, in_channels=4, learn_sigma=True, qk_norm=False)
        with torch.device("meta"):
            class_cond = build_dit(paper, text_dim=0, pooled_dim=1000)  # one-hot label = linear table
            text_cond = build_dit(ModelConfig(preset=name, in_channels=4), text_dim=text_dim, pooled_dim=text_dim)
        shape = (1, 4, 32, 32)
        rows.append(
            (
                name,
                class_cond.count_parameters(),
                class_cond.macs(shape, 0) / 1e9,
                text_cond.count_parameters(),
                text_cond.macs(shape, text_len) / 1e9,
            )
        )
    return rows


def print_presets(rows: list[tuple[str, int, float, int, float]], text_dim: int, text_len: int) -> bool:
    print(f"\npresets at 256 px (latent 32x32x4), forward MACs; text-cond: cross-attention to {text_len} tokens of width {text_dim}")
    print(f"{'preset':<10} {'params':>9} {'GMACs':>8} {'paper':>16} {'text params':>12} {'text GMACs':>11}")
    ok = True
    for name, params, gmacs, tparams, tgmacs in rows:
        paper = PUBLISHED.get(name)
        ref = f"{paper[0] / 1e6:.0f}M/{paper[1] / 1e9:.2f}" if paper else "-"
        print(f"{name:<10} {params / 1e6:>8.1f}M {gmacs:>8.2f} {ref:>16} {tparams / 1e6:>11.1f}M {tgmacs:>11.2f}")
        if name == "DiT-XL/2":
            rel_params = abs(params - paper[0]) / paper[0]
            rel_macs = abs(gmacs * 1e9 - paper[1]) / paper[1]
            ok = rel_params <= PARAM_TOLERANCE and rel_macs <= PARAM_TOLERANCE
            print(f"DiT-XL/2 vs published: params {rel_params:+.2%} off, GMACs {rel_macs:+.2%} off -> {'OK' if ok else 'MISMATCH'}")
    return ok


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = BenchShape(args.width, args.depth, args.heads, args.patch, args.latent, args.channels, args.text_len, args.text_dim, args.batch)
    tokens = (s.latent // s.patch) ** 2
    device, dtype = args.device, DTYPES[args.dtype]
    where = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    precision_note = "fp32" if dtype == torch.float32 else f"{args.dtype} autocast (fp32 weights)"
    print(
        f"dit bench model: width {s.width}, depth {s.depth}, heads {s.heads}, patch {s.patch}, "
        f"{tokens} tokens ({s.latent}x{s.latent}x{s.channels} latent), text {s.text_len}x{s.text_dim}, "
        f"batch {s.batch}, {precision_note}, {where}, median of {args.reps} interleaved fwd+bwd steps"
    )
    steps, counts = make_steps(s, device, dtype)
    times = time_interleaved(steps, args.warmup, args.reps, device)
    medians = {name: statistics.median(v) for name, v in times.items()}
    best = {name: min(v) for name, v in times.items()}
    macs = build_ours(s).macs((s.batch, s.channels, s.latent, s.latent), s.text_len)
    for name in ("dit", "pixart"):
        print(f"{name:<7} {counts[name] / 1e6:7.2f}M params  median {medians[name] * 1e3:8.1f} ms/step  best {best[name] * 1e3:8.1f}")
    print(f"dit fwd+bwd ~ {3 * macs * 2 / medians['dit'] / 1e9:.1f} GFLOP/s ({macs / 1e9:.2f} GMACs forward, x3 for fwd+bwd)")
    print(f"best-of ratio {best['dit'] / best['pixart']:.3f} (less sensitive to other load on the machine)")
    print(f"dit/pixart step time = {medians['dit'] / medians['pixart']:.3f}")
    if args.presets:
        ok = print_presets(preset_rows(args.presets, s.text_dim, s.text_len), s.text_dim, s.text_len)
        return 0 if ok else 1
    return 0
