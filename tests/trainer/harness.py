"""Harness of the multi-process trainer tests: real `dit train` ranks started by torchrun over gloo."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "test_tiny.yaml"
# its sitecustomize lets DeepSpeed's CPU accelerator run fp16 (which it refuses without AVX512-FP16)
FP16_ON_CPU = ROOT / "tests" / "trainer" / "fp16_on_cpu"


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name` of a session fixture, built once for all the run's pytest-xdist workers.
    Each worker has a session of its own, so a fixture's 2-rank run was made once per worker;
    here the first worker to come builds it under a file lock in the folder the workers share
    (pytest-xdist's documented pattern) and the others wait and read it. A build that fails
    leaves no mark, so the next worker tries again (and fails alike). Without xdist: a folder
    of this session's own. What is built this way is only ever read by the tests."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    import shutil

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # this run's; each worker's basetemp lies in it
    out, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory) -> Path:
    """Real synthetic-shapes tar shards at 16 px, shared by the trainer tests."""
    from data_pipeline.synth import synth_samples
    from data_pipeline.write import write_shards

    return built_once(tmp_path_factory, "shapes", lambda out: write_shards(
        synth_samples(96, seed=0, size=16), str(out), shard_size=24, progress=False))


@pytest.fixture(scope="session")
def video_shards(tmp_path_factory) -> Path:
    """Real MP4 shards of synthetic shape clips at 16 px (6 frames each)."""
    from data_pipeline.synth import synth_samples
    from data_pipeline.write import write_shards

    return built_once(tmp_path_factory, "clips", lambda out: write_shards(
        synth_samples(48, seed=0, size=16, video=True, num_frames=6), str(out), shard_size=12, progress=False))


# (width, height) of the images of `mixed_shards`: two areas (16, 32) x three aspects (0.5, 1, 2)
MIXED_SIZES = [(16, 16), (32, 16), (16, 32), (32, 32), (64, 32), (32, 64)]


@pytest.fixture(scope="session")
def mixed_shards(tmp_path_factory) -> Path:
    """48 captioned synthetic shapes (PNG) resized to the six `MIXED_SIZES`, written by `write_shards`."""
    import io

    import numpy as np
    import PIL.Image

    from data_pipeline.synth import caption, render_image, sample_attributes
    from data_pipeline.write import write_shards

    def samples():
        for i in range(48):
            attrs = sample_attributes(np.random.default_rng([0, i]))
            w, h = MIXED_SIZES[i * 5 % len(MIXED_SIZES)]
            buf = io.BytesIO()
            PIL.Image.fromarray(render_image(attrs, 64)).resize((w, h), PIL.Image.NEAREST).save(buf, format="PNG")
            yield {"__key__": f"{i:04d}_{w}x{h}", "png": buf.getvalue(), "txt": caption(attrs).encode()}

    return built_once(tmp_path_factory, "mixed", lambda out: write_shards(samples(), str(out), shard_size=12,
                                                                          progress=False))


@pytest.fixture(scope="session")
def tiny_teacher(shapes_shards, tmp_path_factory) -> Path:
    """A real teacher for the distillation runs: checkpoint root of a 4-step pretraining run of
    configs/test_tiny.yaml on 2 ranks (EMA weights + config.yaml)."""
    def train(out: Path) -> None:
        assert_ok(run_train(2, [f"data.shards={shapes_shards}", f"run.out_dir={out}", "stage.steps=4",
                                "checkpoint.every=4"]))

    return built_once(tmp_path_factory, "teacher", train) / "checkpoints"


# torchrun's agent, exiting as `dit` does (launch/cli.py): without the interpreter's final
# collections over the heap of torch (~1 s of every launch)
TORCHRUN = "import atexit, gc; atexit.register(gc.freeze); from torch.distributed.run import main; main()"


def run_rank_script(script: Path, *args: str, nproc: int = 2, timeout: int = 600) -> str:
    """A test's own rank script under torchrun (`nproc` ranks over gloo), to its end; its output
    (stdout and stderr). Every process of it ends, also when it fails or hangs."""
    cmd = [sys.executable, "-c", TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", str(script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-6000:]
    return out


def torchrun_cmd(nproc: int, overrides: list[str], config: Path = TINY) -> list[str]:
    return [sys.executable, "-c", TORCHRUN, "--standalone", f"--nproc-per-node={nproc}",
            "-m", "launch.cli", "train", str(config), *overrides]


def train_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_train(nproc: int, overrides: list[str], timeout: int = 300, config: Path = TINY,
              **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, overrides, config), cwd=ROOT, env=train_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


def base(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"run.out_dir={out}", *extra]


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def latest_dir(out: Path) -> Path:
    from trainer.checkpoint import LATEST

    return out / "checkpoints" / (out / "checkpoints" / LATEST).read_text().strip()


def final_weights(out: Path) -> dict:
    """The raw model weights of the newest checkpoint (ZeRO-2 keeps them whole in rank 0's file)."""
    import torch

    state = torch.load(latest_dir(out) / "student" / "mp_rank_00_model_states.pt", weights_only=False)
    return state["module"]


def ema_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(latest_dir(out) / "ema.safetensors"))


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def popen_train(nproc: int, overrides: list[str], config: Path = TINY, **env: str) -> subprocess.Popen:
    """A torchrun job in its own process group (so a test can signal or kill all of it)."""
    return subprocess.Popen(torchrun_cmd(nproc, overrides, config), cwd=ROOT, start_new_session=True,
                            env=train_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_file(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    """Wait until a running job creates `path` (an injected fault's marker); fail if it ends first."""
    import time

    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.1)


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The PID of the `dit train` process with RANK=`rank` under a launcher."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "launch.cli" in child.cmdline() and child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise LookupError(f"no rank {rank} under {launcher_pid}")


def step_keys(out: Path) -> dict[int, dict[int, list[str]]]:
    """rank -> step -> the sample keys it consumed (the last record of a step wins: a resumed
    run redoes the steps after its checkpoint)."""
    result: dict[int, dict[int, list[str]]] = {}
    for path in sorted((out / "logs" / "keys").glob("rank_*.jsonl")):
        records = result.setdefault(int(path.stem.split("_")[1]), {})
        for line in path.read_text().splitlines():
            r = json.loads(line)
            records[r["step"]] = r["keys"]
    return result


def rank_exit_codes(proc: subprocess.CompletedProcess) -> set[int]:
    """The ranks' own exit codes, from torchrun's failure summary (torchrun itself exits 1).
    A rank still tearing down when the first one exits is stopped by torchrun with SIGTERM
    (-15); those are left out, so the set holds what the ranks decided."""
    import re

    codes = {int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stdout + proc.stderr)}
    return codes - {-int(signal.SIGTERM)} if len(codes) > 1 else codes


def bare_ranks(nproc: int, overrides: list[str], logs: Path, config: Path = TINY,
               **env: str) -> list[subprocess.Popen]:
    """`dit train` ranks started by hand, with no launcher to stop the others when one dies (as
    on separate nodes): what they do after a peer's death is their own doing. Rank r writes
    its output to `logs/rank{r}.log`."""
    from launch.job import free_port

    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "launch.cli", "train", str(config), *overrides]
    procs = []
    for r in range(nproc):
        with open(logs / f"rank{r}.log", "w") as log:
            procs.append(subprocess.Popen(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env=train_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port), **env)))
    return procs


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside (as the ranks run, OMP_NUM_THREADS=1): on a machine whose cores
    are shared, a second OpenMP thread spin-waits and costs several times the CPU it saves."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_checkpoint_samples_match(out: Path, tmp: Path) -> None:
    """The sample grid drawn from the newest checkpoint's EMA (what `dit sample` loads) equals the
    one the trainer drew from its in-memory EMA at the same step (same seed, prompts, precision,
    frozen helpers in the training precision, the text encoder in its own, one thread as the ranks run): what a run saves is
    what it trained. The stage is restored as a resume restores it (its saved state: a
    progressive round's teacher) with the same preview inputs; clips are compared frame by frame."""
    import torch
    from safetensors.torch import load_file

    from trainer.checkpoint import STAGE_FILE, load_for_inference
    from trainer.config import load_config
    from trainer.engine import preview_batch
    from trainer.numerics import PRECISIONS, inference_numerics
    from trainer.stages import build_stage

    directory = latest_dir(out)
    cfg = load_config(directory / "config.yaml")
    step = int(directory.name.split("_")[1])
    trained = sorted((out / "logs" / "samples").glob(f"step_{step:08d}.*"))
    assert len(trained) == 1, f"the trainer drew no single sample grid at step {step}: {trained}"
    cpu = torch.device("cpu")
    with one_thread():
        stage = build_stage(cfg).to(cpu, PRECISIONS[cfg.deepspeed.precision])  # helpers as trained
        if (directory / STAGE_FILE).is_file():
            stage.load_state_tensors(load_file(str(directory / STAGE_FILE)))
        if stage.preview_samples:
            stage.preview = preview_batch(cfg, stage.preview_samples, cpu)
        with inference_numerics(cpu, cfg.deepspeed.precision):
            drawn = stage.write_samples(load_for_inference(directory)[1], cfg.log, tmp / "samples.png")
    assert drawn is not None and drawn.suffix == trained[0].suffix
    assert frames(drawn) == frames(trained[0]), f"{drawn} differs from {trained[0]}"


def frames(path: Path) -> list[bytes]:
    """The decoded frames of a PNG (one) or an animated GIF (each)."""
    from PIL import Image, ImageSequence

    with Image.open(path) as img:
        return [frame.convert("RGB").tobytes() for frame in ImageSequence.Iterator(img)]


@contextmanager
def one_rank_group() -> Iterator:
    """A process group of this process alone, over gloo, as `dit train` starts one rank (its
    DistContext); destroyed on exit, with what DeepSpeed keeps of the groups (its clone of the
    world group, and the model-parallel unit a pipeline engine registers): engines built under a
    later group would otherwise be handed dead ones, also when an earlier test left them."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    from launch.job import free_port
    from trainer.distributed import init_distributed

    with pytest.MonkeyPatch.context() as env:
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(free_port())).items():
            env.setenv(key, value)
        groups._WORLD_GROUP = groups.mpu = None
        ctx = init_distributed(1, 60)
        try:
            yield ctx
        finally:
            dist.destroy_process_group()
            groups._WORLD_GROUP = groups.mpu = None


def straight_and_resumed(shards: Path, tmp_path: Path, steps: int, *extra: str, **env: str) -> tuple[Path, Path]:
    """The same run straight through (checkpoints every steps / 2, constant lr), and a fresh run
    folder resumed from the straight run's checkpoint of steps / 2 (as `dit bench gpu` checks it)."""
    from launch.bench_gpu_resume import seed_resume_dir

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    half = steps // 2
    assert_ok(run_train(2, base(shards, straight, f"stage.steps={steps}", f"checkpoint.every={half}", *extra), **env))
    seed_resume_dir(straight, resumed, half)
    proc = run_train(2, base(shards, resumed, f"stage.steps={steps}", f"checkpoint.every={half}", *extra), **env)
    assert_ok(proc)
    assert f"at step {half}" in proc.stdout
    assert sorted(losses(resumed)) == [s for s in sorted(losses(straight)) if s > half]  # its log steps
    return straight, resumed
