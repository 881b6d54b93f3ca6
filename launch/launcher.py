"""`dit launch`: start `dit train CONFIG [overrides]` on every rank, from a laptop to a cluster.

The ranks are started by the existing engines, never by a process manager of our own:

    one machine   the DeepSpeed launcher (default) or torchrun (`--launcher torchrun`) starts
                  N ranks; rank 0's output is streamed, every rank's goes to a log file
    many machines `--hostfile FILE` (DeepSpeed/pdsh style: ssh to every host from here; with
                  `--node-rank R` each node is started by hand instead, no ssh), or
                  `--nnodes K --node-rank R --master-addr A --master-port P` on every node
                  (torchrun's static rendezvous; the DeepSpeed launcher gets the same topology
                  as a generated hostfile)
    SLURM         `--slurm` renders an sbatch script (launch/slurm.py) whose srun starts this
                  command with `--launcher torchrun` once per node of the allocation

The config is validated for the job's world size before any process starts. When a rank dies,
the engine stops the others (their collectives are bounded by deepspeed.comm_timeout_s) and
this command exits non-zero with one line naming the rank and the reason; with
`--max-restarts R` it relaunches the job, which resumes from the `latest` checkpoint.

Exit status: 0; the first failed rank's own code (2 config, 3 non-finite, 4 checkpoint,
42 preempted: state saved, rerun the same command); 128 + N when it was killed by signal N.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from trainer.config import RunConfig, load_config, validate

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("deepspeed", "torchrun")

# The trainer's exit codes (trainer/engine.py), repeated so that `dit launch --help` and
# `--slurm --dry-run` import neither torch nor DeepSpeed.
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4
EXIT_DATA = 5
EXIT_REQUEUE = 42
EXIT_MEANING = {
    1: "an uncaught exception",
    EXIT_CONFIG: "a config error",
    EXIT_NONFINITE: "too many non-finite steps in a row",
    EXIT_CHECKPOINT: "a checkpoint error",
    EXIT_DATA: "unusable data (see the skipped-sample warnings)",
    EXIT_REQUEUE: "preempted, state saved",
}
# A relaunch cannot fix these: the same config, data and checkpoint would fail the same way,
# and a preempted job must give its machines back (the scheduler requeues it).
NOT_RESTARTABLE = (EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_CHECKPOINT, EXIT_DATA, EXIT_REQUEUE)
# Signals after which the ranks save and exit with EXIT_REQUEUE (trainer/distributed.py).
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
POLL_S = 0.1  # how often the DeepSpeed-launcher helpers look at the process tree and logs


class LaunchError(RuntimeError):
    """A launch that cannot start; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# What to start, where.


@dataclass(frozen=True)
class Topology:
    """Where the ranks run.

    nproc_per_node 0 takes the slots of the hostfile. node_rank None: this node starts every
    node (single machine, or pdsh over ssh); otherwise this command runs once per node.
    master_addr "": the first host (or loopback); master_port 0: a free local port.
    """

    nproc_per_node: int
    nnodes: int = 1
    node_rank: Optional[int] = None
    master_addr: str = ""
    master_port: int = 0
    hostfile: str = ""
    hosts: tuple[tuple[str, int], ...] = ()  # (host, slots) of the hostfile

    @property
    def world_size(self) -> int:
        if self.hosts:
            return sum(self.nproc_per_node or slots for _, slots in self.hosts)
        return self.nnodes * self.nproc_per_node

    @property
    def local_ranks(self) -> int:
        if self.hosts and self.node_rank is not None:
            return self.nproc_per_node or self.hosts[self.node_rank][1]
        return self.nproc_per_node or max(slots for _, slots in self.hosts)


@dataclass(frozen=True)
class Job:
    config: str  # absolute path of the YAML run config
    overrides: tuple[str, ...]
    launcher: str
    topology: Topology
    log_dir: Path  # per-rank logs, one folder per attempt
    gpu: bool
    max_restarts: int = 0
    shutdown_timeout_s: int = 100  # SIGTERM -> SIGKILL grace for a preempted rank's last save

    def rank_command(self) -> list[str]:
        """What each rank runs after `python -u -m`."""
        return ["launch.cli", "train", self.config, *self.overrides]


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended. status: 0, a rank's exit code, or -N when killed by signal N."""

    status: int
    rank: Optional[int] = None
    reason: str = ""
    log: Optional[Path] = None  # the failed rank's log file, when known

    @property
    def exit_code(self) -> int:
        return 128 - self.status if self.status < 0 else self.status

    def summary(self) -> str:
        """One line: 'rank 1 died: SIGKILL'."""
        if self.status == EXIT_OK:
            return "all ranks finished"
        if self.rank is None and self.reason:
            return f"stopped, {self.reason}: {describe_status(self.status)}"
        who = f"rank {self.rank}" if self.rank is not None else "a rank"
        what = f"died: {describe_status(self.status)}" if self.status < 0 else f"exited with {describe_status(self.status)}"
        return f"{who} {what}" + (f"; its log: {self.log}" if self.log else "")


def describe_status(status: int) -> str:
    """-9 -> 'SIGKILL'; 3 -> 'code 3 (too many non-finite steps in a row)'."""
    if status < 0:
        try:
            return signal.Signals(-status).name
        except ValueError:
            return f"signal {-status}"
    meaning = EXIT_MEANING.get(status)
    return f"code {status}" + (f" ({meaning})" if meaning else "")


def read_hostfile(path: str) -> tuple[tuple[str, int], ...]:
    """`HOST slots=N` lines (DeepSpeed/pdsh/MPI style, '#' comments) -> ((HOST, N), ...)."""
    if not Path(path).is_file():
        raise LaunchError(f"--hostfile {path}: no such file")
    hosts: list[tuple[str, int]] = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if match is None:
            raise LaunchError(f"--hostfile {path}:{number}: '{raw.strip()}' is not 'HOST slots=N'")
        if any(host == match[1] for host, _ in hosts):
            raise LaunchError(f"--hostfile {path}:{number}: host {match[1]} is listed twice")
        hosts.append((match[1], int(match[2])))
    if not hosts:
        raise LaunchError(f"--hostfile {path}: it lists no 'HOST slots=N' line")
    return tuple(hosts)


def free_port() -> int:
    """A TCP port that is free on this machine now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(base: dict[str, str], job: Job) -> dict[str, str]:
    """The environment every rank needs, set in this one place.

    The engines set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT per rank, so
    values inherited from an enclosing job are dropped. The repository goes on PYTHONPATH
    (`-m launch.cli` from any directory); DeepSpeed gets its CPU accelerator on machines
    without a GPU; each rank gets its share of the cores as OpenMP threads.
    """
    inherited = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in base.items() if k not in inherited}
    paths = [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // job.topology.local_ranks)))
    if not job.gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


# ---------------------------------------------------------------------------------------------
# Command lines of the engines.


def torchrun_args(job: Job, attempt_dir: Path, attempt: int = 0) -> list[str]:
    """Arguments of `python -m torch.distributed.run` on this node.

    Attempt k of a multi-node job meets at --master-port + k: the agent of node 0 runs in this
    process, and its rendezvous store of the failed attempt (keys and all) still holds the port.
    Every node restarts after a failure, so all of them count the same attempts.
    """
    t = job.topology
    args = [f"--nproc-per-node={t.nproc_per_node}"]
    if t.nnodes > 1 or t.master_addr:
        args += [f"--nnodes={t.nnodes}", f"--node-rank={t.node_rank or 0}",
                 f"--master-addr={t.master_addr or '127.0.0.1'}", f"--master-port={t.master_port + attempt}"]
    else:
        args.append("--standalone")  # c10d rendezvous on a free local port
    return args + [
        "--max-restarts=0",  # restarts are ours: a preempted (42) job must not be restarted
        f"--log-dir={attempt_dir}", "--tee=3", "--local-ranks-filter=0",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        f"--shutdown-timeout={job.shutdown_timeout_s}",
        "--module", *job.rank_command(),
    ]


def node_hostfile(t: Topology) -> str:
    """The hostfile the DeepSpeed launcher needs for `--nnodes K` without one: K placeholder
    hosts; with --no_ssh only their order (the node rank) and slots matter."""
    return "".join(f"node{i} slots={t.nproc_per_node}\n" for i in range(t.nnodes))


def deepspeed_command(job: Job, attempt_dir: Path, hostfile: Optional[Path]) -> list[str]:
    """The DeepSpeed launcher (`deepspeed`, i.e. its runner module) on this node."""
    t = job.topology
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--log_level=warning"]
    if hostfile is not None:
        cmd.append(f"--hostfile={hostfile}")
    if t.nproc_per_node:
        cmd.append(f"--num_gpus={t.nproc_per_node}")
    if t.master_addr:
        cmd.append(f"--master_addr={t.master_addr}")
    cmd.append(f"--master_port={t.master_port}")
    if t.node_rank is not None:
        cmd += ["--no_ssh", f"--node_rank={t.node_rank}"]
    return cmd + ["--module", "--no_local_rank", f"--enable_each_rank_log={attempt_dir}", *job.rank_command()]


# ---------------------------------------------------------------------------------------------
# One attempt through torchrun.


def use_environment(env: dict[str, str]) -> None:
    """Make `env` this process's environment (torchrun's agent runs here and copies it)."""
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    os.environ.update(env)


def torchrun_log(attempt_dir: Path, local_rank: int) -> Optional[Path]:
    """torchrun's log of a local rank: LOG_DIR/<run id>/attempt_0/<local rank>/stderr.log."""
    logs = sorted(attempt_dir.glob(f"*/attempt_*/{local_rank}/stderr.log"))
    return logs[-1] if logs else None


def run_torchrun(job: Job, attempt_dir: Path, attempt: int) -> Outcome:
    """torchrun's own agent, in this process, so that its failure report (the first failed
    rank, its exit code or signal) comes back as an exception rather than text to parse."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun_args(job, attempt_dir, attempt)
    print(f"dit launch: {sys.executable} -m torch.distributed.run {shlex.join(args)}", flush=True)
    use_environment(rank_environment(dict(os.environ), job))
    try:
        torchrun.run(torchrun.parse_args(args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        return Outcome(failure.exitcode, rank, log=torchrun_log(attempt_dir, failure.local_rank))
    except SignalException as e:
        sig = signal.Signals(e.sigval)
        if sig in PREEMPT_SIGNALS:  # forwarded to the ranks, which save and exit
            return Outcome(EXIT_REQUEUE, reason=f"this launcher received {sig.name}")
        return Outcome(-sig.value, reason=f"this launcher received {sig.name}")
    return Outcome(EXIT_OK)


# ---------------------------------------------------------------------------------------------
# One attempt through the DeepSpeed launcher. It reports only an exit code and prints every
# rank, so two helpers watch it: which rank died first, and rank 0's log on the console.


class _Background:
    """A daemon thread running `_run` for the duration of a `with` block; `_run` polls until
    `self._stop` is set."""

    def __init__(self, name: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        raise NotImplementedError


class RankWatcher(_Background):
    """Follows the launcher's process tree and records the first rank seen dead (exited, or a
    zombie its launcher has not reaped yet)."""

    def __init__(self, root_pid: int):
        import psutil

        super().__init__("rank-watcher")
        self._psutil = psutil
        self._root = psutil.Process(root_pid)
        self._ranks: dict[int, tuple[int, "psutil.Process"]] = {}  # pid -> (rank, process)
        self.first_dead: Optional[int] = None

    def pids(self) -> list[int]:
        return list(self._ranks)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S) and self.first_dead is None:
            self._discover()
            for pid, (rank, proc) in list(self._ranks.items()):
                if not self._alive(proc):
                    self.first_dead = rank
                    break

    def _discover(self) -> None:
        """Ranks are the processes with RANK whose parent has none (the engine's agent):
        programs a rank runs itself (compilers, loader workers) inherit RANK but are not ranks."""
        try:
            children = self._root.children(recursive=True)
        except self._psutil.Error:
            return
        for proc in children:
            if proc.pid in self._ranks:
                continue
            try:
                rank = proc.environ().get("RANK")
                parent_rank = proc.parent().environ().get("RANK") if proc.parent() else None
            except self._psutil.Error:
                continue
            if rank is not None and parent_rank is None:
                self._ranks[proc.pid] = (int(rank), proc)

    def _alive(self, proc) -> bool:
        try:
            return proc.is_running() and proc.status() != self._psutil.STATUS_ZOMBIE
        except self._psutil.Error:
            return False


class LogFollower(_Background):
    """Copies the log of this node's first rank (`*_rank<N>.log`, lowest N) to the console
    while the DeepSpeed launcher runs, then what is left of it once the launcher is done."""

    def __init__(self, folder: Path, out=None):
        super().__init__("log-follower")
        self.folder = folder
        self.out = out or sys.stdout

    def first_rank_log(self) -> Optional[Path]:
        logs = [(int(m[1]), p) for p in self.folder.glob("*_rank*.log")
                if (m := re.search(r"_rank(\d+)\.log$", p.name))]
        return min(logs)[1] if logs else None

    def _run(self) -> None:
        path = self.first_rank_log()
        while path is None and not self._stop.wait(POLL_S):
            path = self.first_rank_log()
        if path is None:
            return
        with open(path, errors="replace") as f:
            while True:
                stopping = self._stop.is_set()  # read before draining: nothing is lost
                chunk = f.read()
                if chunk:
                    self.out.write(chunk)
                    self.out.flush()
                if stopping:
                    return
                self._stop.wait(POLL_S)


def deepspeed_status(returncode: int) -> int:
    """The launcher's exit code as a rank status: DeepSpeed exits with `sys.exit(-N)` when a
    rank was killed by signal N, which the shell sees as 256 - N."""
    if returncode > 128 and 256 - returncode in signal.Signals._value2member_map_:
        return returncode - 256
    return returncode


def rank_log(folder: Path, rank: Optional[int]) -> Optional[Path]:
    logs = sorted(folder.glob(f"*_rank{rank}.log")) if rank is not None else []
    return logs[-1] if logs else None


class ForwardSignals:
    """While the DeepSpeed launcher runs, SIGTERM/SIGUSR1 sent to this command go to the
    ranks themselves (which save and exit with 42), as torchrun's agent does."""

    def __init__(self, watcher: RankWatcher):
        self.watcher = watcher
        self.received: Optional[signal.Signals] = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "ForwardSignals":
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, _frame) -> None:
        self.received = signal.Signals(signum)
        for pid in self.watcher.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                continue


def run_deepspeed(job: Job, attempt_dir: Path, attempt: int) -> Outcome:
    """The DeepSpeed launcher as a child process (each attempt's rendezvous dies with it)."""
    hostfile = Path(job.topology.hostfile) if job.topology.hostfile else None
    if hostfile is None and job.topology.nnodes > 1:
        hostfile = attempt_dir / "hostfile"
        hostfile.write_text(node_hostfile(job.topology))
    cmd = deepspeed_command(job, attempt_dir, hostfile)
    print(f"dit launch: {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=rank_environment(dict(os.environ), job))
    with RankWatcher(proc.pid) as watcher, ForwardSignals(watcher) as forward, LogFollower(attempt_dir):
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the engine too; it stops its ranks
            returncode = proc.wait()
    status = deepspeed_status(returncode)
    if status == EXIT_OK:
        return Outcome(EXIT_OK)
    if forward.received is not None:
        return Outcome(status, reason=f"this launcher received {forward.received.name}")
    return Outcome(status, watcher.first_dead, log=rank_log(attempt_dir, watcher.first_dead))


# ---------------------------------------------------------------------------------------------
# The job: attempts and restarts.

RUNNERS: dict[str, Callable[[Job, Path, int], Outcome]] = {"deepspeed": run_deepspeed, "torchrun": run_torchrun}


def print_log_tail(path: Optional[Path], lines: int = 15) -> None:
    if path is None or not path.is_file():
        return
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    if tail:
        print(f"dit launch: last lines of {path}:", *("    " + line for line in tail), sep="\n",
              file=sys.stderr, flush=True)


def run_job(job: Job) -> int:
    """Run the job; relaunch it up to `max_restarts` times after a crash (each relaunch
    resumes from `latest`). Returns this command's exit status."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(job.max_restarts + 1):
        attempt_dir = job.log_dir / f"{stamp}-attempt{attempt}"
        attempt_dir.mkdir(parents=True, exist_ok=True)
        outcome = RUNNERS[job.launcher](job, attempt_dir, attempt)
        print(f"dit launch: {outcome.summary()}", file=sys.stderr, flush=True)
        if outcome.status == EXIT_OK:
            return EXIT_OK
        print_log_tail(outcome.log)
        if outcome.status == EXIT_REQUEUE:
            print("dit launch: preempted: the ranks saved a checkpoint; rerun the same command "
                  "(or let the scheduler requeue it) to resume.", file=sys.stderr, flush=True)
        if outcome.status in NOT_RESTARTABLE or attempt == job.max_restarts:
            return outcome.exit_code
        print(f"dit launch: restart {attempt + 1} of {job.max_restarts}: relaunching; the ranks "
              f"resume from the latest checkpoint.", file=sys.stderr, flush=True)
    raise AssertionError("unreachable: the last attempt returns")


# ---------------------------------------------------------------------------------------------
# From the command line to a Job.


def gpus_here() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def topology_from_args(args: argparse.Namespace, gpus: int) -> Topology:
    """Check the multi-node flags against each other and fill in what was left out."""
    if args.hostfile and args.launcher == "torchrun":
        raise LaunchError("--hostfile is read by the DeepSpeed launcher; with --launcher torchrun "
                          "run this command on every node with --nnodes, --node-rank and --master-addr")
    hosts = read_hostfile(args.hostfile) if args.hostfile else ()
    if hosts and args.nnodes not in (None, len(hosts)):
        raise LaunchError(f"--nnodes {args.nnodes} disagrees with the {len(hosts)} hosts of {args.hostfile}")
    nnodes = len(hosts) if hosts else (args.nnodes or 1)
    if args.node_rank is not None and not 0 <= args.node_rank < nnodes:
        raise LaunchError(f"--node-rank {args.node_rank} is outside [0, {nnodes}) nodes")
    if nnodes > 1 and not hosts and (args.node_rank is None or not args.master_addr or not args.master_port):
        raise LaunchError("a job of --nnodes > 1 needs --node-rank, --master-addr and --master-port on "
                          "every node (or a --hostfile for the DeepSpeed launcher)")
    nproc = args.nproc_per_node if args.nproc_per_node is not None else (0 if hosts else max(gpus, 1))
    if nproc < 0 or (nproc == 0 and not hosts):
        raise LaunchError(f"--nproc-per-node must be at least 1, not {nproc}")
    master_addr = args.master_addr or (hosts[0][0] if hosts and args.node_rank is not None else "")
    single = nnodes == 1 and not master_addr
    port = args.master_port or (free_port() if single else 29500)
    return Topology(nproc, nnodes, args.node_rank, master_addr, port, args.hostfile or "", hosts)


def check_config(config: str, overrides: list[str], world_size: int) -> RunConfig:
    """Load and validate the run config for this world size: fails fast, naming the key."""
    from trainer.stages import preflight

    cfg = load_config(config, overrides)
    validate(cfg, world_size=world_size)
    preflight(cfg)
    return cfg


def job_from_args(args: argparse.Namespace) -> Job:
    gpus = gpus_here()
    topology = topology_from_args(args, gpus)
    cfg = check_config(args.config, args.overrides, topology.world_size)
    from launch.train_cmd import resume_config

    _, refusal, _ = resume_config(cfg, topology.world_size)
    if refusal is not None:
        raise ResumeRefused(refusal)
    node = f"node{topology.node_rank}" if topology.node_rank is not None else "node0"
    return Job(
        config=str(Path(args.config).resolve()),
        overrides=tuple(args.overrides),
        launcher=args.launcher,
        topology=topology,
        log_dir=Path(cfg.log.dir).resolve() / "launch" / node,
        gpu=gpus > 0,
        max_restarts=args.max_restarts,
        shutdown_timeout_s=args.shutdown_timeout,
    )


class ResumeRefused(RuntimeError):
    """The checkpoint the job would resume from was written by another job shape or config."""


def launch(args: argparse.Namespace) -> int:
    """`dit launch`: validate, then run here (or submit to SLURM with --slurm)."""
    if args.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, not {args.max_restarts}")
    from launch.train_cmd import overrides_of

    args.overrides = overrides_of(args)
    try:
        if args.slurm:
            from launch.slurm import submit

            return submit(args)
        return run_job(job_from_args(args))
    except LaunchError as e:
        print(f"dit launch: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ResumeRefused as e:
        print(f"dit launch: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stage.steps=200")
    p.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed",
                   help="the engine that starts the ranks (default: deepspeed)")
    p.add_argument("--nproc-per-node", type=int, help="ranks per node (default: the GPUs here, or 1; "
                   "with --hostfile: its slots)")
    multi = p.add_argument_group("multi-node")
    multi.add_argument("--hostfile", help="DeepSpeed/pdsh hostfile ('HOST slots=N' lines); without "
                       "--node-rank every host is started from here over ssh")
    multi.add_argument("--nnodes", type=int, help="number of nodes (torchrun rendezvous)")
    multi.add_argument("--node-rank", type=int, help="this node's rank in [0, nnodes)")
    multi.add_argument("--master-addr", help="address of node 0, reachable from every node")
    multi.add_argument("--master-port", type=int, help="a free port on node 0 (default: 29500; one "
                       "machine: any free port)")
    faults = p.add_argument_group("failures")
    from launch.train_cmd import add_resume_arguments

    add_resume_arguments(faults)
    faults.add_argument("--max-restarts", type=int, default=0,
                        help="relaunch a crashed job up to R times; it resumes from `latest`")
    faults.add_argument("--shutdown-timeout", type=int, default=100,
                        help="seconds the ranks get to save after SIGTERM/SIGUSR1 before SIGKILL")
    from launch.slurm import add_slurm_arguments

    add_slurm_arguments(p.add_argument_group("SLURM"))
    p.set_defaults(func=launch)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `dit launch` to the top-level subcommands of `dit`."""
    help_ = "start `dit train` on one or many machines (local, hostfile, torchrun, SLURM)"
    add_arguments(sub.add_parser("launch", help=help_, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter))
