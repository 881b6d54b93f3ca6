"""The closed-form (MMSE) denoiser of a finite set: its limits, a brute-force check, stability."""
import pytest
import torch

from trainer.config import DiffusionConfig
from trainer.diffusion import ClosedFormDenoiser, make_schedule, nearest_distance, to_x0

SCHEDULE = make_schedule(DiffusionConfig())
DATA = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def _x_t(t: torch.Tensor, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(DATA), (t.shape[0],), generator=g)
    alpha, sigma = SCHEDULE.alpha_sigma(t)
    eps = torch.randn(t.shape[0], *DATA.shape[1:], generator=g)
    return alpha.view(-1, 1, 1, 1) * DATA[idx] * scale + sigma.view(-1, 1, 1, 1) * eps


def test_limits_mean_at_pure_noise_and_nearest_point_at_low_noise():
    denoiser = ClosedFormDenoiser(DATA, SCHEDULE)
    t1 = torch.ones(4)
    assert torch.allclose(denoiser.denoise(_x_t(t1), t1), DATA.mean(0).expand(4, -1, -1, -1), atol=1e-6)
    t0 = torch.full((4,), 1e-3)
    x_t = _x_t(t0)
    x0 = denoiser.denoise(x_t, t0)
    assert nearest_distance(x0, DATA).max().item() < 1e-6
    nearest = torch.cdist(x_t.flatten(1), DATA.flatten(1)).argmin(dim=1)
    assert torch.equal(x0, DATA[nearest])


def test_matches_a_brute_force_posterior_mean():
    t = torch.tensor([0.2, 0.5, 0.7, 0.9])
    x_t = _x_t(t, seed=2)
    alpha, sigma = SCHEDULE.alpha_sigma(t.double())
    diff = x_t.double()[:, None] - alpha.view(-1, 1, 1, 1, 1) * DATA.double()[None]  # (B, N, C, H, W)
    w = torch.softmax(-diff.square().sum(dim=(2, 3, 4)) / (2 * sigma.view(-1, 1) ** 2), dim=1)  # (B, N)
    want = torch.einsum("bn,nchw->bchw", w, DATA.double())
    assert w.max(dim=1).values.min() < 0.99  # a real mixture, not the nearest point
    assert torch.allclose(ClosedFormDenoiser(DATA, SCHEDULE).denoise(x_t, t).double(), want, atol=1e-5)


@pytest.mark.parametrize("prediction", ["v", "x0", "eps"])
def test_prediction_kinds_are_consistent_and_finite_at_extremes(prediction):
    schedule = make_schedule(DiffusionConfig(zero_terminal_snr=prediction != "eps"))
    denoiser = ClosedFormDenoiser(DATA * 100, schedule, prediction)  # large values: stable logits
    t = torch.tensor([1e-6, 1e-3, 0.5, 1.0 if prediction != "eps" else 0.999])
    x_t = _x_t(t, seed=3, scale=100)
    pred = denoiser(x_t, t)
    assert bool(torch.isfinite(pred).all())
    alpha, sigma = schedule.alpha_sigma(t)
    assert torch.allclose(to_x0(pred, x_t, alpha, sigma, prediction), denoiser.denoise(x_t, t), atol=1e-2)
