"""Bad configs through the real commands: `dit launch` refuses before starting a rank, and the
ranks a bare torchrun starts refuse before their process group forms; the message names the
key (or file and line), and a `!!python/object` tag never runs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.trainer.harness import ROOT, TINY, bare_ranks, torchrun_cmd, train_env

BAD = {
    "malformed": ("optim:\n  lr: [1, 2\n", "bad.yaml:3': malformed YAML"),
    "unknown_key": ("optim:\n  lrr: 1.0e-3\n", "optim.lrr"),
    "wrong_type": ("data:\n  batch_size: four\n", "data.batch_size"),
    "python_tag": ("run:\n  name: !!python/object/apply:os.system ['touch {marker}']\n", "malformed YAML"),
}


def bad_config(tmp_path, kind: str) -> tuple[str, str]:
    marker = tmp_path / "EXECUTED"
    text, named = BAD[kind]
    path = tmp_path / "bad.yaml"
    path.write_text(text.format(marker=marker))
    return str(path), named


@pytest.mark.parametrize("kind", sorted(BAD))
def test_dit_launch_refuses_before_starting_any_rank(tmp_path, kind):
    config, named = bad_config(tmp_path, kind)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "launch", "--launcher", "torchrun",
                           "--nproc-per-node=2", config, f"run.out_dir={out}"],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert not out.exists() and not (tmp_path / "EXECUTED").exists()


@pytest.mark.slow
def test_ranks_refuse_before_the_process_group_forms(tmp_path):
    """Each rank refuses on its own (ranks started by hand, as on separate nodes, so that no
    launcher stops one when the other exits), and under a bare torchrun the first refusal is
    what it reports. The refusal takes ~0.5 s, so torchrun's agent may stop the slower rank
    (SIGTERM) before it prints its own line: only the ranks started by hand each name the key."""
    out = tmp_path / "run"
    ranks = bare_ranks(2, [f"run.out_dir={out}", "optim.lrr=1e-3"], tmp_path / "logs")
    try:
        codes = [proc.wait(timeout=120) for proc in ranks]
    finally:
        for proc in ranks:
            proc.kill()
    logs = [(tmp_path / "logs" / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [2, 2] and all("optim.lrr" in log for log in logs), logs
    proc = subprocess.run(torchrun_cmd(2, [f"run.out_dir={out}", "optim.lrr=1e-3"], TINY), cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exitcode  : 2" in output and "optim.lrr" in output
    for text in (output, *logs):
        assert "Initializing TorchBackend" not in text and "init_distributed" not in text
    assert not out.exists()


REFUSED = {  # accepted by the typed schema, refused by validate or the stage preflight
    "distill_rounds": (["stage.kind=progressive", "stage.rounds=[4,3]", "diffusion.loss_weighting=trunc_snr",
                        "stage.guidance_max=1"], "stage.rounds"),
    "distill_weighting": (["stage.kind=progressive", "stage.rounds=[2,1]", "diffusion.loss_weighting=min_snr",
                           "stage.guidance_max=1"], "diffusion.loss_weighting"),
    # min_snr weighs t = 1 by 0 under zero terminal SNR: the first step of every sampler goes untrained
    "pretrain_weighting": (["diffusion.loss_weighting=min_snr"], "diffusion.loss_weighting"),
    "adversarial_mse": (["stage.kind=adversarial", "stage.rounds=[1]", "stage.adv_mse_weight=-1",
                         "diffusion.loss_weighting=trunc_snr", "stage.guidance_max=1"], "stage.adv_mse_weight"),
    "missing_teacher": (["stage.kind=adversarial", "stage.rounds=[1]", "stage.teacher=/nonexistent",
                         "diffusion.loss_weighting=trunc_snr", "stage.guidance_max=1"], "stage.teacher"),
    "adversarial_pipeline": (["stage.kind=adversarial", "deepspeed.pipeline_stages=2", "deepspeed.zero_stage=1",
                              "stage.guidance_max=1"], "deepspeed.pipeline_stages"),
    "learn_sigma": (["model.learn_sigma=true"], "model.learn_sigma"),
    # DeepSpeed clips an fp32 pipeline at ZeRO-0 by its first stage's gradient norm alone
    "pipeline_zero0_fp32": (["deepspeed.pipeline_stages=2", "deepspeed.zero_stage=0"], "deepspeed.zero_stage"),
    "offload_zero0": (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer"),
    # DeepSpeed's ZeRO-0 fp16 wrapper unscales gradients its backward never scaled: AdamW saw g / 4096
    "fp16_zero0": (["deepspeed.precision=fp16", "deepspeed.zero_stage=0"], "deepspeed.zero_stage"),
    "fused_offload": (["deepspeed.offload_optimizer=true", "optim.fused=true"], "optim.fused"),
    "compile_zero3": (["deepspeed.zero_stage=3", "model.compile=true"], "model.compile"),
    # bucket sides are rounded to the multiple: the run trained at 32 or 48 px and sampled at 40
    "resolution_off_the_multiple": (["data.bucket_multiple=16", "data.resolution=40"], "data.resolution"),
    # a knob or DiT input of another stage kind: ignored by this kind's stage, or its first forward fails
    "pretrain_rounds": (["stage.rounds=[4,2]"], "stage.rounds"),
    "pretrain_guidance_embed": (["model.guidance_embed=true"], "model.guidance_embed"),
    # cascade pairs put the sr-size images under `image`: a base model would train at that size
    "pretrain_sr_pairs": (["data.sr_resolution=32"], "data.sr_resolution"),
    # a latent DiT without its autoencoder: each process would make its own random one
    "latent_without_autoencoder": (["model.autoencoder.kind=kl", "model.in_channels=4"], "model.autoencoder.path"),
    # a path holding none (the demo's DiT before its autoencoder stage): every rank failed after DeepSpeed started
    "latent_autoencoder_missing": (["model.autoencoder.kind=kl", "model.in_channels=4",
                                    "model.autoencoder.path=/nonexistent/autoencoder"], "model.autoencoder.path"),
    # the autoencoder stage trained a KL autoencoder all the same, and saved it into the working directory
    "autoencoder_of_kind_none": (["stage.kind=autoencoder", "model.autoencoder.path=ae"], "model.autoencoder.kind"),
    "autoencoder_without_path": (["stage.kind=autoencoder", "model.autoencoder.kind=kl"], "model.autoencoder.path"),
    # the text encoder's files: each failed in every rank once DeepSpeed had started
    "open_clip_arch_typo": (["model.text.kind=open_clip", "model.text.arch=ViT-B-3"], "model.text.arch"),
    "open_clip_weights_missing": (["model.text.kind=open_clip", "model.text.path=/nonexistent/tower.safetensors"],
                                  "model.text.path"),
    "hf_without_path": (["model.text.kind=hf"], "model.text.path"),
    "t5_not_a_folder": (["model.text.kind=t5", "model.text.path=/nonexistent/t5"], "model.text.path"),
    "text_beyond_positions": (["model.text.max_length=600"], "model.text.max_length"),  # MiniLM's BERT: 512
    "minilm_not_a_folder": (["model.text.path=/nonexistent/minilm"], "model.text.path"),
}


NO_FP16 = ("import sys; from deepspeed.accelerator import get_accelerator; "
           "type(get_accelerator()).is_fp16_supported = lambda self: False; "
           "from launch.cli import main; sys.exit(main(sys.argv[1:]))")  # an accelerator without fp16


def test_fp16_is_refused_where_the_ranks_run_not_where_the_config_is_read(tmp_path, monkeypatch, capsys):
    """On an accelerator without fp16 (DeepSpeed's CPU one without AVX512-FP16; patched so here)
    `dit train` and a `dit launch` on this node refuse deepspeed.precision=fp16. Reading such a
    config is not refused: planning it, submitting it to SLURM from a login node without the
    job's GPUs, loading an fp16 run's checkpoints to sample or export them (all were)."""
    from deepspeed.accelerator import get_accelerator

    from launch.cli import main
    from trainer.config import load_config

    fp16 = [str(TINY), "deepspeed.precision=fp16", f"run.out_dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-c", NO_FP16, "train", *fp16], cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "deepspeed.precision" in proc.stderr, proc.stderr[-2000:]
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    assert main(["launch", "--launcher", "torchrun", "--nproc-per-node=2", *fp16]) == 2
    assert "deepspeed.precision" in capsys.readouterr().err
    assert load_config(TINY, fp16[1:]).deepspeed.precision == "fp16"
    assert main(["plan", *fp16, "--gpus", "8"]) == 0
    assert main(["launch", *fp16, "--slurm", "--nodes", "1", "--gpus-per-node", "8", "--time", "1:00:00",
                 "--dry-run"]) == 0
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_dit_train_refuses_unsupported_combinations(tmp_path, kind, tiny_teacher_dir):
    """Each refused cell stops `dit train` with exit 2 and one line naming the key, before any
    network is built (about 0.5 s: see the next test for why it stays fast)."""
    overrides, named = REFUSED[kind]
    distills = any(o in ("stage.kind=progressive", "stage.kind=adversarial") for o in overrides)
    needs_teacher = distills and not any(o.startswith("stage.teacher") for o in overrides)
    teacher = [f"stage.teacher={tiny_teacher_dir}"] if needs_teacher else []
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(TINY), f"run.out_dir={tmp_path / 'run'}",
                           *teacher, *overrides], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]


FOREIGN = [  # (overrides, the key named): set away from its default, ignored by the kind's stage
    (["stage.noise_aug_max=0.9"], "stage.noise_aug_max"),
    (["stage.adv_mse_weight=5"], "stage.adv_mse_weight"),
    (["model.superres=true"], "model.superres"),
    (["stage.kind=superres", "model.superres=true", "data.sr_resolution=32", "model.guidance_embed=true"],
     "model.guidance_embed"),
    (["stage.kind=progressive", "stage.rounds=[2]", "stage.guidance_max=1", "stage.adv_loss=non_saturating"],
     "stage.adv_loss"),
    (["stage.kind=autoencoder", "stage.cfg_dropout=0.5"], "stage.cfg_dropout"),
    # the distillation stages feed no low-resolution input: a super-resolution student's first forward fails
    (["stage.kind=progressive", "stage.rounds=[2]", "stage.guidance_max=1", "model.superres=true",
      "data.sr_resolution=32"], "model.superres"),
    (["stage.kind=adversarial", "stage.rounds=[1]", "stage.guidance_max=1", "model.superres=true",
      "data.sr_resolution=32"], "model.superres"),
]


@pytest.mark.parametrize("overrides, key", FOREIGN)
def test_a_setting_the_stage_kind_ignores_is_refused_by_key(overrides, key):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert err.value.key == key and "stage" in str(err.value)


def test_settings_of_the_stage_kind_itself_are_accepted():
    """Each kind's own knobs and DiT inputs pass (the distillation stages include the pretrain
    knobs, the adversarial stage the progressive ones); values equal to a default are not 'set'."""
    from trainer.config import load_config

    distill = ["diffusion.loss_weighting=trunc_snr", "stage.rounds=[2]", "model.guidance_embed=true"]
    load_config(TINY, ["stage.kind=adversarial", *distill, "stage.adv_mse_weight=5", "stage.cfg_dropout=0.2"])
    load_config(TINY, ["stage.kind=superres", "model.superres=true", "data.sr_resolution=32",
                       "stage.noise_aug_max=0.9"])
    load_config(TINY, ["stage.rounds=[8,4]", "stage.noise_aug_max=0.5"])  # pretrain, the defaults


def test_config_checks_import_no_torch(tiny_teacher_dir):
    """What every rank runs before its config is accepted or refused (the parser of every `dit`
    subcommand, validate, the stage preflight reading a teacher's config.yaml) imports neither
    torch nor DeepSpeed nor transformers: importing torch alone costs 2.5-4 s per rank."""
    overrides = ["stage.kind=progressive", "stage.rounds=[4,2]", "diffusion.loss_weighting=trunc_snr",
                 "stage.guidance_max=1", f"stage.teacher={tiny_teacher_dir}"]
    code = ("import sys; from launch.cli import build_parser; from launch.job import check_config; build_parser(); "
            f"cfg = check_config({str(TINY)!r}, {overrides!r}, 2); print(cfg.stage.kind, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'transformers')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["progressive", "[]"], proc.stdout


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    """A teacher checkpoint written without training (random weights): configs are checked against it."""
    from tests.eval.eval_helpers import tiny_config, write_checkpoint

    root = tmp_path_factory.mktemp("teacher")
    return write_checkpoint(tiny_config(root, f"checkpoint.dir={root}/checkpoints"))


def test_a_missing_path_is_one_line_naming_it(shapes_shards, tmp_path, capsys):
    """A path that is not there, named on the command line (a checkpoint to sample) or in the
    config (the autoencoder folder of a precompute encoder's run), ends the command with exit 2
    and one line naming it, as a bad key does: it was a traceback (exit 1)."""
    from launch.cli import main as dit

    missing = tmp_path / "missing"
    assert dit(["sample", str(missing / "checkpoints"), "--prompt", "a red circle", "--out", str(tmp_path)]) == 2
    expected = f"dit: {missing / 'checkpoints'}: neither a checkpoint directory nor a cascade YAML"
    assert capsys.readouterr().err.strip() == expected

    config = tmp_path / "latent.yaml"
    config.write_text(f"model:\n  in_channels: 4\n  text:\n    kind: minilm\n    max_length: 16\n"
                      f"  autoencoder:\n    kind: kl\n    path: {missing / 'autoencoder'}\n")
    assert dit(["data", "precompute", str(shapes_shards), "--out", str(tmp_path / "latents"),
                "--encoder", "trainer.stages.pretrain:precompute_encoder", "--encoder-arg", f"config={config}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"dit: model.autoencoder.path: no diffusers config.json in {missing / 'autoencoder'}", err
    assert not any("Traceback" in line for line in err)


def test_a_file_gone_in_a_training_rank_stays_a_restartable_failure(shapes_shards, tmp_path, monkeypatch):
    """In a `dit train` rank a FileNotFoundError is not turned into exit 2 (a config error, which
    `dit launch` never restarts): a file gone mid-run fails the rank as before (exit 1)."""
    import trainer.engine
    from launch.cli import main as dit

    def gone(cfg):
        raise FileNotFoundError("a shard gone from the shared file system")

    monkeypatch.setattr(trainer.engine, "train", gone)
    with pytest.raises(FileNotFoundError, match="shard gone"):
        dit(["train", str(TINY), f"data.shards={shapes_shards}", f"run.out_dir={tmp_path / 'run'}"])
