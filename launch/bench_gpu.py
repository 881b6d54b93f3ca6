"""`dit bench gpu` (and `make gpu-check`): the one-command check of the accelerator path.

On one GPU, in a few minutes, through the real trainer (`trainer.engine.Trainer`, the same
object `dit train` runs), world size 1 over NCCL, DeepSpeed ZeRO-2, bf16:

1. image: DiT-XL/2 at 256 px, i.e. on precomputed 32x32x4 latents (no autoencoder is built:
   `model.autoencoder.kind=none`, `data.resolution` is the latent side), a few dozen steps;
2. video: a small video DiT (DiT-B/2, factorized space-time attention) on 16x32x32x4 latents,
   with a checkpoint half-way;
3. resume: a second video run resumes from that checkpoint and runs to the same last step; the
   sample keys and losses of every redone step and the final checkpoint (weights, Adam states,
   EMA, data position, RNG) must be bit-identical to the uninterrupted run. Both video runs use
   `torch.use_deterministic_algorithms(True)` (flash attention's backward is otherwise
   non-deterministic on GPU), so their throughput is marked as measured with deterministic kernels.

The data are synthetic latent shards written with the data pipeline's own shard writer, in the
layout `dit data precompute` produces (a `safetensors` member holding `latent`), captioned from
a small pool of synthetic-shapes captions (the text encoder's per-caption cache is warm after
the first steps, so the figures are the DiT's). Each training run is a child process (fresh
CUDA memory statistics, its own process group); its log and resolved config sit in its folder.

Printed per run, from the steady-state records of the trainer's own `metrics.jsonl` (after the
warm-up steps, leaving out the step after each checkpoint; the video runs log, and so wait for
the device, every step, for the resume check): samples/s, tokens/s, achieved TFLOP/s
(6 x forward MACs per sample), MFU against the device's dense bf16 peak (`PEAK_BF16_TFLOPS`,
or --peak-tflops), the data-wait share of step time, and the peak memory
(torch.cuda.max_memory_allocated at the end of the training loop) against `dit plan`'s
prediction for that layout. The last line is `gpu check: OK` or `gpu check: FAILED: <what>`
(exit 1). `--tiny` runs the same path at tiny scale on the CPU (the test suite does).
`--profile` runs the image run's last steps under torch.profiler and prints how busy the host
keeps the device (on one H200, DiT-XL/2: the GPU waited ~110 ms of a 350 ms step for DeepSpeed's
per-parameter host work; README, "GPU check"). `--layouts plain,compile,...` repeats the image
run once per block layout (`LAYOUTS`) and prints them side by side against the first.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from launch.bench_gpu_figures import (GB, MEM_FRACTION, PEAK_BF16_TFLOPS, MemoryPlan, Throughput, choose_batch,
                                      is_mig_slice, losses, peak_tflops_for, predict_memory, read_jsonl,
                                      steady_throughput)
from launch.bench_gpu_resume import resume_check, seed_resume_dir
from launch.bench_gpu_runs import PROFILED_STEPS, RunSpec, build_config, caption_pool, run_child, write_latent_shards

MFU_GOAL = 0.40  # DiT-XL/2 bf16 on H100/H200: a benchmark goal, not a pass/fail criterion
RUN_NAMES = ("image", "video", "video_resumed")
# The video runs log every step (the resume check compares each step's loss), and a log step
# waits for the device (its skip flag, grad norm and a collective): their figures are not a
# free-running loop's as the image run's are (it logs every steps // 8; every step below 16)
DRAIN_NOTE = "logged every step: the figures include a device drain a step (the video runs' resume check compares " \
             "each step's loss)"
# How the DiT blocks run (README, "GPU check"): the model overrides of each layout
LAYOUTS = {
    "plain": (),
    "compile": ("model.compile=true",),
    "flat": ("model.flat_params=true",),
    "compile+flat": ("model.compile=true", "model.flat_params=true"),
}


# ---------------------------------------------------------------------------------------------
# The check.


@dataclass
class Figures:
    spec: RunSpec
    throughput: Optional[Throughput]
    memory: MemoryPlan
    peak_bytes: Optional[int]  # the training steps' (before the first checkpoint save)
    save_peak_bytes: Optional[int]  # with the checkpoint saves
    first_step: int  # the first logged step (the loss is averaged over its log window)
    first_loss: float
    last_loss: float


class Check:
    """Collects problems; each becomes part of the FAILED line."""

    def __init__(self, mem_tolerance: float) -> None:
        self.problems: list[str] = []
        self.mem_tolerance = mem_tolerance  # allowed excess of peak memory over dit plan's prediction

    def fail(self, what: str) -> None:
        self.problems.append(what)
        print(f"  FAILED: {what}", flush=True)


def device_facts(device: str) -> tuple[str, float]:
    """(name, memory in GB) of the device the runs use."""
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return props.name, props.total_memory / GB
    import psutil

    return "cpu", psutil.virtual_memory().total / GB


def why_no_peak(name: str) -> str:
    if is_mig_slice(name):
        return f"'{name}' is a MIG slice, with a fraction of the chip's SMs and of its peak"
    return f"'{name}' is not in the peak table ({', '.join(p for p, _ in PEAK_BF16_TFLOPS)})"


def choose_specs(args: argparse.Namespace, build, device_mem_gb: float, cpu: bool) -> tuple[RunSpec, RunSpec]:
    """The image and video runs; a batch not given is the largest that dit plan fits."""
    latent = args.resolution // 8
    runs = []
    for spec, given, cap in (
        (RunSpec("image", args.preset, latent, 0, 0, args.steps, args.steps, log_every=max(1, args.steps // 8)),
         args.batch_size, args.max_batch),
        (RunSpec("video", args.video_preset, latent, args.frames, 0, args.video_steps,
                 resume_step(args.video_steps)),
         args.video_batch_size, args.max_video_batch),
    ):
        batch = given or choose_batch(lambda b, spec=spec: build(replace(spec, batch=b)), cap, device_mem_gb, cpu)
        runs.append(replace(spec, batch=batch))
    return runs[0], runs[1]


def resume_step(steps: int) -> int:
    """The video run's checkpoint.every, the step the resume check starts from: half-way, rounded
    up. The trainer saves at each multiple of it and at the last step, and keeps the last
    checkpoint.keep (2) of them; with every < steps / 2 (7 steps: 3, 6, 7) the one to resume from
    was deleted before the check could use it."""
    return -(-steps // 2)


def post_save_steps(steps: int, every: int) -> tuple[int, ...]:
    """The steps right after each save but the last: their metrics windows hold the save, which
    the steady state leaves out."""
    return tuple(s + 1 for s in range(every, steps, every))


def train_and_measure(spec: RunSpec, cfg, run_dir: Path, args: argparse.Namespace, device: str,
                      deterministic: bool, device_mem_gb: float, peak: Optional[float],
                      check: Check, exclude: Sequence[int] = (), profile: bool = False,
                      layout: str = "plain") -> Optional[Figures]:
    label = f"{spec.name}: {spec.describe()}, {layout} blocks, {cfg.deepspeed.precision}, " \
            f"ZeRO-{cfg.deepspeed.zero_stage}, batch {spec.batch}, {spec.steps} steps" \
            + (", deterministic kernels" if deterministic else "")
    print(f"\n{label}", flush=True)
    res = run_child(cfg, run_dir, device, deterministic, time_left(args), profile)
    if profile:  # the profiler's overhead stays out of the steady state
        exclude = (*exclude, *range(spec.steps - PROFILED_STEPS + 1, spec.steps + 1))
    backend = res.report.get("backend", "?")
    print(f"  world size 1 over {backend}, {res.seconds:.0f} s wall (start-up, steps, checkpoint, samples); "
          f"log {res.log}", flush=True)
    if res.exit_code != 0:
        print(res.tail(), flush=True)
        check.fail(f"{spec.name} run exited with {res.exit_code}" + (" (timed out)" if res.exit_code == 124 else "")
                   + f", see {res.log}")
        return None
    if device == "cuda" and backend != "nccl":
        check.fail(f"{spec.name} run used the {backend} backend, not nccl")
    records = read_jsonl(run_dir / "logs" / "metrics.jsonl")
    loss_by_step = losses(records)
    if len(loss_by_step) < spec.steps // spec.log_every:
        check.fail(f"{spec.name} run logged {len(loss_by_step)} of {spec.steps // spec.log_every} losses")
    bad = [s for s, v in loss_by_step.items() if not math.isfinite(v)]
    skipped = max((r.get("skipped_steps", 0) for r in records), default=0)
    if bad or skipped:
        check.fail(f"{spec.name} run had non-finite losses (steps {bad[:5]}) or {int(skipped)} skipped steps")
    warmup = max(2, spec.steps // 4)
    tp = steady_throughput(records, warmup, exclude)
    memory = predict_memory(cfg, device_mem_gb, device == "cpu")
    first = min(loss_by_step, default=0)
    figures = Figures(spec, tp, memory, res.report.get("peak_bytes"), res.report.get("save_peak_bytes"), first,
                      loss_by_step.get(first, float("nan")), loss_by_step.get(spec.steps, float("nan")))
    print_figures(figures, peak, check)
    if profile:
        print_profile(res.report.get("profile"), check)
    return figures


def print_profile(p: Optional[dict], check: Check) -> None:
    """The profiled steps: time a step and the device kernels' share of it (well under 100%:
    the accelerator waits for the host)."""
    if p is None:
        check.fail("the profiled run wrote no profile")
        return
    busy = f"device kernels {p['device_s'] / p['wall_s']:.0%} of it" if p["device_s"] else "no device kernels"
    print(f"  profile of the last {p['steps']} steps: {1000 * p['wall_s'] / p['steps']:.1f} ms a step, {busy}; "
          f"operators by device and host time: {p['file']}", flush=True)
    phases = p.get("phases_ms") or {}
    if phases:
        print("  a step by phase, host / device ms: "
              + ", ".join(f"{name} {host:.1f} / {device:.1f}" for name, (host, device) in phases.items()), flush=True)
    syncs = p.get("host_syncs")
    if syncs is not None:  # counted on CUDA only
        where = ", ".join(f"{site} x{n}" for site, n in sorted(syncs.items(), key=lambda kv: -kv[1])[:5])
        print(f"  host syncs in those steps: {sum(syncs.values())}" + (f" ({where})" if where else ""), flush=True)


def print_figures(f: Figures, peak: Optional[float], check: Check) -> None:
    tp = f.throughput
    if tp is None:
        check.fail(f"{f.spec.name} run: no steady-state metrics records (raise --steps)")
        return
    print(f"  steady state over {tp.steps} steps: samples/s {tp.samples_per_s:.4g} | tokens/s {tp.tokens_per_s:.4g} | "
          f"TFLOP/s {tp.tflops:.4g} | data wait {tp.data_wait:.2%} (goal < 2%)", flush=True)
    if f.spec.log_every == 1:
        print(f"  {DRAIN_NOTE}", flush=True)
    if peak:
        mfu = tp.tflops / peak
        goal = f" (goal >= {MFU_GOAL:.0%} for DiT-XL/2 bf16 on H100/H200)" if f.spec.preset == "DiT-XL/2" else ""
        print(f"  MFU {mfu:.1%} of {peak:g} TFLOP/s{goal}", flush=True)
    m = f.memory
    plan = f"dit plan's {m.predicted / GB:.2f} GB (the EMA's fp32 shadow included)"
    if f.peak_bytes is None:
        print(f"  peak memory: not measured on this device; {plan}", flush=True)
    else:
        ratio = f.peak_bytes / m.predicted
        print(f"  peak memory {f.peak_bytes / GB:.2f} GB (max_memory_allocated, the training steps) vs {plan}: "
              f"ratio {ratio:.2f}", flush=True)
        if f.save_peak_bytes is not None and f.save_peak_bytes > f.peak_bytes:
            print(f"  with its checkpoint saves {f.save_peak_bytes / GB:.2f} GB (whole tensors gathered on the device; "
                  f"dit plan predicts the training steps)", flush=True)
        if ratio > 1 + check.mem_tolerance:
            check.fail(f"{f.spec.name} peak memory {f.peak_bytes / GB:.1f} GB exceeds dit plan's "
                       f"{m.predicted / GB:.1f} GB by more than {check.mem_tolerance:.0%}")
    print(f"  loss {f.first_loss:.4f} at step {f.first_step} -> {f.last_loss:.4f} at step {f.spec.steps}", flush=True)


TINY_DEFAULTS = {"preset": "DiT-T/2", "video_preset": "DiT-T/2", "resolution": 64, "frames": 4, "steps": 8,
                 "video_steps": 6, "max_batch": 4, "max_video_batch": 2, "captions": 8}
DEFAULTS = {"preset": "DiT-XL/2", "video_preset": "DiT-B/2", "resolution": 256, "frames": 16, "steps": 40,
            "video_steps": 16, "max_batch": 64, "max_video_batch": 8, "captions": 64}


def layouts(args: argparse.Namespace) -> list[str]:
    """The block layouts of the image run, in order: `--layouts`, else the one `--compile` and
    `--flat-params` choose. ValueError names what is wrong."""
    if not args.layouts:
        chosen = ("model.compile=true",) * args.compile + ("model.flat_params=true",) * args.flat_params
        return [next(name for name, overrides in LAYOUTS.items() if overrides == chosen)]
    if args.compile or args.flat_params:
        raise ValueError("--layouts names every layout; drop --compile and --flat-params")
    names = list(dict.fromkeys(n.strip() for n in args.layouts.split(",") if n.strip()))
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown or not names:
        what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "none given"
        raise ValueError(f"--layouts {args.layouts!r}: {what}; choose from {', '.join(LAYOUTS)}")
    return names


def _further_layout_run(layout: str) -> str:
    return f"image_{layout.replace('+', '_')}"


def layout_dir(out: Path, index: int, layout: str) -> Path:
    """The image run's folder of the index-th layout: `image` for the first (the check's own)."""
    return out / ("image" if index == 0 else _further_layout_run(layout))


def run_folders() -> list[str]:
    """Every folder of `--out` a run of the check may use, whatever the layouts' order: removed
    when a check starts (the trainer would resume from their checkpoints)."""
    return [*RUN_NAMES, *map(_further_layout_run, LAYOUTS)]


def print_layouts(figures: dict[str, Optional[Figures]], peak: Optional[float]) -> None:
    """The image run's figures by layout, side by side, against the first layout's."""
    first, ref = next(iter(figures.items()))
    base = ref.throughput.samples_per_s if ref is not None and ref.throughput is not None else None
    print(f"\nimage run by block layout (this check: same model, batch, data and steps; against {first}):", flush=True)
    print(f"  {'layout':<14}{'samples/s':>11}{'ms a step':>11}{'TFLOP/s':>10}{'MFU':>8}{'speed-up':>10}"
          f"{'last loss':>11}", flush=True)
    for name, f in figures.items():
        tp = f.throughput if f is not None else None
        if tp is None:
            print(f"  {name:<14}{'failed':>11}", flush=True)
            continue
        mfu = f"{tp.tflops / peak:.1%}" if peak else "-"
        ratio = f"{tp.samples_per_s / base:.2f}x" if base else "-"
        print(f"  {name:<14}{tp.samples_per_s:>11.4g}{1000 * f.spec.batch / tp.samples_per_s:>11.1f}"
              f"{tp.tflops:>10.4g}{mfu:>8}{ratio:>10}{f.last_loss:>11.6f}", flush=True)


def driver_hint() -> str:
    """Where this machine has an NVIDIA GPU that torch cannot use: the CUDA torch was built for,
    whose driver is often the cause (a CUDA 13 build needs driver 580 or newer)."""
    import torch

    if not (Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi")):
        return ""
    return (f"; this machine has an NVIDIA driver, but torch {torch.__version__} (built for CUDA "
            f"{torch.version.cuda}) cannot use it: a driver older than that CUDA needs is the usual cause "
            f"(`nvidia-smi` shows the driver's version and the newest CUDA it supports)")


def resolve_device(args: argparse.Namespace) -> tuple[Optional[str], str]:
    """(device, "") or (None, why the check cannot run)."""
    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        return None, "--device cuda but torch.cuda.is_available() is false" + driver_hint()
    if args.device is None and not cuda and not args.tiny:
        return None, ("no CUDA device (torch.cuda.is_available() is false); DiT-XL/2 would take hours on "
                      "the CPU: `dit bench gpu --tiny` runs the same check at tiny scale here" + driver_hint())
    return args.device or ("cuda" if cuda else "cpu"), ""


def time_left(args: argparse.Namespace) -> float:
    """Seconds the next run may take: --run-timeout, within what is left of --budget (at least a
    minute: a run that cannot start in it fails as timed out)."""
    return max(60.0, min(args.run_timeout, args.deadline - time.perf_counter()))


def check_resume(video: RunSpec, ref_dir: Path, resumed_dir: Path, cfg, device: str, timeout_s: float,
                 check: Check) -> None:
    c = video.checkpoint_every
    print(f"\nresume: the video run again from its step-{c} checkpoint to step {video.steps}, deterministic kernels",
          flush=True)
    seed_resume_dir(ref_dir, resumed_dir, c)
    res = run_child(cfg, resumed_dir, device, True, timeout_s)
    if res.exit_code != 0:
        print(res.tail(), flush=True)
        check.fail(f"resumed video run exited with {res.exit_code}, see {res.log}")
        return
    result = resume_check(ref_dir, resumed_dir, c, video.steps)
    if result.ok:
        print(f"  resumed at step {c}: losses and sample keys of steps {c + 1}-{video.steps} identical to the "
              f"uninterrupted run; step-{video.steps} checkpoint (weights, Adam states, EMA, data position, RNG) "
              f"identical", flush=True)
        return
    for problem in result.problems[:10]:
        print(f"  {problem}", flush=True)
    check.fail(f"save + resume is not exact ({len(result.problems)} differences, first: {result.problems[0]})")


def run(args: argparse.Namespace) -> int:
    """The check; whatever goes wrong inside it (a missing checkpoint, a full disk) still ends
    in the `gpu check: FAILED` line and exit 1, which scripts and `make gpu-check` look for,
    after the traceback (on stderr) that says where."""
    try:
        return run_check(args)
    except Exception as e:  # noqa: BLE001 - reported, not swallowed: the traceback goes first
        traceback.print_exc()
        print(f"\ngpu check: FAILED: {type(e).__name__}: {e}", flush=True)
        return 1


def run_check(args: argparse.Namespace) -> int:
    args.deadline = time.perf_counter() + args.budget
    for name, value in {**DEFAULTS, **(TINY_DEFAULTS if args.tiny else {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    device, why = resolve_device(args)
    if device is None:
        print(f"gpu check: FAILED: {why}", flush=True)
        return 1
    if args.resolution % 64 or min(args.steps, args.video_steps) < 4:
        print("gpu check: FAILED: --resolution must be a multiple of 64 (latent side a multiple of 8) and "
              "--steps and --video-steps at least 4", flush=True)
        return 1
    try:
        names = layouts(args)
    except ValueError as e:
        print(f"gpu check: FAILED: {e}", flush=True)
        return 1
    check = Check(args.mem_tolerance)
    name, mem_gb = device_facts(device)
    peak = args.peak_tflops or (peak_tflops_for(name) if device == "cuda" else None)
    out = Path(args.out).resolve()
    runs = run_folders()
    for sub in ("data", *runs):  # a fresh start: the trainer would resume from old checkpoints
        shutil.rmtree(out / sub, ignore_errors=True)
    workers = args.workers if args.workers is not None else (2 if device == "cuda" else 0)
    source = "--peak-tflops" if args.peak_tflops else "table"
    print(f"dit bench gpu: {name} ({mem_gb:.0f} GB), "
          + (f"bf16 dense peak {peak:g} TFLOP/s ({source})" if peak else "bf16 peak unknown")
          + f"; {args.precision}; out {out}", flush=True)
    if peak is None:
        print(f"  MFU is left out: {why_no_peak(name)}; pass --peak-tflops", flush=True)
    captions = {video: caption_pool(args.captions, video) for video in (False, True)}

    # On the CPU too the optimizer a GPU steps with: torch's fused AdamW, its skip flag on the device
    optimizer = ("optim.fused=true",) if device == "cpu" else ()

    def build(spec: RunSpec, run_dir: Optional[Path] = None, layout: str = names[0]):
        return build_config(spec, out / "data" / spec.name, run_dir or out / spec.name, args.precision, workers,
                            captions[spec.video][0], (*LAYOUTS[layout], *optimizer))

    image, video = choose_specs(args, build, mem_gb, device == "cpu")
    for spec in (image, video):
        n = write_latent_shards(out / "data" / spec.name, spec, captions[spec.video])
        print(f"wrote {n} synthetic {'x'.join(map(str, spec.shape()))} latents to {out / 'data' / spec.name} "
              f"({args.captions} distinct captions)", flush=True)
    by_layout = {}
    for i, layout in enumerate(names):
        run_dir = layout_dir(out, i, layout)
        by_layout[layout] = train_and_measure(image, build(image, run_dir, layout), run_dir, args, device, False,
                                              mem_gb, peak, check, profile=args.profile, layout=layout)
        if not args.keep_checkpoints:  # ~14 GB each for DiT-XL/2, written and hashed: not kept on the disk
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if len(names) > 1:
        print_layouts(by_layout, peak)
    c = video.checkpoint_every
    if train_and_measure(video, build(video), out / "video", args, device, True, mem_gb, peak, check,
                         exclude=post_save_steps(video.steps, c), layout=names[0]) is not None:
        check_resume(video, out / "video", out / "video_resumed", build(video, out / "video_resumed"), device,
                     time_left(args), check)
    if check.problems:
        print(f"\ngpu check: FAILED: {'; '.join(check.problems)}", flush=True)
        return 1
    if not args.keep_checkpoints:
        for sub in runs:
            shutil.rmtree(out / sub / "checkpoints", ignore_errors=True)
    print("\ngpu check: OK", flush=True)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="where to train (default: cuda when available)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny presets and sizes (DiT-T/2, 8x8 latents, a few steps): the same path on a CPU")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak for MFU (default: from the table by device name)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="deepspeed.precision of the runs (default bf16)")
    p.add_argument("--preset", default=None, help="image DiT preset (default DiT-XL/2)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels; the latents are 1/8 of it (default 256: 32x32x4)")
    p.add_argument("--steps", type=int, default=None, help="image training steps (default 40)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="image micro-batch (default: the largest power of two up to --max-batch that dit plan "
                        f"fits in {MEM_FRACTION * 100:.0f}%% of the device)")
    p.add_argument("--max-batch", type=int, default=None, help="upper bound of the automatic image batch (64)")
    p.add_argument("--video-preset", default=None, help="video DiT preset (default DiT-B/2)")
    p.add_argument("--frames", type=int, default=None, help="latent frames of the video run (default 16)")
    p.add_argument("--video-steps", type=int, default=None,
                   help="video steps (default 16); the resume check saves at half of them (rounded up)")
    p.add_argument("--video-batch-size", type=int, default=None, help="video micro-batch (default: automatic)")
    p.add_argument("--max-video-batch", type=int, default=None, help="upper bound of the automatic video batch (8)")
    p.add_argument("--captions", type=int, default=None, help="distinct captions in the synthetic data (64)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default 2 on cuda, 0 on cpu)")
    p.add_argument("--mem-tolerance", type=float, default=0.5,
                   help="fail when peak memory exceeds dit plan's prediction by more than this fraction")
    p.add_argument("--run-timeout", type=float, default=600, help="seconds allowed per training run")
    p.add_argument("--budget", type=float, default=900,
                   help="seconds allowed for the whole check: a run gets --run-timeout within what is left; a "
                        "run out of time writes its threads' stacks into its log")
    p.add_argument("--out", default="runs/gpu_check", help="folder for the data, runs, logs and metrics")
    p.add_argument("--profile", action="store_true",
                   help=f"run the image run's last {PROFILED_STEPS} steps under torch.profiler: prints the device "
                        "kernels' share of the step, writes the operators by device and host time to profile.txt")
    p.add_argument("--compile", action="store_true",
                   help="model.compile=true in both runs: each DiT block under torch.compile (the first steps "
                        "compile; the steady-state figures leave them out)")
    p.add_argument("--flat-params", action="store_true",
                   help="model.flat_params=true in both runs: each DiT block's parameters as one tensor, "
                        "a fraction of DeepSpeed's per-tensor host work a step (combines with --compile)")
    p.add_argument("--layouts", default="",
                   help=f"the image run once per block layout, side by side, with the speed-up against the "
                        f"first (comma-separated: {', '.join(LAYOUTS)}); the video runs use the first; the "
                        f"image runs' checkpoints are removed once measured unless --keep-checkpoints")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the runs' checkpoints (removed once measured, the video runs' after a passing "
                        "check: DiT-XL/2's is ~14 GB without the universal files, which the image run leaves out)")


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    help_ = "one-command GPU check: DiT-XL/2 + video DiT in bf16 on ZeRO-2: throughput, MFU, memory, exact resume"
    p = bench_subparsers.add_parser("gpu", help=help_, description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m launch.bench_gpu")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
