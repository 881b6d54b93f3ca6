"""The `*_real_split` floor of `dit eval distance`: what a perfect generator of the run's sample
sizes gets, not the distance of two half-size sets (about twice that)."""
from __future__ import annotations

import torch

from trainer.evaluate import distribution_distances


class MeanColour:
    """A stand-in feature network: the mean of each channel and its square (6 features)."""

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        m = pixels.flatten(2).mean(-1)  # (N, 3)
        return torch.cat([m, m.square()], dim=1)


def test_real_split_is_a_perfect_generators_distance():
    g = torch.Generator().manual_seed(0)
    perfect, floor = 0.0, 0.0
    for _ in range(30):  # generated and real from one distribution: a perfect generator
        generated, real = (torch.rand(n, 3, 4, 4, generator=g) * 2 - 1 for n in (128, 128))
        d = distribution_distances(generated, real, MeanColour())
        perfect += d["fd_features"]
        floor += d["fd_features_real_split"]
    assert 0.8 < floor / perfect < 1.25, (floor, perfect)  # the unscaled halves gave ~2
