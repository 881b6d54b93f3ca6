"""Named DiT sizes (DiT Table 1), registered by name as DiT's `DiT_models` dict, plus tiny
ones for tests and the demo."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiTPreset:
    depth: int
    width: int
    heads: int
    patch: int
    mlp_ratio: float = 4.0


_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PRESETS: dict[str, DiTPreset] = {
    f"DiT-{name}/{patch}": DiTPreset(depth, width, heads, patch)
    for name, (depth, width, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}
DIT_PRESETS["DiT-T/2"] = DiTPreset(depth=4, width=128, heads=4, patch=2)  # tests, demo
DIT_PRESETS["DiT-Tiny/1"] = DiTPreset(depth=2, width=64, heads=4, patch=1)  # unit tests


def dit_preset(name: str) -> DiTPreset:
    if name not in DIT_PRESETS:
        raise KeyError(f"unknown DiT preset '{name}' (model.preset); known: {', '.join(DIT_PRESETS)}")
    return DIT_PRESETS[name]
