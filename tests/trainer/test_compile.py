"""`model.compile=true`: the engine compiles each DiT block in place (regional torch.compile);
the compiled network computes what the eager one does."""
from __future__ import annotations

import copy

import torch

from tests.eval.eval_helpers import perturbed_weights, tiny_config
from trainer.parallel import compile_blocks
from trainer.stages import build_stage


def test_compiled_blocks_match_eager(tmp_path):
    cfg = tiny_config(tmp_path, "model.compile=true")
    stage = build_stage(cfg)
    net = stage.players["student"]
    net.load_state_dict(perturbed_weights(cfg, seed=0))  # off the zero-initialized output layers
    eager = copy.deepcopy(net)
    compile_blocks(net)
    assert all(block._compiled_call_impl is not None for block in net.blocks)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g)
    text = stage.text.encode(["a large red circle at the top left", "a small blue square"])
    with torch.no_grad():
        expected, got = eager(x, t, text), net(x, t, text)
    assert float(expected.abs().mean()) > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
