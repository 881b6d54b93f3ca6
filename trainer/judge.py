"""The shapes judge: recover what a synthetic captioned-shapes image or video shows from its
pixels, and score it against the prompt it was generated from.

Deterministic and training-free; every constant comes from `data_pipeline.synth`:

    pixels --nearest of (palette + background) per pixel--> colour labels (H, W)
           --connected components per colour, area >= min_area--> objects, largest first
    object --best soft IoU of its colour membership (edge pixels count partly: MP4 blurs
             chroma) against synth.shape_mask templates (shape x size) at its bbox centre--> shape, size
           --centroid's 3x3 cell--> position
    video  --the largest object per frame--> majority colour / shape / size,
           centroid displacement first -> last frame --> direction

A prompt is parsed into mentions with the same vocabulary; mentions are matched to the
largest detected objects by the assignment that agrees on the most attributes (one or two
mentions: every permutation is tried). Accuracy is reported per attribute over the mentions
that state it, plus `count` (as many objects as mentions) and `overall` (every stated attribute
of every mention right and the count right). Intervals count samples, not mentions: the two
mentions of one image share its sample noise and are not independent (`effective_count`).

At 16 px a circle and a square rasterize to the same pixels (2x2 and 4x4 blocks): shape is
then not identifiable from pixels, and `judge` leaves it out below `MIN_SHAPE_SIZE`.
"""
from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from data_pipeline.synth import BACKGROUND, COLORS, DIRECTIONS, POSITIONS, SHAPES, SIZES, shape_mask
from trainer.media import to_uint8

ATTRIBUTES = ("color", "shape", "size", "position", "direction")
MIN_SHAPE_SIZE = 32  # below this side, circle and square are the same pixels
MIN_AREA_FRACTION = 0.4  # of the smallest template's area: smaller blobs are noise or fringes
MAX_DESCRIBED = 4  # regions described per image; more only count
MIN_TRAVEL = 0.15  # of the side: a smaller centroid displacement is no motion
_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # (1 + K, 3), index 0 = background
_COLOR_NAMES = ("background", *COLORS)
_POSITION_ALIASES = {"center": "centre", "middle": "centre"}
_OFFSETS = (0.0, -0.5, 0.5)  # template centre shifts tried, in pixels
_CELLS = {(int(x * 3), int(y * 3)): name for name, (x, y) in POSITIONS.items()}  # (col, row) -> name


# ------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Mention:
    """One shape a prompt asks for; None where the prompt does not say."""

    shape: str
    color: Optional[str] = None
    size: Optional[str] = None
    position: Optional[str] = None
    direction: Optional[str] = None

    def stated(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _alternation(words: Sequence[str]) -> str:
    """Regex alternation, longest first so that 'top left' wins over 'top'."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


@lru_cache(maxsize=1)
def _mention_pattern() -> re.Pattern:
    positions = _alternation([*POSITIONS, *_POSITION_ALIASES])
    return re.compile(
        rf"\b(?:a|an|one)\s+(?:(?P<size>{_alternation(list(SIZES))})\s+)?"
        rf"(?:(?P<color>{_alternation(list(COLORS))})\s+)?(?P<shape>{_alternation(SHAPES)})"
        rf"(?:\s+(?:moving\s+(?P<direction>{_alternation(list(DIRECTIONS))})"
        rf"|(?:at|on|in)\s+the\s+(?P<position>{positions})))?\b",
        re.IGNORECASE,
    )


def parse_prompt(prompt: str) -> list[Mention]:
    """Mentions of a captioned-shapes prompt, in order, e.g. "a small red circle at the top
    left and a large blue square moving up"; attributes it leaves out are None. The wording
    of `data_pipeline.synth.caption` and "at the centre"/"center" are understood."""
    mentions = []
    for m in _mention_pattern().finditer(prompt):
        found = {k: v.lower() for k, v in m.groupdict().items() if v is not None}
        if "position" in found:
            found["position"] = _POSITION_ALIASES.get(found["position"], found["position"])
        mentions.append(Mention(**found))
    return mentions


# ------------------------------------------------------------------------------- detection


@dataclass
class DetectedObject:
    """What the pixels of one connected single-colour region say."""

    color: str
    shape: str
    size: str
    position: str
    area: int
    centroid: tuple[float, float]  # (x, y) as fractions of the side
    iou: float  # of the best template
    direction: Optional[str] = None

    def value(self, attribute: str) -> Optional[str]:
        return getattr(self, attribute)


def color_labels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index of the nearest of background + palette (0 = background)."""
    d = ((image[:, :, None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)  # (H, W, 1 + K)
    return d.argmin(-1)


@lru_cache(maxsize=4096)
def _template(shape: str, size: str, cx: float, cy: float, side: int) -> np.ndarray:
    return shape_mask(shape, cx, cy, SIZES[size], side)


@lru_cache(maxsize=8)
def min_area(side: int) -> int:
    """Smallest area an object may have at this side: a fraction of the smallest template."""
    smallest = min(int(shape_mask(s, 0.5, 0.5, r, side).sum()) for s in SHAPES for r in SIZES.values())
    return max(1, int(MIN_AREA_FRACTION * smallest))


def position_of(x: float, y: float) -> str:
    """The 3x3 cell holding (x, y) (fractions of the side)."""
    return _CELLS[min(max(int(x * 3), 0), 2), min(max(int(y * 3), 0), 2)]


def membership(image: np.ndarray, color: int) -> np.ndarray:
    """(H, W) in [0, 1]: where each pixel lies between the background (0) and palette colour
    `color` (1), by projection onto the segment joining them. Codec blur (MP4's half-resolution
    chroma) turns a shape's edge pixels into mixtures; they count partly instead of not at all."""
    bg, c = _PALETTE[0], _PALETTE[color]
    direction = (c - bg) / float(((c - bg) ** 2).sum())
    return np.clip((image.astype(np.float32) - bg) @ direction, 0.0, 1.0)


def classify_region(mask: np.ndarray, soft: np.ndarray) -> tuple[str, str, float]:
    """(shape, size, soft IoU) of the template that best overlaps a region: `mask` its pixels,
    `soft` its membership (zero outside the region's 1-pixel neighbourhood). Templates are
    drawn around the region's bounding-box centre (synth draws a shape around its cell centre,
    which its box surrounds) and half a pixel either way, since rasterization can shift the box."""
    side = mask.shape[0]
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / (2 * side), (ys.min() + ys.max() + 1) / (2 * side)
    best = ("", "", -1.0)
    for shape, size, ox, oy in itertools.product(SHAPES, SIZES, _OFFSETS, _OFFSETS):
        template = _template(shape, size, round(cx + ox / side, 4), round(cy + oy / side, 4), side)
        iou = float(np.minimum(soft, template).sum() / max(np.maximum(soft, template).sum(), 1e-9))
        if iou > best[2]:
            best = (shape, size, iou)
    return best


def regions(image: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(colour index, mask) of every single-colour connected region of at least `min_area`
    pixels in an (H, W, 3) uint8 image, largest first (4-connectivity)."""
    labels = color_labels(image)
    found = []
    for k in range(1, len(_PALETTE)):
        components, n = ndimage.label(labels == k)
        areas = np.bincount(components.ravel(), minlength=n + 1)  # (n + 1,), [0] = outside
        found += [(k, components == j) for j in range(1, n + 1) if areas[j] >= min_area(image.shape[0])]
    return sorted(found, key=lambda r: -int(r[1].sum()))


def describe(image: np.ndarray, color: int, mask: np.ndarray) -> DetectedObject:
    """The attributes of one region of `image`."""
    side = mask.shape[0]
    ys, xs = np.nonzero(mask)
    x, y = (xs.mean() + 0.5) / side, (ys.mean() + 0.5) / side
    soft = membership(image, color) * ndimage.binary_dilation(mask)  # (H, W), the region and its rim
    shape, size, iou = classify_region(mask, soft)
    return DetectedObject(_COLOR_NAMES[color], shape, size, position_of(x, y), len(xs), (x, y), iou)


def detect_objects(image: np.ndarray, limit: int = MAX_DESCRIBED) -> list[DetectedObject]:
    """Objects in one (H, W, 3) uint8 image, largest first; only the `limit` largest are
    described (synth images hold at most two), the rest count with their colour and area."""
    found = regions(image)
    described = [describe(image, k, mask) for k, mask in found[:limit]]
    rest = [DetectedObject(_COLOR_NAMES[k], "", "", "", int(mask.sum()), (0.0, 0.0), 0.0) for k, mask in found[limit:]]
    return described + rest


def _majority(values: Sequence[str]) -> str:
    return Counter(values).most_common(1)[0][0]


def direction_of(path: Sequence[tuple[float, float]]) -> Optional[str]:
    """The DIRECTIONS entry best aligned with the displacement first -> last point; None
    when it moved less than MIN_TRAVEL of the side."""
    dx, dy = path[-1][0] - path[0][0], path[-1][1] - path[0][1]
    if np.hypot(dx, dy) < MIN_TRAVEL:
        return None
    return max(DIRECTIONS, key=lambda d: DIRECTIONS[d][0] * dx + DIRECTIONS[d][1] * dy)


def detect_video(frames: np.ndarray) -> list[DetectedObject]:
    """The moving object of a (F, H, W, 3) uint8 clip (synth videos hold one): the largest
    object of each frame, its attributes by majority over frames, its motion from the
    centroids; then the other objects of a frame with the median object count. Empty when no
    frame holds an object."""
    found = [detect_objects(f, limit=1) for f in frames]
    per_frame = [objs[0] for objs in found if objs]
    if not per_frame:
        return []
    typical = sorted(found, key=len)[len(found) // 2]  # a frame with the median object count
    color = _majority([o.color for o in per_frame])
    track = [o for o in per_frame if o.color == color]
    first = track[0]
    return [DetectedObject(
        color=color,
        shape=_majority([o.shape for o in track]),
        size=_majority([o.size for o in track]),
        position=first.position,
        area=int(np.median([o.area for o in track])),
        centroid=first.centroid,
        iou=float(np.mean([o.iou for o in track])),
        direction=direction_of([o.centroid for o in track]) if len(track) > 1 else None,
    )] + typical[1:]


# ------------------------------------------------------------------------------- scoring


@dataclass
class SampleScore:
    """Per attribute (correct, stated) counts of one sample."""

    counts: dict[str, list[int]] = field(default_factory=dict)
    count_ok: bool = False

    @property
    def all_ok(self) -> bool:
        return self.count_ok and all(c == n for c, n in self.counts.values())


def _agreement(mention: Mention, obj: DetectedObject, attributes: Sequence[str]) -> int:
    return sum(obj.value(k) == v for k, v in mention.stated().items() if k in attributes)


def score_sample(mentions: Sequence[Mention], objects: Sequence[DetectedObject],
                 attributes: Sequence[str] = ATTRIBUTES) -> SampleScore:
    """Match mentions to the len(mentions) largest objects (best permutation) and count the
    stated attributes that agree; a mention without an object gets every attribute wrong."""
    kept = list(objects[: len(mentions)])
    slots: list[Optional[DetectedObject]] = kept + [None] * (len(mentions) - len(kept))
    best = max(itertools.permutations(slots), key=lambda perm: sum(
        _agreement(m, o, attributes) for m, o in zip(mentions, perm) if o is not None))
    score = SampleScore(count_ok=len(objects) == len(mentions))
    for mention, obj in zip(mentions, best):
        for key, value in mention.stated().items():
            if key in attributes:
                entry = score.counts.setdefault(key, [0, 0])
                entry[0] += int(obj is not None and obj.value(key) == value)
                entry[1] += 1
    return score


@dataclass
class AdherenceReport:
    """Accuracy per attribute (over the mentions stating it), `count`, and `overall`."""

    accuracy: dict[str, float]
    num_samples: int
    num_unparsed: int = 0
    note: str = ""
    counts: dict[str, list[int]] = field(default_factory=dict)  # (correct, judged) behind each accuracy
    effective: dict[str, float] = field(default_factory=dict)  # samples' worth of evidence behind each (effective_count)

    def interval(self, key: str, z: float = 1.96) -> tuple[float, float]:
        """Wilson score interval (95% by default) of `key`'s accuracy on its effective sample
        count (`effective_count`; the judged count where none was recorded); (0, 1) when unknown."""
        correct, total = self.counts.get(key, (0, 0))
        n = self.effective.get(key, float(total))
        if total <= 0 or n <= 0:
            return 0.0, 1.0
        return wilson_interval(correct / total * n, n, z)

    def as_metrics(self, prefix: str = "adherence") -> dict[str, float]:
        return {f"{prefix}/{k}": v for k, v in self.accuracy.items()}

    def format(self, intervals: bool = False) -> str:
        """'color  95.0%  ...', with each 95% Wilson interval beside it when `intervals`."""
        def cell(k: str, v: float) -> str:
            if not intervals or k not in self.counts:
                return f"{k} {100 * v:5.1f}%"
            lo, hi = self.interval(k)
            return f"{k} {100 * v:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

        return "  ".join(cell(k, v) for k, v in self.accuracy.items())


def wilson_interval(correct: float, total: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion correct / total (Wilson 1927): unlike
    p +- z sqrt(p (1 - p) / n) it stays inside [0, 1] and is not empty at p = 0 or 1. `total`
    may be an effective (non-integer) sample count, `correct` then p times it."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * float(np.sqrt(p * (1 - p) / total + z * z / (4 * total * total))) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def effective_count(per_sample: Sequence[tuple[int, int]]) -> float:
    """How many independent trials the (correct, stated) counts of the samples stating an
    attribute are worth, for an interval around the pooled accuracy p = sum c / sum n.

    A sample's mentions are correlated (one image, one draw of noise: a model that garbles a
    two-shape image garbles both shapes), so the n mentions are not n Bernoulli trials. The
    samples are the independent clusters; p is a ratio estimator over them, whose
    linearization (Taylor) variance is Var(p) = sum_i (c_i - p n_i)^2 / (sum_i n_i)^2
    (Cochran 1977, Sampling Techniques, sec. 6.4, with-replacement form). The effective sample
    count is n_eff = p (1 - p) / Var(p) (Kish 1965, design effect), and the interval is
    Wilson's on n_eff (Korn & Graubard 1998, "Confidence intervals for proportions with small
    expected number of positive counts estimated from survey data"; Wilson on n_eff is among
    the methods compared for clustered data by Dean & Pagano 2015). Deterministic, and exactly
    the plain Wilson interval when every sample states the attribute once (n_eff = samples).
    n_eff is kept between the number of samples (mentions perfectly correlated) and of
    mentions (independent); at p = 0 or 1 the spread says nothing, and the number of samples,
    the conservative end, is used."""
    stated = [(c, n) for c, n in per_sample if n > 0]
    samples, mentions = len(stated), sum(n for _, n in stated)
    if not stated:
        return 0.0
    p = sum(c for c, _ in stated) / mentions
    if p * (1 - p) == 0:
        return float(samples)
    spread = sum((c - p * n) ** 2 for c, n in stated)
    if spread == 0:
        return float(mentions)
    n_eff = p * (1 - p) * mentions ** 2 / spread  # p (1 - p) / Var(p)
    return float(min(max(n_eff, samples), mentions))


def aggregate(scores: Sequence[SampleScore], num_unparsed: int = 0) -> AdherenceReport:
    per_sample: dict[str, list[tuple[int, int]]] = {}  # attribute -> (correct, stated) of each sample stating it
    for s in scores:
        for key, (c, n) in s.counts.items():
            per_sample.setdefault(key, []).append((c, n))
    if scores:
        per_sample["count"] = [(int(s.count_ok), 1) for s in scores]
        per_sample["overall"] = [(int(s.all_ok), 1) for s in scores]
    keys = [k for k in (*ATTRIBUTES, "count", "overall") if k in per_sample]
    counts = {k: [sum(c for c, _ in per_sample[k]), sum(n for _, n in per_sample[k])] for k in keys}
    accuracy = {k: c / n for k, (c, n) in counts.items()}
    effective = {k: effective_count(per_sample[k]) for k in keys}
    return AdherenceReport(accuracy, len(scores), num_unparsed, counts=counts, effective=effective)


def as_uint8_clips(pixels: Tensor) -> np.ndarray:
    """(N, 3, H, W) -> (N, H, W, 3) or (N, 3, F, H, W) -> (N, F, H, W, 3), uint8, from [-1, 1]."""
    return to_uint8(pixels.movedim(1, 2) if pixels.ndim == 5 else pixels)


def detect(pixels: Tensor) -> list[list[DetectedObject]]:
    """Objects of each image (N, 3, H, W) or video (N, 3, F, H, W) in [-1, 1]."""
    clips = as_uint8_clips(pixels)
    return [detect_video(c) if pixels.ndim == 5 else detect_objects(c) for c in clips]


def judged_attributes(side: int) -> tuple[str, ...]:
    """The attributes the judge can read at this image side (see MIN_SHAPE_SIZE)."""
    return ATTRIBUTES if side >= MIN_SHAPE_SIZE else tuple(a for a in ATTRIBUTES if a != "shape")


def judge_samples(pixels: Tensor, prompts: Sequence[str]) -> list[Optional[SampleScore]]:
    """Each sample's score against its prompt (images (N, 3, H, W) or videos (N, 3, F, H, W)
    in [-1, 1]); None where the prompt has no recognizable mention. Kept per sample so that a
    caller can report subsets of one judged set (`summarize`)."""
    if pixels.shape[0] != len(prompts):
        raise ValueError(f"{pixels.shape[0]} samples but {len(prompts)} prompts")
    attributes = judged_attributes(pixels.shape[-1])
    scores: list[Optional[SampleScore]] = []
    for objects, prompt in zip(detect(pixels), prompts):
        mentions = parse_prompt(prompt)
        scores.append(score_sample(mentions, objects, attributes) if mentions else None)
    return scores


def summarize(scores: Sequence[Optional[SampleScore]], side: int) -> AdherenceReport:
    """The report of `judge_samples` scores of images of this side; unparsed prompts (None)
    counted in `num_unparsed` and left out."""
    report = aggregate([s for s in scores if s is not None], sum(s is None for s in scores))
    if "shape" not in judged_attributes(side):
        report.note = f"shape not judged: at {side} px circle and square are the same pixels"
    return report


def judge(pixels: Tensor, prompts: Sequence[str]) -> AdherenceReport:
    """Prompt adherence of images (N, 3, H, W) or videos (N, 3, F, H, W) in [-1, 1]; prompts
    with no recognizable mention are counted in `num_unparsed` and left out."""
    return summarize(judge_samples(pixels, prompts), pixels.shape[-1])


def chance_levels() -> dict[str, float]:
    """Accuracy of guessing each attribute uniformly at random."""
    return {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "size": 1 / len(SIZES),
            "position": 1 / len(POSITIONS), "direction": 1 / len(DIRECTIONS)}


def noise_like(pixels: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform noise in [-1, 1] shaped like `pixels`: the judge's floor."""
    return torch.rand(pixels.shape, generator=generator) * 2 - 1
