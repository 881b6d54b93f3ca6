"""`model.text.null=learned` on 2 real ranks over gloo: the DiT's learned null caption is
trained by CFG dropout under ZeRO-3, tracked by the EMA, saved, resumed and sampled with.
One-process checks of the same mechanism: tests/models/test_learned_null.py."""
from __future__ import annotations

import pytest
import torch

from tests.trainer.harness import assert_checkpoint_samples_match, assert_ok, base, ema_weights, run_train

pytestmark = pytest.mark.slow

NULL_KEYS = ("embed.null_tokens", "embed.null_pooled")


def test_learned_null_trains_saves_resumes_and_samples(shapes_shards, tmp_path):
    out = tmp_path / "run"
    common = ["model.text.null=learned", "stage.cfg_dropout=0.5", "deepspeed.zero_stage=3", "checkpoint.every=2"]
    assert_ok(run_train(2, base(shapes_shards, out, *common, "stage.steps=2")))
    resumed = run_train(2, base(shapes_shards, out, *common, "stage.steps=4"))
    assert_ok(resumed)
    assert "at step 2" in resumed.stdout
    ema = ema_weights(out)  # step 4's: the first step cannot move it (adaLN-Zero), later ones do
    assert ema["embed.null_tokens"].shape == (1, 384) and ema["embed.null_pooled"].shape == (384,)
    for key in NULL_KEYS:
        assert torch.count_nonzero(ema[key]) > 0, key
    assert_checkpoint_samples_match(out, tmp_path)  # the sampler's uncond branch uses the saved null
