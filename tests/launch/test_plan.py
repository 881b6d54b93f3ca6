"""`dit plan`: the ZeRO formulas, DiT-XL/2 figures, and the tiny presets' estimates against the
memory of real DeepSpeed engines on this CPU (within 20%)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.cli import main
from launch.plan import (Hardware, Layout, activation_bytes, block_units, estimate, format_plan, layouts,
                         model_state_bytes, plan, zero_settings)
from launch.plan_model import autoencoder_facts, model_facts
from tests.launch.memory_probe import forward_saved_bytes
from tests.trainer.harness import ROOT, TINY, train_env
from trainer.config import load_config, validate
from trainer.parallel import checkpoint_policy

P, N = 1_000_000, 8
XL = ["model.preset=DiT-XL/2", "model.in_channels=4", "model.autoencoder.kind=kl",
      "model.autoencoder.block_out_channels=[128,256,512,512]", "model.autoencoder.layers_per_block=2",
      "deepspeed.precision=bf16", "data.batch_size=32"]


def total(zero: int, precision: str, dp: int = N, persistent: int = 0) -> float:
    return sum(model_state_bytes(P, zero, dp, precision, persistent).values())


def test_zero_model_states_per_rank():
    assert total(0, "bf16") == total(0, "fp32") == 16 * P  # 2+2+12, and 4+4+8 in fp32
    assert total(3, "bf16") == 18 * P / N  # (2 + 4 + 12) x params / N: fp32 gradient partition
    assert total(2, "bf16") == 2 * P + 16 * P / N
    assert total(1, "bf16") == 8 * P + 12 * P / N  # BF16_Optimizer: whole bf16 and fp32 gradients
    assert total(2, "fp16") == 2 * P + 14 * P / N  # fp16 accumulates in fp16
    assert total(2, "fp32") == total(1, "fp32") == 4 * P + 16 * P / N  # fp32 master partition too
    assert total(3, "fp32", persistent=1000) == 20 * P / N + 4 * 1000


def test_checkpointing_keeps_one_input_per_block():
    cfg = load_config(TINY, ["model.preset=DiT-XL/2", "data.resolution=32", "model.in_channels=4"])
    m = model_facts(cfg, persistence_threshold=100_000)
    full = activation_bytes(m, 1, "bf16", "none")
    ckpt = activation_bytes(m, 1, "bf16", "full")
    assert 10 < full / ckpt < m.depth  # ~27 saved values per token and channel in a block, 1 kept
    assert activation_bytes(m, 4, "bf16", "none") == 4 * full


def test_gpu_autocast_keeps_the_modulated_norm_outputs_in_fp32():
    """CUDA autocast runs layer_norm in fp32: in bf16 on a GPU each block keeps its two modulated
    norm outputs in fp32 (one more 2-byte unit each) and the head its final one; not on the CPU
    (its autocast keeps them bf16, but its composite qk-norm fp32 copies of q and k), and fp32
    counts every value at 4 bytes already."""
    cfg = load_config(TINY, [*XL, "data.resolution=256"])
    m = model_facts(cfg, persistence_threshold=100_000)
    unit = m.tokens * m.width * 2  # one saved B N D value in bf16, per sample
    assert block_units(m, False, fp32_norms=True)[0] - block_units(m, False)[0] == 2
    gpu, fp32 = activation_bytes(m, 1, "bf16", "none"), activation_bytes(m, 1, "fp32", "none")
    assert gpu == pytest.approx(fp32 / 2 + (2 * m.depth + 1) * unit, rel=1e-12)
    cpu_extra = activation_bytes(m, 1, "bf16", "none", cpu=True) - activation_bytes(m, 1, "fp32", "none", cpu=True) / 2
    assert cpu_extra == pytest.approx(8 * m.depth * unit + 3 * m.depth * m.text_len * m.width * 2, rel=1e-12)
    with_ckpt = activation_bytes(m, 1, "bf16", "full") - activation_bytes(m, 1, "fp32", "full") / 2
    assert with_ckpt == pytest.approx(3 * unit, rel=1e-12)  # the recomputed block's two and the head's


@pytest.mark.parametrize("resolution, tokens", [(256, 256), (512, 1024)])
def test_dit_xl_on_8_h100(capsys, resolution, tokens):
    cfg = load_config(TINY, [*XL, f"data.resolution={resolution}"])
    m = model_facts(cfg, zero_settings(cfg, 3).persistence_threshold)
    assert m.tokens == tokens and m.latent_shape == (4, resolution // 8, resolution // 8)
    assert 675e6 < m.params < 800e6  # DiT-XL/2's 675M plus cross-attention to the text tokens
    assert m.macs_per_sample > (118.6e9 if resolution == 256 else 4 * 118.6e9)  # the paper's GMACs, no text
    assert main(["plan", str(TINY), *XL, f"data.resolution={resolution}", "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "suggested:" in out and "overrides: deepspeed.zero_stage=" in out


def test_nothing_fits_says_what_to_do(capsys):
    assert main(["plan", str(TINY), *XL, "data.resolution=512", "data.batch_size=512", "--gpus", "1",
                 "--gpu-mem", "16"]) == 0
    assert "nothing fits" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_activations_are_those_autograd_saves(precision):
    """`--device cpu` activations against the bytes autograd saves in one forward on this CPU
    (in process, no engine). bf16 is the case the engines' probe (fp32) missed: the CPU's
    composite rms_norm keeps fp32 copies of the normalized q and k (planned 21% low)."""
    cfg = load_config(TINY, ["model.preset=DiT-S/2", "data.resolution=32", f"deepspeed.precision={precision}"])
    m = model_facts(cfg, 0, "cpu")
    measured = forward_saved_bytes(cfg, 2)
    assert activation_bytes(m, 2, precision, "none", cpu=True) == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("policy", ["none", "attention", "full"])
def test_each_checkpoint_policy_keeps_what_autograd_saves(policy):
    """Per micro-batch in flight (the recompute's transient apart) the plan keeps what autograd
    saves in one forward under that model.checkpoint_policy: attention was planned as none."""
    cfg = load_config(TINY, ["model.preset=DiT-S/2", "data.resolution=32", f"model.checkpoint_policy={policy}"])
    m = model_facts(cfg, 0, "cpu")
    kept = activation_bytes(m, 2, "fp32", policy, cpu=True, in_flight=2) - activation_bytes(m, 2, "fp32", policy,
                                                                                             cpu=True)
    assert kept == pytest.approx(forward_saved_bytes(cfg, 2), rel=0.02)


@pytest.mark.parametrize("config_sets", [["model.checkpoint_policy=attention"], ["model.activation_checkpointing=true"]])
def test_layouts_plan_and_set_each_checkpoint_policy(config_sets):
    """Every policy is a layout, whatever the config's, and its overrides give the run that
    policy (model.activation_checkpointing=true would make any of them full); attention costs
    6 x the MACs plus 2 x its attentions'."""
    cfg = load_config(TINY, [*config_sets, "data.batch_size=64"])
    hw = Hardware(gpus=2, cpu=True)
    m, estimates = plan(cfg, hw)
    assert {e.layout.checkpoint_policy for e in estimates} == {"none", "attention", "full"}
    for e in estimates:
        run = load_config(TINY, [*config_sets, "data.batch_size=64",
                                 *e.layout.overrides(cfg, e.micro_batch, e.grad_accum).split()])
        validate(run, hw.gpus)
        assert checkpoint_policy(run.model) == e.layout.checkpoint_policy
    step = {e.layout.checkpoint_policy: e.step_s for e in estimates if e.layout == Layout(2, 1, e.layout.checkpoint_policy)}
    assert 0 < m.attention_macs < m.macs_per_sample
    assert step["attention"] / step["none"] == pytest.approx((6 * m.macs_per_sample + 2 * m.attention_macs)
                                                             / (6 * m.macs_per_sample), rel=1e-9)
    assert step["none"] < step["attention"] < step["full"]
    assert "ckpt attn" in format_plan(cfg, m, estimates, hw)


CASES = ["DiT-T/2,2,fp32", "DiT-Tiny/1,2,fp32", "DiT-T/2,0,fp32", "DiT-T/2,3,fp32", "DiT-T/2,2,bf16",
         "DiT-T/2,1,bf16"]


@pytest.mark.slow
def test_plan_matches_measured_memory_of_the_tiny_presets(tmp_path):
    out = tmp_path / "measured.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "tests.launch.memory_probe", str(out), str(TINY), *CASES],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = []
    for r in json.loads(out.read_text()):
        cfg = load_config(TINY, [f"model.preset={r['preset']}", f"deepspeed.zero_stage={r['zero_stage']}",
                                 f"deepspeed.precision={r['precision']}"])
        hw = Hardware(gpus=r["world"], cpu=True)
        layout = next(x for x in layouts(hw.gpus, 100) if (x.zero_stage, x.pipeline_stages, x.checkpoint_policy)
                      == (r["zero_stage"], 1, "none"))
        m = model_facts(cfg, zero_settings(cfg, 3).persistence_threshold)
        e = estimate(cfg, m, hw, layout)
        pairs = [("model states", e.model_states, r["model_states"]), ("buckets", e.buckets, r["buckets"])]
        if r["activations"] is not None:
            pairs.append(("activations", e.activations, r["activations"]))
        for what, planned, measured in pairs:
            rows.append(f"{r['preset']:<11} ZeRO-{r['zero_stage']} {r['precision']}  {what:<13}"
                        f"planned {planned / 1e6:9.2f} MB  measured {measured / 1e6:9.2f} MB")
            assert planned == pytest.approx(measured, rel=0.2), rows[-1]
    print("\n".join(rows))


def test_long_clips_get_a_sequence_split(capsys):
    """17 frames at 512 px (17 latent frames, 17k tokens) fit one H100 per sample; 34 (34 latent
    frames, 35k tokens) fit whole only with checkpointing, and split over 2 ranks they train
    faster: activations per rank drop by S, the all-to-all volume appears, and the plan suggests
    the split. Factorized attention splits between frames: S must divide the latent frames."""
    video = [*XL, "model.video=true", "data.kind=video", "data.resolution=512", "data.batch_size=1"]
    short = load_config(TINY, [*video, "data.num_frames=17"])
    m = model_facts(short, zero_settings(short, 3).persistence_threshold)
    hw = Hardware(gpus=8)
    assert {x.sequence_parallel for x in layouts(8, m.depth, m.heads, m.split_unit)} == {1}  # 17 frames
    by_split = {x.sequence_parallel: estimate(short, m, hw, x) for x in layouts(8, m.depth, m.heads, 1024)
                if (x.zero_stage, x.checkpoint_policy) == (2, "none") and x.pipeline_stages == 1}
    assert sorted(by_split) == [1, 2, 4, 8]  # the divisors of 16 heads and 8 GPUs
    assert by_split[1].all_to_all == 0 < by_split[2].all_to_all
    assert by_split[2].activations == pytest.approx(by_split[1].activations / 2, rel=0.05)
    assert main(["plan", str(TINY), *video, "data.num_frames=17", "--gpus", "8"]) == 0
    assert "seq" not in capsys.readouterr().out.split("suggested:")[1]  # no exchange when the clip fits
    assert main(["plan", str(TINY), *video, "data.num_frames=34", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "deepspeed.sequence_parallel_size=2 " in out.split("suggested:")[1]


@pytest.mark.parametrize("extra, micro", [
    ([], None),
    (["deepspeed.grad_accum=3"], 2),
    (["deepspeed.offload_optimizer=true"], None),
    (["deepspeed.zero_stage=3", "deepspeed.offload_params=true"], None),
    (["model.compile=true"], None),
])
def test_every_layout_keeps_the_global_batch_and_is_accepted(extra, micro):
    """Each layout the plan offers, its overrides applied to the config, is one the trainer
    accepts and trains with the global batch the plan reports: p pipeline stages and a sequence
    split S run p S times the micro-batches of the GPUs / (p S) replicas; offload refuses ZeRO-0
    and pipelines, model.compile ZeRO-3."""
    from trainer.elastic import shape_of

    cfg = load_config(TINY, extra)
    _, estimates = plan(cfg, Hardware(gpus=4), micro)
    splits = {(e.layout.zero_stage, e.layout.pipeline_stages, e.layout.sequence_parallel) for e in estimates}
    if not extra:  # fp32: a pipeline at ZeRO-1 (ZeRO-0 would clip by the first stage's norm: refused)
        assert {(1, 4, 1), (1, 2, 1), (3, 1, 2)} <= splits and (0, 4, 1) not in splits
    for e in estimates:
        applied = load_config(TINY, [*extra, *e.layout.overrides(cfg, e.micro_batch, e.grad_accum).split()])
        validate(applied, 4)
        assert shape_of(applied, 4).global_batch == e.samples_per_step == 4 * (micro or 4) * cfg.deepspeed.grad_accum
    if "deepspeed.offload_optimizer=true" in extra:
        assert {z for z, p, _ in splits} == {1, 2, 3} and {p for _, p, _ in splits} == {1}
    if "model.compile=true" in extra:
        assert 3 not in {z for z, _, _ in splits}


def test_offloaded_states_are_counted_on_the_host(capsys):
    """ZeRO-Offload: the master weights, Adam's moments, the gradient partition and the EMA's
    shadow of the masters leave the GPU (host GB per GPU), and with offload_params at ZeRO-3 the
    parameter partition too."""
    base = [*XL, "data.resolution=256"]
    cfg = load_config(TINY, base)
    m = model_facts(cfg, zero_settings(cfg, 3).persistence_threshold)
    hw = Hardware(gpus=8)
    off = load_config(TINY, [*base, "deepspeed.offload_optimizer=true"])
    for zero in (1, 2, 3):
        gpu, host = estimate(cfg, m, hw, Layout(zero, 1, "none")), estimate(off, m, hw, Layout(zero, 1, "none"))
        assert host.states["master"] == host.states["optimizer"] == host.states["grads"] == 0
        assert host.host["master"] + host.host["optimizer"] == gpu.states["master"] + gpu.states["optimizer"]
        assert host.host["grads"] == pytest.approx(4 * m.params / 8)  # fp32 (bf16: grad_accum_dtype)
        moved = gpu.states["master"] + gpu.states["optimizer"] + gpu.states["grads"] + gpu.ema
        assert host.ema == 0 and host.host["ema"] == gpu.ema == pytest.approx(4 * m.params / 8)
        # bf16 ZeRO-1 without offload steps through BF16_Optimizer (no reduce buckets), with it not
        assert host.total == pytest.approx(gpu.total - moved + host.buckets - gpu.buckets)
        assert (gpu.buckets == 0) == (zero == 1) and host.buckets > 0
    both = load_config(TINY, [*base, "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                              "deepspeed.offload_params=true"])
    e = estimate(both, m, hw, Layout(3, 1, "none"))
    assert e.states["params"] == 2 * m.persistent_params and e.host["params"] == pytest.approx(2 * m.params / 8)
    assert main(["plan", str(TINY), *base, "data.resolution=512", "data.batch_size=512",
                 "deepspeed.offload_optimizer=true", "--gpus", "1", "--gpu-mem", "16"]) == 0
    out = capsys.readouterr().out
    assert "nothing fits" in out and "offload_optimizer=true" not in out.split("nothing fits")[1]


def test_video_autoencoder_is_the_trainers():
    """A fresh autoencoder of a video config is the trainer's 2-D one (frame by frame): 9 frames
    stay 9 latent frames, as the trainer's inference bundle shapes its samples."""
    from trainer.bundle import InferenceBundle

    cfg = load_config(TINY, ["model.video=true", "data.kind=video", "data.num_frames=9", "model.autoencoder.kind=kl",
                             "model.in_channels=4"])
    bundle = InferenceBundle(cfg.model, cfg.diffusion, cfg.data)
    assert model_facts(cfg, 0).latent_shape == bundle.sample_shape() == (4, 9, 8, 8)
    assert autoencoder_facts(cfg)[2] == sum(p.numel() for p in bundle.autoencoder.parameters())


@pytest.mark.parametrize("overrides, key, said", [
    (["model.text.kind=open_clip", "model.text.arch=No-Such-Arch"], "model.text.arch", "No-Such-Arch"),
    (["model.text.kind=hf"], "model.text.path", "kind=hf needs"),
    # as `dit train` says it (it was the hub client's "Repo id must be in the form ...")
    (["model.text.kind=t5", "model.text.path=/nonexistent/t5"], "model.text.path",
     "/nonexistent/t5 is not a directory nor a hub model in the local cache"),
])
def test_a_network_that_cannot_be_built_is_one_line_naming_the_key(capsys, overrides, key, said):
    """The plan builds the config's networks (on the meta device): one it cannot build is a
    config error naming the key, on one line, exit 2, as validation's errors are."""
    assert main(["plan", str(TINY), *overrides, "--gpus", "2"]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"dit plan: config error at '{key}': ") and out.count("\n") == 1, out
    assert said in out, out


def test_an_autoencoder_folder_not_written_yet_is_planned_fresh(capsys, tmp_path):
    """model.autoencoder.path names the folder an autoencoder stage will write (configs/demo.yaml
    before `dit demo` ran): validation takes it as the fresh autoencoder of its settings, and
    so does the plan."""
    unwritten = ["model.autoencoder.kind=kl", "model.in_channels=4", f"model.autoencoder.path={tmp_path}/autoencoder"]
    fresh = load_config(TINY, [*unwritten[:2]])
    assert autoencoder_facts(load_config(TINY, unwritten)) == autoencoder_facts(fresh)
    assert main(["plan", str(TINY), *unwritten, "--gpus", "2"]) == 0
    assert "suggested:" in capsys.readouterr().out


def test_the_emas_fp32_shadow_is_planned_where_the_trainer_keeps_it():
    """trainer/ema.py keeps an fp32 shadow beside the fp32 masters it follows, split as they are:
    whole on every rank without ZeRO (2.7 GB of DiT-XL/2), a rank's partition at ZeRO 1-3, on the
    host where the optimizer is offloaded; none with ema.enabled=false."""
    cfg = load_config(TINY, [*XL, "data.resolution=256"])
    validate(cfg, N)
    m = model_facts(cfg, zero_settings(cfg, 3).persistence_threshold)
    hw = Hardware(gpus=N)
    off = load_config(TINY, [*XL, "data.resolution=256", "ema.enabled=false"])
    for zero, on_device in ((0, 4 * m.params), (1, 4 * m.params / N), (2, 4 * m.params / N), (3, 4 * m.params / N)):
        with_ema, without = estimate(cfg, m, hw, Layout(zero, 1, "none")), estimate(off, m, hw, Layout(zero, 1, "none"))
        assert with_ema.ema == pytest.approx(on_device) and without.ema == 0
        assert with_ema.total - without.total == pytest.approx(on_device)
    for zero, params in ((2, "false"), (3, "true")):
        offloaded = load_config(TINY, [*XL, "data.resolution=256", f"deepspeed.zero_stage={zero}",
                                       "deepspeed.offload_optimizer=true", f"deepspeed.offload_params={params}"])
        e = estimate(offloaded, m, hw, Layout(zero, 1, "none"))
        assert e.ema == 0 and e.host["ema"] == pytest.approx(4 * m.params / N)


def test_tokens_are_those_of_the_largest_bucket_the_loader_makes():
    """Aspect buckets round their sides to data.bucket_multiple: at 256 px, ratios 0.5-2 and a
    multiple of 64 the largest is 384 x 192, 12.5% more tokens than 256 x 256 (the plan counted
    those, and under-predicted activations and attention)."""
    cfg = load_config(TINY, [*XL, "data.resolution=256", "data.aspect_buckets=[0.5,1.0,2.0]",
                             "data.bucket_multiple=64"])
    validate(cfg, N)
    m = model_facts(cfg, zero_settings(cfg, 3).persistence_threshold)
    assert m.tokens == (384 // 8 // 2) * (192 // 8 // 2) == 288 and m.latent_shape == (4, 48, 24)
