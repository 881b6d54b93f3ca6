"""The figures of logs/metrics.jsonl: the data-wait share of step time and the means over ranks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from trainer.config import LogConfig
from trainer.metrics import MetricsLogger, StepTimer, timestep_bucket_losses


class Clock:
    """A clock the test moves by hand: the figures are exact, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_data_wait_is_only_the_time_waiting_for_data():
    """grad_accum=2, data always ready, 30 ms of compute a micro-batch: the data wait is 0,
    not the first micro-batch's compute that a mark after `next` used to count (50%)."""
    clock = Clock()
    timer = StepTimer(clock)
    for _ in range(2):  # steps
        for _ in range(2):  # micro-batches
            with timer.waiting():
                batch = object()  # next(batches): already prefetched
            clock.now += 0.03  # forward, backward, step of `batch`
        timer.step_done()
    assert timer.pop() == (0.0, pytest.approx(0.12))


def test_data_wait_counts_a_slow_loader():
    clock = Clock()
    timer = StepTimer(clock)
    with timer.waiting():
        clock.now += 0.05  # the loader is behind
    clock.now += 0.03
    timer.step_done()
    data_s, total_s = timer.pop()
    assert (data_s, total_s) == (pytest.approx(0.05), pytest.approx(0.08))
    assert timer.pop() == (0.0, 0.0)  # popped figures start again from zero


def test_means_are_over_every_rank(monkeypatch, tmp_path):
    """Two data-parallel ranks: the logged loss is the mean over both ranks' micro-batches and
    the timestep-quarter losses pool both ranks' samples, not rank 0's share alone."""
    other_rank = {"loss": (10.0, 2), "loss_t0.00": (8.0, 2), "loss_t0.25": (0.0, 0), "loss_t0.50": (0.0, 0),
                  "loss_t0.75": (6.0, 3)}

    def all_reduce(tensor, *args, **kwargs):  # SUM with rank 1's flat [sums..., counts..., tokens, MACs]
        keys = sorted(other_rank)
        tensor += torch.tensor([other_rank[k][0] for k in keys] + [other_rank[k][1] for k in keys] + [0, 0],
                               dtype=tensor.dtype)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    logger = MetricsLogger(LogConfig(dir=str(tmp_path), every=1, tensorboard=False), rank=0, total_steps=1,
                           start_step=0, samples_per_step=8)
    t = torch.tensor([0.1, 0.1])  # both samples of this rank in the first quarter
    for loss in (1.0, 3.0):  # rank 0's two micro-batches
        logger.add({"loss": torch.tensor(loss), **timestep_bucket_losses(torch.tensor([loss, loss]), t)})
    record = logger.step_done(1, {})
    assert record["loss"] == (1.0 + 3.0 + 10.0) / 4  # not rank 0's 2.0
    assert record["loss_t0.00"] == (1 + 1 + 3 + 3 + 8.0) / 6
    assert record["loss_t0.75"] == 2.0  # only the other rank had samples there
    assert "loss_t0.25" not in record  # no sample on any rank
    logger.close()


def test_throughput_counts_each_micro_batch_at_its_shape(tmp_path):
    """Two micro-batches of two buckets (16x16 and 24x48 px, 2 samples each) of the tiny pixel
    DiT (2x2 patches): tokens/s and TFLOP/s are their hand sums (2 x 64 + 2 x 288 tokens; 6 x
    the forward MACs at each shape) over the step's time, not 4 samples at the configured 16 px
    square (256 tokens: 2.75x too few). Read from shapes alone: the batches are on the meta device."""
    from tests.eval.eval_helpers import tiny_config
    from trainer.stages import build_stage

    stage = build_stage(tiny_config(tmp_path, "data.resolutions=[16,32]", "data.aspect_buckets=[0.5,1.0,2.0]",
                                    "diffusion.shift_base_resolution=16"))
    shapes = [(2, 3, 16, 16), (2, 3, 24, 48)]  # (B, 3, H, W): a step's micro-batches
    logger = MetricsLogger(LogConfig(dir=str(tmp_path), every=1, tensorboard=False), rank=0, total_steps=1,
                           start_step=0, samples_per_step=4)
    for shape in shapes:
        logger.computed(*stage.work({"image": torch.empty(shape, device="meta")}))
    record = logger.step_done(1, {})
    logger.close()
    seconds = 4 / record["samples_per_s"]
    macs = sum(stage.players["student"].macs(shape, stage.text.max_length) for shape in shapes)
    assert record["tokens_per_s"] * seconds == pytest.approx(2 * 8 * 8 + 2 * 12 * 24)
    assert record["tflops"] * seconds == pytest.approx(6 * macs / 1e12)
    batch = {"image": torch.empty(shapes[1], device="meta")}
    assert stage.work(batch) is stage.work(batch)  # cached per shape: it is asked on every micro-batch
    video = build_stage(tiny_config(tmp_path, "model.video=true", "data.kind=video", "data.num_frames=4",
                                    "model.temporal_patch=2"))
    # a still of joint training (a 1-frame clip) is held for one temporal patch: 64 tokens, not 0
    assert video.work({"video": torch.empty((2, 3, 1, 16, 16), device="meta")})[0] == 2 * 8 * 8
    assert video.work({"video": torch.empty((2, 3, 4, 16, 16), device="meta")})[0] == 2 * 2 * 8 * 8


def _rank_logs(rank: int, out: str) -> None:
    """One of two gloo ranks: a micro-batch of loss 1 + 2 rank and (100 + 100 rank) tokens and
    (10 + 10 rank) MACs; rank 0 writes the record."""
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        logger = MetricsLogger(LogConfig(dir=out, every=1, tensorboard=False), rank=rank, total_steps=1,
                               start_step=0, samples_per_step=4)
        logger.add({"loss": torch.tensor(1.0 + 2 * rank)})
        logger.computed(100 + 100 * rank, 10 + 10 * rank)
        logger.step_done(1, {})
        logger.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_work_is_summed_over_ranks_while_losses_are_averaged(tmp_path):
    """Two real gloo ranks: tokens and MACs are totals over the ranks (the global batch's work),
    reduced in the same collective as the losses, which stay means."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_logs, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    record, = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    seconds = 4 / record["samples_per_s"]
    assert record["loss"] == 2.0
    assert record["tokens_per_s"] * seconds == pytest.approx(300)
    assert record["tflops"] * seconds == pytest.approx(6 * 30 / 1e12)


@pytest.mark.slow
def test_a_bucketed_run_logs_each_step_at_its_batches_shape(mixed_shards, tmp_path):
    """A real 1-rank run over two areas x three aspects, logged every step: each record's
    tokens and MACs per sample are those of one bucket (the step's batch, padding included), and
    the run meets several (64 tokens, the configured 16 px square's, were logged for every one).
    Captions cut at model.text.max_length are counted with the data counters."""
    from data_pipeline.transforms import TransformSpec
    from tests.eval.eval_helpers import tiny_config
    from tests.trainer.harness import assert_ok, base, metrics, run_train
    from trainer.stages import build_stage

    buckets = ("data.resolutions=[16,32]", "data.aspect_buckets=[0.5,1.0,2.0]", "diffusion.shift_base_resolution=16")
    out = tmp_path / "run"
    assert_ok(run_train(1, base(mixed_shards, out, *buckets, "stage.steps=6", "checkpoint.every=6")))
    cfg = tiny_config(tmp_path, *buckets)
    stage = build_stage(cfg)
    per_sample = dict(stage.work({"image": torch.empty((1, 3, h, w), device="meta")})
                      for h, w in TransformSpec.from_config(cfg.data).sizes)  # tokens -> MACs, a sample of each bucket
    seen = set()
    for record in (r for r in metrics(out) if "tokens_per_s" in r):
        tokens = round(record["tokens_per_s"] / record["samples_per_s"])
        assert tokens in per_sample, (record, per_sample)
        assert record["tflops"] * 1e12 / 6 / record["samples_per_s"] == pytest.approx(per_sample[tokens])
        seen.add(tokens)
    assert len(seen) > 1, seen
    last = [r for r in metrics(out) if "data/read" in r][-1]  # two-shape captions: ~20 tokens, max_length 16
    assert 1 <= last["data/truncated_captions"] <= last["data/read"], last


def test_timestep_quarters_leave_out_padding_repeats():
    """The loader fills holes with repeats marked valid=False (a batch may be all filler): they
    must not count in the per-quarter losses."""
    per_sample = torch.tensor([1.0, 5.0, 5.0, 2.0])
    t = torch.tensor([0.1, 0.1, 0.1, 0.9])
    valid = torch.tensor([True, False, False, True])
    out = timestep_bucket_losses(per_sample, t, valid.float())
    means = {k: float(s) / float(c) for k, (s, c) in out.items() if float(c) > 0}
    assert means == {"loss_t0.00": 1.0, "loss_t0.75": 2.0}
    unweighted = timestep_bucket_losses(per_sample, t)
    assert float(unweighted["loss_t0.00"][0]) / float(unweighted["loss_t0.00"][1]) == 11 / 3


def test_autoencoder_padding_neither_trains_nor_counts_in_the_logged_loss(tmp_path):
    """The autoencoder stage's loss is over the valid images only: a padding repeat
    (valid=False) changes neither the loss it trains on nor what is logged, and a micro-batch of
    padding alone counts in no logged mean (it logged its repeats' loss, and trained on them)."""
    from tests.eval.eval_helpers import tiny_config
    from trainer.stages import build_stage

    stage = build_stage(tiny_config(tmp_path, "stage.kind=autoencoder"))
    images = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = {"image": images, "valid": torch.tensor([True, True])}
    padded = {"image": torch.cat([images, images[:1]]), "valid": torch.tensor([True, True, False])}
    padding = {"image": images, "valid": torch.tensor([False, False])}

    def losses(batch: dict) -> dict:  # one posterior-sample generator per image: the same draws for the same image
        (_, loss, info), = stage.losses(batch, [torch.Generator().manual_seed(i) for i in range(len(batch["image"]))])
        return {"trained": float(loss.detach()), **info}

    assert losses(padded)["trained"] == pytest.approx(losses(real)["trained"])
    logged = []
    for batches in ([real], [real, padding]):
        logger = MetricsLogger(LogConfig(dir=str(tmp_path), every=1, tensorboard=False), rank=0, total_steps=1,
                               start_step=0, samples_per_step=2)
        for batch in batches:
            logger.add({k: v for k, v in losses(batch).items() if k != "trained"})
        logged.append(logger.step_done(1, {}))
        logger.close()
    assert {k: logged[1][k] for k in ("loss", "recon", "kl")} == pytest.approx(
        {k: logged[0][k] for k in ("loss", "recon", "kl")})


def test_the_pipeline_loss_logged_is_over_valid_samples_and_leaves_a_padding_micro_batch_out(tmp_path):
    """Under pipeline parallelism the logged loss comes from the loss the pipe's last stage
    computes per micro-batch: a micro-batch of padding alone (an epoch's tail) counts in no
    mean, where DeepSpeed's own `train_batch` value averaged it in as a 0; the earlier stages,
    which compute no loss, add nothing to the sums over ranks. The loss per timestep quarter is
    logged as without a pipeline (it was missing), padding in no quarter."""
    from tests.eval.eval_helpers import tiny_config
    from trainer.metrics import T_BUCKET_KEYS
    from trainer.stages import build_stage

    stage = build_stage(tiny_config(tmp_path))
    g = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn((2, 3, 16, 16), generator=g) for _ in range(3))
    alpha, sigma = torch.full((2,), 0.6), torch.full((2,), 0.8)
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps

    def targets(*valid: bool) -> tuple:
        return x0, eps, x_t, alpha, sigma, torch.tensor(valid, dtype=torch.float32), torch.tensor([0.1, 0.8])  # t last

    half = float(stage.pipeline_loss(pred, targets(True, False)))  # the first sample's loss
    assert stage.take_pipeline_metrics()["loss"][1] == 1
    padding = float(stage.pipeline_loss(pred, targets(False, False)))
    both = float(stage.pipeline_loss(pred, targets(True, True)))
    assert padding == 0.0  # what DeepSpeed averages in
    logged = stage.take_pipeline_metrics()
    total, count = logged["loss"]
    assert (float(count), float(total) / float(count)) == (2.0, pytest.approx(both))
    assert both != pytest.approx((padding + both) / 2) and half != both
    assert sorted(k for k in logged if k != "loss") == list(T_BUCKET_KEYS)
    assert [float(logged[k][1]) for k in T_BUCKET_KEYS] == [1.0, 0.0, 0.0, 1.0]  # t 0.1 and 0.8, valid once
    first, last = (float(logged[k][0]) for k in (T_BUCKET_KEYS[0], T_BUCKET_KEYS[3]))
    assert first + last == pytest.approx(float(total)) and min(first, last) > 0
    assert stage.take_pipeline_metrics() == {k: (0.0, 0.0) for k in ("loss", *T_BUCKET_KEYS)}  # no loss here


class ScheduledEngine:
    """The parts of a DeepSpeed engine the step loop uses, stepping as DeepSpeedEngine does at a
    step boundary (`_take_model_step`): the optimizer, then the LR scheduler. Records the rate
    each optimizer step used."""

    def __init__(self, optim, total_steps: int, overflows: frozenset = frozenset()):
        """`overflows`: the optimizer steps (1-based) DeepSpeed skips by itself, as its ZeRO
        optimizer does on a non-finite gradient norm: no update, and no scheduler step."""
        from trainer.optim import lr_factor

        self.module = torch.nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=optim.lr)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                              lambda s: lr_factor(s, optim, total_steps))
        self.used: list[float] = []
        self.overflows, self.steps, self.applied = overflows, 0, True

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.steps += 1
        self.applied = self.steps not in self.overflows
        if self.applied:
            self.used.append(self.optimizer.param_groups[0]["lr"])
            self.optimizer.step()
            self.lr_scheduler.step()
        self.optimizer.zero_grad()

    def get_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self):
        return 0.0

    def was_step_applied(self):
        return self.applied


def run_step_loop(tmp_path, overflows: frozenset = frozenset(), every: int = 1) -> tuple[ScheduledEngine, list[dict]]:
    """6 steps of the step loop over a `ScheduledEngine` at lr 1e-3 warmed up over 4 steps,
    logged every `every`: the engine and the metrics records."""
    from types import SimpleNamespace

    from tests.eval.eval_helpers import tiny_config
    from trainer.engine import Trainer
    from trainer.train_state import LoopState

    cfg = tiny_config(tmp_path, "optim.warmup_steps=4", "optim.lr=1e-3", "stage.steps=6", f"log.every={every}")
    engine = ScheduledEngine(cfg.optim, cfg.stage.steps, overflows)

    def losses(batch, draws):
        loss = engine.module(batch).square().mean()
        yield "student", loss, {"loss": loss.detach()}

    trainer = Trainer.__new__(Trainer)  # the step loop alone: no process group, stream or DiT
    trainer.cfg, trainer.device, trainer.precision, trainer.pipeline = cfg, torch.device("cpu"), "fp32", False
    trainer.engines, trainer.optimizers = {"student": engine}, {"student": SimpleNamespace(take_skip=lambda: False)}
    trainer.stage = SimpleNamespace(losses=losses)
    trainer.state, trainer.pending, trainer.key_log, trainer.ema = LoopState(), [], None, None
    trainer.next_batch = lambda batches: (next(batches), None)
    trainer.data_stats = lambda: {}
    trainer.logger = MetricsLogger(cfg.log, rank=0, total_steps=6, start_step=0, samples_per_step=1)
    batches = iter([torch.ones(1, 2)] * 6)
    for _ in range(6):
        trainer.record_step(*trainer.train_step(batches))
        trainer.settle(everything=True)
    trainer.logger.close()
    return engine, [json.loads(line) for line in (Path(cfg.log.dir) / "metrics.jsonl").read_text().splitlines()]


def test_the_logged_lr_is_the_one_the_step_trained_with(tmp_path):
    """Warm-up over 4 steps (lr 1e-3): step s trains at s / 4 of it, and its log says so, not
    the next step's rate (the scheduler has stepped by the time the step is logged)."""
    engine, records = run_step_loop(tmp_path)
    assert engine.used == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx(engine.used)


def test_a_skipped_log_step_and_the_last_step_write_their_windows(tmp_path):
    """Logged every 4 of 6 steps, step 4 skipped: the record of step 4 holds steps 1-3 (a
    skipped log step wrote none, and steps 1-3 went into a later mean), and step 6, the last,
    writes steps 5-6 (the last window was never written)."""
    _, records = run_step_loop(tmp_path, overflows=frozenset({4}), every=4)
    assert [r["step"] for r in records if "loss" in r] == [4, 6]
    assert [r["step"] for r in records if r.get("skipped_nonfinite_step")] == [4]


def test_a_step_deepspeed_skips_moves_the_schedule_as_one_the_guard_skips(tmp_path):
    """A step skipped counts as a step (its batch, the EMA warm-up, the step number): the LR
    schedule moves on too, whichever skipped it. DeepSpeed skips its scheduler step where its
    ZeRO optimizer finds the norm non-finite, the finite guard's skip (ZeRO-0) does not: the
    same config ran one step late on the schedule after each such skip, on ZeRO 1-3 only."""
    engine, _ = run_step_loop(tmp_path, overflows=frozenset({2}))
    assert engine.used == pytest.approx([2.5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])  # step 2 skipped


def test_a_sample_grid_leaves_the_global_rng_alone(tmp_path):
    """Checkpoints save the global RNG state: drawing a grid (whose sampling network draws its
    initial weights there) must not move it, or a resumed run's later checkpoints differ from an
    uninterrupted one's."""
    from types import SimpleNamespace

    from tests.eval.eval_helpers import tiny_config
    from trainer.engine import Trainer
    from trainer.train_state import LoopState

    def write_samples(weights, log, path):
        torch.rand(8)  # what building a network does
        return None

    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.device, trainer.precision = tiny_config(tmp_path), torch.device("cpu"), "fp32"
    trainer.ctx, trainer.state = SimpleNamespace(is_main=True), LoopState()
    trainer.full_weights, trainer.stage = lambda: {}, SimpleNamespace(write_samples=write_samples)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    trainer.write_samples()
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_a_resume_between_log_steps_logs_the_mean_of_the_whole_window(shapes_shards, tmp_path):
    """2 ranks logging every 2 steps, saved at step 3 and resumed there: the record of step 4
    is the mean of steps 3 and 4 over both ranks, as in the run straight through (the resumed
    run's window began empty: step 4 alone). Totals go into the checkpoint summed over the ranks
    and come back on rank 0 only, so nothing is counted twice."""
    from tests.trainer.harness import metrics, straight_and_resumed

    straight, resumed = straight_and_resumed(shapes_shards, tmp_path, 6, "log.every=2", "log.sample_every=0")
    a, b = ({r["step"]: r for r in metrics(run) if "loss" in r} for run in (straight, resumed))
    assert sorted(a) == [2, 4, 6] and sorted(b) == [4, 6]
    windowed = [k for k in a[4] if k.startswith("loss")]  # the loss and its timestep quarters
    assert "loss" in windowed and sorted(windowed) == sorted(k for k in b[4] if k.startswith("loss"))
    for key in windowed:  # summed in another order: float64 rounding apart
        assert b[4][key] == pytest.approx(a[4][key], rel=1e-6), key
    assert b[6]["loss"] == a[6]["loss"]
