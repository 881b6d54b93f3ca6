"""Precompute: shards of encoder outputs that the loader serves instead of pixels."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import webdataset as wds
from torch.utils._python_dispatch import TorchDispatchMode

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.manifest import load_manifest
from data_pipeline.precompute import load_encoder, precompute, toy_encoder
from data_pipeline.stream import batch_to_device, build_stream
from tests.data.data_helpers import dataset_keys, take, valid_keys


def test_precomputed_shards_keep_keys_and_feed_the_loader(tmp_path, shards, cfg):
    calls = []

    def encoder(batch):
        calls.append(batch["image"].shape)
        return toy_encoder(patch=4)(batch)

    m = precompute(str(shards), str(tmp_path / "lat"), encoder, DataConfig(resolution=32), batch_size=4,
                   progress=False)
    assert m.kind == "latent" and m.num_samples == 28
    assert [s.samples for s in m.shards] == [s.samples for s in load_manifest(str(shards)).shards]
    assert dataset_keys(tmp_path / "lat") == dataset_keys(shards)
    assert all(shape[1:] == (3, 32, 32) for shape in calls)
    members = next(iter(wds.WebDataset(m.paths()[:1], shardshuffle=False)))
    assert {"safetensors", "txt", "json"} <= set(members)

    seen = []
    for rank in range(2):  # the two ranks' epochs together hold each latent sample once
        stream = build_stream(cfg(shards=str(tmp_path / "lat"), num_workers=2), rank, 2)
        batches = take(stream, stream.batches_per_epoch)
        b = batches[0]
        assert "image" not in b
        assert b["latent"].shape == (4, 3, 8, 8) and b["text_emb"].shape == (4, 8, 16)
        assert b["text_mask"].dtype == torch.bool and len(b["caption"]) == 4
        seen += valid_keys(batches)
    assert sorted(seen) == sorted(dataset_keys(shards))


class PinnedMemory(TorchDispatchMode):
    """Page-locked allocations on this CPU-only build, which has no driver to lock pages with:
    made as plain memory and remembered, so that a test can tell which tensors a machine with
    CUDA would have pinned. `is_pinned` asks about the memory, as CUDA's does (any tensor over
    a pinned block is pinned); `holds` asks for the allocation's own storage: a tensor made anew
    over its memory (`torch.from_numpy`) does not carry the caching host allocator's block, and
    that allocator would not see the non-blocking copy reading it."""

    def __init__(self):
        super().__init__()
        self.pointers: set[int] = set()  # where each page-locked allocation starts
        self.storages: set[int] = set()  # and its StorageImpl

    def holds(self, t: torch.Tensor) -> bool:
        return t.untyped_storage()._cdata in self.storages

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.ops.aten.is_pinned.default:
            return args[0].untyped_storage().data_ptr() in self.pointers
        if func is torch.ops.aten._pin_memory.default:
            out = args[0].clone()
        elif kwargs.get("pin_memory"):
            out = func(*args, **{**kwargs, "pin_memory": False})
        else:
            return func(*args, **kwargs)
        self.pointers.add(out.untyped_storage().data_ptr())
        self.storages.add(out.untyped_storage()._cdata)
        return out


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_bound_for_cuda_are_page_locked_whole(tmp_path, shards, cfg, workers):
    """A non-blocking copy to the GPU from pageable memory may wait for the device's queue:
    the loader of a run on CUDA (`pin`) pins every tensor of a batch, precomputed latents and
    text embeddings as well as pixels (only the pixels were), each over its own page-locked
    allocation."""
    latents = precompute(str(shards), str(tmp_path / "lat"), toy_encoder(), DataConfig(resolution=32),
                         progress=False)
    for source in (str(shards), latents.root):
        with PinnedMemory() as pinned:
            batch = take(build_stream(cfg(shards=source, num_workers=workers), 0, 1, pin=True), 1)[0]
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        assert len(tensors) >= 2 and [k for k, v in tensors.items() if not pinned.holds(v)] == []


def test_the_latent_matches_the_encoder_output(tmp_path, shards):
    m = precompute(str(shards), str(tmp_path / "lat"), toy_encoder(), DataConfig(resolution=32), progress=False)
    pix = take(build_stream(DataConfig(shards=str(shards), resolution=32, batch_size=28, num_workers=0,
                                       shuffle_buffer=1), 0, 1), 1)[0]
    lat = take(build_stream(DataConfig(shards=m.root, resolution=32, batch_size=28, num_workers=0,
                                       shuffle_buffer=1), 0, 1), 1)[0]
    assert pix["__key__"] == lat["__key__"]
    image = batch_to_device(pix, torch.device("cpu"))["image"]
    assert torch.allclose(torch.nn.functional.avg_pool2d(image, 4), lat["latent"], atol=1e-6)


def test_encoder_loading_and_contract_errors(tmp_path, shards):
    assert callable(load_encoder("data_pipeline.precompute:toy_encoder", patch=2))
    with pytest.raises(ValueError, match="module:function"):
        load_encoder("toy_encoder")
    with pytest.raises(DataError, match="batch dimension"):
        precompute(str(shards), str(tmp_path / "x"), lambda b: {"latent": torch.zeros(1)},
                   DataConfig(resolution=32), progress=False)


def test_precomputed_clips_record_how_they_were_sampled(tmp_path):
    """Latent clips keep nothing of the data.fps / frame_stride they were cut at: the manifest
    says, beside the resolution, so a run on them can be compared with its own data settings."""
    from tests.data.data_helpers import make_shards

    videos = make_shards(tmp_path / "videos", sizes=[4], size=16, video=True, frames=8)  # at 8 fps
    cfg = DataConfig(kind="video", resolution=16, num_frames=4, fps=4)
    m = precompute(str(videos), str(tmp_path / "lat"), toy_encoder(), cfg, progress=False)
    run = dataclasses.replace(cfg, shards=m.root, batch_size=4, num_workers=0)
    latents = take(build_stream(run, 0, 1), 1)[0]
    assert latents["latent"].shape == (4, 3 * 4, 4, 4)  # whole clips of 4 frames, every other source frame
    assert {k: m.extra[k] for k in ("resolution", "num_frames", "frame_stride", "fps")} == \
        {"resolution": 16, "num_frames": 4, "frame_stride": 1, "fps": 4}
    assert load_manifest(m.root).extra["data"] == {  # as written to manifest.json
        "kind": "video", "resolution": 16, "resolutions": [16], "aspect_buckets": [1.0], "bucket_multiple": 8,
        "sr_resolution": 0, "random_crop": False, "num_frames": 4, "frame_buckets": [], "frame_stride": 1, "fps": 4.0}
    with pytest.raises(DataError, match=r"^data\.fps: .* precomputed with fps=4\.0 but this run has 0\.0"):
        build_stream(dataclasses.replace(run, fps=0), 0, 1)  # every frame: the clips were cut at 4 fps


def test_a_run_on_latents_made_with_other_pixel_settings_is_refused_naming_the_key(tmp_path, shards, cfg):
    """The latent keeps nothing of the size, crop or clip sampling of its pixels: a run whose
    data settings differ from those the shards were precomputed with trained silently on them."""
    m = precompute(str(shards), str(tmp_path / "lat"), toy_encoder(), DataConfig(resolution=16), batch_size=28,
                   progress=False)
    run = cfg(shards=m.root, resolution=16)
    assert build_stream(run, 0, 1).num_samples == 28  # the settings they were made with
    assert build_stream(dataclasses.replace(run, bucket_multiple=16), 0, 1).num_samples == 28  # 16x16 crops at 8 or 16
    for key, value in (("resolution", 32), ("kind", "video"), ("aspect_buckets", [0.5, 1.0]),
                       ("random_crop", True)):
        with pytest.raises(DataError, match=rf"^data\.{key}: the latent shards in {re.escape(m.root)} were "):
            build_stream(dataclasses.replace(run, **{key: value}), 0, 1)
    with pytest.raises(DataError, match=r"^data\.resolution: "):  # a pattern of their shards, too
        build_stream(cfg(shards=f"{m.root}/shard-00000{{0..4}}.tar", resolution=32), 0, 1)
    old = load_manifest(m.root)  # written before the record: accepted as before
    del old.extra["data"]
    old.write()
    assert build_stream(dataclasses.replace(run, resolution=32), 0, 1).num_samples == 28


def test_latents_and_pixels_in_one_run_are_refused_when_the_stream_is_built(tmp_path, cfg):
    """A batch mixing both failed when collated, which depends on the draws: in resampled mode
    without buckets, batches never mixed and the run went on; the manifests decide up front."""
    from data_pipeline.synth import synth_samples
    from data_pipeline.write import write_shards

    pixels = write_shards(synth_samples(8, seed=0, size=16), str(tmp_path / "pixels"), 4, progress=False)
    m = precompute(pixels.root, str(tmp_path / "lat"), toy_encoder(), DataConfig(resolution=16), batch_size=8,
                   progress=False)
    assert (pixels.kind, m.kind) == ("image", "latent")
    for joined in (cfg(shards=f"{m.root}::{pixels.root}", resolution=16),
                   cfg(shards=m.root, mixture={pixels.root: 1.0}, resampled=True, resolution=16)):
        with pytest.raises(DataError, match="join precomputed latents .* with pixel shards"):
            build_stream(joined, 0, 1)


def test_a_run_bucketing_at_another_multiple_is_refused_where_the_buckets_differ(tmp_path, shards, cfg):
    """Latents keep nothing of the bucket their pixels were cropped to: shards made at 8 px
    (48x24 at ratio 0.5) fed a run that buckets at 16 (48x16) silently. An older manifest
    without the record counts as made at the old default, 8."""
    pixels = DataConfig(resolution=32, aspect_buckets=[0.5, 1.0])
    m = precompute(str(shards), str(tmp_path / "lat"), toy_encoder(), pixels, batch_size=28, progress=False)
    assert m.extra["data"]["bucket_multiple"] == 8  # data.bucket_multiple=0: the default 8
    run = cfg(shards=m.root, aspect_buckets=[0.5, 1.0])
    assert build_stream(dataclasses.replace(run, bucket_multiple=8), 0, 1).num_samples == 28
    with pytest.raises(DataError, match=r"^data\.bucket_multiple: .* with bucket_multiple=8 but this run has 16"):
        build_stream(dataclasses.replace(run, bucket_multiple=16), 0, 1)
    old = load_manifest(m.root)
    del old.extra["data"]["bucket_multiple"]
    old.write()
    assert build_stream(run, 0, 1).num_samples == 28
    with pytest.raises(DataError, match=r"^data\.bucket_multiple: "):
        build_stream(dataclasses.replace(run, bucket_multiple=16), 0, 1)
    precompute(str(shards), str(tmp_path / "new"), toy_encoder(), pixels, batch_size=28, progress=False)
    both = dataclasses.replace(run, shards=f"{tmp_path}/{{lat,new}}/shard-00000{{0..4}}.tar")
    assert build_stream(both, 0, 1).num_samples == 56  # the old record and the new one say the same


def test_cli_precompute_records_the_encoders_identity(tmp_path, shards):
    """`dit data precompute --encoder trainer.stages.pretrain:precompute_encoder` records what
    the latents depend on (the autoencoder files' sha256, the text settings), as the demo does."""
    from launch.cli import main
    from tests.eval.eval_helpers import write_autoencoder
    from tests.trainer.harness import ROOT
    from trainer.checkpoint_format import sha256

    ae = write_autoencoder(tmp_path / "ae")
    overrides = f'overrides=["model.autoencoder.kind=kl","model.autoencoder.path={ae}","model.in_channels=4"]'
    assert main(["data", "precompute", str(shards), "--out", str(tmp_path / "lat"), "--encoder",
                 "trainer.stages.pretrain:precompute_encoder", "--encoder-arg",
                 f"config={ROOT / 'configs' / 'test_tiny.yaml'}", "--encoder-arg", overrides]) == 0
    encoded_by = load_manifest(str(tmp_path / "lat")).extra["encoded_by"]
    assert encoded_by["autoencoder"] == {p.name: sha256(p) for p in sorted(ae.iterdir())}
    assert set(encoded_by["autoencoder"]) == {"config.json", "diffusion_pytorch_model.safetensors", "latent_norm.json"}
    assert encoded_by["text"]["kind"]


def test_latents_of_several_shapes_are_refused_before_a_batch_would_mix_them(tmp_path):
    """Stills and clips precomputed for joint video training are latents of two shapes: the
    manifest counts them per pixel bucket, and a run on them is refused when the stream is built
    (it stopped with a DataError at the first window whose leftovers mixed them, mid-run); a
    batch of one holds one shape, and latents of one shape pass."""
    from data_pipeline.synth import synth_sample
    from tests.data.data_helpers import write_manifest, write_tar

    src = tmp_path / "joint"
    src.mkdir()
    write_tar(src / "shard-000000.tar", [synth_sample(i, 0, 16, video=i % 3 != 0, num_frames=6) for i in range(12)])
    write_manifest(src)
    cfg = DataConfig(kind="video", resolution=16, num_frames=4, num_workers=0)
    m = precompute(str(src), str(tmp_path / "lat"), toy_encoder(), cfg, batch_size=4, progress=False)
    assert load_manifest(m.root).extra["buckets"] == {"1x16x16": 4, "4x16x16": 8}
    run = dataclasses.replace(cfg, shards=m.root, batch_size=4)
    with pytest.raises(DataError, match=r"^data\.shards: the precomputed latents come in 2 shapes .*'1x16x16': 4"):
        build_stream(run, 0, 1)
    assert build_stream(dataclasses.replace(run, batch_size=1), 0, 1).num_samples == 12

    clips = tmp_path / "clips"
    clips.mkdir()
    write_tar(clips / "shard-000000.tar", [synth_sample(i, 0, 16, video=True, num_frames=6) for i in range(8)])
    write_manifest(clips)
    one = precompute(str(clips), str(tmp_path / "lat1"), toy_encoder(), cfg, batch_size=4, progress=False)
    batches = take(build_stream(dataclasses.replace(run, shards=one.root), 0, 1), 2)
    assert [tuple(b["latent"].shape) for b in batches] == [(4, 12, 4, 4)] * 2


def test_a_precomputed_video_is_its_middle_clip(tmp_path):
    """Each video gives one clip, from its middle as the crop is from its centre: the first
    clip, as before, kept only the videos' openings."""
    from data_pipeline.transforms import TransformSpec, video_pixels
    from tests.data.data_helpers import make_shards

    videos = make_shards(tmp_path / "videos", sizes=[2], size=16, video=True, frames=16)
    cfg = DataConfig(kind="video", resolution=16, num_frames=4)
    m = precompute(str(videos), str(tmp_path / "lat"), toy_encoder(), cfg, progress=False)
    latents = take(build_stream(dataclasses.replace(cfg, shards=m.root, batch_size=2, num_workers=0), 0, 1), 1)[0]
    spec = TransformSpec.from_config(cfg)
    sample = next(iter(wds.WebDataset(str(videos / "shard-000000.tar"), shardshuffle=False)))
    index = latents["__key__"].index(sample["__key__"])

    def encoded(start: float) -> torch.Tensor:
        clip = torch.from_numpy(video_pixels(sample["mp4"], spec, (0.5, 0.5, start)).frames.copy())  # (4, 16, 16, 3)
        video = clip.permute(3, 0, 1, 2).float()[None] / 127.5 - 1  # (1, 3, 4, 16, 16)
        return toy_encoder()({"video": video, "caption": [""]})["latent"][0]

    assert torch.allclose(latents["latent"][index], encoded(0.5), atol=1e-6)
    assert not torch.allclose(latents["latent"][index], encoded(0.0), atol=1e-2)
