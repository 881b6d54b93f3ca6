"""DiT: patches, adaLN-Zero init, text mask, image = 1-frame video, positions, pipeline layers,
super-resolution, activation checkpointing, presets and analytic MACs."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import ModelConfig
from trainer.models.dit import DIT_PRESETS, DiT, TextEmbedding, build_dit, dit_preset, patchify, unpatchify
from trainer.models.layers import rope_table, sincos_table
from trainer.parallel import pipeline_inputs, pipeline_layers, prepare_for_training

TEXT_DIM, POOLED_DIM, TEXT_LEN = 16, 8, 6


def tiny(**overrides) -> DiT:
    cfg = ModelConfig(preset="DiT-Tiny/1", in_channels=4, **overrides)
    return prepare_for_training(build_dit(cfg, TEXT_DIM, POOLED_DIM), cfg)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its init (a fresh DiT is exactly zero, hiding everything)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def make_text(batch: int, real: list[int], length: int = TEXT_LEN, seed: int = 1) -> TextEmbedding:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, TEXT_DIM, generator=gen)
    mask = torch.arange(length)[None] < torch.tensor(real)[:, None]  # (B, L)
    return TextEmbedding(tokens, mask, torch.randn(batch, POOLED_DIM, generator=gen))


# -- patches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_patchify_roundtrip_image(patch):
    x = torch.randn(2, 3, 8, 12)
    tokens, grid = patchify(x, patch)
    assert grid == (1, 8 // patch, 12 // patch)
    assert tokens.shape == (2, grid[1] * grid[2], patch * patch * 3)
    assert torch.equal(unpatchify(tokens, grid, 3, patch)[:, :, 0], x)


@pytest.mark.parametrize("patch,temporal_patch", [(1, 1), (2, 1), (2, 2), (4, 3)])
def test_patchify_roundtrip_video(patch, temporal_patch):
    x = torch.randn(2, 3, 6, 8, 8)
    tokens, grid = patchify(x, patch, temporal_patch)
    assert grid == (6 // temporal_patch, 8 // patch, 8 // patch)
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], temporal_patch * patch * patch * 3)
    assert torch.equal(unpatchify(tokens, grid, 3, patch, temporal_patch), x)


def test_patch_token_holds_its_pixels():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)  # (B, C, H, W)
    tokens, _ = patchify(x, 2)
    # token 1 is row 0, col 1: pixels (0..1, 2..3), features ordered (p, p, C)
    expected = torch.stack([x[0, :, 0, 2], x[0, :, 0, 3], x[0, :, 1, 2], x[0, :, 1, 3]]).flatten()
    assert torch.equal(tokens[0, 1], expected)


def test_patchify_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="multiples of the patch"):
        patchify(torch.randn(1, 3, 5, 8, 8), 2, temporal_patch=2)


# -- adaLN-Zero ------------------------------------------------------------------------------


def test_fresh_dit_outputs_exact_zero_and_a_step_changes_it():
    torch.manual_seed(0)
    model = tiny(qk_norm=True)
    x, t, text = torch.randn(2, 4, 8, 8), torch.rand(2), make_text(2, [3, 6])
    out = model(x, t, text)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(out, torch.randn_like(out)).backward()
    opt.step()
    assert torch.count_nonzero(model(x, t, text)) > 0


def test_learn_sigma_doubles_output_channels():
    assert tiny(learn_sigma=True)(torch.randn(1, 4, 4, 4), torch.rand(1), make_text(1, [2])).shape == (1, 8, 4, 4)


# -- text conditioning ------------------------------------------------------------------------


def test_padding_tokens_do_not_change_output():
    model = randomize_(tiny(qk_norm=True))
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    text = make_text(2, [2, 4])
    base = model(x, t, text)
    # other values under the mask, and more padding positions: the same prediction
    noisy = text.tokens.clone()
    noisy[~text.mask] = 1e3 * torch.randn(int((~text.mask).sum()), TEXT_DIM)
    longer = TextEmbedding(
        torch.cat([noisy, torch.randn(2, 5, TEXT_DIM)], 1),
        torch.cat([text.mask, torch.zeros(2, 5, dtype=torch.bool)], 1),
        text.pooled,
    )
    assert torch.allclose(model(x, t, longer), base, atol=1e-5, rtol=1e-5)
    # a real token does change it
    unmasked = TextEmbedding(text.tokens, torch.ones_like(text.mask), text.pooled)
    assert not torch.allclose(model(x, t, unmasked), base, atol=1e-4)


def test_pooled_text_conditions_the_output():
    model = randomize_(tiny())
    x, t, text = torch.randn(1, 4, 4, 4), torch.rand(1), make_text(1, [3])
    other = TextEmbedding(text.tokens, text.mask, text.pooled + 1)
    assert not torch.allclose(model(x, t, text), model(x, t, other))


# -- images are 1-frame videos --------------------------------------------------------------


@pytest.mark.parametrize("attention", ["factorized", "full"])
@pytest.mark.parametrize("positions", ["sincos", "rope"])
def test_one_frame_video_equals_image_model(attention, positions):
    video = randomize_(tiny(video=True, attention=attention, positions=positions))
    image = tiny(video=False, attention=attention, positions=positions)
    result = image.load_state_dict(video.state_dict(), strict=False)
    assert result.missing_keys == []
    assert all(".temporal." in k for k in result.unexpected_keys)
    assert bool(result.unexpected_keys) == (attention == "factorized")
    x, t, text = torch.randn(2, 4, 8, 8), torch.rand(2), make_text(2, [3, 5])
    from_image = image(x, t, text)  # (B, C, H, W)
    as_clip = video(x[:, :, None], t, text)  # (B, C, 1, H, W)
    assert as_clip.shape == (2, 4, 1, 8, 8)
    assert torch.allclose(as_clip[:, :, 0], from_image, atol=1e-6, rtol=1e-6)
    assert torch.equal(video(x, t, text), as_clip[:, :, 0])  # a 4-D image into the video model


def test_image_in_video_model_with_temporal_patch():
    """An image, and a one-frame clip (the stills of joint image-video training: they stopped the
    run at patchify), is held for one temporal patch and comes back at its own shape."""
    model = randomize_(tiny(video=True, temporal_patch=2))
    x, t, text = torch.randn(2, 4, 8, 8), torch.rand(2), make_text(2, [3, 5])
    held = model(x[:, :, None].expand(-1, -1, 2, -1, -1), t, text)  # a still 2-frame clip
    assert torch.allclose(model(x, t, text), held.mean(2), atol=1e-6)
    one_frame = model(x[:, :, None], t, text)  # (B, C, 1, H, W)
    assert one_frame.shape == (2, 4, 1, 8, 8)
    assert torch.equal(one_frame[:, :, 0], model(x, t, text))


def gradient_order(model: DiT, x: torch.Tensor) -> list[str]:
    """The parameters of `model` in the order their gradients become ready in one backward
    (the order ZeRO-2 fills its reduce buckets in)."""
    names = {p: n for n, p in model.named_parameters()}
    order: list[str] = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: order.append(names[p])) for p in names]
    B = x.shape[0]
    model(x, torch.rand(B), make_text(B, [3] * B)).square().sum().backward()
    for hook in hooks:
        hook.remove()
    return order


@pytest.mark.parametrize("policy", ["none", "attention", "full"])
def test_an_image_batch_readies_the_gradients_in_a_clips_order(policy):
    """Joint image-video training: one data-parallel rank may hold images (the temporal attention
    idle) while another holds clips, and ZeRO-2 sums their gradients bucket by bucket in the
    order each rank readied them. An image readies every parameter, the idle temporal ones with
    0, in the order a clip does; its prediction is the one of the model without the tie."""
    model = randomize_(tiny(video=True, checkpoint_policy=policy))
    image, clip = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 3, 8, 8)
    assert gradient_order(model, image) == gradient_order(model, clip)
    model.zero_grad()
    model(image, torch.rand(2), make_text(2, [3, 3])).square().sum().backward()
    temporal = [p.grad for n, p in model.named_parameters() if ".temporal." in n]
    assert temporal and all(g is not None and not g.any() for g in temporal)
    plain = ModelConfig(preset="DiT-Tiny/1", in_channels=4, video=True)
    untied = build_dit(plain, TEXT_DIM, POOLED_DIM)
    untied.load_state_dict(model.state_dict())
    t, text = torch.rand(2), make_text(2, [3, 5])
    assert torch.equal(model(image, t, text), untied(image, t, text))


def test_image_model_rejects_video():
    with pytest.raises(ValueError, match="model.video"):
        tiny()(torch.randn(1, 4, 2, 4, 4), torch.rand(1), make_text(1, [2]))


@pytest.mark.parametrize("attention", ["factorized", "full"])
@pytest.mark.parametrize("temporal_patch", [1, 2])
def test_video_shapes_and_frames_interact(attention, temporal_patch):
    model = randomize_(tiny(video=True, attention=attention, temporal_patch=temporal_patch, positions="rope"))
    x, t, text = torch.randn(2, 4, 4, 8, 8), torch.rand(2), make_text(2, [3, 5])
    out = model(x, t, text)
    assert out.shape == x.shape
    changed = x.clone()
    changed[:, :, 0] += 1  # first frame only
    assert not torch.allclose(model(changed, t, text)[:, :, -1], out[:, :, -1])  # reaches the last frame


# -- positions extend to new sizes ----------------------------------------------------------


def test_sincos_and_rope_extend_to_larger_grids():
    cpu, f32 = torch.device("cpu"), torch.float32
    small = sincos_table((2, 4, 4), 32, cpu, f32).view(2, 4, 4, 32)
    large = sincos_table((3, 8, 6), 32, cpu, f32).view(3, 8, 6, 32)
    assert torch.allclose(large[:2, :4, :4], small)
    assert torch.count_nonzero(sincos_table((1, 4, 4), 32, cpu, f32) - small[0].reshape(16, 32)) == 0
    for small_rope, large_rope in zip(rope_table((2, 4, 4), "thw", 16, cpu, f32), rope_table((3, 8, 6), "thw", 16, cpu, f32)):
        assert torch.allclose(large_rope.view(3, 8, 6, 16)[:2, :4, :4], small_rope.view(2, 4, 4, 16))


def dit_2d_sincos_reference(dim: int, height: int, width: int) -> np.ndarray:
    """facebookresearch/DiT models.py get_2d_sincos_pos_embed, for a height x width grid."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))  # w goes first
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_image_positions_are_dits_2d_sincos_and_frame_zero_adds_nothing():
    ours = sincos_table((1, 4, 6), 32, torch.device("cpu"), torch.float64).numpy()
    assert np.allclose(ours, dit_2d_sincos_reference(32, 4, 6), atol=1e-6)
    clip = sincos_table((3, 4, 6), 32, torch.device("cpu"), torch.float64).view(3, 24, 32)
    assert np.allclose(clip[0].numpy(), ours) and not torch.allclose(clip[1], clip[0])


@pytest.mark.parametrize("positions", ["sincos", "rope"])
def test_dit_runs_at_a_new_resolution_and_frame_count(positions):
    model = randomize_(tiny(video=True, positions=positions))
    text = make_text(1, [3])
    for shape in [(1, 4, 2, 4, 4), (1, 4, 5, 12, 8)]:
        assert model(torch.randn(shape), torch.rand(1), text).shape == shape


# -- pipeline layers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,shape",
    [
        ({}, (2, 4, 8, 8)),
        ({"video": True, "positions": "rope"}, (2, 4, 3, 4, 4)),
        ({"video": True, "attention": "full", "temporal_patch": 2}, (2, 4, 4, 4, 4)),
        ({"video": True, "temporal_patch": 2}, (2, 4, 1, 4, 4)),  # a still, held for one temporal patch
        ({"video": True, "temporal_patch": 2}, (2, 4, 4, 4)),
        ({"superres": True, "guidance_embed": True}, (2, 4, 8, 8)),
    ],
)
def test_pipeline_layers_compose_to_forward(overrides, shape):
    model = randomize_(tiny(**overrides))
    x, t, text = torch.randn(shape), torch.rand(2), make_text(2, [3, 5])
    extra = {}
    if overrides.get("superres"):
        extra = {"lowres": torch.randn(2, 4, 4, 4), "aug_level": torch.rand(2), "guidance": torch.rand(2) * 4}
    expected = model(x, t, text, **extra)
    state = pipeline_inputs(model, x, t, text, **extra)
    layers = pipeline_layers(model)
    assert len(layers) == model.spec.preset.depth + 2
    for layer in layers[:-1]:
        assert isinstance(state, tuple) and all(s.is_floating_point() for s in state)
        state = layer(state)
    assert torch.equal(layers[-1](state), expected)


def test_pipeline_last_layer_gives_every_carried_tensor_a_gradient():
    """DeepSpeed's PipelineEngine sends back the grad of every float tensor a stage received."""
    model = randomize_(tiny())
    layers = pipeline_layers(model)
    state = pipeline_inputs(model, torch.randn(2, 4, 4, 4), torch.rand(2), make_text(2, [3, 5]))
    for layer in layers[:-1]:
        state = layer(state)
    received = tuple(s.detach().requires_grad_() for s in state)  # as a receiving stage does
    layers[-1](received).square().sum().backward()
    assert all(s.grad is not None for s in received)


def test_each_block_layer_owns_its_parameters():
    model = tiny()
    layers = pipeline_layers(model)
    ids = [{id(p) for p in layer.parameters()} for layer in layers]
    assert sum(len(s) for s in ids) == len({i for s in ids for i in s}) == len(list(model.parameters()))


# -- super-resolution and guidance ------------------------------------------------------------


def test_superres_image_and_temporal_superres_video():
    image = randomize_(tiny(superres=True))
    text = make_text(2, [3, 4])
    x, low, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4), torch.rand(2)
    out = image(x, t, text, lowres=low, aug_level=torch.full((2,), 0.3))
    assert out.shape == x.shape
    assert not torch.allclose(out, image(x, t, text, lowres=low, aug_level=torch.zeros(2)))
    assert not torch.allclose(out, image(x, t, text, lowres=low + 1, aug_level=torch.full((2,), 0.3)))
    with pytest.raises(ValueError, match="lowres"):
        image(x, t, text)
    video = randomize_(tiny(superres=True, video=True))
    xv = torch.randn(2, 4, 4, 8, 8)
    assert video(xv, t, text, lowres=torch.randn(2, 4, 2, 4, 4), aug_level=torch.rand(2)).shape == xv.shape


def test_guidance_embedding_conditions_the_output():
    model = randomize_(tiny(guidance_embed=True))
    x, t, text = torch.randn(1, 4, 4, 4), torch.rand(1), make_text(1, [3])
    assert not torch.allclose(model(x, t, text, guidance=torch.tensor([1.0])), model(x, t, text, guidance=torch.tensor([4.0])))
    with pytest.raises(ValueError, match="guidance"):
        model(x, t, text)


# -- activation checkpointing -----------------------------------------------------------------


@pytest.mark.parametrize("video,policy", [(False, "full"), (True, "full"), (True, "attention")])
def test_activation_checkpointing_gives_the_same_gradients(video, policy):
    plain = randomize_(tiny(video=video, positions="rope"))
    ckpt = tiny(video=video, positions="rope", checkpoint_policy=policy)
    ckpt.load_state_dict(plain.state_dict())
    shape = (2, 4, 3, 4, 4) if video else (2, 4, 8, 8)
    x, t, text = torch.randn(shape), torch.rand(2), make_text(2, [3, 5])
    grads = []
    for model in (plain, ckpt):
        xin = x.clone().requires_grad_()
        model(xin, t, text).square().mean().backward()
        grads.append([xin.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


# -- presets, parameters, MACs ----------------------------------------------------------------


def test_preset_registry():
    for name, (depth, width, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}.items():
        assert dit_preset(f"DiT-{name}/2") == DIT_PRESETS[f"DiT-{name}/2"]
        assert (dit_preset(f"DiT-{name}/2").depth, dit_preset(f"DiT-{name}/2").width, dit_preset(f"DiT-{name}/2").heads) == (depth, width, heads)
    assert {"DiT-T/2", "DiT-Tiny/1"} <= set(DIT_PRESETS)
    with pytest.raises(KeyError, match="DiT-XL/2"):
        dit_preset("DiT-XXL/2")


def test_dit_xl2_matches_published_parameters_and_macs():
    paper = ModelConfig(preset="DiT-XL/2", in_channels=4, learn_sigma=True, qk_norm=False)
    with torch.device("meta"):
        class_conditional = build_dit(paper, text_dim=0, pooled_dim=1000)  # one-hot labels: a Linear = the table
        text_conditional = build_dit(paper, text_dim=384, pooled_dim=384)
    params = class_conditional.count_parameters()
    assert abs(params - 675e6) / 675e6 < 0.005
    assert abs(class_conditional.macs((1, 4, 32, 32), 0) - 118.6e9) / 118.6e9 < 0.005
    assert text_conditional.count_parameters() > params
    assert text_conditional.macs((1, 4, 32, 32), 32) > class_conditional.macs((1, 4, 32, 32), 0)


@pytest.mark.parametrize(
    "overrides,shape",
    [
        ({}, (2, 4, 8, 8)),
        ({"video": True, "temporal_patch": 2}, (2, 4, 4, 8, 8)),
        ({"video": True, "temporal_patch": 2}, (2, 4, 1, 8, 8)),  # a still, held for one temporal patch
        ({"video": True, "attention": "full"}, (1, 4, 3, 8, 8)),
        ({"superres": True, "guidance_embed": True, "positions": "rope"}, (2, 4, 8, 8)),
    ],
)
def test_analytic_macs_equal_counted_matmuls(overrides, shape):
    model = tiny(**overrides)
    B = shape[0]
    extra = {}
    if overrides.get("superres"):
        extra = {"lowres": torch.randn(*shape[:-2], 4, 4), "aug_level": torch.rand(B), "guidance": torch.rand(B)}
    # the math backend runs attention as matmuls, which FlopCounterMode counts (2 FLOPs per MAC)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(shape), torch.rand(B), make_text(B, [TEXT_LEN] * B), **extra)
    assert model.macs(shape, TEXT_LEN) == counter.get_total_flops() // 2


def test_explicit_preset_overrides_the_name():
    preset = replace(dit_preset("DiT-S/2"), depth=2)
    assert len(build_dit(ModelConfig(preset="DiT-S/2"), 8, 8, preset=preset).blocks) == 2


def test_qk_norm_keeps_the_compute_dtype_and_the_fused_kernel():
    """Under bf16 autocast the projections give the qk-norm bf16 input: it must stay bf16 (the
    fused rms_norm kernel; a float32 weight sends torch to the composite, which warns) and agree
    with the float32 norm to bf16 precision; in float32 it is nn.RMSNorm exactly."""
    import warnings

    from trainer.models.layers import HeadRMSNorm

    torch.manual_seed(0)
    norm, reference = HeadRMSNorm(72, eps=1e-6), torch.nn.RMSNorm(72, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    reference.load_state_dict(norm.state_dict(), strict=True)
    x = torch.randn(2, 16, 4, 72)
    assert torch.equal(norm(x), reference(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32


# -- bf16 at the model boundary -----------------------------------------------------------------


def test_bf16_patch_embedding_is_the_float32_one_rounded_once():
    """Under bf16 autocast the patch embedding plus the sin-cos positions is their float32 sum
    rounded once, so its error against the float32 forward stays within bf16's unit roundoff
    2^-9 (1.7e-3 here). A bf16 linear output plus a bf16 position table rounds three times:
    2.8e-3 here."""
    model = randomize_(tiny())
    x, t, text = torch.randn(2, 4, 8, 8), torch.rand(2), make_text(2, [3, 6])
    reference = model.embed(x, t, text).h  # (B, N, D) float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.embed(x, t, text).h
    error = float((h.double() - reference.double()).norm() / reference.double().norm())
    assert h.dtype == torch.bfloat16 and error <= 2**-9, error
    assert torch.equal(h, reference.bfloat16())


def test_timestep_stays_float32_under_a_bf16_input():
    """The conditioning does not depend on x's dtype: t rounded to bf16 first (a multiple of
    2^-8 on [0.5, 1): 0.997 and 0.995 are one value) shifts c by 27% of its norm here."""
    model = randomize_(tiny())
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([0.997, 0.995]), make_text(2, [3, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = model.embed(x, t, text).c
        c_bf16_input = model.embed(x.bfloat16(), t, text).c
    assert torch.equal(c_bf16_input, c)
