"""Classifier-free guidance: one batched forward per step, scale 1 is the conditional
prediction, and guidance rescale follows Lin et al. 2023, sec. 3.4."""
import pytest
import torch

from trainer.config import DiffusionConfig
from trainer.diffusion import apply_guidance, cfg_model, make_schedule, sample_ddim, sampling_timesteps


class CountingModel:
    """A real conditional "network": per-sample, depends on x, t and both conditioning entries."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        self.batches.append(x.shape[0])
        shift = cond["text"].sum(dim=(1, 2)) + 2 * cond["pooled"].sum(dim=1) + t  # (B,)
        return torch.tanh(x) * (1 + cond["pooled"][:, :1, None, None]) + shift.view(-1, 1, 1, 1)


def _inputs(batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, 2, 4, 4, generator=g), torch.rand(batch, generator=g)
    cond = {"text": torch.randn(batch, 5, 8, generator=g), "pooled": torch.randn(batch, 8, generator=g)}
    uncond = {"text": torch.zeros(batch, 5, 8), "pooled": torch.randn(batch, 8, generator=g)}
    return x, t, cond, uncond


def test_scale_one_is_the_conditional_prediction_in_one_call():
    x, t, cond, uncond = _inputs()
    model = CountingModel()
    out = cfg_model(model, cond, uncond, scale=1.0, rescale=0.7)(x, t)
    assert torch.equal(out, CountingModel()(x, t, cond)) and model.batches == [3]
    c, u = CountingModel()(x, t, cond), CountingModel()(x, t, uncond)
    assert torch.allclose(apply_guidance(c, u, 1.0, rescale=0.7), c, atol=1e-6)  # batched-path formula


@pytest.mark.parametrize("scale,rescale", [(3.0, 0.0), (7.5, 0.7), (1.0 + 1e-6, 0.7)])
def test_batched_guidance_matches_separate_passes_in_one_forward(scale, rescale):
    x, t, cond, uncond = _inputs(seed=1)
    model = CountingModel()
    out = cfg_model(model, cond, uncond, scale, rescale)(x, t)
    assert model.batches == [6]  # [cond; uncond] in ONE forward
    c, u = CountingModel()(x, t, cond), CountingModel()(x, t, uncond)
    assert torch.allclose(out, apply_guidance(c, u, scale, rescale), atol=1e-5)
    if scale < 1.01:
        assert torch.allclose(out, c, atol=1e-4)


def test_guidance_rescale_formula_on_random_tensors():
    g = torch.Generator().manual_seed(2)
    c, u = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g) * 0.5
    s, phi = 5.0, 0.7
    guided = u + s * (c - u)
    ratio = c.std(dim=(1, 2, 3), keepdim=True) / guided.std(dim=(1, 2, 3), keepdim=True)
    want = phi * guided * ratio + (1 - phi) * guided
    got = apply_guidance(c, u, s, phi)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, guided, atol=1e-2)  # the rescale does something
    full = apply_guidance(c, u, s, 1.0)
    assert torch.allclose(full.flatten(1).std(dim=1), c.flatten(1).std(dim=1), atol=1e-5)


def test_one_model_call_per_sampling_step_and_shared_null_condition():
    schedule = make_schedule(DiffusionConfig())
    x, _, cond, _ = _inputs(seed=3)
    null = {"text": torch.zeros(1, 5, 8), "pooled": torch.zeros(1, 8)}  # one null embedding for all
    model = CountingModel()
    guided = cfg_model(model, cond, null, 4.0, 0.7)
    out = sample_ddim(guided, x, sampling_timesteps(schedule, 6), schedule, "v")
    assert model.batches == [6] * 6 and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="same keys"):
        cfg_model(model, cond, {"text": null["text"]}, 4.0)(x, torch.rand(3))


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_bf16_predictions_are_combined_in_float32(rescale):
    """A bf16 network's c and u are combined in float32, at the exact scale: the bf16 result
    (and a bf16 scale, 3.7 -> 3.703125) differs by up to a few percent of the target's spread.
    The per-sample scale of guided distillation (a float32 (B, 1, 1, 1) tensor) too."""
    from trainer.diffusion.distill import guided_model

    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(4, 3, 8, 8, generator=g).bfloat16(), torch.randn(4, 3, 8, 8, generator=g).bfloat16()
    want = apply_guidance(c.float(), u.float(), 3.7, rescale)
    got = apply_guidance(c, u, 3.7, rescale)
    assert got.dtype == torch.float32 and torch.equal(got, want)

    def bf16_net(x, t, cond):  # conditional rows give c, unconditional rows give u
        return torch.where(cond["text"].view(-1, 1, 1, 1) > 0, c.repeat(2, 1, 1, 1), u.repeat(2, 1, 1, 1))

    scale = torch.full((4,), 3.7)
    guided = guided_model(bf16_net, {"text": torch.ones(4)}, {"text": torch.zeros(4)}, scale, rescale)
    assert torch.equal(guided(torch.zeros(4, 3, 8, 8), torch.rand(4)), want)
