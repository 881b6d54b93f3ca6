"""`dit bench gpu`: the tiny CPU mode end to end (the path `make gpu-check` runs on a GPU, through
the real trainer in child processes), the resume comparison catching a difference in real
checkpoints, the figures' arithmetic; and the full check where a GPU is present."""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import launch.bench_gpu as bench
from launch.bench_gpu_resume import compare_trees, load_checkpoint_file
from launch.bench_gpu_runs import ChildResult
from launch.cli import main
from tests.trainer.harness import ROOT, train_env
from trainer.checkpoint import step_name

FIGURES = re.compile(r"samples/s ([\d.e+-]+) \| tokens/s ([\d.e+-]+) \| TFLOP/s ([\d.e+-]+) \| "
                     r"data wait ([\d.]+)%")
PEAK = 0.5  # a made-up CPU "peak", so the MFU line is printed and can be checked


def dit_bench_gpu(*args: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "bench", "gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = dit_bench_gpu("--tiny", "--device", "cpu", "--peak-tflops", str(PEAK), "--keep-checkpoints", "--profile",
                         "--layouts", "plain,flat", "--out", str(out), env=train_env(), timeout=600)
    return proc, out


def test_tiny_cpu_check_prints_sane_figures(tiny_check):
    proc, out = tiny_check
    text = proc.stdout
    assert proc.returncode == 0, text[-4000:] + proc.stderr[-4000:]
    assert text.strip().splitlines()[-1] == "gpu check: OK"
    figures = FIGURES.findall(text)
    assert len(figures) == 3, text  # the image run plain and with flat blocks, then the video run
    # tokens per sample: 8x8 latents in 2x2 patches = 16; the video has 4 latent frames of them
    for (samples, tokens, tflops, wait), per_sample in zip(figures, (16, 16, 64)):
        samples, tokens, tflops, wait = float(samples), float(tokens), float(tflops), float(wait)
        assert samples > 0 and tflops > 0 and 0 <= wait <= 100
        assert tokens / samples == pytest.approx(per_sample, rel=2e-3)
    mfus = [float(m) for m in re.findall(r"MFU ([\d.]+)% of 0.5 TFLOP/s", text)]
    assert mfus == pytest.approx([float(f[2]) / PEAK * 100 for f in figures], abs=0.051)
    assert text.count("world size 1 over gloo") == 3
    # a run that logs (and drains the device) every step says so: the video run (for the resume
    # check) and here, at 8 steps, the image runs too
    assert bench.DRAIN_NOTE in text.split("\nvideo:")[1] and text.count(bench.DRAIN_NOTE) == 3
    plans = [float(g) for g in re.findall(r"dit plan's ([\d.]+) GB \(the EMA's fp32 shadow included\)", text)]
    assert len(plans) == 3 and all(0 < g < 5 for g in plans)
    assert "peak memory: not measured on this device" in text  # max_memory_allocated is CUDA's
    assert "resumed at step 3: losses and sample keys of steps 4-6 identical" in text
    for run in ("image", "video", "video_resumed"):  # the trainer's own metrics are what was read
        assert (out / run / "logs" / "metrics.jsonl").is_file()
    assert (out / "data" / "image" / "manifest.json").is_file()
    configs = {run: yaml.safe_load((out / run / "config.yaml").read_text()) for run in ("image", "video")}
    # the GPU's optimizer path on the CPU too; the image run, measured and not resumed, writes no universal files
    assert {run: c["optim"]["fused"] for run, c in configs.items()} == {"image": True, "video": True}
    assert {run: c["checkpoint"]["universal"] for run, c in configs.items()} == {"image": False, "video": True}


def test_a_run_out_of_time_writes_where_it_was_into_its_log(tmp_path, monkeypatch):
    """A hang (a collective, a loader worker) must say where: a run out of time writes every
    thread's stack into its log (faulthandler) and exits; it is reported as timed out (124).
    The run hangs for sure: it is told of a second rank that never comes, so its rendezvous
    waits (far longer than the run's 15 s)."""
    import launch.bench_gpu_runs as runs

    child_env = runs.child_env
    monkeypatch.setattr(runs, "child_env", lambda *a: {**child_env(*a), "WORLD_SIZE": "2"})
    spec = runs.RunSpec("image", "DiT-T/2", 8, 0, 4, 4, 2)
    runs.write_latent_shards(tmp_path / "data", spec, runs.caption_pool(4, False))
    cfg = runs.build_config(spec, tmp_path / "data", tmp_path / "run", "fp32", 0, "a red circle")
    result = runs.run_child(cfg, tmp_path / "run", "cpu", False, 15)
    assert result.exit_code == 124
    log = result.log.read_text()
    assert "Timeout (0:00:15)!" in log and "most recent call first" in log, log[-2000:]
    assert "init_distributed" in log  # where it hung


def test_layouts_run_side_by_side_with_their_speed_up(tiny_check):
    """`--layouts plain,flat`: the image run twice, the second with flat blocks in its own folder,
    then a table of both against the first; the video runs use the first layout."""
    proc, out = tiny_check
    text = proc.stdout
    assert proc.returncode == 0, text[-4000:] + proc.stderr[-4000:]
    labels = re.findall(r"^(image|video): .*?, (\S+) blocks, bf16", text, re.M)
    assert labels == [("image", "plain"), ("image", "flat"), ("video", "plain")], labels
    samples = [float(f[0]) for f in FIGURES.findall(text)]
    rows = re.findall(r"^  (plain|flat) +([\d.e+-]+) +([\d.]+) +([\d.e+-]+) +([\d.]+)% +([\d.]+)x +([\d.]+)$",
                      text, re.M)
    assert [r[0] for r in rows] == ["plain", "flat"], text
    assert [float(r[1]) for r in rows] == pytest.approx(samples[:2], rel=1e-3)
    assert float(rows[0][5]) == 1.0 and float(rows[1][5]) == pytest.approx(samples[1] / samples[0], abs=0.006)
    assert float(rows[1][2]) == pytest.approx(1000 * 4 / samples[1], rel=1e-3)  # batch 4 of the tiny image run
    last = [float(x) for x in re.findall(r"^  loss [\d.]+ at step \d+ -> ([\d.]+) at step 8$", text, re.M)]
    assert [float(r[6]) for r in rows] == pytest.approx(last, abs=1e-4)
    assert rows[0][6] == rows[1][6]  # flat blocks train as the plain ones, bit for bit
    flat = {run: yaml.safe_load((out / run / "config.yaml").read_text())["model"]["flat_params"]
            for run in ("image", "image_flat", "video")}
    assert flat == {"image": False, "image_flat": True, "video": False}
    assert (out / "image_flat" / "logs" / "metrics.jsonl").is_file()


def test_image_runs_checkpoints_are_removed_once_measured(tmp_path, monkeypatch, capsys):
    """DiT-XL/2's checkpoint is ~14 GB, written and hashed: every image layout drops its own as
    soon as its figures are read (it is not resumed, and writes no universal files); the video
    run keeps its own until the check has passed (here it fails)."""
    measured = []

    def fake_measure(spec, cfg, run_dir, args, device, deterministic, mem_gb, peak, check, **kw):
        (run_dir / "checkpoints").mkdir(parents=True)
        measured.append((spec.name, kw["layout"], cfg.model.flat_params, run_dir.name))
        if spec.name == "video":
            check.fail("stop here")
        return None

    monkeypatch.setattr(bench, "train_and_measure", fake_measure)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--tiny", "--device", "cpu", "--layouts", "flat,plain,compile", "--out", str(tmp_path)])
    assert bench.run(args) == 1
    assert measured == [("image", "flat", True, "image"), ("image", "plain", False, "image_plain"),
                        ("image", "compile", False, "image_compile"), ("video", "flat", True, "video")]
    left = sorted(p.parent.name for p in tmp_path.glob("*/checkpoints"))
    assert left == ["video"], left
    assert "gpu check: FAILED: stop here" in capsys.readouterr().out


def test_profile_of_the_image_runs_last_steps_is_written_and_left_out_of_the_figures(tiny_check):
    proc, out = tiny_check
    image = proc.stdout.split("\nvideo:")[0]
    # 8 steps, 2 of warm-up, the 3 profiled ones out of the steady state (profiler overhead)
    assert "steady state over 3 steps" in image, image
    found = re.search(r"profile of the last 3 steps: ([\d.]+) ms a step, no device kernels; "
                      r"operators by device and host time: (\S+)", image)
    assert found and float(found[1]) > 0, image
    assert Path(found[2]) == out / "image" / "profile.txt"
    table = Path(found[2]).read_text()
    assert "aten::addmm" in table and "AccumulateGrad" in table  # forward and backward were recorded
    phases = re.search(r"a step by phase, host / device ms: (.*)", image)
    assert phases, image
    times = {name: (float(host), float(device))
             for name, host, device in re.findall(r"(\w+) ([\d.]+) / ([\d.]+)", phases[1])}
    assert list(times) == ["batch", "forward", "backward", "step", "ema"], phases[1]
    assert all(device == 0 for _, device in times.values())  # no device kernels on the CPU
    assert times["backward"][0] > 0 and times["forward"][0] > 0
    assert sum(host for host, _ in times.values()) <= float(found[1]) * 1.01  # parts of the step


def test_resume_check_fails_on_different_weights_or_losses(tiny_check, tmp_path):
    proc, out = tiny_check
    assert proc.returncode == 0, proc.stdout[-3000:]
    ref = out / "video"
    assert bench.resume_check(ref, out / "video_resumed", 3, 6).ok
    assert not bench.resume_check(ref, out / "video_resumed", 2, 6).ok  # step 3 was never redone

    other = tmp_path / "weights"
    shutil.copytree(out / "video_resumed", other)
    ema_path = other / "checkpoints" / step_name(6) / "ema.safetensors"
    ema = load_file(str(ema_path))
    name = sorted(ema)[0]
    ema[name].view(-1)[0] = torch.nextafter(ema[name].view(-1)[0], torch.tensor(float("inf")))  # one ulp
    save_file(ema, str(ema_path))
    result = bench.resume_check(ref, other, 3, 6)
    assert not result.ok and any("ema.safetensors" in p and name in p for p in result.problems), result.problems

    other = tmp_path / "losses"
    shutil.copytree(out / "video_resumed", other)
    metrics = other / "logs" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for r in records:
        if r.get("step") == 5 and "loss" in r:
            r["loss"] += 1e-7
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = bench.resume_check(ref, other, 3, 6)
    assert [p for p in result.problems if p.startswith("loss of step 5")], result.problems


def test_the_check_reports_failed_when_the_resumed_run_differs(tiny_check, tmp_path, monkeypatch, capsys):
    """check_resume's verdict, with a child that 'resumes' to different weights."""
    proc, out = tiny_check
    assert proc.returncode == 0, proc.stdout[-3000:]

    def fake_child(cfg, run_dir, device, deterministic, timeout_s):
        shutil.rmtree(run_dir)
        shutil.copytree(out / "video_resumed", run_dir)
        path = run_dir / "checkpoints" / step_name(6) / "student" / "mp_rank_00_model_states.pt"
        state = load_checkpoint_file(path)
        key = sorted(state["module"])[0]
        state["module"][key] = state["module"][key] + 1
        torch.save(state, path)
        return ChildResult(0)

    monkeypatch.setattr(bench, "run_child", fake_child)
    video = bench.RunSpec("video", "DiT-T/2", 8, 4, 2, 6, 3)
    check = bench.Check(mem_tolerance=0.5)
    bench.check_resume(video, out / "video", tmp_path / "resumed", None, "cpu", 60, check)
    assert len(check.problems) == 1 and "save + resume is not exact" in check.problems[0], check.problems
    assert "mp_rank_00_model_states.pt.module." in capsys.readouterr().out


def test_steady_state_is_total_work_over_total_time():
    records = [{"step": s, "samples_per_s": rate, "tokens_per_s": rate * 16, "tflops": rate * 1e-3,
                "data_wait": wait, "loss": 1.0}
               for s, rate, wait in [(1, 1.0, 0.9), (2, 2.0, 0.5), (3, 4.0, 0.0), (4, 1.0, 0.1), (5, 4.0, 0.2)]]
    tp = bench.steady_throughput(records, warmup=2, exclude=(4,))  # steps 3 and 5: 0.25 s each
    assert tp.steps == 2 and tp.samples_per_s == pytest.approx(4.0)
    assert tp.tokens_per_s == pytest.approx(64.0) and tp.tflops == pytest.approx(4e-3)
    assert tp.data_wait == pytest.approx(0.1)
    tp = bench.steady_throughput(records, warmup=0)  # 1 + 0.5 + 0.25 + 1 + 0.25 s for 5 steps
    assert tp.samples_per_s == pytest.approx(5 / 3.0)
    assert bench.steady_throughput(records, warmup=5) is None
    windows = [{"step": s, "samples_per_s": rate, "tokens_per_s": rate, "tflops": rate, "data_wait": 0.0}
               for s, rate in [(5, 1.0), (10, 2.0), (15, 4.0), (20, 8.0)]]  # log.every=5
    tp = bench.steady_throughput(windows, warmup=5, exclude=(16,))  # steps 6-15: 2.5 s + 1.25 s
    assert tp.steps == 10 and tp.samples_per_s == pytest.approx(10 / 3.75) and tp.tflops == pytest.approx(10 / 3.75)


def test_the_video_runs_resume_checkpoint_survives_retention(tmp_path):
    """The trainer saves at each multiple of checkpoint.every and at the last step, and keeps the
    last checkpoint.keep: the resume check's checkpoint must be among them for any --video-steps
    (7 steps saved at 3, 6 and 7 and deleted step 3 before the check read it)."""
    from launch.bench_gpu_runs import build_config

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for steps in range(4, 41):
        args = parser.parse_args(["--tiny", "--video-steps", str(steps), "--batch-size", "2",
                                  "--video-batch-size", "2"])
        args.resolution, args.frames, args.preset, args.video_preset = 64, 4, "DiT-T/2", "DiT-T/2"
        args.steps = 8
        _, video = bench.choose_specs(args, None, 1.0, True)
        every = video.checkpoint_every
        keep = build_config(video, tmp_path, tmp_path, "fp32", 0, "a red circle").checkpoint.keep
        saves = sorted({*range(every, steps + 1, every), steps})
        assert every in saves[-keep:], (steps, every, saves)
        assert 1 <= every < steps


def test_every_step_after_a_save_is_left_out_of_the_steady_state():
    assert bench.post_save_steps(16, 8) == (9,)
    assert bench.post_save_steps(16, 4) == (5, 9, 13)  # not 17: the last save ends the run
    assert bench.post_save_steps(7, 3) == (4, 7)


def test_an_error_inside_the_check_still_ends_in_the_failed_line(tmp_path, monkeypatch, capsys):
    def broken(*a, **kw):
        raise FileNotFoundError("checkpoints/step_00000003")

    monkeypatch.setattr(bench, "train_and_measure", broken)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--tiny", "--device", "cpu", "--out", str(tmp_path)])) == 1
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == \
        "gpu check: FAILED: FileNotFoundError: checkpoints/step_00000003"
    assert "Traceback" in captured.err


def test_profile_counts_each_device_kernel_once():
    """Profiler rows as CUDA's key_averages() has them: a CPU op whose self device time is its
    kernel's, that kernel as a device row, and a phase range both as a CPU row and as a device
    annotation spanning the kernel. Only the kernel counts (3 ms in all, not 3 + 3 + 3)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from launch.bench_gpu_runs import device_kernel_seconds

    def row(device_type, self_device_us, annotation=False):
        return SimpleNamespace(device_type=device_type, self_device_time_total=self_device_us,
                               is_user_annotation=annotation, is_legacy=False)

    rows = [row(DeviceType.CPU, 3000), row(DeviceType.CUDA, 3000), row(DeviceType.CPU, 0, annotation=True),
            row(DeviceType.CUDA, 3000, annotation=True)]
    assert device_kernel_seconds(rows) == pytest.approx(0.003)
    assert device_kernel_seconds([row(DeviceType.CPU, 0)]) == 0  # the CPU: no device kernels


def test_profiled_steps_run_backward_on_the_calling_thread(tmp_path):
    """On CUDA autograd runs backward on its device thread, outside the main thread's `backward`
    phase range (its device time read ~0): the profiled steps, and only they, run it on the
    calling thread."""
    from types import SimpleNamespace

    from launch.bench_gpu_runs import PROFILED_STEPS, profile_last_steps

    seen = []
    trainer = SimpleNamespace(state=SimpleNamespace(step=0))
    trainer.train_step = lambda batches: seen.append(torch._C._is_multithreading_enabled()) or ({}, {})
    trainer.record_step = lambda infos, skips: setattr(trainer.state, "step", trainer.state.step + 1)
    result = {}
    total = PROFILED_STEPS + 2
    profile_last_steps(trainer, total, tmp_path / "profile.txt", result)
    for _ in range(total):
        trainer.record_step(*trainer.train_step(None))
    assert seen == [True] * 2 + [False] * PROFILED_STEPS
    assert torch._C._is_multithreading_enabled() and result["profile"]["steps"] == PROFILED_STEPS


def test_peak_table_matches_device_names():
    assert bench.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989
    assert bench.peak_tflops_for("NVIDIA H100 PCIe") == 756
    assert bench.peak_tflops_for("NVIDIA H200") == 989
    assert bench.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312
    assert bench.peak_tflops_for("NVIDIA B200") == 2250
    # a substring of a faster part's name must not give that part's peak (MFU understated)
    assert bench.peak_tflops_for("NVIDIA H200 NVL") == 835
    assert bench.peak_tflops_for("NVIDIA GB200") == 2500
    assert bench.peak_tflops_for("NVIDIA GeForce RTX 4090") is None
    # a MIG slice has a fraction of the chip's SMs: the chip's peak would understate MFU ~7x (1g)
    for slice_ in ("NVIDIA A100-SXM4-40GB MIG 1g.10gb", "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA H200 MIG 3g.71gb"):
        assert bench.peak_tflops_for(slice_) is None, slice_
        assert "MIG slice" in bench.why_no_peak(slice_)


def test_compare_trees_names_what_differs():
    a = {"w": torch.zeros(3), "opt": [{"step": 1, "m": torch.ones(2, dtype=torch.bfloat16)}]}
    same = {"w": torch.zeros(3), "opt": [{"step": 1, "m": torch.ones(2, dtype=torch.bfloat16)}]}
    assert compare_trees(a, same) == []
    b = {"w": torch.tensor([0.0, 0.5, 0.0]), "opt": [{"step": 2, "m": torch.ones(2)}]}
    problems = compare_trees(a, b)
    assert "w: 1 of 3 values differ (max |diff| 0.5)" in problems
    assert "opt[0].step: 1 vs 2" in problems and any(p.startswith("opt[0].m: (2,) torch.bfloat16") for p in problems)
    assert compare_trees({"a": 1}, {"b": 1}) == ["top level: keys differ (['a', 'b'])"]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "gpu", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--peak-tflops", "--steps", "--out", "--device", "--tiny", "--precision",
                                      "--compile", "--profile", "--layouts"))


def test_compile_reaches_both_runs_configs(tmp_path):
    """`--compile` is `model.compile=true` on top of each run's overrides (the engine compiles the
    blocks); without it the runs stay eager."""
    from launch.bench_gpu_runs import build_config

    for spec in (bench.RunSpec("image", "DiT-T/2", 8, 0, 2, 6, 3), bench.RunSpec("video", "DiT-T/2", 8, 4, 2, 6, 3)):
        eager = build_config(spec, tmp_path / "data", tmp_path / "run", "bf16", 0, "a red circle")
        compiled = build_config(spec, tmp_path / "data", tmp_path / "run", "bf16", 0, "a red circle",
                                ["model.compile=true"])
        assert (eager.model.compile, compiled.model.compile) == (False, True)
        assert compiled.model.preset == "DiT-T/2" and compiled.deepspeed.precision == "bf16"


def test_layout_options_choose_the_runs_layouts():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)

    def layouts(*argv: str) -> list[str]:
        return bench.layouts(parser.parse_args(argv))

    assert layouts() == ["plain"] and layouts("--compile") == ["compile"] and layouts("--flat-params") == ["flat"]
    assert layouts("--compile", "--flat-params") == ["compile+flat"]
    assert bench.LAYOUTS["compile+flat"] == ("model.compile=true", "model.flat_params=true")
    assert layouts("--layouts", "compile+flat, plain,plain") == ["compile+flat", "plain"]
    with pytest.raises(ValueError, match="'fast'.*choose from plain, compile, flat, compile\\+flat"):
        layouts("--layouts", "plain,fast")
    with pytest.raises(ValueError, match="drop --compile"):
        layouts("--layouts", "plain,flat", "--compile")
    every = [bench.layout_dir(Path("out"), i, n).name for i in range(len(bench.LAYOUTS)) for n in bench.LAYOUTS]
    assert set(every) <= set(bench.run_folders())  # each is cleared when a check starts, whatever the order


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_asking_for_cuda_without_one_fails_with_the_reason(capsys):
    assert main(["bench", "gpu", "--device", "cuda"]) == 1
    assert capsys.readouterr().out.strip().startswith("gpu check: FAILED: --device cuda but")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
def test_gpu_check_on_this_gpu(tmp_path):
    """The full check: DiT-XL/2 bf16 ZeRO-2 over NCCL, the video DiT, the exact resume."""
    env = {k: v for k, v in train_env().items() if k not in ("DS_ACCELERATOR", "OMP_NUM_THREADS")}
    proc = dit_bench_gpu("--out", str(tmp_path), env=env, timeout=1800)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "gpu check: OK"
    assert proc.stdout.count("over nccl") == 2 and len(FIGURES.findall(proc.stdout)) == 2
    assert re.search(r"peak memory [\d.]+ GB \(max_memory_allocated, the training steps\)", proc.stdout)
    if bench.peak_tflops_for(torch.cuda.get_device_name()) is not None:
        assert "MFU" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
def test_host_syncs_are_counted_by_the_line_that_made_them():
    """What `--profile` reports of the trainer's steps: a host read counts, a queued kernel does not."""
    from launch.bench_gpu_runs import count_host_syncs

    x = torch.ones(4, device="cuda")
    with count_host_syncs(True) as sites:
        y = x * 2  # queued: no sync
        value = y.sum().item()  # the host waits for the device
    assert value == 8 and sum(sites.values()) == 1, sites
    assert next(iter(sites)).startswith(f"{__file__}:")  # the line of the `.item()` above
