"""`dit bench quality`: prompt adherence against training steps for the demo recipe.

Trains the recipe of `make demo` (shards -> autoencoder -> latent shards -> latent DiT, each
training stage started with torchrun exactly as the demo does) into --out, keeping a checkpoint
every --every steps, then judges each checkpoint's EMA on the same --num held-out captions
(the shapes judge, `trainer.judge`, with 95% Wilson intervals). Writes quality.json (one row per checkpoint:
step, accuracies, intervals) and quality.png (the curve of every attribute, count and overall
against the step), so a change to the recipe shows its effect:

    dit bench quality                                  # the demo recipe, checkpoints every 500 steps
    dit bench quality --every 250 stage.steps=1000     # dotted overrides apply to the DiT config
    dit bench quality --skip-train --out runs/bench_quality   # re-judge existing checkpoints
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Sequence

from launch.sample_cmd import add_device_argument

COLORS = {"color": (220, 40, 40), "shape": (40, 90, 220), "size": (30, 160, 60), "position": (230, 150, 20),
          "count": (140, 60, 180), "overall": (0, 0, 0)}


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "quality", help="prompt adherence against training steps of the demo recipe (numbers and a PNG curve)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/demo.yaml",
                   help="the DiT config; its autoencoder config is demo_autoencoder.yaml beside it")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the DiT config (key=value)")
    p.add_argument("--out", default="runs/bench_quality", help="run directory (run.out_dir) and report folder")
    p.add_argument("--every", type=int, default=500, help="training steps between judged checkpoints")
    p.add_argument("--num", type=int, default=256, help="held-out captions judged per checkpoint")
    p.add_argument("--nproc", type=int, default=2, help="local training processes")
    p.add_argument("--skip-train", action="store_true", help="judge the checkpoints already in --out")
    p.add_argument("--batch-size", type=int, default=32)
    add_device_argument(p)
    p.set_defaults(func=bench_quality)


def step_dirs(checkpoints: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under `checkpoints`, by step."""
    from trainer.checkpoint import COMPLETE

    found = []
    for d in Path(checkpoints).glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / COMPLETE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def judge_checkpoint(directory: Path, num: int, steps: int, cfg_scale: float, batch_size: int, device) -> dict:
    """The adherence row of one checkpoint: accuracies and 95% Wilson intervals."""
    from trainer.cascade import Cascade
    from trainer.evaluate import evaluate_adherence
    from trainer.sampling import SamplerSettings

    cascade = Cascade.load(directory, SamplerSettings(steps=steps, cfg_scale=cfg_scale), device=device)
    result, _, _ = evaluate_adherence(cascade, num, batch_size=batch_size)
    report = result.generated
    return {"accuracy": report.accuracy, "interval": {k: list(report.interval(k)) for k in report.accuracy},
            "num": report.num_samples, "judge_reliable": result.reliable}


def plot_curve(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Adherence (%) against training step, one line per attribute, as a PNG (PIL only)."""
    from PIL import Image, ImageDraw

    W, H, left, right, top, bottom = 640, 400, 50, 110, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    steps = [r["step"] for r in rows]
    lo_s, hi_s = 0, max(steps + [1])
    x = lambda s: left + (W - left - right) * (s - lo_s) / max(hi_s - lo_s, 1)  # noqa: E731
    y = lambda v: top + (H - top - bottom) * (1 - v)  # noqa: E731
    for v in (0.0, 0.25, 0.5, 0.6, 0.75, 0.85, 1.0):
        d.line([(left, y(v)), (W - right, y(v))], fill=(200, 200, 200) if v not in (0.6, 0.85) else (255, 180, 180))
        d.text((5, y(v) - 6), f"{100 * v:.0f}%", fill="black")
    for s in steps:
        d.text((x(s) - 10, H - bottom + 5), str(s), fill="black")
    d.text((left, 8), title or "prompt adherence vs training step", fill="black")
    d.text(((W - right) // 2, H - 18), "training step", fill="black")
    keys = [k for k in COLORS if any(k in r["accuracy"] for r in rows)]
    for i, key in enumerate(keys):
        pts = [(x(r["step"]), y(r["accuracy"][key])) for r in rows if key in r["accuracy"]]
        width = 3 if key == "overall" else 2
        if len(pts) > 1:
            d.line(pts, fill=COLORS[key], width=width)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=COLORS[key])
        d.line([(W - right + 10, top + 18 * i + 6), (W - right + 30, top + 18 * i + 6)], fill=COLORS[key], width=width)
        d.text((W - right + 35, top + 18 * i), key, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def train_recipe(config: str, overrides: list[str], out: str, every: int, nproc: int) -> str:
    """The demo's stages into `out` with a checkpoint kept every `every` steps; returns the DiT's
    checkpoint directory."""
    from launch.demo import stage_arguments, synth, torchrun, train_latent_dit
    from trainer.config import load_config

    (ae_config, *ae_overrides), (_, *dit_overrides) = stage_arguments(config, [f"run.out_dir={out}", *overrides])
    dit_overrides += [f"checkpoint.every={every}", "checkpoint.keep=1000"]
    cfg = load_config(config, dit_overrides)
    synth(cfg.data.shards, cfg.data.resolution)
    torchrun(nproc, ae_config, ae_overrides)
    train_latent_dit(nproc, config, dit_overrides)
    return cfg.checkpoint.dir


def bench_quality(args: argparse.Namespace) -> int:
    from trainer.config import load_config

    cfg = load_config(args.config, [f"run.out_dir={args.out}", *args.overrides])
    checkpoints = cfg.checkpoint.dir
    if not args.skip_train:
        checkpoints = train_recipe(args.config, args.overrides, args.out, args.every, args.nproc)
    found = step_dirs(checkpoints)
    if not found:
        print(f"no complete checkpoints under {checkpoints}")
        return 1
    rows = []
    for step, directory in found:
        row = {"step": step, **judge_checkpoint(directory, args.num, cfg.log.sample_steps, cfg.log.sample_cfg,
                                                args.batch_size, args.device)}
        rows.append(row)
        print(f"step {step:>6}: " + "  ".join(
            f"{k} {100 * v:5.1f}% [{100 * row['interval'][k][0]:.1f}, {100 * row['interval'][k][1]:.1f}]"
            for k, v in row["accuracy"].items()), flush=True)
    out = Path(args.out)
    record = {"config": args.config, "overrides": args.overrides, "num": args.num,
              "sampler": {"steps": cfg.log.sample_steps, "cfg": cfg.log.sample_cfg}, "rows": rows}
    (out / "quality.json").write_text(json.dumps(record, indent=1) + "\n")
    png = plot_curve(rows, out / "quality.png", f"{args.config}: adherence on {args.num} held-out captions")
    print(f"wrote {out / 'quality.json'} and {png}")
    return 0

