"""Loss weightings: finite at SNR 0 and infinity, the published formulas, and one meaning
across parametrizations."""
import itertools

import pytest
import torch

from trainer.config import DiffusionConfig
from trainer.diffusion import (
    PREDICTIONS,
    WEIGHTINGS,
    add_noise,
    convert,
    diffusion_loss,
    loss_weight,
    make_schedule,
    target,
)


def _batch(alpha: torch.Tensor, sigma: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(alpha.shape[0], 2, 4, 4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return x0, eps, add_noise(x0, eps, alpha, sigma)


@pytest.mark.parametrize("prediction,weighting", list(itertools.product(PREDICTIONS, WEIGHTINGS)))
def test_loss_is_finite_at_snr_zero_and_infinity(prediction, weighting):
    alpha, sigma = torch.tensor([0.0, 1.0, 0.6]), torch.tensor([1.0, 0.0, 0.8])  # SNR 0, inf, 0.5625
    x0, eps, x_t = _batch(alpha, sigma)
    pred = target(prediction, x0, eps, alpha, sigma) + 0.1 * torch.randn_like(x0)
    pred.requires_grad_(True)
    loss = diffusion_loss(pred, x0, eps, x_t, alpha, sigma, prediction, weighting, gamma=5.0)
    assert loss.shape == (3,) and bool(torch.isfinite(loss).all()) and bool((loss > 0).all())
    loss.sum().backward()
    assert bool(torch.isfinite(pred.grad).all())


def test_min_snr_weights_match_their_formula():
    schedule = make_schedule(DiffusionConfig())
    t = torch.tensor([0.05, 0.2, 0.5, 0.9], dtype=torch.float64)  # SNR on both sides of gamma
    alpha, sigma = schedule.alpha_sigma(t)
    snr = schedule.snr(t)
    gamma = 5.0
    assert snr.min() < gamma < snr.max()
    clipped = snr.clamp(max=gamma)
    expected = {"x0": clipped, "eps": clipped / snr, "v": clipped / (snr + 1)}
    for prediction, want in expected.items():
        got = loss_weight(alpha, sigma, prediction, "min_snr", gamma)
        assert torch.allclose(got.double(), want, rtol=1e-5), prediction
    trunc_v = loss_weight(alpha, sigma, "v", "trunc_snr")
    assert torch.allclose(trunc_v.double(), snr.clamp(min=1) / (snr + 1), rtol=1e-5)


def test_uniform_loss_is_plain_mse_in_the_prediction_space():
    alpha, sigma = torch.tensor([0.8, 0.6]), torch.tensor([0.6, 0.8])
    x0, eps, x_t = _batch(alpha, sigma, seed=1)
    pred = torch.randn_like(x0)
    want = (pred - target("v", x0, eps, alpha, sigma)).square().mean(dim=(1, 2, 3))
    assert torch.allclose(diffusion_loss(pred, x0, eps, x_t, alpha, sigma, "v"), want)
    perfect = target("v", x0, eps, alpha, sigma)
    assert diffusion_loss(perfect, x0, eps, x_t, alpha, sigma, "v").abs().max() < 1e-12


@pytest.mark.parametrize("weighting", ["min_snr", "trunc_snr"])
def test_a_weighting_means_the_same_for_every_parametrization(weighting):
    alpha, sigma = make_schedule(DiffusionConfig()).alpha_sigma(torch.tensor([0.1, 0.4, 0.7, 0.95]))
    x0, eps, x_t = _batch(alpha, sigma, seed=2)
    x0_hat = x0 + 0.3 * torch.randn_like(x0)  # one imperfect denoiser, expressed three ways
    preds = {kind: convert(x0_hat, "x0", kind, x_t, alpha, sigma) for kind in PREDICTIONS}
    losses = [diffusion_loss(preds[k], x0, eps, x_t, alpha, sigma, k, weighting) for k in PREDICTIONS]
    assert torch.allclose(losses[0], losses[1], rtol=1e-4) and torch.allclose(losses[0], losses[2], rtol=1e-4)


def test_bad_arguments_are_refused():
    alpha, sigma = torch.tensor([0.6]), torch.tensor([0.8])
    x0, eps, x_t = _batch(alpha, sigma)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        diffusion_loss(x0, x0, eps, x_t, alpha, sigma, "v", "p2")
    with pytest.raises(ValueError, match="same shape"):
        diffusion_loss(x0[:, :1], x0, eps, x_t, alpha, sigma, "v")
