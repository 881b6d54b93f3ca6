"""Fixtures of the data tests."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import pytest
from tests.data.data_helpers import make_shards

from data_pipeline.config import DataConfig


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """5 uneven shards (3, 9, 5, 7, 4 samples) of 32px PNG shapes, with a manifest."""
    return make_shards(tmp_path_factory.mktemp("shapes"))


@pytest.fixture
def cfg(shards) -> Callable[..., DataConfig]:
    """A DataConfig over the session shards, with keyword overrides."""

    def make(**overrides) -> DataConfig:
        base = DataConfig(shards=str(shards), resolution=32, batch_size=4, num_workers=0, shuffle_buffer=4)
        return dataclasses.replace(base, **overrides)

    return make
