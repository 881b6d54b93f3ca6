"""Fixtures of the fault suite: real shards, and one uninterrupted 2-rank run that the
interrupted ones must end bit-equal to."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.data_helpers import make_shards
from tests.trainer.harness import assert_ok, base, built_once, run_train

# One epoch exactly: 96 samples = 12 steps x 2 ranks x 4. A worker per rank, so resumes also
# cross what a worker had prefetched but not handed out.
REFERENCE = ("stage.steps=12", "checkpoint.every=4", "log.sample_keys=true", "data.num_workers=1")


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> Path:
    """3 shards of 40, 30 and 26 16-px shapes: 2 ranks cannot split them shard-wise."""
    return built_once(tmp_path_factory, "uneven", lambda out: make_shards(out, sizes=(40, 30, 26), size=16))


@pytest.fixture(scope="session")
def reference_run(uneven_shards, tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "reference",
                      lambda out: assert_ok(run_train(2, base(uneven_shards, out / "run", *REFERENCE)))) / "run"
