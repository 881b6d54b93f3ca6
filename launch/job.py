"""What a `dit launch` job is, shared by the local runners (launch/runners.py) and SLURM
(launch/slurm.py): its config, checked for the job's world size before any process starts
(the keys, the stage's own checks, and the checkpoint it would resume from); where its ranks
run (the topology: one machine, a hostfile, or a torchrun rendezvous); and the environment
every rank gets.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from trainer.config import ConfigError, RunConfig, check_precision_here, load_config, validate

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("deepspeed", "torchrun")


class LaunchError(RuntimeError):
    """A launch that cannot start; the message says what to change."""


class ResumeRefused(RuntimeError):
    """The checkpoint the job would resume from was written by another job shape or config."""


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
    def over_ssh(self) -> bool:
        """The DeepSpeed launcher starts the hosts of the hostfile from here through pdsh/ssh
        (its multi-node path): the ranks of the other hosts are not children of this command.
        So does a hostfile of one host that is not this machine (DeepSpeed's --force_multi:
        it would run a single host's ranks here)."""
        if not self.hosts or self.node_rank is not None:
            return False
        return len(self.hosts) > 1 or not is_this_machine(self.hosts[0][0])

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


# ---------------------------------------------------------------------------------------------
# The config, checked before any process starts.


def check_config(config: str, overrides: list[str], world_size: int, queued: bool = False) -> RunConfig:
    """Load and validate the run config for this world size: fails fast, naming the key
    (`queued`: the job runs later, `trainer.stages.preflight`)."""
    from trainer.stages import preflight

    cfg = load_config(config, overrides)
    validate(cfg, world_size=world_size)
    preflight(cfg, queued)
    return cfg


def resume_config(cfg: RunConfig, world_size: int) -> tuple[RunConfig, Optional[str], str]:
    """(the config this job resumes with, why the checkpoint it would resume from does not fit
    it or None, the line saying what was derived to keep the global batch or '')."""
    from trainer.checkpoint import CheckpointError
    from trainer.engine import preflight_resume

    try:
        cfg, note = preflight_resume(cfg, world_size)
    except CheckpointError as e:
        return cfg, str(e), ""
    return cfg, None, note


def check_job(config: str, overrides: list[str], world_sizes: list[int], restarts: bool = False,
              queued: bool = False) -> RunConfig:
    """The config checked for every world size the job may run on, and the checkpoint it would
    resume from on each: raises ConfigError naming the key, or ResumeRefused. Returns the
    config checked for the first world size. `restarts`: the job may be started again (a
    relaunch, a SLURM requeue), which resumes from `latest`; `queued`: it runs later (a SLURM
    submission), after jobs that may write what it reads."""
    checked = [check_config(config, overrides, world_size, queued) for world_size in world_sizes]
    if restarts and not checked[0].checkpoint.resume:
        raise ConfigError("checkpoint.resume", "is false, but this job may be started again (--max-restarts, a "
                          "SLURM requeue): each start would begin at step 0 and its checkpoints replace the run's; "
                          "set it to true (to start afresh, give the run a new checkpoint.dir)")
    resumed = []
    for cfg, world_size in zip(checked, world_sizes):
        kept, refusal, _ = resume_config(cfg, world_size)
        if refusal is not None:
            raise ResumeRefused(refusal)
        resumed.append(kept)
    say_global_batch(resumed[0], world_sizes[0])
    return checked[0]


def say_global_batch(cfg: RunConfig, world_size: int) -> None:
    """The global batch the job trains with on its ranks (a recipe's is planned for its GPU
    count: on 4 times the nodes it is 4 times larger, with the recipe's learning rate)."""
    from trainer.elastic import shape_of

    print(f"dit launch: {world_size} rank(s): {shape_of(cfg, world_size).describe()}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Where the ranks run.


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


def is_this_machine(host: str) -> bool:
    """`host` names this machine: localhost, a loopback address, or this host's name (short or
    full). No DNS lookup: another name of this machine counts as another host (reached over ssh)."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    name = socket.gethostname()
    return host in ("localhost", name) or host == name.split(".")[0] or host.split(".")[0] == name


def free_port() -> int:
    """A TCP port that is free on this machine now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpus_here() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def slurm_gpus(env: dict[str, str]) -> str:
    """The GPUs SLURM allocated to this job ('' when none): a node without them visible is a
    broken allocation or driver, not a CPU job."""
    for key in ("SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_STEP_GPUS"):
        if env.get(key, "0") not in ("", "0"):
            return f"{key}={env[key]}"
    return ""


def check_gpus_visible(gpus: int, env: dict[str, str]) -> None:
    """Refuse to run a SLURM GPU job on the CPU: without a visible GPU the ranks would switch
    to DeepSpeed's CPU accelerator (rank_environment) and crawl without a word."""
    allocated = slurm_gpus(env)
    if allocated and gpus == 0:
        visible = env.get("CUDA_VISIBLE_DEVICES", "(unset)")
        raise LaunchError(f"SLURM allocated GPUs to this job ({allocated}) but torch sees none on "
                          f"{socket.gethostname()} (CUDA_VISIBLE_DEVICES={visible}): check the node's driver "
                          "and the job's GPU request")


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
    topology = Topology(nproc, nnodes, args.node_rank, master_addr, args.master_port or 0, args.hostfile or "", hosts)
    if not topology.master_port and (nnodes > 1 or master_addr or topology.over_ssh):
        topology = replace(topology, master_port=29500)  # node 0 is another machine: no free port known here
    if gpus and not topology.over_ssh and topology.local_ranks > gpus:
        raise LaunchError(f"{topology.local_ranks} ranks on this node but it has {gpus} GPU(s): a rank needs "
                          "a GPU of its own (lower --nproc-per-node or the hostfile's slots)")
    return topology


def job_from_args(args: argparse.Namespace) -> Job:
    """The job of `dit launch` on this node (not --slurm), its config checked for its world size."""
    gpus = gpus_here()
    check_gpus_visible(gpus, dict(os.environ))
    topology = topology_from_args(args, gpus)
    cfg = check_job(args.config, args.overrides, [topology.world_size], restarts=args.max_restarts > 0)
    check_precision_here(cfg)  # the ranks run here (a SLURM job's on nodes this one may not be like)
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


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a SLURM or container cgroup gives
    fewer than os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def rank_settings(base: dict[str, str], job: Job) -> dict[str, str]:
    """The variables this launcher sets for every rank (on top of `base`, the launcher's own
    environment). The repository goes on PYTHONPATH (`-m launch.cli` from any directory);
    DeepSpeed gets its CPU accelerator on machines without a GPU; each rank gets its share of
    the cores as OpenMP threads."""
    paths = [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO_ROOT)]
    settings = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *paths]), "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": base.get("TOKENIZERS_PARALLELISM", "false"),
                "OMP_NUM_THREADS": base.get("OMP_NUM_THREADS", str(max(1, usable_cores() // job.topology.local_ranks)))}
    if not job.gpu:
        settings["DS_ACCELERATOR"] = "cpu"
    return settings


def rank_environment(base: dict[str, str], job: Job) -> dict[str, str]:
    """The environment every rank needs, set in this one place.

    The engines set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT per rank, so
    values inherited from an enclosing job are dropped; rank_settings adds the rest.
    """
    inherited = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in base.items() if k not in inherited}
    env.update(rank_settings(base, job))
    return env


# Variables of this launcher's environment that the ranks on other hosts need too: the recipes'
# ${oc.env:DIT_DATA} and friends, the Hugging Face cache and offline switches, DeepSpeed's
# accelerator, NCCL's settings (DeepSpeed exports those only when this machine has a GPU), the
# host group's network card (GLOO_SOCKET_IFNAME), torch's (TORCH_NCCL_*, PYTORCH_CUDA_ALLOC_CONF,
# the extension and inductor caches). Not CUDA_VISIBLE_DEVICES: each host has GPUs of its own.
# Over pdsh/ssh a rank gets only what the DeepSpeed launcher exports (see remote_environment).
REMOTE_ENV_PREFIXES = ("DIT_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "NCCL_", "DS_ACCELERATOR", "GLOO_",
                       "TORCH_", "PYTORCH_", "TORCHINDUCTOR_")


def remote_environment(base: dict[str, str], job: Job) -> dict[str, str]:
    """What the ranks on the other hosts of a pdsh job must get from here. The DeepSpeed
    launcher exports only its own prefixes (PYTHON*, NCCL*, UCX*, ...) and the lines of its
    `.deepspeed_env` file, so these go into that file (runners.write_deepspeed_env).

    DS_ACCELERATOR goes only when set here by hand: a login node without a GPU says nothing
    about the GPUs of the hosts. OMP_NUM_THREADS, unless set, is this machine's share of cores
    per rank (the hosts of a hostfile are alike as a rule)."""
    env = {k: v for k, v in base.items() if k.startswith(REMOTE_ENV_PREFIXES)}
    env.update({k: v for k, v in rank_settings(base, job).items() if k != "DS_ACCELERATOR"})
    return env


def visible_gpus(env: dict[str, str]) -> Optional[list[int]]:
    """The GPU ids of CUDA_VISIBLE_DEVICES, or None when it is unset or empty. The DeepSpeed
    launcher ignores the variable when given --num_gpus (its ranks get GPUs 0..N-1), so the
    local runner turns these ids into --include (runners.deepspeed_command)."""
    raw = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not raw:
        return None
    ids = [part.strip() for part in raw.split(",")]
    if not all(part.isdigit() for part in ids):
        raise LaunchError(f"CUDA_VISIBLE_DEVICES={raw}: the DeepSpeed launcher takes only numeric GPU ids "
                          "(not UUIDs or MIG names); use --launcher torchrun, which keeps the variable as it is")
    return [int(part) for part in ids]
