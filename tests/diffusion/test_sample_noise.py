"""Per-sample draws (trainer/diffusion/noise.py): a sample's CFG mask, timestep and noise at a
step are the same whichever batch, micro-batch or position carries it."""
from __future__ import annotations

import pytest
import torch

from trainer.config import DiffusionConfig
from trainer.diffusion.noise import sample_generators, sample_seed
from trainer.diffusion.timesteps import sample_timesteps
from trainer.diffusion.utils import rand, randint, randn

CPU = torch.device("cpu")


def training_draws(ids: list[int], step: int, cfg: DiffusionConfig) -> dict[int, tuple]:
    """The draws of a pretraining step in its order (CFG mask, t, eps, an int), per sample id."""
    gens = sample_generators(0, step, ids, CPU)
    keep = rand((len(ids),), gens, CPU) >= 0.1  # (B,)
    t = sample_timesteps(cfg, len(ids), gens, CPU)  # (B,)
    eps = randn((len(ids), 3, 4, 4), gens, CPU)  # (B, 3, 4, 4)
    k = randint(7, (len(ids),), gens, CPU)  # (B,)
    return {i: (keep[n], t[n], eps[n], k[n]) for n, i in enumerate(ids)}


@pytest.mark.parametrize("sampler", ["uniform", "logit_normal"])
def test_a_sample_draws_the_same_numbers_in_any_batch(sampler):
    cfg = DiffusionConfig(timestep_sampler=sampler)
    whole = training_draws([5, 11, 2, 40], 7, cfg)  # one batch of 4
    split = {**training_draws([2, 5], 7, cfg), **training_draws([40, 11], 7, cfg)}  # two of 2, reordered
    for i, draws in whole.items():
        assert all(torch.equal(a, b) for a, b in zip(draws, split[i]))


def test_other_steps_and_samples_draw_other_numbers():
    cfg = DiffusionConfig()
    eps = {(step, i): d[2] for step in (7, 8) for i, d in training_draws([1, 2], step, cfg).items()}
    values = list(eps.values())
    assert all(not torch.equal(a, b) for n, a in enumerate(values) for b in values[n + 1:])
    assert len({sample_seed(0, s, i) for s in range(50) for i in range(50)}) == 2500


def test_one_generator_per_row_is_required():
    with pytest.raises(ValueError, match="one generator per row"):
        randn((3, 2), sample_generators(0, 1, [1, 2], CPU), CPU)


def test_a_single_generator_draws_as_before():
    g, h = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(randn((2, 5), g, CPU), torch.randn((2, 5), generator=h))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generators_and_draws_live_on_the_device():
    cuda = torch.device("cuda")
    gens = sample_generators(0, 1, [1, 2], cuda)
    assert all(g.device.type == "cuda" for g in gens)
    assert randn((2, 3), gens, cuda).device.type == "cuda"
