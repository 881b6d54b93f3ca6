"""Shapes refused before launch that would otherwise stop a run at its first batch of a bucket:
bucket sides the DiT cannot patchify, clip lengths off the temporal patch, token counts that do
not split over the sequence-parallel ranks, text lengths beyond the encoder's positions."""
from __future__ import annotations

from dataclasses import replace

import pytest

from data_pipeline.transforms import TransformSpec
from trainer.bundle import InferenceBundle
from trainer.config import ConfigError, load_config

TINY = "configs/test_tiny.yaml"
# A fresh 4-level AutoencoderKL downsamples by 8, as the SD VAE: with patch 2, sides of 16 px.
SD_LIKE = ["model.autoencoder.kind=kl", "model.autoencoder.block_out_channels=[8,8,8,8]", "model.in_channels=4"]
VIDEO = ["data.kind=video", "model.video=true"]


@pytest.mark.parametrize("resolution,ratios", [(64, [1.0, 1.5]), (256, [0.5, 2.0])])
def test_latent_buckets_are_rounded_to_the_models_multiple(resolution, ratios):
    cfg = load_config(TINY, [*SD_LIKE, f"data.resolution={resolution}", f"data.aspect_buckets={ratios}"])
    sizes = TransformSpec.from_config(cfg.data).sizes
    assert cfg.data.bucket_multiple == 16
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in sizes), sizes
    assert len(set(sizes)) == len(ratios)


def test_the_bundle_patchifies_every_bucket_and_refuses_an_explicit_smaller_multiple():
    cfg = load_config(TINY, [*SD_LIKE, "data.resolution=64", "data.aspect_buckets=[1.0,1.5]"])
    bundle = InferenceBundle(cfg.model, cfg.diffusion, cfg.data)
    assert {bundle.sample_shape(h, w) for h, w in TransformSpec.from_config(cfg.data).sizes} == \
        {(4, 8, 8), (4, 6, 10)}
    # a config validated before its autoencoder folder existed reaches the bundle unchecked
    with pytest.raises(ValueError, match="data.bucket_multiple"):
        InferenceBundle(cfg.model, cfg.diffusion, replace(cfg.data, bucket_multiple=8))


def test_pixel_buckets_keep_multiples_of_eight():
    cfg = load_config(TINY, ["data.resolution=40", "data.aspect_buckets=[1.5]"])
    assert cfg.data.bucket_multiple == 8 and TransformSpec.from_config(cfg.data).sizes == ((32, 48),)


@pytest.mark.parametrize("overrides,key", [
    ([*SD_LIKE, "data.resolution=72"], "data.resolution"),
    ([*SD_LIKE, "data.resolution=64", "data.resolutions=[64,72]"], "data.resolutions"),
    ([*SD_LIKE, "data.resolution=64", "data.bucket_multiple=8"], "data.bucket_multiple"),
    ([*VIDEO, "model.temporal_patch=2", "data.num_frames=8", "data.frame_buckets=[5]"], "data.frame_buckets"),
    ([*VIDEO, "model.temporal_patch=2", "data.num_frames=7"], "data.num_frames"),
    ([*SD_LIKE, "data.resolution=48", "deepspeed.sequence_parallel_size=2"], "deepspeed.sequence_parallel_size"),
    ([*SD_LIKE, "data.resolution=64", "data.aspect_buckets=[1.0,1.5]", "deepspeed.sequence_parallel_size=4"],
     "deepspeed.sequence_parallel_size"),  # 8x8 splits in 4, the 6x10 bucket does not
])
def test_shapes_the_model_cannot_take_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, overrides)


def test_token_split_passes_where_every_bucket_divides():
    cfg = load_config(TINY, [*SD_LIKE, "data.resolution=64", "deepspeed.sequence_parallel_size=2"])
    assert cfg.deepspeed.sequence_parallel_size == 2


def test_text_length_beyond_the_encoders_positions_is_refused_before_encoding():
    from trainer.models.text import build_text_encoder

    cfg = load_config(TINY, ["model.text.max_length=600"])
    with pytest.raises(ConfigError, match=r"model\.text\.max_length"):
        build_text_encoder(cfg.model.text)
    assert build_text_encoder(replace(cfg.model.text, max_length=512)).max_length == 512


def test_an_autoencoder_folder_gives_its_own_downsampling(tmp_path):
    """The folder's 4 levels count, not the default block_out_channels (2 levels) of the config."""
    from trainer.models.autoencoder import build_autoencoder

    build_autoencoder(load_config(TINY, SD_LIKE).model.autoencoder).save(tmp_path / "ae")
    cfg = load_config(TINY, ["model.autoencoder.kind=kl", f"model.autoencoder.path={tmp_path / 'ae'}",
                             "model.in_channels=4", "data.resolution=64", "data.aspect_buckets=[1.5]"])
    assert cfg.data.bucket_multiple == 16 and TransformSpec.from_config(cfg.data).sizes == ((48, 80),)


def test_sizes_of_a_fresh_autoencoder_that_a_saved_folder_contradicts_are_refused(tmp_path):
    """A saved folder is built from its config.json: a latent DiT told latent_channels=16 (or
    block_out_channels the folder does not have) read the folder's 4 channels (2 levels) without
    a word; the folder's own values, or the defaults, pass."""
    from trainer.models.autoencoder import build_autoencoder
    from trainer.stages import preflight

    build_autoencoder(load_config(TINY, SD_LIKE).model.autoencoder).save(tmp_path / "ae")
    latent = ["model.autoencoder.kind=kl", f"model.autoencoder.path={tmp_path / 'ae'}", "data.resolution=64"]
    preflight(load_config(TINY, [*latent, "model.in_channels=4", "model.autoencoder.block_out_channels=[8,8,8,8]"]))
    for wrong, key in (("latent_channels=16", "latent_channels"), ("block_out_channels=[8,16]", "block_out_channels"),
                       ("mid_attention=false", "mid_attention")):
        with pytest.raises(ConfigError) as err:
            preflight(load_config(TINY, [*latent, "model.in_channels=4", f"model.autoencoder.{wrong}"]))
        assert err.value.key == f"model.autoencoder.{key}"


def test_an_autoencoder_folder_of_another_model_class_is_refused_naming_the_key(tmp_path):
    """A diffusers folder of a class that is no autoencoder (a UNet's config.json): one line naming
    model.autoencoder.path (a ValueError traceback before, from `dit train` and `dit plan`)."""
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ConfigError, match=r"'model\.autoencoder\.path'.*UNet2DModel"):
        load_config(TINY, ["model.autoencoder.kind=kl", f"model.autoencoder.path={tmp_path / 'unet'}",
                           "model.in_channels=4"])
