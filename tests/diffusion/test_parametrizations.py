"""eps / x0 / v conversions: exact round trips, and the t where a conversion is undefined."""
import itertools

import pytest
import torch

from trainer.config import DiffusionConfig
from trainer.diffusion import PREDICTIONS, add_noise, convert, make_schedule, target, to_eps, to_v, to_x0


def _triple(t: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(t.shape[0], 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    alpha, sigma = make_schedule(DiffusionConfig()).alpha_sigma(t.double())
    return x0, eps, add_noise(x0, eps, alpha, sigma), alpha, sigma


@pytest.mark.parametrize("src,dst", list(itertools.product(PREDICTIONS, PREDICTIONS)))
def test_every_conversion_is_exact_at_random_t(src, dst):
    t = torch.rand(8, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01  # (0, 1), not the ends
    x0, eps, x_t, alpha, sigma = _triple(t)
    converted = convert(target(src, x0, eps, alpha, sigma), src, dst, x_t, alpha, sigma)
    assert torch.allclose(converted, target(dst, x0, eps, alpha, sigma), atol=1e-6)


def test_v_definition_and_inverse_formulas():
    t = torch.rand(8, dtype=torch.float64)
    x0, eps, x_t, alpha, sigma = _triple(t, seed=2)
    v = target("v", x0, eps, alpha, sigma)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    assert torch.allclose(v, a * eps - s * x0, atol=1e-12)
    assert torch.allclose(a * x_t - s * v, x0, atol=1e-12)
    assert torch.allclose(s * x_t + a * v, eps, atol=1e-12)


def test_defined_conversions_at_the_terminal_step_under_zero_snr():
    t = torch.ones(4)
    x0, eps, x_t, alpha, sigma = _triple(t, seed=3)
    assert alpha.eq(0).all() and torch.equal(x_t, eps)  # pure noise
    v = target("v", x0, eps, alpha, sigma)
    assert torch.allclose(to_x0(v, x_t, alpha, sigma, "v"), x0, atol=1e-6)
    assert torch.allclose(to_eps(v, x_t, alpha, sigma, "v"), eps, atol=1e-6)
    assert torch.allclose(to_v(x0, x_t, alpha, sigma, "x0"), v, atol=1e-6)
    assert torch.allclose(to_eps(x0, x_t, alpha, sigma, "x0"), eps, atol=1e-6)
    with pytest.raises(ValueError, match="divides by alpha"):
        to_x0(eps, x_t, alpha, sigma, "eps")
    with pytest.raises(ValueError, match="divides by alpha"):
        to_v(eps, x_t, alpha, sigma, "eps")


def test_conversions_from_x0_are_refused_at_t0():
    x0, eps, x_t, alpha, sigma = _triple(torch.zeros(2), seed=4)
    assert torch.equal(x_t, x0)
    assert torch.allclose(to_x0(target("v", x0, eps, alpha, sigma), x_t, alpha, sigma, "v"), x0)
    with pytest.raises(ValueError, match="divides by sigma"):
        to_eps(x0, x_t, alpha, sigma, "x0")
    with pytest.raises(ValueError, match="divides by sigma"):
        convert(x0, "x0", "v", x_t, alpha, sigma)


def test_unknown_kind_and_low_precision_inputs():
    x0, eps, x_t, alpha, sigma = _triple(torch.full((2,), 0.5), seed=5)
    with pytest.raises(ValueError, match="unknown prediction"):
        target("score", x0, eps, alpha, sigma)
    v16 = target("v", x0, eps, alpha, sigma).bfloat16()
    assert to_x0(v16, x_t.bfloat16(), alpha.float(), sigma.float(), "v").dtype == torch.float32
