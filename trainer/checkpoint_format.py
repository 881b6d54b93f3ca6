"""The checkpoint directory format, owned here and nowhere else.

A checkpoint directory (a training step, or a distillation round's export) is written under a
temporary name `.tmp-<name>`, closed by COMPLETE.json listing the sha256 of every file in it
(written last), and renamed into place; a root's `latest` file names the newest complete one
and is replaced atomically after the rename. Readers resolve `latest`, check the files they
read against the manifest and load weights from safetensors only (no pickle). Importing this
module does not import torch: `dit train` resolves a teacher's config.yaml with it before that.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

LATEST = "latest"
COMPLETE = "COMPLETE.json"
EMA_FILE = "ema.safetensors"
ENCODERS_FILE = "encoders.json"  # the identity of the autoencoder and text encoder files trained with
TMP_PREFIX = ".tmp-"
REMOVING = f"{TMP_PREFIX}removing-"  # a checkpoint directory on its way out (`remove_dir`)
HASH_THREADS = 8  # files hashed at once (`digests`)


class CheckpointError(RuntimeError):
    pass


def sha256(path: Path, sync: bool = False) -> str:
    """The file's sha256; `sync`: also flushed to the disk (fsync) before it is listed in a
    COMPLETE.json, which must never name data a power loss can still take back."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def digests(paths: list[Path], sync: bool = False) -> list[str]:
    """`sha256` of each file, several at once: hashlib and file reads release the GIL, so the
    threads hash on as many cores (and read with as many requests in flight) as they are: a
    rank hashes several files at each save (its own) and resume (its share, `verify_share`)."""
    if len(paths) < 2:
        return [sha256(p, sync) for p in paths]
    with ThreadPoolExecutor(min(HASH_THREADS, len(paths))) as pool:
        return list(pool.map(lambda p: sha256(p, sync), paths))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """`text` at `path` through a temporary file, fsynced and renamed."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def temporary_dir(final: Path) -> Path:
    """The empty `.tmp-<name>` directory beside `final` that a save writes into."""
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: Path, step: int, world_size: int, known: Optional[dict[str, str]] = None) -> Path:
    """Close `tmp` with COMPLETE.json (the sha256 of every file in it) and rename it to `final`,
    replacing a stale directory of the same name (an abandoned run's, an earlier export).
    `known`: name (relative to `tmp`) -> sha256 of the files the ranks that wrote them already
    hashed and flushed to the disk; the others are hashed (and flushed) here."""
    known = dict(known or {})
    missing = [name for name in known if not (tmp / name).is_file()]
    if missing:
        raise CheckpointError(f"{tmp / missing[0]} was written and hashed by its rank but is not there at the "
                              f"commit (checkpoint.dir must be one directory shared by every node)")
    entries = list(tmp.rglob("*"))
    names = sorted({str(p.relative_to(tmp)) for p in entries if p.is_file()} | set(known))
    todo = [name for name in names if name not in known]
    known.update(zip(todo, digests([tmp / name for name in todo], sync=True)))
    for directory in [tmp, *(p for p in entries if p.is_dir())]:  # their entries too
        fsync_dir(directory)
    complete = {"step": step, "world_size": world_size, "files": {name: known[name] for name in names},
                "sizes": {name: (tmp / name).stat().st_size for name in names}}  # how a resume deals the checks
    write_atomic(tmp / COMPLETE, json.dumps(complete, indent=1, sort_keys=True))
    return replace_dir(tmp, final)


def replace_dir(tmp: Path, final: Path) -> Path:
    """Rename the finished `tmp` (`temporary_dir`) to `final`, replacing a directory of that
    name whole: a kill midway leaves the old one, or none under `final` and the new one under
    `tmp`, never parts of both."""
    remove_dir(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    return final


def remove_dir(path: Path) -> None:
    """Delete a checkpoint directory (if there) so that a kill midway never leaves part of it
    under its own name, where a `step_*` holding its COMPLETE.json counts as a checkpoint: one
    atomic rename out of the way first, then the deletion; a leftover is removed with the
    partial saves (trainer/checkpoint.py)."""
    if not path.exists():
        return
    doomed = path.with_name(f"{REMOVING}{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def point_latest(root: Path, name: str) -> None:
    """`root/latest` names `name` (written after the commit it points to)."""
    write_atomic(root / LATEST, name)


def resolve(directory: str | Path) -> Path:
    """A step directory: `directory` itself, or the one its `latest` pointer names."""
    directory = Path(directory)
    if (directory / LATEST).is_file():
        return directory / (directory / LATEST).read_text().strip()
    return directory


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a checkpoint root (with its `latest` pointer) or a step directory."""
    path = Path(path)
    return path.is_dir() and ((path / LATEST).is_file() or (path / COMPLETE).is_file())


def verify(directory: Path, names: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """Check `names` (default: every file of the manifest) against COMPLETE.json; its content."""
    return _check(directory, read_complete(directory), names)


def _check(directory: Path, complete: dict[str, Any], names: Optional[tuple[str, ...]]) -> dict[str, Any]:
    """`verify` against COMPLETE.json's content, already read."""
    wanted = names if names is not None else tuple(complete["files"])
    for rel in wanted:
        if rel not in complete["files"] or not (directory / rel).is_file():
            raise _modified(directory / rel)
    for rel, digest in zip(wanted, digests([directory / rel for rel in wanted])):
        if digest != complete["files"][rel]:
            raise _modified(directory / rel)
    return complete


def read_complete(directory: Path) -> dict[str, Any]:
    """The COMPLETE.json of a step directory (not checked against its files)."""
    if not directory.exists():
        raise CheckpointError(f"{directory} does not exist")
    if not (directory / COMPLETE).is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {COMPLETE})")
    return json.loads((directory / COMPLETE).read_text())


def verify_share(directory: Path, rank: int, world_size: int) -> dict[str, Any]:
    """`verify` this rank's share of a checkpoint's files (`shares`): the ranks of a resume
    check them together, each file read once (rank 0 alone read a checkpoint of every rank's
    ZeRO shards, the others waiting). The sizes are COMPLETE.json's: a thousand ranks do not
    each ask the filesystem for the size of every file."""
    complete = read_complete(directory)
    listed = complete.get("sizes")
    sizes = {name: _size(directory, name, listed) for name in complete["files"]}  # every file listed is dealt
    return _check(directory, complete, tuple(shares(sizes, world_size)[rank]))


def _size(directory: Path, name: str, listed: Optional[dict[str, int]]) -> int:
    """A file's size from COMPLETE.json's sizes, else (a checkpoint from before they were
    listed) from the filesystem, 0 when it is missing (its rank refuses it)."""
    if listed is not None:
        return int(listed.get(name, 0))
    path = directory / name
    return path.stat().st_size if path.is_file() else 0


def shares(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Files (name -> bytes) dealt to `world_size` ranks by size, largest first (ties by name),
    each to the rank holding the fewest bytes so far (the lowest of those): every rank deals the
    same from the same listing."""
    held, out = [(0, rank) for rank in range(world_size)], [[] for _ in range(world_size)]  # a heap
    for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        total, rank = heapq.heappop(held)
        out[rank].append(name)
        heapq.heappush(held, (total + size, rank))
    return out


def _modified(path: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint file {path} is missing or was modified after it was written "
                           f"(sha256 mismatch); refusing to load it")


def load_for_inference(directory: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(resolved config YAML, whole EMA weights) of a complete checkpoint, after verifying its
    files; `directory` may be a checkpoint root holding `latest`. No pickle is involved."""
    from safetensors.torch import load_file

    directory = resolve(directory)
    verify(directory, ("config.yaml", EMA_FILE))
    return (directory / "config.yaml").read_text(), load_file(str(directory / EMA_FILE))


def write_inference_dir(directory: Path, weights: dict[str, torch.Tensor], config_yaml: str,
                        extra_files: dict[str, str], step: int = 0) -> Path:
    """A directory `load_for_inference` loads: config.yaml, ema.safetensors (the weights to
    sample) and `extra_files` (name -> text), committed as a checkpoint is."""
    from safetensors.torch import save_file

    tmp = temporary_dir(directory)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / EMA_FILE))
    (tmp / "config.yaml").write_text(config_yaml)
    for name, text in extra_files.items():
        (tmp / name).write_text(text)
    return commit(tmp, directory, step, world_size=1)


# ------------------------------------------------------------------------------- round exports

ROUNDS_DIR = "rounds"  # <checkpoint.dir>/rounds/round_<r>_<N>steps/: a progressive run's finished rounds
ROUND_FILE = "round.json"
STAGE_FILE = "stage.safetensors"  # a step directory's stage state (a progressive round's teacher, its round)


def student_round(directory: Path, stage: Any) -> Optional[int]:
    """The round (0-based) whose student the progressive checkpoint `directory` holds (`stage`:
    its run's StageConfig); None where its config's last round is the one (a round export,
    whose config's rounds end at its round, a run of one round, or another stage kind).

    A step directory saved mid-run holds the student of the round in progress, which the stage
    saved in stage.safetensors (`round`: the index of its current teacher's round, written from
    round 2 on; absent: round 1). It is read, not recomputed from stage.steps: a resume may change
    stage.steps, and the rounds keep the length the run started with (`keep_round_length`).
    Read as numpy: the config checks before any process starts import no torch."""
    if stage.kind != "progressive" or len(stage.rounds) == 1 or (directory / ROUND_FILE).is_file():
        return None
    if not (directory / STAGE_FILE).is_file():
        raise CheckpointError(f"{directory} is a step directory of a progressive run over rounds "
                              f"{list(stage.rounds)} without its {STAGE_FILE}, so which round's student it "
                              f"holds (how many steps it samples with) is unknown; use a round export "
                              f"instead: <checkpoint.dir>/{ROUNDS_DIR}/round_<r>_<N>steps")
    from safetensors import safe_open

    verify(directory, (STAGE_FILE,))
    with safe_open(str(directory / STAGE_FILE), framework="numpy") as f:
        return int(f.get_tensor("round")) if "round" in f.keys() else 0


def rounds_exports(checkpoint_dir: str | Path) -> dict[int, Path]:
    """Step count -> export directory of a progressive run's finished rounds."""
    out = {}
    for directory in sorted(Path(checkpoint_dir, ROUNDS_DIR).glob("round_*steps")):
        if (directory / COMPLETE).is_file():
            out[json.loads((directory / ROUND_FILE).read_text())["steps"]] = directory
    return out
