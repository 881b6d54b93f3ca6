"""How a `dit launch` job runs on this node: one attempt through torchrun's agent or the
DeepSpeed launcher, and the attempts with restarts.

The ranks are started by the existing engines, never by a process manager of our own. When a
rank dies, the engine stops the others (their collectives are bounded by
deepspeed.comm_timeout_s) and the attempt's outcome names the rank and the reason; with
`max_restarts` the job is relaunched and resumes from the `latest` checkpoint. An attempt ends
with 42 (preempted, state saved) only when every rank of this node exited with 42, whichever
rank the engine reports (ranks_outcome, over the codes the ranks record: record_exit).
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from launch.job import (Job, LaunchError, Topology, free_port, rank_environment, remote_environment,
                        visible_gpus)
from launch.watch import PREEMPT_SIGNALS, ForwardSignals, LogFollower, RankWatcher
from trainer.codes import (EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA, EXIT_MEANING, EXIT_NONFINITE, EXIT_OK,
                           EXIT_REQUEUE)

# A relaunch cannot fix these: the same config, data and checkpoint would fail the same way,
# and a preempted job must give its machines back (the scheduler requeues it).
NOT_RESTARTABLE = (EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_CHECKPOINT, EXIT_DATA, EXIT_REQUEUE)

# Set by the SLURM script (launch/slurm.py): the file this node's launcher creates when its
# ranks saved and exited with 42, so that the script requeues the job whatever status srun
# reports (with --kill-on-bad-exit the other nodes are killed, and srun may report 137).
REQUEUE_MARKER_ENV = "DIT_REQUEUE_MARKER"

# Set for the ranks of this node: the folder where `dit train` records the code each rank exits
# with (record_exit). The engines report the first dead rank they meet and reap or kill the
# others unseen, so a rank's 42 (saved) could hide a peer's failure.
EXIT_RECORDS_ENV = "DIT_EXIT_RECORDS"


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended. status: 0, a rank's exit code, or -N when killed by signal N."""

    status: int
    rank: Optional[int] = None
    reason: str = ""
    log: Optional[Path] = None  # the failed rank's log file, when known
    stopped: bool = False  # this launcher was told to stop (Ctrl-C, SIGHUP): never restarted

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
        after = f" after {self.reason}" if self.reason else ""
        return f"{who} {what}{after}" + (f"; its log: {self.log}" if self.log else "")


def describe_status(status: int) -> str:
    """-9 -> 'SIGKILL'; 3 -> 'code 3 (too many non-finite steps in a row)'."""
    if status < 0:
        try:
            return signal.Signals(-status).name
        except ValueError:
            return f"signal {-status}"
    meaning = EXIT_MEANING.get(status)
    return f"code {status}" + (f" ({meaning})" if meaning else "")


# ---------------------------------------------------------------------------------------------
# Command lines of the engines.


def torchrun_args(job: Job, attempt_dir: Path, attempt: int = 0) -> list[str]:
    """Arguments of `python -m torch.distributed.run` on this node.

    Attempt k of a multi-node job meets at --master-port + k: the agent of node 0 runs in this
    process, and its rendezvous store of the failed attempt (keys and all) still holds the port.
    Every node restarts after a failure, so all of them count the same attempts. One machine
    meets on loopback at --master-port (+ k) when one was given (torchrun's --standalone would
    pick its own port), else on a free port.
    """
    t = job.topology
    args = [f"--nproc-per-node={t.nproc_per_node}"]
    if t.nnodes > 1 or t.master_addr:
        args += [f"--nnodes={t.nnodes}", f"--node-rank={t.node_rank or 0}",
                 f"--master-addr={t.master_addr or '127.0.0.1'}", f"--master-port={t.master_port + attempt}"]
    elif t.master_port:
        args += ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{t.master_port + attempt}"]
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


def remote_shell_args(args: list[str]) -> list[str]:
    """`args` as the DeepSpeed launcher must get them to reach the ranks of a pdsh job intact.

    pdsh joins the command line with spaces and the remote shell parses it again; DeepSpeed
    (PDSHRunner.parse_user_args) only wraps an argument holding a space in double quotes,
    escaping nothing but `"`. So a brace pattern would be expanded on every host
    (shards-{00000..00009}.tar: ten arguments) and `$5` in a prompt replaced. An argument
    without a space is quoted here for the shell; one with a space gets the escapes a
    double-quoted word needs (`\\`, `$`, `` ` ``) and DeepSpeed adds the quotes and `\\"`.
    """
    def quote(arg: str) -> str:
        if " " not in arg:
            return shlex.quote(arg)
        return arg.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`")

    return [quote(arg) for arg in args]


def include_visible_gpus(job: Job, env: dict[str, str], hostfile: Optional[Path]) -> Optional[str]:
    """The --include of the DeepSpeed launcher that keeps CUDA_VISIBLE_DEVICES, or None.

    Given --num_gpus, DeepSpeed drops CUDA_VISIBLE_DEVICES and its ranks get GPUs 0..N-1, so
    `CUDA_VISIBLE_DEVICES=4,5,6,7 dit launch` would train on GPUs 0-3. With a hostfile every
    node's ranks get 0..N-1 of its slots, which only a prefix 0,1,.. of the ids agrees with."""
    ids = visible_gpus(env) if job.gpu and not job.topology.over_ssh else None
    if ids is None:
        return None
    n = job.topology.local_ranks
    if n > len(ids):
        raise LaunchError(f"--nproc-per-node {n} is more than the {len(ids)} GPUs of "
                          f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}")
    if hostfile is not None:
        if ids[:n] != list(range(n)):
            raise LaunchError(f"with a hostfile (or --nnodes) the DeepSpeed launcher gives this node's ranks GPUs "
                              f"0..{n - 1} whatever CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} says: "
                              "use --launcher torchrun, which keeps it, or unset it")
        return None
    return "localhost:" + ",".join(map(str, ids[:n]))


def deepspeed_command(job: Job, attempt_dir: Path, hostfile: Optional[Path],
                      env: Optional[dict[str, str]] = None, attempt: int = 0) -> list[str]:
    """The DeepSpeed launcher (`deepspeed`, i.e. its runner module) on this node; `env`: the
    environment it will run in (default: this process's).

    Attempt k meets at --master-port + k, as torchrun's (`torchrun_args`): with `--node-rank`
    every node restarts on its own, and a node that relaunched first joined the store the failed
    attempt's rank 0 still held on the port (it was waiting for a save): its new rank hung there
    and node 0's attempt timed out waiting for it. Without --master-port: a free port."""
    t = job.topology
    include = include_visible_gpus(job, dict(os.environ) if env is None else env, hostfile)
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--log_level=warning"]
    if hostfile is not None:
        cmd.append(f"--hostfile={hostfile}")
    if t.over_ssh and len(t.hosts) == 1:
        cmd.append("--force_multi")  # else DeepSpeed runs a hostfile's single host here
    if include is not None:
        cmd.append(f"--include={include}")
    elif t.nproc_per_node:
        cmd.append(f"--num_gpus={t.nproc_per_node}")
    if t.master_addr:
        cmd.append(f"--master_addr={t.master_addr}")
    cmd.append(f"--master_port={t.master_port + attempt if t.master_port else free_port()}")
    if t.node_rank is not None:
        cmd += ["--no_ssh", f"--node_rank={t.node_rank}"]
    module, *args = job.rank_command()
    if t.over_ssh:
        args = remote_shell_args(args)
    return cmd + ["--module", "--no_local_rank", f"--enable_each_rank_log={attempt_dir}", module, *args]


def deepspeed_env_line(key: str, value: str) -> Optional[str]:
    """`KEY=VALUE` for DeepSpeed's `.deepspeed_env` file, or None when the file cannot carry it.

    DeepSpeed strips the value and wraps it in double quotes when it holds anything but
    [\\w@%+=:,./-], escaping nothing: `\\`, `"`, `$` and `` ` `` are escaped here so that the
    remote shell gives the ranks the value itself. A line per variable: no newline in it."""
    if not key.isidentifier() or "\n" in value or "\r" in value or value != value.strip():
        return None
    for char in ("\\", '"', "$", "`"):
        value = value.replace(char, "\\" + char)
    return f"{key}={value}"


def write_deepspeed_env(job: Job, base: dict[str, str], path: Path) -> Path:
    """The environment of the ranks on the other hosts of a pdsh job, as a `.deepspeed_env`
    file for DS_ENV_FILE (job.remote_environment). DS_ENV_FILE replaces DeepSpeed's own search
    for `~/.deepspeed_env` and `./.deepspeed_env`, so their lines are kept, ours winning."""
    env: dict[str, str] = {}
    for own in (Path.home() / ".deepspeed_env", Path(".deepspeed_env")):
        if own.is_file():
            env.update(line.split("=", 1) for line in own.read_text().splitlines() if "=" in line)
    env.update(remote_environment(base, job))
    lines = []
    for key, value in env.items():
        line = deepspeed_env_line(key, value)
        if line is None:
            print(f"dit launch: warning: {key} is not passed to the other hosts (a line of {path} cannot hold "
                  "its value)", file=sys.stderr, flush=True)
        else:
            lines.append(line)
    path.write_text("".join(line + "\n" for line in lines))  # DeepSpeed splits every line at '='
    return path


def deepspeed_environment(job: Job, base: dict[str, str], attempt_dir: Path) -> dict[str, str]:
    """The environment of the DeepSpeed launcher: the ranks' (job.rank_environment); for a pdsh
    job DS_ENV_FILE names the file that carries it to the other hosts."""
    env = rank_environment(base, job)
    if job.topology.over_ssh:
        env["DS_ENV_FILE"] = str(write_deepspeed_env(job, base, attempt_dir / "deepspeed_env"))
    else:  # the ranks run here: they record how they end (record_exit)
        env[EXIT_RECORDS_ENV] = exit_records_dir(attempt_dir)
    return env


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
    use_environment({**rank_environment(dict(os.environ), job), EXIT_RECORDS_ENV: exit_records_dir(attempt_dir)})
    first = first_rank(job.topology)
    try:
        torchrun.run(torchrun.parse_args(args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == EXIT_REQUEUE:  # the agent stopped the others unseen: did every rank save?
            seen = {failed: failure.exitcode for failed, failure in e.failures.items()}
            return ranks_outcome(node_statuses(job, attempt_dir, seen), "",
                                 lambda rank: torchrun_log(attempt_dir, rank - first), stopped=False)
        return Outcome(failure.exitcode, rank, log=torchrun_log(attempt_dir, failure.local_rank))
    except SignalException as e:
        sig = signal.Signals(e.sigval)
        reason = f"this launcher received {sig.name}"
        if sig in PREEMPT_SIGNALS:  # forwarded to the ranks, which save and exit
            statuses = worker_statuses(e)
            return ranks_outcome(None if statuses is None else {first + local: s for local, s in statuses.items()},
                                 reason, lambda rank: torchrun_log(attempt_dir, rank - first))
        return Outcome(-sig.value, reason=reason, stopped=True)
    return Outcome(EXIT_OK)


def worker_statuses(error: BaseException) -> Optional[dict[int, int]]:
    """How each local rank of torchrun's agent ended after the agent shut them down on the
    signal `error` (its SignalException) carries: local rank -> 0, its exit code, or -N for
    signal N; None where they cannot be read.

    torchrun reports a signal as this exception alone, whatever the ranks did. Its agent (a
    local of torch's launch_agent) is the `self` of a frame the exception came through, and its
    process context, whose ranks are all gone by then, answers `wait(0)` with their failures."""
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

    tb = error.__traceback__
    while tb is not None:
        agent = tb.tb_frame.f_locals.get("self")
        context = getattr(agent, "_pcontext", None) if isinstance(agent, SimpleElasticAgent) else None
        if context is not None:
            result = context.wait(0)
            if result is None:  # a rank outlived its SIGKILL (uninterruptible sleep)
                return None
            failures = {rank: failure.exitcode for rank, failure in result.failures.items()}
            return {rank: failures.get(rank, EXIT_OK) for rank in context.pids()}
        tb = tb.tb_next
    return None


def exit_records_dir(attempt_dir: Path) -> str:
    """The folder of an attempt's exit records (EXIT_RECORDS_ENV)."""
    return str(attempt_dir / "exits")


def record_exit(code: int) -> int:
    """Record the code this rank exits with where its launcher reads it (EXIT_RECORDS_ENV, as
    `<folder>/rank<RANK>.exit`), then return it. A rank killed or crashed records nothing."""
    folder = os.environ.get(EXIT_RECORDS_ENV)
    if folder:
        path = Path(folder, f"rank{os.environ.get('RANK', '0')}.exit")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")  # renamed when complete: never read half written
        partial.write_text(f"{code}\n")
        partial.replace(path)
    return code


def node_statuses(job: Job, attempt_dir: Path, seen: dict[int, int]) -> dict[int, Optional[int]]:
    """How each rank of this node ended: the code it recorded (record_exit), else how the
    engine saw it end (`seen`: rank -> code, or -N for signal N), else None (not known)."""
    first = first_rank(job.topology)
    statuses: dict[int, Optional[int]] = {rank: seen.get(rank) for rank in range(first, first + job.topology.local_ranks)}
    for path in Path(exit_records_dir(attempt_dir)).glob("rank*.exit"):
        statuses[int(path.stem.removeprefix("rank"))] = int(path.read_text())
    return statuses


def first_rank(t: Topology) -> int:
    """The global rank of this node's local rank 0 (the engines number the ranks node by node,
    a hostfile's hosts in its order)."""
    if t.hosts and t.node_rank is not None:
        return sum(t.nproc_per_node or slots for _, slots in t.hosts[:t.node_rank])
    return (t.node_rank or 0) * t.local_ranks


def ranks_outcome(statuses: Optional[dict[int, Optional[int]]], reason: str,
                  log_of: Callable[[int], Optional[Path]], stopped: bool = True) -> Outcome:
    """The outcome of an attempt that a preemption ended (a signal to this launcher, or a rank's
    42) from how this node's ranks ended (rank -> 0, its exit code, -N for signal N, or None
    where it is not known): 42 only when every rank saved and exited with 42, 0 when every rank
    had finished; otherwise the first rank's own error, else the first one killed, so that a
    failed save is never requeued. Where that is not known (or the ranks disagree) the state
    counts as not saved (code 4). `log_of`: a rank's log; `stopped`: this launcher was told to stop."""
    def because(what: str) -> str:
        return "; ".join(part for part in (reason, what) if part)

    if statuses is None:
        return Outcome(EXIT_CHECKPOINT, reason=because("the ranks' exit codes could not be read, so their state "
                                                       "is not known to be saved"), stopped=True)
    ends = set(statuses.values())
    if ends <= {EXIT_OK}:
        return Outcome(EXIT_OK)
    if ends == {EXIT_REQUEUE}:
        return Outcome(EXIT_REQUEUE, reason=reason or "every rank saved")
    failed = {rank: status for rank, status in statuses.items() if status not in (EXIT_OK, EXIT_REQUEUE, None)}
    if failed:
        rank, status = min(failed.items(), key=lambda item: (item[1] < 0, item[0]))
        return Outcome(status, rank, reason=reason, log=log_of(rank), stopped=stopped)
    unknown = sorted(rank for rank, status in statuses.items() if status is None)
    if unknown:
        return Outcome(EXIT_CHECKPOINT, reason=because(f"rank {unknown[0]} ended without an exit code that could be "
                                                       "read, so its state is not known to be saved"), stopped=stopped)
    # some ranks had finished, the others saved: not one consistent state
    ended = ", ".join(f"rank {rank} {describe_status(status)}" for rank, status in sorted(statuses.items()))
    return Outcome(EXIT_CHECKPOINT, reason=because(f"the ranks ended differently ({ended})"), stopped=stopped)


# ---------------------------------------------------------------------------------------------
# One attempt through the DeepSpeed launcher, watched by the helpers of launch/watch.py.


def deepspeed_status(returncode: int) -> int:
    """The launcher's exit code as a rank status: DeepSpeed exits with `sys.exit(-N)` when a
    rank was killed by signal N, which the shell sees as 256 - N."""
    if returncode > 128 and 256 - returncode in signal.Signals._value2member_map_:
        return returncode - 256
    return returncode


def rank_log(folder: Path, rank: Optional[int]) -> Optional[Path]:
    logs = sorted(folder.glob(f"*_rank{rank}.log")) if rank is not None else []
    return logs[-1] if logs else None


PDSH_SIGNALS_NOTE = ("dit launch: note: the ranks of the other hosts run over pdsh/ssh: SIGTERM/SIGUSR1 sent to "
                     "this command stop the whole job through the DeepSpeed launcher (its ranks get SIGTERM and "
                     "30 s to save) and it is not restarted; for preemptible jobs run `dit launch --node-rank R` "
                     "on every node, use --launcher torchrun, or --slurm.")


def run_deepspeed(job: Job, attempt_dir: Path, attempt: int) -> Outcome:
    """The DeepSpeed launcher as a child process (each attempt's rendezvous dies with it)."""
    hostfile = Path(job.topology.hostfile) if job.topology.hostfile else None
    if hostfile is None and job.topology.nnodes > 1:
        hostfile = attempt_dir / "hostfile"
        hostfile.write_text(node_hostfile(job.topology))
    env = deepspeed_environment(job, dict(os.environ), attempt_dir)
    cmd = deepspeed_command(job, attempt_dir, hostfile, env, attempt)
    if any(arg.startswith("--include=") for arg in cmd):
        env.pop("CUDA_VISIBLE_DEVICES", None)  # DeepSpeed's launch.py sets it from --include
    print(f"dit launch: {shlex.join(cmd)}", flush=True)
    if job.topology.over_ssh:
        print(PDSH_SIGNALS_NOTE, file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env)
    with (RankWatcher(proc.pid) as watcher,
          ForwardSignals(watcher, job.shutdown_timeout_s, proc.pid if job.topology.over_ssh else None) as forward,
          LogFollower(attempt_dir)):
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:  # only before ForwardSignals took SIGINT over
            returncode = proc.wait()
    status = deepspeed_status(returncode)
    if status == EXIT_OK:
        return Outcome(EXIT_OK)
    sig = forward.received
    reason = f"this launcher received {sig.name}" if sig is not None else ""
    if sig is not None and (sig not in PREEMPT_SIGNALS or job.topology.over_ssh):
        # Ctrl-C or a hangup; or over pdsh any signal, on which DeepSpeed stopped every host.
        return Outcome(status if sig in PREEMPT_SIGNALS else -sig.value, reason=reason, stopped=True)
    preempted = sig is not None or EXIT_REQUEUE in (status, watcher.first_status)
    if preempted and not job.topology.over_ssh:  # 42 only when every rank of this node saved
        seen = {watcher.first_dead: watcher.first_status} if watcher.first_status is not None else {}
        return ranks_outcome(node_statuses(job, attempt_dir, seen), reason,
                             lambda rank: rank_log(attempt_dir, rank), stopped=sig is not None)
    if watcher.first_status is not None:  # how the first dead rank ended (see RankWatcher)
        status = watcher.first_status
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


def mark_requeue() -> None:
    """Tell the SLURM script that this node's ranks saved and exited with 42 (REQUEUE_MARKER_ENV)."""
    marker = os.environ.get(REQUEUE_MARKER_ENV)
    if marker:
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).touch()


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
            mark_requeue()
            print("dit launch: preempted: the ranks saved a checkpoint; rerun the same command "
                  "(or let the scheduler requeue it) to resume.", file=sys.stderr, flush=True)
        if outcome.status in NOT_RESTARTABLE or outcome.stopped or attempt == job.max_restarts:
            return outcome.exit_code
        print(f"dit launch: restart {attempt + 1} of {job.max_restarts}: relaunching; the ranks "
              f"resume from the latest checkpoint.", file=sys.stderr, flush=True)
    raise AssertionError("unreachable: the last attempt returns")


