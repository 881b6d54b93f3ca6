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
from torch import Tensor, nn

from trainer.bundle import place
from trainer.config import LogConfig, RunConfig
from trainer.diffusion import rand
from trainer.models.dit import TextEmbedding
from trainer.stage_config import StageSettings

# (player name, scalar loss to backpropagate, metrics for the log)
PlayerLoss = tuple[str, torch.Tensor, dict[str, float]]


class Stage:
    """Base class; subclasses set `self.players` and implement `losses`."""

    players: dict[str, nn.Module]
    # How many data samples `write_samples` draws from (low-resolution images to upsample,
    # images to reconstruct), 0 for none: whoever draws sets `preview` to that many, the same
    # at every step, on every run and resume of a config (trainer.engine.preview_batch).
    preview_samples = 0

    def __init__(self) -> None:
        self.runners: dict[str, Callable[..., Any]] = {}
        self.writes_files = True  # whether this rank writes the files a stage shares (exports)
        self.device = torch.device("cpu")  # where the step's tensors live (see `to`)
        self.helper_dtype = torch.float32  # the compute dtype of the frozen helpers
        self.preview: Optional[dict[str, Any]] = None  # the fixed inputs of the sample grid

    @classmethod
    def from_config(cls, cfg: RunConfig, settings: StageSettings) -> "Stage":
        """The stage of `cfg.stage.kind`, given the sub-configs it needs and its typed settings."""
        raise NotImplementedError(f"{cls.__name__} is not built from a run config")

    def trainable(self) -> dict[str, nn.Module]:
        return self.players

    def helpers(self) -> list[nn.Module]:
        """The frozen modules the stage calls (text encoder, autoencoder, teacher, ...)."""
        return []

    # whether the student starts from given weights (a distillation's teacher), not a random init
    student_from_weights = False

    def frozen_copies(self) -> list[tuple[nn.Module, nn.Module]]:
        """(copy, source): frozen modules inside a trained player made as copies of a helper
        (the adversarial discriminator's trunk: the teacher). A resume makes each again of its
        source as the stage's state left it (`Trainer.resume`): an elastic resume restores a
        player's trained weights only."""
        return []

    def counters(self) -> dict[str, int]:
        """This rank's running counts of the stage's own (the same names on every rank), logged
        beside the loader's skip counts as `data/<name>`, summed over ranks."""
        return {}

    def to(self, device: torch.device, helper_dtype: torch.dtype = torch.float32) -> "Stage":
        """Put the stage on the step's device: players there in float32 (their engines keep fp32
        master weights and cast the module to the training precision), frozen helpers there in
        the compute dtype (they are only run forward, under the engine's autocast), except the
        text encoder, which keeps model.text.precision (`trainer.bundle.place`)."""
        self.device, self.helper_dtype = torch.device(device), helper_dtype
        for module in self.players.values():
            module.to(device)
        for module in self.helpers():
            place(module, device, helper_dtype)
        return self

    def bind(self, runners: dict[str, Callable[..., Any]], *, writes_files: bool = True) -> None:
        """Receive the (DeepSpeed-wrapped) callables to use in place of the raw players, and
        whether this rank is the one that writes shared files (stages never ask for a rank)."""
        self.runners = dict(runners)
        self.writes_files = writes_files

    def run(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call a player; its floating outputs come back in float32 (under bf16/fp16 autocast the
        network computes in half precision, losses are taken in float32)."""
        return as_float32(self.runners.get(name, self.players[name])(*args, **kwargs))

    def losses(self, batch: dict[str, Any], generator: torch.Generator) -> Iterator[PlayerLoss]:
        raise NotImplementedError

    def start_of_step(self, step: int, student_weights: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Called on every rank before step `step` (0-based count of finished steps); True where
        the student begins a new training from here, so its EMA starts again at its weights.

        `student_weights()` returns the student's whole current (raw, not EMA) weights; it is a
        collective, so a stage calls it on all ranks or on none - decide from `step` alone.
        Progressive distillation uses this to make the student the next round's teacher."""
        return False

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Whole tensors the stage needs on resume beyond its players (e.g. a teacher that was
        a student earlier in the run); saved once per checkpoint as `stage.safetensors`."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned (called on every rank when resuming)."""

    def work(self, batch: dict[str, Any]) -> tuple[int, int]:
        """(tokens, forward multiply-accumulates) of the trained network on the micro-batch
        `batch` at its real shape, all its samples (padding repeats are computed too), for the
        throughput figures (trainer.metrics); read from the tensors' shapes, never their
        values, so it does not wait for the device. (0, 0): a stage without a token model."""
        return 0, 0

    def write_samples(self, weights: Optional[dict[str, torch.Tensor]], log: LogConfig, path: Path) -> Optional[Path]:
        """Draw the fixed prompts with `weights` (EMA) and save a grid at `path` (rank 0)."""
        return None

    def eval_metrics(self, weights: Optional[dict[str, torch.Tensor]], log: LogConfig) -> dict[str, float]:
        """Metrics of the samples `weights` (EMA) draw for `log.prompts`, for the engine's
        log.eval_every hook; {} for a stage that does not generate from text alone."""
        return {}


def as_float32(out: Any) -> Any:
    """A network's output(s) with floating tensors in float32 (others unchanged)."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        return type(out)(*map(as_float32, out)) if hasattr(out, "_fields") else tuple(map(as_float32, out))
    return out


def cfg_keep(batch: int, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Classifier-free guidance dropout (Ho & Salimans 2022): which captions stay (B,) bool;
    each is replaced by the null caption with probability p, so one network learns both the
    conditional and the unconditional model. Drawn on the device: no host round trip."""
    return rand((batch,), generator, device) >= p


def drop_text(text: TextEmbedding, null: TextEmbedding, keep: Tensor) -> TextEmbedding:
    """The caption embeddings with the rows where `keep` (B,) is False set to the null one."""
    return TextEmbedding(
        torch.where(keep[:, None, None], text.tokens, null.tokens.to(text.tokens.dtype)),  # (B, L, Dt)
        torch.where(keep[:, None], text.mask, null.mask),  # (B, L)
        torch.where(keep[:, None], text.pooled, null.pooled.to(text.pooled.dtype)),  # (B, Dp)
    )
