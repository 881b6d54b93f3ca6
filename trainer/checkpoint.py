"""Atomic, verifiable checkpoints: one directory per step, `latest` written last.

Layout (torchtitan-style: everything stateful goes through one place):

    checkpoints/
      step_00000200/
        <player>/...                 DeepSpeed engine state of each trained player (student, disc)
        rank_00000.json              step, data-stream state, python/numpy RNG, counters (per rank)
        rank_00000.safetensors       torch RNG states (per rank)
        ema.safetensors              whole EMA weights of the student (what users sample/export)
        stage.safetensors            tensors a stage needs on resume (e.g. the current teacher)
        config.yaml                  the resolved run config
        encoders.json                the autoencoder's and text encoder's files it trained with
        COMPLETE.json                sha256 of every file above; written last = completion marker
      latest                         "step_00000200", replaced atomically after the rename

A save writes into `.tmp-step_X`, and only a directory whose every rank succeeded is renamed
into place (each rank hashes and flushes the files it wrote, rank 0 lists them all in
COMPLETE.json; a resume checks them, each rank a share); a crash at any point leaves `latest`
on the previous complete checkpoint, and leftovers are cleaned by the next save. Retention never deletes the checkpoint just committed.
The directory format itself (manifest, commit by rename, `latest`, loading for inference) is
owned by `trainer.checkpoint_format`; this module adds what the engine saves into it.

Pickle containment: our own files are JSON and safetensors. DeepSpeed writes its engine state
with `torch.save`; we load it through `SafeCheckpointEngine`, i.e. `torch.load(weights_only=True)`
with only DeepSpeed's plain state classes allow-listed, after checking every file against the
sha256 list in COMPLETE.json. A file replaced by a malicious pickle fails both checks.
"""
from __future__ import annotations

import errno
import json
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from trainer.checkpoint_format import (
    COMPLETE,
    EMA_FILE,
    LATEST,
    REMOVING,
    STAGE_FILE,
    TMP_PREFIX,
    CheckpointError,
    commit,
    digests,
    is_checkpoint,
    load_for_inference,
    point_latest,
    remove_dir,
    resolve,
    verify,
    verify_share,
)
from trainer.config import CheckpointConfig, flatten
from trainer.distributed import all_gather_bytes_on_host, comm_device, wait_for_rank0
from trainer.elastic import written_global_batch

# Keys whose product with the data-parallel ranks is the global batch: free while it is kept.
BATCH_KEYS = ("data.batch_size", "deepspeed.grad_accum")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed's plain state classes that its optimizer checkpoints contain."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine(before_write: Optional[Callable[[str], None]] = None):
    """A DeepSpeed checkpoint engine whose load never runs arbitrary pickle code, and whose save
    keeps a write error (disk full, ...) until `take_error()` instead of raising it inside
    `engine.save_checkpoint`: raising there would leave this rank out of the barrier the other
    ranks wait in, and the job would hang instead of reporting the failure."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def __init__(self):
            super().__init__()
            self.error: Optional[Exception] = None

        def save(self, state_dict, path: str):
            if self.error is not None:
                return
            try:
                if before_write is not None:
                    before_write(path)
                super().save(state_dict, path)
            except Exception as e:  # raised by CheckpointManager.save once every rank is past it
                self.error = e

        def commit(self, info) -> bool:
            """Called by every rank once its files are written, before DeepSpeed's barrier on
            the default group: the ranks that write the module's files (rank 0, a pipeline
            stage's first replica) take longer, and the others wait for them here instead
            (`wait_for_rank0`), not in that barrier, which deepspeed.comm_timeout_s bounds."""
            wait_for_rank0()
            return super().commit(info)

        def take_error(self) -> Optional[Exception]:
            error, self.error = self.error, None
            return error

        def load(self, path: str, map_location=None):
            if not Path(path).is_file():
                raise CheckpointError(f"cannot load {path}: the file is missing")
            try:
                with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:  # weights_only's refusal, which names the refused global
                raise CheckpointError(
                    f"refusing to load {path}: it holds objects outside the weights-only allowlist "
                    f"({str(e).splitlines()[-1][:300]}). Only checkpoints written by this trainer load."
                ) from None

    return SafeCheckpointEngine()


@dataclass
class RankState:
    """What one rank contributes to a checkpoint: JSON-able values and named tensors."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _gather_digests(mine: dict[str, str]) -> dict[str, str]:
    """Collective on the host group: every rank's name -> sha256 of the files it wrote (lines
    "<sha256> <name>", as sha256sum writes them)."""
    text = "".join(f"{digest} {name}\n" for name, digest in mine.items()).encode()
    lines = (line for part in all_gather_bytes_on_host(text) for line in part.decode().splitlines())
    return {name: digest for digest, name in (line.split(" ", 1) for line in lines)}


def _rank_paths(directory: Path, rank: int) -> tuple[Path, Path]:
    return directory / f"rank_{rank:05d}.json", directory / f"rank_{rank:05d}.safetensors"


def _all_ok(ok: bool) -> list[int]:
    """Every rank's success flag (collective); the ranks that failed."""
    flags = torch.tensor([1 if ok else 0], dtype=torch.int64, device=comm_device())
    if not dist.is_initialized():
        return [] if ok else [0]
    gathered = [torch.zeros_like(flags) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flags)
    return [r for r, f in enumerate(gathered) if int(f) == 0]


def config_differences(old_yaml: str, new_yaml: str, ignore: tuple[str, ...]) -> list[str]:
    """`key: old -> new` for every resolved value that differs, skipping keys (and the
    sections) in `ignore`, which may change on resume without changing the experiment."""
    old, new = flatten(yaml.safe_load(old_yaml) or {}), flatten(yaml.safe_load(new_yaml) or {})
    absent = "<absent>"
    out = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == k or key.startswith(k + ".") for k in ignore):
            continue
        before, after = old.get(key, absent), new.get(key, absent)
        if before != after:
            out.append(f"{key}: {before!r} -> {after!r}")
    return out


def schedule_change(old_yaml: str, new_yaml: str) -> list[str]:
    """stage.steps may change on resume (a run extended), but a decaying LR schedule is laid over
    it (trainer/optim.py lr_factor): the rest of the run follows a schedule of the new length,
    which must not pass unseen. `key: old -> new (what it does)`, or nothing."""
    old, new = flatten(yaml.safe_load(old_yaml) or {}), flatten(yaml.safe_load(new_yaml) or {})
    before, after = old.get("stage.steps"), new.get("stage.steps")
    if before == after or new.get("optim.lr_schedule", "constant") == "constant":
        return []
    return [f"stage.steps: {before!r} -> {after!r} (the {new['optim.lr_schedule']} LR schedule now spans {after} "
            f"steps instead of {before}: the learning rate from here on follows the new length)"]


def agree_on_step(step: int, what: str) -> None:
    """Collective: every rank must name the same step, else all raise with each rank's view."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = torch.tensor([step], dtype=torch.int64, device=comm_device())
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    steps = [int(t) for t in gathered]
    if len(set(steps)) > 1:
        views = ", ".join(f"rank {r}: {step_name(s) if s >= 0 else 'none'}" for r, s in enumerate(steps))
        raise CheckpointError(
            f"ranks disagree on the checkpoint to {what} ({views}); checkpoint.dir must be one "
            f"directory shared by every node (a network filesystem), not a local disk per node"
        )


def describe_save_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (f"{error}: the disk holding checkpoint.dir is full; free space or lower "
                f"checkpoint.keep, then rerun to resume")
    return f"{type(error).__name__}: {error}"


def preflight(cfg: CheckpointConfig, config_yaml: str, world_size: int, global_batch: int,
              ignore: tuple[str, ...]) -> Optional[Path]:
    """Before any process group starts: the checkpoint a run would resume from, refused when the
    config differs from the one that wrote it (unless allowed)."""
    if not cfg.resume:
        return None
    manager = CheckpointManager(cfg, rank=0, world_size=world_size)
    directory = manager.latest()
    if directory is None:
        return None
    manager.check_compatible(directory, config_yaml, ignore, global_batch)
    return directory


class CheckpointManager:
    """Collective save/load of the whole training state. Every rank calls every method."""

    def __init__(self, cfg: CheckpointConfig, rank: int, world_size: int, texts: Optional[dict[str, str]] = None):
        """`texts`: file name -> text, written into every checkpoint beside config.yaml (rank 0)."""
        self.cfg = cfg
        self.root = Path(cfg.dir)
        self.rank = rank
        self.world_size = world_size
        self.texts = dict(texts or {})
        # Fault-suite hooks (trainer/faults.py): called once the engine states are written,
        # before the commit; and before each engine file is written.
        self.before_commit: Optional[Callable[[int, Path], None]] = None
        self.before_write: Optional[Callable[[str], None]] = None
        self._written: list[Path] = []  # the files this rank wrote into the save in progress

    # ---- save -------------------------------------------------------------------------------
    def save(self, step: int, engines: dict[str, Any], rank_state: RankState, config_yaml: str,
             shared: dict[str, dict[str, torch.Tensor]]) -> Path:
        """Collective. `shared`: file name -> whole tensors, identical on every rank (the EMA,
        the stage's state); rank 0 writes them."""
        agree_on_step(step, "save")
        final = self.root / step_name(step)
        tmp = self.root / f"{TMP_PREFIX}{step_name(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        wait_for_rank0()
        error, self._written, hashed = None, [], {}
        try:
            for name, engine in engines.items():
                self._save_engine(engine, tmp, name)
            self._write_rank_state(tmp, rank_state)
            for filename, tensors in shared.items():
                if self.rank == 0 and tensors:
                    self._written.append(tmp / filename)
                    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / filename))
            if self.before_commit is not None:
                self.before_commit(step, tmp)
            hashed = self._hash_written(tmp)
        except Exception as e:  # reported collectively below, so no rank is left waiting
            error = e
        hashed = _gather_digests(hashed)  # the host group's wait: rank 0 wrote the whole-tensor files alone
        self._report(step, tmp, error, "write")
        if self.rank == 0:
            try:
                self._commit(tmp, final, step, config_yaml, hashed)
            except Exception as e:
                error = e
        wait_for_rank0()
        self._report(step, tmp, error, "commit")
        if self.rank == 0:
            self._apply_retention(keep_name=final.name)
        wait_for_rank0()  # removing old checkpoints
        return final

    def _report(self, step: int, tmp: Path, error: Optional[Exception], phase: str) -> None:
        """Collective: raise on every rank when any rank failed `phase` of the save; the partial
        directory is removed and `latest` is left on the previous checkpoint."""
        failed = _all_ok(error is None)
        if not failed:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f" ({describe_save_error(error)})" if error is not None else ""
        raise CheckpointError(f"could not {phase} the checkpoint of step {step}: it failed on rank(s) "
                              f"{failed}{reason}; `latest` still points to the previous checkpoint")

    def _use_safe_engine(self, engine: Any) -> None:
        """Give a DeepSpeed engine our checkpoint engine (once; it serves loads and saves)."""
        if not hasattr(engine.checkpoint_engine, "take_error"):
            engine.checkpoint_engine = safe_checkpoint_engine(self._before_write)

    def _before_write(self, path: str) -> None:
        if self.before_write is not None:
            self.before_write(path)
        self._written.append(Path(path))

    def _hash_written(self, tmp: Path) -> dict[str, str]:
        """name (relative to `tmp`) -> sha256 of the files this rank wrote, each flushed to the
        disk by the rank that wrote it: the ranks hash a save's files together, each its own
        (rank 0 alone hashed every rank's ZeRO shards while the others waited)."""
        root, written = tmp.resolve(), {p.resolve() for p in self._written}
        names = sorted(str(p.relative_to(root)) for p in written if p.is_relative_to(root))
        return dict(zip(names, digests([tmp / name for name in names], sync=True)))

    def _save_engine(self, engine: Any, directory: Path, name: str) -> None:
        self._use_safe_engine(engine)
        engine.save_checkpoint(str(directory), tag=name, save_latest=False)
        error = engine.checkpoint_engine.take_error()
        if error is not None:
            raise error

    def _write_rank_state(self, directory: Path, state: RankState) -> None:
        meta_path, tensor_path = _rank_paths(directory, self.rank)
        self._written += [meta_path, tensor_path]
        save_file({k: v.detach().contiguous().cpu() for k, v in state.tensors.items()}, str(tensor_path))
        meta_path.write_text(json.dumps(state.meta, sort_keys=True))

    def _commit(self, tmp: Path, final: Path, step: int, config_yaml: str, hashed: dict[str, str]) -> None:
        (tmp / "config.yaml").write_text(config_yaml)
        for name, text in self.texts.items():
            (tmp / name).write_text(text)
        commit(tmp, final, step, self.world_size, known=hashed)
        point_latest(self.root, final.name)

    def _remove_partial(self) -> None:
        """Directories of saves that never committed (a crash or kill mid-write), and of
        deletions a kill interrupted (`remove_dir`)."""
        for leftover in [*self.root.glob(f"{TMP_PREFIX}step_*"), *self.root.glob(f"{REMOVING}step_*")]:
            shutil.rmtree(leftover, ignore_errors=True)

    def _apply_retention(self, keep_name: str) -> None:
        """Once `keep_name` is committed and `latest`: the oldest complete checkpoints beyond
        checkpoint.keep, and leftovers, deleted. A failure here is a warning: the save is done
        (reported as a failed commit, it said `latest` was still the previous checkpoint and
        stopped a run whose preemption save had succeeded)."""
        try:
            self._remove_partial()
            complete = sorted(p for p in self.root.glob("step_*") if (p / COMPLETE).is_file())
            for old in complete[: max(0, len(complete) - self.cfg.keep)]:
                if old.name != keep_name:
                    remove_dir(old)
        except OSError as e:
            print(f"dit train: warning: checkpoint retention failed after saving {keep_name} ({e}); older "
                  f"checkpoints may remain in {self.root}", file=sys.stderr, flush=True)

    # ---- load -------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The directory `latest` names, if it is complete; None when there is none yet."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        directory = self.root / pointer.read_text().strip()
        if not (directory / COMPLETE).is_file():
            raise CheckpointError(f"{pointer} names {directory.name}, which is not a complete checkpoint")
        return directory

    def verify(self, directory: Path) -> None:
        """Collective: every file checked against COMPLETE.json once, each rank its share
        (`verify_share`), then a wait on the host group (`wait_for_rank0`: hashing a checkpoint
        of many GB takes longer than the collective timeout); every rank raises if any failed."""
        error: Optional[CheckpointError] = None
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        try:
            verify_share(directory, rank, world)
        except CheckpointError as e:
            error = e
        wait_for_rank0()
        failed = _all_ok(error is None)
        if failed:
            raise error or CheckpointError(f"rank(s) {failed} refused {directory} (see their error): a file is "
                                           f"missing or was modified after it was written")

    def resume_target(self) -> Optional[Path]:
        """Collective: the complete checkpoint every rank resumes from (they must agree)."""
        directory = self.latest()
        agree_on_step(int(directory.name.split("_")[1]) if directory is not None else -1, "resume from")
        if self.rank == 0:
            self._remove_partial()
        return directory

    def check_compatible(self, directory: Path, config_yaml: str,
                         ignore: tuple[str, ...], global_batch: int) -> list[str]:
        """Refuse, unless allowed, a resume with a changed config. The number of ranks may
        change (trainer/elastic.py re-partitions the state), and so may the per-rank batch and
        grad_accum while the global batch is the checkpoint's. Returns the changes allowed
        (`key: old -> new`), for the job to show what it resumes with."""
        old_yaml = (directory / "config.yaml").read_text()
        was = written_global_batch(directory, self.load_rank_state(directory, rank=0).meta)
        diffs = config_differences(old_yaml, config_yaml, ignore + (BATCH_KEYS if was == global_batch else ()))
        if diffs and not self.cfg.allow_config_change:
            listing = "\n  ".join(diffs)
            batch = f"\n(the global batch changes from {was} to {global_batch})" if was != global_batch else ""
            raise CheckpointError(
                f"the config differs from the one {directory} was written with:\n  {listing}{batch}\n"
                f"pass --allow-config-change (or checkpoint.allow_config_change=true) to resume anyway"
            )
        return diffs + schedule_change(old_yaml, config_yaml)

    def load_rank_state(self, directory: Path, rank: Optional[int] = None) -> RankState:
        """What rank `rank` (default: this one) wrote."""
        meta_path, tensor_path = _rank_paths(directory, self.rank if rank is None else rank)
        return RankState(meta=json.loads(meta_path.read_text()), tensors=load_file(str(tensor_path)))

    def load_engine(self, engine: Any, directory: Path, name: str) -> None:
        self._use_safe_engine(engine)
        path, _ = engine.load_checkpoint(str(directory), tag=name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no state for '{name}' in {directory}")


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"  # a `dit export --format diffusers` transformer


def load_init_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """The DiT weights a run warm-starts from (`checkpoint.init_from`), by the network's names:
    a checkpoint root or step directory (its EMA weights, verified), a `dit export` folder
    (`model.safetensors`, or a diffusers export's `transformer/`, whose DiTTransformer keeps the
    network under `dit.`) or a .safetensors file. No pickle is involved."""
    path = Path(source)
    if is_checkpoint(path):
        return _checkpoint_weights(resolve(path))
    candidates = [path] if path.is_file() else [path / "model.safetensors", path / "transformer" / DIFFUSERS_WEIGHTS,
                                                path / DIFFUSERS_WEIGHTS]
    found = next((c for c in candidates if c.is_file() and c.suffix == ".safetensors"), None)
    if found is None:
        raise CheckpointError(
            f"checkpoint.init_from: {path} is neither a checkpoint (root with `{LATEST}` or step directory), a "
            f"`dit export` folder (model.safetensors, or transformer/{DIFFUSERS_WEIGHTS}) nor a .safetensors file")
    weights = load_file(str(found))
    if found.name == DIFFUSERS_WEIGHTS:
        weights = {k.removeprefix("dit."): v for k, v in weights.items()}
    return weights


def _checkpoint_weights(directory: Path) -> dict[str, torch.Tensor]:
    """A step directory's EMA weights, or, of a run that kept no EMA (ema.enabled=false), the
    student's raw fp32 master weights from its universal file, as `dit sample` and `dit export`
    take them (trainer/cascade.py `raw_weights`); both verified against COMPLETE.json."""
    from trainer.cascade import raw_weights
    from trainer.elastic import universal_file

    if (directory / EMA_FILE).is_file():
        return load_for_inference(directory)[1]
    if not (directory / universal_file("student")).is_file():
        raise CheckpointError(
            f"checkpoint.init_from: {directory} holds neither {EMA_FILE} (ema.enabled=false) nor "
            f"{universal_file('student')} (checkpoint.universal=false), so its weights are not stored whole; "
            f"warm-start from a run that kept either")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"checkpoint.init_from: {directory} kept no EMA (ema.enabled=false): starting from its raw "
              f"(non-EMA) weights", flush=True)
    return raw_weights(directory)


def init_network(net: torch.nn.Module, source: str | Path) -> dict[str, torch.Tensor]:
    """Load `load_init_weights(source)` into `net` strictly: every weight of the network must be
    there at its shape (a warm start from another architecture is an error, never a partial load).
    Returns those weights as read (fp32 where the source kept them: the masters' start under
    bf16/fp16, trainer/elastic.py `seed_masters`)."""
    weights = load_init_weights(source)
    own = net.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    resized = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or resized:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("other shape", resized)) if keys)
        raise CheckpointError(f"checkpoint.init_from: {source} does not hold this run's network ({detail}); "
                              f"model.* must match the run it comes from")
    net.load_state_dict(weights)
    return weights
