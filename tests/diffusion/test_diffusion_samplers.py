"""Samplers driven by exact denoisers: the closed-form denoiser of a tiny training set (a
perfect sampler must reproduce training points) and the analytic denoiser of a Gaussian (the
probability-flow ODE has a known solution)."""
import pytest
import torch

from trainer.config import DiffusionConfig
from trainer.diffusion import (
    SAMPLERS,
    ClosedFormDenoiser,
    convert,
    ddim_step,
    ddim_x0_target,
    make_schedule,
    nearest_distance,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sampling_timesteps,
)

SCHEDULE = make_schedule(DiffusionConfig())  # scaled-linear, zero terminal SNR, v


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Hundreds of tiny matmuls: on a shared 2-core machine a multi-threaded BLAS waits ~20 ms
    per call for a descheduled worker. One thread here, restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
DATA = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # 8 training points


def _noise(batch: int = 6, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize(
    "name,steps", [("ddim", 50), ("euler", 50), ("dpmpp2m", 25), ("ddpm", 100)]
)
def test_sampling_the_closed_form_denoiser_memorizes(name, steps):
    ts = sampling_timesteps(SCHEDULE, steps, "trailing")
    assert ts[0].item() == 1.0  # starts from pure noise: alpha = 0
    kwargs = {"generator": torch.Generator().manual_seed(2)} if name == "ddpm" else {}
    out = SAMPLERS[name](ClosedFormDenoiser(DATA, SCHEDULE, "v"), _noise(), ts, SCHEDULE, "v", **kwargs)
    assert bool(torch.isfinite(out).all())
    assert nearest_distance(out, DATA).max().item() < 1e-3
    assert (out.flatten(1) - DATA.mean(0).flatten()).norm(dim=1).min().item() > 0.5  # not the mean


@pytest.mark.parametrize("prediction,zero_snr", [("x0", True), ("eps", False)])
def test_samplers_agree_across_parametrizations(prediction, zero_snr):
    schedule = make_schedule(DiffusionConfig(zero_terminal_snr=zero_snr, prediction=prediction))
    ts = sampling_timesteps(schedule, 20, "trailing")
    for sampler in (sample_ddim, sample_dpmpp_2m):
        out_v = sampler(ClosedFormDenoiser(DATA, schedule, "v"), _noise(), ts, schedule, "v")
        out_p = sampler(ClosedFormDenoiser(DATA, schedule, prediction), _noise(), ts, schedule, prediction)
        assert torch.allclose(out_v, out_p, atol=1e-4)


def test_eps_prediction_cannot_start_from_pure_noise():
    ts = sampling_timesteps(SCHEDULE, 5)
    with pytest.raises(ValueError, match="alpha"):
        sample_ddim(ClosedFormDenoiser(DATA, SCHEDULE, "eps"), _noise(), ts, SCHEDULE, "eps")


MU, STD = 0.3, 0.5  # data ~ N(MU, STD^2 I)


def _gaussian_v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact v of Gaussian data:
    E[x0 | x_t] = MU + alpha STD^2 (x_t - alpha MU) / (alpha^2 STD^2 + sigma^2)."""
    alpha, sigma = SCHEDULE.alpha_sigma(t)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    x0 = MU + a * STD**2 / (a**2 * STD**2 + s**2) * (x - a * MU)
    return convert(x0, "x0", "v", x, alpha, sigma)


def _flow_error(sampler, steps: int) -> float:
    """Max error at the last noisy time against the exact ODE state
    x_t = alpha MU + sqrt(alpha^2 STD^2 + sigma^2) z, which starts at x_1 = z."""
    z = _noise(64, seed=3, dtype=torch.float64)
    ts = sampling_timesteps(SCHEDULE, steps, "trailing")
    states = []
    sampler(_gaussian_v, z, ts, SCHEDULE, "v", callback=lambda info: states.append(info["x"]))
    alpha, sigma = SCHEDULE.alpha_sigma(ts[-2:-1].double())
    exact = alpha * MU + (alpha**2 * STD**2 + sigma**2).sqrt() * z
    return (states[-2] - exact).abs().max().item()


def test_ode_samplers_follow_the_exact_gaussian_flow():
    ddim = [_flow_error(sample_ddim, n) for n in (10, 20, 40)]
    euler = [_flow_error(sample_euler, n) for n in (10, 20, 40)]
    dpmpp = [_flow_error(sample_dpmpp_2m, n) for n in (10, 20, 40)]
    assert ddim[0] > ddim[1] > ddim[2] and ddim[2] < 0.1  # converges (first order)
    assert all(abs(e - d) < 1e-6 for e, d in zip(euler, ddim))  # Euler in flow coordinates = DDIM
    assert all(p < d / 4 for p, d in zip(dpmpp, ddim))  # second order is far closer
    assert max(dpmpp) < 0.03


def _seeded(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ddpm_equals_ddim_with_eta_one_and_is_seeded():
    """Two formulas for the same posterior q(x_s | x_t, x0_hat), driven by the same noise."""
    ts = sampling_timesteps(SCHEDULE, 10)
    ddpm = sample_ddpm(_gaussian_v, _noise(), ts, SCHEDULE, "v", generator=_seeded())
    ddim1 = sample_ddim(_gaussian_v, _noise(), ts, SCHEDULE, "v", eta=1.0, generator=_seeded())
    assert torch.allclose(ddpm, ddim1, atol=1e-5)
    assert torch.equal(ddpm, sample_ddpm(_gaussian_v, _noise(), ts, SCHEDULE, "v", generator=_seeded()))
    other = sample_ddpm(_gaussian_v, _noise(), ts, SCHEDULE, "v", generator=_seeded(6))
    assert (ddpm - other).abs().max() > 0.1  # the ancestral noise really is drawn
    ddim0 = sample_ddim(_gaussian_v, _noise(), ts, SCHEDULE, "v", eta=0.0)
    assert (ddpm - ddim0).abs().max() > 0.1


def test_ddim_step_and_its_inverse_with_per_sample_times():
    x0, eps = _noise(4, seed=7), _noise(4, seed=8)
    t = torch.tensor([1.0, 0.8, 0.5, 0.1])  # per sample, t = 1 included
    t_next = torch.tensor([0.75, 0.4, 0.25, 0.05])
    alpha, sigma = SCHEDULE.alpha_sigma(t)
    x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    x_next = ddim_step(x_t, x0, t, t_next, SCHEDULE, eps=eps)
    a_n, s_n = SCHEDULE.alpha_sigma(t_next)
    assert torch.allclose(x_next, a_n.view(-1, 1, 1, 1) * x0 + s_n.view(-1, 1, 1, 1) * eps, atol=1e-6)
    assert torch.allclose(ddim_x0_target(x_t, x_next, t, t_next, SCHEDULE), x0, atol=1e-4)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x_t, x0, t, t_next, SCHEDULE, eps=eps, eta=0.5)


def test_callback_sees_every_step_and_bad_grids_are_refused():
    seen = []
    ts = sampling_timesteps(SCHEDULE, 7)
    model = ClosedFormDenoiser(DATA, SCHEDULE)
    sample_euler(model, _noise(), ts, SCHEDULE, "v", callback=lambda info: seen.append(info["i"]))
    assert seen == list(range(7))
    with pytest.raises(ValueError, match="decreasing"):
        sample_euler(model, _noise(), ts.flip(0), SCHEDULE, "v")
