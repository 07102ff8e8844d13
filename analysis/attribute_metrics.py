"""Per-attribute evaluation (seed 004 eq. 4.2 and its tables), from confusion counts."""
from __future__ import annotations

from collections.abc import Sequence
import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class AttributeReport:
    """Per attribute: error rate (eq. 4.2), error on positives and negatives, balanced accuracy, and the
    majority-class baseline of the same data. Rows are ordered by increasing class imbalance."""

    attributes: list[str]
    positive_rate: np.ndarray
    error_rate: np.ndarray
    error_pos: np.ndarray
    error_neg: np.ndarray
    balanced_accuracy: np.ndarray
    majority_error: np.ndarray
    support: np.ndarray

    @classmethod
    def from_counts(cls, attributes: Sequence[str], tp, fp, tn, fn) -> AttributeReport:
        tp, fp, tn, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, tn, fn))
        pos, neg = tp + fn, tn + fp
        total = pos + neg
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an attribute without labels
            rate = pos / total
            err_pos = fn / pos
            err_neg = fp / neg
            report = cls(
                attributes=list(attributes),
                positive_rate=rate,
                error_rate=(fp + fn) / total,
                error_pos=err_pos,
                error_neg=err_neg,
                # mean recall over the classes present; NaN for an attribute with no known label at all
                balanced_accuracy=np.nanmean(np.stack([1 - err_pos, 1 - err_neg]), axis=0),
                majority_error=np.minimum(rate, 1 - rate),
                support=total,
            )
        return report

    def order(self) -> list[int]:
        """Indices by increasing class imbalance |p - 0.5| of the evaluated data."""
        return sorted(range(len(self.attributes)), key=lambda i: abs(np.nan_to_num(self.positive_rate[i]) - 0.5))

    @property
    def mean_error(self) -> float:
        return float(np.nanmean(self.error_rate))

    @property
    def mean_balanced_error(self) -> float:
        return float(np.nanmean(1 - self.balanced_accuracy))

    @property
    def mean_majority_error(self) -> float:
        return float(np.nanmean(self.majority_error))

    COLUMNS = ("attribute", "positive_rate", "error_rate", "error_pos", "error_neg", "balanced_accuracy",
               "majority_error", "support")

    def to_table(self) -> list[list]:
        rows = []
        for i in self.order():
            rows.append([self.attributes[i]] + [float(getattr(self, c)[i]) for c in self.COLUMNS[1:]])
        return rows

    def to_dict(self) -> dict:
        return {
            "mean_error": self.mean_error,
            "mean_balanced_error": self.mean_balanced_error,
            "mean_majority_error": self.mean_majority_error,
            "attributes": {row[0]: dict(zip(self.COLUMNS[1:], row[1:])) for row in self.to_table()},
        }

    def format(self) -> str:
        lines = [f"{'attribute':<22}{'pos%':>7}{'err':>8}{'err+':>8}{'err-':>8}{'bal.acc':>9}{'major.':>8}"]
        for row in self.to_table():
            name, p, e, ep, en, ba, me, _ = row
            lines.append(f"{name:<22}{100 * p:7.1f}{e:8.3f}{ep:8.3f}{en:8.3f}{ba:9.3f}{me:8.3f}")
        lines.append(f"{'MEAN':<22}{'':7}{self.mean_error:8.3f}{'':16}{1 - self.mean_balanced_error:9.3f}"
                     f"{self.mean_majority_error:8.3f}")
        return "\n".join(lines)
