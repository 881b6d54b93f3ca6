"""Sequence parallelism (deepspeed.sequence_parallel_size, DeepSpeed-Ulysses) on 2 real ranks
over gloo: the split network computes what the whole one computes, and a split training run
trains, resumes, samples and exports as one process does."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.trainer.harness import (ROOT, assert_checkpoint_samples_match, assert_ok, base, final_weights, losses,
                                   run_train, step_keys, train_env)
from tests.trainer.test_support_matrix import VIDEO, assert_export_is_the_checkpoint
from trainer.config import ConfigError, RunConfig, validate

pytestmark = pytest.mark.slow


def test_split_forward_backward_equals_one_process():
    """Full space-time attention (RoPE), factorized attention of a clip (attention-only
    checkpointing) and of an image: the same loss and gradients as the whole model."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "tests.trainer.sequence_worker"]
    proc = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["variant"] for r in results} == {"full-rope-video", "factorized-video", "factorized-image"}, \
        proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, results
    assert all(r["grad_max"] > 1.0 for r in results)  # gradients that can differ


def test_split_training_matches_one_process_resumes_samples_and_exports(video_shards, tmp_path):
    """ZeRO-2, clips of 4 frames: 4 steps in one process (stopped and resumed at 2: bit-exact)
    vs 2 steps on a sequence group of 2 ranks resumed to 4; the same losses and weights, one key
    ledger for the group. And the one process's step 2 resumed elastically on a sequence group
    (S 1 -> 2, one data-parallel rank either way) ends where the one process does."""
    common = [*VIDEO, "deepspeed.zero_stage=2", "checkpoint.every=2", "log.sample_keys=true"]
    single, split, grown = tmp_path / "single", tmp_path / "split", tmp_path / "grown"
    assert_ok(run_train(1, base(video_shards, single, *common, "stage.steps=2")))
    shutil.copytree(single, grown)
    assert_ok(run_train(1, base(video_shards, single, *common, "stage.steps=4")))
    sp = base(video_shards, split, *common, "deepspeed.sequence_parallel_size=2")
    assert_ok(run_train(2, [*sp, "stage.steps=2"]))
    resumed = run_train(2, [*sp, "stage.steps=4"])
    assert_ok(resumed)
    assert "at step 2" in resumed.stdout, resumed.stdout[-3000:]
    a, b = losses(single), losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    wa, wb = final_weights(single), final_weights(split)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    keys = step_keys(split)
    assert list(keys) == [0] and all(len(k) == 4 for k in keys[0].values())  # the group counts once
    assert keys == step_keys(single)
    assert_checkpoint_samples_match(split, tmp_path)
    assert_export_is_the_checkpoint(split, tmp_path / "export")
    elastic = run_train(2, base(video_shards, grown, *common, "deepspeed.sequence_parallel_size=2", "stage.steps=4"))
    assert_ok(elastic)
    assert "elastic resume" in elastic.stdout + elastic.stderr and "at step 2" in elastic.stdout
    wc = final_weights(grown)
    assert max(float((wa[k] - wc[k]).abs().max()) for k in wa) < 1e-5
    assert step_keys(grown) == step_keys(single)


@pytest.mark.parametrize("overrides,key", [
    ({"model": {"preset": "DiT-S/2"}, "deepspeed": {"sequence_parallel_size": 4}}, "deepspeed.sequence_parallel_size"),
    ({"deepspeed": {"sequence_parallel_size": 2, "pipeline_stages": 2, "zero_stage": 1}},
     "deepspeed.sequence_parallel_size"),
    ({"deepspeed": {"sequence_parallel_size": 2}, "stage": {"kind": "adversarial", "guidance_max": 1.0}},
     "deepspeed.sequence_parallel_size"),
    ({"deepspeed": {"sequence_parallel_size": 2}, "model": {"video": True},
      "data": {"kind": "video", "num_frames": 3}}, "data.num_frames"),
    ({"model": {"checkpoint_policy": "everything"}}, "model.checkpoint_policy"),
])
def test_bad_sequence_parallel_configs_name_the_key(overrides, key):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), overrides))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_three_ranks_per_sequence_must_divide_the_world():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig),
                                              {"model": {"preset": "DiT-S/2"}, "deepspeed": {"sequence_parallel_size": 3},
                                               "data": {"resolution": 48}}))  # 24 x 24 tokens split in 3
    validate(cfg, world_size=6)
    with pytest.raises(ConfigError, match="deepspeed.sequence_parallel_size"):
        validate(cfg, world_size=4)
