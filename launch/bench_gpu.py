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
warm-up steps, leaving out the step after a checkpoint): samples/s, tokens/s, achieved TFLOP/s
(6 x forward MACs per sample), MFU against the device's dense bf16 peak (`PEAK_BF16_TFLOPS`,
or --peak-tflops), the data-wait share of step time, and the peak memory
(torch.cuda.max_memory_allocated at the end of the training loop) against `dit plan`'s
prediction for that layout. The last line is `gpu check: OK` or `gpu check: FAILED: <what>`
(exit 1). `--tiny` runs the same path at tiny scale on the CPU (the test suite does).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

GB = 1e9
# Dense (no sparsity) bf16 peak per GPU, TFLOP/s, from NVIDIA's datasheets; matched in order as
# a case-insensitive substring of torch.cuda.get_device_name(), so specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250.0),
    ("A100", 312.0),
)
MFU_GOAL = 0.40  # DiT-XL/2 bf16 on H100/H200: a benchmark goal, not a pass/fail criterion
MEM_FRACTION = 0.6  # batch sizes are chosen so that dit plan's prediction uses at most this much
RUN_NAMES = ("image", "video", "video_resumed")
KEYS_FILE = Path("logs") / "keys" / "rank_00000.jsonl"


def peak_tflops_for(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a device from its name, or None when it is not in the table."""
    name = device_name.lower()
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern.lower() in name:
            return tflops
    return None


# ---------------------------------------------------------------------------------------------
# What is trained.


@dataclass(frozen=True)
class RunSpec:
    """One training run of the check."""

    name: str  # image | video | video_resumed
    preset: str
    latent: int  # latent side (the DiT's input is latent x latent x channels [x frames])
    frames: int  # 0: images
    batch: int
    steps: int
    checkpoint_every: int
    log_every: int = 1  # the resume check compares per-step losses; > 1 saves host syncs
    channels: int = 4

    @property
    def video(self) -> bool:
        return self.frames > 0

    def shape(self) -> tuple[int, ...]:
        c, s = self.channels, self.latent
        return (c, self.frames, s, s) if self.video else (c, s, s)

    def describe(self) -> str:
        pixels = f" ({self.latent * 8} px)" if not self.video else ""
        what = "x".join(str(d) for d in ((self.frames,) if self.video else ()) + (self.latent, self.latent, self.channels))
        return f"{self.preset}{' video' if self.video else ''} on {what} latents{pixels}"


def run_overrides(spec: RunSpec, shards: Path, run_dir: Path, precision: str, workers: int,
                  prompt: str) -> list[str]:
    """Dotted overrides of the run (on top of the defaults of `trainer.config`)."""
    overrides = [
        f"run.name=gpu_check_{spec.name}", f"run.out_dir={run_dir}", "run.seed=0",
        f"data.shards={shards}", f"data.kind={'video' if spec.video else 'image'}",
        f"data.resolution={spec.latent}", f"data.batch_size={spec.batch}", f"data.num_workers={workers}",
        f"model.preset={spec.preset}", f"model.in_channels={spec.channels}", "model.autoencoder.kind=none",
        f"model.video={str(spec.video).lower()}",
        "deepspeed.zero_stage=2", f"deepspeed.precision={precision}",
        "stage.kind=pretrain", f"stage.steps={spec.steps}",
        "optim.lr=1e-4", "optim.warmup_steps=2", "ema.decay=0.999",
        f"checkpoint.every={spec.checkpoint_every}", "checkpoint.keep=2",
        f"log.every={spec.log_every}", "log.tensorboard=false", "log.sample_steps=2", f"log.prompts=[{json.dumps(prompt)}]",
        f"log.sample_keys={str(spec.video).lower()}",
    ]
    if spec.video:
        overrides.append(f"data.num_frames={spec.frames}")
    return overrides


def build_config(spec: RunSpec, shards: Path, run_dir: Path, precision: str, workers: int, prompt: str):
    from trainer.config import load_config

    return load_config(None, run_overrides(spec, shards, run_dir, precision, workers, prompt))


# ---------------------------------------------------------------------------------------------
# Data: synthetic latent shards, written as `dit data precompute` writes them.


def caption_pool(n: int, video: bool, seed: int = 0) -> list[str]:
    import numpy as np

    from data_pipeline.synth import caption, sample_attributes

    return [caption(sample_attributes(np.random.default_rng([seed, i]), video=video)) for i in range(n)]


def latent_samples(num: int, shape: Sequence[int], captions: list[str], seed: int = 0):
    """Samples {key, txt, json, safetensors{latent}} with unit-variance latents (as a scaled
    VAE's), deterministic in (seed, index)."""
    import safetensors.torch
    import torch

    for i in range(num):
        latent = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
        key, text = f"{i:09d}", captions[i % len(captions)]
        yield {"__key__": key, "txt": text.encode(),
               "json": json.dumps({"key": key, "caption": text, "source": "dit bench gpu"}).encode(),
               "safetensors": safetensors.torch.save({"latent": latent})}


def write_latent_shards(out_dir: Path, spec: RunSpec, captions: list[str], shards: int = 8) -> int:
    """One epoch's worth of samples for the run (no epoch boundary inside the measurement)."""
    from data_pipeline.write import write_shards

    num = spec.batch * (spec.steps + 2)
    write_shards(latent_samples(num, spec.shape(), captions), str(out_dir), math.ceil(num / shards),
                 prefix="latent", created_by="dit bench gpu", progress=False)
    return num


# ---------------------------------------------------------------------------------------------
# Memory: dit plan's prediction for the layout that runs (ZeRO-2, no pipeline, one GPU).


@dataclass(frozen=True)
class MemoryPlan:
    plan_bytes: float  # dit plan's total for the layout
    ema_bytes: float  # the fp32 EMA shadow on the device, which dit plan does not count
    params: int

    @property
    def predicted(self) -> float:
        return self.plan_bytes + self.ema_bytes


def predict_memory(cfg, device_mem_gb: float, cpu: bool) -> MemoryPlan:
    from launch.plan import Hardware, Layout, plan

    hw = Hardware(gpus=1, gpu_mem_gb=device_mem_gb, cpu=cpu)
    layout = Layout(cfg.deepspeed.zero_stage, 1, cfg.model.activation_checkpointing or cfg.model.checkpoint_policy == "full")
    facts, estimates = plan(cfg, hw)
    chosen = next(e for e in estimates if e.layout == layout)
    ema = 4.0 * facts.params if cfg.ema.enabled else 0.0
    return MemoryPlan(chosen.total, ema, facts.params)


def choose_batch(make_cfg, cap: int, device_mem_gb: float, cpu: bool) -> int:
    """The largest power of two <= cap whose predicted memory fits MEM_FRACTION of the device."""
    batch = cap
    while batch > 1:
        if predict_memory(make_cfg(batch), device_mem_gb, cpu).predicted <= MEM_FRACTION * device_mem_gb * GB:
            break
        batch //= 2
    return batch


# ---------------------------------------------------------------------------------------------
# Throughput from the trainer's metrics.jsonl.


@dataclass(frozen=True)
class Throughput:
    steps: int  # steady-state steps the figures come from
    samples_per_s: float
    tokens_per_s: float
    tflops: float
    data_wait: float  # share of step time spent waiting for the loader


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady_throughput(records: list[dict], warmup: int, exclude: Sequence[int] = ()) -> Optional[Throughput]:
    """Aggregate the metrics records whose window starts after `warmup` steps, leaving out the
    windows that hold a step of `exclude` (the step after a checkpoint: its window holds the
    save). Rates are total work over total time, not a mean of rates."""
    rows, last = [], 0
    for r in sorted((r for r in records if "samples_per_s" in r), key=lambda r: r["step"]):
        first, last = last + 1, r["step"]  # the record covers steps first..last
        if first > warmup and not any(first <= s <= last for s in exclude) and r["samples_per_s"] > 0:
            rows.append((last - first + 1, r))
    if not rows:
        return None
    # A window of n steps took n x (samples per step) / (samples/s) seconds; the samples per step
    # are the same in every window, so they cancel out of the ratios below.
    times = [n / r["samples_per_s"] for n, r in rows]
    total = sum(times)
    steps = sum(n for n, _ in rows)

    def weighted(key: str) -> float:
        return sum(r[key] * t for (_, r), t in zip(rows, times)) / total

    return Throughput(steps, steps / total, weighted("tokens_per_s"), weighted("tflops"), weighted("data_wait"))


def losses(records: list[dict]) -> dict[int, float]:
    """step -> loss (the last record of a step counts)."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# ---------------------------------------------------------------------------------------------
# The resume check.


def compare_trees(a: Any, b: Any, name: str = "", limit: int = 5) -> list[str]:
    """Differences between two nested states (dicts, lists, tensors, numbers), tensors bit for
    bit: an empty list when they are identical."""
    import torch

    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if len(out) >= limit:
            return
        where = path or "top level"
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                out.append(f"{where}: tensor vs {type(y if isinstance(x, torch.Tensor) else x).__name__}")
            elif x.shape != y.shape or x.dtype != y.dtype:
                out.append(f"{where}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            elif not torch.equal(x, y):
                diff = (x.double() - y.double()).abs()
                finite = diff[torch.isfinite(diff)]
                worst = float(finite.max()) if finite.numel() else float("nan")
                out.append(f"{where}: {int((x != y).sum())} of {x.numel()} values differ (max |diff| {worst:.3g})")
        elif isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                out.append(f"{where}: keys differ ({sorted(map(str, x.keys() ^ y.keys()))[:5]})")
            for k in sorted(x.keys() & y.keys(), key=str):
                walk(x[k], y[k], f"{path}.{k}" if path else str(k))
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if len(x) != len(y):
                out.append(f"{where}: {len(x)} vs {len(y)} entries")
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif type(x) is type(y) and hasattr(x, "__dict__") and not isinstance(x, type):
            walk(vars(x), vars(y), path)  # DeepSpeed's plain state objects (loss scaler, ...)
        elif x != y and not (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)):
            out.append(f"{where}: {x!r} vs {y!r}")

    walk(a, b, name)
    return out


def load_checkpoint_file(path: Path) -> Any:
    """A checkpoint file's content: safetensors and JSON directly, DeepSpeed's torch.save files
    through the trainer's weights-only loader (no pickle code runs)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".pt":
        from trainer.checkpoint import safe_checkpoint_engine

        return safe_checkpoint_engine().load(str(path), map_location="cpu")
    return path.read_bytes()  # DeepSpeed's helper scripts (zero_to_fp32.py): compared as bytes


def compare_checkpoints(ref: Path, other: Path) -> list[str]:
    """Every state file of two checkpoint directories, compared by content. Left out:
    config.yaml (it names each run's own folders) and COMPLETE.json (digests of the same)."""
    skip = {"config.yaml", "COMPLETE.json"}
    names = sorted(str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file() and p.name not in skip)
    other_names = sorted(str(p.relative_to(other)) for p in other.rglob("*") if p.is_file() and p.name not in skip)
    if names != other_names:
        return [f"files differ: {sorted(set(names) ^ set(other_names))}"]
    problems: list[str] = []
    for rel in names:
        problems += compare_trees(load_checkpoint_file(ref / rel), load_checkpoint_file(other / rel), rel)
    return problems


def step_keys(run_dir: Path) -> dict[int, list[str]]:
    return {r["step"]: r["keys"] for r in read_jsonl(run_dir / KEYS_FILE)}


@dataclass
class ResumeResult:
    problems: list[str]
    compared_steps: int

    @property
    def ok(self) -> bool:
        return not self.problems


def resume_check(ref_dir: Path, resumed_dir: Path, from_step: int, to_step: int) -> ResumeResult:
    """The resumed run (from `from_step`) against the uninterrupted one: the sample keys and the
    loss of every redone step, and the final checkpoints, all bit-identical."""
    from trainer.checkpoint import step_name

    problems: list[str] = []
    redone = range(from_step + 1, to_step + 1)
    ref_losses, new_losses = losses(read_jsonl(ref_dir / "logs" / "metrics.jsonl")), \
        losses(read_jsonl(resumed_dir / "logs" / "metrics.jsonl"))
    ref_keys, new_keys = step_keys(ref_dir), step_keys(resumed_dir)
    for step in redone:
        if step not in ref_losses or step not in new_losses:
            problems.append(f"no loss logged for step {step}")
        elif ref_losses[step] != new_losses[step]:
            problems.append(f"loss of step {step}: {ref_losses[step]!r} uninterrupted vs {new_losses[step]!r} resumed")
        if ref_keys.get(step) != new_keys.get(step):
            problems.append(f"sample keys of step {step} differ")
    ref_ckpt = ref_dir / "checkpoints" / step_name(to_step)
    new_ckpt = resumed_dir / "checkpoints" / step_name(to_step)
    if not ref_ckpt.is_dir() or not new_ckpt.is_dir():
        problems.append(f"missing final checkpoint {ref_ckpt if not ref_ckpt.is_dir() else new_ckpt}")
    else:
        problems += [f"step {to_step} checkpoint: {p}" for p in compare_checkpoints(ref_ckpt, new_ckpt)]
    return ResumeResult(problems, len(redone))


def seed_resume_dir(ref_dir: Path, resumed_dir: Path, step: int) -> None:
    """A fresh run folder whose checkpoint root holds (hard links to) the reference run's
    checkpoint of `step` and a `latest` pointer to it: the resumed run starts from there."""
    from trainer.checkpoint import LATEST, step_name

    src = ref_dir / "checkpoints" / step_name(step)
    root = resumed_dir / "checkpoints"
    root.mkdir(parents=True)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, root / src.name, copy_function=link)
    (root / LATEST).write_text(src.name)


# ---------------------------------------------------------------------------------------------
# Running one training job in a child process.


@dataclass
class ChildResult:
    exit_code: int
    report: dict = field(default_factory=dict)
    log: Path = Path()
    seconds: float = 0.0

    def tail(self, lines: int = 25) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])


def child_env(device: str, deterministic: bool) -> dict[str, str]:
    from launch.job import free_port

    env = dict(os.environ)
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if deterministic:  # cuBLAS is deterministic only with a fixed workspace (torch refuses otherwise)
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    if device == "cpu":
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")  # gloo: the trainer picks NCCL when it sees CUDA
    else:
        env["DS_ACCELERATOR"] = "cuda"
    return env


def run_child(cfg, run_dir: Path, device: str, deterministic: bool, timeout_s: float) -> ChildResult:
    """`python -m launch.bench_gpu --child CONFIG REPORT`: one `Trainer` run as rank 0 of 1."""
    from trainer.config import to_yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    config, report, log = run_dir / "config.yaml", run_dir / "bench_report.json", run_dir / "bench.log"
    config.write_text(to_yaml(cfg))
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "launch.bench_gpu", "--child", str(config), str(report)]
    if deterministic:
        cmd.append("--deterministic")
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1],
                                  env=child_env(device, deterministic), stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = 124
    data = json.loads(report.read_text()) if report.is_file() else {}
    return ChildResult(code, data, log, time.perf_counter() - start)


def child_main(config: str, report: str, deterministic: bool) -> int:
    """Rank 0 of a world of one: the real Trainer on `config`; writes the peak device memory of
    the training loop (before the end-of-run sample grid, which builds a second model) and the
    process-group backend to `report`."""
    import torch
    import torch.distributed as dist

    from data_pipeline.errors import DataError
    from trainer.config import load_config
    from trainer.engine import EXIT_DATA, Trainer

    cfg = load_config(config)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        # Deterministic mode would also fill every torch.empty with NaN; that is a debugging aid,
        # not part of determinism, and it would make these runs differ from real ones.
        torch.utils.deterministic.fill_uninitialized_memory = False
    cuda = torch.cuda.is_available()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu"}
    try:
        trainer = Trainer(cfg)
    except DataError as e:
        print(f"dit train: {e}", file=sys.stderr, flush=True)
        return EXIT_DATA
    result["backend"] = dist.get_backend() if dist.is_initialized() else "none"
    sample_grid = trainer.write_samples

    def measured_write_samples():
        # Workaround: the trainer records no peak memory; the end of the loop is the last moment
        # that is all training (write_samples builds the sampling copy of the model).
        if cuda and "peak_bytes" not in result:
            torch.cuda.synchronize()
            result["peak_bytes"] = torch.cuda.max_memory_allocated()
        return sample_grid()

    trainer.write_samples = measured_write_samples
    code = trainer.run()
    if cuda and "peak_bytes" not in result:  # the loop ended without drawing samples
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    result["exit"] = code
    Path(report).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


# ---------------------------------------------------------------------------------------------
# The check.


@dataclass
class Figures:
    spec: RunSpec
    throughput: Optional[Throughput]
    memory: MemoryPlan
    peak_bytes: Optional[int]
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


def choose_specs(args: argparse.Namespace, build, device_mem_gb: float, cpu: bool) -> tuple[RunSpec, RunSpec]:
    """The image and video runs; a batch not given is the largest that dit plan fits."""
    latent = args.resolution // 8
    runs = []
    for spec, given, cap in (
        (RunSpec("image", args.preset, latent, 0, 0, args.steps, args.steps, log_every=max(1, args.steps // 8)),
         args.batch_size, args.max_batch),
        (RunSpec("video", args.video_preset, latent, args.frames, 0, args.video_steps, args.video_steps // 2),
         args.video_batch_size, args.max_video_batch),
    ):
        batch = given or choose_batch(lambda b, spec=spec: build(replace(spec, batch=b)), cap, device_mem_gb, cpu)
        runs.append(replace(spec, batch=batch))
    return runs[0], runs[1]


def train_and_measure(spec: RunSpec, cfg, run_dir: Path, args: argparse.Namespace, device: str,
                      deterministic: bool, device_mem_gb: float, peak: Optional[float],
                      check: Check, exclude: Sequence[int] = ()) -> Optional[Figures]:
    label = f"{spec.name}: {spec.describe()}, {cfg.deepspeed.precision}, ZeRO-{cfg.deepspeed.zero_stage}, " \
            f"batch {spec.batch}, {spec.steps} steps" + (", deterministic kernels" if deterministic else "")
    print(f"\n{label}", flush=True)
    res = run_child(cfg, run_dir, device, deterministic, args.run_timeout)
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
    figures = Figures(spec, tp, memory, res.report.get("peak_bytes"), first,
                      loss_by_step.get(first, float("nan")), loss_by_step.get(spec.steps, float("nan")))
    print_figures(figures, peak, check)
    return figures


def print_figures(f: Figures, peak: Optional[float], check: Check) -> None:
    tp = f.throughput
    if tp is None:
        check.fail(f"{f.spec.name} run: no steady-state metrics records (raise --steps)")
        return
    print(f"  steady state over {tp.steps} steps: samples/s {tp.samples_per_s:.4g} | tokens/s {tp.tokens_per_s:.4g} | "
          f"TFLOP/s {tp.tflops:.4g} | data wait {tp.data_wait:.2%} (goal < 2%)", flush=True)
    if peak:
        mfu = tp.tflops / peak
        goal = f" (goal >= {MFU_GOAL:.0%} for DiT-XL/2 bf16 on H100/H200)" if f.spec.preset == "DiT-XL/2" else ""
        print(f"  MFU {mfu:.1%} of {peak:g} TFLOP/s{goal}", flush=True)
    m = f.memory
    plan = f"dit plan: {m.plan_bytes / GB:.2f} GB + EMA {m.ema_bytes / GB:.2f} GB (fp32 shadow, not in the plan) " \
           f"= {m.predicted / GB:.2f} GB"
    if f.peak_bytes is None:
        print(f"  peak memory: not measured on this device; {plan}", flush=True)
    else:
        ratio = f.peak_bytes / m.predicted
        print(f"  peak memory {f.peak_bytes / GB:.2f} GB (max_memory_allocated) vs {plan}: ratio {ratio:.2f}", flush=True)
        if ratio > 1 + check.mem_tolerance:
            check.fail(f"{f.spec.name} peak memory {f.peak_bytes / GB:.1f} GB exceeds dit plan's "
                       f"{m.predicted / GB:.1f} GB by more than {check.mem_tolerance:.0%}")
    print(f"  loss {f.first_loss:.4f} at step {f.first_step} -> {f.last_loss:.4f} at step {f.spec.steps}", flush=True)


TINY_DEFAULTS = {"preset": "DiT-T/2", "video_preset": "DiT-T/2", "resolution": 64, "frames": 4, "steps": 8,
                 "video_steps": 6, "max_batch": 4, "max_video_batch": 2, "captions": 8}
DEFAULTS = {"preset": "DiT-XL/2", "video_preset": "DiT-B/2", "resolution": 256, "frames": 16, "steps": 40,
            "video_steps": 16, "max_batch": 64, "max_video_batch": 8, "captions": 64}


def resolve_device(args: argparse.Namespace) -> tuple[Optional[str], str]:
    """(device, "") or (None, why the check cannot run)."""
    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        return None, "--device cuda but torch.cuda.is_available() is false"
    if args.device is None and not cuda and not args.tiny:
        return None, ("no CUDA device (torch.cuda.is_available() is false); DiT-XL/2 would take hours on "
                      "the CPU: `dit bench gpu --tiny` runs the same check at tiny scale here")
    return args.device or ("cuda" if cuda else "cpu"), ""


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
    check = Check(args.mem_tolerance)
    name, mem_gb = device_facts(device)
    peak = args.peak_tflops or (peak_tflops_for(name) if device == "cuda" else None)
    out = Path(args.out).resolve()
    for sub in ("data", *RUN_NAMES):  # a fresh start: the trainer would resume from old checkpoints
        shutil.rmtree(out / sub, ignore_errors=True)
    workers = args.workers if args.workers is not None else (2 if device == "cuda" else 0)
    source = "--peak-tflops" if args.peak_tflops else "table"
    print(f"dit bench gpu: {name} ({mem_gb:.0f} GB), "
          + (f"bf16 dense peak {peak:g} TFLOP/s ({source})" if peak else "bf16 peak unknown")
          + f"; {args.precision}; out {out}", flush=True)
    if peak is None:
        print(f"  MFU is left out: '{name}' is not in the peak table "
              f"({', '.join(p for p, _ in PEAK_BF16_TFLOPS)}); pass --peak-tflops", flush=True)
    captions = {video: caption_pool(args.captions, video) for video in (False, True)}

    def build(spec: RunSpec, run_dir: Optional[Path] = None):
        return build_config(spec, out / "data" / spec.name, run_dir or out / spec.name, args.precision, workers,
                            captions[spec.video][0])

    image, video = choose_specs(args, build, mem_gb, device == "cpu")
    for spec in (image, video):
        n = write_latent_shards(out / "data" / spec.name, spec, captions[spec.video])
        print(f"wrote {n} synthetic {'x'.join(map(str, spec.shape()))} latents to {out / 'data' / spec.name} "
              f"({args.captions} distinct captions)", flush=True)
    train_and_measure(image, build(image), out / "image", args, device, False, mem_gb, peak, check)
    c = video.checkpoint_every
    if train_and_measure(video, build(video), out / "video", args, device, True, mem_gb, peak, check,
                         exclude=(c + 1,)) is not None:
        check_resume(video, out / "video", out / "video_resumed", build(video, out / "video_resumed"), device,
                     args.run_timeout, check)
    if check.problems:
        print(f"\ngpu check: FAILED: {'; '.join(check.problems)}", flush=True)
        return 1
    if not args.keep_checkpoints:
        for sub in RUN_NAMES:
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
                   help="video steps (default 16); the resume check saves at half of them")
    p.add_argument("--video-batch-size", type=int, default=None, help="video micro-batch (default: automatic)")
    p.add_argument("--max-video-batch", type=int, default=None, help="upper bound of the automatic video batch (8)")
    p.add_argument("--captions", type=int, default=None, help="distinct captions in the synthetic data (64)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default 2 on cuda, 0 on cpu)")
    p.add_argument("--mem-tolerance", type=float, default=0.5,
                   help="fail when peak memory exceeds dit plan's prediction by more than this fraction")
    p.add_argument("--run-timeout", type=float, default=900, help="seconds allowed per training run")
    p.add_argument("--out", default="runs/gpu_check", help="folder for the data, runs, logs and metrics")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the runs' checkpoints (removed after a passing check: DiT-XL/2's is ~12 GB)")


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    help_ = "one-command GPU check: DiT-XL/2 + video DiT in bf16 on ZeRO-2: throughput, MFU, memory, exact resume"
    p = bench_subparsers.add_parser("gpu", help=help_, description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2], sys.argv[3], "--deterministic" in sys.argv[4:]))
    parser = argparse.ArgumentParser(prog="python -m launch.bench_gpu")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
