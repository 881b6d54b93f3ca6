"""`dit demo`: the main job end to end on its embedded default, on this machine.

synthetic captioned shapes -> shards -> KL autoencoder (DeepSpeed ZeRO-2, N local ranks)
-> latent shards (`dit data precompute`: latents and text embeddings, encoded once) -> latent
text-to-image DiT (ZeRO-2, N ranks) -> EMA sample grid -> `dit sample` of the fixed prompts
and the shapes judge's prompt adherence on held-out captions.
Each training stage is started exactly as a user would: `torchrun ... dit train CONFIG`.

Overrides (`dit demo CONFIG KEY=VALUE ...`) are keys of the DiT's config. Those of what the two
stages share (SHARED_SECTIONS: the run, the dataset and its pixel settings, the autoencoder that
one trains and the other encodes with, DeepSpeed but for its splits of the DiT) reach the
autoencoder stage too; `autoencoder:KEY=VALUE` sets a key of the autoencoder stage's config
(configs/demo_autoencoder.yaml) alone, after those.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trainer.codes import EXIT_CONFIG
from trainer.config import ConfigError, load_config

DEMO_SAMPLES = 2000
AUTOENCODER_CONFIG = "demo_autoencoder.yaml"  # beside the DiT's config
# Keys (or sections) whose overrides describe both stages (see the module's docstring): the run,
# the dataset and the pixels made of it (the autoencoder encodes what the DiT trains on), the
# autoencoder, DeepSpeed. A stage's own loader settings (data.batch_size, num_workers) stay its own.
SHARED_SECTIONS = ("run", "model.autoencoder", "deepspeed", "data.shards", "data.kind", "data.resolution",
                   "data.resolutions", "data.aspect_buckets", "data.bucket_multiple", "data.num_frames",
                   "data.frame_buckets", "data.frame_stride", "data.fps", "data.random_crop")
# ... except DeepSpeed's splits of the DiT (its blocks over pipeline stages, its tokens over
# ranks), which the autoencoder stage refuses
DIT_ONLY = ("deepspeed.pipeline_stages", "deepspeed.sequence_parallel_size")
AUTOENCODER_ONLY = "autoencoder:"  # the prefix of an override of the autoencoder stage alone
# What the DiT stage reads of the autoencoder stage's output: one stage's alone would part them.
AGREED_SECTIONS = ("run.out_dir", "model.autoencoder")


def in_sections(override: str, sections: tuple[str, ...]) -> bool:
    """Whether the key of `override` (KEY=VALUE) is one of `sections` or under one."""
    key = override.split("=", 1)[0]
    return any(key == section or key.startswith(section + ".") for section in sections)


def stage_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`dit demo`'s overrides split into (the autoencoder stage's, the DiT stage's): those of
    SHARED_SECTIONS (DIT_ONLY aside) reach both, `autoencoder:KEY=VALUE` the autoencoder alone
    (after the others), the rest the DiT alone.
    ['data.resolution=64', 'stage.steps=9', 'autoencoder:stage.steps=5'] ->
    (['data.resolution=64', 'stage.steps=5'], ['data.resolution=64', 'stage.steps=9'])"""
    own = [o.removeprefix(AUTOENCODER_ONLY) for o in overrides if o.startswith(AUTOENCODER_ONLY)]
    for override in own:
        if in_sections(override, AGREED_SECTIONS):
            raise ConfigError(override.split("=", 1)[0], f"{AUTOENCODER_ONLY}{override} would set it for the "
                              "autoencoder stage alone, but the DiT stage reads the autoencoder that stage saves "
                              "there: drop the prefix to set it for both")
    dit = [o for o in overrides if not o.startswith(AUTOENCODER_ONLY)]
    shared = [o for o in dit if in_sections(o, SHARED_SECTIONS) and not in_sections(o, DIT_ONLY)]
    return shared + own, dit


def stage_arguments(config: str | Path, overrides: list[str]) -> tuple[list[str], list[str]]:
    """The `dit train` arguments (the config file, then its overrides) of the demo's two
    training stages, (the autoencoder's, the DiT's), from `dit demo CONFIG OVERRIDES`. The
    autoencoder stage runs in the DiT's run.out_dir, whatever its own file says."""
    ae_overrides, dit_overrides = stage_overrides(overrides)
    out_dir = load_config(config, dit_overrides).run.out_dir
    return ([str(Path(config).with_name(AUTOENCODER_CONFIG)), f"run.out_dir={out_dir}", *ae_overrides],
            [str(config), *dit_overrides])


def torchrun(nproc: int, config: str | Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "launch.cli", "train", str(config), *overrides]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def synth(out_dir: str, resolution: int) -> None:
    if (Path(out_dir) / "manifest.json").is_file():
        print(f"shards already in {out_dir}", flush=True)
        return
    from launch.cli import main

    code = main(["data", "synth", "--out", out_dir, "--num", str(DEMO_SAMPLES), "--size", str(resolution),
                 "--shard-size", "250", "--seed", "0"])
    if code:
        raise SystemExit(code)


def precompute_latents(config: str | Path, overrides: list[str]) -> str:
    """The DiT's training shards: the latents and text embeddings of the config's shards,
    written once by its frozen autoencoder and text encoder (`dit data precompute` with
    trainer.stages.pretrain:precompute_encoder) into run.out_dir/latents. A complete earlier
    write (its manifest is written last) is reused only when it was encoded by the same
    autoencoder weights, text encoder and source shards; otherwise it is written again. Each of
    the demo's 24 epochs would otherwise run the autoencoder on every sample again: 73 of a
    step's 342 ms on one core."""
    from data_pipeline.manifest import MANIFEST_NAME, load_manifest
    from data_pipeline.precompute import precompute
    from launch.sample_cmd import parse_device
    from trainer.stages.pretrain import precompute_encoder

    cfg = load_config(config, overrides)
    out = Path(cfg.run.out_dir) / "latents"
    encoded_by = latent_provenance(cfg)
    if (out / MANIFEST_NAME).is_file() and load_manifest(str(out)).extra.get("encoded_by") == encoded_by:
        print(f"latent shards already in {out}", flush=True)
        return str(out)
    if out.exists():  # encoded by other weights or shards, or a write cut short (no manifest yet)
        print(f"the latent shards in {out} are not this run's (other weights or shards, or unfinished): writing "
              f"them again", flush=True)
        shutil.rmtree(out)
    encoder = precompute_encoder(str(config), overrides, device=str(parse_device("auto")))
    precompute(cfg.data.shards, str(out), encoder, cfg.data, batch_size=64, encoded_by=encoded_by)
    return str(out)


def latent_provenance(cfg) -> dict:
    """What the latent shards depend on: the sha256 of the autoencoder's weights, config and
    latent normalisation, the text encoder's settings, and the source shards' fingerprint."""
    from data_pipeline.manifest import resolve_source
    from trainer.encoder_record import encoder_identity

    return {**encoder_identity(cfg.model), "source": resolve_source(cfg.data.shards).fingerprint(),
            "resolution": cfg.data.resolution}


def train_latent_dit(nproc: int, config: str | Path, overrides: list[str]) -> None:
    """Precompute the latent shards, then train the DiT of `config` on them."""
    latents = precompute_latents(config, overrides)
    torchrun(nproc, config, [*overrides, f"data.shards={latents}"])


DEMO_MARKER = ".dit-demo"  # in run.out_dir: the folder is a demo's, whose outputs a rerun may delete


class NotADemoFolder(RuntimeError):
    """run.out_dir holds files no demo wrote: the demo deletes nothing there and does not run."""


def demo_outputs(cfg, ae_cfg) -> list[Path]:
    """What a demo writes into run.out_dir besides its shards: both stages' checkpoints and
    logs, the autoencoder, the latent shards and the evaluation (the paths of the configs)."""
    root = Path(cfg.run.out_dir)
    paths = [cfg.checkpoint.dir, cfg.log.dir, cfg.model.autoencoder.path, ae_cfg.checkpoint.dir, ae_cfg.log.dir,
             ae_cfg.model.autoencoder.path, root / "latents", root / "eval"]
    return [Path(path) for path in paths]


def claim_run_dir(out_dir: str, keep: str, outputs: list[Path]) -> bool:
    """Mark run.out_dir as a demo's (DEMO_MARKER) when it is new, holds nothing but the shards
    `keep` and what a demo writes (`outputs`: a demo's folder from before the marker), or is
    marked already; True then. False for a folder with anything else in it."""
    root = Path(out_dir)
    if root.is_dir() and not (root / DEMO_MARKER).is_file():
        ours = {Path(keep).resolve(), *(path.resolve() for path in outputs)}
        if any(child.resolve() not in ours for child in root.iterdir()):
            return False
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).touch()
    return True


def clear_previous_run(out_dir: str, keep: str, outputs: list[Path]) -> None:
    """The demo is one job from scratch: drop an earlier demo's checkpoints and logs (whose
    config may differ and would be refused on resume), keep its shards. Only the demo's own
    `outputs` inside a folder marked as a demo's are deleted: run.out_dir may be any folder."""
    if not claim_run_dir(out_dir, keep, outputs):
        raise NotADemoFolder(f"run.out_dir={out_dir} holds files that no demo wrote (it has no {DEMO_MARKER}): "
                             "the demo deletes nothing there; give it an empty or new folder")
    root = Path(out_dir).resolve()
    for path in outputs:
        if path.exists() and path.resolve().is_relative_to(root) and path.resolve() != root:
            print(f"removing the previous demo's {path}", flush=True)
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def latest_grid(log_dir: str) -> str:
    records = [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]
    grids = [r["sample_grid"] for r in records if "sample_grid" in r]
    return grids[-1] if grids else "(none)"


def demo(args: argparse.Namespace) -> int:
    (ae_config, *ae_overrides), (_, *dit_overrides) = stage_arguments(args.config, list(args.overrides))
    cfg = load_config(args.config, dit_overrides)
    ae_cfg = load_config(ae_config, ae_overrides)  # both stages' overrides fail here, before anything runs
    timings = {}
    t0 = time.time()
    outputs = demo_outputs(cfg, ae_cfg)
    if args.resume:
        claim_run_dir(cfg.run.out_dir, cfg.data.shards, outputs)
    else:
        try:
            clear_previous_run(cfg.run.out_dir, cfg.data.shards, outputs)
        except NotADemoFolder as e:
            print(f"dit demo: {e}", file=sys.stderr)
            return EXIT_CONFIG
    synth(cfg.data.shards, cfg.data.resolution)
    timings["shards"] = time.time() - t0
    t1 = time.time()
    torchrun(args.nproc, ae_config, ae_overrides)
    timings["autoencoder"] = time.time() - t1
    t2 = time.time()
    train_latent_dit(args.nproc, args.config, dit_overrides)
    timings["latents+dit"] = time.time() - t2
    t3 = time.time()
    from launch.eval_cmd import demo_evaluation

    report = demo_evaluation(cfg.checkpoint.dir, f"{cfg.run.out_dir}/eval", list(cfg.log.prompts),
                             cfg.log.sample_steps, cfg.log.sample_cfg)
    timings["sample+eval"] = time.time() - t3
    print("\n== demo done ==")
    for name, sec in timings.items():
        print(f"{name:>12}: {sec:7.1f} s")
    print(f"{'total':>12}: {time.time() - t0:7.1f} s")
    print(f"autoencoder reconstructions: {latest_grid(ae_cfg.log.dir)}")
    recon = Path(cfg.model.autoencoder.path) / "reconstruction_adherence.json"
    if recon.is_file():
        record = json.loads(recon.read_text())
        print(f"autoencoder reconstructions of {record['num']} held-out images, judged: " + ", ".join(
            f"{k} {100 * v:.1f}% [{100 * record['interval'][k][0]:.1f}, {100 * record['interval'][k][1]:.1f}]"
            for k, v in record["accuracy"].items()))
    print(f"sample grid (EMA, {cfg.log.sample_steps} DDIM steps, CFG {cfg.log.sample_cfg}): {latest_grid(cfg.log.dir)}")
    print(f"prompt adherence of {report.num_samples} generated samples (held-out samples' captions, 95% interval):")
    for key, value in report.accuracy.items():
        lo, hi = report.interval(key)
        print(f"{key:>12}: {100 * value:5.1f}%  [{100 * lo:.1f}, {100 * hi:.1f}]")
    print_adherence_splits(Path(cfg.run.out_dir) / "eval" / "adherence.json")
    return 0


def print_adherence_splits(path: Path) -> None:
    """The overall figure of the captions seen in training and of the novel ones, apart, from
    the `dit eval adherence` record at `path`: many held-out captions are training captions
    (the synthetic vocabulary is small), so the figure above is part recall, part generalization."""
    from trainer.evaluate import SPLITS
    from trainer.judge import AdherenceReport

    record = json.loads(path.read_text()) if path.is_file() else {}
    for name, fields in record.get("splits", {}).items():
        split = AdherenceReport(**fields)
        if "overall" not in split.accuracy:
            print(f"{SPLITS[name]:>26}: none")
            continue
        lo, hi = split.interval("overall")
        correct, total = split.counts["overall"]
        print(f"{SPLITS[name]:>26}: overall {100 * split.accuracy['overall']:5.1f}%  [{100 * lo:.1f}, {100 * hi:.1f}]"
              f"  ({correct} of {total} samples)")
    if record.get("split_note"):
        print(record["split_note"])
