"""`dit demo` and `dit data write` at their edges, without a training run: the demo deletes
only what an earlier demo wrote, and only in its own folder; its overrides reach every stage they
describe; a write that wrote nothing fails."""
from __future__ import annotations

from pathlib import Path

from launch.cli import main
from launch.demo import DEMO_MARKER, claim_run_dir, clear_previous_run, demo_outputs, stage_arguments
from tests.trainer.harness import ROOT
from trainer.config import load_config

DEMO = ROOT / "configs" / "demo.yaml"


def demo_configs(out: Path, *overrides: str):
    """The demo's two configs (DiT's, autoencoder's) on run.out_dir=out, as `dit demo` loads them."""
    (ae, *ae_overrides), (dit, *dit_overrides) = stage_arguments(DEMO, [f"run.out_dir={out}", *overrides])
    return load_config(dit, dit_overrides), load_config(ae, ae_overrides)


def test_demo_overrides_reach_every_stage_they_describe(tmp_path):
    """The run, its dataset and pixels, the autoencoder and DeepSpeed are both stages'; the rest
    is the DiT's, unless `autoencoder:` sets it for the autoencoder stage alone."""
    cfg, ae_cfg = demo_configs(tmp_path, f"data.shards={tmp_path}/shards", "data.resolution=64", "run.seed=3",
                               "deepspeed.zero_stage=1", "model.autoencoder.latent_channels=8", "stage.steps=9",
                               "optim.lr=1e-3", "data.batch_size=3", "autoencoder:stage.steps=5",
                               "autoencoder:run.seed=0")
    for stage in (cfg, ae_cfg):
        assert stage.run.out_dir == str(tmp_path) and stage.data.shards == f"{tmp_path}/shards"
        assert (stage.data.resolution, stage.deepspeed.zero_stage, stage.model.autoencoder.latent_channels) == (64, 1, 8)
        assert stage.model.autoencoder.path == cfg.model.autoencoder.path  # the one the DiT encodes with
    assert (cfg.stage.steps, cfg.optim.lr, cfg.run.seed) == (9, 1e-3, 3)
    assert cfg.data.batch_size == 3 and ae_cfg.data.batch_size == load_config(DEMO.with_name(
        "demo_autoencoder.yaml")).data.batch_size  # a stage's own loader setting
    assert (ae_cfg.stage.steps, ae_cfg.optim.lr, ae_cfg.run.seed) == (5, 1.5e-3, 0)  # its file's lr


def test_the_dits_parallel_splits_stay_the_dits(tmp_path):
    """Pipeline stages and sequence parallelism split the DiT; the autoencoder stage refuses them."""
    for split in ("deepspeed.sequence_parallel_size=2", "deepspeed.pipeline_stages=2"):
        cfg, ae_cfg = demo_configs(tmp_path, split, "deepspeed.zero_stage=1")
        assert (cfg.deepspeed.sequence_parallel_size, cfg.deepspeed.pipeline_stages) != (1, 1)
        assert (ae_cfg.deepspeed.sequence_parallel_size, ae_cfg.deepspeed.pipeline_stages) == (1, 1)
        assert ae_cfg.deepspeed.zero_stage == 1


def test_a_demo_override_that_would_part_the_stages_is_refused(tmp_path, capsys):
    assert main(["demo", str(DEMO), f"run.out_dir={tmp_path}", "autoencoder:model.autoencoder.path=elsewhere"]) == 2
    assert "model.autoencoder.path" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_demo_refuses_a_folder_it_did_not_write_and_deletes_nothing(tmp_path):
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "a.md").write_text("mine")
    (out / "checkpoints").mkdir()  # a real run's, not a demo's
    (tmp_path / "a_file").write_text("")  # shards that cannot be written: a demo let through stops at once
    assert main(["demo", str(DEMO), f"run.out_dir={out}", f"data.shards={tmp_path}/a_file/data", "--nproc", "1"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "notes"]
    assert (out / "notes" / "a.md").read_text() == "mine"


def test_a_rerun_deletes_only_the_earlier_demos_outputs(tmp_path):
    out = tmp_path / "demo"
    cfg, ae_cfg = demo_configs(out)
    assert claim_run_dir(str(out), cfg.data.shards, demo_outputs(cfg, ae_cfg))  # a fresh folder: marked
    assert (out / DEMO_MARKER).is_file()
    written = ["data", "checkpoints", "logs", "checkpoints_autoencoder", "logs_autoencoder", "autoencoder",
               "latents", "eval"]
    for name in written:
        (out / name).mkdir()
        (out / name / "file").write_text(name)
    (out / "notes.txt").write_text("added by hand")
    clear_previous_run(str(out), cfg.data.shards, demo_outputs(cfg, ae_cfg))
    assert sorted(p.name for p in out.iterdir()) == sorted([DEMO_MARKER, "data", "notes.txt"])
    assert (out / "data" / "file").read_text() == "data"


def test_the_shards_of_an_earlier_run_alone_leave_the_folder_a_demos(tmp_path):
    out = tmp_path / "demo"
    cfg, ae_cfg = demo_configs(out)
    (out / "data").mkdir(parents=True)
    assert claim_run_dir(str(out), str(out / "data"), demo_outputs(cfg, ae_cfg))
    assert (out / DEMO_MARKER).is_file()


def test_a_demo_folder_from_before_the_marker_is_a_demos_and_one_more_file_is_not(tmp_path):
    out = tmp_path / "demo"
    cfg, ae_cfg = demo_configs(out)
    for name in ("data", "checkpoints", "logs_autoencoder", "latents"):
        (out / name).mkdir(parents=True)
    assert claim_run_dir(str(out), cfg.data.shards, demo_outputs(cfg, ae_cfg))
    (out / DEMO_MARKER).unlink()
    (out / "notes.txt").write_text("added by hand")
    assert not claim_run_dir(str(out), cfg.data.shards, demo_outputs(cfg, ae_cfg))
    assert not (out / DEMO_MARKER).exists()


def test_data_write_that_wrote_no_sample_fails(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not an image")
    (folder / "a.txt").write_text("a caption")
    assert main(["data", "write", str(folder), "--out", str(tmp_path / "shards")]) == 1
    assert "no sample was written" in capsys.readouterr().err
