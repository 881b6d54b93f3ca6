"""Text encoders: the shipped MiniLM offline, null captions, HF/T5 folders, open_clip towers."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trainer.config import TextEncoderConfig
from trainer.models.text import build_text_encoder, minilm_path

CAPTIONS = ["a large red circle at the top left", "a small blue square at the bottom right"]


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder(TextEncoderConfig(kind="minilm", max_length=16))


def test_minilm_loads_offline_and_captions_differ(minilm):
    emb = minilm.encode(CAPTIONS)
    assert (minilm.dim, minilm.pooled_dim, minilm.max_length) == (384, 384, 16)
    assert emb.tokens.shape == (2, 16, 384) and emb.mask.shape == (2, 16) and emb.pooled.shape == (2, 384)
    assert emb.mask.dtype == torch.bool
    assert not torch.allclose(emb.pooled[0], emb.pooled[1], atol=1e-3)
    assert not torch.allclose(emb.tokens[0, 1], emb.tokens[1, 1], atol=1e-3)
    assert torch.count_nonzero(emb.tokens[~emb.mask]) == 0  # padding states are zeroed


def test_minilm_pooled_equals_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(minilm_path(), device="cpu").encode(CAPTIONS, convert_to_tensor=True)
    assert torch.allclose(minilm.encode(CAPTIONS).pooled, reference, atol=1e-5)


def test_minilm_is_frozen_and_stays_in_eval(minilm):
    minilm.train()
    assert not minilm.backbone.training
    assert not any(p.requires_grad for p in minilm.parameters())


def test_empty_caption_gives_the_zero_null_embedding(minilm):
    emb = minilm.encode(["", CAPTIONS[0], "  "])
    null = minilm.null_embedding(1)
    for i in (0, 2):
        assert torch.count_nonzero(emb.tokens[i]) == 0 and torch.count_nonzero(emb.pooled[i]) == 0
        assert emb.mask[i].tolist() == [True] + [False] * 15
        assert torch.equal(emb.tokens[i], null.tokens[0]) and torch.equal(emb.mask[i], null.mask[0])
    assert torch.equal(emb.pooled[1], minilm.encode([CAPTIONS[0]]).pooled[0])


def test_learned_null_encoder_has_no_weights_and_marks_the_empty_caption_by_its_mask():
    """null=learned: the learned null is a weight of the DiT (tests/models/test_learned_null.py);
    the encoder gives the empty caption with no real token, the place the DiT fills."""
    from trainer.models.text import CachedTextEncoder

    enc = build_text_encoder(TextEncoderConfig(kind="minilm", max_length=8, null="learned"))
    assert not any(p.requires_grad for p in enc.parameters())
    emb = enc.encode(["", CAPTIONS[0]])
    assert not emb.mask[0].any() and emb.mask[1].any()
    assert torch.count_nonzero(emb.tokens[0]) == 0 and torch.count_nonzero(emb.pooled[0]) == 0
    cached = CachedTextEncoder(enc)
    again = cached.encode(["", CAPTIONS[0]])
    assert set(cached.cache) == {"", CAPTIONS[0]}  # a constant function of the caption: cached
    # the cache encodes new captions in chunks of `cached.chunk` rows (fixed shape: bit-identical
    # whatever the company), so it holds the rows of that encoder call, and close to any other
    chunk = enc.encode(["", CAPTIONS[0]] + [""] * (cached.chunk - 2))
    assert all(torch.equal(a, b[:2]) for a, b in zip(again, chunk))
    assert torch.equal(again.mask, emb.mask) and torch.allclose(again.tokens, emb.tokens, atol=1e-5)
    # each cached row holds its own bytes only, as the cache counts them against max_bytes
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size()
               for row in cached.cache.values() for t in row)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


LONG = "a very large bright crimson circle " * 8  # 49 tokens with [CLS] [SEP]: cut at max_length


def test_minilm_computes_what_transformers_bert_model_does(minilm, minilm_tokenizer):
    """The MiniLM as torch's own layers (trainer/models/bert.py) against transformers' BertModel
    of the same folder: the same token ids and masks (cased, accented, empty, too long), states
    within float32 rounding, the same uncut token counts; and no transformers import for it."""
    import subprocess
    import sys

    from transformers import AutoModel

    captions = [CAPTIONS[0], "Ein GROSSER blauer Würfel, é à ç!", "", LONG]
    batch = minilm_tokenizer(captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    encoded = minilm.tokenizer.encode_batch(captions)
    assert [e.ids for e in encoded] == batch["input_ids"].tolist()
    assert [e.attention_mask for e in encoded] == batch["attention_mask"].tolist()
    with torch.no_grad():
        reference = AutoModel.from_pretrained(minilm_path()).eval()(**batch).last_hidden_state  # (4, 16, 384)
    ours = minilm.encode(captions)
    real = batch["attention_mask"].bool()
    assert torch.allclose(ours.tokens[:2][real[:2]], reference[:2][real[:2]], atol=2e-5)
    assert torch.allclose(ours.tokens[3], reference[3], atol=2e-5)
    assert minilm._token_counts(captions) == [len(ids) for ids in minilm_tokenizer(captions)["input_ids"]]
    code = ("import sys; from trainer.config import TextEncoderConfig; from trainer.models.text import "
            "build_text_encoder; build_text_encoder(TextEncoderConfig()).encode(['a red circle']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert imported.stdout.split() == ["[]"], imported.stderr[-2000:]


def test_a_minilm_folder_with_a_weight_it_has_no_place_for_is_refused(tmp_path):
    """Weights load strictly: an unknown tensor (another architecture's) is named, not dropped."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "minilm"
    shutil.copytree(minilm_path(), folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({**weights, "encoder.layer.0.attention.self.rotary.weight": torch.zeros(2)},
              str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="no place for: .*rotary"):
        build_text_encoder(TextEncoderConfig(kind="minilm", path=str(folder)))
    del weights["encoder.layer.5.output.dense.bias"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(RuntimeError, match="Missing key.*layers.layers.5.linear2.bias"):
        build_text_encoder(TextEncoderConfig(kind="minilm", path=str(folder)))


def test_hf_bert_folder(tmp_path, minilm_tokenizer):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path)
    minilm_tokenizer.save_pretrained(tmp_path)
    enc = build_text_encoder(TextEncoderConfig(kind="hf", path=str(tmp_path), max_length=12))
    emb = enc.encode(CAPTIONS + [""])
    assert emb.tokens.shape == (3, 12, 32) and emb.pooled.shape == (3, 32)
    assert not torch.allclose(emb.pooled[0], emb.pooled[1])
    assert torch.count_nonzero(emb.pooled[2]) == 0


@pytest.mark.parametrize("kind", ["t5", "hf"])
def test_t5_encoder_folder(tmp_path, minilm_tokenizer, kind):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=minilm_tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path)  # a full T5: only its encoder is loaded
    minilm_tokenizer.save_pretrained(tmp_path)
    enc = build_text_encoder(TextEncoderConfig(kind=kind, path=str(tmp_path), max_length=10))
    assert type(enc.backbone).__name__ == "T5EncoderModel"
    emb = enc.encode(CAPTIONS)
    assert emb.tokens.shape == (2, 10, 32) and emb.pooled.shape == (2, 32)


def test_an_hf_folder_whose_tokenizer_fills_max_length_with_special_tokens_is_refused(tmp_path, minilm_tokenizer):
    """An `hf` folder's own tokenizer decides what max_length must leave for the caption: a
    BERT tokenizer's [CLS] [SEP] at max_length 2 (validation allows 2 for an hf folder, which a
    T5 tokenizer with its one </s> fills well) left no caption token, and every caption encoded
    the same; at 1 the tokenizer raised in every rank at the first batch."""
    from transformers import BertConfig, BertModel

    from trainer.config_errors import ConfigError

    config = BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path)
    minilm_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="adds 2 special tokens; use at least 3") as refused:
        build_text_encoder(TextEncoderConfig(kind="hf", path=str(tmp_path), max_length=2))
    assert refused.value.key == "model.text.max_length"
    tokens = build_text_encoder(TextEncoderConfig(kind="hf", path=str(tmp_path), max_length=3)).encode(
        ["red circle", "blue square"]).tokens  # (2, 3, 32): [CLS] red|blue [SEP]
    assert not torch.equal(tokens[0], tokens[1])


def test_hf_needs_a_path():
    with pytest.raises(ValueError, match="model.text.path"):
        build_text_encoder(TextEncoderConfig(kind="hf"))


def test_open_clip_random_tower_then_weights_from_a_file(tmp_path):
    cfg = TextEncoderConfig(kind="open_clip", arch="ViT-S-32-alt", max_length=20)
    torch.manual_seed(0)
    source = build_text_encoder(cfg)
    emb = source.encode(CAPTIONS + [""])
    assert emb.tokens.shape == (3, 20, source.dim) and emb.pooled.shape == (3, source.pooled_dim)
    assert emb.mask[0].sum() == len(source.tokenizer.encode(CAPTIONS[0])) + 2  # + start and end tokens
    assert not torch.allclose(emb.pooled[0], emb.pooled[1])
    bang = source.encode(["wow!( a cat"])  # "!(": '!' is token 0, CLIP's pad id too
    ids = source.tokenizer(["wow!( a cat"], context_length=20)[0]
    assert 0 in ids[1: int(ids.argmax())].tolist()  # a real token 0 before the end of text
    assert bang.mask[0].sum() == int(ids.argmax()) + 1 and bang.tokens[0, : int(ids.argmax()) + 1].abs().amax(-1).gt(0).all()
    weights = tmp_path / "clip.safetensors"
    save_file({f"text.{k}": v.contiguous() for k, v in source.backbone.state_dict().items()}, str(weights))
    torch.manual_seed(1)
    loaded = build_text_encoder(TextEncoderConfig(kind="open_clip", arch="ViT-S-32-alt", max_length=20, path=str(weights)))
    again = loaded.encode(CAPTIONS + [""])  # the same batch: a batch of another size may round otherwise
    assert torch.equal(again.pooled, emb.pooled) and torch.equal(again.tokens, emb.tokens)


@pytest.mark.parametrize("cfg", [TextEncoderConfig(kind="minilm", max_length=8),
                                 TextEncoderConfig(kind="open_clip", arch="ViT-S-32-alt", max_length=8)],
                         ids=["minilm", "open_clip"])
def test_captions_cut_at_max_length_are_counted_and_warned_once(cfg, caplog):
    """A caption of more tokens than model.text.max_length loses its end: silently until the
    encoders counted it. A cached caption counts when it is encoded, not at every batch."""
    from trainer.models.text import CachedTextEncoder

    enc = CachedTextEncoder(build_text_encoder(cfg), chunk=4)
    long = " and ".join(CAPTIONS)  # 19 tokens with start and end
    enc.encode([long, "a red circle", ""])
    enc.encode([long, long + " again", "a blue square"])
    assert enc.truncated_captions == 2
    warnings = [r.getMessage() for r in caplog.records if "model.text.max_length" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("model.text.max_length=8: a caption of ")


def test_open_clip_unknown_arch():
    with pytest.raises(ValueError, match="model.text.arch"):
        build_text_encoder(TextEncoderConfig(kind="open_clip", arch="NoSuchNet"))


def test_cache_encodes_new_captions_together_and_independently_of_their_company(minilm):
    """New captions go through the encoder in fixed-size chunks; a caption's embedding is the
    same bit for bit whatever shared its chunk and whatever the cache held (exact resume)."""
    from trainer.models.text import CachedTextEncoder

    captions = [f"a small red circle number {i}" for i in range(21)]
    calls = []
    encode = minilm.encode
    minilm.encode = lambda batch: calls.append(len(batch)) or encode(batch)
    try:
        together = CachedTextEncoder(minilm, chunk=8).encode(captions)
        assert calls == [8, 8, 8]  # 21 new captions: three forwards, each of exactly `chunk` rows
        alone = CachedTextEncoder(minilm, chunk=8).encode([captions[13], captions[0]])
    finally:
        del minilm.encode
    assert torch.equal(together.tokens[13], alone.tokens[0]) and torch.equal(together.tokens[0], alone.tokens[1])
    assert torch.equal(together.pooled[13], alone.pooled[0]) and torch.equal(together.mask[13], alone.mask[0])
    cached = CachedTextEncoder(minilm, chunk=8)
    cached.encode(captions[:5])
    again = cached.encode([captions[2], captions[20]])  # one hit, one new
    assert torch.equal(again.tokens[0], together.tokens[2]) and torch.equal(again.tokens[1], together.tokens[20])
    row_bytes = sum(t.numel() * t.element_size() for t in (together.tokens[0], together.mask[0], together.pooled[0]))
    small = CachedTextEncoder(minilm, chunk=8, max_bytes=3 * row_bytes)  # the cache is bounded in bytes too
    small.encode(captions[:5])
    assert list(small.cache) == captions[2:5]


def clip_text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=32, eos_token_id=tokenizer.sep_token_id)


def save_clip_text(path, tokenizer):
    from transformers import CLIPTextModel

    CLIPTextModel(clip_text_config(tokenizer)).save_pretrained(path)


def save_clip(path, tokenizer):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    CLIPModel(CLIPConfig(text_config=clip_text_config(tokenizer).to_dict(), vision_config=vision.to_dict(),
                         projection_dim=16)).save_pretrained(path)


def save_t5_encoder(path, tokenizer):
    from transformers import T5Config, T5EncoderModel

    T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                            num_heads=2)).save_pretrained(path)


@pytest.mark.parametrize("save", [save_clip_text, save_clip, save_t5_encoder],
                         ids=["CLIPTextModel", "CLIPModel", "T5EncoderModel"])
def test_real_encoder_folders_train_a_step(tmp_path, minilm_tokenizer, save):
    """Structurally complete (random-weight) transformers folders written by save_pretrained,
    as users point model.text.path at them: a pretraining step runs and its gradient is finite."""
    from tests.eval.eval_helpers import tiny_config
    from trainer.stages import build_stage

    folder = tmp_path / "encoder"
    save(folder, minilm_tokenizer)
    minilm_tokenizer.save_pretrained(folder)
    stage = build_stage(tiny_config(tmp_path, "model.text.kind=hf", f"model.text.path={folder}"))
    assert stage.text.dim == 32
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, "caption": CAPTIONS, "valid": torch.ones(2, dtype=torch.bool)}
    (player, loss, _), = list(stage.losses(batch, g))
    loss.backward()
    grads = [p.grad for p in stage.players["student"].parameters() if p.grad is not None]
    assert player == "student" and torch.isfinite(loss) and grads and all(torch.isfinite(v).all() for v in grads)
