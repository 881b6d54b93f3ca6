"""`dit launch` without starting a job: command lines, topology checks, fail-fast config
validation, failure summaries, the sbatch script and what it does with a requeue exit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch import job as launch_job
from launch import runners
from launch.cli import main
from launch.job import Job, LaunchError, Topology, rank_environment, read_hostfile
from launch.runners import Outcome, deepspeed_command, deepspeed_status, node_hostfile, torchrun_args
from tests.trainer.harness import ROOT, TINY
from trainer.codes import EXIT_REQUEUE
from trainer.config import ConfigError

FAKE_SLURM = Path(__file__).parent / "fake_slurm"


def job(topology: Topology, launcher_name: str = "torchrun", gpu: bool = False) -> Job:
    return Job(str(TINY), ("stage.steps=3",), launcher_name, topology, Path("/tmp/logs"), gpu)


def test_hostfile_is_read_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "hosts"
    good.write_text("# cluster\nworker-0 slots=8\n\nworker-1 slots=4  # smaller\n")
    assert read_hostfile(str(good)) == (("worker-0", 8), ("worker-1", 4))
    bad = tmp_path / "bad"
    bad.write_text("worker-0 slots=8\nworker-1 8\n")
    with pytest.raises(LaunchError, match=r"bad:2: 'worker-1 8' is not 'HOST slots=N'"):
        read_hostfile(str(bad))
    twice = tmp_path / "twice"
    twice.write_text("a slots=1\na slots=2\n")
    with pytest.raises(LaunchError, match="listed twice"):
        read_hostfile(str(twice))


def test_torchrun_command_single_node_and_rendezvous():
    single = torchrun_args(job(Topology(2)), Path("/tmp/a0"))
    assert "--standalone" in single and "--nproc-per-node=2" in single
    assert single[-5:] == ["--module", "launch.cli", "train", str(TINY), "stage.steps=3"]
    assert "--max-restarts=0" in single  # restarts are the launcher's, so that 42 is never restarted
    multi = torchrun_args(job(Topology(4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=2950)),
                          Path("/tmp/a0"))
    assert "--standalone" not in multi
    for flag in ("--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=2950"):
        assert flag in multi
    assert any(a.startswith("--signals-to-handle=") and "SIGUSR1" in a for a in multi)
    relaunch = torchrun_args(job(Topology(4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=2950)),
                             Path("/tmp/a1"), attempt=1)
    assert "--master-port=2951" in relaunch  # a fresh rendezvous store for attempt 1


def test_deepspeed_command_local_hostfile_and_no_ssh(tmp_path):
    local = deepspeed_command(job(Topology(2, master_port=1234), "deepspeed"), tmp_path, None)
    assert local[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    for flag in ("--num_gpus=2", "--master_port=1234", "--module", "--no_local_rank"):
        assert flag in local
    assert not any(a.startswith(("--hostfile", "--no_ssh")) for a in local)
    topo = Topology(1, nnodes=2, node_rank=1, master_addr="127.0.0.1", master_port=1234)
    assert node_hostfile(topo) == "node0 slots=1\nnode1 slots=1\n"
    by_hand = deepspeed_command(job(topo, "deepspeed"), tmp_path, tmp_path / "hostfile")
    for flag in (f"--hostfile={tmp_path / 'hostfile'}", "--no_ssh", "--node_rank=1", "--master_addr=127.0.0.1",
                 "--master_port=1234"):
        assert flag in by_hand
    relaunch = deepspeed_command(job(topo, "deepspeed"), tmp_path, tmp_path / "hostfile", attempt=2)
    assert "--master_port=1236" in relaunch  # not the store a failed attempt's rank 0 may still hold


def test_rank_environment_is_set_in_one_place():
    base = {"RANK": "7", "WORLD_SIZE": "9", "MASTER_PORT": "1", "PYTHONPATH": "/x", "OMP_NUM_THREADS": "3"}
    env = rank_environment(base, job(Topology(2)))
    assert "RANK" not in env and "WORLD_SIZE" not in env and "MASTER_PORT" not in env
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/x"]
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "3"
    assert rank_environment(env, job(Topology(2)))["PYTHONPATH"] == env["PYTHONPATH"]  # idempotent
    assert "DS_ACCELERATOR" not in rank_environment({}, job(Topology(2), gpu=True))


def test_exit_codes_are_the_trainers():
    from trainer import codes

    for name in ("EXIT_OK", "EXIT_CONFIG", "EXIT_NONFINITE", "EXIT_CHECKPOINT", "EXIT_DATA", "EXIT_REQUEUE"):
        assert getattr(runners, name) == getattr(codes, name), name


def test_sampler_names_and_defaults_are_the_samplers():
    """What `dit sample --help` says without importing torch is what the sampler does."""
    from trainer import codes
    from trainer.diffusion import SAMPLERS, SamplerSettings

    assert sorted(codes.SAMPLER_NAMES) == sorted(SAMPLERS)
    default = SamplerSettings()
    assert (codes.DEFAULT_STEPS, codes.DEFAULT_CFG, codes.DEFAULT_RESCALE, codes.DEFAULT_SAMPLER) == (
        default.steps, default.cfg_scale, default.guidance_rescale, default.sampler)


def test_failure_summary_names_rank_and_reason():
    killed = Outcome(-9, rank=1)
    assert killed.summary() == "rank 1 died: SIGKILL" and killed.exit_code == 137
    assert Outcome(3, rank=0).summary() == "rank 0 exited with code 3 (too many non-finite steps in a row)"
    preempted = Outcome(EXIT_REQUEUE, reason="this launcher received SIGUSR1")
    assert preempted.exit_code == EXIT_REQUEUE
    assert preempted.summary() == "stopped, this launcher received SIGUSR1: code 42 (preempted, state saved)"
    # DeepSpeed's launcher exits with sys.exit(-N) for a rank killed by signal N: 256 - N.
    assert deepspeed_status(247) == -9 and deepspeed_status(42) == 42 and deepspeed_status(1) == 1


# A stand-in for an engine's agent: starts ranks 0-2 and, like the DeepSpeed launcher between
# its polls, does not reap them. Rank 2 finishes (exit 0) at once, the others run until killed.
AGENT = """
import os, subprocess, sys, time
ranks = [subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0 if sys.argv[1] == '2' else 60)",
                           str(r)], env={**os.environ, "RANK": str(r)}) for r in range(3)]
time.sleep(60)
"""


def argv_tail(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()[-1:]
    except psutil.Error:  # rank 2, finished
        return []


def test_rank_watcher_names_the_killed_rank_with_its_own_status():
    from launch.watch import RankWatcher

    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    agent = subprocess.Popen([sys.executable, "-c", AGENT], env=env)
    try:
        with RankWatcher(agent.pid) as watcher:
            while len(watcher.pids()) < 2:  # ranks 0 and 1 (rank 2 may be gone before it is seen)
                time.sleep(0.05)
            rank1, = (pid for pid in watcher.pids() if argv_tail(psutil.Process(pid)) == ["1"])
            os.kill(rank1, signal.SIGKILL)
            while watcher.first_dead is None:
                time.sleep(0.05)
        assert (watcher.first_dead, watcher.first_status) == (1, -signal.SIGKILL)
    finally:
        for proc in psutil.Process(agent.pid).children(recursive=True) + [psutil.Process(agent.pid)]:
            proc.kill()
        agent.wait()


def test_a_killed_rank_is_taken_as_the_cause_over_peers_that_died_in_the_same_poll():
    from launch.watch import _likely_cause

    assert min([(0, 1), (2, None), (1, -9)], key=_likely_cause) == (1, -9)
    assert min([(2, None), (1, 3)], key=_likely_cause) == (1, 3)


@pytest.mark.parametrize("argv, message", [
    (["--nnodes", "2", "--node-rank", "0"], "needs --node-rank, --master-addr and --master-port"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--master-port", "1"], "outside"),
    (["--launcher", "torchrun", "--hostfile", str(TINY)], "read by the DeepSpeed launcher"),
])
def test_inconsistent_topology_fails_before_anything_starts(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(runners, "RUNNERS", {})  # any attempt to run would raise KeyError
    assert main(["launch", str(TINY), *argv]) == 2
    assert message in capsys.readouterr().err


def test_master_port_help_says_nnodes_without_a_hostfile_requires_it(monkeypatch, capsys):
    """The help promised a default of 29500, which --nnodes > 1 without a hostfile never takes:
    the command refuses to start without --master-port there."""
    with pytest.raises(SystemExit):
        main(["launch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    entry = text[text.index("--master-port MASTER_PORT a free port"):][:200]
    assert "required with --nnodes > 1 and no --hostfile" in entry
    monkeypatch.setattr(runners, "RUNNERS", {})
    assert main(["launch", str(TINY), "--nnodes", "2", "--node-rank", "0", "--master-addr", "h"]) == 2
    assert "--master-port on every node" in capsys.readouterr().err


def test_bad_config_fails_fast_naming_the_key(monkeypatch, capsys):
    monkeypatch.setattr(runners, "RUNNERS", {})
    assert main(["launch", str(TINY), "optim.lrr=1", "--nproc-per-node", "2"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="deepspeed.pipeline_stages"):  # checked for the world size
        launch_job.check_config(str(TINY), ["deepspeed.pipeline_stages=3", "deepspeed.zero_stage=1"], 2)


def dry_run(capsys, *extra: str) -> str:
    assert main(["launch", str(TINY), "run.out_dir=/tmp/x", "--slurm", "--dry-run", *extra]) == 0
    return capsys.readouterr().out


def test_slurm_dry_run_holds_requeue_signal_and_srun(capsys):
    script = dry_run(capsys, "--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00", "--partition", "gpu",
                     "--sbatch-option=--qos=high")
    lines = script.splitlines()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=USR1@120", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --time=24:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --qos=high", "#SBATCH --output=/tmp/x/logs/slurm/%x-%j.out"):
        assert line in lines, line
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    srun = next(line for line in lines if line.startswith("srun "))
    for part in ("--launcher torchrun", "--nproc-per-node 8", '--node-rank "$SLURM_NODEID"', '--master-addr "$MASTER_ADDR"',
                 "--kill-on-bad-exit=1"):  # one dead node stops the others instead of leaving them to the time limit
        assert part in srun
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_a_launch_says_the_global_batch_its_ranks_train_with(capsys):
    """A recipe's data.batch_size is per GPU: on 4 nodes of 8 GPUs the global batch is 4 x what
    it planned on one, which `dit launch` never said (nor --dry-run's script)."""
    assert main(["launch", str(TINY), "run.out_dir=/tmp/x", "--slurm", "--dry-run", "--nodes", "4",
                 "--gpus-per-node", "8"]) == 0
    assert ("dit launch: 32 rank(s): 32 data-parallel rank(s) x data.batch_size 4 x deepspeed.grad_accum 1 = "
            "global batch 128") in capsys.readouterr().err


def test_a_slurm_job_may_be_queued_before_the_autoencoder_it_reads_is_written(monkeypatch, capsys, tmp_path):
    """A latent DiT's job submitted behind its autoencoder stage's (sbatch --dependency) finds no
    autoencoder yet: the submission says so and goes on; a launch here, whose ranks would fail
    on it after DeepSpeed started, is refused naming the key."""
    monkeypatch.setattr(runners, "RUNNERS", {})
    latent = [str(TINY), "run.out_dir=/tmp/x", "model.autoencoder.kind=kl", "model.in_channels=4",
              f"model.autoencoder.path={tmp_path / 'autoencoder'}"]
    assert main(["launch", *latent, "--slurm", "--dry-run", "--sbatch-option=--dependency=afterok:123"]) == 0
    assert f"model.autoencoder.path {tmp_path / 'autoencoder'} holds no autoencoder yet" in capsys.readouterr().out
    assert main(["launch", *latent, "--launcher", "torchrun", "--nproc-per-node", "1"]) == 2
    assert "holds no autoencoder (no config.json)" in capsys.readouterr().err


@pytest.mark.parametrize("timeout, kill_wait_note", [("300", True), ("25", False)])
def test_slurm_signals_the_ranks_their_shutdown_timeout_ahead_and_states_killwait(capsys, timeout, kill_wait_note):
    """SIGUSR1 must come early enough for the ranks' whole shutdown (torchrun kills them
    --shutdown-timeout after it) and the requeue, before SLURM's SIGTERM at the time limit; a
    shutdown longer than SLURM's default KillWait (30 s), all a scancel or preemption gives, is stated."""
    assert main(["launch", str(TINY), "run.out_dir=/tmp/x", "--slurm", "--dry-run", "--shutdown-timeout", timeout]) == 0
    script, err = capsys.readouterr()
    lead = int(next(line for line in script.splitlines() if line.startswith("#SBATCH --signal=USR1@")).split("@")[1])
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert f"--shutdown-timeout {timeout} " in srun
    assert lead >= int(timeout) + 10  # and a margin for srun to end and the script to requeue
    assert ("KillWait" in script) == ("KillWait" in err) == kill_wait_note
    assert main(["launch", str(TINY), "--slurm", "--dry-run", "--shutdown-timeout", "70000"]) == 2
    assert "--shutdown-timeout 70000" in capsys.readouterr().err


def test_slurm_validates_the_config_for_the_allocation(capsys):
    assert main(["launch", str(TINY), "deepspeed.pipeline_stages=3", "deepspeed.zero_stage=1", "--slurm",
                 "--dry-run", "--nodes", "2", "--gpus-per-node", "2"]) == 2
    assert "do not divide the world size 4" in capsys.readouterr().err


def test_slurm_min_nodes_accepts_a_smaller_allocation_that_holds_the_config(capsys):
    """Each allocation size must hold the config, and keep the global batch a run started on
    another size set (a whole grad_accum or batch): 4 per rank on 1 or 2 nodes does (8 on 1 node:
    grad_accum 2; 4 on 2: batch 2); on 2 to 4 nodes, 8 on 3 nodes is neither, so a requeue there
    was refused on the cluster."""
    script = dry_run(capsys, "--nodes", "2", "--min-nodes", "1")
    assert "#SBATCH --nodes=1-2" in script.splitlines()
    assert main(["launch", str(TINY), "run.out_dir=/tmp/x", "--slurm", "--dry-run", "--nodes", "4",
                 "--min-nodes", "2"]) == 2
    assert "its requeue there would be refused" in capsys.readouterr().err
    assert main(["launch", str(TINY), "deepspeed.pipeline_stages=2", "deepspeed.zero_stage=1", "--slurm",
                 "--dry-run", "--nodes", "4", "--min-nodes", "3"]) == 2
    assert "do not divide the world size 3" in capsys.readouterr().err


def test_a_job_that_may_start_again_must_resume(monkeypatch, capsys):
    """A relaunch or requeue resumes from `latest`: with checkpoint.resume=false it began again at
    step 0 and its saves replaced the run's. A negative --shutdown-timeout killed the ranks at the
    signal, nothing saved."""
    monkeypatch.setattr(runners, "RUNNERS", {})
    for extra in (["--max-restarts", "1"], ["--slurm", "--dry-run"]):
        assert main(["launch", str(TINY), "run.out_dir=/tmp/x", "checkpoint.resume=false", *extra]) == 2
        assert "'checkpoint.resume': is false, but this job may be started again" in capsys.readouterr().err
    assert main(["launch", str(TINY), "--shutdown-timeout", "-1"]) == 2
    assert "--shutdown-timeout must be >= 0" in capsys.readouterr().err


def fake_slurm_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PATH=os.pathsep.join([str(FAKE_SLURM), os.environ["PATH"]]), **extra)


def test_requeue_exit_makes_the_script_requeue_the_job(tmp_path):
    out = tmp_path / "run"
    requeued = tmp_path / "requeued"
    env = fake_slurm_env(FAKE_SRUN_EXIT="42", FAKE_SLURM_REQUEUED=str(requeued), FAKE_SLURM_JOB_ID="77")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "launch", str(TINY), f"run.out_dir={out}",
                           "--slurm", "--nodes", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_REQUEUE, proc.stdout + proc.stderr
    assert "Submitted batch job 77" in proc.stdout
    assert requeued.read_text().split() == ["77"]
    log = (out / "logs" / "slurm" / "tiny-77.out").read_text()
    assert "requeueing" in log and "master 127.0.0.1:" in log


def test_submit_without_sbatch_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["launch", str(TINY), f"run.out_dir={tmp_path}", "--slurm"]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert (tmp_path / "logs" / "slurm" / "tiny.sbatch").is_file()


def preempted_launch(tmp_path: Path, codes: str, launcher_name: str = "torchrun",
                     to_ranks: bool = False) -> tuple[int, str, bool]:
    """A runner over tests/launch/torchrun_ranks.py's ranks, sent SIGTERM once every rank is
    ready (with `to_ranks`: the ranks are, the launcher is not): (its exit status, its output,
    whether it created the requeue marker)."""
    marker = tmp_path / "requeue"
    env = dict(os.environ, **{runners.REQUEUE_MARKER_ENV: str(marker)})
    launcher = subprocess.Popen([sys.executable, "-m", "tests.launch.torchrun_ranks", "launch", codes, str(tmp_path),
                                 launcher_name], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    ready = [tmp_path / f"ready{rank}" for rank in range(len(codes.split(",")))]
    deadline = time.monotonic() + 60
    while not all(path.exists() for path in ready) and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in [int(path.read_text()) for path in ready] if to_ranks else [launcher.pid]:
        os.kill(pid, signal.SIGTERM)
    output, _ = launcher.communicate(timeout=60)
    return launcher.returncode, output, marker.exists()


@pytest.mark.parametrize("codes, status, line", [
    ("42,42", EXIT_REQUEUE, "stopped, this launcher received SIGTERM: code 42 (preempted, state saved)"),
    ("42,4", 4, "rank 1 exited with code 4 (a checkpoint error) after this launcher received SIGTERM"),
    ("42,killed", 128 + signal.SIGTERM, "rank 1 died: SIGTERM after this launcher received SIGTERM"),
    ("0,0", 0, "all ranks finished"),
])
def test_torchrun_preemption_passes_on_42_only_when_every_rank_saved(tmp_path, codes, status, line):
    """A failed save, or a rank killed before it could save, must not be requeued as saved."""
    returncode, output, requeue_marker = preempted_launch(tmp_path, codes)
    assert returncode == status, output
    assert f"dit launch: {line}" in output
    assert requeue_marker == (status == EXIT_REQUEUE)


@pytest.mark.parametrize("launcher_name, codes, to_ranks, status, line", [
    ("deepspeed", "42,late:4", False, 4, "rank 1 exited with code 4 (a checkpoint error) after this launcher received SIGTERM"),
    ("deepspeed", "42,late:4", True, 4, "rank 1 exited with code 4 (a checkpoint error); its log"),
    ("torchrun", "42,late:4", True, 4, "rank 1 exited with code 4 (a checkpoint error); its log"),
    ("deepspeed", "42,42", False, EXIT_REQUEUE, "stopped, this launcher received SIGTERM: code 42 (preempted, state saved)"),
    ("torchrun", "42,42", True, EXIT_REQUEUE, "stopped, every rank saved: code 42 (preempted, state saved)"),
])
def test_a_ranks_42_does_not_hide_a_peers_failure(tmp_path, launcher_name, codes, to_ranks, status, line):
    """The engines report the first dead rank they meet and stop the others unseen (the DeepSpeed
    launcher also when this command forwarded the signal): rank 0's 42 must not hide rank 1, still
    saving, failing with 4 on the SIGTERM the engine sends it once rank 0 is gone."""
    returncode, output, requeue_marker = preempted_launch(tmp_path, codes, launcher_name, to_ranks)
    assert returncode == status, output
    assert f"dit launch: {line}" in output
    assert requeue_marker == (status == EXIT_REQUEUE)


@pytest.mark.parametrize("option", [["--dry-run"], ["--nodes", "4"], ["--gpus-per-node", "8"], ["--time", "1:00:00"],
                                    ["--sbatch-option=--qos=high"], ["--job-name", "x"]])
def test_slurm_options_without_slurm_fail_before_anything_starts(monkeypatch, capsys, option):
    """A local launch ignored them: `--dry-run --nodes 4` trained 1 rank for real."""
    monkeypatch.setattr(runners, "RUNNERS", {})
    assert main(["launch", str(TINY), "--launcher", "torchrun", *option]) == 2
    assert f"{option[0].split('=')[0]} only applies with --slurm" in capsys.readouterr().err


def test_more_ranks_per_node_than_gpus_fail_before_anything_starts(monkeypatch, capsys):
    """A rank without a GPU of its own fails at torch.cuda.set_device, after the allocation."""
    monkeypatch.setattr(runners, "RUNNERS", {})
    monkeypatch.setattr(launch_job, "gpus_here", lambda: 2)  # this machine has none: pretend it has 2
    assert main(["launch", str(TINY), "--nproc-per-node", "4"]) == 2
    assert "4 ranks on this node but it has 2 GPU(s)" in capsys.readouterr().err
    assert main(["launch", str(TINY), "run.out_dir=/tmp/x", "--slurm", "--dry-run", "--gpus-per-node", "2",
                 "--nproc-per-node", "4"]) == 2
    assert "--nproc-per-node 4 is more than --gpus-per-node 2" in capsys.readouterr().err


def launched_job(monkeypatch, launcher_name: str, *argv: str) -> Job:
    """The job `dit launch TINY --launcher NAME *argv` would run (the runner records it instead)."""
    jobs: list[Job] = []
    monkeypatch.setattr(runners, "RUNNERS", {launcher_name: lambda job, *_: jobs.append(job) or Outcome(0)})
    assert main(["launch", str(TINY), "--launcher", launcher_name, *argv]) == 0
    return jobs[0]


def test_one_node_torchrun_meets_at_the_given_master_port(monkeypatch, tmp_path):
    from torch.distributed.run import config_from_args, parse_args

    given = launched_job(monkeypatch, "torchrun", "--master-port", "29777")
    assert config_from_args(parse_args(torchrun_args(given, tmp_path)))[0].rdzv_endpoint == "127.0.0.1:29777"
    assert "--rdzv-endpoint=127.0.0.1:29778" in torchrun_args(given, tmp_path, attempt=1)
    assert "--standalone" in torchrun_args(launched_job(monkeypatch, "torchrun"), tmp_path)


@pytest.mark.parametrize("host, remote", [("gpu-node-7", True), ("localhost", False), ("127.0.0.1", False)])
def test_a_hostfile_of_one_other_host_runs_there_over_ssh(monkeypatch, tmp_path, host, remote):
    """DeepSpeed runs a single host's ranks here unless told --force_multi."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{host} slots=1\n")
    one = launched_job(monkeypatch, "deepspeed", "--hostfile", str(hostfile))
    assert one.topology.over_ssh == remote
    assert ("--force_multi" in deepspeed_command(one, tmp_path, hostfile, {})) == remote
    assert (one.topology.master_port == 29500) == remote  # a free port here says nothing of another host
