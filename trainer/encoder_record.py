"""What a network or precomputed latents learned with, and the check against a run's encoders.

A DiT learns one autoencoder's latents and one text encoder's embeddings: a checkpoint records
their identity (encoders.json, `encoders_record`) and so do precomputed latents (their manifest's
`extra.encoded_by`); sampling, resuming, distilling or training on them with other encoders at
the same paths decoded garbage without an error, and is refused naming the key. Torch-free:
the stage checks (`trainer/stages/checks.py`) and inference (`cascade.py`) both use it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from trainer.checkpoint_format import ENCODERS_FILE, sha256
from trainer.config import ConfigError, ModelConfig, TextEncoderConfig

# What a text encoder's embeddings depend on among its settings (`null` is the DiT's own: the
# dropped caption's embedding is learned or zeros at training time, never precomputed).
TEXT_IDENTITY = ("kind", "arch", "max_length", "precision")
HASHED_BYTES = 64 << 20  # text encoder files up to this size are identified by sha256 ...
SAMPLED_BYTES = 16 << 20  # ... larger ones by their size and the sha256 of this much at each end


def encoder_identity(model: ModelConfig) -> dict:
    """What precomputed latents and text embeddings depend on, recorded in their manifest
    (`extra.encoded_by`, see `trainer.stages.checks.check_latent_sources`): the sha256 of the autoencoder's weights,
    config and latent normalisation (none for a pixel-space or unsaved autoencoder), the text
    encoder's settings, and the identity of the files at `model.text.path` (none where the
    weights come with a package: minilm, open_clip's own)."""
    ae = model.autoencoder
    saved = ae.kind != "none" and bool(ae.path) and Path(ae.path).is_dir()
    files = sorted(p for p in Path(ae.path).iterdir()
                   if p.suffix == ".safetensors" or p.name in ("config.json", "latent_norm.json")) if saved else []
    return {"autoencoder": {p.name: _sha256(p) for p in files}, "text": dataclasses.asdict(model.text),
            "text_files": _text_files(model.text)}


def _text_files(text: TextEncoderConfig) -> dict[str, str]:
    """Per file of the text encoder's `path` (the file, or the files of the directory): its
    identity (`_file_identity`); a `path` that is no local file or folder (a hub id) is
    recorded as it is written."""
    if not text.path:
        return {}
    path = Path(text.path)
    if not path.exists():
        return {text.path: "not a local path"}
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {p.name: _file_identity(p) for p in files}


def _file_identity(path: Path) -> str:
    """A file's sha256, or for one above HASHED_BYTES (a T5-XXL's 19 GB of weights would take
    a minute to hash at every start) its size and the sha256 of its first and last
    SAMPLED_BYTES: a safetensors header and weights at both ends, which two trainings of one
    architecture (a fine-tune, another release), files of the same size, do not share."""
    size = path.stat().st_size
    if size <= HASHED_BYTES:
        return _sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLED_BYTES))
        f.seek(size - SAMPLED_BYTES)
        digest.update(f.read(SAMPLED_BYTES))
    return f"{size} bytes, ends {digest.hexdigest()}"


def same_encoders(recorded: dict, current: dict, made: str, redo: str) -> None:
    """ConfigError naming the key where `made` (precomputed latents, a trained network) came
    from other encoders than this run's: `recorded` and `current` are `encoder_identity`s."""
    if "autoencoder" in recorded and recorded["autoencoder"] != current["autoencoder"]:
        differ = sorted(set(recorded["autoencoder"].items()) ^ set(current["autoencoder"].items()))
        raise ConfigError("model.autoencoder.path", f"{made} another autoencoder (its files differ from those at "
                          f"this path: {sorted({name for name, _ in differ})}); {redo}")
    for key in TEXT_IDENTITY:
        theirs, ours = recorded.get("text", {}).get(key), current["text"][key]
        if theirs is not None and theirs != ours:
            raise ConfigError(f"model.text.{key}", f"{made} a text encoder of model.text.{key}={theirs!r}, "
                              f"this run has {ours!r}; {redo}")
    if "text_files" in recorded and recorded["text_files"] != current["text_files"]:
        raise ConfigError("model.text.path", f"{made} a text encoder whose files differ from those at this path; "
                          f"{redo}")


def encoders_record(model: ModelConfig) -> str:
    """The text of a checkpoint's encoders.json: the `encoder_identity` of what it trains with."""
    return json.dumps(encoder_identity(model), indent=1, sort_keys=True) + "\n"


def check_encoders(directory: Path, model: ModelConfig, use: str) -> None:
    """ConfigError naming the key where the encoders `model` names are not those the network
    of `directory` (a step directory or round export) learned with, as its encoders.json
    records them (none recorded: nothing to check). A DiT learns one autoencoder's latents and
    one text encoder's embeddings: a re-fitted latent normalisation or another autoencoder at
    the same path made it decode garbage without an error. `use`: what needs the match."""
    record = Path(directory) / ENCODERS_FILE
    if record.is_file():
        same_encoders(json.loads(record.read_text()), encoder_identity(model), f"{directory} was trained with",
                      f"{use} needs the encoders it was trained with: restore them at that path, or point the key "
                      f"at them")


def _sha256(path: Path) -> str:
    """`sha256` of an encoder file, read once per process while the file is unchanged: a run's
    start asks for the same files up to four times (`dit train`'s preflight, the resume check,
    the teacher's, the checkpoints' encoders.json), each a full read of the autoencoder."""
    st = path.stat()
    return _cached_sha256(str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@functools.lru_cache(maxsize=256)
def _cached_sha256(path: str, size: int, mtime_ns: int, ctime_ns: int) -> str:
    return sha256(Path(path))
