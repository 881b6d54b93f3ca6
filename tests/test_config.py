"""Typed configs: overrides, one-line errors naming the key, safe YAML, CLI exit codes."""
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, RunConfig, load_config, validate

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def dit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), RunConfig), path


def test_dotted_override_and_interpolation():
    cfg = load_config(DEMO, ["optim.lr=3e-4", "run.out_dir=/tmp/x", "model.text.max_length=7"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.text.max_length == 7
    assert cfg.data.shards == "/tmp/x/data"  # ${run.out_dir} resolved after the override


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optim.lr=fast", "optim.lr"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("diffusion.prediction=eps", "diffusion.prediction"),
        ("stage.kind=dance", "stage.kind"),
        ("model.text.kindd=x", "model.text.kindd"),
        ("stage.cfg_dropout=1.5", "stage.cfg_dropout"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        # trainer/optim.py: a cosine schedule ending at a negative rate (gradient ascent), eps 0
        # turning never-updated weights into NaN, clipping silently off, torch's own refusals
        # only once the ranks built their engines
        ("optim.min_lr_ratio=-0.5", "optim.min_lr_ratio"),
        ("optim.eps=0", "optim.eps"),
        ("optim.grad_clip=-1", "optim.grad_clip"),
        ("optim.warmup_steps=-2", "optim.warmup_steps"),
        ("optim.betas=[0.9,1.5]", "optim.betas"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.lr=-1e-4", "optim.lr"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("ema.warmup_steps=-1", "ema.warmup_steps"),
        # the demo's DiT reads 4-channel latents: with 3 it stopped at its first forward
        ("model.in_channels=3", "model.in_channels"),
        # each of these was accepted and failed inside the ranks: building the schedule, drawing
        # the sample grid after training and saving, tokenizing, in deepspeed.initialize, at the
        # first forward
        ("diffusion.beta_end=1.5", "diffusion.beta_end"),
        ("diffusion.beta_start=-0.1", "diffusion.beta_start"),
        ("diffusion.beta_start=0", "diffusion.beta_start"),
        ("log.sample_steps=0", "log.sample_steps"),
        ("log.sample_steps=1001", "log.sample_steps"),  # more than diffusion.num_timesteps
        ("log.prompts=[]", "log.prompts"),
        ("model.text.max_length=0", "model.text.max_length"),
        ("model.text.max_length=2", "model.text.max_length"),  # MiniLM: [CLS] [SEP] and no caption
        ("deepspeed.bucket_size=0", "deepspeed.bucket_size"),
        ("data.kind=video", "model.video"),
        ("model.temporal_patch=-1", "model.temporal_patch"),
        ("log.sample_cfg=-1", "log.sample_cfg"),
        ("stage.max_nonfinite_in_row=0", "stage.max_nonfinite_in_row"),  # stopped at the first skipped step
        # a TypeError traceback from validation (2 ** -1 levels); numpy's refusal inside the ranks;
        # the schedule's shift silently off
        ("model.autoencoder.block_out_channels=[]", "model.autoencoder.block_out_channels"),
        ("data.seed=-1", "data.seed"),
        ("diffusion.shift_base_resolution=-1", "diffusion.shift_base_resolution"),
        ("diffusion.shift_base_frames=-2", "diffusion.shift_base_frames"),
        ("checkpoint.dir=", "checkpoint.dir"),  # checkpoints and `latest` in the working directory
        ("log.dir=", "log.dir"),
    ],
)
def test_bad_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert err.value.key == key
    assert key in str(err.value) and "\n" not in str(err.value)


# What a run would ignore, or teach a student wrongly, without a word; a checkpoint's own config
# (`trained`) that says so is still read (it is sampled, exported, distilled as it trained).
NEW_RUN_REFUSALS = [
    # the distillation stages draw their student's steps, not diffusion.timestep_sampler's times
    (["stage.kind=progressive", "stage.teacher=/x", "diffusion.loss_weighting=trunc_snr", "stage.guidance_max=1",
      "diffusion.timestep_sampler=logit_normal"], "diffusion.timestep_sampler"),
    (["stage.kind=autoencoder", "model.autoencoder.path=/x/ae", "model.checkpoint_policy=full"],
     "model.checkpoint_policy"),  # the autoencoder has no DiT blocks to checkpoint
    (["model.text.arch=RN50"], "model.text.arch"),  # a MiniLM run: no open_clip tower to pick
    # no prompt-only samples to judge: the weights were gathered every E steps for nothing
    (["stage.kind=superres", "model.superres=true", "data.sr_resolution=64", "log.eval_every=5"], "log.eval_every"),
    (["data.num_frames=4"], "data.num_frames"),  # an image stream: no clips
    # a student without the guidance input regressed onto targets at random w in [1, 4]: their blend
    (["stage.kind=progressive", "stage.teacher=/x", "diffusion.loss_weighting=trunc_snr"], "stage.guidance_max"),
    (["stage.kind=adversarial", "stage.teacher=/x", "diffusion.loss_weighting=trunc_snr", "stage.rounds=[1]",
      "stage.guidance_min=2", "stage.guidance_max=3"], "stage.guidance_max"),
]


@pytest.mark.parametrize("overrides, key", NEW_RUN_REFUSALS)
def test_a_checkpoints_own_config_is_read_whatever_a_new_run_would_be_refused(overrides, key):
    kind = dict(o.split("=", 1) for o in overrides).get("stage.kind", "pretrain")
    assert load_config(DEMO, overrides, trained=True).stage.kind == kind


def test_a_setting_an_off_switch_leaves_unread_is_said(capsys):
    """An off switch (the loss weighting, the schedule, ema.enabled) turns the settings it reads
    off: said by the preflight, not refused (a config's value kept while a run turns it off)."""
    from trainer.stages import preflight

    preflight(load_config(ROOT / "configs" / "test_tiny.yaml", ["diffusion.min_snr_gamma=3.5", "ema.enabled=false",
                                                                "ema.warmup_steps=7"]))
    out = capsys.readouterr().out
    assert "diffusion.min_snr_gamma=3.5 is read only with diffusion.loss_weighting=min_snr" in out
    assert "ema.warmup_steps=7 is read only with ema.enabled=true" in out and "optim.min_lr_ratio" not in out


def test_a_run_that_never_drops_a_caption_is_told_guidance_has_no_null_to_steer_from(capsys):
    from trainer.stages import preflight

    tiny = ROOT / "configs" / "test_tiny.yaml"
    preflight(load_config(tiny, ["stage.cfg_dropout=0.0", "log.sample_cfg=2.5"]))
    assert "stage.cfg_dropout=0: the model never learns the empty caption's prediction" in capsys.readouterr().out
    preflight(load_config(tiny, ["stage.cfg_dropout=0.0", "checkpoint.init_from=/a/trained/model.safetensors"]))
    assert "cfg_dropout" not in capsys.readouterr().out  # a fine-tune of a model that learned it


def test_a_stall_watch_slower_than_the_collective_timeout_is_said(capsys):
    """A hung loader worker is replaced after data.stall_timeout_s; the other ranks wait for the
    rank it holds only deepspeed.comm_timeout_s."""
    from trainer.stages import preflight

    tiny = ROOT / "configs" / "test_tiny.yaml"
    preflight(load_config(tiny, ["data.num_workers=1", "deepspeed.comm_timeout_s=120"]))
    assert "data.stall_timeout_s=300 is not below deepspeed.comm_timeout_s=120" in capsys.readouterr().out
    for fine in (["data.num_workers=1"], ["data.num_workers=0", "deepspeed.comm_timeout_s=120"],
                 ["data.num_workers=1", "deepspeed.comm_timeout_s=120", "data.stall_timeout_s=60"]):
        preflight(load_config(tiny, fine))
        assert "stall_timeout_s" not in capsys.readouterr().out, fine


@pytest.mark.parametrize("overrides, key", [
    (["stage.kind=superres", "model.superres=true", "data.sr_resolution=64", "stage.noise_aug_max=-0.1"],
     "stage.noise_aug_max"),
    (["stage.kind=superres", "model.superres=true", "data.sr_resolution=64", "stage.noise_aug_sample=0.8"],
     "stage.noise_aug_sample"),  # above the trained 0.5: a level the model never saw
    (["stage.kind=progressive", "stage.teacher=/x", "diffusion.loss_weighting=trunc_snr", "stage.guidance_min=5"],
     "stage.guidance_min"),  # w ~ U[5, 4]
    (["stage.kind=progressive", "stage.teacher=/x", "diffusion.loss_weighting=trunc_snr", "model.guidance_embed=true",
      "log.sample_cfg=6"], "log.sample_cfg"),  # the grids and adherence figures at a w outside the trained [1, 4]
    # a ZeroDivisionError traceback in validation
    (["data.kind=video", "model.video=true", "model.temporal_patch=0"], "model.temporal_patch"),
    # weights of 0 (no training) or below (gradient ascent); every timestep the same
    (["diffusion.zero_terminal_snr=false", "diffusion.loss_weighting=min_snr", "diffusion.min_snr_gamma=0"],
     "diffusion.min_snr_gamma"),
    (["diffusion.timestep_sampler=logit_normal", "diffusion.logit_normal_std=0"], "diffusion.logit_normal_std"),
    # DiT-T/2's pipeline has 6 layers (embedder, 4 blocks, head): a 7th stage got none
    (["deepspeed.pipeline_stages=7", "deepspeed.zero_stage=1"], "deepspeed.pipeline_stages"),
    (["stage.kind=progressive", "stage.teacher=/x", "diffusion.loss_weighting=trunc_snr", "stage.guidance_max=1",
      "log.sample_steps=0"], "log.sample_steps"),
    (["stage.kind=superres", "model.superres=true", "data.sr_resolution=64", "log.sample_steps=1001"],
     "log.sample_steps"),
    # the loss rewarded the KL it weighs
    (["stage.kind=autoencoder", "model.autoencoder.path=/x/ae", "stage.kl_weight=-1"], "stage.kl_weight"),
    # a nested value (a source's name with a dot, read as a path) was a TypeError without a key
    (["data.resampled=true", "data.mixture.x.tar=1"], "data.mixture.x"),
    (["data.resampled=true", "data.mixture={a: [1]}"], "data.mixture.a"),
    # settings of another kind of run, set and silently ignored: a video DiT's, the adversarial stage's
    (["model.temporal_patch=2"], "model.temporal_patch"),
    (["model.attention=full"], "model.attention"),
    (["optim.disc_lr=1e-3"], "optim.disc_lr"),
    *NEW_RUN_REFUSALS,
])
def test_stage_ranges_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, overrides)
    assert err.value.key == key


def test_a_mapping_override_replaces_the_yaml_mapping(tmp_path):
    """data.mixture from the command line is the mixture: merged into the YAML's, an entry could
    never be dropped (as a list override replaces a list); a typed sub-config still takes the
    keys given and keeps the rest."""
    path = tmp_path / "mix.yaml"
    path.write_text("data:\n  resampled: true\n  mixture: {/data/a: 1.0}\nmodel:\n  text: {max_length: 24}\n")
    assert load_config(path, ["data.mixture={/data/b: 2.0}"]).data.mixture == {"/data/b": 2.0}
    assert load_config(path, ["data.mixture={}"]).data.mixture == {}
    text = load_config(path, ["model.text={precision: bf16}"]).model.text
    assert (text.precision, text.max_length) == ("bf16", 24)


def test_settings_of_what_a_stage_does_not_use_are_not_refused():
    """The cosine schedule reads no betas; the autoencoder stage samples no DiT and draws no
    prompts, nor does the superres stage draw log.prompts (its grids caption the preview's);
    the autoencoder stage on clips trains on their frames, without a video DiT; at
    deepspeed.pipeline_stages = depth + 2 every stage holds one layer."""
    load_config(DEMO, ["diffusion.schedule=cosine", "diffusion.beta_end=1.5"])
    load_config(DEMO, ["stage.kind=autoencoder", "log.prompts=[]", "log.sample_steps=0", "log.sample_cfg=-1"])
    load_config(DEMO, ["stage.kind=superres", "model.superres=true", "data.sr_resolution=64", "log.prompts=[]"])
    load_config(DEMO, ["stage.kind=autoencoder", "data.kind=video"])
    load_config(DEMO, ["log.sample_steps=1000", "log.sample_cfg=0", "stage.max_nonfinite_in_row=1"])
    load_config(DEMO, ["deepspeed.pipeline_stages=6", "deepspeed.zero_stage=1"])


def test_eps_with_zero_terminal_snr_is_explained():
    with pytest.raises(ConfigError, match="SNR 0"):
        load_config(DEMO, ["diffusion.prediction=eps"])
    cfg = load_config(DEMO, ["diffusion.prediction=eps", "diffusion.zero_terminal_snr=false"])
    assert cfg.diffusion.prediction == "eps"


def test_missing_required_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  shards: ???\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "data.shards"


def test_pipeline_stages_must_divide_world_size():
    cfg = load_config(DEMO, ["deepspeed.pipeline_stages=2", "deepspeed.zero_stage=1"])
    validate(cfg, world_size=4)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=3)
    assert err.value.key == "deepspeed.pipeline_stages"


def test_a_pipeline_at_zero2_is_told_the_stage_its_precision_allows():
    """fp16 is refused at ZeRO-0 as well: told "0 or 1", an fp16 pipeline met a second refusal."""
    for precision, allowed in (("fp32", "stage 0 or 1 only"), ("fp16", "with fp16, stage 1")):
        with pytest.raises(ConfigError, match=allowed) as err:
            load_config(DEMO, ["deepspeed.pipeline_stages=2", "deepspeed.zero_stage=2", f"deepspeed.precision={precision}"])
        assert err.value.key == "deepspeed.zero_stage"


def test_python_tag_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"run:\n  name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(path)
    assert not marker.exists()


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "broken.yaml:" in err.value.key


def test_cli_config_show():
    ok = dit("config", "show", str(DEMO), "optim.lr=3e-4")
    assert ok.returncode == 0, ok.stderr
    assert "lr: 0.0003" in ok.stdout
    bad = dit("config", "show", str(DEMO), "optim.lrr=1")
    assert bad.returncode != 0
    assert "optim.lrr" in bad.stderr


def test_config_show_reads_a_checkpoints_own_config_as_it_trained(tmp_path, capsys):
    """A step directory's config.yaml from before clip settings of an image stream were refused
    is shown as it is; the same file outside a checkpoint is a run config, refused naming the key."""
    from launch.cli import main
    from trainer.checkpoint_format import COMPLETE
    from trainer.config import to_yaml

    older = to_yaml(load_config(DEMO)).replace("num_frames: 8\n", "num_frames: 16\n")
    for folder in ("step_00000010", "plain"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.yaml").write_text(older)
    (tmp_path / "step_00000010" / COMPLETE).write_text("{}")
    assert main(["config", "show", str(tmp_path / "step_00000010" / "config.yaml"), "--key", "data.num_frames"]) == 0
    assert capsys.readouterr().out.strip() == "16"
    with pytest.raises(ConfigError, match="data.num_frames"):
        load_config(tmp_path / "plain" / "config.yaml")


@pytest.mark.parametrize("overrides, says", [(["data.fps=-1"], "must be >= 0"),
                                             (["data.fps=8", "data.frame_stride=2"], "not both")])
def test_a_target_fps_is_checked_with_the_config(overrides, says):
    with pytest.raises(ConfigError, match=says) as err:
        load_config(DEMO, overrides)
    assert err.value.key == "data.fps"


def test_a_negative_stall_timeout_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="wait for ever") as err:
        load_config(DEMO, ["data.stall_timeout_s=-1"])
    assert err.value.key == "data.stall_timeout_s"
    assert load_config(DEMO, ["data.stall_timeout_s=0"]).data.stall_timeout_s == 0


def test_a_frame_bucket_longer_than_num_frames_is_refused():
    """Longer videos would get the longest bucket that fits: clips past num_frames."""
    with pytest.raises(ConfigError, match="shorter clip lengths") as err:
        load_config(DEMO, ["data.kind=video", "model.video=true", "data.num_frames=8", "data.frame_buckets=[4,16]"])
    assert err.value.key == "data.frame_buckets"
    load_config(DEMO, ["data.kind=video", "model.video=true", "data.num_frames=8", "data.frame_buckets=[4,8]"])
