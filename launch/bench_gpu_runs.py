"""The training runs of `dit bench gpu` (launch/bench_gpu.py): what is trained (a RunSpec and
its dotted overrides), its synthetic latent shards, and each run as a child process
(`python -m launch.bench_gpu_runs --child CONFIG REPORT`: the real Trainer as rank 0 of 1),
optionally with the last PROFILED_STEPS steps under torch.profiler (`dit bench gpu --profile`).
"""
from __future__ import annotations

import faulthandler
import json
import math
import os
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

PROFILED_STEPS = 3  # the last steps of a profiled run (their metrics windows leave the steady state)
KILL_GRACE_S = 30  # past a run's time: a child whose own timeout (faulthandler) did not end it is killed


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
                  prompt: str, extra: Sequence[str] = ()) -> list[str]:
    """Dotted overrides of the run (on top of the defaults of `trainer.config`), `extra` last."""
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
    else:  # measured, not resumed: the universal files would double a DiT-XL/2 checkpoint to ~23 GB
        overrides.append("checkpoint.universal=false")
    return overrides + list(extra)


def build_config(spec: RunSpec, shards: Path, run_dir: Path, precision: str, workers: int, prompt: str,
                 extra: Sequence[str] = ()):
    from trainer.config import load_config

    return load_config(None, run_overrides(spec, shards, run_dir, precision, workers, prompt, extra))


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


def run_child(cfg, run_dir: Path, device: str, deterministic: bool, timeout_s: float,
              profile: bool = False) -> ChildResult:
    """`python -m launch.bench_gpu_runs --child CONFIG REPORT`: one `Trainer` run as rank 0 of 1."""
    from trainer.config import to_yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    config, report, log = run_dir / "config.yaml", run_dir / "bench_report.json", run_dir / "bench.log"
    config.write_text(to_yaml(cfg))
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "launch.bench_gpu_runs", "--child", str(config), str(report)]
    if deterministic:
        cmd.append("--deterministic")
    if profile:
        cmd.append("--profile")
    cmd += ["--stacks-after", str(math.ceil(timeout_s))]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env=child_env(device, deterministic),
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout_s + KILL_GRACE_S)
        except subprocess.TimeoutExpired:  # stuck where faulthandler's exit could not end it
            proc.kill()
            proc.wait()
            code = 124
    seconds = time.perf_counter() - start
    code = 124 if code != 0 and seconds >= timeout_s else code
    data = json.loads(report.read_text()) if report.is_file() else {}
    return ChildResult(code, data, log, seconds)


def child_main(config: str, report: str, deterministic: bool, profile: bool = False, stacks_after: int = 0) -> int:
    """Rank 0 of a world of one: the real Trainer on `config`; writes the peak device memory of
    the training steps (before the first checkpoint save, which gathers whole tensors on the
    device, `peak_bytes`) and of the loop with its saves (before the end-of-run sample grid,
    which builds a second model, `save_peak_bytes`), the process-group backend and, with
    `profile`, the profile of the last steps to `report`."""
    import torch
    import torch.distributed as dist

    from data_pipeline.errors import DataError
    from trainer.config import load_config
    from trainer.codes import EXIT_DATA
    from trainer.engine import Trainer

    if stacks_after:  # out of time: every thread's stack into the log, then exit (a hang says where)
        faulthandler.dump_traceback_later(stacks_after, exit=True)
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
    save, sample_grid = trainer.save, trainer.write_samples

    def peak_before(key: str, call):
        """`call`, wrapped to record the device's peak memory so far under `key` at its first
        call: the trainer records no peak of its own for a phase."""
        def measured():
            if cuda and key not in result:
                torch.cuda.synchronize()
                result[key] = torch.cuda.max_memory_allocated()
            return call()
        return measured

    trainer.save = peak_before("peak_bytes", save)
    trainer.write_samples = peak_before("save_peak_bytes", sample_grid)
    if profile:
        profile_last_steps(trainer, cfg.stage.steps, Path(report).parent / "profile.txt", result)
    code = trainer.run()
    for key in ("peak_bytes", "save_peak_bytes"):  # the loop ended without saving or drawing samples
        if cuda and key not in result:
            result[key] = torch.cuda.max_memory_allocated()
    result["exit"] = code
    Path(report).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


def profile_last_steps(trainer, total: int, out: Path, result: dict[str, Any]) -> None:
    """Run the last PROFILED_STEPS steps (`trainer.train_step` and `record_step`, the EMA) under
    torch.profiler; write the operators by device time and by host time to `out`, and to
    `result["profile"]` the wall time of those steps, the sum of their device kernels' times
    (their ratio: how busy the host keeps the accelerator) and the host and device ms a step of
    each phase the trainer marks (`trainer.engine.PHASE`). On CUDA the same window counts the
    host syncs (torch's sync debug mode: a warning per synchronizing call) and where they were
    made. Those steps run backward on the calling thread (`set_multithreading_enabled(False)`):
    on CUDA autograd otherwise runs it on its device thread, outside the main thread's backward
    range, whose device time then read ~0."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step, record, window = trainer.train_step, trainer.record_step, {}

    def profiled_step(batches):
        if trainer.state.step == total - PROFILED_STEPS:  # the steps finished before this one
            window["prof"] = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            window["prof"].__enter__()
            window["one_thread"] = torch.autograd.set_multithreading_enabled(False)  # set now, this thread
            sync()
            window["syncs"] = count_host_syncs(cuda)
            window["caught"] = window["syncs"].__enter__()
            window["start"] = time.perf_counter()
        return step(batches)

    def profiled_record(infos, skipped):
        record(infos, skipped)
        if trainer.state.step == total and "prof" in window:
            window["syncs"].__exit__(None, None, None)
            sync()
            window["one_thread"].__exit__(None, None, None)
            wall = time.perf_counter() - window["start"]
            window["prof"].__exit__(None, None, None)
            ops = window["prof"].key_averages()
            out.write_text(ops.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=40)
                           + "\n\n" + ops.table(sort_by="cpu_time_total", row_limit=25) + "\n")
            result["profile"] = {"steps": PROFILED_STEPS, "wall_s": wall, "file": str(out),
                                 "device_s": device_kernel_seconds(ops),
                                 "phases_ms": phase_times(window["prof"].events(), PROFILED_STEPS),
                                 "host_syncs": window["caught"] if cuda else None}

    trainer.train_step, trainer.record_step = profiled_step, profiled_record


def device_kernel_seconds(ops) -> float:
    """Seconds of device kernels in the profiled rows (`key_averages()`): the device-side rows
    only, not user annotations, as torch's own table totals them. A CPU row's self device time
    is its launched kernels', which the device rows count again, and a device-side annotation
    (record_function's range on the GPU) spans the kernels inside it: summing every row counted
    the kernels two or three times, past 100% of the step."""
    from torch.autograd import DeviceType

    on_device = {DeviceType.CUDA, DeviceType.PrivateUse1, DeviceType.MTIA, DeviceType.XPU}
    return sum(e.self_device_time_total for e in ops
               if e.device_type in on_device and not e.is_user_annotation) / 1e6


def phase_times(events, steps: int) -> dict[str, list[float]]:
    """{phase: [host ms, device ms] a step} of the trainer's phase ranges, in the order first
    met. Only their host events count: on CUDA each range is also a device-side annotation of
    the same name, whose span would count the kernels twice."""
    from torch.autograd import DeviceType

    from trainer.engine import PHASE

    out: dict[str, list[float]] = {}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith(PHASE):
            times = out.setdefault(e.name[len(PHASE):], [0.0, 0.0])
            times[0] += e.cpu_time_total / 1e3 / steps
            times[1] += e.device_time_total / 1e3 / steps
    return out


@contextmanager
def count_host_syncs(cuda: bool) -> Iterator[dict[str, int]]:
    """Within the block: the host syncs torch reports (`torch.cuda.set_sync_debug_mode("warn")`),
    counted by the Python line that made them; the dict fills in as they happen."""
    import torch

    sites: dict[str, int] = {}
    if not cuda:
        yield sites
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchronizing" in str(w.message):
            site = f"{w.filename}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1


def _stacks_after(flags: list[str]) -> int:
    return int(flags[flags.index("--stacks-after") + 1]) if "--stacks-after" in flags else 0


if __name__ == "__main__":
    flags = sys.argv[4:]
    sys.exit(child_main(sys.argv[2], sys.argv[3], "--deterministic" in flags, "--profile" in flags,
                        _stacks_after(flags)))
