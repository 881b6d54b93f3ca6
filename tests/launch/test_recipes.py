"""The recipes of configs/recipes/: each plans at full size and trains at tiny size, unchanged.

A recipe names its folders through three roots, `${oc.env:DIT_DATA}`, `${oc.env:DIT_MODELS}`
and `${oc.env:DIT_RUNS}`, so the same file runs on a cluster and here. Two trees stand in:

- `real_tree`: config-only folders of the real architectures (T5-v1.1-XXL, CLIP ViT-L/14,
  SD's AutoencoderKL, Wan 2.1's AutoencoderKLWan, written by `save_pretrained`/`save_config`
  of the real classes): `dit plan` reads configurations only, so every recipe is planned at
  its real size and its header's `# plan:` line must be what `dit plan` suggests.
- `tiny_tree`: structurally complete random-weight folders of the same classes and real tar
  shards (`python -m tests.launch.test_recipes DIR` writes one for trying a recipe by hand).
  Each recipe trains on 2 ranks with the overrides of its header's `# cpu:` lines, parsed
  here, so the test follows the file.

Launches (about 20 s each on 2 cores: imports, DeepSpeed, the frozen folders): t2i 256 (train, resume), its 512 continuation (warm start from the
256 run), joint image-video (causal 3-D autoencoder), the pixel cascade (base, then
super-resolution; sampled with the cascade recipe), progressive then adversarial distillation
of the 256 run. The fine-tuning recipe differs from the 256 run only by its warm start from an
export and its lr/EMA numbers: its warm start is checked in one process on the 256 run's
exports (safetensors and diffusers), and its config is validated and planned with the others.
"""
from __future__ import annotations

import json
from dataclasses import replace
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.harness import ROOT, assert_checkpoint_samples_match, assert_ok, latest_dir, run_train

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
    """`dit ARGV` in this process: (exit code, stdout + stderr)."""
    from launch.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_folder_holds_the_recipes_of_the_issue():
    names = {p.stem for p in RECIPE_FILES}
    assert names == {"t2i_dit_xl2_256", "t2i_dit_xl2_512", "t2v_joint_dit_xl2", "cascade_base64", "cascade_sr256",
                     "distill_progressive_256", "distill_adversarial_256", "finetune_t2i_256"}
    assert CASCADE_RECIPE.is_file()


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_recipe_shows_plans_and_submits_at_full_size_as_its_header_says(recipe, real_tree, monkeypatch, capsys):
    """`dit config show`, `dit plan --gpus 8 --gpu-mem 80` and `dit launch --slurm --dry-run` on
    the real architectures' configs; the header's `# plan:` line is the plan's suggestion, its
    cluster commands name the file, and its `# cpu:` overrides are valid."""
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
    for bad in (["data.num_frames=4"], ["data.frame_buckets=[4]"]):
        with pytest.raises(ValueError, match="data.num_frames, data.frame_buckets"):
            build_stage(load_config(recipe, [*cpu_overrides(recipe), *bad]))


def test_a_wan_folder_normalizes_latents_per_channel_as_diffusers_does(tmp_path):
    """Wan's config carries per-channel latents_mean / latents_std (diffusers' Wan pipelines use
    (latent - mean) / std); loaded from its folder, the autoencoder hands the DiT those latents
    and decodes them back through the same statistics."""
    from trainer.config import AutoencoderConfig
    from trainer.models.autoencoder import Autoencoder, build_causal_3d

    torch.manual_seed(0)
    vae = build_causal_3d(AutoencoderConfig(kind="kl", block_out_channels=[8, 16], latent_channels=4))
    vae.register_to_config(latents_mean=[0.5, -1.0, 0.0, 2.0], latents_std=[2.0, 0.5, 1.0, 4.0])
    vae.save_pretrained(tmp_path)
    ae = Autoencoder.load(tmp_path).eval()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        raw = ae.vae.encode(video).latent_dist.mode()  # (1, 4, 3, 8, 8)
        mean, std = torch.tensor([0.5, -1.0, 0.0, 2.0]).view(1, 4, 1, 1, 1), torch.tensor([2.0, 0.5, 1.0, 4.0]).view(1, 4, 1, 1, 1)
        z = ae.encode(video)
        assert torch.allclose(z, (raw - mean) / std, atol=1e-6)
        assert torch.allclose(ae.decode(z), ae.vae.decode(raw).sample, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training at tiny size: the same files with their headers' overrides.


def train(recipe: str, tree: Path, *extra: str, timeout: int = 300):
    path = RECIPES / f"{recipe}.yaml"
    return run_train(2, [*cpu_overrides(path), *extra], timeout=timeout, config=path, **tree_env(tree))


def out_dir(tree: Path, recipe: str) -> Path:
    return tree / "runs" / recipe


def relative_distance(a: dict, b: dict) -> float:
    """mean |a - b| / mean |b| over the tensors of b."""
    num = sum(float((a[k].float() - v.float()).abs().sum()) for k, v in b.items())
    return num / sum(float(v.float().abs().sum()) for v in b.values())


def ema(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(latest_dir(out) / "ema.safetensors"))


@pytest.fixture(scope="module")
def t2i_256(tiny_tree) -> tuple[Path, object, object]:
    """The 256 px run: 2 steps, then resumed to step 3 (the base of the continuation and the
    distillations)."""
    first = train("t2i_dit_xl2_256", tiny_tree)
    assert_ok(first)
    resumed = train("t2i_dit_xl2_256", tiny_tree, "stage.steps=3")
    return out_dir(tiny_tree, "t2i_dit_xl2_256"), first, resumed


def sample(capsys, checkpoint: Path | str, out: Path, *extra: str) -> dict:
    code, text = dit(capsys, "sample", str(checkpoint), "--prompt", PROMPT, "--out", str(out), "--steps", "2",
                     "--device", "cpu", *extra)
    assert code == 0, text
    return json.loads((out / "samples.json").read_text())


@pytest.mark.slow
def test_t2i_256_trains_resumes_and_samples(t2i_256, tmp_path, capsys):
    out, first, resumed = t2i_256
    assert_ok(resumed)
    assert "at step 2" in resumed.stdout, resumed.stdout[-3000:]
    assert latest_dir(out).name == "step_00000003"
    cfg = (latest_dir(out) / "config.yaml").read_text()
    assert "t5-v1_1-xxl" in cfg and "sd-vae-ft-ema" in cfg and "DiT-T/2" in cfg
    assert_checkpoint_samples_match(out, tmp_path)
    record = sample(capsys, out / "checkpoints", tmp_path / "samples")
    assert (record["height"], record["width"]) == (32, 32)


@pytest.mark.slow
def test_t2i_512_continues_from_the_256_run(t2i_256, tiny_tree, tmp_path, capsys):
    """Warm start: after two steps at warm-up lr (1e-7) the 512 run's weights are the 256 run's
    EMA, not its own seed's init (run.seed=1 here: the 256 run's init is seed 0's)."""
    proc = train("t2i_dit_xl2_512", tiny_tree, "run.seed=1")
    assert_ok(proc)
    assert "initialized the student from" in proc.stdout, proc.stdout[-3000:]
    out = out_dir(tiny_tree, "t2i_dit_xl2_512")
    start = ema(t2i_256[0])
    assert relative_distance(ema(out), start) < 0.01
    record = sample(capsys, out / "checkpoints", tmp_path / "samples")
    assert (record["height"], record["width"]) == (64, 64)


@pytest.mark.slow
def test_finetune_recipe_warm_starts_from_every_export_format(t2i_256, tiny_tree, monkeypatch, tmp_path):
    """The fine-tuning recipe's network (its header's overrides) loads the 256 run's weights from a
    checkpoint root, a step directory, `dit export` safetensors and diffusers folders and a
    .safetensors file, each exactly the checkpoint's EMA; a wrong network or path is refused
    naming checkpoint.init_from."""
    from trainer.checkpoint import CheckpointError, init_network
    from trainer.config import load_config
    from trainer.export import export_diffusers, export_safetensors
    from trainer.models.dit import build_dit
    from trainer.stages import build_stage

    for key, value in tree_env(tiny_tree).items():
        monkeypatch.setenv(key, value)
    run = t2i_256[0]
    exports = tiny_tree / "runs" / "exports" / "t2i_dit_xl2_256"
    export_safetensors(run / "checkpoints", exports)
    export_diffusers(run / "checkpoints", tmp_path / "diffusers")
    cfg = load_config(RECIPES / "finetune_t2i_256.yaml", cpu_overrides(RECIPES / "finetune_t2i_256.yaml"))
    assert cfg.checkpoint.init_from == str(exports)
    net = build_stage(cfg).players["student"]
    expected = ema(run)
    for source in (exports, exports / "model.safetensors", run / "checkpoints", latest_dir(run),
                   tmp_path / "diffusers", tmp_path / "diffusers" / "transformer"):
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
def test_t2v_joint_trains_on_images_and_clips_through_a_causal_3d_autoencoder(tiny_tree, tmp_path, capsys):
    proc = train("t2v_joint_dit_xl2", tiny_tree)
    assert_ok(proc)
    out = out_dir(tiny_tree, "t2v_joint_dit_xl2")
    assert latest_dir(out).name == "step_00000002"
    assert_checkpoint_samples_match(out, tmp_path)
    record = sample(capsys, out / "checkpoints", tmp_path / "samples")
    import av

    with av.open(str(tmp_path / "samples" / record["files"][0])) as clip:
        frames = sum(1 for _ in clip.decode(video=0))
    assert frames == 5  # 3 latent frames decoded by the causal autoencoder: 1 + 2 x 2


@pytest.mark.slow
def test_pixel_cascade_trains_both_stages_and_samples_with_its_recipe(tiny_tree, tmp_path, monkeypatch, capsys):
    assert_ok(train("cascade_base64", tiny_tree))
    assert_ok(train("cascade_sr256", tiny_tree))
    assert_checkpoint_samples_match(out_dir(tiny_tree, "cascade_sr256"), tmp_path)
    monkeypatch.setenv("DIT_RUNS", str(tiny_tree / "runs"))
    code, text = dit(capsys, "sample", str(CASCADE_RECIPE), "--prompt", PROMPT, "--out", str(tmp_path / "cascade"),
                     "--device", "cpu")
    assert code == 0, text
    record = json.loads((tmp_path / "cascade" / "samples.json").read_text())
    assert (record["height"], record["width"]) == (32, 32)
    assert [s["steps"] for s in record["stages"]] == [50, 30]


@pytest.mark.slow
def test_progressive_then_adversarial_distillation_of_the_256_run(t2i_256, tiny_tree, tmp_path, capsys):
    assert_ok(train("distill_progressive_256", tiny_tree))
    rounds = out_dir(tiny_tree, "distill_progressive_256") / "checkpoints" / "rounds"
    assert (rounds / "round_2_4steps").is_dir(), sorted(p.name for p in rounds.iterdir())
    proc = train("distill_adversarial_256", tiny_tree)  # its teacher: round_2_4steps, as in the recipe
    assert_ok(proc)
    out = out_dir(tiny_tree, "distill_adversarial_256")
    record = sample(capsys, out / "checkpoints", tmp_path / "samples", "--steps", "1")
    assert record["stages"][0]["steps"] == 1


# ---------------------------------------------------------------------------------------------
# The README names files that exist.


def test_every_config_the_readme_names_exists():
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"configs/[\w./-]+\.ya?ml", text))
    assert "configs/recipes/t2i_dit_xl2_256.yaml" in named  # the walk-through names the recipes
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"README.md names configs that do not exist: {missing}"


if __name__ == "__main__":  # python -m tests.launch.test_recipes DIR: the tiny tree, to try a recipe by hand
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_tree")
    write_tiny_models(target / "models")
    write_tiny_data(target / "data")
    print(" ".join(f"{k}={v}" for k, v in tree_env(target.resolve()).items()))
