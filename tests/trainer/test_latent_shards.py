"""Training on precomputed shards (latents + text embeddings written by `dit data precompute`
with the run's own encoders) gives the loss that encoding on the fly gives for the same
samples, and never calls the encoders."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline.precompute import precompute
from data_pipeline.stream import batch_to_device, build_stream
from tests.eval.eval_helpers import tiny_config
from trainer.stages import build_stage
from trainer.stages.pretrain import precompute_encoder

ROOT = Path(__file__).resolve().parents[2]


def first_batches(cfg, n: int) -> list[dict]:
    stream = iter(build_stream(cfg.data, 0, 1))
    return [batch_to_device(next(stream), torch.device("cpu")) for _ in range(n)]


def stage_losses(stage, batches: list[dict]) -> list[float]:
    g = torch.Generator().manual_seed(0)
    return [float(loss.detach()) for b in batches for _, loss, _ in stage.losses(b, g)]


def test_latent_shards_train_like_pixels_without_the_encoders(shapes_shards, tmp_path):
    overrides = [f"data.shards={shapes_shards}", "stage.cfg_dropout=0.5"]
    pixel_cfg = tiny_config(tmp_path, *overrides)
    config_file = tmp_path / "run.yaml"
    config_file.write_text((ROOT / "configs" / "test_tiny.yaml").read_text())
    latents = tmp_path / "latents"
    precompute(str(shapes_shards), str(latents), precompute_encoder(str(config_file), overrides), pixel_cfg.data,
               batch_size=8, progress=False)
    latent_cfg = tiny_config(tmp_path, *overrides[1:], f"data.shards={latents}")

    torch.manual_seed(0)
    stage = build_stage(pixel_cfg)
    pixel_batches, latent_batches = first_batches(pixel_cfg, 3), first_batches(latent_cfg, 3)
    assert [b["__key__"] for b in pixel_batches] == [b["__key__"] for b in latent_batches]
    assert "latent" in latent_batches[0] and "text_pooled" in latent_batches[0] and "image" not in latent_batches[0]
    expected = stage_losses(stage, pixel_batches)

    def never(*args, **kwargs):
        raise AssertionError("an encoder was called on precomputed shards")

    stage.text.encoder.encode = never
    stage.autoencoder.encode = never
    got = stage_losses(stage, latent_batches)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_precompute_encodes_each_distinct_caption_once_with_the_embedding_it_gets_alone(tmp_path, monkeypatch):
    from trainer.models.text import BertTextEncoder

    config_file = tmp_path / "run.yaml"
    config_file.write_text((ROOT / "configs" / "test_tiny.yaml").read_text())
    encode = precompute_encoder(str(config_file), [f"run.out_dir={tmp_path}"])
    seen: list[str] = []
    real_encode = BertTextEncoder._encode

    def counting(self, captions):
        seen.extend(c for c in captions if c)
        return real_encode(self, captions)

    monkeypatch.setattr(BertTextEncoder, "_encode", counting)
    captions = ["a red circle", "a blue square", "a red circle", "a green triangle", "a blue square"]
    image = torch.zeros(len(captions), 3, 32, 32)
    first = encode({"image": image, "caption": captions})
    second = encode({"image": image[:2], "caption": ["a green triangle", "a red circle"]})
    assert sorted(seen) == ["a blue square", "a green triangle", "a red circle"]
    assert torch.equal(first["text_emb"][0], first["text_emb"][2])
    assert torch.equal(second["text_emb"][1], first["text_emb"][0])
    alone = precompute_encoder(str(config_file), [f"run.out_dir={tmp_path}"])({"image": image[:1], "caption": ["a red circle"]})
    assert torch.equal(alone["text_emb"][0], first["text_emb"][0])
    assert torch.equal(alone["text_pooled"][0], first["text_pooled"][0])


def test_latents_made_by_other_encoders_are_refused_before_training(shapes_shards, tmp_path):
    """A retrained autoencoder, or other text settings, than those recorded in the latents'
    manifest (`extra.encoded_by`): refused by the preflight naming the key (the run would train
    on latents its decoder does not read and sample garbage without an error). The encoders
    that made them pass, and so does a manifest from before the record."""
    from data_pipeline.manifest import load_manifest
    from tests.eval.eval_helpers import write_autoencoder
    from trainer.config import ConfigError
    from trainer.stages import preflight

    ae = write_autoencoder(tmp_path / "ae", seed=0)
    overrides = [f"data.shards={shapes_shards}", "model.autoencoder.kind=kl", f"model.autoencoder.path={ae}",
                 "model.in_channels=4"]
    config_file = tmp_path / "run.yaml"
    config_file.write_text((ROOT / "configs" / "test_tiny.yaml").read_text())
    latents, encoder = tmp_path / "latents", precompute_encoder(str(config_file), overrides)
    precompute(str(shapes_shards), str(latents), encoder, tiny_config(tmp_path, *overrides).data, batch_size=8,
               progress=False, encoded_by=encoder.encoded_by)
    run = [*overrides[1:], f"data.shards={latents}"]

    preflight(tiny_config(tmp_path, *run))
    retrained = write_autoencoder(tmp_path / "ae2", seed=1)
    with pytest.raises(ConfigError, match=r"'model\.autoencoder\.path': .*another autoencoder.*diffusion_pytorch_model"):
        preflight(tiny_config(tmp_path, *run, f"model.autoencoder.path={retrained}"))
    with pytest.raises(ConfigError, match="another autoencoder"):  # a pattern of its shards: the same record
        preflight(tiny_config(tmp_path, *run, f"data.shards={latents}/*.tar", f"model.autoencoder.path={retrained}"))
    with pytest.raises(ConfigError, match=r"'model\.text\.max_length': .*max_length=16, this run has 24"):
        preflight(tiny_config(tmp_path, *run, "model.text.max_length=24"))
    preflight(tiny_config(tmp_path, *run, "model.text.null=learned"))  # the DiT's own, not the embeddings'
    # other pixel settings: the loader's refusal, made before any rank starts
    with pytest.raises(ConfigError, match=r"'data\.random_crop': .*precomputed with random_crop="):
        preflight(tiny_config(tmp_path, *run, f"data.random_crop={not tiny_config(tmp_path).data.random_crop}"))

    old = load_manifest(str(latents))
    del old.extra["encoded_by"]
    old.write()
    preflight(tiny_config(tmp_path, *run, f"model.autoencoder.path={retrained}"))


def test_a_text_encoder_folder_is_identified_by_its_files(tmp_path, monkeypatch):
    """A text encoder at model.text.path is identified by the sha256 of its files (another
    folder's config differs), its large weight files by their size and both ends (hashing a
    T5-XXL's would take a minute at every start): weights of the same size differ there."""
    from trainer import encoder_record
    from trainer.config import ModelConfig, TextEncoderConfig

    folders = {}
    for name, d_model in (("a", 512), ("b", 768)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "config.json").write_text(f'{{"d_model": {d_model}}}')
        (folders[name] / "model.safetensors").write_bytes(bytes([d_model % 251]) * 4096)
    identity = {name: encoder_record.encoder_identity(ModelConfig(text=TextEncoderConfig(kind="t5", path=str(folder))))
                for name, folder in folders.items()}
    assert identity["a"]["text_files"].keys() == {"config.json", "model.safetensors"}
    assert identity["a"]["text_files"]["config.json"] != identity["b"]["text_files"]["config.json"]
    monkeypatch.setattr(encoder_record, "HASHED_BYTES", 1024)
    monkeypatch.setattr(encoder_record, "SAMPLED_BYTES", 512)
    weights = folders["b"] / "model.safetensors"
    weights.write_bytes(folders["a"].joinpath("model.safetensors").read_bytes())
    big = {name: encoder_record.encoder_identity(ModelConfig(text=TextEncoderConfig(kind="t5", path=str(folder))))
           ["text_files"]["model.safetensors"] for name, folder in folders.items()}
    assert big["a"] == big["b"] and big["a"].startswith("4096 bytes, ends ")
    for at in (0, 4095):  # another fine-tune of the same size: its first or last bytes differ
        changed = bytearray(weights.read_bytes())
        changed[at] ^= 1
        weights.write_bytes(changed)
        assert encoder_record.encoder_identity(ModelConfig(text=TextEncoderConfig(kind="t5", path=str(folders["b"]))))[
            "text_files"]["model.safetensors"] != big["a"]
        changed[at] ^= 1
        weights.write_bytes(changed)
    hub = encoder_record.encoder_identity(ModelConfig(text=TextEncoderConfig(kind="t5", path="google/t5-v1_1-xxl")))
    assert hub["text_files"] == {"google/t5-v1_1-xxl": "not a local path"}


def test_latents_of_several_shapes_are_refused_before_any_rank_starts(tmp_path):
    """The loader's refusal of latents no batch can hold together (`latent_shapes_mismatch`),
    made by the preflight with the key, as `dit train` and `dit launch` run it."""
    from data_pipeline.config import DataConfig
    from data_pipeline.precompute import toy_encoder
    from data_pipeline.synth import synth_sample
    from tests.data.data_helpers import write_manifest, write_tar
    from trainer.config import ConfigError
    from trainer.stages.checks import check_latent_sources

    src = tmp_path / "joint"
    src.mkdir()
    write_tar(src / "shard-000000.tar", [synth_sample(i, 0, 16, video=i % 2 == 0, num_frames=4) for i in range(8)])
    write_manifest(src)
    data = DataConfig(kind="video", resolution=16, num_frames=4, num_workers=0)
    latents = precompute(str(src), str(tmp_path / "lat"), toy_encoder(), data, batch_size=4, progress=False).root
    video = ["data.kind=video", "model.video=true", "data.num_frames=4", f"data.shards={latents}"]
    with pytest.raises(ConfigError, match=r"'data\.shards': the precomputed latents come in 2 shapes"):
        check_latent_sources(tiny_config(tmp_path, *video, "data.batch_size=2"))
    check_latent_sources(tiny_config(tmp_path, *video, "data.batch_size=1"))


def test_a_superres_run_on_latent_shards_is_refused_before_any_rank_starts(tmp_path):
    """Latents keep no low-resolution image: a superres run on them (data.sr_resolution > 0, the
    pixel settings those latents were made with) passed every check and stopped at its first
    step, a KeyError. The preflight refuses it naming the key, and so does each rank's loader
    (for remote sources, which the preflight does not read)."""
    from data_pipeline.config import DataConfig
    from data_pipeline.errors import DataError
    from data_pipeline.precompute import toy_encoder
    from tests.data.data_helpers import make_shards
    from trainer.config import ConfigError
    from trainer.stages.checks import check_latent_sources

    pixels = make_shards(tmp_path / "pixels", sizes=(8,), size=32)
    pairs = DataConfig(resolution=16, sr_resolution=32, num_workers=0)
    latents = precompute(str(pixels), str(tmp_path / "lat"), toy_encoder(), pairs, batch_size=4, progress=False).root
    superres = ["stage.kind=superres", "model.superres=true", "data.sr_resolution=32"]
    cfg = tiny_config(tmp_path, f"data.shards={latents}", *superres)
    refused = r"holds precomputed latents, which keep no low-resolution image .* come from pixel shards"
    with pytest.raises(ConfigError, match=r"'data\.shards': .*" + refused):
        check_latent_sources(cfg)
    with pytest.raises(DataError, match=r"data\.shards: .*" + refused):
        build_stream(cfg.data, 0, 1)
    check_latent_sources(tiny_config(tmp_path, f"data.shards={pixels}", *superres))  # pixel pairs pass
