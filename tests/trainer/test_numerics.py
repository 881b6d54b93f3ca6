"""Mixed precision inside a DeepSpeed engine.

On CUDA, DeepSpeed's engine forward runs the module under `torch.autocast(device, enabled=False)`
when an autocast encloses it and its own `torch_autocast` mode is off (deepspeed.runtime.
torch_autocast.autocast_if_enabled), so bf16 weights met fp32 inputs on the first GPU step. On
the CPU DeepSpeed does not see the enclosing autocast (`torch.is_autocast_enabled()` reads CUDA's
state), so the multi-process bf16 tests pass either way; these tests reproduce the engine's
context on the CPU.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from trainer.numerics import autocast, autocast_each, autocast_inside

CPU = torch.device("cpu")


@contextlib.contextmanager
def inside_deepspeed_engine():
    """The step's autocast, then the engine turning it off around the module's call."""
    with autocast(CPU, "bf16"), torch.autocast(CPU.type, enabled=False):
        yield


def bf16_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).to(torch.bfloat16)


def test_bf16_weights_fail_on_fp32_inputs_inside_the_engine_without_it():
    with inside_deepspeed_engine(), pytest.raises(RuntimeError, match="dtype"):
        bf16_module()(torch.randn(2, 8))


def test_the_module_call_enters_autocast_inside_the_engine_and_leaves_it():
    module, x = bf16_module(), torch.randn(2, 8)
    autocast_inside(module, CPU, "bf16")
    with inside_deepspeed_engine():
        out = module(x)
        assert not torch.is_autocast_enabled(CPU.type)  # the engine's setting again after the call
    with autocast(CPU, "bf16"):
        expected = bf16_module()(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_the_autocast_is_left_when_the_forward_raises():
    module = bf16_module()
    autocast_inside(module, CPU, "bf16")
    with torch.autocast(CPU.type, enabled=False):
        with pytest.raises(RuntimeError):
            module(torch.randn(2, 3))  # wrong width
        assert not torch.is_autocast_enabled(CPU.type)


def test_fp32_adds_no_hooks():
    module = bf16_module()
    autocast_inside(module, CPU, "fp32")
    assert not module._forward_pre_hooks and not module._forward_hooks


def test_micro_batches_are_built_under_autocast_and_leave_it_off_between_them():
    """The pipeline's micro-batch iterator (DeepSpeed pulls it between its own forward, backward
    and optimizer passes, and keeps it after the step): autocast while a micro-batch is built, off
    whenever the iterator is paused."""
    batches = autocast_each(lambda: (torch.is_autocast_enabled(CPU.type), torch.get_autocast_dtype(CPU.type)),
                            CPU, "bf16")
    for _ in range(2):
        assert next(batches) == (True, torch.bfloat16)
        assert not torch.is_autocast_enabled(CPU.type)
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
