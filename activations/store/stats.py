"""Per-site running statistics of committed rows (mean, norms, dropped rows); shards merge by adding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SiteStats:
    """Running sums over the committed rows of one site; shards merge by adding."""

    count: int
    sum: np.ndarray  # float64 [width], for the mean vector
    norm_sum: float = 0.0
    max_norm: float = 0.0
    nonfinite_rows: int = 0

    @classmethod
    def zeros(cls, width: int) -> "SiteStats":
        return cls(0, np.zeros(width, np.float64))

    @classmethod
    def of_rows(cls, x: np.ndarray) -> "SiteStats":
        # Sum in float64 without a float64 copy of the rows; float32 squares of bf16-range
        # "massive activations" would overflow.
        norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
        total = np.add.reduce(x, axis=0, dtype=np.float64)
        return cls(len(x), total, float(norms.sum()), float(norms.max(initial=0.0)))

    def __add__(self, other: "SiteStats") -> "SiteStats":
        return SiteStats(
            self.count + other.count,
            self.sum + other.sum,
            self.norm_sum + other.norm_sum,
            max(self.max_norm, other.max_norm),
            self.nonfinite_rows + other.nonfinite_rows,
        )

    def to_json(self) -> dict:
        return {
            "count": self.count,
            "sum": self.sum.tolist(),
            "norm_sum": self.norm_sum,
            "max_norm": self.max_norm,
            "nonfinite_rows": self.nonfinite_rows,
        }

    @classmethod
    def from_json(cls, d: dict) -> "SiteStats":
        return cls(d["count"], np.asarray(d["sum"], np.float64), d["norm_sum"], d["max_norm"], d["nonfinite_rows"])

    def summary(self) -> dict:
        """What the trainer and reports use. outlier_ratio = ||mean row|| / mean row norm:
        near 1 when one direction dominates every row (a constant offset), near 0 when centred."""
        mean = self.sum / max(self.count, 1)
        mean_norm = self.norm_sum / max(self.count, 1)
        return {
            "count": self.count,
            "mean": mean.astype(np.float32),
            "mean_norm": mean_norm,
            "max_norm": self.max_norm,
            "outlier_ratio": float(np.linalg.norm(mean)) / mean_norm if mean_norm > 0 else 0.0,
            "nonfinite_rows": self.nonfinite_rows,
        }
