"""`dit bench distill`: a teacher and its distilled students side by side in one run.

For each sampler: network evaluations per image (NFE; classifier-free guidance counts its two
forwards), wall time per image (sampling + decoding, after a warm-up batch; the prompts' text
embeddings are encoded beforehand, untimed, the same for every row), and prompt adherence of
the shapes judge (`trainer.judge`) on held-out captions: its accuracy per attribute,
`overall` (every attribute of a sample right), and `score`, the mean of the attribute
accuracies, on which the share of the teacher's is computed (a weak teacher can have `overall`
0 while its attributes are far above chance).

Defaults follow the demo: the teacher at runs/demo/checkpoints sampled with 50 DDIM steps and
CFG, the progressive students exported per round at 8 / 4 / 2 steps, the adversarial student
at 1 / 2 / 4 steps. Targets (the distillation issue): the 4-step progressive student >= 95% of
the teacher's score, the 1-step adversarial student >= 90%.

    dit bench distill --teacher runs/demo/checkpoints \\
        --progressive runs/distill_progressive/checkpoints --adversarial runs/distill_adversarial/checkpoints
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

PROGRESSIVE_TARGET = (4, 0.95)  # (steps, share of the teacher's score)
NOT_ATTRIBUTES = ("count", "overall")  # judge keys that are not single attributes
ADVERSARIAL_TARGET = (1, 0.90)

Sampler = Callable[[Sequence[str], torch.Generator], Tensor]  # prompts -> pixels in [-1, 1]


@dataclass
class Row:
    sampler: str
    steps: int
    nfe: int
    seconds_per_image: float
    precision: str = "fp32"  # the autocast the sampling ran under (`trainer.cascade.sampling_precision`)
    adherence: dict[str, float] = field(default_factory=dict)
    of_teacher: Optional[float] = None

    @property
    def score(self) -> float:
        """Mean accuracy over the judged attributes (color, shape, size, position, ...)."""
        values = [v for k, v in self.adherence.items() if k not in NOT_ATTRIBUTES]
        return sum(values) / len(values) if values else 0.0


def run_sampler(sample: Sampler, prompts: Sequence[str], batch_size: int, seed: int) -> tuple[Tensor, float]:
    """All prompts in batches with one seeded generator; (pixels, seconds per image) after an
    untimed warm-up batch of the timed batches' size (a warm-up of one prompt left the first
    timed batch to allocate its buffers and pick its kernels for the larger shapes)."""
    sample(prompts[:batch_size], torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    pixels = torch.cat([sample(prompts[i: i + batch_size], generator).cpu() for i in range(0, len(prompts), batch_size)])
    return pixels, (time.perf_counter() - start) / len(prompts)  # .cpu() waited for the device


def measure(name: str, steps: int, nfe: int, sample: Sampler, prompts: Sequence[str], args: argparse.Namespace,
            precision: str = "fp32") -> Row:
    from trainer.judge import judge

    pixels, seconds = run_sampler(sample, prompts, args.batch_size, args.seed)
    row = Row(name, steps, nfe, seconds, precision, judge(pixels, prompts).accuracy)
    print(f"  {name} @ {steps} steps, {precision}: score {100 * row.score:.1f}%, "
          f"{1000 * seconds:.1f} ms/image", flush=True)
    return row


def sampler(loaded, steps: int, scale: float, distilled: bool, prompts: Sequence[str]) -> Sampler:
    """A loaded checkpoint's bundle sampling its network: the teacher with CFG at `scale`, a
    distilled student with one forward per step (guidance `scale` as an input if it takes one).
    The prompts' text embeddings are encoded here, untimed, into the bundle's cache, so that every
    row times the same work, its network evaluations and the decoding: the cache otherwise
    charged the text encoder (~5 ms an image on 2 CPU threads) to the first row of each loaded
    checkpoint only (the adversarial student's 1 step timed slower than its 2). Sampling runs
    under the loaded stage's precision (`loaded.precision`: fp32 on the CPU, the trained one on
    an accelerator), as `dit sample` does."""
    from trainer.diffusion import SamplerSettings
    from trainer.numerics import autocast

    loaded.stage.text.encode(list(prompts))
    settings = SamplerSettings(steps=steps, cfg_scale=scale)
    device = next(loaded.net.parameters()).device

    def sample(batch: Sequence[str], g: torch.Generator) -> Tensor:
        with autocast(device, loaded.precision):
            return loaded.stage.sample_pixels(loaded.net, batch, settings, g, distilled=distilled)

    return sample


def load_student(directory: Path, device: torch.device):
    """A distillation checkpoint or round export, loaded for sampling (no teacher is built)."""
    from trainer.cascade import CascadeStageSpec, load_stage
    from trainer.diffusion import SamplerSettings

    return load_stage(CascadeStageSpec(str(directory)), SamplerSettings(), device=device)


def student_rows(args: argparse.Namespace, prompts: Sequence[str], scale: float) -> list[Row]:
    from trainer.checkpoint_format import rounds_exports

    rows = []
    exports = rounds_exports(args.progressive) if Path(args.progressive).is_dir() else {}
    for steps in args.progressive_steps:
        if steps not in exports:
            print(f"  progressive {steps}-step student: no export in {args.progressive}/rounds "
                  f"(train configs/distill_progressive.yaml)", flush=True)
            continue
        student = load_student(exports[steps], args.device)
        rows.append(measure("progressive", steps, steps, sampler(student, steps, scale, True, prompts), prompts, args,
                            student.precision))
    if not Path(args.adversarial).is_dir():
        print(f"  adversarial student: no checkpoint at {args.adversarial} (train configs/distill_adversarial.yaml)")
        return rows
    loaded = load_student(Path(args.adversarial), args.device)
    for steps in args.adversarial_steps:
        rows.append(measure("adversarial", steps, steps, sampler(loaded, steps, scale, True, prompts), prompts, args,
                            loaded.precision))
    return rows


def format_table(rows: Sequence[Row], attributes: Sequence[str]) -> str:
    head = f"{'sampler':<12} {'steps':>5} {'NFE':>5} {'ms/image':>9} {'precision':>9} " \
        + " ".join(f"{a:>9}" for a in attributes)
    lines = [head + f" {'score':>9} {'% teacher':>10}", "-" * (len(head) + 21)]
    for r in rows:
        cells = " ".join(f"{100 * r.adherence.get(a, float('nan')):8.1f}%" for a in attributes)
        share = f"{100 * r.of_teacher:9.1f}%" if r.of_teacher is not None else f"{'-':>10}"
        lines.append(f"{r.sampler:<12} {r.steps:>5} {r.nfe:>5} {1000 * r.seconds_per_image:>9.1f} {r.precision:>9} {cells} "
                     f"{100 * r.score:8.1f}% {share}")
    return "\n".join(lines)


def target_lines(rows: Sequence[Row]) -> list[str]:
    out = []
    for name, (steps, share) in (("progressive", PROGRESSIVE_TARGET), ("adversarial", ADVERSARIAL_TARGET)):
        row = next((r for r in rows if r.sampler == name and r.steps == steps), None)
        if row is None or row.of_teacher is None:
            out.append(f"target {name} {steps}-step >= {100 * share:.0f}% of the teacher: not measured")
            continue
        verdict = "met" if row.of_teacher >= share else "MISSED"
        out.append(f"target {name} {steps}-step >= {100 * share:.0f}% of the teacher: "
                   f"{100 * row.of_teacher:.1f}% ({verdict})")
    return out


def bench_distill(args: argparse.Namespace) -> int:
    from trainer.cascade import CascadeStageSpec, load_stage
    from trainer.diffusion import SamplerSettings
    from trainer.heldout import heldout_set
    from trainer.judge import judge

    if not Path(args.teacher).is_dir():
        print(f"dit bench distill: no teacher checkpoint at {args.teacher}; run `dit demo configs/demo.yaml` "
              f"(or pass --teacher)")
        return 2
    teacher = load_stage(CascadeStageSpec(args.teacher), SamplerSettings(), device=args.device)
    scale = args.cfg if args.cfg is not None else teacher.cfg.log.sample_cfg
    real, captions = heldout_set(teacher.cfg.data, args.num)
    prompts = captions[: args.num]
    print(f"judge on {len(prompts)} real held-out samples: {judge(real, captions).format()}", flush=True)
    nfe = args.teacher_steps * (2 if scale != 1.0 else 1)
    rows = [measure("teacher", args.teacher_steps, nfe, sampler(teacher, args.teacher_steps, scale, False, prompts),
                    prompts, args, teacher.precision)]
    rows += student_rows(args, prompts, scale)
    reference = rows[0].score
    for r in rows:
        r.of_teacher = r.score / reference if reference > 0 else None
    attributes = list(rows[0].adherence)
    print(f"\nguidance scale {scale}, {len(prompts)} held-out captions, seed {args.seed}, "
          f"{torch.get_num_threads()} torch threads")
    print(format_table(rows, attributes))
    for line in target_lines(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps([{**asdict(r), "score": r.score} for r in rows], indent=1) + "\n")
    return 0
