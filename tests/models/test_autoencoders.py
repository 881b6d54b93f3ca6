"""Autoencoders: shapes, frame-by-frame video, latent statistics, save/load without pickle."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from trainer.config import AutoencoderConfig
from trainer.models.autoencoder import Autoencoder, PixelSpace, build_autoencoder

TINY = AutoencoderConfig(kind="kl", block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, sample_size=16)


@pytest.fixture()
def ae() -> Autoencoder:
    torch.manual_seed(0)
    return build_autoencoder(TINY).eval()


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n)) * 2 - 1


def test_encode_decode_shapes_round_trip(ae):
    assert (ae.downsample_factor, ae.latent_channels, ae.temporal_downsample) == (2, 4, 1)
    x = images()
    z = ae.encode(x)
    assert z.shape == (2, 4, 8, 8)
    assert ae.decode(z).shape == x.shape


@torch.no_grad()
def test_a_vae_that_overflows_fp16_runs_in_fp32_in_fp16_runs(ae):
    """diffusers' `force_upcast` (SD's and SDXL's VAEs overflow float16): placed as the frozen
    helper of an fp16 run, the VAE keeps float32 weights and runs with the fp16 autocast off,
    so latents and pixels are the fp32 ones, also where fp16 activations overflow (an input
    convolution scaled to reach ~1e6). A VAE without the flag (SDXL's fp16-fix) goes to fp16."""
    from trainer.bundle import frozen, place

    ae.vae.encoder.conv_in.weight.mul_(1e5)
    x = images()
    z, pixels = ae.encode(x), ae.decode(ae.encode(x))
    assert z.isfinite().all()
    place(frozen(ae), torch.device("cpu"), torch.float16)
    assert {p.dtype for p in ae.parameters()} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(ae.encode(x), z) and torch.equal(ae.decode(z), pixels)
    ae.vae.register_to_config(force_upcast=False)
    place(ae, torch.device("cpu"), torch.float16)
    assert {p.dtype for p in ae.parameters()} == {torch.float16}
    with torch.autocast("cpu", dtype=torch.float16):
        assert not ae.encode(x).isfinite().all()  # what an upcast VAE would give without the upcast


def test_video_is_encoded_frame_by_frame(ae):
    video = torch.stack([images(1)[0], images(2)[0], images(3)[0]], dim=1)[None]  # (1, 3, F=3, 16, 16)
    z = ae.encode(video)
    assert z.shape == (1, 4, 3, 8, 8)
    for f in range(3):
        assert torch.allclose(z[:, :, f], ae.encode(video[:, :, f]), atol=1e-5)
    assert ae.decode(z).shape == video.shape


def test_fit_scale_normalizes_latents(ae):
    scale, shift = ae.fit_scale([images(2), images(3)])
    raw = torch.cat([ae.encode_raw(images(2)), ae.encode_raw(images(3))])
    assert scale == pytest.approx(1 / raw.double().std(unbiased=False).item(), rel=1e-4)
    assert shift == pytest.approx(raw.double().mean().item(), abs=1e-5)
    z = torch.cat([ae.encode(images(2)), ae.encode(images(3))])
    assert z.mean().abs() < 1e-4 and (z.std(unbiased=False) - 1).abs() < 1e-3
    assert torch.allclose(ae.decode(ae.encode(images(2))), ae.vae.decode(ae.encode_raw(images(2))).sample, atol=1e-5)


def test_save_load_round_trip_without_pickle(ae, tmp_path):
    ae.fit_scale(images(4))
    ae.save(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"config.json", "diffusion_pytorch_model.safetensors", "latent_norm.json"}
    norm = json.loads((tmp_path / "latent_norm.json").read_text())
    assert norm["scale"] == pytest.approx(float(ae.scale)) and norm["shift"] == pytest.approx(float(ae.shift))
    loaded = build_autoencoder(AutoencoderConfig(kind="kl", path=str(tmp_path)))
    assert float(loaded.scale) == pytest.approx(float(ae.scale)) and float(loaded.shift) == pytest.approx(float(ae.shift))
    assert loaded.vae.config.scaling_factor == pytest.approx(float(ae.scale))
    x = images()
    assert torch.allclose(loaded.encode(x), ae.encode(x), atol=1e-6)


def test_an_autoencoder_without_mid_attention_saves_and_loads_as_built(tmp_path):
    torch.manual_seed(0)
    ae = build_autoencoder(dataclasses.replace(TINY, mid_attention=False)).eval()
    assert ae.vae.encoder.mid_block.attentions[0] is None and ae.vae.decoder.mid_block.attentions[0] is None
    ae.save(tmp_path)
    loaded = Autoencoder.load(tmp_path)
    assert loaded.vae.decoder.mid_block.attentions[0] is None
    x = images()
    assert torch.equal(loaded.decode(loaded.encode(x)), ae.decode(ae.encode(x)))
    with pytest.raises(ValueError, match="model.autoencoder.mid_attention"):
        build_autoencoder(dataclasses.replace(TINY, mid_attention=False), causal_3d=True)


def test_plain_diffusers_folder_uses_its_scaling_factor(ae, tmp_path):
    ae.vae.register_to_config(scaling_factor=0.18215, shift_factor=None)
    ae.vae.save_pretrained(tmp_path)
    loaded = Autoencoder.load(tmp_path)
    assert float(loaded.scale) == pytest.approx(0.18215) and float(loaded.shift) == 0.0


def test_the_autoencoder_stage_refuses_to_write_over_a_folder_it_did_not_write(ae, tmp_path):
    """It trains a new autoencoder from scratch: pointed at a downloaded diffusers VAE (no
    latent_norm.json) it replaced those weights at its first save, without a word. Its own
    folder (a resume) and a new one are accepted."""
    from tests.eval.eval_helpers import tiny_config
    from trainer.config import ConfigError
    from trainer.stages import preflight

    ae.vae.save_pretrained(tmp_path / "downloaded")
    ae.save(tmp_path / "ours")
    stage = ("stage.kind=autoencoder", "model.autoencoder.kind=kl")
    with pytest.raises(ConfigError, match=r"'model\.autoencoder\.path': .* holds an autoencoder this stage did not "
                                          r"write \(no latent_norm\.json\)"):
        preflight(tiny_config(tmp_path, *stage, f"model.autoencoder.path={tmp_path / 'downloaded'}"))
    for folder in ("ours", "new"):
        preflight(tiny_config(tmp_path, *stage, f"model.autoencoder.path={tmp_path / folder}"))


def test_the_autoencoder_stage_needs_a_kl_autoencoder_and_a_folder_of_its_own(tmp_path):
    """Accepted before, it trained a KL autoencoder with model.autoencoder.kind=none, saved it
    into the working directory without model.autoencoder.path, and, as each save now replaces
    the folder whole, would delete what else lives there (the run's checkpoints, say)."""
    from tests.eval.eval_helpers import tiny_config
    from trainer.config import ConfigError
    from trainer.stages import preflight

    kl = ("stage.kind=autoencoder", "model.autoencoder.kind=kl")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    for overrides, key in [(("stage.kind=autoencoder", f"model.autoencoder.path={tmp_path / 'new'}"),
                            "model.autoencoder.kind"),
                           (kl, "model.autoencoder.path"),
                           ((*kl, f"model.autoencoder.path={tmp_path / 'full'}"), "model.autoencoder.path"),
                           ((*kl, f"model.autoencoder.path={tmp_path}"), "model.autoencoder.path")]:  # the run's folder
        with pytest.raises(ConfigError) as err:
            preflight(tiny_config(tmp_path, *overrides))
        assert err.value.key == key, overrides
    preflight(tiny_config(tmp_path, *kl, f"model.autoencoder.path={tmp_path / 'new'}"))


def test_a_save_killed_midway_leaves_the_previous_autoencoder_whole(ae, tmp_path, monkeypatch):
    """The folder is written beside and renamed over: rewritten in place, a kill between the
    weights and latent_norm.json left the new weights beside the old latent scale."""
    import pathlib

    from trainer.config import NORM_FILE

    target = tmp_path / "ae"
    ae.fit_scale(images())
    ae.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    write_text = pathlib.Path.write_text

    def killed(self, *args, **kwargs):
        if self.name == NORM_FILE:
            raise KeyboardInterrupt("killed")
        return write_text(self, *args, **kwargs)

    with torch.no_grad():
        for p in ae.vae.parameters():
            p.add_(1.0)
    ae.scale.fill_(7.0)
    monkeypatch.setattr(pathlib.Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        ae.save(target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    ae.save(target)  # the next save replaces the leftover and the folder
    assert Autoencoder.load(target).scale.item() == pytest.approx(7.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]


def test_load_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.autoencoder.path"):
        Autoencoder.load(tmp_path)


def test_causal_3d_autoencoder_compresses_time(tmp_path):
    torch.manual_seed(0)
    ae = build_autoencoder(TINY, causal_3d=True).eval()
    assert (ae.causal_3d, ae.downsample_factor, ae.temporal_downsample) == (True, 2, 2)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = ae.encode(video)
    assert z.shape == (1, 4, 3, 8, 8)  # 1 + (5 - 1) / 2 latent frames
    assert ae.decode(z).shape == video.shape
    assert ae.encode(images(1)).shape == (1, 4, 8, 8)  # an image is a 1-frame clip
    ae.fit_scale(video)
    ae.save(tmp_path)
    loaded = Autoencoder.load(tmp_path)
    assert loaded.causal_3d and torch.allclose(loaded.encode(video), ae.encode(video), atol=1e-5)


def test_pixel_space_is_the_identity():
    ae = build_autoencoder(AutoencoderConfig(kind="none"))
    assert isinstance(ae, PixelSpace) and ae.downsample_factor == 1
    x = images()
    assert ae.encode(x) is x and ae.decode(x) is x


def test_an_ltx_video_folder_normalizes_latents_by_its_buffers_as_diffusers_does(tmp_path):
    """LTX-Video keeps its per-channel latents_mean / latents_std as buffers saved with its
    weights, not in its config (diffusers' pipeline: (latent - mean) * scaling_factor / std):
    loaded from its folder, the autoencoder applies them both ways."""
    from diffusers import AutoencoderKLLTXVideo

    from trainer.models.autoencoder import Autoencoder

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                latent_channels=4, layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1))
    mean, std = torch.tensor([1.0, 2.0, -3.0, 0.5]), torch.tensor([2.0, 0.5, 4.0, 1.0])
    vae.latents_mean.copy_(mean)
    vae.latents_std.copy_(std)
    vae.save_pretrained(tmp_path)
    ae = Autoencoder.load(tmp_path).eval()
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        raw = ae.vae.encode(video).latent_dist.mode()  # (1, 4, F', h, w)
        z = ae.encode(video)
        factor = ae.vae.config.scaling_factor
        assert torch.allclose(z, (raw - mean.view(1, 4, 1, 1, 1)) * factor / std.view(1, 4, 1, 1, 1), atol=1e-5)
        assert torch.allclose(ae.decode(z), ae.vae.decode(raw).sample, atol=1e-5)


def test_an_ltx_video_folder_with_a_decode_timestep_decodes_as_its_pipeline_does(tmp_path):
    """LTX-Video 0.9.1 on conditions its decoder on a timestep (`timestep_conditioning`): every
    decode failed (a TypeError in diffusers) without one; LTXPipeline's default is 0, no noise."""
    from diffusers import AutoencoderKLLTXVideo

    from trainer.models.autoencoder import Autoencoder

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                latent_channels=4, layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1), timestep_conditioning=True)
    vae.save_pretrained(tmp_path)
    ae = Autoencoder.load(tmp_path).eval()
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        raw = ae.vae.encode(video).latent_dist.mode()  # (1, 4, F', h, w)
        assert torch.allclose(ae.decode(ae.encode(video)), ae.vae.decode(raw, temb=torch.zeros(1)).sample, atol=1e-5)


def test_a_wan_folder_normalizes_latents_per_channel_as_diffusers_does(tmp_path):
    """Wan's config carries per-channel latents_mean / latents_std (diffusers' Wan pipelines use
    (latent - mean) / std); loaded from its folder, the autoencoder hands the DiT those latents
    and decodes them back through the same statistics."""
    from trainer.config import AutoencoderConfig
    from trainer.models.autoencoder import Autoencoder, build_causal_3d

    torch.manual_seed(0)
    vae = build_causal_3d(AutoencoderConfig(kind="kl", block_out_channels=[8, 16], latent_channels=4))
    vae.register_to_config(latents_mean=[0.5, -1.0, 0.0, 2.0], latents_std=[2.0, 0.5, 1.0, 4.0])
    vae.save_pretrained(tmp_path)
    ae = Autoencoder.load(tmp_path).eval()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        raw = ae.vae.encode(video).latent_dist.mode()  # (1, 4, 3, 8, 8)
        mean, std = torch.tensor([0.5, -1.0, 0.0, 2.0]).view(1, 4, 1, 1, 1), torch.tensor([2.0, 0.5, 1.0, 4.0]).view(1, 4, 1, 1, 1)
        z = ae.encode(video)
        assert torch.allclose(z, (raw - mean) / std, atol=1e-6)
        assert torch.allclose(ae.decode(z), ae.vae.decode(raw).sample, atol=1e-5)
