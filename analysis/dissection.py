"""Network Dissection (Bau et al. 2017) and Hierarchical Network Dissection (seed 002), streaming.

NetDissect-Lite stores every layer as a float64 memmap and tallies one (image, unit) pair at a
time on the CPU. Here a dictionary is streamed twice instead, in batches and on any device:

* pass 1 finds each unit's threshold, the top `quantile` (0.005) of its activations over the
  dictionary, exactly (a per-unit top-k buffer) or with a log-histogram sketch of bounded
  relative error (`SketchTopQuantile`);
* pass 2 upsamples activation maps bilinearly to mask resolution, thresholds them and keeps
  running integer counts per unit and concept (intersections, activation areas, mask areas),
  plus each image's per-unit maximum for the rank-based HND stages. On a GPU one batched matmul
  does it ("dense"); on the CPU a compiled kernel (`analysis/dissection_kernel.py`) evaluates the
  upsampled maps only where they can exceed the threshold and touches only the pixels that fire.

IoU follows NetDissect: sum over images of |A & M| / sum over images of |A | M|, counted over
images where the concept is labelled. The HND variant ("fires_only") sums the union only over
images where the unit fires (its thresholded map at mask resolution is non-empty).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from scipy.stats import rankdata
from torch import nn

from analysis.layers import capture, resolve_layer

try:  # compiled CPU kernels (top-k buffer, tally); without numba the CPU runs the torch paths
    from analysis import dissection_kernel
except ImportError:  # pragma: no cover - numba is a declared dependency
    dissection_kernel = None

QUANTILE_METHODS = ("exact", "sketch")
TALLY_METHODS = ("auto", "dense", "sparse", "compiled")
IOU_VARIANTS = ("netdissect", "fires_only")


@dataclass
class DissectionConfig:
    """Every option and threshold of both methods (seed 002 values as defaults)."""

    quantile: float = 0.005  # top fraction of a unit's activations counted as "firing" (Bau et al.)
    quantile_method: str = "exact"  # "exact" (top-k buffer, needs num_images) or "sketch"
    sketch_relative_error: float = 0.002  # alpha of the log-histogram sketch
    sketch_min_magnitude: float = 1e-6  # |x| below this counts as 0 in the sketch
    sketch_max_magnitude: float = 1e6  # |x| above this is an error in the sketch
    iou_threshold: float = 0.04  # NetDissect: a unit is interpretable when its best IoU exceeds this
    # "compiled" (CPU, numba: only pixels that fire), "dense" (upsample everything, matmul: GPU),
    # "sparse" (torch, only cells above threshold), "auto" (compiled on the CPU, dense on a GPU)
    tally: str = "auto"
    chunk_elements: int = 1 << 24  # bound on upsampled elements held at once (memory knob)
    hnd_iou: str = "netdissect"  # IoU used by HND stages II-III: "netdissect" or "fires_only"
    region_min_iou: float = 0.04  # stage II pairs a unit with a region only above this best IoU
    bias_thresholds: dict[int, float] = field(default_factory=lambda: {2: 0.55, 4: 0.3})  # stage I, by group size
    bias_margin: float = 0.05  # stage I threshold 1/S + margin for group sizes not listed above
    local_factor: float = 1.5  # stage III: interpretable when P_k > local_factor / K
    top_k: int = 8  # top activating images kept per unit

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1:
            raise ValueError(f"DissectionConfig.quantile must be in (0, 1), got {self.quantile}")
        for name, value, allowed in (("quantile_method", self.quantile_method, QUANTILE_METHODS),
                                     ("tally", self.tally, TALLY_METHODS), ("hnd_iou", self.hnd_iou, IOU_VARIANTS)):
            if value not in allowed:
                raise ValueError(f"DissectionConfig.{name} must be one of {allowed}, got {value!r}")
        if not 0 < self.sketch_relative_error < 0.5:
            raise ValueError(f"DissectionConfig.sketch_relative_error must be in (0, 0.5), got {self.sketch_relative_error}")
        if not 0 < self.sketch_min_magnitude < self.sketch_max_magnitude:
            raise ValueError("DissectionConfig.sketch_min_magnitude must be positive and below sketch_max_magnitude")
        if self.chunk_elements < 1 or self.top_k < 0:
            raise ValueError("DissectionConfig.chunk_elements must be >= 1 and top_k >= 0")
        self.bias_thresholds = {int(k): float(v) for k, v in self.bias_thresholds.items()}

    def bias_threshold(self, num_subgroups: int) -> float:
        """Stage I: 0.55 for 2-way and 0.3 for 4-way groups (seed 002); 1/S + margin otherwise."""
        return self.bias_thresholds.get(num_subgroups, 1.0 / num_subgroups + self.bias_margin)


# ----------------------------------------------------------------------------------------------
# Pass 1: per-unit top-quantile thresholds


def _as_maps(activations: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """(B, U, h, w) float32; (B, U) vectors count as 1x1 maps."""
    if activations.ndim == 2:
        activations = activations[:, :, None, None]
    if activations.ndim != 4:
        raise ValueError(f"activations must be (B, U, h, w) or (B, U), got shape {tuple(activations.shape)}")
    activations = activations.float()
    if check_finite and activations.numel():
        _require_finite(torch.stack(torch.aminmax(activations)))
    return activations


NOT_FINITE = "activations contain NaN or inf; dissection thresholds would be meaningless"


def _require_finite(values: torch.Tensor) -> None:
    if not bool(torch.isfinite(values).all()):
        raise ValueError(NOT_FINITE)


def _numpy_linear_position(n: int, p: float) -> tuple[int, int, float]:
    """(lower index, upper index, weight) of NumPy's default ('linear') quantile p of n sorted values."""
    virtual = (n - 1) * p  # numpy's virtual index for method='linear'
    lo = min(max(math.floor(virtual), 0), n - 1)
    hi = min(lo + 1, n - 1)
    return lo, hi, virtual - math.floor(virtual)


def _numpy_lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """NumPy's quantile interpolation, including its branch for t >= 0.5."""
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


class ExactTopQuantile:
    """Exact per-unit (1 - quantile) quantile, equal to `np.quantile` over all of a unit's values.

    Keeps only each unit's largest `k ~ quantile * n + 1` values (a top-k buffer), so it needs the
    number of images in advance (`num_images`, the dictionary size) and fails if it sees more.
    """

    def __init__(self, num_images: int, quantile: float = 0.005):
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.num_images, self.quantile = int(num_images), float(quantile)
        self.buffer: torch.Tensor | None = None
        self._layout: str | None = None  # the compiled update's layout of `buffer` ("sorted" / "buffered")
        self._fill: np.ndarray | None = None  # "buffered": values per unit and the floor they must exceed
        self._floor: np.ndarray | None = None
        self.values_per_image = 0
        self.seen = 0
        self.k = 0

    def update(self, activations: torch.Tensor) -> None:
        compiled = activations.device.type == "cpu" and dissection_kernel is not None
        acts = _as_maps(activations, check_finite=not compiled)  # the compiled update checks as it reads
        b, u, h, w = acts.shape
        if self.buffer is None:
            self.values_per_image = h * w
            lo, _, _ = _numpy_linear_position(self.num_images * h * w, 1 - self.quantile)
            self.k = self.num_images * h * w - lo
            self.buffer = acts.new_empty((u, 0))
        if h * w != self.values_per_image or u != self.buffer.shape[0]:
            raise ValueError(f"activation shape changed between batches: got {tuple(acts.shape[1:])}")
        if self.seen + b > self.num_images:
            raise ValueError(f"ExactTopQuantile was sized for num_images={self.num_images} but received more images; "
                             "pass the dictionary size or use quantile_method='sketch'")
        self.seen += b
        if compiled:
            maps = acts.reshape(b, u, h * w).contiguous().numpy()
            if self.k <= dissection_kernel.SORTED_TOP_K:
                if self._layout != "sorted":
                    self.buffer, self._layout = _sorted_rows(self.buffer, self.k), "sorted"
                not_finite = dissection_kernel.update_top_sorted(maps, self.buffer.numpy())
            else:
                if self._layout != "buffered":
                    self.buffer, self._fill, self._floor = _append_buffer(self.buffer, self.k)
                    self._layout = "buffered"
                not_finite = dissection_kernel.update_top_buffered(maps, self.buffer.numpy(), self._fill,
                                                                   self._floor, self.k)
            if not_finite:
                raise ValueError(NOT_FINITE)
            return
        self._layout = None
        values = torch.cat([self.buffer, acts.transpose(0, 1).reshape(u, -1)], dim=1)
        if values.shape[1] > self.k:
            values = values.topk(self.k, dim=1, sorted=False).values
        self.buffer = values

    def merge(self, other: ExactTopQuantile) -> ExactTopQuantile:
        """Fold in another shard's buffer (sized for the same num_images): the top k of the union of two top-k
        buffers is the top k of all values, so the thresholds equal one pass over both shards. Returns self."""
        if (other.num_images, other.quantile) != (self.num_images, self.quantile):
            raise ValueError(f"ExactTopQuantile.merge: num_images/quantile differ: {(self.num_images, self.quantile)}"
                             f" vs {(other.num_images, other.quantile)}")
        if other.buffer is None:
            return self
        if self.buffer is None:
            self.buffer, self.values_per_image, self.k = other.buffer.clone(), other.values_per_image, other.k
        else:
            if (other.values_per_image, other.buffer.shape[0]) != (self.values_per_image, self.buffer.shape[0]):
                raise ValueError("ExactTopQuantile.merge: the shards saw activations of different shapes")
            values = torch.cat([self.buffer, other.buffer.to(self.buffer.device)], dim=1)
            self.buffer = values.topk(self.k, dim=1, sorted=False).values if values.shape[1] > self.k else values
            self._layout = None
        self.seen += other.seen
        if self.seen > self.num_images:
            raise ValueError(f"ExactTopQuantile.merge: the shards hold {self.seen} images, more than "
                             f"num_images={self.num_images}")
        return self

    def thresholds(self) -> np.ndarray:
        """(U,) float64 thresholds, as `np.quantile(unit_values, 1 - quantile)` would give."""
        if self.buffer is None:
            raise ValueError("no activations seen: run pass 1 (update) before asking for thresholds")
        n = self.seen * self.values_per_image
        lo, hi, t = _numpy_linear_position(n, 1 - self.quantile)
        top = self.buffer.sort(dim=1, descending=True).values.double().cpu().numpy()
        return _numpy_lerp(top[:, n - 1 - lo], top[:, n - 1 - hi], t)


def _sorted_rows(buffer: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k buffer as (U, k) ascending rows padded with -inf: the compiled update's layout for small k."""
    top = buffer.topk(min(k, buffer.shape[1]), dim=1).values
    pad = buffer.new_full((buffer.shape[0], k - top.shape[1]), -math.inf)
    return torch.cat([pad, top.flip(1)], dim=1).contiguous()


def _append_buffer(buffer: torch.Tensor, k: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The top-k buffer as the compiled update's layout for large k: (U, 2k + 64) with the largest values
    first and -inf after them, the number of values per unit, and its floor (the k-th largest once there
    are k, -inf before)."""
    top = buffer.topk(min(k, buffer.shape[1]), dim=1).values  # descending
    out = buffer.new_full((buffer.shape[0], 2 * k + 64), -math.inf)
    out[:, :top.shape[1]] = top
    fill = (top > -math.inf).sum(1).numpy().astype(np.int64)
    floor = np.full(buffer.shape[0], -np.inf, dtype=np.float32)
    if top.shape[1] == k:
        floor = np.where(fill == k, top[:, k - 1].numpy(), floor).astype(np.float32)
    return out, fill, floor


class SketchTopQuantile:
    """Streaming per-unit quantile from a log-spaced histogram (DDSketch-like), no buffer of values.

    Bins are (g^(i-1), g^i] in |x| with g = (1 + a) / (1 - a) for a = `relative_error`, plus a zero
    bin for |x| < `min_magnitude`. The order statistics x_lo, x_hi that NumPy interpolates between
    are each recovered within a relative error a, so the returned threshold t' satisfies
        |t' - t_numpy| <= a * max(|x_lo|, |x_hi|) + min_magnitude.
    Memory: U * 2 * log(max/min) / log(g) int32 counts (~7000 bins per unit with the defaults).
    """

    def __init__(self, quantile: float = 0.005, relative_error: float = 0.002, min_magnitude: float = 1e-6,
                 max_magnitude: float = 1e6):
        self.quantile, self.alpha = float(quantile), float(relative_error)
        self.min_magnitude, self.max_magnitude = float(min_magnitude), float(max_magnitude)
        self.log_gamma = math.log((1 + self.alpha) / (1 - self.alpha))
        self.i_min = math.ceil(math.log(self.min_magnitude) / self.log_gamma)
        self.i_max = math.ceil(math.log(self.max_magnitude) / self.log_gamma)
        self.per_sign = self.i_max - self.i_min + 1
        self.num_bins = 2 * self.per_sign + 1  # [negative (most negative first), zero, positive]
        self.hist: torch.Tensor | None = None
        self.seen_values = 0

    def update(self, activations: torch.Tensor) -> None:
        acts = _as_maps(activations)
        u = acts.shape[1]
        if self.hist is None:
            self.hist = torch.zeros(u * self.num_bins, dtype=torch.int32, device=acts.device)
        elif self.hist.numel() != u * self.num_bins:
            raise ValueError(f"number of units changed between batches: got {u}")
        values = acts.transpose(0, 1).reshape(u, -1).double()
        self.seen_values += values.shape[1]
        if self.seen_values >= 2**31:
            raise ValueError("SketchTopQuantile counts are int32: more than 2^31 values per unit")
        mag = values.abs()
        if bool((mag > self.max_magnitude).any()):
            raise ValueError(f"activation magnitude {float(mag.max()):.3g} exceeds sketch_max_magnitude="
                             f"{self.max_magnitude:g}; raise it in DissectionConfig")
        index = (torch.log(mag.clamp_min(self.min_magnitude)) / self.log_gamma).ceil().long()
        index = index.clamp(self.i_min, self.i_max) - self.i_min
        bins = torch.where(values > 0, self.per_sign + 1 + index, self.per_sign - 1 - index)
        bins = torch.where(mag < self.min_magnitude, torch.full_like(bins, self.per_sign), bins)
        bins += torch.arange(u, device=bins.device)[:, None] * self.num_bins
        self.hist.index_add_(0, bins.reshape(-1), torch.ones(bins.numel(), dtype=torch.int32, device=bins.device))

    def merge(self, other: SketchTopQuantile) -> SketchTopQuantile:
        """Add another shard's histogram (same bins): the sketch of the union of both shards. Returns self."""
        mine = (self.quantile, self.alpha, self.min_magnitude, self.max_magnitude)
        theirs = (other.quantile, other.alpha, other.min_magnitude, other.max_magnitude)
        if mine != theirs:
            raise ValueError(f"SketchTopQuantile.merge: settings differ: {mine} vs {theirs}")
        if other.hist is None:
            return self
        if self.hist is None:
            self.hist = other.hist.clone()
        elif self.hist.numel() != other.hist.numel():
            raise ValueError("SketchTopQuantile.merge: the shards saw different numbers of units")
        else:
            self.hist += other.hist.to(self.hist.device)
        self.seen_values += other.seen_values
        if self.seen_values >= 2**31:
            raise ValueError("SketchTopQuantile counts are int32: more than 2^31 values per unit")
        return self

    def _bin_values(self) -> np.ndarray:
        gamma = math.exp(self.log_gamma)
        reps = 2 * gamma ** np.arange(self.i_min, self.i_max + 1, dtype=np.float64) / (gamma + 1)
        return np.concatenate([-reps[::-1], [0.0], reps])

    def thresholds(self) -> np.ndarray:
        if self.hist is None:
            raise ValueError("no activations seen: run pass 1 (update) before asking for thresholds")
        counts = self.hist.view(-1, self.num_bins).long().cumsum(1).cpu().numpy()
        lo, hi, t = _numpy_linear_position(self.seen_values, 1 - self.quantile)
        reps = self._bin_values()
        bin_lo = np.array([np.searchsorted(row, lo, side="right") for row in counts])
        bin_hi = np.array([np.searchsorted(row, hi, side="right") for row in counts])
        return _numpy_lerp(reps[bin_lo], reps[bin_hi], t)


def _threshold_below(thresholds: np.ndarray, device: torch.device) -> torch.Tensor:
    """Largest float32 <= each float64 threshold: for float32 x, x > t32 exactly when x > t64."""
    t64 = torch.as_tensor(thresholds, dtype=torch.float64)
    t32 = t64.float()
    t32 = torch.where(t32.double() > t64, torch.nextafter(t32, torch.tensor(-math.inf)), t32)
    return t32.to(device)


# ----------------------------------------------------------------------------------------------
# Pass 2: tallies


class _Axis:
    """Bilinear (align_corners=False, edge-clamped) map of n_src pixels onto n_out, split into cells.

    With the source padded by one replicated pixel on each side, output pixel y reads padded
    pixels cell[y] and cell[y] + 1 with weight[y] on the second, so each output pixel lies in
    exactly one of the n_src + 1 cells; `members` lists each cell's output pixels (padded).
    """

    def __init__(self, n_src: int, n_out: int, device: torch.device):
        src = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_src / n_out) - 0.5
        cell = (src.floor().long() + 1).clamp(0, n_src)
        weight = (src - (cell - 1)).clamp(0, 1)
        counts = torch.bincount(cell, minlength=n_src + 1)
        width = max(int(counts.max()), 1)
        start = torch.cumsum(counts, 0) - counts
        offsets = torch.arange(width)
        self.valid = (offsets[None] < counts[:, None]).to(device)
        self.members = torch.where(self.valid, start[:, None] + offsets[None], 0).to(device)
        self.weight = weight.float().to(device)


def mask_areas(masks: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) bool -> (B, C) int64 pixel counts.

    Reads the bools 8 at a time as int64 words (bytes of 0/1) and sums each word's bytes with one
    multiply (x * 0x0101...01 >> 56), several times faster than `sum` over bools on the CPU.
    """
    b, c = masks.shape[:2]
    flat = masks.reshape(b, c, -1)
    pad = -flat.shape[-1] % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(b, c, pad)], dim=-1)
    words = flat.contiguous().view(torch.int64)
    return ((words * 0x0101010101010101) >> 56).sum(-1)


class LayerDissector:
    """Streaming NetDissect + HND state for one layer, fed with activations (no model needed).

    Pass 1: `update_quantiles(acts)` over the dictionary, then `compute_thresholds()`.
    Pass 2: `update_counts(acts, masks, labelled, global_labels, index)` over the same dictionary,
    then `result()`.
    """

    def __init__(self, concepts: Sequence[str], concept_regions: Sequence[str] | Mapping[str, str],
                 global_groups: Mapping[str, Sequence[str]] | None = None, config: DissectionConfig | None = None,
                 num_images: int | None = None, layer: str = ""):
        self.config = config or DissectionConfig()
        self.layer = layer
        self.concepts = list(concepts)
        self.concept_regions = _regions_list(self.concepts, concept_regions)
        self.global_groups = {k: list(v) for k, v in (global_groups or {}).items()}
        if self.config.quantile_method == "exact":
            if num_images is None:
                raise ValueError("quantile_method='exact' needs num_images (the dictionary size) to size its top-k "
                                 "buffer; pass num_images or use DissectionConfig(quantile_method='sketch')")
            self.quantiles: ExactTopQuantile | SketchTopQuantile = ExactTopQuantile(num_images, self.config.quantile)
        else:
            c = self.config
            self.quantiles = SketchTopQuantile(c.quantile, c.sketch_relative_error, c.sketch_min_magnitude,
                                               c.sketch_max_magnitude)
        self.thresholds: np.ndarray | None = None
        self._t32: torch.Tensor | None = None
        self._axes: dict[tuple[int, int, int, int], tuple[_Axis, _Axis]] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._max: list[torch.Tensor] = []
        self._presence: list[torch.Tensor] = []
        self._labels: dict[str, list[torch.Tensor]] = {g: [] for g in self.global_groups}
        self._index: list[torch.Tensor] = []
        self._seen = 0

    # pass 1
    def update_quantiles(self, activations: torch.Tensor) -> None:
        if self.thresholds is not None:
            raise ValueError("thresholds are already computed: pass 1 is over")
        self.quantiles.update(activations)

    def compute_thresholds(self) -> np.ndarray:
        self.thresholds = self.quantiles.thresholds()
        self.quantiles = None  # frees the top-k buffer / histogram before pass 2
        return self.thresholds

    # pass 2
    def update_counts(self, activations: torch.Tensor, masks: torch.Tensor | None = None,
                      labelled: torch.Tensor | None = None, global_labels: Mapping[str, torch.Tensor] | None = None,
                      index: torch.Tensor | None = None, mask_index: Any = None) -> None:
        """Add one batch: masks (B, C, H, W) bool or None (a global-only batch), labelled (B, C) bool
        (default: all True when masks are given), global_labels {group: (B,) int, -1 unknown}.
        `mask_index`: the batch's `index_masks(masks, labelled)`, shared between layers (optional)."""
        if self.thresholds is None:
            raise ValueError("call compute_thresholds() after pass 1 before update_counts()")
        acts = _as_maps(activations, check_finite=False)
        peaks = acts.flatten(2).amax(-1)  # NaN and +inf show here; -inf never fires (pass 1 rejects it)
        _require_finite(peaks)
        device = acts.device
        b, u, h, w = acts.shape
        if u != len(self.thresholds):
            raise ValueError(f"layer {self.layer!r}: {u} units in pass 2 but {len(self.thresholds)} in pass 1")
        if self._t32 is None or self._t32.device != device:
            self._t32 = _threshold_below(self.thresholds, device)
        if masks is not None:
            if masks.shape[:1] != (b,):
                raise ValueError(f"masks must be (B={b}, C, H, W), got {tuple(masks.shape)}")
            masks, labelled = self._checked_masks(masks, labelled, device)
            presence = self._tally(acts, peaks, masks, labelled, mask_index) > 0
        else:
            presence = torch.zeros(b, len(self.concepts), dtype=torch.bool, device=device)
        self._max.append(peaks.cpu())
        self._presence.append(presence.cpu())
        global_labels = global_labels or {}
        for group, names in self.global_groups.items():
            lab = global_labels.get(group)
            lab = torch.full((b,), -1, dtype=torch.long) if lab is None else torch.as_tensor(lab).long().cpu()
            if lab.shape != (b,) or bool((lab >= len(names)).any()):
                raise ValueError(f"global labels {group!r} must be (B,) in -1..{len(names) - 1} ({names}), got "
                                 f"{lab.tolist()}")
            self._labels[group].append(lab)
        idx = torch.arange(self._seen, self._seen + b) if index is None else torch.as_tensor(index).long().cpu()
        self._index.append(idx)
        self._seen += b

    def _checked_masks(self, masks: torch.Tensor, labelled: torch.Tensor | None, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        b, c = masks.shape[0], len(self.concepts)
        if masks.ndim != 4 or masks.shape[1] != c:
            raise ValueError(f"masks must be (B={b}, C={c}, H, W) for concepts {self.concepts}, got "
                             f"{tuple(masks.shape)}")
        masks = masks.to(device=device, dtype=torch.bool)
        labelled = (torch.ones(b, c, dtype=torch.bool, device=device) if labelled is None
                    else labelled.to(device=device, dtype=torch.bool))
        if labelled.shape != (b, c):
            raise ValueError(f"labelled must be (B={b}, C={c}), got {tuple(labelled.shape)}")
        return masks, labelled

    def _tally_method(self, device: torch.device) -> str:
        method = self.config.tally
        if method == "auto":
            method = "dense" if device.type == "cuda" else "compiled" if dissection_kernel else "sparse"
        if method == "compiled" and dissection_kernel is None:
            raise ValueError("DissectionConfig.tally='compiled' needs numba (pip install numba)")
        return method

    def index_masks(self, masks: torch.Tensor, labelled: torch.Tensor | None, device: torch.device) -> Any:
        """The masks' per-pixel concept-set index for the compiled tally (None for the other tallies), to
        pass as `mask_index` to this and the other layers' `update_counts` on the same batch."""
        if self._tally_method(device) != "compiled":
            return None
        masks, labelled = self._checked_masks(masks, labelled, device)
        return dissection_kernel.mask_index(masks.cpu().numpy(), labelled.cpu().numpy())

    def _tally(self, acts: torch.Tensor, peaks: torch.Tensor, masks: torch.Tensor, labelled: torch.Tensor,
               mask_index: Any = None) -> torch.Tensor:
        """Add one batch to the running counts; returns the labelled mask areas (B, C)."""
        u, c = acts.shape[1], masks.shape[1]
        if not self._counts:
            self._counts = {k: torch.zeros((u, c) if k != "mask_area" else (c,), dtype=torch.int64, device=acts.device)
                            for k in ("intersection", "area_labelled", "mask_area", "mask_area_fires")}
        method = self._tally_method(acts.device)
        if method == "compiled":
            if mask_index is None or mask_index.shape != tuple(masks.shape):
                mask_index = dissection_kernel.mask_index(masks.cpu().numpy(), labelled.cpu().numpy())
            inter, area, mask_area = (torch.from_numpy(x).to(acts.device) for x in dissection_kernel.tally(
                acts.cpu().numpy(), self.thresholds, mask_index, (peaks > self._t32).cpu().numpy()))
        else:
            inter, area = (self._tally_dense if method == "dense" else self._tally_sparse)(acts, masks, labelled)
            mask_area = mask_areas(masks) * labelled
        counts = self._counts
        counts["intersection"] += inter
        counts["mask_area"] += mask_area.sum(0)
        area, fires = area.double(), (area > 0).double()
        counts["area_labelled"] += (area.T @ labelled.double()).round().long()
        counts["mask_area_fires"] += (fires.T @ mask_area.double()).round().long()
        return mask_area

    def _tally_dense(self, acts: torch.Tensor, masks: torch.Tensor, labelled: torch.Tensor):
        """Upsample every map, threshold, and count intersections as one (U, B*HW) x (B*HW, C) product."""
        b, u, _, _ = acts.shape
        size = masks.shape[-2:]
        hw = size[0] * size[1]
        maskpix = (masks & labelled[:, :, None, None]).permute(0, 2, 3, 1).reshape(b * hw, -1).float()
        chunk = max(1, self.config.chunk_elements // (b * hw))
        inter = torch.zeros(u, maskpix.shape[1], dtype=torch.int64, device=acts.device)
        area = torch.zeros(b, u, dtype=torch.int64, device=acts.device)
        for u0 in range(0, u, chunk):
            u1 = min(u, u0 + chunk)
            up = F.interpolate(acts[:, u0:u1], size=size, mode="bilinear", align_corners=False)
            on = (up > self._t32[u0:u1, None, None]).flatten(2)  # (B, Uc, HW)
            area[:, u0:u1] = on.sum(-1)
            # 0/1 products summed over at most B*HW < 2^24 terms are exact in float32
            inter[u0:u1] = (on.transpose(0, 1).reshape(u1 - u0, b * hw).float() @ maskpix).round().long()
        return inter, area

    def _tally_sparse(self, acts: torch.Tensor, masks: torch.Tensor, labelled: torch.Tensor):
        """Evaluate the upsampled map only in cells with a corner above threshold (bilinear values are
        convex combinations of the 4 corners), then gather the masks at the pixels that fire."""
        b, u, h, w = acts.shape
        c, hm, wm = masks.shape[1:]
        maskflat = masks.reshape(b, c, hm * wm)
        device = acts.device
        key = (h, w, hm, wm)
        if key not in self._axes or self._axes[key][0].members.device != device:
            self._axes[key] = (_Axis(h, hm, device), _Axis(w, wm, device))
        ay, ax = self._axes[key]
        padded = F.pad(acts, (1, 1, 1, 1), mode="replicate")
        corner = F.max_pool2d(padded, kernel_size=2, stride=1)  # (B, U, h + 1, w + 1) cells
        cells = (corner > self._t32[None, :, None, None]).nonzero()
        inter = torch.zeros(u, c, dtype=torch.float32, device=device)
        area = torch.zeros(b * u, dtype=torch.int64, device=device)
        block = ay.members.shape[1] * ax.members.shape[1]
        step = max(1, self.config.chunk_elements // (block * c))
        for s in range(0, len(cells), step):
            bi, ui, ci, cj = cells[s:s + step].unbind(1)
            f00, f01 = padded[bi, ui, ci, cj], padded[bi, ui, ci, cj + 1]
            f10, f11 = padded[bi, ui, ci + 1, cj], padded[bi, ui, ci + 1, cj + 1]
            rows, cols = ay.members[ci], ax.members[cj]  # (K, R), (K, Q)
            wy, wx = ay.weight[rows], ax.weight[cols]
            top = torch.lerp(f00[:, None], f01[:, None], wx)
            bottom = torch.lerp(f10[:, None], f11[:, None], wx)
            values = torch.lerp(top[:, None, :], bottom[:, None, :], wy[:, :, None])
            on = values > self._t32[ui][:, None, None]
            on &= ay.valid[ci][:, :, None] & ax.valid[cj][:, None, :]
            k, r, q = on.nonzero().unbind(1)
            image, unit = bi[k], ui[k]
            hit = maskflat[image, :, rows[k, r] * wm + cols[k, q]] & labelled[image]  # (T, C)
            inter.index_add_(0, unit, hit.float())
            area.index_add_(0, image * u + unit, torch.ones_like(unit))
        return inter.round().long(), area.view(b, u)

    # merging shards (e.g. the ranks of a distributed run, each fed a disjoint part of the dictionary)
    def shard_state(self) -> dict[str, Any]:
        """This shard's state of the current pass, on the CPU, for `merge` on another shard: pass 1 the
        quantile buffer or sketch; pass 2 the counts and the per-image rows (maxima, presence, labels, index)."""
        if self.thresholds is None:
            quantiles = copy.copy(self.quantiles)
            for name in ("buffer", "hist"):
                if getattr(quantiles, name, None) is not None:
                    setattr(quantiles, name, getattr(quantiles, name).cpu().clone())
            return {"pass": 1, "quantiles": quantiles}
        rows = self._rows()
        return {"pass": 2, "counts": {k: v.cpu().clone() for k, v in self._counts.items()}, **rows}

    def _rows(self) -> dict[str, Any]:
        def cat(parts: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat(parts) if parts else torch.zeros(shape, dtype=dtype)

        u = 0 if self.thresholds is None else len(self.thresholds)
        return {"max": cat(self._max, (0, u), torch.float32),
                "presence": cat(self._presence, (0, len(self.concepts)), torch.bool),
                "labels": {g: cat(v, (0,), torch.long) for g, v in self._labels.items()},
                "index": cat(self._index, (0,), torch.long)}

    def merge(self, state: Mapping[str, Any]) -> LayerDissector:
        """Fold in another shard's `shard_state()` of the same pass. Pass 1 merges the quantile state, so
        `compute_thresholds` gives the thresholds of the whole dictionary exactly; pass 2 adds the integer
        counts and keeps the per-image rows sorted by image index, so every result (top images, HND ranks)
        equals that of one dissector fed the whole dictionary in index order. Returns self."""
        if state["pass"] == 1:
            if self.thresholds is not None:
                raise ValueError(f"layer {self.layer!r}: a pass-1 state cannot merge after compute_thresholds()")
            self.quantiles.merge(state["quantiles"])
            return self
        if self.thresholds is None:
            raise ValueError(f"layer {self.layer!r}: a pass-2 state needs compute_thresholds() first")
        if state["counts"]:
            if not self._counts:
                self._counts = {k: v.clone().to(self._counts_device(state)) for k, v in state["counts"].items()}
            else:
                for k, v in state["counts"].items():
                    self._counts[k] += v.to(self._counts[k].device)
        mine = self._rows()
        index = torch.cat([mine["index"], state["index"]])
        order = torch.argsort(index, stable=True)
        self._index = [index[order]]
        self._max = [torch.cat([mine["max"], state["max"]])[order]]
        self._presence = [torch.cat([mine["presence"], state["presence"]])[order]]
        self._labels = {g: [torch.cat([mine["labels"][g], state["labels"][g]])[order]] for g in self.global_groups}
        self._seen += len(state["index"])
        return self

    def _counts_device(self, state: Mapping[str, Any]) -> torch.device:
        return self._t32.device if self._t32 is not None else next(iter(state["counts"].values())).device

    # results
    def counts(self) -> dict[str, np.ndarray]:
        """Running tallies: intersection (U, C), area_labelled (U, C), mask_area (C,), mask_area_fires (U, C)."""
        if not self._counts:
            raise ValueError(f"layer {self.layer!r}: no batch with concept masks was seen in pass 2")
        return {k: v.cpu().numpy() for k, v in self._counts.items()}

    def ious(self) -> tuple[np.ndarray, np.ndarray]:
        """(NetDissect IoU, fires-only IoU), each (U, C) float64."""
        t = self.counts()
        union = t["area_labelled"] + t["mask_area"][None] - t["intersection"]
        union_fires = t["area_labelled"] + t["mask_area_fires"] - t["intersection"]
        return _ratio(t["intersection"], union), _ratio(t["intersection"], union_fires)

    def result(self) -> DissectionResult:
        iou, iou_fires = self.ious()
        max_acts = torch.cat(self._max).numpy()
        presence = torch.cat(self._presence).numpy()
        index = torch.cat(self._index).numpy()
        cfg = self.config
        groups = {g: stage1_global_concepts(max_acts, torch.cat(self._labels[g]).numpy(), names, cfg)
                  for g, names in self.global_groups.items()}
        hnd_iou = iou if cfg.hnd_iou == "netdissect" else iou_fires
        regions = stage2_facial_regions(hnd_iou, self.concept_regions, cfg)
        probs, interpretable = stage3_local_concepts(max_acts, presence, hnd_iou, self.concept_regions, regions, cfg)
        k = min(cfg.top_k, len(index))
        top = index[np.argsort(-max_acts, axis=0, kind="stable")[:k].T] if k else np.zeros((len(iou), 0), np.int64)
        return DissectionResult(layer=self.layer, concepts=self.concepts, concept_regions=self.concept_regions,
                                thresholds=self.thresholds, iou=iou, iou_fires_only=iou_fires, global_groups=groups,
                                unit_regions=regions, local_probabilities=probs, local_interpretable=interpretable,
                                top_images=top, num_images=len(index), config=cfg)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = num.astype(np.float64), den.astype(np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _regions_list(concepts: Sequence[str], regions: Sequence[str] | Mapping[str, str]) -> list[str]:
    if isinstance(regions, Mapping):
        missing = [c for c in concepts if c not in regions]
        if missing:
            raise ValueError(f"concept_regions has no region for concept(s) {missing}")
        return [regions[c] for c in concepts]
    regions = list(regions)
    if len(regions) != len(concepts):
        raise ValueError(f"concept_regions lists {len(regions)} regions for {len(concepts)} concepts")
    return regions


# ----------------------------------------------------------------------------------------------
# In-memory entry point


def netdissect_iou(activations: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray,
                   quantile: float = 0.005, *, labelled: torch.Tensor | np.ndarray | None = None,
                   fires_only: bool = False, config: DissectionConfig | None = None, batch_size: int = 64,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds (U,) and IoU (U, C) of activations (N, U, h, w) against bool masks (N, C, H, W).

    Runs the same streaming code as `Dissector` in batches of `batch_size` images, on the
    activations' device. `fires_only` selects the HND union (only images where the unit fires).
    """
    acts = torch.as_tensor(activations)
    masks = torch.as_tensor(masks)
    if acts.shape[0] != masks.shape[0]:
        raise ValueError(f"activations have {acts.shape[0]} images but masks have {masks.shape[0]}")
    lab = None if labelled is None else torch.as_tensor(labelled)
    cfg = config or DissectionConfig()
    cfg = DissectionConfig(**{**asdict(cfg), "quantile": quantile})
    names = [f"concept_{i}" for i in range(masks.shape[1])]
    diss = LayerDissector(names, ["all"] * len(names), config=cfg, num_images=acts.shape[0])
    for s in range(0, acts.shape[0], batch_size):
        diss.update_quantiles(acts[s:s + batch_size])
    thresholds = diss.compute_thresholds()
    for s in range(0, acts.shape[0], batch_size):
        diss.update_counts(acts[s:s + batch_size], masks[s:s + batch_size].to(acts.device),
                           None if lab is None else lab[s:s + batch_size])
    iou, iou_fires = diss.ious()
    return thresholds, (iou_fires if fires_only else iou)


# ----------------------------------------------------------------------------------------------
# HND stages (pure functions of per-image maxima, labels and IoUs)


def concept_scores(max_activations: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """Eqs. 1-2 of seed 002: CS_s = sum over images n in s of rank_n * MS_n, divided by N_s.

    max_activations (N, U) are each map's maximum; min-max normalised per unit (the scale is
    model-specific; the shift keeps scores non-negative). Ranks run 1..N per unit, ties averaged.
    membership (N, S) bool may overlap (stage III). Returns (U, S).
    """
    ms = np.asarray(max_activations, dtype=np.float64)
    member = np.asarray(membership, dtype=np.float64)
    if ms.ndim != 2 or member.ndim != 2 or ms.shape[0] != member.shape[0]:
        raise ValueError(f"max_activations (N, U) and membership (N, S) must share N, got {ms.shape}, {member.shape}")
    if ms.shape[0] == 0:
        return np.zeros((ms.shape[1], member.shape[1]))
    lo, hi = ms.min(0), ms.max(0)
    ms = np.divide(ms - lo, hi - lo, out=np.zeros_like(ms), where=hi > lo)
    ranks = rankdata(ms, axis=0)
    sizes = member.sum(0)
    return np.divide((ranks * ms).T @ member, sizes, out=np.zeros((ms.shape[1], member.shape[1])), where=sizes > 0)


def scores_to_probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows divided by their sums (sum_s P_s = 1); all-zero rows become uniform."""
    total = scores.sum(1, keepdims=True)
    uniform = np.full_like(scores, 1.0 / max(scores.shape[1], 1))
    return np.where(total > 0, scores / np.where(total > 0, total, 1), uniform)


@dataclass
class GlobalConceptResult:
    """Stage I for one group (e.g. gender): probabilities (U, S) and biased (U, S) = P > threshold."""

    subgroups: list[str]
    probabilities: np.ndarray
    biased: np.ndarray
    threshold: float


def stage1_global_concepts(max_activations: np.ndarray, labels: np.ndarray, subgroups: Sequence[str],
                           config: DissectionConfig | None = None) -> GlobalConceptResult:
    """Stage I: rank x max activation scores per subgroup (eqs. 1-2), normalised to probabilities.

    labels (N,) in 0..S-1, -1 for unknown (those images are left out). Biased when P_s exceeds
    `config.bias_threshold(S)` (0.55 for 2-way, 0.3 for 4-way groups).
    """
    cfg = config or DissectionConfig()
    labels = np.asarray(labels)
    s = len(subgroups)
    if s < 2 or bool((labels >= s).any()) or labels.shape != (np.asarray(max_activations).shape[0],):
        raise ValueError(f"labels must be (N,) in -1..{s - 1} for subgroups {list(subgroups)} (S >= 2)")
    keep = labels >= 0
    member = labels[keep, None] == np.arange(s)[None]
    probs = scores_to_probabilities(concept_scores(np.asarray(max_activations)[keep], member))
    threshold = cfg.bias_threshold(s)
    return GlobalConceptResult(list(subgroups), probs, probs > threshold, threshold)


def stage2_facial_regions(iou: np.ndarray, concept_regions: Sequence[str],
                          config: DissectionConfig | None = None) -> list[str | None]:
    """Stage II: each unit's region is that of its top-IoU local concept (None at or below region_min_iou)."""
    cfg = config or DissectionConfig()
    iou = np.asarray(iou)
    if iou.shape[1] != len(concept_regions):
        raise ValueError(f"iou has {iou.shape[1]} concepts but concept_regions lists {len(concept_regions)}")
    best = iou.argmax(1)
    return [concept_regions[c] if iou[u, c] > cfg.region_min_iou else None for u, c in enumerate(best)]


def stage3_local_concepts(max_activations: np.ndarray, presence: np.ndarray, iou: np.ndarray,
                          concept_regions: Sequence[str], unit_regions: Sequence[str | None],
                          config: DissectionConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stage III: within each unit's region, eqs. 1-2 over images showing any of the region's K
    concepts (an image counts for every concept it shows), scaled by IoU (eq. 3), normalised.

    Returns probabilities (U, C) (NaN outside the unit's region) and interpretable (U, C) = P > 1.5/K.
    """
    cfg = config or DissectionConfig()
    ms, presence, iou = np.asarray(max_activations), np.asarray(presence, dtype=bool), np.asarray(iou)
    u, c = iou.shape
    probs = np.full((u, c), np.nan)
    interpretable = np.zeros((u, c), dtype=bool)
    regions = np.asarray(concept_regions, dtype=object)
    for region in sorted({r for r in unit_regions if r is not None}):
        units = np.array([i for i, r in enumerate(unit_regions) if r == region])
        ks = np.flatnonzero(regions == region)
        images = presence[:, ks].any(1)
        scores = concept_scores(ms[images][:, units], presence[images][:, ks]) * iou[np.ix_(units, ks)]
        p = scores_to_probabilities(scores)
        probs[np.ix_(units, ks)] = p
        interpretable[np.ix_(units, ks)] = p > cfg.local_factor / len(ks)
    return probs, interpretable


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class DissectionResult:
    """One layer: NetDissect pairing, HND stages I-III, and the top images of each unit."""

    layer: str
    concepts: list[str]
    concept_regions: list[str]
    thresholds: np.ndarray  # (U,)
    iou: np.ndarray  # (U, C) NetDissect IoU
    iou_fires_only: np.ndarray  # (U, C) HND variant
    global_groups: dict[str, GlobalConceptResult]
    unit_regions: list[str | None]  # stage II
    local_probabilities: np.ndarray  # (U, C), NaN outside the unit's region
    local_interpretable: np.ndarray  # (U, C) bool, stage III
    top_images: np.ndarray  # (U, k) dictionary indices by decreasing max activation
    num_images: int
    config: DissectionConfig = field(default_factory=DissectionConfig)

    @property
    def num_units(self) -> int:
        return len(self.thresholds)

    @property
    def netdissect_concept(self) -> np.ndarray:
        return self.iou.argmax(1)

    @property
    def netdissect_iou(self) -> np.ndarray:
        return self.iou.max(1)

    @property
    def netdissect_interpretable(self) -> np.ndarray:
        return self.netdissect_iou > self.config.iou_threshold

    @property
    def global_biased(self) -> np.ndarray:
        """(U,) bool: biased toward some subgroup of some global group."""
        out = np.zeros(self.num_units, dtype=bool)
        for g in self.global_groups.values():
            out |= g.biased.any(1)
        return out

    @property
    def hnd_interpretable(self) -> np.ndarray:
        """(U,) bool: a local concept (stage III) or a global bias (stage I)."""
        return self.local_interpretable.any(1) | self.global_biased

    def to_dict(self) -> dict[str, Any]:
        units = []
        for u in range(self.num_units):
            c = int(self.netdissect_concept[u])
            ks = np.flatnonzero(~np.isnan(self.local_probabilities[u]))
            units.append({
                "unit": u,
                "threshold": float(self.thresholds[u]),
                "netdissect": {"concept": self.concepts[c], "iou": float(self.iou[u, c]),
                               "interpretable": bool(self.netdissect_interpretable[u])},
                "hnd": {
                    "region": self.unit_regions[u],
                    "concepts": [{"concept": self.concepts[k], "probability": float(self.local_probabilities[u, k]),
                                  "iou": float(self.iou[u, k] if self.config.hnd_iou == "netdissect"
                                               else self.iou_fires_only[u, k]),
                                  "interpretable": bool(self.local_interpretable[u, k])} for k in ks],
                    "global": {g: {"probabilities": dict(zip(r.subgroups, map(float, r.probabilities[u]))),
                                   "biased": [s for s, b in zip(r.subgroups, r.biased[u]) if b]}
                               for g, r in self.global_groups.items()},
                },
                "top_images": [int(i) for i in self.top_images[u]],
            })
        return {
            "layer": self.layer, "num_units": self.num_units, "num_images": self.num_images,
            "config": asdict(self.config), "concepts": self.concepts, "concept_regions": self.concept_regions,
            "summary": {"netdissect_interpretable": int(self.netdissect_interpretable.sum()),
                        "hnd_interpretable": int(self.hnd_interpretable.sum()),
                        "hnd_local_interpretable": int(self.local_interpretable.any(1).sum()),
                        "global_biased": int(self.global_biased.sum())},
            "units": units,
            "matrices": {"iou": self.iou.tolist(), "iou_fires_only": self.iou_fires_only.tolist(),
                         "global": {g: {"subgroups": r.subgroups, "probabilities": r.probabilities.tolist(),
                                        "threshold": r.threshold} for g, r in self.global_groups.items()}},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DissectionResult:
        """Rebuild a result from `to_dict()` output (e.g. a dissection.json), for reports."""
        cfg = DissectionConfig(**d["config"])
        concepts, units = list(d["concepts"]), d["units"]
        u, c = len(units), len(concepts)
        probs, interp = np.full((u, c), np.nan), np.zeros((u, c), dtype=bool)
        index = {name: i for i, name in enumerate(concepts)}
        for i, unit in enumerate(units):
            for entry in unit["hnd"]["concepts"]:
                probs[i, index[entry["concept"]]] = entry["probability"]
                interp[i, index[entry["concept"]]] = entry["interpretable"]
        groups = {}
        for g, m in d["matrices"]["global"].items():
            p = np.asarray(m["probabilities"], dtype=np.float64).reshape(u, len(m["subgroups"]))
            groups[g] = GlobalConceptResult(list(m["subgroups"]), p, p > m["threshold"], float(m["threshold"]))
        return cls(layer=d["layer"], concepts=concepts, concept_regions=list(d["concept_regions"]),
                   thresholds=np.array([x["threshold"] for x in units]),
                   iou=np.asarray(d["matrices"]["iou"], dtype=np.float64).reshape(u, c),
                   iou_fires_only=np.asarray(d["matrices"]["iou_fires_only"], dtype=np.float64).reshape(u, c),
                   global_groups=groups, unit_regions=[x["hnd"]["region"] for x in units],
                   local_probabilities=probs, local_interpretable=interp,
                   top_images=np.array([x["top_images"] for x in units], dtype=np.int64).reshape(u, -1),
                   num_images=int(d["num_images"]), config=cfg)

    def to_table(self) -> dict[str, list]:
        """One row per unit, as `wandb.Table(**result.to_table())` takes it."""
        columns = ["layer", "unit", "netdissect_concept", "netdissect_iou", "netdissect_interpretable",
                   "hnd_region", "hnd_concepts", "global_biases"]
        rows = []
        for u in range(self.num_units):
            c = int(self.netdissect_concept[u])
            local = [f"{self.concepts[k]}:{self.local_probabilities[u, k]:.3f}"
                     for k in np.flatnonzero(self.local_interpretable[u])]
            biases = [f"{g}={s}:{r.probabilities[u, j]:.3f}" for g, r in self.global_groups.items()
                      for j, s in enumerate(r.subgroups) if r.biased[u, j]]
            rows.append([self.layer, u, self.concepts[c], float(self.iou[u, c]), bool(self.netdissect_interpretable[u]),
                         self.unit_regions[u] or "", ", ".join(local), ", ".join(biases)])
        return {"columns": columns, "data": rows}


# ----------------------------------------------------------------------------------------------
# Model-level streaming


class Dissector:
    """Dissect named layers of a model over dictionary batches, in two passes.

    Batches are dicts: `image` (B, 3, H, W); `concept_masks` (B, C, H', W') bool in `concepts`
    order (absent for global-only batches); optional `concept_labelled` (B, C) bool; one (B,) int
    entry per global group (-1 unknown); optional `index` (B,). Feed the whole dictionary to
    `update` once, call `start_counting()`, feed it again, then take `results()`.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], concepts: Sequence[str],
                 concept_regions: Sequence[str] | Mapping[str, str],
                 global_groups: Mapping[str, Sequence[str]] | None = None, config: DissectionConfig | None = None,
                 num_images: int | None = None, device: torch.device | str | None = None,
                 mask_key: str = "concept_masks", labelled_key: str = "concept_labelled", image_key: str = "image"):
        if not layers:
            raise ValueError("Dissector needs at least one layer name")
        for name in layers:
            resolve_layer(model, name)
        self.model, self.layers = model, list(layers)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.mask_key, self.labelled_key, self.image_key = mask_key, labelled_key, image_key
        self.layer_dissectors = {name: LayerDissector(concepts, concept_regions, global_groups, config, num_images,
                                                      layer=name) for name in self.layers}
        self.counting = False

    @torch.no_grad()
    def activations(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self.image_key not in batch:
            raise ValueError(f"batch has no {self.image_key!r} key (keys: {sorted(batch)})")
        with capture(self.model, self.layers) as store:
            self.model(batch[self.image_key].to(self.device))
        return dict(store)

    def update(self, batch: Mapping[str, Any]) -> None:
        acts = self.activations(batch)
        masks, labelled = batch.get(self.mask_key), batch.get(self.labelled_key)
        mask_index = None  # the batch's masks indexed once for every layer (compiled tally)
        for name, diss in self.layer_dissectors.items():
            if not self.counting:
                diss.update_quantiles(acts[name])
                continue
            if mask_index is None and masks is not None:
                mask_index = diss.index_masks(masks, labelled, acts[name].device)
            diss.update_counts(acts[name], masks, labelled, {g: batch[g] for g in diss.global_groups if g in batch},
                               batch.get("index"), mask_index)

    def start_counting(self) -> dict[str, np.ndarray]:
        """End pass 1: per-layer thresholds (U,)."""
        self.counting = True
        return {name: d.compute_thresholds() for name, d in self.layer_dissectors.items()}

    def results(self) -> dict[str, DissectionResult]:
        return {name: d.result() for name, d in self.layer_dissectors.items()}


def dissect(model: nn.Module, loader: Iterable[Mapping[str, Any]], layers: Sequence[str], concepts: Sequence[str],
            concept_regions: Sequence[str] | Mapping[str, str],
            global_groups: Mapping[str, Sequence[str]] | None = None, config: DissectionConfig | None = None,
            device: torch.device | str | None = None, num_images: int | None = None,
            progress: bool = True) -> dict[str, DissectionResult]:
    """Both passes over `loader` (iterated twice, same order not required) with a tqdm bar."""
    from tqdm.auto import tqdm

    if num_images is None and hasattr(loader, "dataset"):
        num_images = len(loader.dataset)
    was_training = model.training
    model.eval()
    try:
        diss = Dissector(model, layers, concepts, concept_regions, global_groups, config, num_images, device)
        for desc in ("dissection pass 1/2 (thresholds)", "dissection pass 2/2 (counts)"):
            for batch in tqdm(loader, desc=desc, disable=not progress):
                diss.update(batch)
            if not diss.counting:
                diss.start_counting()
        return diss.results()
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# Reports (plots are functions of results; they return matplotlib Figures)


def plot_concept_histogram(result: DissectionResult) -> Figure:
    """Fig. 10: interpretable units per concept, HND (local bars split by global overlap, then global
    subgroups) beside NetDissect's top-concept counts."""
    fig = Figure(figsize=(max(8, 0.3 * len(result.concepts) + 4), 7), layout="constrained")
    ax_hnd, ax_nd = fig.subplots(2, 1)
    local = result.local_interpretable
    both = (local & result.global_biased[:, None]).sum(0)
    only = local.sum(0) - both
    names = list(result.concepts)
    x = np.arange(len(names))
    ax_hnd.bar(x, only, color="tab:red", label="local only")
    ax_hnd.bar(x, both, bottom=only, color="tab:purple", label="local + global")
    gx = len(names)
    for g, r in result.global_groups.items():
        counts = r.biased.sum(0)
        ax_hnd.bar(np.arange(gx, gx + len(counts)), counts, color="tab:blue")
        names += [f"{g}:{s}" for s in r.subgroups]
        gx += len(counts)
    ax_hnd.set_xticks(np.arange(len(names)), names, rotation=90, fontsize=7)
    ax_hnd.set_ylabel("units")
    ax_hnd.set_title(f"{result.layer}: Hierarchical Network Dissection")
    ax_hnd.legend(fontsize=7)
    nd = np.bincount(result.netdissect_concept[result.netdissect_interpretable], minlength=len(result.concepts))
    ax_nd.bar(x, nd, color="tab:gray")
    ax_nd.set_xticks(x, result.concepts, rotation=90, fontsize=7)
    ax_nd.set_ylabel("units")
    ax_nd.set_title(f"{result.layer}: Network Dissection (IoU > {result.config.iou_threshold})")
    return fig


def _paired_bars(labels: Sequence[str], first, second, names: tuple[str, str]):
    """HND next to NetDissect, one pair of bars per label."""
    fig = Figure(figsize=(max(6, 0.8 * len(labels)), 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(labels))
    ax.bar(x - 0.2, first, 0.4, label=names[0])
    ax.bar(x + 0.2, second, 0.4, label=names[1])
    ax.set_xticks(x, labels, rotation=45)
    return fig, ax


def plot_region_counts(result: DissectionResult) -> Figure:
    """Fig. 9: units per facial part, by stage II (HND) and by NetDissect's top concept."""
    regions = list(dict.fromkeys(result.concept_regions))
    hnd = [sum(r == reg and result.local_interpretable[u].any() for u, r in enumerate(result.unit_regions))
           for reg in regions]
    nd_regions = [result.concept_regions[c] for c in result.netdissect_concept[result.netdissect_interpretable]]
    nd = [nd_regions.count(reg) for reg in regions]
    fig, ax = _paired_bars(regions, hnd, nd, ("HND", "NetDissect"))
    ax.set_ylabel("units")
    ax.set_title(f"{result.layer}: units per facial part")
    ax.legend()
    return fig


def plot_coverage(results: Mapping[str, DissectionResult], percent: bool = True) -> Figure:
    """Figs. 12-13: interpretable units per layer for HND and NetDissect."""
    layers = list(results)
    scale = [100.0 / results[n].num_units if percent else 1.0 for n in layers]
    hnd = [results[n].hnd_interpretable.sum() * s for n, s in zip(layers, scale)]
    nd = [results[n].netdissect_interpretable.sum() * s for n, s in zip(layers, scale)]
    fig, ax = _paired_bars(layers, hnd, nd, ("Hierarchical Network Dissection", "Network Dissection"))
    ax.set_ylabel("% interpretable units" if percent else "interpretable units")
    ax.legend()
    return fig


def plot_unit_probabilities(results: Mapping[str, DissectionResult], group: str) -> Figure:
    """Fig. 7: each subgroup's probability per unit, units sorted by the first subgroup's probability."""
    fig = Figure(figsize=(4 * len(results), 3.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(results)))
    for ax, (name, res) in zip(axes, results.items()):
        if group not in res.global_groups:
            raise ValueError(f"result {name!r} has no global group {group!r} (has {sorted(res.global_groups)})")
        r = res.global_groups[group]
        order = np.argsort(-r.probabilities[:, 0], kind="stable")
        for j, s in enumerate(r.subgroups):
            ax.plot(r.probabilities[order, j], label=s)
        ax.axhline(r.threshold, color="k", lw=0.8, ls="--")
        ax.set_title(name)
        ax.set_xlabel("unit (sorted)")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("probability")
    axes[0].legend()
    return fig


def plot_biased_counts(results: Mapping[str, Mapping[str, DissectionResult]], group: str) -> Figure:
    """Fig. 8: biased units for a global group per layer, across models (e.g. bias levels P = 50..100)."""
    models = list(results)
    layers = list(dict.fromkeys(layer for m in models for layer in results[m]))
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for layer in layers:
        counts = [int(results[m][layer].global_groups[group].biased.any(1).sum()) if layer in results[m] else np.nan
                  for m in models]
        ax.plot(models, counts, marker="o", label=layer)
    ax.set_xlabel("model")
    ax.set_ylabel(f"units biased in {group}")
    ax.legend()
    return fig


def plot_top_images(images: torch.Tensor | np.ndarray, maps: torch.Tensor | np.ndarray, threshold: float,
                    title: str = "", titles: Sequence[str] | None = None) -> Figure:
    """A unit's top images (k, 3, H, W) in [0, 1] with its maps (k, h, w), upsampled bilinearly as in
    the dissection, overlaid where they exceed the unit's threshold."""
    images = torch.as_tensor(images).float()
    maps = torch.as_tensor(maps).float()
    if images.ndim != 4 or maps.ndim != 3 or images.shape[0] != maps.shape[0]:
        raise ValueError(f"images must be (k, 3, H, W) and maps (k, h, w), got {tuple(images.shape)}, "
                         f"{tuple(maps.shape)}")
    up = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    on = (up > threshold).cpu().numpy()
    k = images.shape[0]
    fig = Figure(figsize=(2 * k, 2.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, k))
    for i, ax in enumerate(axes):
        ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        overlay = np.zeros(on[i].shape + (4,))
        overlay[on[i]] = (1.0, 0.2, 0.0, 0.45)
        ax.imshow(overlay)
        if on[i].any():
            ax.contour(on[i].astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
