"""Frechet distances: exact on Gaussians, at the real-vs-real level between real sets, large
against noise or wrong colours, in the shapes-CNN feature space and on pixel thumbnails."""
from __future__ import annotations

import pytest
import torch

from trainer.evaluate import distribution_distances, frechet_distance, synthetic_training_set, train_feature_net


def test_frechet_distance_of_diagonal_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]).double()
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 2.0, 1.0]).double() + 1.0
    expected = 3 * 1.0 + (1 - 2) ** 2 + 0 + (0.5 - 1) ** 2  # |mu|^2 + sum (s_a - s_b)^2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_feature_distance_separates_real_from_wrong():
    net = train_feature_net(16, steps=80, num=512, progress=False)
    real, _ = synthetic_training_set(256, 16, seed=101)
    other, _ = synthetic_training_set(128, 16, seed=202)
    same = distribution_distances(other, real, net)
    dark = distribution_distances((other + 1) * 0.6 - 1, real, net)  # every colour off
    noise = distribution_distances(torch.rand_like(other) * 2 - 1, real, net)
    for key in ("fd_features", "fd_pixels"):
        assert same[key] < 2 * same[f"{key}_real_split"], (key, same)
        assert noise[key] > 10 * same[key] and dark[key] > 3 * same[key], (key, same, dark, noise)


def test_feature_net_training_is_deterministic():
    first, second = (train_feature_net(16, steps=10, num=128, progress=False) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
