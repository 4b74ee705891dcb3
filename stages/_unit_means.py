""":class:`UnitMeans`: the dataset-wide per-unit activation level, as a mergeable statistic.

Folded from the per-image summaries extraction computes anyway (spatial mean and max per unit), so it
costs nothing extra; memory is three float64 vectors per layer, whatever the number of images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from ..core import StreamingStatistic, pack_arrays, unpack_arrays
from ._activations import UnitSummaries, read_summaries
from ._errors import StageInputError

__all__ = ["UnitMeans"]


class UnitMeans(StreamingStatistic):
    """Dataset-wide per-unit activation level: mean activation, mean of per-image maxima, overall max.

    State (float64 sums, exact to merge up to rounding): ``count`` images, ``sum_mean`` and ``sum_max`` over
    images of the per-image spatial mean / max, ``max`` over images. Readouts: :attr:`mean`, :attr:`mean_max`,
    :attr:`max`, :attr:`dead` (units never above zero — flagged, never divided by).
    """

    def __init__(self, num_units: int | None = None) -> None:
        self.count = 0
        self.sum_mean = None if num_units is None else np.zeros(num_units)
        self.sum_max = None if num_units is None else np.zeros(num_units)
        self.max_ = None if num_units is None else np.full(num_units, -np.inf)

    def _ensure(self, num_units: int) -> None:
        if self.sum_mean is None:
            self.sum_mean, self.sum_max, self.max_ = np.zeros(num_units), np.zeros(num_units), np.full(num_units, -np.inf)
        elif self.sum_mean.shape[0] != num_units:
            raise StageInputError(f"UnitMeans holds {self.sum_mean.shape[0]} units but got a batch with {num_units}")

    def update(self, mean: np.ndarray, max_values: np.ndarray) -> None:  # type: ignore[override]
        """Fold per-image summaries ``mean``/``max_values`` ``(N, C)`` into the state."""
        mean, max_values = np.asarray(mean, np.float64), np.asarray(max_values, np.float64)
        if mean.ndim != 2 or mean.shape != max_values.shape:
            raise StageInputError(f"UnitMeans.update needs two (N, C) arrays; got {mean.shape} and {max_values.shape}")
        self._ensure(mean.shape[1])
        self.count += mean.shape[0]
        self.sum_mean += mean.sum(0)
        self.sum_max += max_values.sum(0)
        if mean.shape[0]:
            np.maximum(self.max_, max_values.max(0), out=self.max_)

    @classmethod
    def from_summaries(cls, summaries: UnitSummaries | pa.Table) -> UnitMeans:
        """A statistic over the images of one summary table."""
        if isinstance(summaries, pa.Table):
            summaries = read_summaries(summaries)
        stat = cls(summaries.shape[0])
        stat.update(summaries.mean, summaries.max)
        return stat

    def merge(self, other: UnitMeans) -> UnitMeans:
        if other.sum_mean is None:
            return self
        self._ensure(other.sum_mean.shape[0])
        self.count += other.count
        self.sum_mean += other.sum_mean
        self.sum_max += other.sum_max
        np.maximum(self.max_, other.max_, out=self.max_)
        return self

    def _readout(self, sums: np.ndarray | None) -> np.ndarray:
        if sums is None:
            return np.zeros(0)
        return sums / self.count if self.count else np.zeros_like(sums)

    @property
    def mean(self) -> np.ndarray:
        """``(C,)`` mean activation per unit over images and positions (0 before any update)."""
        return self._readout(self.sum_mean)

    @property
    def mean_max(self) -> np.ndarray:
        """``(C,)`` mean over images of each unit's spatial max."""
        return self._readout(self.sum_max)

    @property
    def max(self) -> np.ndarray:
        """``(C,)`` largest activation of each unit (0 before any update)."""
        if self.max_ is None:
            return np.zeros(0)
        return np.where(np.isfinite(self.max_), self.max_, 0.0)

    @property
    def dead(self) -> np.ndarray:
        """``(C,)`` bool: the unit was never above zero on any image."""
        return self.max <= 0 if self.max_ is not None else np.zeros(0, bool)

    def to_table(self) -> pa.Table:
        arrays = {} if self.sum_mean is None else {"sum_mean": self.sum_mean, "sum_max": self.sum_max, "max": self.max_}
        return pack_arrays(arrays, {"count": self.count, "kind": "UnitMeans"})

    @classmethod
    def from_table(cls, table: pa.Table) -> UnitMeans:
        arrays, attrs = unpack_arrays(table)
        if attrs.get("kind") != "UnitMeans":
            raise StageInputError(f"table holds a {attrs.get('kind')!r} state, not UnitMeans")
        stat = cls()
        stat.count = int(attrs["count"])
        if arrays:
            stat.sum_mean, stat.sum_max, stat.max_ = arrays["sum_mean"].copy(), arrays["sum_max"].copy(), arrays["max"].copy()
        return stat

    def result(self) -> pd.DataFrame:
        """Table ``unit, mean, mean_max, max, dead`` (the ``extract`` stage's ``units@<layer>``)."""
        return pd.DataFrame({"unit": np.arange(len(self.mean)), "mean": self.mean, "mean_max": self.mean_max,
                             "max": self.max, "dead": self.dead})
