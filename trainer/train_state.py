"""The stateful components of a training run, each with `state_dict()` / `load_state_dict()`,
handed to the checkpoint manager as one dict (as torchtitan's CheckpointManager takes its
`states`): loop counters, random generators, the stream position, the EMA, the stage's own
tensors and, for elastic resumes, every player's whole optimizer state.

A component's state dict is flat; where each entry is stored follows from the entry
(`save_states`): a key ending in `.safetensors` is a file of whole tensors,
identical on every rank, that rank 0 writes; a tensor goes into the rank's safetensors file;
anything else into the rank's JSON. Loading hands every component the same mapping, from which
it reads its own keys (a missing file reads as absent).
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from data_pipeline.stream import handed_over
from trainer.checkpoint import EMA_FILE, STAGE_FILE, CheckpointManager, RankState
from trainer.distributed import all_gather_ints
from trainer.elastic import Gather, Shape, gather_player, load_player, universal_file
from trainer.ema import EMA


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class LoopState:
    step: int = 0
    skipped_steps: int = 0
    nonfinite_in_row: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.nonfinite_in_row = state["nonfinite_in_row"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RNGState:
    """Python's, NumPy's and torch's global generators (the stage's draws are per sample:
    trainer/diffusion/noise.py)."""

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        py_state = random.getstate()
        return {"python_rng": [py_state[0], list(py_state[1]), py_state[2]],
                "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                "torch_rng": torch.get_rng_state(),
                "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        v, internal, gauss = state["python_rng"]
        random.setstate((v, tuple(internal), gauss))
        name, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch_rng"])


class ShapeRecord:
    """The global batch of the job (trainer/elastic.py's Shape) in the checkpoint's metadata,
    what a resume must keep (`written_global_batch`). Nothing to restore: a resume checks it
    before any state is loaded."""

    def __init__(self, shape: Shape):
        self.shape = shape

    def state_dict(self) -> dict[str, Any]:
        return {"global_batch": self.shape.global_batch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


class StreamState:
    """The stream's position, stored under "stream". A resume on another layout reads one
    rank's, so each rank saves its own with the ids every rank handed out of its open bucket
    windows joined in (data_pipeline.stream.handed_over): state_dict is collective."""

    def __init__(self, stream: Any):
        self.stream = stream

    def state_dict(self) -> dict[str, Any]:
        own = self.stream.state_dict()
        gathered = all_gather_ints([own["epoch"], *own["served"][-1]])
        others = [{"epoch": ints[0], "served": [ints[1:]]} for ints in gathered]
        return {"stream": handed_over([own, *others])}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])


class EMAState:
    """The EMA's whole weights (ema.safetensors, what inference loads; on the rank that keeps
    them, `gather`) and its update count. state_dict is collective (gathers ZeRO-3 partitions
    and pipeline stages)."""

    def __init__(self, ema: EMA, module: nn.Module, gather: Gather):
        self.ema, self.module, self.gather = ema, module, gather

    def state_dict(self) -> dict[str, Any]:
        whole = self.gather.made_whole(self.ema.full_state_dict(self.module, self.gather.holds))
        return {"ema_updates": self.ema.num_updates, EMA_FILE: whole}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A checkpoint of ema.enabled=false (resumed with it on, an allowed config change) has
        no EMA: it starts at the resumed weights, which are loaded before it."""
        try:
            whole = state[EMA_FILE]
        except KeyError:
            self.ema.restart(self.module)
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"dit train: the checkpoint has no {EMA_FILE} (ema.enabled was false): the EMA starts at "
                      f"the resumed weights", flush=True)
            return
        self.ema.load_full_state_dict(self.module, whole, state["ema_updates"])


class StageState:
    """A stage's own tensors (a distillation teacher, a fitted latent scale): stage.safetensors."""

    def __init__(self, stage: Any):
        self.stage = stage

    def state_dict(self) -> dict[str, Any]:
        return {STAGE_FILE: self.stage.state_tensors()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get(STAGE_FILE) is not None:
            self.stage.load_state_tensors(state[STAGE_FILE])


class PlayersState:
    """Every player's fp32 master weights and Adam moments as whole tensors (one universal file
    per player, kept by the rank that writes it: `gather`) and its step counts (the rank JSON's
    "optimizers"): what an elastic resume re-partitions onto another layout (trainer/elastic.py).
    Collective."""

    def __init__(self, engines: dict[str, Any], optimizers: dict[str, Any], names: Callable[[str], dict[str, str]],
                 gather: Callable[[str], Gather], enabled: bool = True):
        self.engines, self.optimizers, self.names, self.gather = engines, optimizers, names, gather
        self.enabled = enabled

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"optimizers": {}}
        for name in self.engines if self.enabled else ():
            state[universal_file(name)], state["optimizers"][name] = gather_player(
                self.engines[name], self.optimizers[name], self.names(name), self.gather(name))
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, engine in self.engines.items():
            load_player(engine, self.optimizers[name], self.names(name), state[universal_file(name)],
                        state["optimizers"][name])


class SavedState(Mapping):
    """One rank's saved JSON values and tensors, and the checkpoint's whole-tensor files by
    name, read when asked for (a file that was not written reads as absent)."""

    def __init__(self, directory: Path, rank_state: RankState):
        self.directory = directory
        self.values: dict[str, Any] = {**rank_state.meta, **rank_state.tensors}

    def __getitem__(self, key: str) -> Any:
        if key.endswith(".safetensors"):
            if not (self.directory / key).is_file():
                raise KeyError(key)
            return load_file(str(self.directory / key))
        return self.values[key]

    def __iter__(self) -> Iterator[str]:
        files = (p.name for p in self.directory.glob("*.safetensors") if not p.name.startswith("rank_"))
        return iter([*self.values, *files])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def save_states(ckpt: CheckpointManager, step: int, engines: dict[str, Any], states: dict[str, Stateful],
                config_yaml: str) -> Path:
    """Collective: the engines and every component of `states` in the checkpoint of `step`.
    Each state dict is split by entry: `*.safetensors` keys are whole-tensor files rank 0 writes,
    tensors go to the rank's safetensors file, the rest to its JSON."""
    meta: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    shared: dict[str, dict[str, torch.Tensor]] = {}
    for component in states.values():
        for key, value in component.state_dict().items():
            part = shared if key.endswith(".safetensors") else tensors if torch.is_tensor(value) else meta
            assert key not in meta and key not in tensors and key not in shared, f"two components save {key!r}"
            part[key] = value
    return ckpt.save(step, engines, RankState(meta, tensors), config_yaml, shared)


def load_states(ckpt: CheckpointManager, directory: Path, states: dict[str, Stateful],
                rank: Optional[int] = None) -> None:
    """Every component of `states` from what rank `rank` (default: this one) wrote to
    `directory` and the checkpoint's whole-tensor files."""
    view = SavedState(directory, ckpt.load_rank_state(directory, rank))
    for component in states.values():
        component.load_state_dict(view)
