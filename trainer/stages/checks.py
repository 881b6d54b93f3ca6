"""The checks of the stages that need more than the config's values (the teacher's
config.yaml, the manifests of precomputed latents), importable without torch: `dit train` and
`dit launch` run `preflight` before any process group starts or network is built, so a bad
config fails in about a second with the key named (ConfigError); the distillation stages run
the same teacher checks when built.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline import remote
from data_pipeline.errors import DataError
from data_pipeline.manifest import (ENCODED_BY, STAND_IN, cascade_pairs_mismatch, latent_shapes_mismatch,
                                    pixel_settings_mismatch, resolve_source, source_specs)
from trainer.checkpoint_format import (ENCODERS_FILE, STAGE_FILE, CheckpointError, is_checkpoint, resolve,
                                       student_round)
from trainer.codes import world_from_env
from trainer.config import (NORM_FILE, ConfigError, DataConfig, DiffusionConfig, ModelConfig, RunConfig,
                            autoencoder_facts, check_weighting, flatten, saved_autoencoder, switched_off, to_dict,
                            unread_settings, validate)
from trainer.encoder_record import check_encoders, encoder_identity, same_encoders
from trainer.stage_config import AdversarialSettings, distilled_steps

# Keys that must agree with the teacher's run config: the student is the teacher's network on
# the teacher's data, schedule and text encoder.
TEACHER_KEYS = {
    "model": None,  # all of it except the keys below
    "diffusion": ("schedule", "num_timesteps", "beta_start", "beta_end", "zero_terminal_snr", "prediction",
                  "shift_base_resolution", "shift_base_frames"),
    "data": ("kind", "resolution", "num_frames"),
}
# Free to differ: the student's own options (what it is conditioned on, how it trains: the
# network is the same), and where weights live (copies may move).
FREE_MODEL_KEYS = ("guidance_embed", "activation_checkpointing", "checkpoint_policy", "compile", "flat_params",
                   "text.path", "autoencoder.path")


_said: set[str] = set()


def note(text: str) -> None:
    """A line the preflight says before training: by the first rank only (every `dit train` rank
    runs the preflight) and once per process (`dit launch --slurm --min-nodes` checks the job
    for each allocation size)."""
    if text not in _said and world_from_env()[0] == 0:
        _said.add(text)
        print(text, flush=True)


def read_run_config(yaml_text: str) -> RunConfig:
    """A resolved config.yaml (a checkpoint's), parsed from its text, as a validated RunConfig."""
    schema = OmegaConf.structured(RunConfig)
    try:
        run: RunConfig = OmegaConf.to_object(OmegaConf.merge(schema, yaml.safe_load(yaml_text) or {}))  # type: ignore
    except OmegaConfBaseException as e:
        raise ConfigError(f"stage.teacher:{getattr(e, 'full_key', '?')}", str(e).splitlines()[0]) from None
    validate(run, trained=True)
    return run


def check_same_as_teacher(run: dict[str, Any], teacher: dict[str, Any], where: str,
                          unread: Sequence[str] = ()) -> None:
    """The student's model (except FREE_MODEL_KEYS), schedule and data shapes must be the
    teacher's, but for the `unread` settings (`unread_settings`: what neither reads); the error
    names the key and the teacher's value."""
    for section, keys in TEACHER_KEYS.items():
        ours, theirs = flatten(run[section]), flatten(teacher[section])
        names = keys or [k for k in theirs if k not in FREE_MODEL_KEYS]
        for key in names:
            if ours.get(key) != theirs[key] and f"{section}.{key}" not in unread:
                raise ConfigError(f"{section}.{key}", f"the teacher ({where}) was trained with "
                                  f"{section}.{key}={theirs[key]!r}, this run has {ours.get(key)!r}; set it to "
                                  f"the teacher's value")


def check_teacher_exists(directory: str) -> None:
    if not directory:
        raise ConfigError("stage.teacher", "distillation needs the teacher's checkpoint directory")
    if not Path(directory).exists():
        raise ConfigError("stage.teacher", f"{directory} does not exist; point it at a checkpoint directory")


def check_teacher(directory: str, model: ModelConfig, diffusion: DiffusionConfig, data: DataConfig,
                  config_yaml: Optional[str] = None) -> RunConfig:
    """The teacher's run config, after checking that `stage.teacher` names one whose network,
    schedule and data this run shares (reads only its config.yaml unless given)."""
    check_teacher_exists(directory)
    step = resolve(directory)
    if config_yaml is None:
        if not (step / "config.yaml").is_file():
            raise ConfigError("stage.teacher", f"{directory} holds no checkpoint (no config.yaml); point it at a "
                                               f"checkpoint root, a step directory or a round export")
        config_yaml = (step / "config.yaml").read_text()
    cfg = read_run_config(config_yaml)
    ours = {"model": to_dict(model), "diffusion": to_dict(diffusion), "data": to_dict(data)}
    check_same_as_teacher(ours, {"model": to_dict(cfg.model), "diffusion": to_dict(cfg.diffusion),
                                 "data": to_dict(cfg.data)}, directory, unread_settings(cfg))
    if cfg.model.guidance_embed and not model.guidance_embed:
        raise ConfigError("model.guidance_embed", f"the teacher ({directory}) is guidance-conditioned (a distilled "
                                                  "student that takes the guidance scale): set model.guidance_embed=true")
    check_encoders(step, model, "distilling it")
    return cfg


def check_round_length(saved: int, rounds: int, steps: int) -> None:
    """A progressive run's rounds keep the length they started with (`saved` steps each): a
    resumed stage.steps may move the end of the last one, not cut it or one before it short."""
    needed = saved * rounds
    if steps < needed:
        raise ConfigError("stage.steps", f"this progressive run trains {rounds} rounds of {saved} steps (stage.steps "
                          f"split when it started), so it needs stage.steps >= {needed}; {steps} would end it "
                          f"inside a round. Resume with stage.steps >= {needed}, or distil further from a round "
                          f"export in a new run")


def check_conditional_phase(conditional_steps: int, steps: int) -> None:
    """An adversarial run keeps the conditional phase it started with: a resumed stage.steps
    must leave an unconditional phase after it."""
    if steps <= conditional_steps:
        raise ConfigError("stage.steps", f"this adversarial run's conditional phase lasts {conditional_steps} steps "
                          f"(half of stage.steps when it started); stage.steps={steps} leaves no unconditional "
                          f"phase. Resume with stage.steps > {conditional_steps}")


def check_resumed_stage(directory: Path, cfg: RunConfig) -> None:
    """The checks a distillation stage makes of its saved state when it resumes (rounds'
    length, the conditional phase), made from the checkpoint's stage.safetensors before any
    process starts (read as numpy: no torch here)."""
    path = Path(directory) / STAGE_FILE
    if cfg.stage.kind not in ("progressive", "adversarial") or not path.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        saved = {k: int(f.get_tensor(k)) for k in ("round_length", "conditional_steps") if k in f.keys()}
    if cfg.stage.kind == "progressive" and "round_length" in saved:
        check_round_length(saved["round_length"], len(cfg.stage.rounds), cfg.stage.steps)
    if cfg.stage.kind == "adversarial" and "conditional_steps" in saved:
        check_conditional_phase(saved["conditional_steps"], cfg.stage.steps)


def check_autoencoder_given(cfg: RunConfig, queued: bool = False) -> None:
    """A latent DiT learns the latents of one trained autoencoder: without model.autoencoder.path
    every process built its own randomly initialised one, so training, its previews and each
    `dit sample` decoded with other weights, without an error; a path holding none failed in
    every rank after DeepSpeed started (`queued`: the job runs later, after a job that may write
    it: said, not refused)."""
    ae = cfg.model.autoencoder
    if cfg.stage.kind == "autoencoder" or ae.kind == "none":
        return
    if not ae.path:
        raise ConfigError("model.autoencoder.path", f"a latent DiT (model.autoencoder.kind={ae.kind}) needs the "
                          f"trained autoencoder whose latents it learns: give its directory (`dit train` with "
                          f"stage.kind=autoencoder writes one); without it each process makes a random one")
    if saved_autoencoder(ae):
        return
    if queued:  # a job queued behind the one training it (sbatch --dependency=afterok:...)
        note(f"note: model.autoencoder.path {ae.path} holds no autoencoder yet: the job needs one there when it "
             f"starts (an autoencoder stage's job before it)")
        return
    raise ConfigError("model.autoencoder.path", f"{ae.path} holds no autoencoder (no config.json): train one "
                      f"there first (`dit train` with stage.kind=autoencoder) or point the key at a saved "
                      f"diffusers autoencoder folder")  # each rank failed on it after DeepSpeed started


# The sizes of a fresh autoencoder (AutoencoderConfig) by their names in a 2-D diffusers
# AutoencoderKL's config.json; latent_channels is read off the built network (any class).
AE_SIZES = {"block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
            "sample_size": "sample_size", "mid_attention": "mid_block_add_attention"}


def check_autoencoder_settings(cfg: RunConfig) -> None:
    """A saved autoencoder folder is built from its own config.json: model.autoencoder's sizes
    are read only when the autoencoder stage builds a fresh one. Set away from their defaults
    to other values than the folder's, they were ignored without a word (a latent DiT told
    latent_channels=16 read the folder's 4); refused naming the key."""
    ae = cfg.model.autoencoder
    if cfg.stage.kind == "autoencoder" or not saved_autoencoder(ae):
        return
    saved = json.loads((Path(ae.path) / "config.json").read_text())
    ours, defaults = to_dict(ae), to_dict(type(ae)())
    found = {key: saved.get(name) for key, name in AE_SIZES.items()}
    found["latent_channels"] = autoencoder_facts(ae)[2]
    for key, value in found.items():
        if ours[key] != defaults[key] and ours[key] != value:
            said = "does not set it" if value is None else f"says {value}"
            raise ConfigError(f"model.autoencoder.{key}", f"{ours[key]} is not the saved autoencoder's: {ae.path} is "
                                                          f"built from its own config.json, which {said}; the setting "
                                                          f"is read only when the autoencoder stage builds a fresh one "
                                                          f"(remove it)")


def note_untrained_null(cfg: RunConfig) -> None:
    """stage.cfg_dropout=0 in a run that starts from scratch: the null caption's prediction,
    which classifier-free guidance (Ho & Salimans 2022) steers away from, is never trained."""
    if cfg.stage.kind in ("pretrain", "superres") and cfg.stage.cfg_dropout == 0 and not cfg.checkpoint.init_from:
        note(f"note: stage.cfg_dropout=0: the model never learns the empty caption's prediction, which classifier-"
             f"free guidance steers away from; the sample grids (log.sample_cfg={cfg.log.sample_cfg:g}) and `dit "
             f"sample --cfg` above 1 guide against an untrained one (keep a dropout, 0.1 by default)")


def note_late_stall_watch(cfg: RunConfig) -> None:
    """data.stall_timeout_s at or above deepspeed.comm_timeout_s: a rank held by a hung loader
    worker makes the other ranks' next collective time out before its worker is replaced."""
    data, ds = cfg.data, cfg.deepspeed
    if data.num_workers and 0 < ds.comm_timeout_s <= data.stall_timeout_s:
        note(f"note: data.stall_timeout_s={data.stall_timeout_s:g} is not below deepspeed.comm_timeout_s="
             f"{ds.comm_timeout_s}: a loader worker that hangs is replaced only after the other ranks' "
             f"collectives time out (set it lower to keep the run going)")


def note_switched_off(cfg: RunConfig) -> None:
    """Say which settings this run ignores because what reads them is off (`switched_off`)."""
    for key, value, switch in switched_off(cfg, refused=False):
        note(f"note: {key}={value} is read only with {switch}: this run ignores it")


def check_autoencoder_target(cfg: RunConfig) -> None:
    """The autoencoder stage trains a new autoencoder from scratch and saves it at
    model.autoencoder.path: a folder there that the stage did not write (a downloaded diffusers
    VAE: no latent_norm.json) would be replaced by random-start weights, without a word. It
    trains a KL autoencoder: with model.autoencoder.kind=none it trained one all the same, for
    latent stages configured as pixel-space; without a path it saved it into the working directory."""
    if cfg.stage.kind != "autoencoder":
        return
    ae = cfg.model.autoencoder
    if ae.kind == "none":
        raise ConfigError("model.autoencoder.kind", "is none (a pixel-space DiT), but the autoencoder stage trains a "
                                                    "KL autoencoder for latent stages; set model.autoencoder.kind=kl")
    if not ae.path:
        raise ConfigError("model.autoencoder.path", "the autoencoder stage saves the autoencoder it trains there (for "
                                                    "the latent stages to read); give a folder (empty: it wrote into "
                                                    "the working directory)")
    path = Path(ae.path)
    if not (path / NORM_FILE).is_file():  # not a folder this stage wrote: each save replaces it whole
        if saved_autoencoder(ae):
            raise ConfigError("model.autoencoder.path", f"{path} holds an autoencoder this stage did not write (no "
                                                        f"{NORM_FILE}): the stage trains one from scratch and would "
                                                        f"write over it; point the key at a new folder")
        if path.is_dir() and any(path.iterdir()):
            raise ConfigError("model.autoencoder.path", f"{path} holds files this stage did not write: each save "
                                                        f"replaces the folder whole; point the key at a new folder")
    for key, inside in (("checkpoint.dir", cfg.checkpoint.dir), ("log.dir", cfg.log.dir)):
        if Path(inside).resolve().is_relative_to(path.resolve()):
            raise ConfigError("model.autoencoder.path", f"{path} holds {key}={inside}: each save of the autoencoder "
                                                        f"replaces the folder whole; point the key at a folder of "
                                                        f"its own")


def check_rounds(rounds: Sequence[int], total_steps: int, teacher_steps: Optional[int], num_timesteps: int) -> None:
    """Each round halves the step count of the one before; a distilled teacher is the round -1;
    the first round's teacher takes 2 x its steps on the schedule's `num_timesteps`."""
    if not rounds or any(n < 1 for n in rounds):
        raise ConfigError("stage.rounds", f"{list(rounds)}: list the student step counts, e.g. [16, 8, 4, 2]")
    for before, after in zip(rounds, rounds[1:]):
        if before != 2 * after:
            raise ConfigError("stage.rounds", f"{list(rounds)}: each round halves the previous one's steps "
                                              f"(the teacher takes two steps per student step)")
    if teacher_steps is not None and teacher_steps != 2 * rounds[0]:
        raise ConfigError("stage.rounds", f"the teacher is a {teacher_steps}-step distilled sampler, so the "
                                          f"first round's student has {teacher_steps // 2} steps, not {rounds[0]}")
    if total_steps < len(rounds):
        raise ConfigError("stage.steps", f"{total_steps} steps cannot be split across {len(rounds)} rounds")
    check_sampler_steps(2 * rounds[0], num_timesteps, "stage.rounds")


def check_sampler_steps(steps: int, num_timesteps: int, key: str) -> None:
    """The teacher's sampler takes `steps` steps of a schedule of `num_timesteps` (diffusion.num_timesteps)."""
    if steps > num_timesteps:
        raise ConfigError(key, f"the teacher would sample with {steps} steps, more than the schedule's "
                               f"diffusion.num_timesteps={num_timesteps}; use fewer student steps")


def teacher_steps_for(step_counts: Sequence[int], distilled: Optional[int], at_least: int) -> int:
    """The teacher's sampler: a distilled teacher's own steps, else the smallest multiple of
    every student step count that is >= at_least (so that the trailing grids nest)."""
    if distilled is None:
        base = math.lcm(*step_counts)
        return base * max(1, -(-at_least // base))
    if any(distilled % n for n in step_counts):
        raise ConfigError("stage.rounds", f"the teacher is a {distilled}-step distilled sampler; every student "
                                          f"step count in {list(step_counts)} must divide {distilled}")
    return distilled


def check_adversarial(stage: AdversarialSettings, distilled: Optional[int], teacher_steps: int,
                      num_timesteps: int) -> tuple[list[int], int]:
    """The student's step counts (largest first) and the teacher's sampler steps, after checking
    `stage.rounds` and `stage.adv_mse_weight` against a teacher distilled to `distilled` steps
    and the schedule's `num_timesteps`."""
    if not stage.rounds or min(stage.rounds) < 1:
        raise ConfigError("stage.rounds", f"{list(stage.rounds)}: list the student's step counts, e.g. [4, 2, 1]")
    if stage.adv_mse_weight < 0:
        raise ConfigError("stage.adv_mse_weight", "must be >= 0")
    step_counts = sorted(set(stage.rounds), reverse=True)
    steps = teacher_steps_for(step_counts, distilled, teacher_steps)
    check_sampler_steps(steps, num_timesteps, "stage.rounds" if distilled is not None else "log.sample_steps")
    return step_counts, steps


def teacher_steps_of(cfg: RunConfig) -> Optional[int]:
    """What a distillation run shares, checked from configs alone (no network is built): the
    loss weighting and a fitting teacher; the step count the teacher was distilled into (None: a
    full diffusion model). Each kind's preflight checks its own knobs against it."""
    check_weighting(cfg.diffusion)
    teacher = check_teacher(cfg.stage.teacher, cfg.model, cfg.diffusion, cfg.data)
    steps = teacher_steps(cfg.stage.teacher, teacher.stage)
    check_guidance_taught(cfg.model.guidance_embed, steps, teacher.model.guidance_embed)
    if steps is not None and teacher.model.guidance_embed:
        check_guidance_range(cfg.stage, steps, teacher.stage)
    return steps


def check_guidance_taught(guidance_embed: bool, distilled: Optional[int], teacher_takes_guidance: bool) -> None:
    """A guidance-conditioned student (model.guidance_embed) learns what w does from its teacher:
    one sampled with CFG at w (`distilled` None), or a distilled one that takes w. A distilled
    teacher without that input has its guidance baked in, so its targets ignore w and the
    student's w (`dit sample --cfg`) would be an input trained to do nothing."""
    if guidance_embed and distilled is not None and not teacher_takes_guidance:
        raise ConfigError("model.guidance_embed", f"the teacher is a {distilled}-step distilled sampler with its "
                                                  "guidance baked in (it takes no guidance scale): its targets do not "
                                                  "depend on w, so the student could not learn one; set "
                                                  "model.guidance_embed=false")


def check_guidance_range(stage: Any, distilled: int, teacher_stage: Any) -> None:
    """A distilled teacher that takes the guidance scale learned it on its own [guidance_min,
    guidance_max]: a student drawing w outside that range learned the teacher's guesses there
    (queried at untrained scales, without a word; sampling such a w is warned about)."""
    low, high = teacher_stage.guidance_min, teacher_stage.guidance_max
    for key, w in (("stage.guidance_min", stage.guidance_min), ("stage.guidance_max", stage.guidance_max)):
        if not low <= w <= high:
            raise ConfigError(key, f"w={w:g} is outside [{low:g}, {high:g}], the guidance scales the teacher (a "
                                   f"{distilled}-step distilled sampler with a guidance input) was trained on: its "
                                   f"targets there are guesses; draw w within that range")


def teacher_steps(directory: str, stage: Any) -> Optional[int]:
    """The step count the teacher at `directory` (`stage`: its run's StageConfig) samples with:
    None for a full diffusion model; for a progressive step directory saved mid-run, its
    round's (`student_round`), not the run's last round's (a 4-step teacher taken for 2 steps
    would have been distilled into 1 with 2-step targets)."""
    try:
        return distilled_steps(stage, student_round(resolve(directory), stage))
    except CheckpointError as e:
        raise ConfigError("stage.teacher", str(e)) from None


def preflight_progressive(cfg: RunConfig) -> None:
    check_rounds(cfg.stage.rounds, cfg.stage.steps, teacher_steps_of(cfg), cfg.diffusion.num_timesteps)


def preflight_adversarial(cfg: RunConfig) -> None:
    """The adversarial checks; where the teacher is a full diffusion model, what its targets are
    sampled with, said before training: `log.sample_steps` sets it (with the grids' teacher row),
    and a few-step setting meant for the student's grids makes blurry targets."""
    distilled = teacher_steps_of(cfg)
    _, steps = check_adversarial(cfg.stage, distilled, cfg.log.sample_steps, cfg.diffusion.num_timesteps)
    if distilled is None:
        note(f"stage.teacher {cfg.stage.teacher} is a full diffusion model: its targets are {steps}-step DDIM "
             f"samples with CFG (log.sample_steps={cfg.log.sample_steps}, rounded up to a multiple of every step "
             f"count in stage.rounds)")


def check_latent_sources(cfg: RunConfig) -> None:
    """Precomputed latents and text embeddings are outputs of the encoders and pixel settings
    that made them: a run whose autoencoder or text encoder differs from those (a retrained
    autoencoder, another text encoder) would train on latents its own decoder does not read,
    and sample garbage without an error. Each local latent source whose manifest records its
    encoders (`extra.encoded_by`, written by `dit data precompute` with `precompute_encoder`)
    is compared with this run's (the toy stand-in's, its default, refused), and its pixel
    settings with the run's data section (the loader's own check, `check_pixel_settings`, made
    here before any rank starts), and latents
    of several shapes, which no batch can hold together, are refused (`latent_shapes_mismatch`), as
    are latents asked for cascade pairs, which they do not keep (`cascade_pairs_mismatch`); manifests
    from before those records, and remote sources (their manifest is read by the ranks, which
    may hold credentials this host lacks), are not."""
    current: Optional[dict] = None
    latents = []
    for spec in source_specs(cfg.data.shards) + [s.strip() for s in cfg.data.mixture]:
        if remote.is_remote(spec):
            continue
        try:
            manifest = resolve_source(spec)
        except DataError:
            continue  # the stream reports an unreadable source with its own error
        if manifest.kind != "latent":
            continue
        latents.append(manifest)
        recorded = manifest.extra.get(ENCODED_BY)
        if recorded and STAND_IN in recorded:
            raise ConfigError("data.shards", f"the latents of {spec} were made by {recorded[STAND_IN]}, a stand-in "
                              f"for tests (pooled pixels, hashed words) that no DiT trains on: precompute them with "
                              f"`dit data precompute ... --encoder trainer.stages.pretrain:precompute_encoder "
                              f"--encoder-arg config=RUN.yaml`")
        mismatch = pixel_settings_mismatch(manifest, cfg.data)
        if mismatch is not None:
            raise ConfigError(*mismatch)
        if recorded:
            current = current or encoder_identity(cfg.model)
            same_encoders(recorded, current, f"the latents of {spec} were made with",
                           f"precompute {spec} again with this run's config (`dit data precompute ... --encoder "
                           f"trainer.stages.pretrain:precompute_encoder`), or train with the encoders that made it")
    for mismatch in (latent_shapes_mismatch(latents, cfg.data.batch_size),
                     cascade_pairs_mismatch(latents, cfg.data.sr_resolution)):
        if mismatch is not None:
            raise ConfigError(*mismatch)


# Model settings with no weights of their own: a warm start across a change of one loads
# strictly, and its blocks meet other inputs than they learned (sincos added to the tokens vs
# rope rotating q and k).
WEIGHTLESS_MODEL_KEYS = ("model.positions",)


def check_init_source(cfg: RunConfig) -> None:
    """A warm start (`checkpoint.init_from`) from a network that learned other encoders'
    latents or embeddings than this run's (encoders.json: a checkpoint's, or the one `dit export`
    copies into a safetensors export; one from before that, its config's text encoder settings)
    starts from weights that read this run's latents as garbage: refused, as sampling, resuming
    and distilling refuse it. A bare .safetensors file keeps no record and is not checked.
    Another target (prediction, schedule, SNR shift) is what a fine-tune may change on purpose
    (SD 2's v-model, zero terminal SNR: Lin et al. 2024, sec. 3): said, not refused; so is
    another position encoding (WEIGHTLESS_MODEL_KEYS), which the strict load cannot see."""
    init = cfg.checkpoint.init_from
    if not init or not Path(init).is_dir():
        return
    source = resolve(init) if is_checkpoint(init) else Path(init)
    use = "warm-starting from it (checkpoint.init_from)"
    check_encoders(source, cfg.model, use)
    theirs = init_source_config(source)
    if theirs is None:
        return
    if not (source / ENCODERS_FILE).is_file():
        same_encoders({"text": theirs["model"]["text"]}, encoder_identity(cfg.model), f"{init} was trained with",
                      f"{use} needs the text encoder it was trained with")
    learned, ours = flatten(theirs), flatten(to_dict(cfg))
    changed = [key for key in (*(f"diffusion.{k}" for k in TEACHER_KEYS["diffusion"]), *WEIGHTLESS_MODEL_KEYS)
               if learned.get(key) != ours[key]]
    if changed:
        was = ", ".join(f"{key}={learned.get(key)!r}" for key in changed)
        now = ", ".join(repr(ours[key]) for key in changed)
        note(f"checkpoint.init_from: {init} was trained with {was}; this run has {now}: the warm start "
             f"fine-tunes it to this run's (set those keys to its values to train on as it did)")


def init_source_config(source: Path) -> Optional[dict[str, Any]]:
    """The resolved run config (as a dict) a warm-start source was trained with: a step
    directory's config.yaml, a `dit export --format safetensors` folder's config.json; None for
    others (a diffusers export keeps its scheduler's settings only)."""
    if (source / "config.yaml").is_file():
        return yaml.safe_load((source / "config.yaml").read_text())
    record = source / "config.json"
    if record.is_file():
        return json.loads(record.read_text()).get("run_config")
    return None


# stage.kind -> its checks from configs and the teacher's config.yaml; other kinds have none.
PREFLIGHT: dict[str, Callable[[RunConfig], None]] = {
    "progressive": preflight_progressive,
    "adversarial": preflight_adversarial,
}
