"""Evaluation of a checkpoint or cascade on the synthetic captioned shapes.

- Prompt adherence: generate from held-out captions, read the pixels back with the shapes judge
  (`trainer.judge`), and print its accuracy on real held-out data of the same kind and size
  beside it (>= RELIABLE_JUDGE, else the numbers mean nothing) and on noise (its floor). The
  held-out samples are new, but the synthetic captions come from a small vocabulary: many are
  captions the model was trained on (with the same image), so the figures are also reported
  apart for the captions seen in training and the novel ones (recall vs generalization).
- Distribution distance: Frechet distance (Heusel et al. 2017) between generated and held-out
  real samples in the feature space of a small CNN trained here, seeded, on synthetic shapes to
  predict their attributes; the same on pixel statistics (8x8 thumbnails); FID through
  torch-fidelity when Inception weights are supplied locally.
- Memorization audit: each generated sample's nearest training sample (pixel or latent RMS
  distance, streamed over the shards; for a run on precomputed latents, over the pixel shards
  they were encoded from) and the fraction of near-copies, beside the same for
  held-out real data (the synthetic set's own exact repeats) and for the closed-form ideal
  denoiser of the training set (Karras et al. 2022, app. B.3): it can only reproduce training
  points, so its fraction is the memorization ceiling.

Held-out real data is synthesized with a seed no training set uses and read through the data
pipeline with the run's data config, so it is decoded and resized exactly as training data.

Models run on the cascade's device; so do the autoencoder encodings, nearest-neighbour searches
and the closed-form denoiser of the audit. The yardsticks stay on the host, seeded, so their
numbers do not depend on the device: the shapes judge (numpy) and the feature CNN of the
Frechet distance.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from data_pipeline.config import DataConfig
from trainer.heldout import heldout_set, normalize_caption, pixel_source, stream_samples, training_captions
from trainer.judge import AdherenceReport, chance_levels, judge, judge_samples, noise_like, summarize

if TYPE_CHECKING:  # the cascade pulls in models; only the entry points need it
    from trainer.cascade import Cascade
    from trainer.config import LogConfig, RunConfig
    from trainer.diffusion import NoiseSchedule

RELIABLE_JUDGE = 0.98  # the judge's overall accuracy on real data below which its numbers mean nothing
NEAR_COPY_RMS = 0.03  # pixel RMS in [-1, 1]: distinct synthetic images are >= 0.044 apart at 16-32 px


class Evaluable(Protocol):
    """A training stage as the eval hook sees it (`trainer.stages.base.Stage.eval_metrics`)."""

    def eval_metrics(self, weights: Optional[dict[str, Tensor]], log: "LogConfig") -> dict[str, float]: ...


# ------------------------------------------------------------------------------- adherence


SPLITS = {"seen": "captions seen in training", "novel": "novel captions"}


@dataclass
class AdherenceResult:
    generated: AdherenceReport
    real: AdherenceReport
    noise: AdherenceReport
    # the generated samples apart by whether their caption is among the training captions
    # (SPLITS keys); empty, with `split_note` saying why, when those could not be read
    splits: dict[str, AdherenceReport] = field(default_factory=dict)
    split_note: str = ""

    @property
    def reliable(self) -> bool:
        return self.real.accuracy.get("overall", 0.0) >= RELIABLE_JUDGE

    def table(self) -> str:
        """Attribute rows; generated (with its 95% Wilson interval and how many were judged),
        real held-out, noise and chance columns."""
        chance = chance_levels()
        rows = [f"{'attribute':<10} {'generated':>9} {'95% CI':>13} {'n':>5} {'real':>9} {'noise':>9} {'chance':>9}"]
        for key in self.generated.accuracy:
            lo, hi = self.generated.interval(key)
            judged = self.generated.counts.get(key, (0, 0))[1]
            cells = [self.real.accuracy.get(key), self.noise.accuracy.get(key), chance.get(key)]
            rows.append(f"{key:<10} {100 * self.generated.accuracy[key]:8.1f}% {f'[{100 * lo:.1f}, {100 * hi:.1f}]':>13} "
                        f"{judged:>5} " + " ".join(f"{100 * c:8.1f}%" if c is not None else f"{'-':>9}" for c in cells))
        verdict = "reliable" if self.reliable else f"UNRELIABLE (< {100 * RELIABLE_JUDGE:.0f}% on real data)"
        rows.append(f"judge on {self.real.num_samples} real held-out samples: {verdict}; "
                    f"{self.generated.num_samples} generated samples")
        rows += [self.generated.note] if self.generated.note else []
        return "\n".join(rows + self.split_rows())

    def split_rows(self) -> list[str]:
        """One line per split of the generated samples: how many, then each figure with its
        95% interval; or the note saying why there is no split."""
        if not self.splits:
            return [self.split_note] if self.split_note else []
        rows = []
        for name, report in self.splits.items():
            rows.append(f"{SPLITS[name]} ({report.num_samples} samples): " + report.format(intervals=True)
                        if report.num_samples else f"{SPLITS[name]}: none")
        return rows + ([self.split_note] if self.split_note else [])

    def as_dict(self) -> dict:
        return {"generated": asdict(self.generated), "real": asdict(self.real), "noise": asdict(self.noise),
                "reliable": self.reliable, "splits": {k: asdict(v) for k, v in self.splits.items()},
                "split_note": self.split_note}


def judge_with_references(generated: Tensor, prompts: Sequence[str], real: Tensor,
                          real_prompts: Sequence[str], seed: int = 0,
                          seen: Optional[set[str]] = None) -> AdherenceResult:
    """The judge on generated samples, on real ones and on noise shaped like the generated;
    with `seen` (normalized training captions, `trainer.heldout.training_captions`) also on
    the generated samples whose caption is among them and on the others, apart."""
    noise = noise_like(generated, torch.Generator().manual_seed(seed))
    scores = judge_samples(generated, prompts)
    side = generated.shape[-1]
    result = AdherenceResult(summarize(scores, side), judge(real, real_prompts), judge(noise, prompts))
    if seen is not None:
        known = [normalize_caption(p) in seen for p in prompts]
        result.splits = {"seen": summarize([s for s, k in zip(scores, known) if k], side),
                         "novel": summarize([s for s, k in zip(scores, known) if not k], side)}
    return result


def learned_from(cfg: "RunConfig") -> list[DataConfig]:
    """The data a run's network learned from: its own and, for a distilled student, its
    teacher's (and so on up a chain of teachers): the student was taught what its teacher
    learned, so a caption only the teacher trained on is not novel to it. OSError when a
    teacher's config.yaml is gone, ConfigError (naming it) when this version cannot read it."""
    from trainer.cascade import DISTILLED
    from trainer.checkpoint_format import resolve
    from trainer.config import ConfigError, load_config

    datas = [cfg.data]
    while cfg.stage.kind in DISTILLED:
        path = resolve(cfg.stage.teacher) / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"the teacher's config {path} (stage.teacher) is gone")
        try:
            cfg = load_config(path, trained=True)
        except ConfigError as e:
            raise ConfigError("stage.teacher", f"the teacher's config {path} is not readable: {e}") from None
        datas.append(cfg.data)
    return datas


def seen_captions(cascade: "Cascade") -> tuple[Optional[set[str]], str]:
    """The training captions of every stage of the cascade (normalized; a distilled stage's
    teachers' too, `learned_from`) and a note on where they come from; (None, why) when a
    stage's shards or a teacher's config cannot be read."""
    from data_pipeline.errors import DataError
    from trainer.config import ConfigError

    where = " + ".join(dict.fromkeys(s.cfg.data.shards for s in cascade.stages))
    try:
        datas = [data for s in cascade.stages for data in learned_from(s.cfg)]
        where = " + ".join(dict.fromkeys(d.shards for d in datas))
        captions = training_captions(datas)
    except (DataError, OSError, ConfigError) as e:  # gone or unreadable shards or teacher configs; else a bug
        return None, (f"no seen/novel split: the training captions could not be read from {where} ({e}); "
                      f"the figures above mix captions seen in training with novel ones")
    return captions, f"seen: the caption is one of the {len(captions)} distinct captions of {where}"


def evaluate_adherence(cascade: "Cascade", num: int = 64, seed: int = 0, batch_size: int = 16,
                       num_real: Optional[int] = None) -> tuple[AdherenceResult, Tensor, list[str]]:
    """Sample `num` held-out captions with a `trainer.cascade.Cascade`, judge them beside
    `num_real` (default `num`) real held-out samples, and apart for the captions seen in the
    cascade's training data and the novel ones; also returns the samples and prompts."""
    data = cascade.stages[-1].cfg.data
    real, captions = heldout_set(data, max(num, num_real or num))
    prompts = captions[:num]
    seen, note = seen_captions(cascade)
    generated = cascade.sample_batched(prompts, torch.Generator().manual_seed(seed), batch_size)
    result = judge_with_references(generated, prompts, real[: num_real or num], captions[: num_real or num], seed,
                                   seen)
    result.split_note = note
    return result, generated, prompts


def adherence_during_training(stage: Evaluable, weights: Optional[dict[str, Tensor]], log: "LogConfig") -> dict[str, float]:
    """The stage's own evaluation of `weights` (the EMA) on `log.prompts` (`Stage.eval_metrics`):
    the shapes judge's `eval/adherence/...` for stages that generate from text; {} for the others
    (super-resolution and autoencoder stages)."""
    return stage.eval_metrics(weights, log)


# ------------------------------------------------------------------------------- distances


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of features (N, D), (M, D), in
    float64. tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of
    S_a^(1/2) S_b S_a^(1/2), a symmetric PSD matrix: no complex sqrtm as in pytorch-fid."""
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    sa, sb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)  # (D, D)
    vals, vecs = torch.linalg.eigh(sa)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T  # S_a^(1/2)
    cross = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp(min=0).sqrt().sum()
    return float(mu.square().sum() + sa.trace() + sb.trace() - 2 * cross)


def as_frames(pixels: Tensor) -> tuple[Tensor, int]:
    """(N, 3, H, W) -> itself, 1; (N, 3, F, H, W) -> (N F, 3, H, W), F."""
    if pixels.ndim == 4:
        return pixels, 1
    return pixels.movedim(2, 1).flatten(0, 1), pixels.shape[2]


def pixel_features(pixels: Tensor, side: int = 8) -> Tensor:
    """8x8 area thumbnails (N, 3 * 64): pixel statistics, averaged over a video's frames."""
    frames, f = as_frames(pixels)
    thumbs = F.adaptive_avg_pool2d(frames.float(), side).flatten(1)  # (N F, 3 side^2)
    return thumbs.view(-1, f, thumbs.shape[1]).mean(1)


class ShapesFeatureNet(nn.Module):
    """A small CNN predicting which colours, shapes, sizes and cells a synthetic image holds
    (multi-label); its pooled 64-d activations are the features of the Frechet distance."""

    def __init__(self, num_labels: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_labels)

    def features(self, pixels: Tensor) -> Tensor:
        """(N, 3, H, W) or (N, 3, F, H, W) in [-1, 1] -> (N, 2 width), frames averaged."""
        frames, f = as_frames(pixels)
        feats = self.body(frames.float())  # (N F, 2 width)
        return feats.view(-1, f, feats.shape[1]).mean(1)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.body(images))  # (N, labels) logits


def attribute_labels(attrs: dict) -> np.ndarray:
    """Multi-hot (colours, shapes, sizes, cells) of a synth attribute dict."""
    from data_pipeline.synth import COLORS, POSITIONS, SHAPES, SIZES

    vocab = [*COLORS, *SHAPES, *SIZES, *POSITIONS]
    hot = np.zeros(len(vocab), np.float32)
    for s in attrs["shapes"]:
        for key in ("color", "shape", "size", "position"):
            hot[vocab.index(s[key])] = 1.0
    return hot


def synthetic_training_set(num: int, side: int, seed: int) -> tuple[Tensor, Tensor]:
    """(images (N, 3, side, side) in [-1, 1], multi-hot labels) rendered from synth attributes."""
    from data_pipeline.synth import render_image, sample_attributes

    attrs = [sample_attributes(np.random.default_rng([seed, i])) for i in range(num)]
    images = np.stack([render_image(a, side) for a in attrs])  # (N, side, side, 3)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, torch.from_numpy(np.stack([attribute_labels(a) for a in attrs]))


def train_feature_net(side: int, steps: int = 300, num: int = 2048, seed: int = 0,
                      progress: bool = True) -> ShapesFeatureNet:
    """The feature network, trained deterministically (seeded data, init and batches)."""
    images, labels = synthetic_training_set(num, side, seed + 7)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG (nor a GPU's)
        torch.manual_seed(seed)
        net = ShapesFeatureNet(labels.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="feature net", disable=not progress, leave=False):
        idx = torch.randint(num, (64,), generator=g)
        loss = F.binary_cross_entropy_with_logits(net(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def distribution_distances(generated: Tensor, real: Tensor, net: ShapesFeatureNet) -> dict[str, float]:
    """Frechet distances generated vs real: `fd_features` (the shapes network), `fd_pixels`
    (8x8 thumbnails); `*_real_split`: the value a perfect generator of this sample size would
    get, from the distance between the two halves of the real set. The distance of two finite
    samples of one distribution is its estimator's bias, ~ (1/n1 + 1/n2) (exactly so for the
    mean term, tr(S) (1/n1 + 1/n2)): the halves' distance is scaled from their sizes to the
    generated and real sets' (n/2 vs n/2 is ~2x what n vs n gets)."""
    half = real.shape[0] // 2
    scale = (1 / generated.shape[0] + 1 / real.shape[0]) / (1 / half + 1 / (real.shape[0] - half))
    out = {}
    for name, fn in (("features", net.features), ("pixels", pixel_features)):
        out[f"fd_{name}"] = frechet_distance(fn(generated), fn(real))
        out[f"fd_{name}_real_split"] = scale * frechet_distance(fn(real[:half]), fn(real[half:]))
    return out


def inception_fid(generated: Tensor, real: Tensor, weights: str | Path, device: torch.device | str = "cpu") -> float:
    """FID with Inception-v3 weights from a local file, through torch-fidelity, on `device`
    (it takes only cuda=True, so a CUDA device is made the current one)."""
    try:
        import torch_fidelity
    except ImportError:
        raise RuntimeError("FID with Inception needs torch-fidelity: pip install torch-fidelity") from None
    from PIL import Image

    from trainer.media import to_uint8

    with tempfile.TemporaryDirectory() as tmp:
        for name, pixels in (("generated", generated), ("real", real)):
            folder = Path(tmp) / name
            folder.mkdir()
            for i, img in enumerate(to_uint8(as_frames(pixels)[0])):
                Image.fromarray(img).save(folder / f"{i:06d}.png")
        cuda = torch.device(device).type == "cuda"
        with torch.cuda.device(torch.device(device)) if cuda else contextlib.nullcontext():
            metrics = torch_fidelity.calculate_metrics(input1=str(Path(tmp) / "generated"),
                                                       input2=str(Path(tmp) / "real"), fid=True,
                                                       feature_extractor_weights_path=str(weights), cuda=cuda,
                                                       verbose=False)
    return float(metrics["frechet_inception_distance"])


# ------------------------------------------------------------------------------- memorization


@dataclass
class NearestNeighbours:
    """Per sample: RMS distance to the nearest and second-nearest training sample, its key."""

    distance: Tensor  # (B,)
    second: Tensor  # (B,)
    keys: list[str]

    def near_copy_fraction(self, threshold: float = NEAR_COPY_RMS) -> float:
        return float((self.distance <= threshold).double().mean())

    def summary(self, threshold: float = NEAR_COPY_RMS) -> dict[str, float]:
        return {"near_copy_fraction": self.near_copy_fraction(threshold),
                "median_nearest_rms": float(self.distance.median()), "threshold": threshold}


def nearest_training(samples: Tensor, batches: Iterator[tuple[Tensor, list[str]]]) -> NearestNeighbours:
    """Nearest neighbours of samples (B, ...) among streamed training batches ((N, ...), keys),
    as RMS distances in float64 on the samples' device; the training set never has to fit in
    memory."""
    flat = samples.flatten(1).double()  # (B, D)
    best = torch.full((flat.shape[0], 2), float("inf"), dtype=torch.float64, device=flat.device)  # (B, 2) two smallest
    keys = [""] * flat.shape[0]
    for data, names in batches:
        d = torch.cdist(flat, data.flatten(1).to(flat.device, torch.float64))  # (B, N)
        both = torch.cat([best, d], dim=1)  # (B, 2 + N)
        top, idx = both.topk(min(2, both.shape[1]), dim=1, largest=False)  # (B, 2)
        for i, j in enumerate(idx[:, 0].tolist()):
            if j >= 2:
                keys[i] = names[j - 2]
        best = top
    scale = flat.shape[1] ** 0.5
    best = best.cpu()
    return NearestNeighbours(best[:, 0] / scale, best[:, 1] / scale, keys)


def training_batches(data: DataConfig, encode: Callable[[Tensor], Tensor],
                     progress: bool = True) -> Iterator[tuple[Tensor, list[str]]]:
    """(encoded training samples, keys) batches over one epoch of the run's own shards; for
    shards of precomputed latents, of the pixel shards they were encoded from
    (`trainer.heldout.pixel_source`: ValueError when those are gone)."""
    for pixels, _, keys in stream_samples(data, pixel_source(data.shards), progress=progress):
        with torch.no_grad():
            yield encode(pixels), keys


def training_tensor(data: DataConfig, encode: Callable[[Tensor], Tensor], limit: int) -> Tensor:
    """The whole (encoded) training set in memory, for the closed-form denoiser."""
    parts, count = [], 0
    for x, _ in training_batches(data, encode):
        parts.append(x)
        count += x.shape[0]
        if count > limit:
            raise ValueError(f"the training set exceeds {limit} samples; the closed-form reference holds "
                             f"it in memory: raise --reference-limit or skip it with --no-reference")
    return torch.cat(parts)


@torch.no_grad()
def closed_form_samples(train: Tensor, schedule: "NoiseSchedule", num: int, steps: int,
                        generator: torch.Generator) -> Tensor:
    """`num` DDIM samples (trailing steps) of the ideal denoiser of `train` (N, ...), on its
    device; the noise is drawn on the generator's device and moved there."""
    from trainer.diffusion import ClosedFormDenoiser, sample_ddim, sampling_timesteps

    model = ClosedFormDenoiser(train, schedule, prediction="v")
    x = torch.randn((num, *train.shape[1:]), generator=generator, dtype=torch.float64,
                    device=generator.device).to(train.device)
    return sample_ddim(model, x, sampling_timesteps(schedule, steps, "trailing"), schedule, "v").float()


@dataclass
class MemorizationReport:
    generated: dict[str, float]
    heldout: dict[str, float]
    closed_form: Optional[dict[str, float]]
    nearest_keys: list[str]
    space: str

    def table(self) -> str:
        rows = [f"{'samples':<28} {'near-copies':>11} {'median nearest RMS':>19}"]
        named = [("generated", self.generated), ("real held-out (baseline)", self.heldout),
                 ("closed-form denoiser (ceil.)", self.closed_form)]
        for name, r in named:
            if r is not None:
                rows.append(f"{name:<28} {100 * r['near_copy_fraction']:10.1f}% {r['median_nearest_rms']:19.4f}")
        rows.append(f"near-copy: nearest training sample within RMS {self.generated['threshold']} ({self.space} space)")
        return "\n".join(rows)


def near_copy_threshold(space: str, threshold: Optional[float]) -> float:
    """The near-copy distance of an audit in `space` (pixel | latent): `threshold`, else in
    pixel space NEAR_COPY_RMS. Latents have no default: NEAR_COPY_RMS is a distance between
    pixels in [-1, 1], and latents (an autoencoder's, normalised to unit variance) are on
    another scale, where it would count near-copies by an unrelated yardstick."""
    if space not in ("pixel", "latent"):
        raise ValueError(f"space '{space}': pixel or latent")
    if threshold is not None:
        return threshold
    if space == "latent":
        raise ValueError(f"a latent-space audit needs its near-copy distance (--threshold): the default, "
                         f"{NEAR_COPY_RMS}, is an RMS distance between pixels in [-1, 1], and latents are on "
                         f"another scale")
    return NEAR_COPY_RMS


def memorization_audit(cascade: "Cascade", num: int = 32, seed: int = 0, space: str = "pixel",
                       threshold: Optional[float] = None, reference_steps: int = 25,
                       reference_limit: int = 20_000, batch_size: int = 16) -> MemorizationReport:
    """Generated samples of a cascade, held-out real samples and (reference_steps > 0) the
    closed-form denoiser's samples, each against the last stage's training set; near-copy
    threshold: `near_copy_threshold`. Encodings and distances on the cascade's device."""
    threshold = near_copy_threshold(space, threshold)
    last = cascade.stages[-1]
    data = replace(last.cfg.data, shards=pixel_source(last.cfg.data.shards))  # before sampling: fails fast
    device = cascade.device
    to_x0 = lambda x: last.stage.autoencoder.encode(x.to(device)).float()  # noqa: E731  (the DiT's x0 space)
    encode = to_x0 if space == "latent" else (lambda x: x.to(device))  # noqa: E731
    real, captions = heldout_set(data, num)
    generated = cascade.sample_batched(captions, torch.Generator().manual_seed(seed), batch_size)
    gen_nn = nearest_training(encode(generated), training_batches(data, encode))
    real_nn = nearest_training(encode(real), training_batches(data, encode, progress=False))
    reference = None
    if reference_steps > 0:
        train = training_tensor(data, to_x0, reference_limit)
        x0 = closed_form_samples(train, last.stage.schedule, num, reference_steps, torch.Generator().manual_seed(seed))
        samples = encode(last.stage.decode(x0)) if space == "pixel" else x0
        reference = nearest_training(samples, training_batches(data, encode, progress=False)).summary(threshold)
    return MemorizationReport(gen_nn.summary(threshold), real_nn.summary(threshold), reference, gen_nn.keys, space)
