"""Progressive and guided distillation maths with the closed-form ideal denoiser as teacher:
the functions the stages use, exercised in one process without DeepSpeed."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from trainer.config import ConfigError, DiffusionConfig, ModelConfig, load_config, unread_settings
from trainer.diffusion import ClosedFormDenoiser, NoiseSchedule, add_noise, ddim_step, make_schedule, sample_ddim
from trainer.diffusion import sampling_timesteps
from trainer.models.dit import TextEmbedding, build_dit
from trainer.stages.adversarial import discriminator_accuracy, discriminator_loss, generator_loss
from trainer.diffusion.distill import (
    ddim_path,
    distill_loss,
    draw_student_steps,
    guided_model,
    student_step_times,
    teacher_x0_target,
)
from trainer.stages.checks import TEACHER_KEYS, check_rounds, check_same_as_teacher, teacher_steps_for
from trainer.stages.distillation import init_student_from

SCHEDULE = make_schedule(DiffusionConfig())  # scaled-linear, zero terminal SNR, T = 1000
DATA = 0.8 * torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0], [0.5, 0.0], [0.0, -0.5]])  # (6, 2)
LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


def noisy_batch(data: Tensor, steps: int, batch: int, generator: torch.Generator,
                schedule: NoiseSchedule = SCHEDULE) -> tuple[Tensor, list[Tensor], Tensor]:
    """x_t at a random step of the `steps`-step student sampler, its teacher times, the indices."""
    idx = torch.randint(len(data), (batch,), generator=generator)
    times = student_step_times(schedule, steps, 2, draw_student_steps(steps, batch, generator))
    alpha, sigma = schedule.alpha_sigma(times[0])
    return add_noise(data[idx], torch.randn((batch, *data.shape[1:]), generator=generator), alpha, sigma), times, idx


class TinyStudent(nn.Module):
    """An MLP v-predictor of (x_t, t[, class][, guidance scale])."""

    def __init__(self, dim: int = 2, classes: int = 0, guidance: bool = False, hidden: int = 64):
        super().__init__()
        self.classes, self.guidance = classes, guidance
        extra = 16 + classes + (16 if guidance else 0)
        self.net = nn.Sequential(nn.Linear(dim + extra, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    @staticmethod
    def features(v: Tensor) -> Tensor:
        f = 2.0 ** torch.arange(8)
        return torch.cat([torch.sin(v[:, None] * f), torch.cos(v[:, None] * f)], dim=1)  # (B, 16)

    def forward(self, x: Tensor, t: Tensor, label: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        parts = [x, self.features(t)]
        if self.classes:
            parts.append(nn.functional.one_hot(label, self.classes).float())
        if self.guidance:
            parts.append(self.features(scale / 4))
        return self.net(torch.cat(parts, dim=1))


def train(student: TinyStudent, teacher_for, steps: int, generator: torch.Generator, iters: int = 600) -> None:
    """Progressive distillation with the stage's own functions: targets, weighting, loss."""
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(iters):
        x_t, times, idx = noisy_batch(DATA, steps, 128, generator)
        teacher, kwargs = teacher_for(idx, generator)
        with torch.no_grad():
            target = teacher_x0_target(teacher, x_t, times, SCHEDULE, "v")
        loss = distill_loss(student(x_t, times[0], **kwargs), target, x_t, times[0], SCHEDULE, "v").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def rms(a: Tensor, b: Tensor) -> float:
    return float((a - b).square().mean().sqrt())


# ------------------------------------------------------------------------------- the target


def test_step_times_nest_in_the_student_grid():
    for steps, substeps in ((1, 32), (2, 2), (4, 8), (64, 2)):
        k = torch.arange(steps)
        times = student_step_times(SCHEDULE, steps, substeps, k)
        grid = sampling_timesteps(SCHEDULE, steps, "trailing")
        assert torch.equal(times[0], grid[:-1]) and torch.equal(times[-1], grid[1:])
        assert all(bool((a > b).all()) for a, b in zip(times, times[1:]))


def test_student_steps_are_drawn_from_one_generator_per_sample_or_none():
    """The stages draw with a list of per-sample generators; a caller may also pass none."""
    per_sample = draw_student_steps(4, 3, [torch.Generator().manual_seed(s) for s in (1, 2, 1)])
    assert per_sample.shape == (3,) and per_sample.dtype == torch.int64 and per_sample[0] == per_sample[2]
    assert ((0 <= per_sample) & (per_sample < 4)).all()
    assert draw_student_steps(4, 5, None).shape == (5,)


def test_analytic_target_matches_brute_force_two_teacher_steps():
    """Salimans & Ho's closed-form x0 target against (a) the x0 found by a generic linear solve
    of one student DDIM step landing on two teacher steps, (b) the DDIM sampler itself on the
    last interval (t'' = 0), at every step of a 4-step student including t = 1 (alpha = 0)."""
    teacher = ClosedFormDenoiser(DATA, SCHEDULE, "v")
    g = torch.Generator().manual_seed(0)
    x_t, times, _ = noisy_batch(DATA.double(), 4, 64, g)
    x_t = x_t.double()
    target = teacher_x0_target(teacher, x_t, times, SCHEDULE, "v")  # (B, 2)
    x_next = ddim_path(teacher, x_t, times, SCHEDULE, "v")  # two teacher steps
    for i in range(x_t.shape[0]):
        one_step = lambda x0: ddim_step(x_t[i:i + 1], x0, times[0][i:i + 1], times[-1][i:i + 1], SCHEDULE)  # noqa: E731
        zero = torch.zeros(1, 2, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(one_step, zero).reshape(2, 2)
        brute = torch.linalg.solve(jac, (x_next[i:i + 1] - one_step(zero)).reshape(2))
        torch.testing.assert_close(target[i], brute, rtol=1e-6, atol=1e-6)
    last = times[-1] == 0
    assert last.any() and (times[0] == 1).any()
    t0, t1 = float(times[0][last][0]), float(times[1][last][0])
    sampled = sample_ddim(teacher, x_t[last], torch.tensor([t0, t1, 0.0]), SCHEDULE, "v")
    torch.testing.assert_close(target[last], sampled, rtol=1e-5, atol=1e-5)


def test_one_round_student_single_step_reproduces_teacher_two_steps():
    """One progressive round (4 teacher steps -> 2 student steps) with the ideal denoiser of a
    6-point data set as teacher: the trained student's single DDIM step lands where the
    teacher's two steps land, far closer than the teacher's own single step does."""
    torch.manual_seed(0)
    teacher = ClosedFormDenoiser(DATA, SCHEDULE, "v")
    student = TinyStudent()
    g = torch.Generator().manual_seed(0)
    train(student, lambda idx, gen: (teacher, {}), 2, g)
    x_t, times, _ = noisy_batch(DATA, 2, 2000, g)
    with torch.no_grad():
        two = ddim_path(teacher, x_t, times, SCHEDULE, "v")
        student_one = ddim_path(student, x_t, [times[0], times[-1]], SCHEDULE, "v")
        teacher_one = ddim_path(teacher, x_t, [times[0], times[-1]], SCHEDULE, "v")
    err, baseline = rms(student_one, two), rms(teacher_one, two)
    assert err < 0.05 * float(two.std()) and err < 0.3 * baseline, (err, baseline)


# ------------------------------------------------------------------------------- guidance


class ClassConditionalDenoiser:
    """Ideal denoiser conditioned on a class label (-1: unconditional, all the data)."""

    def __init__(self, data: Tensor, labels: Tensor):
        self.uncond = ClosedFormDenoiser(data, SCHEDULE, "v")
        self.per_class = [ClosedFormDenoiser(data[labels == c], SCHEDULE, "v") for c in range(int(labels.max()) + 1)]

    def __call__(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        out = self.uncond(x, t)
        for c, denoiser in enumerate(self.per_class):
            m = cond["label"] == c
            if m.any():
                out[m] = denoiser(x[m], t[m])
        return out


def test_guidance_conditioned_student_matches_cfg_teacher_better_than_unconditioned():
    """Meng et al. 2023: the teacher is CFG at w ~ U[1, 4]; a student given w matches the
    teacher's guided two steps at w = 1 and at w = 4 better than one that is not given w."""
    torch.manual_seed(0)
    model = ClassConditionalDenoiser(DATA, LABELS)

    def guided_teacher(label: Tensor, scale: Tensor):
        return guided_model(model, {"label": label}, {"label": torch.full_like(label, -1)}, scale)

    def teacher_for(guidance: bool):
        def make(idx: Tensor, gen: torch.Generator):
            scale = 1 + 3 * torch.rand(idx.shape[0], generator=gen)
            kwargs = {"label": LABELS[idx], **({"scale": scale} if guidance else {})}
            return guided_teacher(LABELS[idx], scale), kwargs
        return make

    students = {}
    for guidance in (True, False):
        students[guidance] = TinyStudent(classes=2, guidance=guidance)
        train(students[guidance], teacher_for(guidance), 2, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x_t, times, idx = noisy_batch(DATA, 2, 2000, g)
    label = LABELS[idx]
    for w in (1.0, 4.0):
        scale = torch.full((x_t.shape[0],), w)
        with torch.no_grad():
            two = ddim_path(guided_teacher(label, scale), x_t, times, SCHEDULE, "v")
            errs = {}
            for guidance, student in students.items():
                kwargs = {"label": label, **({"scale": scale} if guidance else {})}
                one = ddim_path(lambda x, t: student(x, t, **kwargs), x_t, [times[0], times[-1]], SCHEDULE, "v")
                errs[guidance] = rms(one, two)
        assert errs[True] < 0.5 * errs[False], (w, errs)


def test_cfg_at_scale_one_is_the_conditional_model_and_batched_otherwise():
    model = ClassConditionalDenoiser(DATA, LABELS)
    x, t = torch.randn(4, 2), torch.full((4,), 0.5)
    cond, uncond = {"label": torch.tensor([0, 1, 0, 1])}, {"label": torch.full((4,), -1)}
    torch.testing.assert_close(guided_model(model, cond, uncond, torch.ones(4))(x, t), model(x, t, cond))
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    c, u = model(x, t, cond), model(x, t, uncond)
    torch.testing.assert_close(guided_model(model, cond, uncond, w)(x, t), u + w[:, None] * (c - u))


# ------------------------------------------------------------------------------- the stage's pieces


def test_guidance_embedded_student_starts_equal_to_teacher():
    cfg = ModelConfig(preset="DiT-Tiny/1", in_channels=4)
    teacher = build_dit(cfg, 16, 8)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    student = build_dit(ModelConfig(preset="DiT-Tiny/1", in_channels=4, guidance_embed=True), 16, 8)
    init_student_from(student, teacher.state_dict())
    x, t = torch.randn(3, 4, 4, 4), torch.rand(3)
    text = TextEmbedding(torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool), torch.randn(3, 8))
    expected = teacher(x, t, text)
    for w in (1.0, 4.0):
        torch.testing.assert_close(student(x, t, text, guidance=torch.full((3,), w)), expected)


def test_round_schedule_and_teacher_mismatch_are_config_errors():
    check_rounds([16, 8, 4, 2], 8, None, 1000)
    check_rounds([4, 2], 4, 8, 1000)
    with pytest.raises(ConfigError, match="stage.rounds.*halves"):
        check_rounds([8, 2], 10, None, 1000)
    with pytest.raises(ConfigError, match="stage.rounds.*8-step"):
        check_rounds([2, 1], 10, 8, 1000)
    with pytest.raises(ConfigError, match="stage.steps"):
        check_rounds([4, 2, 1], 2, None, 1000)
    with pytest.raises(ConfigError, match="stage.rounds.*num_timesteps=16"):  # a 32-step teacher on 16 timesteps
        check_rounds([16, 8], 10, None, 16)
    with pytest.raises(ConfigError, match="stage.rounds.*divide"):
        teacher_steps_for([4, 3], 4, 32)
    assert teacher_steps_for([4, 2, 1], None, 25) == 28 and teacher_steps_for([3, 2], None, 4) == 6
    run = {"model": {"preset": "DiT-T/2", "guidance_embed": True}, "diffusion": dict.fromkeys(TEACHER_KEYS["diffusion"], 0),
           "data": {"kind": "image", "resolution": 16, "num_frames": 1}}
    run["model"]["autoencoder"] = {"kind": "kl", "path": "runs/a/autoencoder"}
    teacher = {**run, "model": {"preset": "DiT-T/2", "guidance_embed": False,
                                "autoencoder": {"kind": "kl", "path": "elsewhere/autoencoder"}}}
    check_same_as_teacher(run, teacher, "ckpt")  # the student's own options and weight paths may differ
    with pytest.raises(ConfigError, match="model.autoencoder.kind"):
        check_same_as_teacher(run, {**teacher, "model": {"preset": "DiT-T/2", "autoencoder": {"kind": "none"}}}, "t")
    with pytest.raises(ConfigError, match="data.resolution.*32"):
        check_same_as_teacher(run, {**teacher, "data": {**run["data"], "resolution": 32}}, "ckpt")
    # a teacher's config from before clip settings of an image stream were refused: neither reads them
    older = {**teacher, "data": {**run["data"], "num_frames": 16}}
    with pytest.raises(ConfigError, match="data.num_frames.*16"):
        check_same_as_teacher(run, older, "ckpt")
    check_same_as_teacher(run, older, "ckpt", unread_settings(load_config(None, ["data.kind=image"])))


def test_adversarial_losses_and_accuracy():
    real, fake = torch.tensor([[2.0, 1.0], [0.5, -0.1]]), torch.tensor([[-2.0, -1.0], [0.3, 0.1]])
    assert discriminator_accuracy(real, fake, torch.ones(2)) == 0.75
    assert discriminator_accuracy(real, fake, torch.tensor([1.0, 0.0])) == 1.0  # padding repeats do not count
    torch.testing.assert_close(discriminator_loss(real, fake, "hinge"),
                               (torch.relu(1 - real) + torch.relu(1 + fake)).mean(1))
    torch.testing.assert_close(generator_loss(fake, "hinge"), -fake.mean(1))
    torch.testing.assert_close(generator_loss(fake, "non_saturating"), nn.functional.softplus(-fake).mean(1))
    with pytest.raises(ConfigError, match="stage.adv_loss"):
        discriminator_loss(real, fake, "wasserstein")
