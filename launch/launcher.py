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

The job (launch/job.py) is checked before any process starts: its config for the job's world
size, and the checkpoint it would resume from; the SLURM path checks the same for every world
size its allocation may have. The ranks run through launch/runners.py. When a rank dies,
the engine stops the others (their collectives are bounded by deepspeed.comm_timeout_s) and
this command exits non-zero with one line naming the rank and the reason; with
`--max-restarts R` it relaunches the job, which resumes from the `latest` checkpoint.

Signals: SIGTERM/SIGUSR1 are passed to the ranks, which save a checkpoint and exit with 42;
ranks still running --shutdown-timeout seconds later are killed. Ctrl-C (SIGINT) and SIGHUP stop
the job: it is not restarted, whatever --max-restarts says. Over pdsh (`--hostfile` without
`--node-rank`) the ranks of the other hosts are not this command's children: any of these
signals stops the whole job through the DeepSpeed launcher, whose remote launchers give their
ranks SIGTERM and 30 s to save, and the job is not restarted.

Exit status: 0; the first failed rank's own code (2 config, 3 non-finite, 4 checkpoint,
42 preempted: state saved, rerun the same command); 128 + N when it was killed by signal N
(130 after Ctrl-C). 42 only when every rank of this node exited with 42 (either launcher): a
rank's 42 never hides another's failure, and ranks that ended differently or unseen give 4.
"""
from __future__ import annotations

import argparse
import sys

from launch.job import LAUNCHERS, LaunchError, ResumeRefused, job_from_args
from launch.runners import run_job
from launch.slurm import add_slurm_arguments, check_slurm_only, submit
from launch.train_cmd import add_resume_arguments, overrides_of
from trainer.codes import EXIT_CHECKPOINT, EXIT_CONFIG


def launch(args: argparse.Namespace) -> int:
    """`dit launch`: validate, then run here (or submit to SLURM with --slurm)."""
    args.overrides = overrides_of(args)
    try:
        if args.max_restarts < 0:
            raise LaunchError(f"--max-restarts must be >= 0, not {args.max_restarts}")
        if args.shutdown_timeout < 0:  # the ranks would be killed at the signal, with nothing saved
            raise LaunchError(f"--shutdown-timeout must be >= 0 s, not {args.shutdown_timeout}")
        if args.slurm:
            return submit(args)
        check_slurm_only(args)
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
    multi.add_argument("--master-port", type=int, help="a free port on node 0; required with --nnodes > 1 "
                       "and no --hostfile (default otherwise: 29500 where node 0 may be another machine, with "
                       "a hostfile or --master-addr; one machine: any free port)")
    faults = p.add_argument_group("failures")
    add_resume_arguments(faults)
    faults.add_argument("--max-restarts", type=int, default=0,
                        help="relaunch a crashed job up to R times; it resumes from `latest`")
    faults.add_argument("--shutdown-timeout", type=int, default=100,
                        help="seconds the ranks get to save after SIGTERM/SIGUSR1 before SIGKILL (over "
                        "pdsh: DeepSpeed's fixed 30 s; with --slurm SIGUSR1 comes this + 20 s before the time "
                        "limit, and scancel or a preemption give SLURM's KillWait or GraceTime)")
    add_slurm_arguments(p.add_argument_group("SLURM"))
    p.set_defaults(func=launch)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `dit launch` to the top-level subcommands of `dit`."""
    help_ = "start `dit train` on one or many machines (local, hostfile, torchrun, SLURM)"
    add_arguments(sub.add_parser("launch", help=help_, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter))
