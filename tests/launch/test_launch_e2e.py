"""`dit launch` end to end on this machine: real ranks of the tiny job through the DeepSpeed
launcher, torchrun (two nodes on loopback) and the rendered sbatch script under fake SLURM
tools; a rank killed with SIGKILL, with and without `--max-restarts`; preemption."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from launch.job import free_port
from trainer.codes import EXIT_REQUEUE
from tests.trainer.harness import ROOT, TINY, losses, metrics, train_env
from trainer.checkpoint import LATEST

pytestmark = pytest.mark.slow

FAKE_SLURM = Path(__file__).parent / "fake_slurm"
STEPS = 8  # the tiny config's stage.steps


def dit_launch(out: Path, shards: Path, *options: str, overrides: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "launch", str(TINY), f"data.shards={shards}",
            f"run.out_dir={out}", *overrides, *options]


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A launcher with its output in `log` (no pipe to fill up)."""
    return subprocess.Popen(cmd, cwd=ROOT, env=train_env(**env), stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: int = 300) -> str:
    proc.wait(timeout=timeout)
    return log.read_text()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def reached(out: Path, step: int) -> Callable[[], bool]:
    path = out / "logs" / "metrics.jsonl"
    return lambda: path.is_file() and any(json.loads(line).get("step", 0) >= step
                                          for line in path.read_text().splitlines())


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for proc in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if proc.environ().get("RANK") == str(rank):
                return proc
        except psutil.Error:
            continue
    raise AssertionError(f"no process of rank {rank} under the launcher")


@pytest.fixture(scope="module")
def one_node_two_ranks(shapes_shards, tmp_path_factory) -> Path:
    """The reference: 1 node x 2 processes through the default (DeepSpeed) launcher."""
    out = tmp_path_factory.mktemp("one_node") / "run"
    log = out.parent / "launch.log"
    text = finish(start(dit_launch(out, shapes_shards, "--nproc-per-node", "2"), log), log)
    assert "dit launch: all ranks finished" in text, text[-4000:]
    assert "train: 100%" in text  # rank 0's output reached the console
    assert len(list((out / "logs" / "launch" / "node0").glob("*-attempt0/*_rank1.log"))) == 1
    return out


@pytest.mark.parametrize("engine", ["torchrun", "deepspeed"])
def test_two_nodes_on_loopback_equal_one_node_two_processes(one_node_two_ranks, shapes_shards, tmp_path, engine):
    out, port = tmp_path / "run", free_port()  # one out_dir: a cluster's shared checkpoint folder
    nodes = {rank: start(dit_launch(out, shapes_shards, "--launcher", engine, "--nproc-per-node", "1",
                                    "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                                    "--master-port", str(port)), tmp_path / f"node{rank}.log")
             for rank in (1, 0)}
    logs = {rank: finish(proc, tmp_path / f"node{rank}.log") for rank, proc in nodes.items()}
    for rank, proc in nodes.items():
        assert proc.returncode == 0, logs[rank][-4000:]
    reference, two_nodes = losses(one_node_two_ranks), losses(out)
    assert sorted(two_nodes) == list(range(1, STEPS + 1))
    assert two_nodes == reference
    assert (out / "logs" / "launch" / "node1").is_dir()


def test_sbatch_script_trains_under_fake_slurm(one_node_two_ranks, shapes_shards, tmp_path):
    out = tmp_path / "run"
    path = os.pathsep.join([str(FAKE_SLURM), os.environ["PATH"]])
    cmd = dit_launch(out, shapes_shards, "--slurm", "--nodes", "2", "--nproc-per-node", "1", "--time", "00:20:00",
                     "--master-port", str(free_port()))
    proc = subprocess.run(cmd, cwd=ROOT, env=train_env(PATH=path, FAKE_SLURM_JOB_ID="31"), capture_output=True,
                          text=True, timeout=300)
    job_log = out / "logs" / "slurm" / "tiny-31.out"
    assert proc.returncode == 0, proc.stdout + proc.stderr + (job_log.read_text()[-4000:] if job_log.exists() else "")
    assert "Submitted batch job 31" in proc.stdout
    assert job_log.read_text().count("dit launch: all ranks finished") == 2  # one per node
    assert losses(out) == losses(one_node_two_ranks)


def test_killed_rank_is_named_and_the_launcher_exits(shapes_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "launch.log"
    launcher = start(dit_launch(out, shapes_shards, "--nproc-per-node", "2", overrides=("stage.steps=100000",)), log)
    wait_for(reached(out, 2), 180, "training to start")
    rank_process(launcher, 1).kill()
    killed = time.monotonic()
    text = finish(launcher, log, timeout=150)
    assert time.monotonic() - killed < 120
    assert launcher.returncode == 128 + signal.SIGKILL, text[-4000:]
    assert "dit launch: rank 1 died: SIGKILL" in text


def test_max_restarts_resumes_from_latest_and_finishes(shapes_shards, tmp_path):
    """Two nodes on loopback (the harder case: every node relaunches and meets again)."""
    out, steps, port = tmp_path / "run", 16, free_port()
    nodes = {rank: start(dit_launch(out, shapes_shards, "--launcher", "torchrun", "--nproc-per-node", "1",
                                    "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                                    "--master-port", str(port), "--max-restarts", "1",
                                    overrides=(f"stage.steps={steps}", "checkpoint.every=2")),
                         tmp_path / f"node{rank}.log")
             for rank in (1, 0)}
    wait_for(reached(out, 3), 180, "a checkpoint and one more step")
    rank_process(nodes[1], 1).kill()
    logs = {rank: finish(proc, tmp_path / f"node{rank}.log") for rank, proc in nodes.items()}
    for rank, proc in nodes.items():
        assert proc.returncode == 0, logs[rank][-4000:]
        assert "restart 1 of 1" in logs[rank]
    assert "dit launch: rank 1 died: SIGKILL" in logs[1]
    assert "resumed from" in logs[0]
    assert max(r["step"] for r in metrics(out)) == steps
    assert (out / "checkpoints" / LATEST).read_text().strip() == f"step_{steps:08d}"


def test_preemption_signal_saves_and_passes_42_through(shapes_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "launch.log"
    launcher = start(dit_launch(out, shapes_shards, "--launcher", "torchrun", "--nproc-per-node", "2",
                                overrides=("stage.steps=100000", "checkpoint.every=100000")), log)
    wait_for(reached(out, 2), 180, "training to start")
    launcher.send_signal(signal.SIGUSR1)
    text = finish(launcher, log, timeout=150)
    assert launcher.returncode == EXIT_REQUEUE, text[-4000:]
    assert (out / "checkpoints" / LATEST).is_file()  # saved on the signal, not by checkpoint.every
