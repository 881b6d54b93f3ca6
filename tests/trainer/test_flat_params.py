"""`model.flat_params=true`: each DiT block's trainable parameters as one flat parameter. The
network computes and learns exactly what the plain one does, and everything written by weight
name (EMA file, universal optimizer state) is the plain run's, bit for bit."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file

from launch.bench_gpu_resume import seed_resume_dir
from tests.models.test_dit_model import POOLED_DIM, TEXT_DIM, make_text, randomize_, tiny
from tests.trainer.harness import assert_ok, base, ema_weights, latest_dir, losses, run_train, same_tensors
from trainer.config import ConfigError, ModelConfig, load_config
from trainer.flat_params import FLAT, expand, flatten_parameters, joined, weight_names
from trainer.models.dit import build_dit
from trainer.parallel import prepare_for_training

DEMO = "configs/demo.yaml"


def flat_copy(net):
    out = copy.deepcopy(net)
    for block in out.blocks:
        flatten_parameters(block)
    return out


def test_flat_blocks_compute_and_differentiate_as_the_plain_ones():
    torch.manual_seed(0)
    plain = randomize_(tiny(video=True, attention="factorized", checkpoint_policy="attention"))
    flat = flat_copy(plain)
    assert len(list(flat.parameters())) < len(list(plain.parameters()))
    assert all(not block.attn.qkv._parameters for block in flat.blocks)  # the weights moved out
    x, t = torch.randn(2, 4, 3, 8, 8), torch.rand(2)
    outs = []
    for net in (plain, flat):
        out = net(x, t, make_text(2, [6, 3]))
        out.square().mean().backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in flat.named_parameters():  # the flat gradient holds each weight's, bit for bit
        for weight, grad in expand(name, p, p.grad):
            assert torch.equal(grad, grads[weight]), weight
    assert sorted(w for n, p in flat.named_parameters() for w in weight_names(n, p)) == sorted(grads)


def test_compiled_flat_blocks_share_their_graphs_and_learn_as_the_compiled_plain_ones():
    """`model.compile` with flat blocks: dynamo traces the hook's split and the block's body once
    for all blocks, as it traces one body for plain blocks (a graph per block would pass dynamo's
    recompile limit of 8 at DiT-XL/2's 28 blocks and leave the rest eager); and the compiled
    flat network computes and differentiates as the compiled plain one, bit for bit."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    cfg = ModelConfig(preset="DiT-T/2", in_channels=4, checkpoint_policy="attention")
    plain = randomize_(prepare_for_training(build_dit(cfg, TEXT_DIM, POOLED_DIM), cfg))
    flat = flat_copy(plain)
    x, t, text = torch.randn(2, 4, 8, 8), torch.rand(2), make_text(2, [6, 3])
    graphs, outs = [], []
    torch._dynamo.reset()  # no graph compiled by another test for the same block code
    try:
        for net in (plain, flat):
            counter = CompileCounterWithBackend("aot_eager")
            for block in net.blocks:
                block.compile(backend=counter)
            out = net(x, t, text)
            out.square().mean().backward()
            graphs.append(counter.frame_count)
            outs.append(out)
    finally:
        torch._dynamo.reset()
    assert len(plain.blocks) == 4 and graphs[0] == 1 and graphs[1] <= 2, graphs
    assert torch.equal(outs[0], outs[1])
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in flat.named_parameters():
        for weight, grad in expand(name, p, p.grad):
            assert torch.equal(grad, grads[weight]), weight


def test_the_views_follow_the_flat_parameter_when_its_data_moves():
    torch.manual_seed(0)
    flat = flat_copy(randomize_(tiny()))
    block = flat.blocks[0]
    x, t, text = torch.randn(1, 4, 8, 8), torch.rand(1), make_text(1, [4])
    before = flat(x, t, text)
    with torch.no_grad():
        getattr(block, FLAT).data = torch.zeros_like(getattr(block, FLAT))  # as DeepSpeed re-points .data
    after = flat(x, t, text)
    assert not torch.equal(before, after)
    assert float(block.attn.qkv.weight.detach().abs().sum()) == 0.0  # this forward's view of the new data


def test_expand_and_joined_are_inverse_and_strict():
    flat = flat_copy(randomize_(tiny()))
    name, p = next((n, p) for n, p in flat.named_parameters() if n.endswith(FLAT))
    pieces = dict(expand(name, p, p.detach()))
    assert all(k.startswith(name[: -len(FLAT)]) and not k.endswith(FLAT) for k in pieces)
    assert torch.equal(joined(name, p, pieces), p.detach())
    first = next(iter(pieces))
    with pytest.raises(KeyError, match=first):
        joined(name, p, {k: v for k, v in pieces.items() if k != first})
    with pytest.raises(ValueError, match=first):
        joined(name, p, {**pieces, first: pieces[first].reshape(-1)[:-1]})


@pytest.mark.parametrize("overrides", [["deepspeed.zero_stage=3"],
                                       ["deepspeed.pipeline_stages=2", "deepspeed.zero_stage=1"],
                                       ["stage.kind=autoencoder", "model.autoencoder.kind=kl"]])
def test_unsupported_combinations_are_refused_by_key(overrides):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["model.flat_params=true", *overrides])
    assert err.value.key == "model.flat_params"


@pytest.mark.slow
def test_two_ranks_train_save_and_resume_as_the_plain_model(shapes_shards, tmp_path):
    """bf16, ZeRO-2, 2 ranks, 8 steps: the flat run's losses, EMA file and universal optimizer
    state are the plain run's exactly; it resumes bit-exactly; and elastic resumes onto ZeRO-1
    and ZeRO-0 (which re-partition the universal state by weight name) continue it."""
    common = ("deepspeed.precision=bf16", "deepspeed.zero_stage=2", "optim.lr=2e-3", "log.sample_every=0",
              "checkpoint.every=4")
    flat = (*common, "model.flat_params=true")
    plain_dir, flat_dir, half_dir, elastic_dir = (tmp_path / n for n in ("plain", "flat", "half", "elastic"))
    assert_ok(run_train(2, base(shapes_shards, plain_dir, "stage.steps=8", *common)))
    assert_ok(run_train(2, base(shapes_shards, flat_dir, "stage.steps=8", *flat)))
    assert losses(flat_dir) == losses(plain_dir) and len(losses(flat_dir)) == 8
    assert same_tensors(ema_weights(flat_dir), ema_weights(plain_dir))
    universal = [load_file(str(latest_dir(d) / "universal_student.safetensors")) for d in (flat_dir, plain_dir)]
    assert same_tensors(*universal)

    seed_resume_dir(flat_dir, half_dir, 4)  # the flat run's step-4 checkpoint, as the latest of a new run
    shutil.copytree(half_dir, elastic_dir)
    proc = run_train(2, base(shapes_shards, half_dir, "stage.steps=8", *flat))
    assert_ok(proc)
    assert "at step 4" in proc.stdout
    assert losses(half_dir) == {s: v for s, v in losses(flat_dir).items() if s > 4} and len(losses(half_dir)) == 4
    assert same_tensors(ema_weights(half_dir), ema_weights(flat_dir))

    for stage in (1, 0):  # DeepSpeed's ZeRO-1/2 optimizer sets fragments; without ZeRO the optimizer's own state
        out = tmp_path / f"elastic_zero{stage}"
        shutil.copytree(elastic_dir, out)
        elastic = tuple(o.replace("zero_stage=2", f"zero_stage={stage}") for o in flat)
        assert_ok(run_train(2, base(shapes_shards, out, "stage.steps=8", *elastic)))
        assert losses(out)[5] == losses(flat_dir)[5]  # the restored weights, exactly
        assert abs(losses(out)[8] - losses(flat_dir)[8]) < 1e-3 * losses(flat_dir)[8]  # and Adam's moments
