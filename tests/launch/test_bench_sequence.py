"""`dit bench sequence`: its activations are the peak of the activations over the step (not
their share at the moment the total peaked), and a split whose loss differs fails."""
from __future__ import annotations

import argparse

import pytest

import launch.bench_sequence as seq

MIB = seq.MIB


def test_activations_are_their_own_peak_over_the_step():
    """What the forward left for backward is a lower bound of the activations' peak; the total's
    peak comes in backward, when most of them were freed (the old column: 0.012 of 2.09 MiB)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    clip = seq.Clip("DiT-T/2", 2, "full", "none", 4, 8, 4)
    net = clip.model()
    x, t, text = clip.inputs()
    tracker = MemTracker()
    tracker.track_external(net)
    with tracker:
        loss = net(x, t, text).square().mean()
        after_forward = {getattr(k, "value", k): v
                         for k, v in tracker.get_tracker_snapshot("current")[x.device].items()}["Activation"]
        loss.backward()
    measured = seq.measure(clip.model(), clip)
    assert after_forward > 0.5 * MIB
    # the same tensors, give or take a few KiB the tracker counts between operators
    assert measured["activations_mib"] == pytest.approx(after_forward / MIB, rel=0.02), measured
    assert measured["loss"] == pytest.approx(float(loss), rel=1e-6)


def test_a_split_whose_loss_differs_fails(monkeypatch, capsys):
    results = iter([{"loss": 1.0, "activations_mib": 4.0, "temporaries_mib": 1.0, "gradients_mib": 1.0,
                     "total_mib": 6.0}])
    monkeypatch.setattr(seq, "measure", lambda net, clip: next(results))
    monkeypatch.setattr(seq.Clip, "model", lambda self: None)

    def fake_spawn(fn, args, nprocs, join):
        out = args[3]
        for r, loss in enumerate((1.0, 1.01)):
            (seq.Path(out) / f"rank{r}.json").write_text(seq.json.dumps(
                {"loss": loss, "activations_mib": 2.0, "temporaries_mib": 1.0, "gradients_mib": 1.0, "total_mib": 4.0}))

    import torch.multiprocessing as mp

    monkeypatch.setattr(mp, "spawn", fake_spawn)
    args = argparse.Namespace(preset="DiT-T/2", depth=2, attention="full", policy="none", frames=4, size=8,
                              channels=4, ranks=2)
    assert seq.bench_sequence(args) == 1
    assert "DIFFER" in capsys.readouterr().out
    assert seq.losses_agree(1.0, 1.0 + 1e-6) and not seq.losses_agree(1.0, 1.01)
