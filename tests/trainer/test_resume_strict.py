"""A resume loads every tensor of the network from the checkpoint's whole-tensor files and
nothing less or more: a checkpoint of another architecture (here qk_norm on, resumed with it
off: 2 norms per block dropped) is an error naming the tensors, never a partial load."""
from __future__ import annotations

import pytest
import torch

from tests.models.test_dit_model import tiny
from trainer.checkpoint import RankState
from trainer.config import EMAConfig
from trainer.elastic import MOMENTS, ElasticError, Gather, check_universal_names
from trainer.ema import EMA
from trainer.train_state import EMAState, SavedState


def universal_tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a universal file holds of `net`: its fp32 masters and moments by weight name."""
    return {f"{kind}/{n}": p.detach().float() for kind in ("fp32", *MOMENTS) for n, p in net.named_parameters()}


def test_the_universal_state_of_another_model_is_refused_naming_its_extra_tensors():
    saved, resumed = universal_tensors(tiny(qk_norm=True)), tiny(qk_norm=False)
    params = list(resumed.named_parameters())
    check_universal_names(params, universal_tensors(resumed))
    with pytest.raises(ElasticError, match=r"holds \d+ tensors the model does not have, e\.g\. \['exp_avg/blocks"):
        check_universal_names(params, saved)
    with pytest.raises(ElasticError, match=r"lacks \d+ tensors of the model"):
        check_universal_names(list(tiny(qk_norm=True).named_parameters()), universal_tensors(resumed))


def test_the_ema_of_another_model_is_refused_naming_its_extra_tensors():
    trained, resumed = tiny(qk_norm=True), tiny(qk_norm=False)
    saved = EMA(trained, EMAConfig()).full_state_dict(trained)
    ema = EMA(resumed, EMAConfig())
    with pytest.raises(KeyError, match=r"holds \d+ tensors the model does not have, e\.g\. \['blocks\.0\.attn"):
        ema.load_full_state_dict(resumed, saved, num_updates=3)
    ema.load_full_state_dict(resumed, ema.full_state_dict(resumed), num_updates=3)
    assert ema.num_updates == 3


def test_an_ema_turned_on_at_resume_starts_at_the_resumed_weights(tmp_path, capsys):
    """ema.enabled false -> true (--allow-config-change): the checkpoint has no ema.safetensors;
    the average begins at the weights the resume loaded instead of failing on the missing file."""
    net = tiny()
    ema = EMA(net, EMAConfig())
    ema.num_updates = 5
    with torch.no_grad():  # the resumed weights, loaded after the EMA was made
        for p in net.parameters():
            p.add_(1.0)
    saved = SavedState(tmp_path, RankState(meta={}, tensors={}))
    EMAState(ema, net, Gather(lambda local: local)).load_state_dict(saved)
    assert ema.num_updates == 0
    assert all(torch.equal(ema.shadow[n], p.float()) for n, p in net.named_parameters())
    assert "the EMA starts at the resumed weights" in capsys.readouterr().out


def test_a_resume_that_changes_the_network_is_refused_before_launch(tmp_path):
    """--allow-config-change lets a resume change settings, not the network: model.qk_norm
    turned off on the checkpoint's own layout died in every rank with load_state_dict's raw
    RuntimeError (exit 1, which a launcher restarts); it is refused as a checkpoint error
    before any process starts, as on another layout. A change that keeps the weights resumes."""
    from launch.job import resume_config
    from tests.eval.eval_helpers import tiny_config, write_checkpoint

    write_checkpoint(tiny_config(tmp_path))
    allowed = "checkpoint.allow_config_change=true"
    _, refusal, _ = resume_config(tiny_config(tmp_path, allowed, "model.qk_norm=false"), 1)
    assert refusal is not None and "model.qk_norm changed" in refusal and "q_norm" in refusal
    assert resume_config(tiny_config(tmp_path, allowed, "model.compile=true", "optim.lr=1e-3"), 1)[1] is None
