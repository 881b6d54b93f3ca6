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
        COMPLETE.json                sha256 of every file above; written last = completion marker
      latest                         "step_00000200", replaced atomically after the rename

A save writes into `.tmp-step_X`, and only a directory whose every rank succeeded is renamed
into place; a crash at any point leaves `latest` on the previous complete checkpoint, and
leftovers are cleaned by the next save. Retention never deletes the checkpoint just committed.

Pickle containment: our own files are JSON and safetensors. DeepSpeed writes its engine state
with `torch.save`; we load it through `SafeCheckpointEngine`, i.e. `torch.load(weights_only=True)`
with only DeepSpeed's plain state classes allow-listed, after checking every file against the
sha256 list in COMPLETE.json. A file replaced by a malicious pickle fails both checks.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from trainer.config import CheckpointConfig

LATEST = "latest"
COMPLETE = "COMPLETE.json"
EMA_FILE = "ema.safetensors"
STAGE_FILE = "stage.safetensors"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    pass


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed's plain state classes that its optimizer checkpoints contain."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine():
    """A DeepSpeed checkpoint engine whose load never runs arbitrary pickle code."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # the unpickler's error names the refused global
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


def _rank_paths(directory: Path, rank: int) -> tuple[Path, Path]:
    return directory / f"rank_{rank:05d}.json", directory / f"rank_{rank:05d}.safetensors"


def _all_ok(ok: bool) -> list[int]:
    """Every rank's success flag (collective); the ranks that failed."""
    flags = torch.tensor([1 if ok else 0], dtype=torch.int64)
    if not dist.is_initialized():
        return [] if ok else [0]
    gathered = [torch.zeros_like(flags) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flags)
    return [r for r, f in enumerate(gathered) if int(f) == 0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def config_differences(old_yaml: str, new_yaml: str, ignore: tuple[str, ...]) -> list[str]:
    """Changed lines between two resolved configs, ignoring keys that may change on resume."""

    def relevant(text: str) -> list[str]:
        out, path = [], []
        for line in text.splitlines():
            stripped = line.lstrip()
            depth = (len(line) - len(stripped)) // 2
            key = stripped.split(":", 1)[0]
            path = path[:depth] + [key]
            dotted = ".".join(path)
            if not any(dotted == k or dotted.startswith(k + ".") for k in ignore):
                out.append(f"{dotted}: {stripped.split(':', 1)[1].strip() if ':' in stripped else stripped}")
        return out

    diff = difflib.unified_diff(relevant(old_yaml), relevant(new_yaml), lineterm="", n=0)
    return [d for d in diff if d[:1] in "+-" and not d.startswith(("+++", "---"))]


class CheckpointManager:
    """Collective save/load of the whole training state. Every rank calls every method."""

    def __init__(self, cfg: CheckpointConfig, rank: int, world_size: int):
        self.cfg = cfg
        self.root = Path(cfg.dir)
        self.rank = rank
        self.world_size = world_size
        # Test hook (fault suite): called once the engine states are written, before commit.
        self.before_commit: Optional[Callable[[int, Path], None]] = None

    # ---- save -------------------------------------------------------------------------------
    def save(self, step: int, engines: dict[str, Any], rank_state: RankState, config_yaml: str,
             shared: dict[str, dict[str, torch.Tensor]]) -> Path:
        """Collective. `shared`: file name -> whole tensors, identical on every rank (the EMA,
        the stage's state); rank 0 writes them."""
        final = self.root / step_name(step)
        tmp = self.root / f"{TMP_PREFIX}{step_name(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        error = None
        try:
            for name, engine in engines.items():
                engine.save_checkpoint(str(tmp), tag=name, save_latest=False)
            self._write_rank_state(tmp, rank_state)
            for filename, tensors in shared.items():
                if self.rank == 0 and tensors:
                    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / filename))
            if self.before_commit is not None:
                self.before_commit(step, tmp)
        except Exception as e:  # reported collectively below, so no rank is left waiting
            error = e
        failed = _all_ok(error is None)
        if failed:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            reason = f": {error}" if error is not None else ""
            raise CheckpointError(f"checkpoint of step {step} failed on rank(s) {failed}{reason}; "
                                  f"`latest` still points to the previous checkpoint")
        if self.rank == 0:
            self._commit(tmp, final, step, config_yaml)
        if _all_ok(self.rank != 0 or (final / COMPLETE).is_file()):
            raise CheckpointError(f"rank 0 could not commit the checkpoint of step {step}")
        return final

    def _write_rank_state(self, directory: Path, state: RankState) -> None:
        meta_path, tensor_path = _rank_paths(directory, self.rank)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.tensors.items()}, str(tensor_path))
        meta_path.write_text(json.dumps(state.meta, sort_keys=True))

    def _commit(self, tmp: Path, final: Path, step: int, config_yaml: str) -> None:
        (tmp / "config.yaml").write_text(config_yaml)
        files = {
            str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        complete = {"step": step, "world_size": self.world_size, "files": files}
        _write_atomic(tmp / COMPLETE, json.dumps(complete, indent=1, sort_keys=True))
        if final.exists():  # a stale directory of the same step from an abandoned run
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / LATEST, final.name)
        self._apply_retention(keep_name=final.name)

    def _apply_retention(self, keep_name: str) -> None:
        for leftover in self.root.glob(f"{TMP_PREFIX}step_*"):
            shutil.rmtree(leftover, ignore_errors=True)
        complete = sorted(p for p in self.root.glob("step_*") if (p / COMPLETE).is_file())
        for old in complete[: max(0, len(complete) - self.cfg.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

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

    def verify(self, directory: Path) -> dict[str, Any]:
        """Check every file against COMPLETE.json; returns its content."""
        complete = json.loads((directory / COMPLETE).read_text())
        for rel, digest in complete["files"].items():
            path = directory / rel
            if not path.is_file() or _sha256(path) != digest:
                raise CheckpointError(
                    f"checkpoint file {path} is missing or was modified after it was written "
                    f"(sha256 mismatch); refusing to load it"
                )
        return complete

    def check_compatible(self, directory: Path, complete: dict[str, Any], config_yaml: str,
                         ignore: tuple[str, ...]) -> None:
        if complete["world_size"] != self.world_size:
            raise CheckpointError(
                f"{directory} was written by {complete['world_size']} ranks and this job has "
                f"{self.world_size}; the ZeRO optimizer partitions cannot be re-split yet - "
                f"resume with {complete['world_size']} ranks"
            )
        if self.cfg.allow_config_change:
            return
        diffs = config_differences((directory / "config.yaml").read_text(), config_yaml, ignore)
        if diffs:
            listing = "; ".join(diffs[:12])
            raise CheckpointError(
                f"the config differs from the one {directory} was written with ({listing}); "
                f"pass checkpoint.allow_config_change=true to resume anyway"
            )

    def load_rank_state(self, directory: Path) -> RankState:
        meta_path, tensor_path = _rank_paths(directory, self.rank)
        return RankState(meta=json.loads(meta_path.read_text()), tensors=load_file(str(tensor_path)))

    @staticmethod
    def load_engine(engine: Any, directory: Path, name: str) -> None:
        engine.checkpoint_engine = safe_checkpoint_engine()
        path, _ = engine.load_checkpoint(str(directory), tag=name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no state for '{name}' in {directory}")


def load_for_inference(directory: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(resolved config YAML, whole EMA weights) of a complete checkpoint, after verifying its
    files; `directory` may be a checkpoint root holding `latest`. No pickle is involved."""
    directory = Path(directory)
    if (directory / LATEST).is_file():
        directory = directory / (directory / LATEST).read_text().strip()
    if not (directory / COMPLETE).is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {COMPLETE})")
    complete = json.loads((directory / COMPLETE).read_text())
    for rel in ("config.yaml", EMA_FILE):
        path = directory / rel
        if rel not in complete["files"] or _sha256(path) != complete["files"][rel]:
            raise CheckpointError(f"{path} is missing or was modified after it was written")
    return (directory / "config.yaml").read_text(), load_file(str(directory / EMA_FILE))
