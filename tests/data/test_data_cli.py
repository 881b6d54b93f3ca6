"""`dit data ...` and `dit bench loader` through the argparse glue in launch/data_cmd.py."""
from __future__ import annotations

import pytest

from data_pipeline.manifest import load_manifest
from launch.cli import main


def _run(argv: list[str]) -> int:
    """Through the real `dit` parser, which calls launch.data_cmd.register / register_bench."""
    return main(argv)


def toy_latents_are_refused_for_training(tmp_path, latents) -> None:
    """Without --encoder the latents are the toy stand-in's (pooled pixels, hashed words): a run
    on them was refused only once DeepSpeed had started (no text_pooled, exit 5). The manifest
    records the stand-in and the preflight refuses it naming data.shards."""
    from tests.eval.eval_helpers import tiny_config
    from trainer.config import ConfigError
    from trainer.stages.checks import check_latent_sources

    with pytest.raises(ConfigError, match=r"'data\.shards': the latents of .* were made by "
                                          r"data_pipeline\.precompute:toy_encoder, a stand-in for tests"):
        check_latent_sources(tiny_config(tmp_path / "run", f"data.shards={latents}", "model.in_channels=3"))


def test_data_synth_inspect_precompute(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert _run(["data", "synth", "--out", str(out), "--num", "12", "--shard-size", "5", "--size", "32",
                 "--seed", "0"]) == 0
    assert "wrote 12 synthetic image samples in 3 shards" in capsys.readouterr().out
    assert _run(["data", "precompute", str(out), "--out", str(tmp_path / "lat"), "--resolution", "32",
                 "--encoder-arg", "patch=4", "--batch-size", "5"]) == 0
    assert "encoded 12 samples into 3 shards" in capsys.readouterr().out
    toy_latents_are_refused_for_training(tmp_path, tmp_path / "lat")
    assert _run(["data", "inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "samples:     12" in text and "all 3 shards match" in text
    assert "members:     json 12, png 12, txt 12" in text
    (out / "shard-000000.tar").write_bytes(b"garbage")
    assert _run(["data", "inspect", str(out), "--verify"]) == 1
    assert "shard-000000.tar: sha256 mismatch" in capsys.readouterr().out


def test_verify_without_a_manifest_says_it_has_nothing_to_verify_against(tmp_path, capsys):
    """Shards without manifest.json (and pipe: commands) are counted by reading them, so a
    recount compares them with themselves: --verify passed a corrupted shard ("all match"),
    where it must say it verified nothing and fail. Once a manifest is written, it verifies."""
    out = tmp_path / "shapes"
    assert _run(["data", "synth", "--out", str(out), "--num", "4", "--shard-size", "2", "--size", "32"]) == 0
    (out / "manifest.json").unlink()
    capsys.readouterr()
    for source, hint in ((str(out), f"dit data inspect {out} --write-manifest"),
                         (f"pipe:cat {out}/shard-00000{{0..1}}.tar", "give the directory or URL")):
        assert _run(["data", "inspect", source, "--verify"]) == 1
        text = capsys.readouterr().out
        assert "NOT DONE" in text and hint in text and "match the manifest" not in text
    assert _run(["data", "inspect", str(out), "--write-manifest", "--verify"]) == 2  # would verify a fresh scan
    assert "verify first" in capsys.readouterr().err and not (out / "manifest.json").exists()
    assert _run(["data", "inspect", str(out), "--write-manifest"]) == 0
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert _run(["data", "inspect", str(out), "--verify"]) == 1
    assert "shard-000001.tar: sha256 mismatch" in capsys.readouterr().out


def run_encoder(config: str, overrides=(), patch: int = 4):
    """An encoder factory taking the run config as trainer.stages.pretrain:precompute_encoder does."""
    from data_pipeline.precompute import toy_encoder

    return toy_encoder(patch=patch)


def test_precompute_makes_the_pixels_with_the_run_configs_data_settings(tmp_path, capsys):
    """`--encoder-arg config=RUN.yaml` (or `--config`): the clips are cut as the run cuts them
    (a text-to-video run's data.fps, not every frame; video without --kind video), and a flag
    that contradicts the run config is refused naming the key."""
    from tests.data.data_helpers import make_shards
    from tests.trainer.harness import ROOT
    from trainer.codes import EXIT_CONFIG

    videos = make_shards(tmp_path / "videos", sizes=[2], size=16, video=True, frames=8)  # at 8 fps
    run = tmp_path / "run.yaml"
    run.write_text((ROOT / "configs" / "test_tiny.yaml").read_text().replace(
        "data:\n  resolution: 16\n", "data:\n  kind: video\n  resolution: 16\n  num_frames: 4\n  fps: 4\n").replace(
        "model:\n", "model:\n  video: true\n"))
    assert _run(["data", "precompute", str(videos), "--out", str(tmp_path / "lat"), "--encoder",
                 "tests.data.test_data_cli:run_encoder", "--encoder-arg", f"config={run}",
                 "--encoder-arg", 'overrides=["data.frame_buckets=[2]"]']) == 0
    settings = load_manifest(str(tmp_path / "lat")).extra["data"]
    assert {k: settings[k] for k in ("kind", "resolution", "num_frames", "fps", "frame_buckets")} == \
        {"kind": "video", "resolution": 16, "num_frames": 4, "fps": 4.0, "frame_buckets": [2]}
    capsys.readouterr()
    assert _run(["data", "precompute", str(videos), "--out", str(tmp_path / "x"), "--config", str(run),
                 "--kind", "video", "--fps", "8"]) == EXIT_CONFIG
    assert "'data.fps': --fps 8.0 contradicts 4.0 of the run config" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_precompute_buckets_at_the_run_configs_multiple_or_the_flags(tmp_path, capsys):
    """Bucket sides are rounded to data.bucket_multiple, which a run derives from its model (16
    for an autoencoder downsampling 8 x patch 2): `--config` precomputes at the derived multiple
    and refuses a contradicting `--bucket-multiple`; without a run config the flag sets it. The
    manifest records it, so a run bucketing otherwise (48x16 against 48x24 at ratio 0.5) is refused."""
    import dataclasses

    from data_pipeline.config import DataConfig
    from data_pipeline.errors import DataError
    from data_pipeline.stream import build_stream
    from tests.data.data_helpers import make_shards
    from tests.trainer.harness import ROOT
    from trainer.codes import EXIT_CONFIG

    images = make_shards(tmp_path / "images", sizes=[2], size=32)
    overrides = ('overrides=["model.autoencoder.kind=kl","model.autoencoder.block_out_channels=[32,32,32,32]",'
                 '"model.in_channels=4","data.resolution=32","data.aspect_buckets=[0.5,1.0]"]')
    derived = ["--encoder", "tests.data.test_data_cli:run_encoder", "--encoder-arg",
               f"config={ROOT / 'configs' / 'test_tiny.yaml'}", "--encoder-arg", overrides]
    assert _run(["data", "precompute", str(images), "--out", str(tmp_path / "run"), *derived]) == 0
    assert load_manifest(str(tmp_path / "run")).extra["data"]["bucket_multiple"] == 16
    capsys.readouterr()
    assert _run(["data", "precompute", str(images), "--out", str(tmp_path / "x"), *derived,
                 "--bucket-multiple", "8"]) == EXIT_CONFIG
    assert "'data.bucket_multiple': --bucket-multiple 8 contradicts 16 of the run config" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert _run(["data", "precompute", str(images), "--out", str(tmp_path / "flags"), "--resolution", "32",
                 "--aspect-buckets", "0.5,1", "--bucket-multiple", "16"]) == 0
    assert load_manifest(str(tmp_path / "flags")).extra["data"]["bucket_multiple"] == 16
    run = DataConfig(shards=str(tmp_path / "flags"), resolution=32, aspect_buckets=[0.5, 1.0], bucket_multiple=16,
                     num_workers=0)
    assert build_stream(run, 0, 1).num_samples == 2
    with pytest.raises(DataError, match=r"^data\.bucket_multiple: "):
        build_stream(dataclasses.replace(run, bucket_multiple=8), 0, 1)


def test_data_synth_video_and_write_manifest(tmp_path, capsys):
    out = tmp_path / "v"
    assert _run(["data", "synth", "--out", str(out), "--num", "2", "--video", "--frames", "4", "--size", "32"]) == 0
    (out / "manifest.json").unlink()
    assert _run(["data", "inspect", str(out), "--write-manifest"]) == 0
    text = capsys.readouterr().out
    assert "manifest.json" in text and "frames:      min 4" in text


def test_precompute_flags_are_checked_as_a_runs_data_section(tmp_path, capsys):
    """Flags without a run config: a bad value names its data. key (a traceback before)."""
    from trainer.codes import EXIT_CONFIG

    for flag, value, key in (("--resolution", "12", "data.resolution"), ("--bucket-multiple", "-1", "data.bucket_multiple")):
        assert _run(["data", "precompute", str(tmp_path), "--out", str(tmp_path / "x"), flag, value]) == EXIT_CONFIG
        assert f"config error at '{key}'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_data_synth_video_refuses_an_odd_size_before_writing(tmp_path, capsys):
    """libx264 (yuv420p) cannot encode an odd side: a traceback after an empty shard was written."""
    out = tmp_path / "v"
    assert _run(["data", "synth", "--out", str(out), "--num", "2", "--video", "--frames", "2", "--size", "33"]) == 1
    assert "need an even side, not 33 px" in capsys.readouterr().err
    assert not out.exists()


def test_bench_loader_prints_the_ratio_line(tmp_path, capsys):
    assert _run(["bench", "loader", "--dir", str(tmp_path / "b"), "--num", "64", "--size", "64",
                 "--resolution", "32", "--batch-size", "8", "--workers", "0,1", "--main-workers", "1",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "loader/raw_decode = " in out
    assert out.count("\n") >= 4


@pytest.mark.parametrize("command", ["write", "synth", "inspect", "precompute"])
def test_every_data_command_has_help(command, capsys):
    with pytest.raises(SystemExit):
        _run(["data", command, "--help"])
    assert "usage: dit data " + command in capsys.readouterr().out
