"""`dit plan`: the ZeRO formulas, DiT-XL/2 figures, and the tiny presets' estimates against the
memory of real DeepSpeed engines on this CPU (within 20%)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.cli import main
from launch.plan import (Hardware, activation_bytes, block_units, estimate, layouts, model_state_bytes,
                         zero_settings)
from launch.plan_model import model_facts
from tests.trainer.harness import ROOT, TINY, train_env
from trainer.config import load_config

P, N = 1_000_000, 8
XL = ["model.preset=DiT-XL/2", "model.in_channels=4", "model.autoencoder.kind=kl",
      "model.autoencoder.block_out_channels=[128,256,512,512]", "model.autoencoder.layers_per_block=2",
      "deepspeed.precision=bf16", "data.batch_size=32"]


def total(zero: int, precision: str, dp: int = N, persistent: int = 0) -> float:
    return sum(model_state_bytes(P, zero, dp, precision, persistent).values())


def test_zero_model_states_per_rank():
    assert total(0, "bf16") == total(0, "fp32") == 16 * P  # 2+2+12, and 4+4+8 in fp32
    assert total(3, "bf16") == 16 * P / N  # (2 + 2 + 12) x params / N
    assert total(2, "bf16") == 2 * P + 14 * P / N
    assert total(2, "fp32") == total(1, "fp32") == 4 * P + 16 * P / N  # fp32 master partition too
    assert total(3, "fp32", persistent=1000) == 20 * P / N + 4 * 1000


def test_checkpointing_keeps_one_input_per_block():
    cfg = load_config(TINY, ["model.preset=DiT-XL/2", "data.resolution=32", "model.in_channels=4"])
    m = model_facts(cfg, persistence_threshold=100_000)
    full = activation_bytes(m, 1, "bf16", checkpointing=False)
    ckpt = activation_bytes(m, 1, "bf16", checkpointing=True)
    assert 10 < full / ckpt < m.depth  # ~27 saved values per token and channel in a block, 1 kept
    assert activation_bytes(m, 4, "bf16", False) == 4 * full


def test_gpu_autocast_keeps_the_modulated_norm_outputs_in_fp32():
    """CUDA autocast runs layer_norm in fp32: in bf16 on a GPU each block keeps its two modulated
    norm outputs in fp32 (one more 2-byte unit each) and the head its final one; not on the CPU
    (its autocast keeps them bf16), and fp32 counts every value at 4 bytes already."""
    cfg = load_config(TINY, [*XL, "data.resolution=256"])
    m = model_facts(cfg, persistence_threshold=100_000)
    unit = m.tokens * m.width * 2  # one saved B N D value in bf16, per sample
    assert block_units(m, False, fp32_norms=True)[0] - block_units(m, False)[0] == 2
    gpu, fp32 = activation_bytes(m, 1, "bf16", False), activation_bytes(m, 1, "fp32", False)
    assert gpu == pytest.approx(fp32 / 2 + (2 * m.depth + 1) * unit, rel=1e-12)
    assert activation_bytes(m, 1, "bf16", False, cpu=True) == pytest.approx(
        activation_bytes(m, 1, "fp32", False, cpu=True) / 2, rel=1e-12)
    with_ckpt = activation_bytes(m, 1, "bf16", True) - activation_bytes(m, 1, "fp32", True) / 2
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


CASES = ["DiT-T/2,2,fp32", "DiT-Tiny/1,2,fp32", "DiT-T/2,0,fp32", "DiT-T/2,3,fp32", "DiT-T/2,2,bf16"]


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
        layout = next(x for x in layouts(hw.gpus, 100) if (x.zero_stage, x.pipeline_stages, x.checkpointing)
                      == (r["zero_stage"], 1, False))
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
    """17 frames at 512 px (17 latent frames, 17k tokens) fit one H100 per sample; 265 (34 latent
    frames, 35k tokens) fit whole only with checkpointing, and split over 2 ranks they train
    faster: activations per rank drop by S, the all-to-all volume appears, and the plan suggests
    the split. Factorized attention splits between frames: S must divide the latent frames."""
    video = [*XL, "model.video=true", "data.kind=video", "data.resolution=512", "data.batch_size=1"]
    short = load_config(TINY, [*video, "data.num_frames=17"])
    m = model_facts(short, zero_settings(short, 3).persistence_threshold)
    hw = Hardware(gpus=8)
    assert {x.sequence_parallel for x in layouts(8, m.depth, m.heads, m.split_unit)} == {1}  # 17 frames
    by_split = {x.sequence_parallel: estimate(short, m, hw, x) for x in layouts(8, m.depth, m.heads, 1024)
                if (x.zero_stage, x.checkpointing) == (2, False) and x.pipeline_stages == 1}
    assert sorted(by_split) == [1, 2, 4, 8]  # the divisors of 16 heads and 8 GPUs
    assert by_split[1].all_to_all == 0 < by_split[2].all_to_all
    assert by_split[2].activations == pytest.approx(by_split[1].activations / 2, rel=0.05)
    assert main(["plan", str(TINY), *video, "data.num_frames=17", "--gpus", "8"]) == 0
    assert "seq" not in capsys.readouterr().out.split("suggested:")[1]  # no exchange when the clip fits
    assert main(["plan", str(TINY), *video, "data.num_frames=265", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "deepspeed.sequence_parallel_size=2 " in out.split("suggested:")[1]
