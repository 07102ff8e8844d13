"""Seed 004's Grad-CAM figures as functions of `AMRResult`s: AMR bars (Figs 5.4-5.6), KL bars (Fig 5.7) and
average-map grids (Figs 5.8-5.10). Attributes are ordered by increasing class imbalance, as in the seed."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from analysis.amr import GROUPS, AMRResult
from facelens.attributes import CELEBA_POSITIVE_RATE

GROUP_LABELS = {"overall": "overall", "gt_pos": "present", "gt_neg": "absent", "pred_correct": "correct",
                "pred_incorrect": "incorrect"}
# One colour per model (seed 004: AFFACT-b blue, AFFACT-ub red); the second group of a pair is lighter.
MODEL_COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:orange")


def imbalance_order(attributes: Sequence[str]) -> list[str]:
    """Attributes sorted by increasing class imbalance |p - 0.5| (CelebA base rates), ties by name."""
    return sorted(attributes, key=lambda n: (abs(CELEBA_POSITIVE_RATE[n] - 0.5), n))


def _check_groups(groups: Sequence[str], fn: str) -> None:
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        raise ValueError(f"{fn}: groups must be a non-empty subset of {GROUPS}, got {list(groups)}")


def _common_attributes(results: Mapping[str, AMRResult], fn: str) -> list[str]:
    if not results:
        raise ValueError(f"{fn}: no results to plot")
    first = next(iter(results.values())).attributes
    common = [n for n in first if all(n in r.attributes for r in results.values())]
    if not common:
        raise ValueError(f"{fn}: the results share no attribute")
    return imbalance_order(common)


def plot_amr_bars(results: Mapping[str, AMRResult], groups: Sequence[str] = ("pred_correct", "pred_incorrect"),
                  variant: str = "amr", title: str | None = None) -> Figure:
    """Mean AMR per attribute, one bar per (model, group): Fig 5.4 (pred_correct / pred_incorrect), Fig 5.5
    (gt_pos / gt_neg), Fig 5.6 (overall). Empty groups (no images) leave a gap."""
    _check_groups(groups, "plot_amr_bars")
    names = _common_attributes(results, "plot_amr_bars")
    n_bars = len(results) * len(groups)
    width = 0.8 / n_bars
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) * max(1, n_bars / 2)), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    k = 0
    for m, (label, result) in enumerate(results.items()):
        colour = MODEL_COLOURS[m % len(MODEL_COLOURS)]
        for j, group in enumerate(groups):
            g = result.group_index(group)
            values = [result.scores[variant][g, result.attributes.index(n)] for n in names]
            ax.bar(x + (k - (n_bars - 1) / 2) * width, np.nan_to_num(values, nan=0.0), width, color=colour,
                   alpha=1.0 if j == 0 else 0.45, label=f"{label} {GROUP_LABELS[group]}")
            k += 1
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel(variant.upper() if variant == "amr" else variant)
    ax.set_ylim(0, 1)
    ax.set_title(title or f"{variant} by {' vs '.join(GROUP_LABELS[g] for g in groups)} (by class imbalance)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_kl_bars(series: Mapping[str, Mapping[str, float | None]], title: str | None = None) -> Figure:
    """Fig 5.7: per attribute KL distance, one bar per series (e.g. base vs compare overall, the compared
    model's correct vs incorrect, its present vs absent)."""
    if not series:
        raise ValueError("plot_kl_bars: no series to plot")
    names = imbalance_order(set.intersection(*(set(s) for s in series.values())))
    if not names:
        raise ValueError("plot_kl_bars: the series share no attribute")
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) * max(1, len(series) / 2)), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    colours = ("tab:blue", "tab:red", "tab:green", "tab:orange")
    for k, (label, values) in enumerate(series.items()):
        heights = [np.nan if values[n] is None else values[n] for n in names]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, np.nan_to_num(heights, nan=0.0), width,
               color=colours[k % len(colours)], label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("KL distance")
    ax.set_title(title or "KL distance of average Grad-CAMs (by class imbalance)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_map_grid(results: Mapping[str, AMRResult], groups: Sequence[str] = ("gt_pos", "gt_neg"),
                  size: int | None = None, title: str | None = None) -> Figure:
    """Average Grad-CAM per attribute (columns) for each (model, group) (rows): Fig 5.8 (pred_correct /
    pred_incorrect), Fig 5.9 (gt_pos / gt_neg), Fig 5.10 (overall, two models). Maps are shown on one colour
    scale [0, 1] (they are averages of min-max normalised maps); empty groups are blank."""
    _check_groups(groups, "plot_map_grid")
    names = _common_attributes(results, "plot_map_grid")
    rows = [(label, result, group) for label, result in results.items() for group in groups]
    fig = Figure(figsize=(1.1 * len(names) + 1.2, 1.15 * len(rows) + 0.6))
    for r, (label, result, group) in enumerate(rows):
        maps = result.group_maps(group, size)
        counts = result.counts[result.group_index(group)]
        for c, name in enumerate(names):
            i = result.attributes.index(name)
            ax = fig.add_subplot(len(rows), len(names), r * len(names) + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if counts[i] > 0:
                ax.imshow(maps[i], cmap="jet", vmin=0, vmax=1, interpolation="bilinear")
            if r == 0:
                ax.set_title(name.replace("_", " "), fontsize=6)
            if c == 0:
                ax.set_ylabel(f"{label}\n{GROUP_LABELS[group]}", fontsize=6)
            ax.set_xlabel(f"n={int(counts[i])}", fontsize=5, labelpad=1)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig
