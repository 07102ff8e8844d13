"""Acceptable Mask Ratio (seed 004 eq. 4.4/4.5) and its Table 5.1 aggregation, streamed over batches.

Per image and attribute, with D the discriminative area (map > threshold), M the attribute's mask
and I the image size in pixels:
  amr_unadjusted = #(D & M) / #D                     (Chen 2022)
  amr            = #(D & M) / #D * (I - #M) / I      (seed 004: discounts large masks)
  energy         = sum(map * M) / sum(map) * (I - #M) / I
An image with an empty discriminative area (or zero map) scores 0, as in the seed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from analysis.gradcam import signed_labels, upsample_maps
from facelens.attributes import CELEBA_POSITIVE_RATE, resolve_attributes

GROUPS: tuple[str, ...] = ("overall", "gt_pos", "gt_neg", "pred_correct", "pred_incorrect")
VARIANTS: tuple[str, ...] = ("amr", "amr_unadjusted", "energy")
MAP_NORMALIZATIONS = ("minmax", "none")
# Upper bound on map elements at mask resolution handled at once (bounds memory of amr_scores).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class AMRScores:
    """Per image and attribute scores, each (B, T)."""

    amr: torch.Tensor
    amr_unadjusted: torch.Tensor
    energy: torch.Tensor

    def variant(self, name: str) -> torch.Tensor:
        return getattr(self, name)


def _check_masks(maps: torch.Tensor, masks: torch.Tensor, fn: str) -> torch.Tensor:
    if maps.dim() != 4:
        raise ValueError(f"{fn}: maps must be (B, T, h, w), got shape {tuple(maps.shape)}")
    if masks.dtype != torch.bool:
        raise ValueError(f"{fn}: masks must be bool, got {masks.dtype}")
    b, t = maps.shape[:2]
    if masks.dim() == 3:
        masks = masks[None]
    if (masks.dim() != 4 or masks.shape[1] != t or masks.shape[0] not in (1, b)
            or masks.shape[-1] != masks.shape[-2]):
        raise ValueError(f"{fn}: masks must be (T, S, S) or (B, T, S, S) with T={t}, B={b}; got "
                         f"{tuple(masks.shape)}")
    return masks


def amr_scores(maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.0) -> AMRScores:
    """AMR, Chen's unadjusted AMR and the energy variant for maps (B, T, h, w) against masks
    (T, S, S) or (B, T, S, S); maps of another size are bilinearly upsampled to S x S first."""
    masks = _check_masks(maps, masks, "amr_scores").to(maps.device)
    size = masks.shape[-1]
    b, t = maps.shape[:2]
    image = float(size * size)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * size * size))
    outs: dict[str, list[torch.Tensor]] = {v: [] for v in VARIANTS}
    for start in range(0, t, chunk):
        sl = slice(start, start + chunk)
        m = maps[:, sl].float()
        if m.shape[-2:] != (size, size):
            m = upsample_maps(m, size)
        mask = masks[:, sl]
        area = mask.sum((-2, -1)).double()  # (1 or B, t)
        adjust = (image - area) / image
        disc = m > threshold
        n_disc = disc.sum((-2, -1)).double()
        inside = (disc & mask).sum((-2, -1)).double()
        ratio = torch.where(n_disc > 0, inside / n_disc.clamp_min(1), torch.zeros_like(n_disc))
        total = m.double().sum((-2, -1))
        in_energy = (m * mask).double().sum((-2, -1))
        energy = torch.where(total > 0, in_energy / torch.where(total > 0, total, torch.ones_like(total)),
                             torch.zeros_like(total))
        outs["amr_unadjusted"].append(ratio)
        outs["amr"].append(ratio * adjust)
        outs["energy"].append(energy * adjust)
    return AMRScores(**{v: torch.cat(outs[v], dim=1) for v in VARIANTS})


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Per-map (m - min) / (max(m - min) + 1e-7), the scaling pytorch-grad-cam gives each CAM."""
    shifted = maps - maps.amin((-2, -1), keepdim=True)
    return shifted / (shifted.amax((-2, -1), keepdim=True) + 1e-7)


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson's rho over the pairs where both are finite; NaN with fewer than 2 pairs or no variance."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def kl_divergence(p: np.ndarray | torch.Tensor, q: np.ndarray | torch.Tensor,
                  eps: float = 1e-10) -> np.ndarray:
    """KL(P || Q) over the last two axes, each map made a distribution: P = (p + eps) / sum(p + eps)."""
    p = np.asarray(p.cpu() if torch.is_tensor(p) else p, dtype=np.float64) + eps
    q = np.asarray(q.cpu() if torch.is_tensor(q) else q, dtype=np.float64) + eps
    if p.shape != q.shape:
        raise ValueError(f"kl_divergence: maps differ in shape {p.shape} vs {q.shape}; "
                         "pass size= to resample")
    p = p / p.sum((-2, -1), keepdims=True)
    q = q / q.sum((-2, -1), keepdims=True)
    return (p * np.log(p / q)).sum((-2, -1))


def _nan_to_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _nanmean(values: np.ndarray) -> float | None:
    """Mean over the finite entries (attributes with no images are skipped); None when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


@dataclass
class AMRResult:
    """Table 5.1 for one model: per attribute error rate, mean AMR per group, average maps per group.

    Arrays are indexed [group, attribute] with groups in GROUPS order; average_maps is (G, T, h, w) at the
    resolution of the maps given to the accumulator (NaN where a group is empty).
    """

    attributes: list[str]
    error_rate: np.ndarray  # (T,)
    counts: np.ndarray  # (G, T) images per group
    scores: dict[str, np.ndarray]  # variant -> (G, T) mean score
    average_maps: np.ndarray  # (G, T, h, w)
    threshold: float = 0.0
    map_normalization: str = "minmax"
    frontal_only: bool = field(default=False)

    TABLE_COLUMNS = ("attribute", "error_rate") + GROUPS

    def group_index(self, group: str) -> int:
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; choose one of {', '.join(GROUPS)}")
        return GROUPS.index(group)

    def correlation(self, variant: str = "amr") -> float:
        """Pearson's rho between error rate and overall mean score across attributes (seed 004 RQ1)."""
        return pearson(self.error_rate, self.scores[variant][0])

    def group_maps(self, group: str = "overall", size: int | None = None) -> np.ndarray:
        """Average maps (T, h, w) of one group, optionally bilinearly resampled to size x size."""
        maps = self.average_maps[self.group_index(group)]
        if size is None or maps.shape[-1] == size and maps.shape[-2] == size:
            return maps
        return upsample_maps(torch.from_numpy(maps), size).numpy()

    def mean_row(self, variant: str = "amr") -> dict[str, float | None]:
        """The OVERALL row: mean over attributes of each column."""
        row = {"error_rate": _nanmean(self.error_rate)}
        row.update({name: _nanmean(self.scores[variant][g]) for g, name in enumerate(GROUPS)})
        return row

    def to_table(self, variant: str = "amr", order: str = "given") -> list[list]:
        """Rows in TABLE_COLUMNS order plus an OVERALL row; order 'imbalance' sorts as seed 004's tables."""
        if order not in ("given", "imbalance"):
            raise ValueError(f"to_table: order must be 'given' or 'imbalance', got {order!r}")
        names = list(self.attributes)
        if order == "imbalance":
            names = sorted(names, key=lambda n: abs(CELEBA_POSITIVE_RATE[n] - 0.5))
        rows = []
        for name in names:
            i = self.attributes.index(name)
            rows.append([name, _nan_to_none(self.error_rate[i])]
                        + [_nan_to_none(self.scores[variant][g, i]) for g in range(len(GROUPS))])
        mean = self.mean_row(variant)
        rows.append(["OVERALL", mean["error_rate"]] + [mean[g] for g in GROUPS])
        return rows

    def to_dict(self) -> dict:
        """JSON-ready: per attribute error_rate, counts and each variant's group means; top: correlation."""
        per_attribute = {}
        for i, name in enumerate(self.attributes):
            entry = {"error_rate": _nan_to_none(self.error_rate[i]),
                     "count": {g: int(self.counts[k, i]) for k, g in enumerate(GROUPS)}}
            for variant in VARIANTS:
                entry[variant] = {g: _nan_to_none(self.scores[variant][k, i]) for k, g in enumerate(GROUPS)}
            per_attribute[name] = entry
        return {
            "attributes": per_attribute,
            "correlation": _nan_to_none(self.correlation("amr")),
            "correlation_amr_unadjusted": _nan_to_none(self.correlation("amr_unadjusted")),
            "correlation_energy": _nan_to_none(self.correlation("energy")),
            "overall": {v: self.mean_row(v) for v in VARIANTS},
            "threshold": self.threshold,
            "map_normalization": self.map_normalization,
            "frontal_only": self.frontal_only,
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for an NPZ file beside the JSON."""
        out = {"attributes": np.array(self.attributes), "groups": np.array(GROUPS),
               "error_rate": self.error_rate, "counts": self.counts, "average_maps": self.average_maps}
        out.update({f"score_{v}": s for v, s in self.scores.items()})
        return out


def kl_distance(result_a: AMRResult, result_b: AMRResult, group: str = "overall", group_b: str | None = None,
                size: int | None = None, eps: float = 1e-10) -> dict[str, float | None]:
    """Per attribute KL(average map of A || average map of B) (seed 004 section 4.4.2: A is the base model).

    group_b defaults to group; pass the same result twice with two groups to compare e.g. gt_pos vs gt_neg.
    Maps of different resolutions need `size` (both are bilinearly resampled to it).
    """
    common = [n for n in result_a.attributes if n in result_b.attributes]
    if not common:
        raise ValueError("kl_distance: the two results share no attribute")
    pa = result_a.group_maps(group, size)[[result_a.attributes.index(n) for n in common]]
    pb = result_b.group_maps(group_b or group, size)[[result_b.attributes.index(n) for n in common]]
    kl = kl_divergence(pa, pb, eps)
    return {n: _nan_to_none(float(v)) for n, v in zip(common, kl)}


class AMRAccumulator:
    """Running sums over batches for AMRResult: `update(...)` per batch, then `result()`.

    Only sums and counts are kept (float64, on the maps' device): no per-image records.
    """

    def __init__(self, attributes: Sequence[str] | None = None, threshold: float = 0.0,
                 map_normalization: str = "minmax"):
        if map_normalization not in MAP_NORMALIZATIONS:
            raise ValueError(f"AMRAccumulator: map_normalization must be one of {MAP_NORMALIZATIONS}, got "
                             f"{map_normalization!r}")
        self.attributes = resolve_attributes(attributes, "AMRAccumulator: attributes")
        self.threshold = float(threshold)
        self.map_normalization = map_normalization
        self.frontal_only = False
        self.reset()

    def reset(self) -> None:
        self._counts = self._errors = self._sums = self._map_sums = None
        self.frontal_only = False

    def _init_state(self, maps: torch.Tensor) -> None:
        g, t = len(GROUPS), len(self.attributes)
        kw = {"dtype": torch.float64, "device": maps.device}
        self._counts = torch.zeros(g, t, **kw)
        self._errors = torch.zeros(t, **kw)
        self._sums = {v: torch.zeros(g, t, **kw) for v in VARIANTS}
        self._map_sums = torch.zeros(g, t, *maps.shape[-2:], **kw)

    def update(self, maps: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
               label_mask: torch.Tensor | None, masks: torch.Tensor,
               keep: torch.Tensor | None = None) -> None:
        """Add a batch. maps (B, T, h, w) >= 0 for the accumulator's T attributes; logits (B, T); labels
        (B, T) in {0, 1} or {-1, 1}; label_mask (B, T) bool (False: label unknown, excluded); masks
        (T, S, S) or (B, T, S, S) bool; keep (B,) bool drops whole images (e.g. the frontal filter)."""
        t = len(self.attributes)
        if maps.dim() != 4 or maps.shape[1] != t:
            raise ValueError(f"AMRAccumulator.update: maps must be (B, {t}, h, w), got {tuple(maps.shape)}")
        b = maps.shape[0]
        if tuple(logits.shape) != (b, t):
            raise ValueError(f"AMRAccumulator.update: logits must be (B, T) = {(b, t)}, got "
                             f"{tuple(logits.shape)}")
        if self._map_sums is None:
            self._init_state(maps)
        elif tuple(self._map_sums.shape[-2:]) != tuple(maps.shape[-2:]):
            raise ValueError(f"AMRAccumulator.update: maps are {tuple(maps.shape[-2:])}, earlier batches "
                             "were "
                             f"{tuple(self._map_sums.shape[-2:])}")
        device = self._counts.device
        lab = signed_labels(labels, (b, t), "AMRAccumulator.update: labels").to(device)
        valid = torch.ones(b, t, dtype=torch.bool, device=device)
        if label_mask is not None:
            if tuple(label_mask.shape) != (b, t):
                raise ValueError(f"AMRAccumulator.update: label_mask must be {(b, t)}, got "
                                 f"{tuple(label_mask.shape)}")
            valid &= label_mask.to(device=device, dtype=torch.bool)
        if keep is not None:
            if tuple(keep.shape) != (b,):
                raise ValueError(f"AMRAccumulator.update: keep must be (B,) = ({b},), got "
                                 f"{tuple(keep.shape)}")
            valid &= keep.to(device=device, dtype=torch.bool)[:, None]
            self.frontal_only = True
        if not valid.any():
            return
        maps = maps.detach().to(device)
        correct = (logits.detach().to(device) > 0) == (lab > 0)
        groups = torch.stack([valid, valid & (lab > 0), valid & (lab < 0), valid & correct, valid & ~correct])
        weights = groups.double()  # (G, B, T)
        self._counts += weights.sum(1)
        self._errors += (valid & ~correct).double().sum(0)
        scores = amr_scores(maps, masks, self.threshold)
        for v in VARIANTS:
            self._sums[v] += torch.einsum("gbt,bt->gt", weights, scores.variant(v).double())
        shown = minmax_normalize(maps.double()) if self.map_normalization == "minmax" else maps.double()
        self._map_sums += torch.einsum("gbt,bthw->gthw", weights, shown)

    def state_dict(self) -> dict[str, Any]:
        """The running sums (None before the first batch) and settings; `merge` adds such states."""
        return {"attributes": list(self.attributes), "threshold": self.threshold,
                "map_normalization": self.map_normalization, "frontal_only": self.frontal_only,
                "counts": self._counts, "errors": self._errors, "sums": self._sums, "map_sums": self._map_sums}

    def merge(self, other: AMRAccumulator | Mapping[str, Any]) -> AMRAccumulator:
        """Add another accumulator (or its `state_dict()`, e.g. from another rank's shard of the images): the
        sums become those of one accumulator fed both sets of batches. Returns self."""
        state = other.state_dict() if isinstance(other, AMRAccumulator) else other
        mine = (list(self.attributes), self.threshold, self.map_normalization)
        theirs = (list(state["attributes"]), float(state["threshold"]), state["map_normalization"])
        if mine != theirs:
            raise ValueError(f"AMRAccumulator.merge: settings differ (attributes, threshold, map_normalization): "
                             f"{mine} vs {theirs}")
        self.frontal_only |= bool(state["frontal_only"])
        if state["counts"] is None:
            return self
        if self._counts is None:
            self._counts = state["counts"].clone()
            self._errors = state["errors"].clone()
            self._sums = {v: s.clone() for v, s in state["sums"].items()}
            self._map_sums = state["map_sums"].clone()
            return self
        if tuple(state["map_sums"].shape) != tuple(self._map_sums.shape):
            raise ValueError(f"AMRAccumulator.merge: maps are {tuple(state['map_sums'].shape[-2:])} here and "
                             f"{tuple(self._map_sums.shape[-2:])} there")
        device = self._counts.device
        self._counts += state["counts"].to(device)
        self._errors += state["errors"].to(device)
        for v in VARIANTS:
            self._sums[v] += state["sums"][v].to(device)
        self._map_sums += state["map_sums"].to(device)
        return self

    def __iadd__(self, other: AMRAccumulator) -> AMRAccumulator:
        return self.merge(other)

    def result(self) -> AMRResult:
        if self._counts is None:
            raise ValueError("AMRAccumulator.result: no batch was added")
        counts = self._counts.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            error_rate = self._errors.cpu().numpy() / counts[0]
            scores = {v: s.cpu().numpy() / counts for v, s in self._sums.items()}
            average_maps = self._map_sums.cpu().numpy() / counts[:, :, None, None]
        return AMRResult(list(self.attributes), error_rate, counts, scores, average_maps, self.threshold,
                         self.map_normalization, self.frontal_only)
