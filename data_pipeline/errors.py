"""Errors of the data pipeline and the per-reason accounting of skipped samples.

A bad sample never stops the stream by itself: it is skipped, counted under a reason and
logged with its shard and key. The error budget turns "a few bad samples" into "stop, the
data is broken" once the bad fraction is too high, so a run never trains on garbage silently.
"""
from __future__ import annotations

import logging

log = logging.getLogger("data_pipeline")

# Reasons a whole sample is skipped; they count against the error budget.
SKIP_REASONS = (
    "truncated_tar",
    "corrupt_tar",
    "corrupt_image",
    "corrupt_video",
    "hdr_video",  # PQ (HDR10) video: needs tone mapping to SDR first (data_pipeline/color.py)
    "crashed_decoder",  # its worker died of a crash signal on it (a native decoder's fault): restarted past it
    "stalled_decoder",  # its worker made no progress on it for data.stall_timeout_s: killed, restarted past it
    "corrupt_text",
    "corrupt_json",
    "corrupt_array",
    "missing_caption",
    "empty_caption",
    "missing_media",
    "duplicate_key",
    "unreadable_shard",  # a remote shard that kept failing after data.remote_retries retries
)
# Members dropped from an otherwise usable sample; they do not count against the budget.
MEMBER_REASONS = ("rejected_unsafe_member", "ignored_member")


class DataError(RuntimeError):
    """The data cannot be used as configured; the message says what to do."""


class SkipSample(Exception):
    """Raised by a stage for one sample; the stream counts it and goes on."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def empty_counts() -> dict[str, int]:
    """All counters at zero: samples read, then one per skip and member reason."""
    return {"read": 0, **{r: 0 for r in SKIP_REASONS}, **{r: 0 for r in MEMBER_REASONS}}


def check_error_budget(counts: dict[str, int], budget: float, min_samples: int, where: str) -> None:
    """Raise DataError when the fraction of skipped samples exceeds the budget."""
    read = counts.get("read", 0)
    bad = sum(counts.get(r, 0) for r in SKIP_REASONS)
    if read >= max(min_samples, 1) and bad > budget * read:
        reasons = ", ".join(f"{r}={counts[r]}" for r in SKIP_REASONS if counts.get(r))
        raise DataError(
            f"{bad} of {read} samples read by {where} were unusable ({reasons}), more than "
            f"data.error_budget={budget:g}. Check the shards with `dit data inspect DIR --verify` "
            f"and the warnings above (they name shard and key); raise data.error_budget only if "
            f"this much bad data is expected."
        )


class SkipCounter:
    """Counts, logs and budgets the skips of one worker process."""

    def __init__(self, budget: float, min_samples: int, max_logged: int, where: str):
        self.budget = budget
        self.min_samples = min_samples
        self.max_logged = max_logged
        self.where = where
        self.counts = empty_counts()
        self._delta = empty_counts()

    def _add(self, reason: str) -> None:
        self.counts[reason] += 1
        self._delta[reason] += 1

    def read(self) -> None:
        self._add("read")

    def skip(self, reason: str, shard: str, key: str, detail: str = "") -> None:
        """Count one skipped sample, log it (up to max_logged per reason) and check the budget."""
        self._add(reason)
        self._log(reason, f"skipped sample {key!r} of {shard}: {reason}" + (f" ({detail})" if detail else ""))
        check_error_budget(self.counts, self.budget, self.min_samples, self.where)

    def member(self, reason: str, shard: str, key: str, name: str) -> None:
        """Count one member dropped from a sample (unsafe or unknown type)."""
        self._add(reason)
        self._log(reason, f"dropped member {name!r} of sample {key!r} in {shard}: {reason}")

    def _log(self, reason: str, message: str) -> None:
        n = self.counts[reason]
        if n <= self.max_logged:
            tail = "; further ones are only counted" if n == self.max_logged else ""
            log.warning("%s [%s]%s", message, self.where, tail)

    def take_delta(self) -> dict[str, int]:
        """The non-zero counts since the previous call (travel with each batch to the main process)."""
        delta, self._delta = self._delta, empty_counts()
        return {reason: n for reason, n in delta.items() if n}
