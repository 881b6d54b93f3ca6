"""Which per-rank batch or grad_accum an elastic resume derives to keep the checkpoint's global
batch, and when it refuses (no process is started: the checkpoint is its COMPLETE.json and
config.yaml)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest

from tests.trainer.harness import TINY
from trainer.config import load_config, to_yaml
from trainer.elastic import ElasticError, keep_global_batch, shape_of, universal_file, written_shape


def checkpoint(tmp_path: Path, world_size: int, *overrides: str, universal: bool = True,
               request: Optional[list[int]] = None) -> Path:
    """A step directory as a job of `world_size` ranks with `overrides` would have written it;
    `request`: the [batch_size, grad_accum] that set its global batch, when another job's."""
    directory = tmp_path / "step_00000008"
    directory.mkdir()
    (directory / "config.yaml").write_text(to_yaml(load_config(TINY, list(overrides))))
    (directory / "COMPLETE.json").write_text(json.dumps({"step": 8, "world_size": world_size, "files": {}}))
    if request is not None:
        (directory / "rank_00000.json").write_text(json.dumps({"global_batch": 8, "batch_request": request}))
    if universal:
        (directory / universal_file("student")).write_bytes(b"")
    return directory


@pytest.mark.parametrize("world, overrides, batch, accum", [
    (1, (), 4, 2),  # fewer ranks: grad_accum grows
    (1, ("data.batch_size=2",), 2, 4),  # fewer ranks and a smaller per-rank batch asked for: kept
    (4, (), 2, 1),  # more ranks than the batch allows at 4 per rank: the per-rank batch shrinks
    (2, ("deepspeed.pipeline_stages=2", "deepspeed.zero_stage=1"), 4, 2),  # 2 ranks, 1 data-parallel
    (2, ("deepspeed.zero_stage=3", "data.num_workers=2"), 4, 1),  # same global batch: nothing derived
])
def test_the_global_batch_is_kept(tmp_path, world, overrides, batch, accum):
    directory = checkpoint(tmp_path, 2)
    cfg, note = keep_global_batch(load_config(TINY, list(overrides)), world, directory)
    assert (cfg.data.batch_size, cfg.deepspeed.grad_accum) == (batch, accum)
    assert ("derived" in note) == ((batch, accum) != (4, 1))
    assert note.endswith(f"= global batch 8 on {world} rank(s), ZeRO-{cfg.deepspeed.zero_stage}, "
                         f"{cfg.deepspeed.pipeline_stages} pipeline stage(s), fp32")


def test_a_global_batch_that_cannot_be_kept_is_refused(tmp_path):
    with pytest.raises(ElasticError, match=r"global batch 8 .* 3 rank\(s\) .* global batch 12"):
        keep_global_batch(load_config(TINY), 3, checkpoint(tmp_path, 2))


@pytest.mark.parametrize("change, batch, accum", [("data.batch_size=2", 2, 1), ("deepspeed.grad_accum=2", 4, 2)])
def test_an_explicit_batch_change_on_the_same_ranks_is_left_to_the_config_check(tmp_path, change, batch, accum):
    """Nothing is derived on the checkpoint's data-parallel ranks for numbers other than those
    that set its global batch: the change is the user's (test_resume_shape.py: listed and
    refused, or trained with under --allow-config-change)."""
    cfg, note = keep_global_batch(load_config(TINY, [change]), 2, checkpoint(tmp_path, 2))
    assert (cfg.data.batch_size, cfg.deepspeed.grad_accum, note) == (batch, accum, "")


@pytest.mark.parametrize("change, accum", [((), 2), (("deepspeed.grad_accum=4",), 4)])
def test_rerunning_the_command_after_a_shrink_derives_again(tmp_path, change, accum):
    """A checkpoint of 1 rank whose grad_accum 2 was derived from the 2-rank run's 1: the same
    command relaunched on 1 rank (`--max-restarts`) derives it again; another grad_accum is a
    change, left to the config check."""
    directory = checkpoint(tmp_path, 1, "deepspeed.grad_accum=2", request=[4, 1])
    cfg, note = keep_global_batch(load_config(TINY, list(change)), 1, directory)
    assert (cfg.data.batch_size, cfg.deepspeed.grad_accum, note) == (4, accum, "")


def test_a_checkpoint_without_universal_state_resumes_on_its_layout_only(tmp_path):
    directory = checkpoint(tmp_path, 2, universal=False)
    assert keep_global_batch(load_config(TINY), 2, directory)[1] == ""
    with pytest.raises(ElasticError, match="checkpoint.universal=false"):
        keep_global_batch(load_config(TINY, ["deepspeed.zero_stage=3"]), 2, directory)


@pytest.mark.parametrize("change, world, batch, accum, global_batch", [
    ((), 1, 4, 2, 8),  # the flag is for the learning rate: the global batch is still kept
    (("deepspeed.grad_accum=3",), 1, 4, 3, 12),  # the batch is the change asked for: kept as asked
    (("data.batch_size=2",), 2, 2, 1, 4),  # the same on the checkpoint's ranks
    ((), 3, 4, 1, 12),  # no whole number keeps 8 on 3 ranks: trained on with 12, as the flag allows
])
def test_allow_config_change_keeps_the_global_batch_unless_the_batch_is_changed(tmp_path, change, world, batch,
                                                                                accum, global_batch):
    overrides = ["optim.lr=5e-4", "checkpoint.allow_config_change=true", *change]
    cfg, note = keep_global_batch(load_config(TINY, overrides), world, checkpoint(tmp_path, 2))
    assert (cfg.data.batch_size, cfg.deepspeed.grad_accum) == (batch, accum)
    if global_batch == 8:
        assert "derived" in note
    else:
        assert "another global batch" in note and f": 8 (" in note and f"-> {global_batch} (" in note


@pytest.mark.parametrize("change", ["deepspeed.precision=bf16", "model.flat_params=true"])
def test_a_change_of_precision_or_flat_params_resumes_from_the_universal_files(tmp_path, change):
    """DeepSpeed's own files hold the optimizer wrapper and the parameters of the precision and
    parameter layout that wrote them (a bf16 ZeRO file in fp32 engines raised KeyError
    'param_groups' after start): such a change is another layout, resumed from the universal
    files, and refused before launch where there are none."""
    directory = checkpoint(tmp_path, 2, change, "checkpoint.allow_config_change=true")
    cfg = load_config(TINY, ["checkpoint.allow_config_change=true"])
    assert not written_shape(directory).same_layout(shape_of(cfg, 2))
    assert written_shape(directory).same_layout(shape_of(load_config(TINY, [change]), 2))
    (directory / universal_file("student")).unlink()
    with pytest.raises(ElasticError, match="checkpoint.universal=false, so it resumes only on its own layout"):
        keep_global_batch(cfg, 2, directory)
