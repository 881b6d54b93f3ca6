"""The resume check of `dit bench gpu` (launch/bench_gpu.py): a run resumed from a checkpoint
against the uninterrupted one, losses, sample keys and every checkpoint file bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.bench_gpu_figures import losses, read_jsonl

KEYS_FILE = Path("logs") / "keys" / "rank_00000.jsonl"


def compare_trees(a: Any, b: Any, name: str = "", limit: int = 5) -> list[str]:
    """Differences between two nested states (dicts, lists, tensors, numbers), tensors bit for
    bit: an empty list when they are identical."""
    import torch

    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if len(out) >= limit:
            return
        where = path or "top level"
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                out.append(f"{where}: tensor vs {type(y if isinstance(x, torch.Tensor) else x).__name__}")
            elif x.shape != y.shape or x.dtype != y.dtype:
                out.append(f"{where}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            elif not torch.equal(x, y):
                diff = (x.double() - y.double()).abs()
                finite = diff[torch.isfinite(diff)]
                worst = float(finite.max()) if finite.numel() else float("nan")
                out.append(f"{where}: {int((x != y).sum())} of {x.numel()} values differ (max |diff| {worst:.3g})")
        elif isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                out.append(f"{where}: keys differ ({sorted(map(str, x.keys() ^ y.keys()))[:5]})")
            for k in sorted(x.keys() & y.keys(), key=str):
                walk(x[k], y[k], f"{path}.{k}" if path else str(k))
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if len(x) != len(y):
                out.append(f"{where}: {len(x)} vs {len(y)} entries")
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif type(x) is type(y) and hasattr(x, "__dict__") and not isinstance(x, type):
            walk(vars(x), vars(y), path)  # DeepSpeed's plain state objects (loss scaler, ...)
        elif x != y and not (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)):
            out.append(f"{where}: {x!r} vs {y!r}")

    walk(a, b, name)
    return out


def load_checkpoint_file(path: Path) -> Any:
    """A checkpoint file's content: safetensors and JSON directly, DeepSpeed's torch.save files
    through the trainer's weights-only loader (no pickle code runs)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".pt":
        from trainer.checkpoint import safe_checkpoint_engine

        return safe_checkpoint_engine().load(str(path), map_location="cpu")
    return path.read_bytes()  # DeepSpeed's helper scripts (zero_to_fp32.py): compared as bytes


def compare_checkpoints(ref: Path, other: Path) -> list[str]:
    """Every state file of two checkpoint directories, compared by content. Left out:
    config.yaml (it names each run's own folders) and COMPLETE.json (digests of the same)."""
    skip = {"config.yaml", "COMPLETE.json"}
    names = sorted(str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file() and p.name not in skip)
    other_names = sorted(str(p.relative_to(other)) for p in other.rglob("*") if p.is_file() and p.name not in skip)
    if names != other_names:
        return [f"files differ: {sorted(set(names) ^ set(other_names))}"]
    problems: list[str] = []
    for rel in names:
        problems += compare_trees(load_checkpoint_file(ref / rel), load_checkpoint_file(other / rel), rel)
    return problems


def step_keys(run_dir: Path) -> dict[int, list[str]]:
    return {r["step"]: r["keys"] for r in read_jsonl(run_dir / KEYS_FILE)}


@dataclass
class ResumeResult:
    problems: list[str]
    compared_steps: int

    @property
    def ok(self) -> bool:
        return not self.problems


def resume_check(ref_dir: Path, resumed_dir: Path, from_step: int, to_step: int) -> ResumeResult:
    """The resumed run (from `from_step`) against the uninterrupted one: the sample keys and the
    loss of every redone step, and the final checkpoints, all bit-identical."""
    from trainer.checkpoint import step_name

    problems: list[str] = []
    redone = range(from_step + 1, to_step + 1)
    ref_losses, new_losses = losses(read_jsonl(ref_dir / "logs" / "metrics.jsonl")), \
        losses(read_jsonl(resumed_dir / "logs" / "metrics.jsonl"))
    ref_keys, new_keys = step_keys(ref_dir), step_keys(resumed_dir)
    for step in redone:
        if step not in ref_losses or step not in new_losses:
            problems.append(f"no loss logged for step {step}")
        elif ref_losses[step] != new_losses[step]:
            problems.append(f"loss of step {step}: {ref_losses[step]!r} uninterrupted vs {new_losses[step]!r} resumed")
        if ref_keys.get(step) != new_keys.get(step):
            problems.append(f"sample keys of step {step} differ")
    ref_ckpt = ref_dir / "checkpoints" / step_name(to_step)
    new_ckpt = resumed_dir / "checkpoints" / step_name(to_step)
    if not ref_ckpt.is_dir() or not new_ckpt.is_dir():
        problems.append(f"missing final checkpoint {ref_ckpt if not ref_ckpt.is_dir() else new_ckpt}")
    else:
        problems += [f"step {to_step} checkpoint: {p}" for p in compare_checkpoints(ref_ckpt, new_ckpt)]
    return ResumeResult(problems, len(redone))


def seed_resume_dir(ref_dir: Path, resumed_dir: Path, step: int) -> None:
    """A fresh run folder whose checkpoint root holds (hard links to) the reference run's
    checkpoint of `step` and a `latest` pointer to it: the resumed run starts from there."""
    from trainer.checkpoint import step_name
    from trainer.checkpoint_format import point_latest

    src = ref_dir / "checkpoints" / step_name(step)
    root = resumed_dir / "checkpoints"
    root.mkdir(parents=True)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, root / src.name, copy_function=link)
    point_latest(root, src.name)
