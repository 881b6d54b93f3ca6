"""The figures of `dit bench gpu` (launch/bench_gpu.py): the devices' bf16 peaks for MFU,
dit plan's memory prediction for the layout that runs, and the steady-state throughput from
the trainer's own metrics.jsonl.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

GB = 1e9
# Dense (no sparsity) bf16 peak per GPU, TFLOP/s, from NVIDIA's datasheets; matched in order as
# a case-insensitive substring of torch.cuda.get_device_name(), so specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200 NVL", 835.0),  # NVIDIA's 1,671 TFLOP/s is with 2:4 sparsity
    ("H200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GB200", 2500.0),  # per GPU of a GB200 superchip (NVL72: 180 PFLOP/s dense bf16 over 72)
    ("B200", 2250.0),
    ("A100", 312.0),
)
MEM_FRACTION = 0.6  # batch sizes are chosen so that dit plan's prediction uses at most this much


def peak_tflops_for(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a device from its name, or None when it is not in the table or
    is a MIG slice ("NVIDIA A100-SXM4-40GB MIG 1g.10gb"): a slice has a fraction of the chip's
    SMs (1g: 1/7 of them), and the chip's peak would understate its MFU that many times."""
    if is_mig_slice(device_name):
        return None
    name = device_name.lower()
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern.lower() in name:
            return tflops
    return None


def is_mig_slice(device_name: str) -> bool:
    return " mig " in f" {device_name.lower()} "


# ---------------------------------------------------------------------------------------------
# Memory: dit plan's prediction for the layout that runs (ZeRO-2, no pipeline, one GPU).


@dataclass(frozen=True)
class MemoryPlan:
    predicted: float  # dit plan's total for the layout (the EMA's fp32 shadow included)
    params: int


def predict_memory(cfg, device_mem_gb: float, cpu: bool) -> MemoryPlan:
    from launch.plan import Hardware, Layout, plan
    from trainer.parallel import checkpoint_policy

    hw = Hardware(gpus=1, gpu_mem_gb=device_mem_gb, cpu=cpu)
    layout = Layout(cfg.deepspeed.zero_stage, 1, checkpoint_policy(cfg.model))  # the policy the run applies
    facts, estimates = plan(cfg, hw)
    chosen = next(e for e in estimates if e.layout == layout)
    return MemoryPlan(chosen.total, facts.params)


def choose_batch(make_cfg, cap: int, device_mem_gb: float, cpu: bool) -> int:
    """The largest power of two <= cap whose predicted memory fits MEM_FRACTION of the device."""
    batch = cap
    while batch > 1:
        if predict_memory(make_cfg(batch), device_mem_gb, cpu).predicted <= MEM_FRACTION * device_mem_gb * GB:
            break
        batch //= 2
    return batch


# ---------------------------------------------------------------------------------------------
# Throughput from the trainer's metrics.jsonl.


@dataclass(frozen=True)
class Throughput:
    steps: int  # steady-state steps the figures come from
    samples_per_s: float
    tokens_per_s: float
    tflops: float
    data_wait: float  # share of step time spent waiting for the loader


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady_throughput(records: list[dict], warmup: int, exclude: Sequence[int] = ()) -> Optional[Throughput]:
    """Aggregate the metrics records whose window starts after `warmup` steps, leaving out the
    windows that hold a step of `exclude` (the step after a checkpoint: its window holds the
    save). Rates are total work over total time, not a mean of rates."""
    rows, last = [], 0
    for r in sorted((r for r in records if "samples_per_s" in r), key=lambda r: r["step"]):
        first, last = last + 1, r["step"]  # the record covers steps first..last
        if first > warmup and not any(first <= s <= last for s in exclude) and r["samples_per_s"] > 0:
            rows.append((last - first + 1, r))
    if not rows:
        return None
    # A window of n steps took n x (samples per step) / (samples/s) seconds; the samples per step
    # are the same in every window, so they cancel out of the ratios below.
    times = [n / r["samples_per_s"] for n, r in rows]
    total = sum(times)
    steps = sum(n for n, _ in rows)

    def weighted(key: str) -> float:
        return sum(r[key] * t for (_, r), t in zip(rows, times)) / total

    return Throughput(steps, steps / total, weighted("tokens_per_s"), weighted("tflops"), weighted("data_wait"))


def losses(records: list[dict]) -> dict[int, float]:
    """step -> loss (the last record of a step counts)."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}
