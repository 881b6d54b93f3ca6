"""Beta tables, zero terminal SNR, the continuous-time view and the SNR shift."""
import math

import pytest
import torch

from trainer.config import DiffusionConfig
from trainer.diffusion import (
    NoiseSchedule,
    add_noise,
    alphas_cumprod,
    cosine_betas,
    linear_betas,
    make_schedule,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
)


def test_scaled_linear_terminal_alpha_and_zero_snr_rescale():
    betas = scaled_linear_betas(1000, 0.00085, 0.012)  # Stable Diffusion
    abar = alphas_cumprod(betas)
    assert abar[-1].sqrt().item() == pytest.approx(0.068265, abs=1e-5)
    rescaled = alphas_cumprod(rescale_zero_terminal_snr(betas))
    assert rescaled[-1].item() == 0.0
    assert rescaled[0].item() == pytest.approx(abar[0].item(), abs=1e-7)
    assert bool((rescaled[1:] < rescaled[:-1]).all())


def test_linear_and_cosine_betas():
    betas = linear_betas(1000, 1e-4, 0.02)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    cos = cosine_betas(1000)
    assert bool((cos > 0).all()) and cos.max().item() <= 0.999
    # Nichol & Dhariwal: alpha_bar(t) ~ cos^2 shape, about 1/2 at the middle of the schedule
    assert alphas_cumprod(cos)[499].item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("zero_snr", [True, False])
def test_continuous_view_is_finite_monotone_and_variance_preserving(zero_snr):
    schedule = make_schedule(DiffusionConfig(zero_terminal_snr=zero_snr))
    t = torch.linspace(0, 1, 4001, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    assert bool(torch.isfinite(alpha).all() and torch.isfinite(sigma).all())
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(t), atol=1e-12)
    assert bool((alpha[1:] <= alpha[:-1]).all())
    assert (alpha[0].item(), sigma[0].item()) == (1.0, 0.0)
    assert (alpha[-1].item() == 0.0) == zero_snr
    lam = schedule.log_snr(t)
    assert lam[0].item() == math.inf and not bool(lam.isnan().any())
    assert (lam[-1].item() == -math.inf) == zero_snr


def test_grid_points_hit_the_table_and_log_snr_is_linear_between_them():
    schedule = make_schedule(DiffusionConfig())
    i = torch.tensor([0, 1, 10, 500, 998, 999])
    alpha, _ = schedule.alpha_sigma(schedule.discrete_t(i).double())
    assert torch.allclose(alpha**2, schedule.alphas_cumprod[i], rtol=1e-9, atol=0)
    assert torch.equal(schedule.t_to_index(schedule.discrete_t(i)), i)
    lam = schedule.log_snr(torch.tensor([201.0, 201.5, 202.0], dtype=torch.float64) / 1000)
    assert lam[1].item() == pytest.approx((lam[0].item() + lam[2].item()) / 2, abs=1e-9)


def test_resolution_shift_lowers_log_snr_by_2_log_2_everywhere_inside():
    base = make_schedule(DiffusionConfig(shift_base_resolution=64), resolution=64)
    double = make_schedule(DiffusionConfig(shift_base_resolution=64), resolution=128)
    t = torch.cat([torch.tensor([1e-4, 5e-4, 0.9991, 0.9999]), torch.rand(64)]).double()  # end segments too
    diff = double.log_snr(t) - base.log_snr(t)
    assert torch.allclose(diff, torch.full_like(t, -2 * math.log(2)), atol=1e-9)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.equal(double.alpha_sigma(ends)[0], torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_frame_shift_and_missing_size_errors():
    cfg = DiffusionConfig(shift_base_frames=4)
    t = torch.rand(16).double()
    diff = make_schedule(cfg, frames=16).log_snr(t) - make_schedule(cfg, frames=4).log_snr(t)
    assert torch.allclose(diff, torch.full_like(t, -math.log(4)), atol=1e-9)
    with pytest.raises(ValueError, match="frames="):
        make_schedule(cfg)
    with pytest.raises(ValueError, match="resolution="):
        make_schedule(DiffusionConfig(shift_base_resolution=256))


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="non-increasing"):
        NoiseSchedule(torch.tensor([0.5, 0.9]))


def test_add_noise_broadcasts_per_sample():
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    alpha, sigma = torch.tensor([1.0, 0.6, 0.0]), torch.tensor([0.0, 0.8, 1.0])
    x_t = add_noise(x0, eps, alpha, sigma)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    assert torch.allclose(x_t[1], 0.6 * x0[1] + 0.8 * eps[1])
