"""`dit launch ... --slurm`: render an sbatch script for the job and submit it with `sbatch`.

The script asks for K nodes with one task each; `srun` starts `dit launch --launcher torchrun`
once per node, which starts that node's ranks. Node 0 (the first host of the allocation,
from `scontrol show hostnames`) is the rendezvous master. Preemption and the time limit end
the same way: SLURM sends SIGUSR1 ahead of the time limit (`--signal=USR1@T`, T = the ranks'
--shutdown-timeout + 20 s: 120 s by default), the ranks save a checkpoint and exit with 42, and
the script requeues the job (`--requeue`); the rerun resumes from `latest`. srun's own status
cannot say so reliably (with --kill-on-bad-exit the first node to exit has the others killed,
and srun may report 137), so each node's launcher also creates a marker file
($DIT_REQUEUE_MARKER, launch/runners.py) when its ranks exited with 42, and the script requeues
on either. scancel and a preemption give the ranks SIGTERM and only SLURM's KillWait (30 s by
default) or the partition's GraceTime before SIGKILL: the script says so where --shutdown-timeout
is longer. Every job logs to LOG_DIR/slurm/<name>-<jobid>.out (appended across requeues).
With `--min-nodes M` the script asks for M to K nodes (`--nodes=M-K`): a requeued job may start
on another number of nodes, and its ranks resume elastically (trainer/elastic.py).
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from launch.job import LaunchError, check_job
from launch.runners import REQUEUE_MARKER_ENV

if TYPE_CHECKING:
    from trainer.config import RunConfig

REQUEUE_MARGIN_S = 20  # after the ranks' shutdown: srun ends and the script requeues the job
MAX_SIGNAL_LEAD_S = 65535  # the largest sig_time of sbatch --signal=SIG@sig_time
SLURM_KILL_WAIT_S = 30  # slurm.conf KillWait's default: SIGTERM -> SIGKILL on scancel and at the time limit
# The default port is derived from the job id, so jobs sharing a node do not collide: 10000 +
# id % 20000, below Linux's ephemeral range (32768-60999) where outgoing connections take ports
MASTER_PORT_BASE = 10000


@dataclass(frozen=True)
class SlurmJob:
    """What the sbatch script asks for and runs."""

    name: str
    nodes: int
    ranks_per_node: int
    config: str  # absolute path
    overrides: tuple[str, ...]
    log_dir: Path  # absolute; the job's output goes to LOG_DIR/slurm/
    workdir: Path  # absolute; the script runs here (relative paths in overrides)
    gpus_per_node: Optional[int] = None
    time: str = ""
    partition: str = ""
    account: str = ""
    master_port: Optional[int] = None
    max_restarts: int = 0
    shutdown_timeout_s: int = 100
    extra: tuple[str, ...] = ()  # further sbatch options, e.g. "--qos=high"
    min_nodes: int = 0  # > 0: SLURM may start (or requeue) the job on min_nodes..nodes nodes
    cpus_per_node: int = 0  # > 0: --cpus-per-task of the one task per node (SLURM's default is 1)

    @property
    def output(self) -> Path:
        return self.log_dir / "slurm" / "%x-%j.out"

    @property
    def signal_lead_s(self) -> int:
        """Seconds before the time limit that SLURM sends SIGUSR1: the ranks' whole shutdown
        (after --shutdown-timeout torchrun kills them) and the requeue after it, before SLURM's
        own SIGTERM at the limit. SLURM may send it up to 60 s earlier (its event resolution)."""
        return self.shutdown_timeout_s + REQUEUE_MARGIN_S

    def requeue_marker(self) -> str:
        """The marker file of this job's run, as a shell word ($SLURM_JOB_ID expands in the script)."""
        return shlex.quote(str(self.log_dir / "slurm" / self.name)) + '-"$SLURM_JOB_ID".requeue'


def sbatch_header(job: SlurmJob) -> list[str]:
    lines = [
        f"--job-name={job.name}",
        f"--nodes={job.min_nodes}-{job.nodes}" if job.min_nodes else f"--nodes={job.nodes}",
        "--ntasks-per-node=1",  # one `dit launch` per node; it starts the node's ranks
        f"--chdir={job.workdir}",
        f"--output={job.output}",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--signal=USR1@{job.signal_lead_s}",  # the ranks' shutdown, then the requeue
        "--requeue",
    ]
    if job.cpus_per_node:
        lines.append(f"--cpus-per-task={job.cpus_per_node}")
    if job.gpus_per_node:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    lines += [f"--{key}={value}" for key, value in
              (("time", job.time), ("partition", job.partition), ("account", job.account)) if value]
    return [f"#SBATCH {line}" for line in [*lines, *job.extra]]


def kill_wait_note(job: SlurmJob) -> list[str]:
    """Why a save after scancel or a preemption may be cut short, when --shutdown-timeout is
    longer than SLURM's default KillWait (lines of text; none when it is not)."""
    if job.shutdown_timeout_s <= SLURM_KILL_WAIT_S:
        return []
    return [f"note: --shutdown-timeout {job.shutdown_timeout_s} s is longer than SLURM's default KillWait "
            f"({SLURM_KILL_WAIT_S} s).",
            f"The time limit leaves the ranks their {job.shutdown_timeout_s} s (SIGUSR1 comes {job.signal_lead_s} s "
            "ahead), but scancel and a preemption send SIGTERM,",
            "then SIGKILL after the cluster's KillWait (slurm.conf) or, for a preemption, the partition's "
            "GraceTime: a longer save is killed.",
            "See `scontrol show config | grep KillWait` and `scontrol show partition`."]


def node_command(job: SlurmJob) -> str:
    """The command each srun task runs; $SLURM_NODEID and $MASTER_* expand on the node."""
    fixed = shlex.join([
        sys.executable, "-u", "-m", "launch.cli", "launch", job.config, *job.overrides,
        "--launcher", "torchrun", "--nproc-per-node", str(job.ranks_per_node),
        "--max-restarts", str(job.max_restarts), "--shutdown-timeout", str(job.shutdown_timeout_s),
    ])
    return (f'exec {fixed} --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" '
            f'--master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"')


def srun_options(job: SlurmJob) -> str:
    """srun's options; --cpus-per-task again, since srun (SLURM >= 22.05) no longer takes it
    from the batch allocation."""
    cpus = f" --cpus-per-task={job.cpus_per_node}" if job.cpus_per_node else ""
    return f"--ntasks-per-node=1{cpus} --kill-on-bad-exit=1"


def render(job: SlurmJob) -> str:
    """The sbatch script of `job`."""
    port = str(job.master_port) if job.master_port else f"$(( {MASTER_PORT_BASE} + SLURM_JOB_ID % 20000 ))"
    body = [
        "#!/bin/bash",
        f"# Rendered by `dit launch --slurm` for {job.config}.",
        f"# {job.nodes} node(s) x {job.ranks_per_node} rank(s); rerun after preemption resumes from `latest`.",
        *sbatch_header(job),
        *(f"# {line}" for line in kill_wait_note(job)),
        "set -uo pipefail",
        "",
        "# Node 0 of the allocation hosts the rendezvous.",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f'export MASTER_PORT="{port}"',
        'echo "dit: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST,'
        ' master $MASTER_ADDR:$MASTER_PORT"',
        "",
        "# One task per node. The ranks resume from `latest` when a checkpoint exists; on SIGUSR1",
        "# (time limit or preemption) they save and exit with 42, and their node's launcher creates",
        f"# ${REQUEUE_MARKER_ENV} (srun may report another node's 137 instead of 42).",
        f"export {REQUEUE_MARKER_ENV}={job.requeue_marker()}",
        f'rm -f "${REQUEUE_MARKER_ENV}"',
        f"srun {srun_options(job)} bash -c {shlex.quote(node_command(job))}",
        "status=$?",
        f'if [ "$status" -eq 42 ] || [ -e "${REQUEUE_MARKER_ENV}" ]; then',
        '    echo "dit: job $SLURM_JOB_ID saved its state before the time limit or preemption (srun status'
        ' $status); requeueing"',
        f'    rm -f "${REQUEUE_MARKER_ENV}"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    status=42",
        "fi",
        'exit "$status"',
    ]
    return "\n".join(body) + "\n"


def submit_script(path: Path, out=None) -> int:
    """`sbatch PATH`; sbatch's own message ("Submitted batch job N") goes to the console."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print("dit launch: sbatch is not on PATH: submit from a SLURM login node, or print the "
              f"script with --dry-run (it was written to {path})", file=sys.stderr)
        return 2
    return subprocess.run([sbatch, str(path)], stdout=out or sys.stdout).returncode


def job_from_args(args: argparse.Namespace) -> SlurmJob:
    """Check the job for every world size the allocation may have (launch/job.py: the config
    and the checkpoint it would resume from), then describe it."""
    if args.hostfile or args.node_rank is not None or args.master_addr:
        raise LaunchError("--slurm takes its hosts from the allocation: drop --hostfile, --node-rank "
                          "and --master-addr (use --nodes)")
    nodes = args.nodes or args.nnodes or 1
    ranks = args.nproc_per_node or args.gpus_per_node or 1
    if nodes < 1 or ranks < 1:
        raise LaunchError(f"--nodes ({nodes}) and ranks per node ({ranks}) must be at least 1")
    if args.gpus_per_node and ranks > args.gpus_per_node:
        raise LaunchError(f"--nproc-per-node {ranks} is more than --gpus-per-node {args.gpus_per_node}: "
                          "a rank needs a GPU of its own")
    if not 0 <= args.shutdown_timeout <= MAX_SIGNAL_LEAD_S - REQUEUE_MARGIN_S:
        raise LaunchError(f"--shutdown-timeout {args.shutdown_timeout} must be between 0 and "
                          f"{MAX_SIGNAL_LEAD_S - REQUEUE_MARGIN_S} s with --slurm: SIGUSR1 comes that long plus "
                          f"{REQUEUE_MARGIN_S} s before the time limit (sbatch --signal takes at most {MAX_SIGNAL_LEAD_S})")
    min_nodes = args.min_nodes or 0
    if not 0 <= min_nodes <= nodes:
        raise LaunchError(f"--min-nodes ({min_nodes}) must be between 1 and --nodes ({nodes})")
    # Every allocation the job may get (or be requeued on) must hold the config and its checkpoint.
    sizes = (nodes, *range(min_nodes or nodes, nodes))
    cfg = check_job(args.config, args.overrides, [size * ranks for size in sizes], restarts=True, queued=True)
    check_allocations(cfg, sizes, ranks)
    if not args.gpus_per_node:
        print(f"dit launch: note: no --gpus-per-node: the job asks SLURM for no GPUs and runs {ranks} rank(s) "
              "per node on the CPU", file=sys.stderr)
    cpus = args.cpus_per_node if args.cpus_per_node is not None else ranks * (1 + cfg.data.num_workers)
    if cpus < 0:
        raise LaunchError(f"--cpus-per-node must be at least 0 (0: SLURM's default, 1 CPU), not {cpus}")
    job = SlurmJob(
        name=args.job_name or cfg.run.name, nodes=nodes, ranks_per_node=ranks,
        config=str(Path(args.config).resolve()), overrides=tuple(args.overrides),
        log_dir=Path(cfg.log.dir).resolve(), workdir=Path.cwd(),
        gpus_per_node=args.gpus_per_node, time=args.time or "", partition=args.partition or "",
        account=args.account or "", master_port=args.master_port, max_restarts=args.max_restarts,
        shutdown_timeout_s=args.shutdown_timeout, extra=tuple(args.sbatch_option or ()), min_nodes=min_nodes,
        cpus_per_node=cpus,
    )
    for line in kill_wait_note(job)[:1]:
        print(f"dit launch: {line} See the script's header.", file=sys.stderr)
    return job


def check_allocations(cfg: RunConfig, sizes: tuple[int, ...], ranks: int) -> None:
    """With --min-nodes the first allocation's size sets the run's global batch, which every
    later one must keep (`keep_global_batch`: a whole grad_accum or data.batch_size), or its
    requeue is refused on the cluster. Said when the sizes' global batches differ."""
    from trainer.elastic import kept_on, shape_of

    shapes = {size: shape_of(cfg, size * ranks) for size in sorted(set(sizes))}
    for first, started in shapes.items():
        for later, shape in shapes.items():
            if not kept_on(started.global_batch, shape):
                raise LaunchError(f"a run started on {first} node(s) trains with global batch {started.global_batch}, "
                                  f"which neither a whole deepspeed.grad_accum nor a whole data.batch_size keeps on "
                                  f"{later} node(s): its requeue there would be refused; choose --nodes and "
                                  f"--min-nodes (or the batch) so that every size keeps the others' global batch")
    batches = {size: shape.global_batch for size, shape in shapes.items()}
    if len(set(batches.values())) > 1:
        print("dit launch: note: the first allocation's size sets the global batch for the whole run (" +
              ", ".join(f"{size} node(s): {batch}" for size, batch in batches.items()) +
              "); later ones keep it", file=sys.stderr)


def submit(args: argparse.Namespace) -> int:
    """`dit launch --slurm`: print the script (--dry-run), or write it next to the job's logs
    and submit it."""
    job = job_from_args(args)
    script = render(job)
    if args.dry_run:
        print(script, end="")
        return 0
    path = job.log_dir / "slurm" / f"{job.name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"dit launch: wrote {path}; job output goes to {job.output}", flush=True)
    return submit_script(path)


# The options of add_slurm_arguments that only the sbatch script reads (attribute names).
SLURM_ONLY = ("dry_run", "nodes", "min_nodes", "gpus_per_node", "cpus_per_node", "time", "partition", "account",
              "job_name", "sbatch_option")


def check_slurm_only(args: argparse.Namespace) -> None:
    """Refuse the SLURM options without --slurm: a local launch would ignore them and start a
    real run of another shape (a `--dry-run --nodes 4` would train on 1 node)."""
    given = [f"--{name.replace('_', '-')}" for name in SLURM_ONLY if getattr(args, name) not in (None, False)]
    if given:
        raise LaunchError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} with --slurm (the "
                          f"sbatch script reads them); add "
                          "--slurm, or drop them to run here (--nproc-per-node, --nnodes, --hostfile)")


def add_slurm_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--slurm", action="store_true", help="render an sbatch script and submit it")
    g.add_argument("--dry-run", action="store_true", help="with --slurm: print the script, submit nothing")
    g.add_argument("--nodes", type=int, help="nodes to allocate (default 1)")
    g.add_argument("--min-nodes", type=int, help="accept an allocation of this many to --nodes nodes, "
                   "also when requeued (the run resumes elastically, keeping its global batch)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node to allocate; also the ranks per node "
                   "unless --nproc-per-node says otherwise")
    g.add_argument("--cpus-per-node", type=int, help="CPUs per node to allocate (default: a core per rank "
                   "and per data loader worker, ranks x (1 + data.num_workers); 0: SLURM's default, 1)")
    g.add_argument("--time", help="time limit, e.g. 24:00:00 (the ranks get SIGUSR1 --shutdown-timeout + "
                   f"{REQUEUE_MARGIN_S} s before it to save, and the job is requeued)")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--job-name", help="job name (default: run.name)")
    g.add_argument("--sbatch-option", action="append", metavar="OPT",
                   help="an extra sbatch option, e.g. --sbatch-option=--qos=high (repeatable)")
