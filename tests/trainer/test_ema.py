"""The EMA's grouped update against the formula it implements, parameter by parameter."""
import pytest
import torch

from trainer.config import EMAConfig
from trainer.ema import EMA, _groups


def _net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)).to(dtype)


@pytest.mark.parametrize("group_elements", [1 << 26, 20])  # one group; several (and a tensor alone)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_follows_the_formula_and_a_skipped_step_only_counts(dtype, group_elements, monkeypatch):
    monkeypatch.setattr("trainer.ema.UPDATE_GROUP_ELEMENTS", group_elements)
    net = _net(dtype)
    ema = EMA(net, EMAConfig(decay=0.9, warmup_steps=3))
    assert len(ema._groups) == (1 if group_elements > 1000 else 6)  # sizes 128, 16, 16, 16, 48, 3
    expected = {n: p.detach().double() for n, p in net.named_parameters()}
    lerped = {n: p.detach().float().clone() for n, p in net.named_parameters()}  # a lerp per parameter
    skips = [False, torch.tensor(0.0), torch.tensor(1.0), True, torch.tensor(0.0), False]
    for skipped in skips:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        d = ema.decay()
        ema.update(net, skipped)
        if not (skipped is True or (isinstance(skipped, torch.Tensor) and skipped.item() == 1.0)):
            for n, p in net.named_parameters():
                expected[n] = d * expected[n] + (1 - d) * p.detach().double()
                lerped[n].lerp_(p.detach().float(), 1 - d)
    assert ema.num_updates == len(skips)
    for n, shadow in ema.shadow.items():
        assert shadow.dtype == torch.float32 and shadow.shape == expected[n].shape
        torch.testing.assert_close(shadow.double(), expected[n], rtol=1e-6, atol=1e-6)
        assert torch.equal(shadow, lerped[n]), n  # the same numbers, bit for bit


def test_the_warm_up_counts_the_coming_update_as_torch_ema_does():
    """The n-th update (from 1) of the warm-up decays by min(decay, (1 + n) / (10 + n)), as in
    torch-ema and LDM's LitEma, which the EMA cites: 2/11 at the first, where it had 1/10 (one
    update behind), then the configured decay once the warm-up's updates are done."""
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.zero_()
    ema = EMA(net, EMAConfig(decay=0.5, warmup_steps=2))
    decays = []
    for p in (1.0, 2.0, 3.0, 4.0):
        before = float(ema.shadow["weight"])
        with torch.no_grad():
            net.weight.fill_(p)
        ema.update(net)
        decays.append((p - float(ema.shadow["weight"])) / (p - before))  # s' = d s + (1 - d) p
    assert decays == pytest.approx([2 / 11, 3 / 12, 0.5, 0.5], rel=1e-6)


def test_groups_bound_the_elements_joined_at_once():
    groups = list(_groups([3, 4, 10, 1, 1, 2], 5))
    assert groups == [(slice(0, 1), slice(0, 3)), (slice(1, 2), slice(3, 7)), (slice(2, 3), slice(7, 17)),
                      (slice(3, 6), slice(17, 21))]  # the 10-element tensor alone


def test_a_restored_average_goes_on_from_the_checkpoint():
    net = _net(torch.bfloat16)
    ema = EMA(net, EMAConfig(decay=0.5))
    saved = {n: torch.full_like(t, 2.0) for n, t in ema.full_state_dict(net).items()}
    ema.load_full_state_dict(net, saved, num_updates=7)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(4.0)
    ema.update(net)
    assert all(torch.equal(s, torch.full_like(s, 3.0)) for s in ema.shadow.values())


def test_update_of_another_module_is_refused():
    ema = EMA(_net(torch.float32), EMAConfig())
    with pytest.raises(ValueError, match="another module"):
        ema.update(_net(torch.float32))


def test_an_update_is_a_few_kernels_whatever_the_number_of_parameters():
    """One lerp (after one join and one cast) per group, not a cast and a lerp per parameter:
    DiT-XL/2's 628 parameters were 1,256 kernel launches a step."""
    from torch.profiler import ProfilerActivity, profile

    net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(40)]).to(torch.bfloat16)  # 80 parameters
    ema = EMA(net, EMAConfig())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ema.update(net, torch.tensor(0.0))
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::lerp_") == 1 and counts.get("aten::cat") == 1
