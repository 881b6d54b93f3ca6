"""Variance-preserving noise schedules: beta tables, zero terminal SNR, SNR shift, and the
continuous-time view of a discrete table used by training, sampling and distillation.

Time convention (shared by the whole trainer): t in [0, 1] as a float tensor of shape (B,);
t = 0 is clean data (alpha = 1, sigma = 0), t = 1 the terminal step. A table with T steps,
alpha_bar[i] for i = 0..T-1, puts index i at t = (i + 1) / T. x_t = alpha x0 + sigma eps with
alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), so alpha^2 + sigma^2 = 1.

Between table points the log-SNR lambda = log(alpha^2 / sigma^2) is interpolated linearly in t.
The two end segments have an infinite endpoint (t = 0: lambda = +inf; t = 1 under zero
terminal SNR: lambda = -inf), where a linear log-SNR interpolation is meaningless, so those
segments interpolate alpha_bar itself linearly instead: continuous, monotone, exactly 1 at t = 0
and exactly 0 at t = 1, and never NaN. All of it is computed in float64; a t within float32
rounding of a grid point reads that table entry exactly.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor

from trainer.diffusion.utils import coef

if TYPE_CHECKING:  # the config module pulls in omegaconf; this package imports torch only
    from trainer.config import DiffusionConfig

SCHEDULES = ("linear", "scaled_linear", "cosine")
_F32_EPS = torch.finfo(torch.float32).eps


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Linear betas (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"). (T,) float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Stable Diffusion's betas: linear in sqrt(beta) (Rombach et al. 2022). (T,) float64."""
    root = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64)
    return root**2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17).

    alpha_bar(t) = f(t) / f(0), f(t) = cos((t / T + s) / (1 + s) * pi / 2)^2, betas clipped at
    `max_beta` as in the paper so that the last step is not singular. (T,) float64.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # (T + 1,)
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2  # (T + 1,)
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)  # (T,)


def make_betas(kind: str, num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas by name; the cosine schedule ignores beta_start / beta_end."""
    if kind == "linear":
        return linear_betas(num_timesteps, beta_start, beta_end)
    if kind == "scaled_linear":
        return scaled_linear_betas(num_timesteps, beta_start, beta_end)
    if kind == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown schedule '{kind}'; use one of {', '.join(SCHEDULES)}")


def alphas_cumprod(betas: Tensor) -> Tensor:
    """alpha_bar[i] = prod_{j <= i} (1 - beta_j). (T,) float64."""
    return torch.cumprod(1 - betas.double(), dim=0)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1.

    Shift sqrt(alpha_bar) so that the last value is exactly 0, scale it so that the first is
    unchanged, and return the betas of the result (the last beta becomes 1). (T,) float64.
    """
    root = alphas_cumprod(betas).sqrt()  # (T,)
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))  # root[-1] == 0, root[0] == first
    abar = root**2  # (T,)
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])  # (T,)
    return 1 - alphas


def snr_shift(
    resolution: Optional[float] = None,
    base_resolution: int = 0,
    frames: Optional[int] = None,
    base_frames: int = 0,
) -> float:
    """Additive log-SNR shift for a larger input than the one the schedule was tuned for.

    Resolution: -2 log(res / base) (Hoogeboom et al. 2023, "simple diffusion"; the resolution-dependent
    timestep shift of SD3, Esser et al. 2024, is the same map written for rectified flow): averaging
    an s x s pixel block into one pixel raises the SNR of the low-frequency content by s^2.
    Frames: -log(frames / base_frames), the same rule read as "log of the ratio of the number
    of pixels": F frames hold F times the pixels of one, as (2x resolution) holds 4x. Adjacent
    frames are strongly correlated, like adjacent pixels, so noise at a given SNR destroys less
    of a longer clip; the pixel-count rule is the one that treats both axes alike.
    A base of 0 (or a missing value) disables that term.
    """
    shift = 0.0
    if base_resolution > 0 and resolution is not None:
        shift -= 2.0 * math.log(resolution / base_resolution)
    if base_frames > 0 and frames is not None:
        shift -= math.log(frames / base_frames)
    return shift


class NoiseSchedule:
    """A discrete alpha_bar table viewed as a continuous function of t in [0, 1].

    `logsnr_shift` is added to the log-SNR after interpolation, so it is exact at every t
    (including inside the end segments) and keeps alpha_bar = 1 at t = 0 and 0 at t = 1.
    """

    def __init__(self, alphas_cumprod: Tensor, logsnr_shift: float = 0.0):
        abar = alphas_cumprod.detach().double().cpu()  # (T,)
        if abar.ndim != 1 or abar.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-d table with at least 2 entries")
        if not bool(((abar >= 0) & (abar < 1)).all()) or not bool((abar[1:] <= abar[:-1]).all()):
            raise ValueError("alphas_cumprod must be non-increasing and in [0, 1)")
        self.logsnr_shift = float(logsnr_shift)
        self._abar = torch.cat([abar.new_ones(1), abar])  # (T + 1,), point k at t = k / T
        self._lam = _logit(self._abar)  # (T + 1,), +inf at k = 0, maybe -inf at k = T
        self._cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_betas(cls, betas: Tensor, logsnr_shift: float = 0.0) -> "NoiseSchedule":
        return cls(alphas_cumprod(betas), logsnr_shift)

    @property
    def num_timesteps(self) -> int:
        return self._abar.numel() - 1

    @property
    def alphas_cumprod(self) -> Tensor:
        """The (shifted) table alpha_bar[i] at t = (i + 1) / T. (T,) float64."""
        return torch.sigmoid(self._lam[1:] + self.logsnr_shift)

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self._abar[-1] == 0)

    def discrete_t(self, i: Tensor | int) -> Tensor:
        """Table index i (0-based) -> t = (i + 1) / T, float32."""
        return (torch.as_tensor(i) + 1).float() / self.num_timesteps

    def t_to_index(self, t: Tensor) -> Tensor:
        """t -> nearest table index round(t T) - 1, clamped to [0, T - 1]. (B,) int64."""
        return (t.double() * self.num_timesteps).round().long().sub(1).clamp(0, self.num_timesteps - 1)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2); +inf at t = 0, -inf at t = 1 under zero SNR.

        t is clamped to [0, 1]; computed in float64, returned in t's dtype (at least float32).
        """
        abar, lam = self._tables(t.device)
        n = self.num_timesteps
        u = t.double().clamp(0, 1) * n  # (B,) position on the table, point k at u = k
        snap = u.round()  # float32 t = (i + 1) / T is off by up to T * eps / 2: read the table exactly
        u = torch.where((u - snap).abs() <= n * _F32_EPS, snap, u)
        k = u.floor().long().clamp(max=n - 1)  # (B,) left end of the segment
        w = u - k  # (B,) in [0, 1]
        lam_l, lam_r = lam[k], lam[k + 1]  # (B,), (B,)
        finite = lam_l.isfinite() & lam_r.isfinite()
        interior = torch.lerp(lam_l.where(finite, 0.0), lam_r.where(finite, 0.0), w)  # (B,)
        edge = _logit(torch.lerp(abar[k], abar[k + 1], w))  # (B,) alpha_bar lerp in end segments
        return (torch.where(finite, interior, edge) + self.logsnr_shift).to(_float_dtype(t))

    def snr(self, t: Tensor) -> Tensor:
        """alpha^2 / sigma^2: inf at t = 0, 0 at t = 1 under zero terminal SNR."""
        return self.log_snr(t).exp()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) at t, each (B,) in t's dtype (at least float32); alpha^2 + sigma^2 = 1."""
        lam = self.log_snr(t.double())  # (B,) float64
        alpha = torch.sigmoid(lam).sqrt()  # sigmoid(+-inf) is exactly 1 / 0: no NaN at the ends
        sigma = torch.sigmoid(-lam).sqrt()
        dtype = _float_dtype(t)
        return alpha.to(dtype), sigma.to(dtype)

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The host tables on `device`, copied once per device, without waiting for its queue
        (the host tables outlive the copy)."""
        if device not in self._cache:
            self._cache[device] = (self._abar.to(device, non_blocking=True), self._lam.to(device, non_blocking=True))
        return self._cache[device]

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={self.num_timesteps}, zero_terminal_snr={self.zero_terminal_snr}, "
            f"logsnr_shift={self.logsnr_shift:.4f})"
        )


def _logit(p: Tensor) -> Tensor:
    """log(p / (1 - p)) with exact +-inf at p = 1 / 0 (torch.logit clamps only when asked)."""
    return torch.log(p) - torch.log1p(-p)


def _float_dtype(t: Tensor) -> torch.dtype:
    """float32, or t's dtype when wider: half-precision t would round alpha near 1 away."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def make_schedule(
    cfg: "DiffusionConfig", resolution: Optional[float] = None, frames: Optional[int] = None
) -> NoiseSchedule:
    """The schedule of a `DiffusionConfig`: betas, then zero terminal SNR, then the SNR shift.

    With `cfg.shift_base_resolution > 0` (or `shift_base_frames > 0`) the resolution (frame
    count) must be given: training and sampling must see the same shift, and silently using
    none would be a mismatch that is hard to spot.
    """
    betas = make_betas(cfg.schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    if cfg.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    if cfg.shift_base_resolution > 0 and resolution is None:
        raise ValueError(
            f"diffusion.shift_base_resolution={cfg.shift_base_resolution} shifts the schedule by "
            "resolution: pass resolution= to make_schedule (or set the key to 0)"
        )
    if cfg.shift_base_frames > 0 and frames is None:
        raise ValueError(
            f"diffusion.shift_base_frames={cfg.shift_base_frames} shifts the schedule by frame "
            "count: pass frames= to make_schedule (or set the key to 0)"
        )
    shift = snr_shift(resolution, cfg.shift_base_resolution, frames, cfg.shift_base_frames)
    return NoiseSchedule.from_betas(betas, logsnr_shift=shift)


def shape_size(shape: Sequence[int]) -> tuple[float, int]:
    """(side, frames) the SNR shift reads from a sample shape (C, h, w) or (C, F, h, w), batch
    dim excluded: side = sqrt(h w), the square of the same area (for a square h = w this is
    exactly h), and frames = F (1 for an image). A non-square bucket thus shifts like the
    square holding as many pixels: the shift counts pixels, as in `snr_shift`."""
    if len(shape) not in (3, 4):
        raise ValueError(f"sample shape {tuple(shape)} is neither (C, h, w) nor (C, F, h, w)")
    frames = int(shape[1]) if len(shape) == 4 else 1
    return math.sqrt(int(shape[-2]) * int(shape[-1])), frames


def schedule_for_shape(cfg: "DiffusionConfig", shape: Sequence[int]) -> NoiseSchedule:
    """The schedule of samples shaped `shape` ((C, h, w) or (C, F, h, w) as the DiT sees them):
    the shift of `snr_shift` at that shape's sqrt(h w) and frame count. Training uses the
    shape of each batch (its bucket) and sampling the shape it samples at, so both agree."""
    side, frames = shape_size(shape)
    return make_schedule(cfg, resolution=side, frames=frames)


def add_noise(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x_t = alpha x0 + sigma eps; alpha, sigma (B,) broadcast over x0's trailing dims."""
    return coef(alpha, x0) * x0 + coef(sigma, eps) * eps  # (B, ...)
