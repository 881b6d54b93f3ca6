"""Training timestep samplers and the sampling timestep spacings of Lin et al. 2023, Table 2."""
import pytest
import torch

from trainer.config import DiffusionConfig
from trainer.diffusion import (
    NoiseSchedule,
    make_schedule,
    sample_logit_normal,
    sample_timesteps,
    sample_uniform_discrete,
    sampling_timesteps,
)


def test_logit_normal_is_inside_the_interval_with_the_requested_logit_moments():
    t = sample_logit_normal(20000, mean=0.5, std=0.8, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and bool(((t > 0) & (t < 1)).all())
    logit = torch.logit(t.double())
    assert logit.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logit.std().item() == pytest.approx(0.8, abs=0.03)


def test_uniform_discrete_hits_every_grid_point_and_nothing_else():
    t = sample_uniform_discrete(4000, 10, generator=torch.Generator().manual_seed(0))
    j = t * 10
    assert torch.allclose(j, j.round(), atol=1e-5)
    assert set(j.round().long().tolist()) == set(range(1, 11))  # t = (i + 1) / T, i = 0..T-1


def test_samplers_are_deterministic_given_a_generator():
    cfg = DiffusionConfig(timestep_sampler="logit_normal")
    a = sample_timesteps(cfg, 8, torch.Generator().manual_seed(3))
    b = sample_timesteps(cfg, 8, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    u = sample_timesteps(DiffusionConfig(), 8, torch.Generator().manual_seed(3))
    assert torch.equal(u, sample_timesteps(DiffusionConfig(), 8, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize(
    "spacing,steps_1_based",
    [
        ("linspace", [1000, 889, 778, 667, 556, 445, 334, 223, 112, 1]),
        ("leading", [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
        ("trailing", [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]),
    ],
)
def test_spacings_match_lin_et_al_table_2(spacing, steps_1_based):
    ts = sampling_timesteps(make_schedule(DiffusionConfig()), 10, spacing)
    assert ts.shape == (11,) and ts[-1].item() == 0.0
    assert torch.equal((ts[:-1].double() * 1000).round().long(), torch.tensor(steps_1_based))
    assert bool((ts[1:] < ts[:-1]).all())


def test_trailing_starts_exactly_at_the_terminal_step_for_any_count():
    schedule = NoiseSchedule(torch.linspace(0.99, 0.0, 7, dtype=torch.float64))
    for n in range(1, 8):
        ts = sampling_timesteps(schedule, n, "trailing")
        assert ts[0].item() == 1.0 and len(set(ts.tolist())) == n + 1
    with pytest.raises(ValueError, match="num_steps"):
        sampling_timesteps(schedule, 8)
    with pytest.raises(ValueError, match="unknown spacing"):
        sampling_timesteps(schedule, 3, "uniform")
