"""What the engines receive from `dit launch`, checked against DeepSpeed's own launcher code:
the arguments and environment of the ranks of a pdsh job (through DeepSpeed's real runner, a
fake pdsh and a real `bash -c`, as on a remote host), CUDA_VISIBLE_DEVICES as --include, a
repeated override, Ctrl-C with --max-restarts, the grace of a preemption, a SLURM GPU node
without GPUs, and the SLURM script's requeue when srun reports another node's 137."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch import job as launch_job
from launch import runners
from launch.cli import main
from launch.job import Job, LaunchError, Topology
from launch.runners import Outcome
from tests.trainer.harness import ROOT, TINY
from trainer.codes import EXIT_REQUEUE

FAKE_SLURM = Path(__file__).parent / "fake_slurm"

# What the ranks of a pdsh job see: overrides a shell would change, environment a remote host lacks.
TRICKY = ("data.shards=/data/shards-{00000..00009}.tar", "log.prompts=[a cat for $5]",
          "run.name=it's $HOME `id` \\ \"x\"", "run.tag=*.tar;echo")
REMOTE_PRINT = ("import json, os, sys; json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, "
                "open(os.environ['DIT_TEST_OUT'], 'w'))")
FAKE_PDSH = f"""#!{sys.executable}
# Fake pdsh: runs the remote command of the first host here as pdsh does there: its words joined
# with spaces, %n replaced, parsed by a shell with a fresh environment. The rank launcher
# (deepspeed.launcher.launch) is replaced by a script that writes its arguments and environment.
import shlex, subprocess, sys
args = sys.argv[1:]
remote = " ".join(args[args.index("-w") + 2:]).replace("%n", "0")
remote = remote.replace(" -u -m deepspeed.launcher.launch ", " -c " + shlex.quote({REMOTE_PRINT!r}) + " ", 1)
sys.exit(subprocess.call(["bash", "-c", remote], env={{"PATH": "/usr/bin:/bin", "DIT_TEST_OUT": "{{out}}"}}))
"""


def pdsh_job(tmp_path: Path) -> Job:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("h1 slots=1\nh2 slots=1\n")
    topology = Topology(0, nnodes=2, master_port=1234, hostfile=str(hostfile), hosts=(("h1", 1), ("h2", 1)))
    return Job(str(TINY), TRICKY, "deepspeed", topology, tmp_path / "logs", gpu=False)


def fake_bin(tmp_path: Path, out: Path) -> Path:
    """pdsh (above) and ssh (DeepSpeed's ssh check and `hostname -I` of the first host)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text(FAKE_PDSH.replace("{out}", str(out)))
    (bin_dir / "ssh").write_text("#!/bin/sh\necho 10.0.0.1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def test_pdsh_ranks_get_the_overrides_and_environment_of_this_launcher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./.deepspeed_env of the checkout
    monkeypatch.setenv("HOME", str(tmp_path))  # nor ~/.deepspeed_env
    out = tmp_path / "remote.json"
    job = pdsh_job(tmp_path)
    attempt = tmp_path / "attempt0"
    attempt.mkdir()
    base = dict(os.environ, DIT_DATA='/data/$USER "x" `y`', HF_HUB_OFFLINE="1", OMP_NUM_THREADS="3",
                DS_ACCELERATOR="cpu", PATH=os.pathsep.join([str(fake_bin(tmp_path, out)), os.environ["PATH"]]))
    env = runners.deepspeed_environment(job, base, attempt)
    proc = subprocess.run(runners.deepspeed_command(job, attempt, Path(job.topology.hostfile), env), env=env,
                          timeout=120, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    remote = json.loads(out.read_text())
    module = remote["argv"].index("launch.cli")
    assert remote["argv"][module:] == ["launch.cli", "train", str(TINY), *TRICKY]
    for key, value in (("DIT_DATA", base["DIT_DATA"]), ("HF_HUB_OFFLINE", "1"), ("OMP_NUM_THREADS", "3"),
                       ("DS_ACCELERATOR", "cpu"), ("PYTHONUNBUFFERED", "1")):
        assert remote["env"].get(key) == value, key
    assert str(ROOT) in remote["env"]["PYTHONPATH"].split(os.pathsep)


def test_the_env_file_keeps_the_users_deepspeed_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=eth0\nDIT_RUNS=/old\n")
    job = pdsh_job(tmp_path)
    env = runners.deepspeed_environment(job, {"DIT_RUNS": "/runs", "HOSTNAME": "here"}, tmp_path)
    lines = Path(env["DS_ENV_FILE"]).read_text().splitlines()
    assert "NCCL_SOCKET_IFNAME=eth0" in lines and "DIT_RUNS=/runs" in lines
    assert not any(line.startswith("HOSTNAME=") for line in lines)  # this host's own variables stay here
    # This machine has no GPU (gpu=False), which says nothing about the other hosts'.
    assert env["DS_ACCELERATOR"] == "cpu" and not any(line.startswith("DS_ACCELERATOR=") for line in lines)
    local = Job(str(TINY), (), "deepspeed", Topology(1), tmp_path, gpu=False)
    assert "DS_ENV_FILE" not in runners.deepspeed_environment(local, {}, tmp_path)


def test_cuda_visible_devices_become_the_include_of_the_deepspeed_launcher(tmp_path):
    from deepspeed.launcher.runner import parse_args, parse_resource_filter

    gpu_job = Job(str(TINY), (), "deepspeed", Topology(2, master_port=1), tmp_path, gpu=True)
    cmd = runners.deepspeed_command(gpu_job, tmp_path, None, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert not any(arg.startswith("--num_gpus") for arg in cmd)
    args = parse_args(cmd[4:])
    assert parse_resource_filter({"localhost": list(range(8))}, include_str=args.include) == {"localhost": [4, 5]}
    assert "--num_gpus=2" in runners.deepspeed_command(gpu_job, tmp_path, None, {})
    with pytest.raises(LaunchError, match="more than the 1 GPUs"):
        runners.deepspeed_command(gpu_job, tmp_path, None, {"CUDA_VISIBLE_DEVICES": "3"})
    with pytest.raises(LaunchError, match="--launcher torchrun"):
        runners.deepspeed_command(gpu_job, tmp_path, None, {"CUDA_VISIBLE_DEVICES": "GPU-5f3c,GPU-77aa"})
    by_hand = Job(str(TINY), (), "deepspeed", Topology(2, nnodes=2, node_rank=1, master_addr="a", master_port=1),
                  tmp_path, gpu=True)
    with pytest.raises(LaunchError, match="whatever CUDA_VISIBLE_DEVICES=4,5 says"):
        runners.deepspeed_command(by_hand, tmp_path, tmp_path / "hostfile", {"CUDA_VISIBLE_DEVICES": "4,5"})
    prefix = runners.deepspeed_command(by_hand, tmp_path, tmp_path / "hostfile", {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert "--num_gpus=2" in prefix  # what DeepSpeed gives them anyway


# A stand-in for the DeepSpeed launcher: one rank (RANK set) that exits 1 after 3 s unless a
# signal ends it first; the agent exits with the rank's status.
FAKE_ENGINE = """
import os, subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(3); sys.exit(1)"],
                        env={**os.environ, "RANK": "0"})
sys.exit(1 if rank.wait() else 0)
"""
INTERRUPTED_JOB = """
import sys
from pathlib import Path
from launch import runners
from launch.job import Job, Topology
runners.deepspeed_command = lambda *args: [sys.executable, "-c", {engine!r}]
sys.exit(runners.run_job(Job({tiny!r}, (), "deepspeed", Topology(1, master_port=1), Path({logs!r}), gpu=False,
                             max_restarts=2)))
"""


def test_ctrl_c_stops_the_job_instead_of_restarting_it(tmp_path):
    code = INTERRUPTED_JOB.format(engine=FAKE_ENGINE, tiny=str(TINY), logs=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    while not list(tmp_path.glob("*-attempt0")):
        time.sleep(0.05)
    time.sleep(1.0)  # the rank is running and seen
    proc.send_signal(signal.SIGINT)  # as `kill -INT`: to this launcher only, not its process group
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "received SIGINT" in out and "restart" not in out
    assert len(list(tmp_path.glob("*-attempt*"))) == 1


def test_run_job_does_not_restart_a_stopped_job(tmp_path, monkeypatch):
    attempts = []

    def stopped(*_):
        attempts.append(1)
        return Outcome(-signal.SIGHUP, reason="this launcher received SIGHUP", stopped=True)

    monkeypatch.setitem(runners.RUNNERS, "torchrun", stopped)
    job = Job(str(TINY), (), "torchrun", Topology(1), tmp_path, gpu=False, max_restarts=3)
    assert runners.run_job(job) == 128 + signal.SIGHUP and len(attempts) == 1


def test_a_rank_that_outlives_the_shutdown_timeout_is_killed():
    from launch.watch import ForwardSignals, RankWatcher

    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"
    agent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, subprocess, sys
        rank = subprocess.Popen([sys.executable, '-c', {deaf!r}], env={{**os.environ, 'RANK': '0'}},
                                stdout=subprocess.PIPE)
        rank.stdout.readline()  # the rank ignores SIGTERM from now on
        print(flush=True)
        sys.exit(-rank.wait())
        """)], env={k: v for k, v in os.environ.items() if k != "RANK"}, stdout=subprocess.PIPE)
    try:
        with RankWatcher(agent.pid) as watcher, ForwardSignals(watcher, shutdown_timeout_s=0.5):
            agent.stdout.readline()
            while not watcher.pids():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)  # forwarded to the rank, which ignores it
            assert agent.wait(timeout=10) == signal.SIGKILL  # its rank got SIGKILL 0.5 s later
    finally:
        agent.kill()
        agent.wait()


def test_a_slurm_gpu_node_without_visible_gpus_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(runners, "RUNNERS", {})
    monkeypatch.setattr(launch_job, "gpus_here", lambda: 0)
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    assert main(["launch", str(TINY)]) == 2
    assert "SLURM allocated GPUs to this job (SLURM_GPUS_ON_NODE=4) but torch sees none" in capsys.readouterr().err
    launch_job.check_gpus_visible(0, {"SLURM_GPUS_ON_NODE": "0"})  # a CPU job of SLURM
    launch_job.check_gpus_visible(4, {"SLURM_JOB_GPUS": "0,1,2,3"})


def test_run_job_marks_a_requeue_for_the_slurm_script(tmp_path, monkeypatch):
    marker = tmp_path / "slurm" / "tiny-7.requeue"
    monkeypatch.setenv(runners.REQUEUE_MARKER_ENV, str(marker))
    monkeypatch.setitem(runners.RUNNERS, "torchrun", lambda *_: Outcome(EXIT_REQUEUE, rank=0))
    assert runners.run_job(Job(str(TINY), (), "torchrun", Topology(1), tmp_path, gpu=False)) == EXIT_REQUEUE
    assert marker.is_file()


# srun as SLURM may report a preemption: this node's launcher saved and marked the requeue, the
# other node's launcher was killed by --kill-on-bad-exit, and srun exits with its 137.
SRUN_137 = '#!/bin/sh\ntouch "$DIT_REQUEUE_MARKER"\nexit 137\n'


def test_the_slurm_script_requeues_on_the_marker_whatever_srun_reports(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN_137)
    (bin_dir / "srun").chmod(0o755)
    requeued = tmp_path / "requeued"
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), str(FAKE_SLURM), os.environ["PATH"]]))
    monkeypatch.setenv("FAKE_SLURM_REQUEUED", str(requeued))
    monkeypatch.setenv("FAKE_SLURM_JOB_ID", "77")
    out = tmp_path / "run"
    assert main(["launch", str(TINY), f"run.out_dir={out}", "--slurm", "--nodes", "2"]) == EXIT_REQUEUE
    assert requeued.read_text().split() == ["77"]
    assert "requeueing" in (out / "logs" / "slurm" / "tiny-77.out").read_text()
    assert not (out / "logs" / "slurm" / "tiny-77.requeue").exists()  # a rerun starts unmarked


def test_the_slurm_script_asks_for_cores_for_every_rank(capsys):
    assert main(["launch", str(TINY), "run.out_dir=/tmp/x", "data.num_workers=3", "--slurm", "--dry-run",
                 "--gpus-per-node", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "#SBATCH --cpus-per-task=16" in lines
    assert "--cpus-per-task=16" in next(line for line in lines if line.startswith("srun "))
    assert main(["launch", str(TINY), "run.out_dir=/tmp/x", "--slurm", "--dry-run"]) == 0
    assert "asks SLURM for no GPUs" in capsys.readouterr().err
