"""What every training stage provides to the engine.

A stage builds its trainable module(s) ("players") and frozen helpers from its own
sub-configs, and turns one batch into one loss per player. The engine wraps each player in a
DeepSpeed engine and hands the wrapped callables back through `bind`, so that stage code calls
the same object whether or not distribution is on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from trainer.config import LogConfig

# (player name, scalar loss to backpropagate, metrics for the log)
PlayerLoss = tuple[str, torch.Tensor, dict[str, float]]


class Stage:
    """Base class; subclasses set `self.players` and implement `losses`."""

    players: dict[str, nn.Module]

    def __init__(self) -> None:
        self.runners: dict[str, Callable[..., Any]] = {}
        self.writes_files = True  # whether this rank writes the files a stage shares (exports)

    def trainable(self) -> dict[str, nn.Module]:
        return self.players

    def bind(self, runners: dict[str, Callable[..., Any]], *, writes_files: bool = True) -> None:
        """Receive the (DeepSpeed-wrapped) callables to use in place of the raw players, and
        whether this rank is the one that writes shared files (stages never ask for a rank)."""
        self.runners = dict(runners)
        self.writes_files = writes_files

    def run(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.runners.get(name, self.players[name])(*args, **kwargs)

    def losses(self, batch: dict[str, Any], generator: torch.Generator) -> Iterator[PlayerLoss]:
        raise NotImplementedError

    def start_of_step(self, step: int, student_weights: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Called on every rank before step `step` (0-based count of finished steps).

        `student_weights()` returns the student's whole current (raw, not EMA) weights; it is a
        collective, so a stage calls it on all ranks or on none - decide from `step` alone.
        Progressive distillation uses this to make the student the next round's teacher."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Whole tensors the stage needs on resume beyond its players (e.g. a teacher that was
        a student earlier in the run); saved once per checkpoint as `stage.safetensors`."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned (called on every rank when resuming)."""

    def tokens_per_sample(self) -> int:
        return 0

    def macs_per_sample(self) -> int:
        return 0

    def write_samples(self, weights: Optional[dict[str, torch.Tensor]], log: LogConfig, path: Path) -> Optional[Path]:
        """Draw the fixed prompts with `weights` (EMA) and save a grid at `path` (rank 0)."""
        return None


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Classifier-free guidance dropout (Ho & Salimans 2022): each caption becomes the null
    caption "" with probability p, so one network learns both conditional and unconditional."""
    if p <= 0:
        return list(captions)
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
