"""Layout independence of the stream: optimizer step k takes the same samples, with the same
crops and sample ids, whatever the number of ranks, micro-batches (grad_accum) and loader
workers that make up the global batch, also when the layout changes at a resume."""
from __future__ import annotations

import pytest
import torch
from tests.data.data_helpers import json_roundtrip, take

from data_pipeline.stream import build_stream

G = 8  # global batch: ranks x batch_size 2 x grad_accum
FULL_STEPS = 28 // G  # the session shards hold 28 samples; the epoch's last, partial step is not compared


def steps(streams: list, accum: int, count: int) -> list[dict[str, tuple[int, torch.Tensor]]]:
    """`count` optimizer steps of grad_accum `accum` batches per rank: per step, each sample's
    key -> (sample id, pixels)."""
    per_rank = [take(s, count * accum) for s in streams]
    out = []
    for k in range(count):
        step: dict[str, tuple[int, torch.Tensor]] = {}
        for batches in per_rank:
            for batch in batches[k * accum: (k + 1) * accum]:
                assert batch["valid"].all()
                for key, sample, image in zip(batch["__key__"], batch["__sample__"], batch["image"]):
                    assert key not in step
                    step[key] = (sample, image)
        assert len(step) == G
        out.append(step)
    return out


def layout(cfg, world: int, accum: int, workers: int, state=None) -> list:
    c = cfg(batch_size=G // (world * accum), num_workers=workers)
    return [build_stream(c, rank, world, state=state) for rank in range(world)]


def assert_same_steps(a: list[dict], b: list[dict]) -> None:
    assert [sorted(s) for s in a] == [sorted(s) for s in b]  # the same samples in each step
    for sa, sb in zip(a, b):
        for key, (sample, image) in sa.items():
            assert sb[key][0] == sample and torch.equal(sb[key][1], image)  # same id, same crop


@pytest.mark.parametrize("world, accum, workers", [(2, 2, 2), (1, 4, 3), (2, 1, 0), (1, 2, 1)])
def test_a_step_takes_the_same_samples_on_any_layout(cfg, world, accum, workers):
    reference = steps(layout(cfg, 4, 1, 0), 1, FULL_STEPS)
    assert_same_steps(steps(layout(cfg, world, accum, workers), accum, FULL_STEPS), reference)
    ids = {key: sample for step in reference for key, (sample, _) in step.items()}
    assert len(set(ids.values())) == len(ids)  # one id per sample


def test_a_resume_on_another_layout_continues_the_steps(cfg):
    """One step on 2 ranks x grad_accum 2 x 2 workers, the rest on 1 rank x grad_accum 4 x 1
    worker: step by step what 4 ranks read without a stop."""
    reference = steps(layout(cfg, 4, 1, 0), 1, FULL_STEPS)
    before = layout(cfg, 2, 2, 2)
    head = steps(before, 2, 1)
    tail = steps(layout(cfg, 1, 4, 1, json_roundtrip(before[0].state_dict())), 4, FULL_STEPS - 1)
    assert_same_steps(head + tail, reference)
