"""BERT's encoder (Devlin et al. 2019, arXiv:1810.04805) built from torch's own layers and read
from a transformers model folder (config.json, model.safetensors): the network of the bundled
all-MiniLM-L6-v2 (text.py, `model.text.kind=minilm`).

    x = LayerNorm(word[ids] + position[0..L) + token_type[0])       (B, L, D)
    x = post-norm layer, num_hidden_layers times:                   nn.TransformerEncoderLayer
          x = LayerNorm(x + SelfAttention(x, keys masked by padding))
          x = LayerNorm(x + W2 GELU(W1 x))

Why not transformers' BertModel: its model stack (PreTrainedModel, generation, masking, weight
conversion) imports torch._dynamo, inductor, DTensor and scipy on the way: building the encoder
took 3.2 s of CPU in a fresh process against 0.2 s with this module, for a frozen 22 M-parameter
network, and every rank builds one (a 2-rank 2-step launch: 21 s of CPU before, 14 after; `make
test` starts hundreds of ranks). transformers' BertModel computes the same states
(tests/models/test_text_encoders.py) and serves every other encoder (`model.text.kind=hf`), and
the diffusers export writes one.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

# weights of a BertModel checkpoint the encoder does not use: the [CLS] pooler (sentence
# embeddings pool the token states instead) and the position ids buffer (0..511)
UNUSED = ("pooler.", "embeddings.position_ids")
EMBEDDINGS = {"embeddings.word_embeddings.weight": "word.weight",
              "embeddings.position_embeddings.weight": "position.weight",
              "embeddings.token_type_embeddings.weight": "token_type.weight",
              "embeddings.LayerNorm.weight": "norm.weight", "embeddings.LayerNorm.bias": "norm.bias"}
# BertLayer's sub-modules -> nn.TransformerEncoderLayer's (query, key and value are one in_proj)
LAYER = {"attention.output.dense": "self_attn.out_proj", "attention.output.LayerNorm": "norm1",
         "intermediate.dense": "linear1", "output.dense": "linear2", "output.LayerNorm": "norm2"}


class BertEncoder(nn.Module):
    """(B, L) token ids and attention mask -> (B, L, D) final hidden states, as BertModel's
    `last_hidden_state` (absolute positions, GELU, token type 0)."""

    def __init__(self, config: dict):
        super().__init__()
        check_supported(config)
        d, eps = config["hidden_size"], config["layer_norm_eps"]
        self.word = nn.Embedding(config["vocab_size"], d)
        self.position = nn.Embedding(config["max_position_embeddings"], d)
        self.token_type = nn.Embedding(config["type_vocab_size"], d)
        self.norm = nn.LayerNorm(d, eps=eps)
        layer = nn.TransformerEncoderLayer(d, config["num_attention_heads"], config["intermediate_size"], dropout=0.0,
                                           activation="gelu", layer_norm_eps=eps, batch_first=True, norm_first=False)
        self.layers = nn.TransformerEncoder(layer, config["num_hidden_layers"], enable_nested_tensor=False)

    @classmethod
    def from_folder(cls, folder: Path, config: dict) -> "BertEncoder":
        """The encoder of a transformers BERT folder (`config`: its config.json), its weights
        loaded strictly."""
        encoder = cls(config)
        encoder.load_state_dict(from_bert_weights(load_file(str(folder / "model.safetensors")),
                                                  config["num_hidden_layers"]), strict=True)
        return encoder

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)  # (L,)
        x = self.norm(self.word(ids) + self.position(positions) + self.token_type.weight[0])  # (B, L, D)
        return self.layers(x, src_key_padding_mask=~mask.bool())  # (B, L, D)


def check_supported(config: dict) -> None:
    """The BERT variant this module computes: absolute positions, (erf) GELU."""
    found = (config.get("model_type"), config.get("position_embedding_type", "absolute"), config.get("hidden_act"))
    if found != ("bert", "absolute", "gelu"):
        raise ValueError(f"model.text.path: model_type, position_embedding_type, hidden_act = {found}; the minilm "
                         f"encoder reads BERT folders with ('bert', 'absolute', 'gelu'); use model.text.kind=hf")


def from_bert_weights(state: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """A transformers BertModel state dict (`bert.` prefix allowed) renamed for BertEncoder.
    A weight neither used nor in UNUSED is an error: it would be silently dropped."""
    state = {k.removeprefix("bert."): v for k, v in state.items() if not k.removeprefix("bert.").startswith(UNUSED)}
    out = {ours: state.pop(theirs) for theirs, ours in EMBEDDINGS.items() if theirs in state}
    for i in range(num_layers):
        theirs, ours = f"encoder.layer.{i}.", f"layers.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{theirs}attention.self.{part}.{kind}", None) for part in ("query", "key", "value")]
            if all(t is not None for t in qkv):
                out[f"{ours}self_attn.in_proj_{kind}"] = torch.cat(qkv)  # (3D, D) / (3D,)
            for src, dst in LAYER.items():
                if f"{theirs}{src}.{kind}" in state:
                    out[f"{ours}{dst}.{kind}"] = state.pop(f"{theirs}{src}.{kind}")
    if state:
        raise ValueError(f"model.text.path: weights the BERT encoder has no place for: {sorted(state)[:5]}")
    return out
