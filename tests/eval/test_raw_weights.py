"""`dit sample --raw` and `dit export --raw`: the student's fp32 master weights from the
checkpoint's universal file, by the network's weight names, whatever the layout and precision
(here a real bf16 run with flat block parameters, whose DeepSpeed module file holds
`blocks.N.flat_params` in bf16); and what samples.json and the exports record when a checkpoint
kept no EMA."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.cli import main as dit
from tests.eval.eval_helpers import perturbed_weights, tiny_config, write_checkpoint
from tests.trainer.harness import ROOT, TINY, latest_dir, shapes_shards, train_env  # noqa: F401  (session fixture)
from trainer.cascade import CascadeStageSpec, load_stage
from trainer.checkpoint import CheckpointManager, RankState
from trainer.checkpoint_format import CheckpointError
from trainer.config import to_yaml
from trainer.diffusion import SamplerSettings
from trainer.elastic import universal_file

PROMPT = ["--prompt", "a large red circle at the top left", "--steps", "2"]


def universal_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(step_dir / universal_file("student")))
    return {k.removeprefix("fp32/"): v for k, v in tensors.items() if k.startswith("fp32/")}


@pytest.fixture(scope="module")
def flat_bf16_run(shapes_shards, tmp_path_factory) -> Path:  # noqa: F811
    """A real 2-step `dit train` (one process, ZeRO-2, bf16, flat block parameters)."""
    out = tmp_path_factory.mktemp("flat_bf16")
    cmd = [sys.executable, "-m", "launch.cli", "train", str(TINY), f"data.shards={shapes_shards}",
           f"run.out_dir={out}", "stage.steps=2", "checkpoint.every=2", "log.sample_every=0",
           "model.flat_params=true", "deepspeed.precision=bf16"]
    done = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_raw_weights_of_a_flat_bf16_run_are_its_fp32_masters(flat_bf16_run, tmp_path):
    step_dir = latest_dir(flat_bf16_run)
    masters = universal_weights(step_dir)
    assert any(k.endswith(".flat_params") for k in torch.load(step_dir / "student" / "mp_rank_00_model_states.pt",
                                                               weights_only=False)["module"])
    assert dit(["export", str(step_dir.parent), "--raw", "--out", str(tmp_path / "export")]) == 0
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert exported.keys() == masters.keys() and all(torch.equal(exported[k], masters[k]) for k in masters)
    assert all(v.dtype == torch.float32 for v in exported.values())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in exported.values())  # not rounded to bf16
    assert json.loads((tmp_path / "export" / "config.json").read_text())["weights"] == "raw"
    ema = load_file(str(step_dir / "ema.safetensors"))
    assert any(not torch.equal(ema[k], exported[k]) for k in ema)  # decay 0.9: not the EMA
    assert dit(["sample", str(step_dir.parent), *PROMPT, "--raw", "--out", str(tmp_path / "raw")]) == 0
    assert json.loads((tmp_path / "raw" / "samples.json").read_text())["weights"] == "raw"


def test_raw_weights_without_a_universal_file_say_what_to_do(tmp_path, capsys):
    checkpoint = write_checkpoint(tiny_config(tmp_path / "run", "checkpoint.universal=false"))  # EMA only
    with pytest.raises(CheckpointError, match=r"holds no universal_student.safetensors.*drop --raw.*"
                                              r"checkpoint.universal=true"):
        load_stage(CascadeStageSpec(str(checkpoint)), SamplerSettings(), ema=False)
    # the command says it in one line (it printed a traceback), exit 4: a checkpoint error
    assert dit(["sample", str(checkpoint), *PROMPT, "--raw", "--out", str(tmp_path / "raw")]) == 4
    err = capsys.readouterr().err
    assert "dit: " in err and "drop --raw" in err and "Traceback" not in err


def test_a_checkpoint_without_ema_is_labelled_raw(tmp_path, capsys):
    """ema.enabled=false: sampling and export fall back to the raw weights and say so in their
    records and messages, without --raw."""
    cfg = tiny_config(tmp_path / "run", "ema.enabled=false")
    raw = perturbed_weights(cfg, seed=3)
    CheckpointManager(cfg.checkpoint, rank=0, world_size=1).save(
        1, engines={}, rank_state=RankState({}, {}), config_yaml=to_yaml(cfg),
        shared={universal_file("student"): {f"fp32/{k}": v for k, v in raw.items()}})
    checkpoint = Path(cfg.checkpoint.dir)
    assert dit(["export", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    assert "(raw weights)" in capsys.readouterr().out
    assert json.loads((tmp_path / "export" / "config.json").read_text())["weights"] == "raw"
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(torch.equal(exported[k], raw[k]) for k in raw)
    assert dit(["sample", str(checkpoint), *PROMPT, "--out", str(tmp_path / "samples")]) == 0
    record = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert record["weights"] == "raw" and record["stages"][0]["weights"] == "raw"
