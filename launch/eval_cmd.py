"""`dit eval adherence|distance|memorization CKPT_OR_RECIPE`: evaluation on synthetic shapes.

    adherence     the shapes judge on samples of held-out captions, beside its accuracy on real
                  held-out data (must be >= 98%, else exit 3) and on noise
    distance      Frechet distances to held-out real data: shapes-CNN features, pixel
                  thumbnails, and Inception FID with --inception-weights (torch-fidelity)
    memorization  nearest training sample of each generated sample, near-copy fraction beside
                  held-out real data and the closed-form ideal denoiser of the training set

Each runs its models on --device (default: the accelerator if present, else cpu).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from launch.sample_cmd import add_sampler_arguments, load_cascade, parse_device, positive_int
from trainer.codes import EXIT_CONFIG

EXIT_UNRELIABLE = 3  # the judge is below 98% on real data: its numbers mean nothing


def _write_json(out: Optional[str], name: str, record: dict) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text(json.dumps(record, indent=1) + "\n")


def adherence(args: argparse.Namespace) -> int:
    from trainer.cascade import save_samples
    from trainer.evaluate import evaluate_adherence

    cascade = load_cascade(args)
    result, generated, prompts = evaluate_adherence(cascade, args.num, args.seed, args.batch_size, args.num_real)
    print(result.table())
    if args.out:
        save_samples(generated, prompts, Path(args.out) / "samples", fps=cascade.fps)
    _write_json(args.out, "adherence.json", result.as_dict())
    return 0 if result.reliable else EXIT_UNRELIABLE


def distance(args: argparse.Namespace) -> int:
    from trainer.evaluate import distribution_distances, inception_fid, train_feature_net
    from trainer.heldout import heldout_set

    cascade = load_cascade(args)
    real, captions = heldout_set(cascade.stages[-1].cfg.data, args.num)
    generated = cascade.sample_batched(captions, args.seed, args.batch_size)  # per-prompt noise
    net = train_feature_net(generated.shape[-1], steps=args.feature_steps, seed=args.seed)
    record = distribution_distances(generated, real, net)
    if args.inception_weights:
        record["fid_inception"] = inception_fid(generated, real, args.inception_weights, args.device)
    for key, value in record.items():
        print(f"{key:<28} {value:10.4f}")
    _write_json(args.out, "distance.json", record)
    return 0


def memorization(args: argparse.Namespace) -> int:
    from trainer.evaluate import memorization_audit, near_copy_threshold

    try:
        near_copy_threshold(args.space, args.threshold)
    except ValueError as e:
        print(f"dit eval memorization: {e}", file=sys.stderr)
        return EXIT_CONFIG
    report = memorization_audit(load_cascade(args), args.num, args.seed, args.space, args.threshold,
                                0 if args.no_reference else args.reference_steps, args.reference_limit,
                                args.batch_size)
    print(report.table())
    _write_json(args.out, "memorization.json", vars(report))
    return 0


def _subcommand(sub: argparse._SubParsersAction, name: str, help_: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("checkpoint", metavar="CKPT_OR_RECIPE", help="checkpoint directory or cascade YAML")
    p.add_argument("--out", help="directory for the JSON report (and samples)")
    add_sampler_arguments(p)
    p.set_defaults(func=func)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    """Add `adherence`, `distance` and `memorization` under `dit eval`."""
    p = _subcommand(sub, "adherence", "prompt adherence measured by the shapes judge", adherence)
    p.add_argument("--num", type=positive_int, default=64, help="generated samples (held-out captions)")
    p.add_argument("--num-real", type=positive_int, default=None, help="real held-out samples for the judge check")
    p = _subcommand(sub, "distance", "Frechet distances to held-out real data", distance)
    p.add_argument("--num", type=positive_int, default=128)
    p.add_argument("--feature-steps", type=positive_int, default=300, help="training steps of the feature CNN")
    p.add_argument("--inception-weights", help="local Inception-v3 weights for FID (needs torch-fidelity)")
    p = _subcommand(sub, "memorization", "nearest training samples and near-copy fraction", memorization)
    p.add_argument("--num", type=positive_int, default=32)
    p.add_argument("--space", choices=("pixel", "latent"), default="pixel")
    p.add_argument("--threshold", type=float, help="near-copy RMS distance (default: trainer.evaluate.NEAR_COPY_RMS)")
    p.add_argument("--reference-steps", type=positive_int, default=25, help="DDIM steps of the closed-form reference")
    p.add_argument("--reference-limit", type=positive_int, default=20_000, help="max training samples held for it")
    p.add_argument("--no-reference", action="store_true", help="skip the closed-form reference")


DEMO_EVAL_NUM = 256  # held-out captions of the demo's evaluation: 64 would leave +-6 points of noise
DEMO_EVAL_BATCH = 64  # captions sampled together: the same samples as 16 at a time (per-prompt noise,
#                        trainer.cascade.PromptSeeds; up to float rounding), 13% sooner


def demo_evaluation(checkpoint: str, out_dir: str, prompts: list[str], steps: int = 25, cfg: float = 3.0,
                    num: int = DEMO_EVAL_NUM, device: str = "auto", rescale: Optional[float] = None):
    """The end of `make demo`: `dit sample` of `prompts` into out_dir/samples and `dit eval
    adherence` on `num` held-out captions, on `device` (a `--device` value); prints the table
    (95% Wilson intervals beside the generated figures) and returns the generated report
    (`.accuracy`, `.interval(key)`)."""
    from trainer.cascade import Cascade, save_samples
    from trainer.evaluate import evaluate_adherence
    from trainer.sampling import SamplerSettings

    settings = SamplerSettings(steps=steps, cfg_scale=cfg)
    if rescale is not None:
        settings = SamplerSettings(steps=steps, cfg_scale=cfg, guidance_rescale=rescale)
    cascade = Cascade.load(checkpoint, settings, device=parse_device(device))
    grid = save_samples(cascade.sample_batched(prompts, 0), prompts,
                        Path(out_dir) / "samples", fps=cascade.fps)["grid"]
    print(f"samples: {Path(out_dir) / 'samples' / grid}")
    result, _, _ = evaluate_adherence(cascade, num, batch_size=DEMO_EVAL_BATCH)
    _write_json(out_dir, "adherence.json", result.as_dict())
    print(result.table())
    return result.generated
