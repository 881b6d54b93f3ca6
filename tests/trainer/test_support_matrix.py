"""The support matrix of the README ("What combines with what"), cell by cell, on 2 real ranks.

Every axis value appears in at least one cell: kind (image, video) x space (pixel, latent) x
stage (autoencoder, pretrain, superres, progressive, adversarial) x layout (ZeRO 0-3, pipeline)
x precision (fp32, bf16). A cell trains 2 steps and checkpoints, a second launch resumes it to
step 4, and then what was saved must be what was trained: the sample grid drawn from the
saved EMA equals the one the trainer drew from its in-memory EMA at step 4 (the check that
would have caught the pipeline run exporting an untrained network), and the safetensors export
holds exactly the checkpoint's EMA tensors, none left at zero. Some cells check one feature
more on the run they already make (`CHECKS`): multi-resolution buckets, the learned null caption.
The refused cells are in tests/faults/test_bad_config.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.harness import (assert_checkpoint_samples_match, assert_ok, base, ema_weights, final_weights,
                                   latest_dir, metrics, run_train, same_tensors, step_keys)

pytestmark = pytest.mark.slow

VIDEO = ("model.video=true", "data.kind=video", "data.num_frames=4")
LATENT = ("model.autoencoder.kind=kl", "model.in_channels=4")  # + model.autoencoder.path
SUPERRES = ("stage.kind=superres", "model.superres=true", "data.sr_resolution=32")
DISTILL = ("stage.rounds=[2,1]", "diffusion.loss_weighting=trunc_snr", "stage.guidance_max=1")  # + stage.teacher
PIPELINE = ("deepspeed.pipeline_stages=2", "deepspeed.zero_stage=1")
BUCKETS = ("data.resolutions=[16,32]", "data.aspect_buckets=[0.5,1.0,2.0]", "diffusion.shift_base_resolution=16",
           "log.sample_keys=true")
LEARNED_NULL = ("model.text.null=learned", "stage.cfg_dropout=0.5")
BF16 = ("deepspeed.precision=bf16",)

# id -> (shards: image | video | joint (both) | mixed (six sizes, three aspects), needs: "" | ae | teacher, overrides)
CELLS = {
    # two pixel areas x three aspects: each batch one bucket, resumed on exactly the planned samples
    "image-pixel-pretrain-zero0-fp32-buckets": ("mixed", "", ("deepspeed.zero_stage=0", *BUCKETS)),
    "image-latent-pretrain-zero1-bf16": ("image", "ae", (*LATENT, "deepspeed.zero_stage=1", *BF16)),
    # the learned null caption: trained by CFG dropout under ZeRO-3, saved, resumed, sampled with;
    # joint image-video batches (an image batch leaves the temporal attention idle on one rank),
    # blocks recomputed in the backward pass
    "joint-pixel-pretrain-zero3-fp32-null": ("joint", "", (*VIDEO, "deepspeed.zero_stage=3", *LEARNED_NULL,
                                                           "model.checkpoint_policy=full")),
    "video-latent-pretrain-zero2-bf16": ("video", "ae", (*VIDEO, *LATENT, "deepspeed.zero_stage=2", *BF16)),
    # batches of three shapes through the pipe: the stages exchange each activation's shape
    # (fp32 through the pipe: the superres and progressive pipeline cells)
    "image-pixel-pretrain-pipeline-bf16-aspects": ("mixed", "", (*PIPELINE, *BF16, "data.aspect_buckets=[0.5,1.0,2.0]")),
    "image-pixel-superres-zero2-bf16": ("image", "", (*SUPERRES, "deepspeed.zero_stage=2", *BF16)),
    "video-pixel-superres-pipeline-fp32": ("video", "", (*VIDEO, *SUPERRES, *PIPELINE)),
    "image-pixel-progressive-zero3-bf16": ("image", "teacher", ("stage.kind=progressive", *DISTILL,
                                                                 "deepspeed.zero_stage=3", *BF16)),
    # bf16 without ZeRO (DeepSpeed's fp32 masters apart from the weights) and compiled flat block
    # parameters: each round's teacher and export come from the flat student by weight name
    "image-pixel-progressive-zero0-bf16-flat-compiled": ("image", "teacher", ("stage.kind=progressive", *DISTILL,
                                                                              "deepspeed.zero_stage=0", *BF16,
                                                                              "model.flat_params=true",
                                                                              "model.compile=true")),
    "image-pixel-progressive-pipeline-fp32": ("image", "teacher", ("stage.kind=progressive", *DISTILL, *PIPELINE)),
    "image-pixel-adversarial-zero2-fp32": ("image", "teacher", ("stage.kind=adversarial", *DISTILL,
                                                                 "deepspeed.zero_stage=2")),
    "video-pixel-autoencoder-zero1-bf16": ("video", "", (*VIDEO, "stage.kind=autoencoder",
                                                          "model.autoencoder.kind=kl", "deepspeed.zero_stage=1",
                                                          *BF16)),
}


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory) -> Path:
    """A structurally complete autoencoder folder (random weights) as the autoencoder stage writes it."""
    from trainer.config import AutoencoderConfig
    from trainer.models.autoencoder import Autoencoder, build_kl

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("autoencoder")
    Autoencoder(build_kl(AutoencoderConfig(kind="kl", block_out_channels=[8, 16]))).save(out)
    return out


@pytest.mark.parametrize("cell", list(CELLS))
def test_cell_trains_resumes_samples_and_exports_what_it_trained(cell, shapes_shards, video_shards, mixed_shards,
                                                                 autoencoder_dir, tiny_teacher, tmp_path):  # noqa: F811
    data, needs, overrides = CELLS[cell]
    shards = {"image": shapes_shards, "video": video_shards, "joint": f"{video_shards}::{shapes_shards}",
              "mixed": mixed_shards}[data]
    extra = list(overrides)
    if needs == "ae":
        extra.append(f"model.autoencoder.path={autoencoder_dir}")
    if needs == "teacher":
        extra.append(f"stage.teacher={tiny_teacher}")
    if "stage.kind=autoencoder" in overrides:
        extra.append(f"model.autoencoder.path={tmp_path / 'ae'}")
    out = tmp_path / "run"
    common = base(shards, out, "checkpoint.every=2", *extra)
    assert_ok(run_train(2, [*common, "stage.steps=2"]))
    resumed = run_train(2, [*common, "stage.steps=4"])
    assert_ok(resumed)
    assert "at step 2" in resumed.stdout, resumed.stdout[-3000:]
    assert latest_dir(out).name.endswith("4")
    assert_checkpoint_samples_match(out, tmp_path)
    if "stage.kind=autoencoder" not in overrides:
        assert_export_is_the_checkpoint(out, tmp_path / "export")
    if cell in CHECKS:
        CHECKS[cell](out, tmp_path)


def assert_export_is_the_checkpoint(out: Path, export_dir: Path) -> None:
    """`dit export --format safetensors` writes the checkpoint's EMA network, every tensor trained."""
    from trainer.export import export_safetensors

    exported = load_file(str(export_safetensors(out / "checkpoints", export_dir) / "model.safetensors"))
    ema = ema_weights(out)
    missing = [k for k in exported if k not in ema]
    assert not missing, f"exported tensors that are not in the checkpoint's EMA: {missing[:5]}"
    assert all(torch.equal(v, ema[k].to(v.dtype)) for k, v in exported.items())
    zeros = [k for k, v in exported.items() if v.numel() > 1 and not v.any() and "null" not in k]
    assert not zeros, f"exported tensors still all zero after training: {zeros[:5]}"


def check_buckets(out: Path, tmp: Path) -> None:
    """What each rank trained on, step by step (the resumed launch logs steps 3..4), is exactly
    what the stream plans for it: batch by batch the same keys, so each batch one bucket as the
    stream makes them, and the resume went on where the first launch stopped. Then a non-square
    `dit sample` from the checkpoint."""
    import json

    import PIL.Image

    from data_pipeline.stream import build_stream
    from launch.cli import main as dit
    from trainer.config import load_config

    # fp32 at ZeRO-0 is clipped by the finite guard, which keeps the norm (DeepSpeed dropped it: 0 logged)
    norms = [r["grad_norm"] for r in metrics(out) if "grad_norm" in r]
    assert len(norms) == 4 and all(n > 0 for n in norms), norms
    cfg = load_config(latest_dir(out) / "config.yaml")
    trained = step_keys(out)
    shapes = set()
    for rank in range(2):
        stream = iter(build_stream(cfg.data, rank, 2))
        for step in range(1, 5):
            batch = next(stream)
            planned = [k for k, valid in zip(batch["__key__"], batch["valid"].tolist()) if valid]
            assert trained[rank][step] == planned, (rank, step)
            shapes.add(tuple(batch["image"].shape[2:]))
    assert len(shapes) >= 3, shapes  # the steps covered several bucket shapes of both areas
    assert {h * w for h, w in shapes} & {192, 256} and {h * w for h, w in shapes} & {1024, 1152}, shapes
    samples = tmp / "non_square"
    assert dit(["sample", str(out / "checkpoints"), "--prompt", "a large red circle at the top left",
                "--steps", "2", "--height", "24", "--width", "48", "--out", str(samples)]) == 0
    record = json.loads((samples / "samples.json").read_text())
    assert PIL.Image.open(samples / record["files"][0]).size == (48, 24)


def check_learned_null(out: Path, _tmp: Path) -> None:
    """The EMA of step 4 holds a trained null caption (the first step cannot move it: adaLN-Zero;
    later ones do); the sample-grid check above already sampled with it (the uncond branch)."""
    ema = ema_weights(out)
    for key in ("embed.null_tokens", "embed.null_pooled"):
        assert torch.count_nonzero(ema[key]) > 0, key


def check_encoders_travel(out: Path, tmp: Path) -> None:
    """The checkpoint records the autoencoder files it trained with (encoders.json): it samples
    with a copy of them elsewhere; with a re-fitted latent normalisation (another latent space)
    at that path, sampling and resuming it are refused naming the key (it decoded garbage)."""
    import json
    import shutil

    from trainer.cascade import CascadeStageSpec, load_stage
    from trainer.config import ConfigError, load_config
    from trainer.diffusion import SamplerSettings
    from trainer.engine import preflight_resume

    copy = tmp / "autoencoder_copy"
    shutil.copytree(load_config(latest_dir(out) / "config.yaml").model.autoencoder.path, copy)
    moved = [f"model.autoencoder.path={copy}"]
    load_stage(CascadeStageSpec(str(out / "checkpoints"), overrides=moved), SamplerSettings(steps=2))
    norm = copy / "latent_norm.json"
    norm.write_text(json.dumps({**json.loads(norm.read_text()), "scale": 2.0}))
    refused = r"'model\.autoencoder\.path': .* was trained with another autoencoder .*latent_norm\.json"
    with pytest.raises(ConfigError, match=refused):
        load_stage(CascadeStageSpec(str(out / "checkpoints"), overrides=moved), SamplerSettings(steps=2))
    with pytest.raises(ConfigError, match=refused):
        preflight_resume(load_config(latest_dir(out) / "config.yaml", moved), 2)


CHECKS = {"image-pixel-pretrain-zero0-fp32-buckets": check_buckets,
          "joint-pixel-pretrain-zero3-fp32-null": check_learned_null,
          "image-latent-pretrain-zero1-bf16": check_encoders_travel}


@pytest.fixture(scope="module")
def joint_runs(video_shards, tmp_path_factory) -> tuple[str, dict[int, Path]]:
    """Joint image-video pretraining (clips and stills of their own keys) on 2 ranks for 4 steps
    without clipping, at ZeRO-1 and ZeRO-2: the shards and the two runs."""
    from data_pipeline.synth import synth_samples
    from data_pipeline.write import write_shards

    tmp = tmp_path_factory.mktemp("joint")
    stills = tmp / "stills"  # keys of their own, to tell a step's images from its clips
    write_shards(({**s, "__key__": f"still{s['__key__']}"} for s in synth_samples(48, seed=1, size=16)),
                 str(stills), shard_size=24, progress=False)
    shards, runs = f"{video_shards}::{stills}", {}
    for zero in (1, 2):
        runs[zero] = tmp / f"zero{zero}"
        assert_ok(run_train(2, base(shards, runs[zero], *VIDEO, f"deepspeed.zero_stage={zero}", "stage.steps=4",
                                    "checkpoint.every=4", "optim.grad_clip=0", "log.sample_every=0",
                                    "log.sample_keys=true")))
    return shards, runs


def test_joint_image_video_at_zero2_trains_as_at_zero1(joint_runs):
    """ZeRO-2 sums each bucket of gradients in the order the rank readied them; at a step where
    one rank holds images and the other clips, an image's idle temporal attention readied its
    (zero) gradients elsewhere than a clip's, and 88 of 132 tensors trained wrong (ZeRO-1 reduces
    after the backward pass, in a fixed order). Both layouts now end on the same weights."""
    _, runs = joint_runs
    keys = step_keys(runs[2])
    # rank -> whether its batch is all images (a batch of clips holds stills only as static clips)
    kinds = {step: {rank: all(k.startswith("still") for k in keys[rank][step]) for rank in keys} for step in keys[0]}
    assert any(len(set(k.values())) > 1 for k in kinds.values()), kinds  # a step of images beside clips
    assert same_tensors(final_weights(runs[1]), final_weights(runs[2]))


def test_adversarial_distillation_of_a_video_model_on_joint_data_at_zero3(joint_runs, tmp_path):
    """The discriminator's trunk (a frozen copy of the teacher, partitioned with the heads under
    ZeRO-3) skips its temporal attention on an image batch: without its factorized blocks as
    ZeRO-3 leaves, the ranks gathered different parameters at the first step of images beside
    clips (a gloo collective mismatch) and the run died there."""
    shards, runs = joint_runs
    out = tmp_path / "run"
    assert_ok(run_train(2, base(shards, out, *VIDEO, "stage.kind=adversarial", *DISTILL,
                                f"stage.teacher={runs[1] / 'checkpoints'}", "deepspeed.zero_stage=3",
                                "stage.steps=4", "checkpoint.every=4", "log.sample_every=0")))
    logged = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in logged)
