"""The recipes of configs/recipes/: each plans at full size and trains at tiny size, unchanged.

A recipe names its folders through three roots, `${oc.env:DIT_DATA}`, `${oc.env:DIT_MODELS}`
and `${oc.env:DIT_RUNS}`, so the same file runs on a cluster and here. Two trees stand in:

- `real_tree`: config-only folders of the real architectures (T5-v1.1-XXL, CLIP ViT-L/14,
  SD's AutoencoderKL, Wan 2.1's AutoencoderKLWan, written by `save_pretrained`/`save_config`
  of the real classes): `dit plan` reads configurations only, so every recipe is planned at
  its real size and its header's `# plan:` line must be what `dit plan` suggests.
- `tiny_tree`: structurally complete random-weight folders of the same classes and real tar
  shards (`python -m tests.launch.test_recipes DIR` writes one for trying a recipe by hand).
  Each recipe trains with the overrides of its header's `# cpu:` lines, parsed here, so the test
  follows the file.

Each recipe trains 2 steps, resumes for a third and samples (`dit sample`, in this process), on
one rank: the 2-rank layouts are the support matrix's (tests/trainer/test_support_matrix.py).
The runs chain as on a cluster (continuation, fine-tuning from `dit export`, distillations from
the 256 run's checkpoint) and share two processes, one for the first runs and one for the
resumes: a process costs ~10 s of CPU in imports alone, a run of a tiny recipe 1-3 s.
"""
from __future__ import annotations

import json
from dataclasses import replace
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.harness import ROOT, assert_checkpoint_samples_match, latest_dir, one_thread, train_env

RECIPES = ROOT / "configs" / "recipes"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))
CASCADE_RECIPE = RECIPES / "sample" / "pixel_cascade_256.yaml"
PROMPT = "a large red circle at the top left"


# ---------------------------------------------------------------------------------------------
# The folders.


def tokenizer():
    from transformers import AutoTokenizer

    from trainer.models.text import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())  # a real WordPiece tokenizer, shipped offline


def write_tiny_models(models: Path) -> None:
    """Random-weight folders of the classes the recipes name, a few hundred kB each."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, T5Config, T5EncoderModel

    from trainer.config import AutoencoderConfig
    from trainer.models.autoencoder import build_causal_3d, build_kl

    torch.manual_seed(0)
    tok = tokenizer()
    T5EncoderModel(T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                            feed_forward_proj="gated-gelu")).save_pretrained(models / "t5-v1_1-xxl")
    text = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.sep_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                         projection_dim=16)).save_pretrained(models / "clip-vit-large-patch14")
    for name in ("t5-v1_1-xxl", "clip-vit-large-patch14"):
        tok.save_pretrained(models / name)
    # SD's autoencoder has four levels (f = 8) and a scaling factor in its config.
    sd = build_kl(AutoencoderConfig(kind="kl", block_out_channels=[8, 8, 16, 16], latent_channels=4))
    sd.register_to_config(scaling_factor=0.18215, shift_factor=None)
    sd.save_pretrained(models / "sd-vae-ft-ema")
    build_causal_3d(AutoencoderConfig(kind="kl", block_out_channels=[8, 16], latent_channels=4)).save_pretrained(
        models / "wan2.1-vae")


def write_tiny_data(data: Path) -> None:
    """Real tar shards: 64 px images (every image recipe crops/resizes them), 6-frame MP4 clips
    at 16 px, and a small fine-tuning set."""
    from data_pipeline.synth import synth_samples
    from data_pipeline.write import write_shards

    write_shards(synth_samples(48, seed=0, size=64), str(data / "images"), shard_size=12, progress=False)
    write_shards(synth_samples(24, seed=0, size=16, video=True, num_frames=6), str(data / "videos"), shard_size=6,
                 progress=False)
    write_shards(synth_samples(24, seed=1, size=32), str(data / "finetune"), shard_size=6, progress=False)


def write_real_configs(models: Path) -> None:
    """config.json of the real architectures (no weights): what `dit plan` needs."""
    from diffusers import AutoencoderKL, AutoencoderKLWan
    from transformers import CLIPConfig, T5Config

    T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64,
             feed_forward_proj="gated-gelu").save_pretrained(models / "t5-v1_1-xxl")
    CLIPConfig(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                max_position_embeddings=77, projection_dim=768),
               vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=224, patch_size=14, projection_dim=768),
               projection_dim=768).save_pretrained(models / "clip-vit-large-patch14")
    with torch.device("meta"):
        sd = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                           block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                           sample_size=256, scaling_factor=0.18215)
        wan = AutoencoderKLWan()  # Wan 2.1: base 96, z 16, f 8 in space, 4 in time
    sd.save_config(models / "sd-vae-ft-ema")
    wan.save_config(models / "wan2.1-vae")


def tree_env(root: Path) -> dict[str, str]:
    return {"DIT_DATA": str(root / "data"), "DIT_MODELS": str(root / "models"), "DIT_RUNS": str(root / "runs")}


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real")
    write_real_configs(root / "models")
    return root


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_models(root / "models")
    write_tiny_data(root / "data")
    return root


# ---------------------------------------------------------------------------------------------
# What a recipe's header says.


def header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def cpu_overrides(path: Path) -> list[str]:
    """The overrides of the header's `# cpu:` lines, in order."""
    tokens = [t for line in header(path) if line.startswith("# cpu:") for t in shlex.split(line[len("# cpu:"):])]
    assert tokens, f"{path.name}: no '# cpu:' lines with the overrides for this machine"
    return tokens


def plan_line(path: Path) -> str:
    found = [line[len("# plan:"):].strip() for line in header(path) if line.startswith("# plan:")]
    assert len(found) == 1, f"{path.name}: one '# plan:' line with dit plan's suggestion, found {found}"
    return found[0]


def dit(capsys, *argv: str) -> tuple[int, str]:
    """`dit ARGV` in this process, on one thread: (exit code, stdout + stderr)."""
    from launch.cli import main

    with one_thread():
        code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_folder_holds_the_recipes_of_the_issue():
    names = {p.stem for p in RECIPE_FILES}
    assert names == {"t2i_dit_xl2_256", "t2i_dit_xl2_512", "t2v_joint_dit_xl2", "cascade_base64", "cascade_sr256",
                     "distill_progressive_256", "distill_adversarial_256", "finetune_t2i_256"}
    assert CASCADE_RECIPE.is_file()


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_recipe_shows_plans_and_submits_at_full_size_as_its_header_says(recipe, real_tree, tiny_tree, monkeypatch,
                                                                         capsys):
    """`dit config show`, `dit plan --gpus 8 --gpu-mem 80` and `dit launch --slurm --dry-run` on
    the real architectures' configs; the header's `# plan:` line is the plan's suggestion, its
    cluster commands name the file, and its `# cpu:` overrides are valid on the tiny folders they
    are for (validation reads the autoencoder: the tiny video one halves time, the real one
    quarters it)."""
    for key, value in tree_env(real_tree).items():
        monkeypatch.setenv(key, value)
    code, shown = dit(capsys, "config", "show", str(recipe))
    assert code == 0, shown
    assert f"{real_tree}/models/" in shown  # the folders come from the roots
    code, plan = dit(capsys, "plan", str(recipe), "--gpus", "8", "--gpu-mem", "80")
    assert code == 0, plan
    suggested = [line.strip() for line in plan.splitlines() if line.startswith("suggested:")]
    assert suggested == [plan_line(recipe)], plan
    text = "\n".join(header(recipe))
    assert f"dit plan configs/recipes/{recipe.name} --gpus 8 --gpu-mem 80" in text
    assert re.search(rf"dit launch configs/recipes/{re.escape(recipe.name)} .*--slurm", text), text
    code, script = dit(capsys, "launch", str(recipe), "--slurm", "--nodes", "2", "--gpus-per-node", "8",
                       "--time", "1:00:00", "--dry-run")  # validated for 16 ranks, the sbatch script printed
    if recipe.stem.startswith("distill_"):  # the launch looks for the teacher first: none in this tree
        assert code == 2 and "stage.teacher" in script and f"{real_tree}/runs/" in script, script
    else:
        assert code == 0 and "#SBATCH --nodes=2" in script and f"{real_tree}/runs/{recipe.stem}" in script, script
    for key, value in tree_env(tiny_tree).items():
        monkeypatch.setenv(key, value)
    code, shown = dit(capsys, "config", "show", str(recipe), *cpu_overrides(recipe))
    assert code == 0, shown  # the machine's overrides are valid keys and values


def test_warm_start_is_refused_where_the_student_comes_from_elsewhere():
    from trainer.config import ConfigError, load_config

    for recipe in ("distill_progressive_256", "distill_adversarial_256"):
        with pytest.raises(ConfigError, match="checkpoint.init_from"):
            load_config(RECIPES / f"{recipe}.yaml", ["checkpoint.init_from=runs/x/checkpoints"])


def test_clip_lengths_must_suit_the_causal_3d_autoencoder(tiny_tree, monkeypatch):
    """The tiny AutoencoderKLWan halves time: clips of 1 + 2k frames; 4 frames (or a 4-frame
    bucket) is refused naming the keys, 5 frames are 3 latent frames."""
    from trainer.config import load_config
    from trainer.stages import build_stage

    for key, value in tree_env(tiny_tree).items():
        monkeypatch.setenv(key, value)
    recipe = RECIPES / "t2v_joint_dit_xl2.yaml"
    stage = build_stage(load_config(recipe, cpu_overrides(recipe)))
    assert stage.sample_shape() == (4, 3, 8, 8) and stage.sample_shape(frames=9)[1] == 5
    for bad, key in ((["data.num_frames=4"], "data.num_frames"), (["data.frame_buckets=[4]"], "data.frame_buckets")):
        with pytest.raises(ValueError, match=key):  # at validation, before any stage is built
            load_config(recipe, [*cpu_overrides(recipe), *bad])


# ---------------------------------------------------------------------------------------------
# Training at tiny size: the same files with their headers' overrides.
#
# Every recipe trains 2 steps, resumes for a third and samples. The runs chain as a team's would:
# the 512 px continuation, both distillations and (through `dit export`) the fine-tuning start
# from the 256 px run's checkpoint, the adversarial student from the progressive run's 4-step
# round. All first runs go through one process and all resumes through a second one
# (`tests.launch.dit_sequence`, one rank each), so a resume reads nothing but the files the first
# process left; the resumes go downstream first, so that no teacher changes under a student.

FIRST = ("t2i_dit_xl2_256", "t2i_dit_xl2_512", "finetune_t2i_256", "distill_progressive_256",
         "distill_adversarial_256", "t2v_joint_dit_xl2", "cascade_base64", "cascade_sr256")
RESUMED = ("distill_adversarial_256", "distill_progressive_256", "finetune_t2i_256", "t2i_dit_xl2_512",
           "t2i_dit_xl2_256", "t2v_joint_dit_xl2", "cascade_sr256", "cascade_base64")
EXTRA = {"t2i_dit_xl2_512": ["run.seed=1"]}  # the 256 run's init is seed 0's: the warm start must show


def train_argv(recipe: str, *extra: str) -> list[str]:
    path = RECIPES / f"{recipe}.yaml"
    return ["train", str(path), *cpu_overrides(path), *EXTRA.get(recipe, []), *extra]


def out_dir(tree: Path, recipe: str) -> Path:
    return tree / "runs" / recipe


def export_dir(tree: Path) -> Path:
    """Where the fine-tuning recipe's header exports the 256 run to (its checkpoint.init_from)."""
    return tree / "runs" / "exports" / "t2i_dit_xl2_256"


def run_sequence(tree: Path, name: str, commands: list[list[str]]) -> list[tuple[int, str]]:
    """The commands in one `tests.launch.dit_sequence` process: (exit code, output) of each."""
    from tests.launch.dit_sequence import sections

    spec = tree / f"{name}.json"
    spec.write_text(json.dumps(commands))
    proc = subprocess.run([sys.executable, "-m", "tests.launch.dit_sequence", str(spec)], cwd=ROOT,
                          env=train_env(PYTHONUNBUFFERED="1", **tree_env(tree)), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    found = sections(proc.stdout)
    assert len(found) == len(commands), proc.stdout[-6000:]
    return found


@pytest.fixture(scope="module")
def runs(tiny_tree) -> dict[str, tuple[str, str]]:
    """recipe -> (output of its first run, output of its resume); each run's exit code checked by
    the recipe's own test."""
    first = [train_argv(r) for r in FIRST]
    export = ["export", str(out_dir(tiny_tree, "t2i_dit_xl2_256") / "checkpoints"), "--format", "safetensors",
              "--out", str(export_dir(tiny_tree))]
    first.insert(1, export)  # the fine-tuning recipe's starting point, as its header exports it
    trained = run_sequence(tiny_tree, "first", first)
    assert trained[1][0] == 0, trained[1][1][-3000:]
    del trained[1]
    resumed = run_sequence(tiny_tree, "resume", [train_argv(r, "stage.steps=3") for r in RESUMED])
    before, after = dict(zip(FIRST, trained)), dict(zip(RESUMED, resumed))
    return {r: (before[r], after[r]) for r in FIRST}


def assert_trained_and_resumed(runs: dict, tree: Path, recipe: str) -> Path:
    """Exit 0 twice; the resume continued from step 2 to a step-3 checkpoint (not a warm start)."""
    (code, first), (code_resumed, resumed) = runs[recipe]
    assert code == 0, first[-6000:]
    assert code_resumed == 0, resumed[-6000:]
    assert "at step 2" in resumed and "initialized the student from" not in resumed, resumed[-3000:]
    out = out_dir(tree, recipe)
    assert latest_dir(out).name == "step_00000003"
    assert (out / "checkpoints" / "step_00000002").is_dir()
    return out


def ema(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "ema.safetensors"))


def relative_distance(a: dict, b: dict) -> float:
    """mean |a - b| / mean |b| over the tensors of b."""
    num = sum(float((a[k].float() - v.float()).abs().sum()) for k, v in b.items())
    return num / sum(float(v.float().abs().sum()) for v in b.values())


def sample(capsys, checkpoint: Path | str, out: Path, *extra: str) -> dict:
    code, text = dit(capsys, "sample", str(checkpoint), "--prompt", PROMPT, "--out", str(out), "--steps", "2",
                     "--device", "cpu", *extra)
    assert code == 0, text
    return json.loads((out / "samples.json").read_text())


@pytest.mark.slow
def test_t2i_256_trains_resumes_and_samples(runs, tiny_tree, tmp_path, capsys):
    out = assert_trained_and_resumed(runs, tiny_tree, "t2i_dit_xl2_256")
    cfg = (latest_dir(out) / "config.yaml").read_text()
    assert "t5-v1_1-xxl" in cfg and "sd-vae-ft-ema" in cfg and "DiT-T/2" in cfg
    assert_checkpoint_samples_match(out, tmp_path)
    record = sample(capsys, out / "checkpoints", tmp_path / "samples")
    assert (record["height"], record["width"]) == (32, 32)


@pytest.mark.slow
def test_t2i_512_continues_from_the_256_run(runs, tiny_tree, tmp_path, capsys):
    """Warm start: after two steps at warm-up lr (1e-7) the 512 run's weights are the 256 run's
    EMA at its step 2 (what was `latest` then), not its own seed's init (run.seed=1 here)."""
    out = assert_trained_and_resumed(runs, tiny_tree, "t2i_dit_xl2_512")
    assert "initialized the student from" in runs["t2i_dit_xl2_512"][0][1]
    start = ema(out_dir(tiny_tree, "t2i_dit_xl2_256") / "checkpoints" / "step_00000002")
    assert relative_distance(ema(out / "checkpoints" / "step_00000002"), start) < 0.01
    record = sample(capsys, out / "checkpoints", tmp_path / "samples")
    assert (record["height"], record["width"]) == (64, 64)


@pytest.mark.slow
def test_finetune_recipe_trains_from_the_export_resumes_and_samples(runs, tiny_tree, tmp_path, capsys):
    """The recipe as its header says: `dit export` of the 256 run, then a warm start from it with
    an EMA that starts at the exported weights (its warm-up: decay 1/10 at the first update)."""
    out = assert_trained_and_resumed(runs, tiny_tree, "finetune_t2i_256")
    assert f"initialized the student from {export_dir(tiny_tree)}" in runs["finetune_t2i_256"][0][1]
    start = ema(out_dir(tiny_tree, "t2i_dit_xl2_256") / "checkpoints" / "step_00000002")
    assert relative_distance(ema(out / "checkpoints" / "step_00000002"), start) < 0.01
    record = sample(capsys, out / "checkpoints", tmp_path / "samples")
    assert (record["height"], record["width"]) == (32, 32)


@pytest.mark.slow
def test_finetune_warm_start_reads_every_export_format(runs, tiny_tree, monkeypatch, tmp_path):
    """The fine-tuning recipe's network (its header's overrides) loads the 256 run's weights from a
    checkpoint root, a step directory, `dit export` safetensors and diffusers folders and a
    .safetensors file, each exactly that step's EMA; a wrong network or path is refused naming
    checkpoint.init_from."""
    from trainer.checkpoint import CheckpointError, init_network
    from trainer.config import load_config
    from trainer.export import export_diffusers
    from trainer.models.dit import build_dit
    from trainer.stages import build_stage

    for key, value in tree_env(tiny_tree).items():
        monkeypatch.setenv(key, value)
    run = out_dir(tiny_tree, "t2i_dit_xl2_256")
    exports = export_dir(tiny_tree)  # of step 2, written before the 256 run resumed
    step2 = run / "checkpoints" / "step_00000002"
    with one_thread():
        export_diffusers(step2, tmp_path / "diffusers")
    cfg = load_config(RECIPES / "finetune_t2i_256.yaml", cpu_overrides(RECIPES / "finetune_t2i_256.yaml"))
    assert cfg.checkpoint.init_from == str(exports)
    net = build_stage(cfg).players["student"]
    for source, expected in ((exports, ema(step2)), (exports / "model.safetensors", ema(step2)),
                             (step2, ema(step2)), (tmp_path / "diffusers", ema(step2)),
                             (tmp_path / "diffusers" / "transformer", ema(step2)),
                             (run / "checkpoints", ema(latest_dir(run)))):
        torch.nn.init.zeros_(next(net.parameters()))
        init_network(net, source)
        state = net.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items()), source
    other = build_dit(replace(cfg.model, preset="DiT-Tiny/1"), 32, 32)
    with pytest.raises(CheckpointError, match="checkpoint.init_from"):
        init_network(other, exports)
    with pytest.raises(CheckpointError, match="checkpoint.init_from"):
        init_network(net, tmp_path / "nothing-here")


@pytest.mark.slow
def test_t2v_joint_trains_resumes_and_samples_through_a_causal_3d_autoencoder(runs, tiny_tree, tmp_path, capsys):
    out = assert_trained_and_resumed(runs, tiny_tree, "t2v_joint_dit_xl2")
    assert_checkpoint_samples_match(out, tmp_path)
    record = sample(capsys, out / "checkpoints", tmp_path / "samples")
    import av

    with av.open(str(tmp_path / "samples" / record["files"][0])) as clip:
        frames = sum(1 for _ in clip.decode(video=0))
        assert clip.streams.video[0].average_rate == 16  # the recipe's data.fps
    assert frames == 5  # 3 latent frames decoded by the causal autoencoder: 1 + 2 x 2


@pytest.mark.slow
def test_pixel_cascade_trains_resumes_both_stages_and_samples_with_its_recipe(runs, tiny_tree, tmp_path,
                                                                              monkeypatch, capsys):
    assert_trained_and_resumed(runs, tiny_tree, "cascade_base64")
    assert_checkpoint_samples_match(assert_trained_and_resumed(runs, tiny_tree, "cascade_sr256"), tmp_path)
    monkeypatch.setenv("DIT_RUNS", str(tiny_tree / "runs"))
    code, text = dit(capsys, "sample", str(CASCADE_RECIPE), "--prompt", PROMPT, "--out", str(tmp_path / "cascade"),
                     "--device", "cpu")
    assert code == 0, text
    record = json.loads((tmp_path / "cascade" / "samples.json").read_text())
    assert (record["height"], record["width"]) == (32, 32)
    assert [s["steps"] for s in record["stages"]] == [50, 30]


@pytest.mark.slow
def test_progressive_then_adversarial_distillation_of_the_256_run(runs, tiny_tree, tmp_path, capsys):
    out = assert_trained_and_resumed(runs, tiny_tree, "distill_progressive_256")
    rounds = out / "checkpoints" / "rounds"
    assert (rounds / "round_2_4steps").is_dir(), sorted(p.name for p in rounds.iterdir())
    record = sample(capsys, out / "checkpoints", tmp_path / "progressive", "--steps", "4")
    assert record["stages"][0]["steps"] == 4
    out = assert_trained_and_resumed(runs, tiny_tree, "distill_adversarial_256")  # teacher: round_2_4steps
    record = sample(capsys, out / "checkpoints", tmp_path / "adversarial", "--steps", "1")
    assert record["stages"][0]["steps"] == 1


if __name__ == "__main__":  # python -m tests.launch.test_recipes DIR: the tiny tree, to try a recipe by hand
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_tree")
    write_tiny_models(target / "models")
    write_tiny_data(target / "data")
    print(" ".join(f"{k}={v}" for k, v in tree_env(target.resolve()).items()))
