"""Checkpoint files and the checks around them, in process: a missing DeepSpeed file is
reported as missing (not as a pickle refusal), a pickle with foreign objects is refused by the
weights-only allowlist, a warm start from a run that kept no EMA takes its raw weights (as `dit
sample` / `dit export` do), a longer run says its cosine schedule was stretched, intervals the
loop divides by are validated, and commits and retention survive a power loss or a kill."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.models.test_dit_model import randomize_, tiny
from tests.trainer.harness import TINY
from trainer.checkpoint import CheckpointError, CheckpointManager, init_network, safe_checkpoint_engine
from trainer.checkpoint_format import COMPLETE, commit, point_latest, shares, temporary_dir, verify, verify_share
from trainer.config import CheckpointConfig, ConfigError, load_config, to_yaml
from trainer.elastic import MOMENTS, universal_file
from trainer.engine import RESUMABLE_CHANGES, resumable_changes


def test_a_missing_engine_file_is_reported_as_missing(tmp_path):
    with pytest.raises(CheckpointError, match="the file is missing") as err:
        safe_checkpoint_engine().load(str(tmp_path / "mp_rank_00_model_states.pt"))
    assert "allowlist" not in str(err.value)


class Foreign:
    """A class no weights-only load may build."""


def test_a_pickle_of_foreign_objects_is_refused_by_the_allowlist(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"state": Foreign()}, path)  # a global outside the allowlist
    with pytest.raises(CheckpointError, match="outside the weights-only allowlist"):
        safe_checkpoint_engine().load(str(path))


def test_a_warm_start_from_a_run_without_ema_takes_its_raw_weights(tmp_path, capsys):
    """A checkpoint of ema.enabled=false holds universal_student.safetensors (fp32 masters and
    moments by weight name) and no ema.safetensors; init_from loads the masters."""
    trained = randomize_(tiny())
    tmp = temporary_dir(tmp_path / "checkpoints" / "step_00000004")
    save_file({f"{kind}/{n}": p.detach().float().clone() for kind in ("fp32", *MOMENTS)
               for n, p in trained.named_parameters()}, str(tmp / universal_file("student")))
    (tmp / "config.yaml").write_text("{}\n")
    commit(tmp, tmp_path / "checkpoints" / "step_00000004", step=4, world_size=1)
    point_latest(tmp_path / "checkpoints", "step_00000004")
    fresh = tiny()
    init_network(fresh, tmp_path / "checkpoints")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))
    assert "kept no EMA (ema.enabled=false): starting from its raw" in capsys.readouterr().out
    (tmp_path / "checkpoints" / "step_00000004" / universal_file("student")).unlink()
    with pytest.raises(CheckpointError, match="holds neither ema.safetensors .* nor universal_student"):
        init_network(fresh, tmp_path / "checkpoints")


def resumable(tmp_path, *overrides: str) -> tuple[Path, CheckpointManager]:
    """A step directory of TINY with `overrides` as the config check reads it (config.yaml and
    rank 0's record of the global batch), and the manager of a 2-rank job over it."""
    cfg = load_config(TINY, list(overrides))
    directory = tmp_path / "step_00000008"
    directory.mkdir()
    (directory / "config.yaml").write_text(to_yaml(cfg))
    (directory / "rank_00000.json").write_text(json.dumps({"global_batch": 8}))
    save_file({}, str(directory / "rank_00000.safetensors"))
    return directory, CheckpointManager(cfg.checkpoint, rank=0, world_size=2)


def test_a_warm_start_from_a_network_of_other_encoders_is_refused_before_any_rank_starts(tmp_path):
    """checkpoint.init_from a checkpoint whose DiT learned another latent space (a re-fitted
    latent normalisation at the same path, recorded in its encoders.json) started silently from
    weights that read this run's latents wrongly; sampling, resuming and distilling refused it."""
    from tests.eval.eval_helpers import tiny_config, write_autoencoder, write_checkpoint
    from trainer.checkpoint_format import ENCODERS_FILE, resolve
    from trainer.stages import preflight
    from trainer.encoder_record import encoders_record

    autoencoder = write_autoencoder(tmp_path / "autoencoder")
    latent = ("model.autoencoder.kind=kl", "model.in_channels=4", f"model.autoencoder.path={autoencoder}")
    source_cfg = tiny_config(tmp_path / "source", *latent)
    source = write_checkpoint(source_cfg)
    (resolve(source) / ENCODERS_FILE).write_text(encoders_record(source_cfg.model))
    run = tiny_config(tmp_path / "run", *latent, f"checkpoint.init_from={source}")
    preflight(run)  # the encoders it learned with: accepted
    norm = autoencoder / "latent_norm.json"
    norm.write_text(json.dumps({**json.loads(norm.read_text()), "scale": 2.0}))
    with pytest.raises(ConfigError, match=r"'model\.autoencoder\.path': .* was trained with another autoencoder "
                                          r".*warm-starting from it \(checkpoint\.init_from\)"):
        preflight(run)


def test_a_warm_start_from_an_export_is_checked_as_from_its_checkpoint_and_a_new_target_is_said(tmp_path, capsys):
    """An export (the finetune recipe's source) was not checked at all: a run with another text
    encoder setting, or another autoencoder at the same path, warm-started from it silently.
    `dit export` copies the checkpoint's encoders.json, checked as a checkpoint's; an export
    without one is held to its config's text encoder settings. A fine-tune to another target
    (prediction, zero terminal SNR) is a choice (SD 2's v-model): said before training, not refused."""
    from tests.eval.eval_helpers import tiny_config, write_autoencoder, write_checkpoint
    from trainer.checkpoint_format import ENCODERS_FILE, resolve
    from trainer.encoder_record import encoders_record
    from trainer.export import export_safetensors
    from trainer.stages import preflight

    autoencoder = write_autoencoder(tmp_path / "autoencoder")
    latent = ("model.autoencoder.kind=kl", "model.in_channels=4", f"model.autoencoder.path={autoencoder}")
    source_cfg = tiny_config(tmp_path / "source", *latent)
    source = write_checkpoint(source_cfg)
    (resolve(source) / ENCODERS_FILE).write_text(encoders_record(source_cfg.model))
    export = export_safetensors(source, tmp_path / "export")
    assert (export / ENCODERS_FILE).read_text() == (resolve(source) / ENCODERS_FILE).read_text()
    warm = (*latent, f"checkpoint.init_from={export}")
    preflight(tiny_config(tmp_path / "run", *warm))
    assert "checkpoint.init_from" not in capsys.readouterr().out  # the same target: nothing to say
    preflight(tiny_config(tmp_path / "run", *warm, "diffusion.prediction=eps", "diffusion.zero_terminal_snr=false"))
    said = capsys.readouterr().out
    assert (f"checkpoint.init_from: {export} was trained with diffusion.zero_terminal_snr=True, "
            f"diffusion.prediction='v'; this run has False, 'eps': the warm start fine-tunes it") in said
    preflight(tiny_config(tmp_path / "run", *warm, "model.positions=rope"))  # no weights: the strict load passes
    assert f"{export} was trained with model.positions='sincos'; this run has 'rope'" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"'model\.text\.max_length': .* was trained with a text encoder of "
                                          r"model\.text\.max_length=16, this run has 12"):
        preflight(tiny_config(tmp_path / "run", *warm, "model.text.max_length=12"))
    (export / ENCODERS_FILE).unlink()  # an export from before the record: its config's text settings
    with pytest.raises(ConfigError, match=r"'model\.text\.max_length': .*model\.text\.max_length=16"):
        preflight(tiny_config(tmp_path / "run", *warm, "model.text.max_length=12"))
    preflight(tiny_config(tmp_path / "run", *warm))


@pytest.mark.parametrize("schedule, listed", [("constant", []), ("cosine", [
    "stage.steps: 12 -> 20 (the cosine LR schedule now spans 20 steps instead of 12: the learning rate from here "
    "on follows the new length)"])])
def test_a_longer_run_lists_the_new_length_of_a_decaying_schedule(tmp_path, schedule, listed):
    """stage.steps may change on resume; a cosine schedule is laid over it, so the resume says so."""
    directory, manager = resumable(tmp_path, "stage.steps=12", f"optim.lr_schedule={schedule}")
    longer = to_yaml(load_config(TINY, ["stage.steps=20", f"optim.lr_schedule={schedule}"]))
    assert manager.check_compatible(directory, longer, RESUMABLE_CHANGES, global_batch=8) == listed


def test_a_setting_an_older_checkpoint_held_where_its_run_reads_none_may_be_dropped_to_resume(tmp_path):
    """A checkpoint written before clip settings of an image stream were refused (data.num_frames=16):
    its resume drops the key (a new run is refused it), which changes nothing of the experiment."""
    directory, manager = resumable(tmp_path)
    cfg = load_config(TINY)
    (directory / "config.yaml").write_text(to_yaml(cfg).replace("num_frames: 8\n", "num_frames: 16\n"))
    assert manager.check_compatible(directory, to_yaml(cfg), resumable_changes(cfg), global_batch=8) == []
    with pytest.raises(CheckpointError, match="data.num_frames: 16 -> 8"):
        manager.check_compatible(directory, to_yaml(cfg), RESUMABLE_CHANGES, global_batch=8)


@pytest.mark.parametrize("override, key", [("checkpoint.every=0", "checkpoint.every"), ("log.every=0", "log.every"),
                                           ("log.sample_every=-1", "log.sample_every"),
                                           ("log.eval_every=-5", "log.eval_every")])
def test_an_interval_the_loop_divides_by_is_refused_naming_the_key(override, key):
    """0 is a division by zero after step 1 where it has no meaning of "off" (checkpoint.every,
    log.every); log.sample_every and log.eval_every take 0 as "off"."""
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert err.value.key == key
    load_config(TINY, ["log.sample_every=0", "log.eval_every=0"])


def committed(root: Path, step: int) -> Path:
    """A complete step directory of a few files (one in an engine's folder), as a save commits it."""
    final = root / f"step_{step:08d}"
    tmp = temporary_dir(final)
    (tmp / "student").mkdir()
    (tmp / "student" / "mp_rank_00_model_states.pt").write_bytes(b"engine" * 100)
    save_file({"w": torch.ones(3)}, str(tmp / "ema.safetensors"))
    (tmp / "config.yaml").write_text("{}\n")
    commit(tmp, final, step, world_size=1)
    point_latest(root, final.name)
    return final


def test_a_kill_during_retention_never_leaves_a_half_checkpoint_under_its_name(tmp_path, monkeypatch):
    """Retention deletes the oldest checkpoint; killed midway (here: after the first file), what
    is left must not be a `step_*` directory with its COMPLETE.json, which counts as a checkpoint.
    The next save's cleanup removes the leftover."""
    root = tmp_path / "checkpoints"
    committed(root, 4), committed(root, 8)
    manager = CheckpointManager(CheckpointConfig(dir=str(root), keep=1), rank=0, world_size=1)
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        if Path(path).exists():
            next(p for p in sorted(Path(path).rglob("*")) if p.is_file() and p.name != COMPLETE).unlink()
            raise KeyboardInterrupt("killed during the deletion")

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        manager._apply_retention(keep_name="step_00000008")
    for directory in root.glob("step_*"):
        verify(directory)  # every checkpoint under its name is whole
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    manager._apply_retention(keep_name="step_00000008")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000008"]


def test_a_retention_failure_after_the_commit_is_a_warning(tmp_path, monkeypatch, capsys):
    """Deleting an old checkpoint fails (a network filesystem's rename): the save is done and
    `latest` names it, so it returns; reported as a failed commit it said `latest` was still the
    previous checkpoint and stopped the run (a preemption save then ended in exit 4, no requeue)."""
    from trainer.checkpoint import RankState
    from trainer.checkpoint_format import LATEST

    root = tmp_path / "checkpoints"
    committed(root, 4)
    manager = CheckpointManager(CheckpointConfig(dir=str(root), keep=1), rank=0, world_size=1)

    def refused(path):
        raise OSError(16, "Device or resource busy", str(path))

    monkeypatch.setattr("trainer.checkpoint.remove_dir", refused)
    final = manager.save(8, engines={}, rank_state=RankState({}, {}), config_yaml="{}\n", shared={})
    assert (root / LATEST).read_text().strip() == final.name == "step_00000008"
    verify(final)
    assert "checkpoint retention failed after saving step_00000008" in capsys.readouterr().err


def test_a_commit_flushes_every_file_and_folder_before_it_writes_complete(tmp_path, monkeypatch):
    """COMPLETE.json vouches for the files it lists: they (and the folders' entries) reach the
    disk before it is written, or a power loss could leave it naming data that is gone."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    committed(tmp_path, 4)
    tmp = str(tmp_path / ".tmp-step_00000004")
    before_complete = synced[: synced.index(f"{tmp}/.tmp-{COMPLETE}")]
    assert {f"{tmp}/student/mp_rank_00_model_states.pt", f"{tmp}/ema.safetensors", f"{tmp}/config.yaml",
            f"{tmp}/student", tmp} <= set(before_complete)


def test_files_hashed_at_once_are_listed_each_with_its_own_digest_and_a_changed_one_is_found(tmp_path):
    """A checkpoint's files are hashed several at a time (a rank's own files at each save, its
    share at each resume): each is listed under its own sha256, and a file changed afterwards,
    wherever it lies among them, is found and named."""
    import hashlib

    tmp = temporary_dir(tmp_path / "step_00000001")
    contents = {f"part_{i:02d}.bin": os.urandom(1000 + 4099 * i) for i in range(12)}
    for name, data in contents.items():
        (tmp / name).write_bytes(data)
    final = commit(tmp, tmp_path / "step_00000001", 1, 1)
    listed = json.loads((final / COMPLETE).read_text())["files"]
    assert listed == {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    verify(final)
    with open(final / "part_07.bin", "r+b") as f:
        f.write(b"\xff")
    with pytest.raises(CheckpointError, match="part_07.bin is missing or was modified"):
        verify(final)


def test_the_ranks_verify_shares_of_the_files_each_once_and_balanced_by_size(tmp_path):
    """A resume checks every file once, the ranks each a share dealt by size (largest first, to
    the rank holding the fewest bytes); a changed file is found by the rank whose share holds it."""
    sizes = {"big.bin": 9000, "mid_a.bin": 5000, "mid_b.bin": 4000, "small.bin": 10, "tiny.json": 2}
    assert shares(sizes, 3) == [["big.bin"], ["mid_a.bin"], ["mid_b.bin", "small.bin", "tiny.json"]]
    assert shares(sizes, 1) == [["big.bin", "mid_a.bin", "mid_b.bin", "small.bin", "tiny.json"]]
    assert shares({"a": 1}, 2) == [["a"], []]
    tmp = temporary_dir(tmp_path / "step_00000001")
    for name, size in sizes.items():
        (tmp / name).write_bytes(os.urandom(size))
    final = commit(tmp, tmp_path / "step_00000001", 1, 3)
    assert json.loads((final / COMPLETE).read_text())["sizes"] == sizes  # dealt from there, not from the filesystem
    with open(final / "small.bin", "r+b") as f:
        f.write(b"\xff")
    for rank in (0, 1):
        verify_share(final, rank, 3)
    with pytest.raises(CheckpointError, match="small.bin is missing or was modified"):
        verify_share(final, 2, 3)
    (final / "small.bin").unlink()  # a missing file is dealt too, and refused by its rank
    with pytest.raises(CheckpointError, match="small.bin is missing"):
        verify_share(final, 2, 3)
    complete = json.loads((final / COMPLETE).read_text())
    del complete["sizes"]  # a checkpoint from before the sizes were listed: dealt by the sizes on disk
    (final / COMPLETE).write_text(json.dumps(complete))
    with pytest.raises(CheckpointError, match="small.bin is missing"):
        verify_share(final, 2, 3)  # missing: dealt as empty, last, to the rank holding the fewest bytes


def test_a_commit_lists_the_digests_the_ranks_made_and_hashes_only_the_rest(tmp_path):
    """The ranks hash the files they wrote; the commit lists those digests as given (it does not
    read those files again) and hashes the others. A file a rank hashed that is not there at
    the commit (a rank writing to a disk of its own) is refused."""
    import hashlib

    tmp = temporary_dir(tmp_path / "step_00000001")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "rank1.bin").write_bytes(b"written by rank 1")
    (tmp / "config.yaml").write_text("{}\n")
    given = {"sub/rank1.bin": "0" * 64}  # not its digest: listed as given, so verify finds it
    final = commit(tmp, tmp_path / "step_00000001", 1, 2, known=given)
    listed = json.loads((final / COMPLETE).read_text())["files"]
    assert listed == {"config.yaml": hashlib.sha256(b"{}\n").hexdigest(), "sub/rank1.bin": "0" * 64}
    with pytest.raises(CheckpointError, match="rank1.bin is missing or was modified"):
        verify(final)
    tmp = temporary_dir(tmp_path / "step_00000002")
    with pytest.raises(CheckpointError, match="elsewhere.bin was written and hashed by its rank but is not there"):
        commit(tmp, tmp_path / "step_00000002", 2, 2, known={"elsewhere.bin": "0" * 64})


@pytest.mark.slow
def test_each_rank_hashes_the_files_it_wrote_and_a_resume_checks_them_together(tmp_path):
    """2 ranks over gloo (tests/trainer/checkpoint_ranks.py): at a save each rank flushes and
    hashes its own files, rank 0 its own and the whole-tensor and config files, not rank 1's;
    the checkpoint verifies, and once rank 1 changes its own file both ranks refuse it, the rank
    whose share holds it naming the file."""
    import re

    from tests.trainer.harness import ROOT, run_rank_script

    out = run_rank_script(ROOT / "tests" / "trainer" / "checkpoint_ranks.py", str(tmp_path / "checkpoints"),
                          timeout=300)
    synced = dict(re.findall(r"^(\d) synced (.*)$", out, re.M))
    assert synced == {"0": "config.yaml ema.safetensors rank_00000.json rank_00000.safetensors",
                      "1": "rank_00001.json rank_00001.safetensors"}, out[-6000:]
    assert len(re.findall(r"^\d verified$", out, re.M)) == 2, out[-6000:]
    refused = dict(re.findall(r"^(\d) refused (.*)$", out, re.M))
    assert refused.keys() == {"0", "1"}, out[-6000:]
    assert sum("rank_00001.safetensors is missing or was modified" in e for e in refused.values()) == 1, refused
    assert sum("rank(s) [" in e and "refused" in e for e in refused.values()) == 1, refused


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
def test_a_bf16_warm_start_starts_from_the_sources_fp32_weights(tiny_teacher, shapes_shards, tmp_path, zero):
    """DeepSpeed makes its fp32 masters from the module's weights, bf16 already under bf16: a
    warm start's masters must be the source's own fp32 weights (one step at lr 0 keeps them, as
    the universal file shows), and its EMA must start there too and stay there: it averages the
    masters, not the bf16 weights the forward pass used."""
    from safetensors.torch import load_file

    from tests.trainer.harness import assert_ok, base, ema_weights, latest_dir, run_train
    from trainer.checkpoint import load_init_weights

    out = tmp_path / "run"
    assert_ok(run_train(1, base(shapes_shards, out, f"checkpoint.init_from={tiny_teacher}", "deepspeed.precision=bf16",
                                f"deepspeed.zero_stage={zero}", "optim.lr=0", "stage.steps=1", "checkpoint.every=1",
                                "checkpoint.universal=true", "ema.decay=0.9", "log.sample_every=0")))
    source = load_init_weights(tiny_teacher)
    masters = load_file(str(latest_dir(out) / universal_file("student")))
    ema = ema_weights(out)
    assert ema.keys() == source.keys()
    for name, weight in source.items():
        assert torch.equal(masters[f"fp32/{name}"], weight), name
        assert torch.equal(ema[name], weight), name


@pytest.mark.slow
def test_a_bf16_distillation_starts_from_the_teachers_fp32_weights_and_hands_rounds_on_in_fp32(
        tiny_teacher, shapes_shards, tmp_path):
    """A distillation student is a copy of the teacher: under bf16 its fp32 masters and its EMA
    start at the teacher's fp32 weights, not at their bf16 rounding (DeepSpeed makes masters of
    the module it casts). At a progressive round's end the student's raw weights, exported and
    made the next teacher, are those fp32 masters (lr 0: still the teacher's), not the module's
    bf16 copy, and its config.yaml records bf16."""
    from safetensors.torch import load_file

    from tests.trainer.harness import assert_ok, base, ema_weights, latest_dir, run_train
    from trainer.checkpoint import load_init_weights

    out = tmp_path / "run"
    assert_ok(run_train(1, base(shapes_shards, out, "stage.kind=progressive", f"stage.teacher={tiny_teacher}",
                                "stage.rounds=[2,1]", "diffusion.loss_weighting=trunc_snr", "stage.guidance_max=1",
                                "deepspeed.precision=bf16",
                                "deepspeed.zero_stage=2", "optim.lr=0", "stage.steps=2", "checkpoint.every=2",
                                "ema.decay=0.9", "log.sample_every=0")))
    teacher = load_init_weights(tiny_teacher)
    masters = load_file(str(latest_dir(out) / universal_file("student")))
    (round_export,) = sorted(out.glob("**/round_1_*/ema.safetensors"))
    handed_on, ema = load_file(str(round_export)), ema_weights(out)
    assert handed_on.keys() == ema.keys() == teacher.keys()
    for name, weight in teacher.items():
        assert torch.equal(masters[f"fp32/{name}"], weight), name
        assert handed_on[name].dtype == torch.float32 and torch.equal(handed_on[name], weight), name
        assert torch.equal(ema[name], weight), name
    # the export samples in the precision it was trained in (`dit sample --precision auto` on a GPU)
    assert yaml.safe_load((round_export.parent / "config.yaml").read_text())["deepspeed"]["precision"] == "bf16"
