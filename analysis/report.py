"""Offline comparison report over runs: `python analyze.py report --runs DIR... --out DIR [--wandb]`.

Reads what training wrote into each run folder (`summary.json`, `config.yaml`, `analysis/<name>/epochNNN.json`
and `history.json`, the offline W&B run for metrics over epochs) and writes ONE self-contained `report.html`
with PNG figures beside it (no scripts, fonts or styles from elsewhere): seed 002's eyeglasses and grayscale
figures (Figs. 5-8), bias-conflicting accuracy and AMR per P, seed 004's Table 5.1 and Figs. 5.4-5.7, probing
depth curves (trained vs random-init), every analysis' headline numbers over training checkpoints, and a
findings section that checks the issue's claims with numbers, saying plainly where one does not hold.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure

from analysis.amr import GROUPS, VARIANTS, AMRResult
from analysis.dissection import DissectionResult
from analysis.probing import ProbingResult
from facelens.attributes import CELEBA_POSITIVE_RATE

EYE_CONCEPTS = ("Eyeglasses", "drawn_eyeglasses")
EPOCH_FILE = re.compile(r"^epoch(\d+)\.json$")
EPOCH_METRICS = ("val/bias/", "val/error/", "val/balanced_accuracy/", "val/mean_")


# --------------------------------------------------------------------------------------------------
# Reading run folders
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one training run left in its folder, parsed into the analysis result classes."""

    label: str
    path: Path
    experiment: str | None = None
    p: int | None = None
    variant: str | None = None
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    dissection: dict[int, dict[str, DissectionResult]] = field(default_factory=dict)
    probing: dict[int, ProbingResult] = field(default_factory=dict)
    probing_offline: ProbingResult | None = None
    probing_random: ProbingResult | None = None
    amr: dict[int, AMRResult] = field(default_factory=dict)
    histories: dict[str, list[dict]] = field(default_factory=dict)
    metrics_over_epochs: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def last(self, kind: str):
        data = getattr(self, kind)
        return data[max(data)] if data else None

    def metric(self, key: str) -> float | None:
        value = (self.summary.get("metrics") or {}).get(key)
        return float(value) if value is not None else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read JSON ({err})") from None


def amr_from_files(json_path: Path) -> AMRResult:
    """An AMRResult from the gradcam_amr JSON (flat or `AMRResult.to_dict()` shape) and, when present, the NPZ
    beside it (which also carries the average maps needed for KL distances)."""
    npz = json_path.with_suffix(".npz")
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as a:
            scores = {v: a[f"score_{v}"] for v in VARIANTS if f"score_{v}" in a}
            return AMRResult([str(n) for n in a["attributes"]], a["error_rate"], a["counts"], scores,
                             a["average_maps"])
    d = _read_json(json_path)
    if "attribute_names" in d:
        names, per = list(d["attribute_names"]), {n: d[n] for n in d["attribute_names"]}
    elif isinstance(d.get("attributes"), dict):
        names, per = list(d["attributes"]), d["attributes"]
    else:
        raise ValueError(f"{json_path}: not a gradcam_amr result (no attribute_names / attributes)")

    def num(x):
        return np.nan if x is None else float(x)

    err = np.array([num(per[n]["error_rate"]) for n in names])
    counts = np.array([[per[n]["count"][g] for n in names] for g in GROUPS], dtype=np.float64)
    scores = {v: np.array([[num(per[n][v][g]) for n in names] for g in GROUPS]) for v in VARIANTS if v in per[names[0]]}
    maps = np.full((len(GROUPS), len(names), 1, 1), np.nan)
    return AMRResult(names, err, counts, scores, maps, float(d.get("threshold", 0.0)))


def _epochs(folder: Path) -> dict[int, Path]:
    out = {}
    for path in folder.glob("epoch*.json"):
        m = EPOCH_FILE.match(path.name)
        if m:
            out[int(m.group(1))] = path
    return dict(sorted(out.items()))


def _label_from_config(config: dict, path: Path) -> tuple[str, str | None, int | None, str | None]:
    data = (config.get("data") or {}).get("init_args") or {}
    model = (config.get("model") or {}).get("init_args") or {}
    if "bias" in data and "p" in data:
        return f"{data['bias']}_P{data['p']}", str(data["bias"]), int(data["p"]), None
    loss = model.get("loss")
    if loss in ("balanced", "unbalanced") and model.get("attributes") is None:
        return f"affact_{loss}", "affact", None, loss
    return path.name, None, None, None


def load_run(path: str | Path, label: str | None = None, p: int | None = None, variant: str | None = None,
             experiment: str | None = None) -> Run:
    """Parse one run folder (`runs/<id>`): any of its files may be missing; what is there is read."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--runs: {path} is not a folder")
    config = {}
    if (path / "config.yaml").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    auto = _label_from_config(config, path)
    run = Run(label=label or auto[0], path=path, experiment=experiment or auto[1],
              p=p if p is not None else auto[2], variant=variant or auto[3], config=config)
    if (path / "summary.json").is_file():
        run.summary = _read_json(path / "summary.json")
    analysis = path / "analysis"
    for epoch, f in _epochs(analysis / "dissection").items():
        run.dissection[epoch] = {n: DissectionResult.from_dict(d) for n, d in _read_json(f)["layers"].items()}
    for epoch, f in _epochs(analysis / "probing").items():
        run.probing[epoch] = ProbingResult.from_dict(_read_json(f))
    for epoch, f in _epochs(analysis / "gradcam_amr").items():
        run.amr[epoch] = amr_from_files(f)
    offline = analysis / "probing_random_init"
    if (offline / "probing_random_init.json").is_file():
        run.probing_random = ProbingResult.from_dict(_read_json(offline / "probing_random_init.json"))
        if (offline / "probing.json").is_file():
            run.probing_offline = ProbingResult.from_dict(_read_json(offline / "probing.json"))
    for hist in sorted(analysis.glob("*/history.json")):
        run.histories[hist.parent.name] = _read_json(hist)
    run.metrics_over_epochs = _wandb_metrics(run.summary.get("wandb_run"))
    return run


def _wandb_metrics(wandb_dir: str | None) -> dict[str, list[tuple[int, float]]]:
    """Validation metrics per epoch (bias groups, per-attribute error and balanced accuracy) from the run's offline
    W&B file (empty when unavailable)."""
    if not wandb_dir or not Path(wandb_dir).is_dir():
        return {}
    from facelens.wandb_io import read_offline_run, run_folders

    folder = Path(wandb_dir)
    try:  # every folder of the run id: the first process's and one per resume, merged by step
        history = read_offline_run(run_folders(folder.parent, folder.name.rsplit("-", 1)[-1]) or [folder]).history
    except Exception:  # an unreadable or foreign W&B file only costs the curves over epochs
        return {}
    out: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for key, value in row.items():
            if key.startswith(EPOCH_METRICS) and isinstance(value, (int, float)) and "epoch" in row:
                out.setdefault(key, []).append((int(row["epoch"]), float(value)))
    return out


def load_runs(paths: Sequence[str | Path]) -> tuple[list[Run], dict]:
    """Run folders, or sweep folders (with runs.json), in the given order; returns the runs and sweep info."""
    from experiments import read_manifest

    runs, sweeps, origin = [], {}, []
    for p in paths:
        p = Path(p)
        if (p / "runs.json").is_file():
            manifest = read_manifest(p)
            sweep_id = manifest.get("sweep_id", p.name)
            sweeps[sweep_id] = manifest
            for r in manifest["runs"]:
                if r.get("run_dir") and Path(r["run_dir"]).is_dir():
                    runs.append(load_run(r["run_dir"], r["name"], r.get("p"), r.get("variant"), r.get("experiment")))
                    origin.append(sweep_id)
                else:
                    print(f"report: {r['name']} of sweep {p} has no finished run folder under {r['root']}; skipped")
        else:
            runs.append(load_run(p))
            origin.append(p.name)
    if not runs:
        raise ValueError(f"--runs: no run folders found in {[str(p) for p in paths]}")
    labels = [r.label for r in runs]
    for run, where in zip(runs, origin):
        if labels.count(run.label) > 1:  # the same run name in several sweeps: keep the curves apart
            run.label = f"{where}/{run.label}"
    return runs, sweeps


# --------------------------------------------------------------------------------------------------
# Numbers the figures and findings share
# --------------------------------------------------------------------------------------------------


def region_units(result: DissectionResult) -> dict[str, int]:
    """Units per facial region (HND stage II region with a stage III interpretable concept), seed 002 Fig. 6."""
    local = result.local_interpretable.any(1)
    return {region: sum(1 for u, reg in enumerate(result.unit_regions) if reg == region and local[u])
            for region in dict.fromkeys(result.concept_regions)}


def eyeglasses_units(result: DissectionResult) -> int:
    """Units interpretable for an eyeglasses concept: HND stage III, or NetDissect's top concept."""
    idx = [result.concepts.index(c) for c in EYE_CONCEPTS if c in result.concepts]
    if not idx:
        return 0
    hnd = result.local_interpretable[:, idx].any(1)
    nd = np.isin(result.netdissect_concept, idx) & result.netdissect_interpretable
    return int((hnd | nd).sum())


def biased_units(result: DissectionResult, group: str) -> int | None:
    g = result.global_groups.get(group)
    return None if g is None else int(g.biased.any(1).sum())


def imbalanced_attributes(attributes: Sequence[str]) -> list[str]:
    """The more imbalanced half of `attributes` by CelebA base rate (|rate - 0.5|, ties by name)."""
    known = [a for a in attributes if a in CELEBA_POSITIVE_RATE]
    ordered = sorted(known, key=lambda a: (-abs(CELEBA_POSITIVE_RATE[a] - 0.5), a))
    return ordered[:max(1, len(ordered) // 2)] if ordered else []


def mean_probe_accuracy(result: ProbingResult, layer: str | None = None) -> float:
    """Mean layer-probe accuracy over attributes, at one layer or over all layers."""
    layers = [layer] if layer else result.layers
    vals = [result.entries[(lay, a)].layer_acc for lay in layers for a in result.attributes
            if (lay, a) in result.entries]
    return float(np.mean(vals)) if vals else float("nan")


def eye_share(result: AMRResult, attribute: str = "Male") -> float | None:
    """Share of the attribute's average Grad-CAM (overall group) inside the Table A.2 eyeglasses block:
    how much a gender model looks at where glasses are."""
    from analysis.face_regions import masks_v2

    if attribute not in result.attributes:
        return None
    m = result.average_maps[GROUPS.index("overall"), result.attributes.index(attribute)]
    if m.ndim != 2 or not np.isfinite(m).all() or m.sum() <= 0:
        return None
    import torch

    from analysis.gradcam import upsample_maps

    size = max(m.shape[-1], 64)  # upsampled as the AMR upsamples maps to the mask resolution
    up = upsample_maps(torch.from_numpy(m[None, None]), size)[0, 0].numpy() if m.shape[-1] != size else m
    mask = masks_v2(size, ["Eyeglasses"])[0].numpy()
    return float(up[mask].sum() / up.sum())


def first_epoch_holding(epochs: Sequence[int], values_a: Mapping[int, float], values_b: Mapping[int, float]) -> int | None:
    """First epoch from which a > b at every later shared epoch (None when it never settles)."""
    shared = [e for e in epochs if e in values_a and e in values_b]
    since = None
    for e in shared:
        if values_a[e] > values_b[e]:
            since = e if since is None else since
        else:
            since = None
    return since


# --------------------------------------------------------------------------------------------------
# Figures (functions of results; return matplotlib Figures)
# --------------------------------------------------------------------------------------------------


def plot_region_units_per_p(per_p: Mapping[int, Mapping[str, Mapping[str, int]]]) -> Figure:
    """Seed 002 Fig. 6: interpretable units per facial region, one bar per P, one panel per layer.
    per_p: P -> layer -> region -> units."""
    ps = sorted(per_p)
    layers = list(dict.fromkeys(layer for p in ps for layer in per_p[p]))
    fig = Figure(figsize=(5 * len(layers), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(layers)))
    for ax, layer in zip(axes, layers):
        regions = list(dict.fromkeys(r for p in ps for r in per_p[p].get(layer, {})))
        x = np.arange(len(regions))
        width = 0.8 / len(ps)
        for i, p in enumerate(ps):
            vals = [per_p[p].get(layer, {}).get(r, 0) for r in regions]
            ax.bar(x + (i - (len(ps) - 1) / 2) * width, vals, width, label=f"P = {p}")
        ax.set_xticks(x, regions, rotation=45, ha="right")
        ax.set_title(layer)
        ax.set_ylabel("interpretable units")
    axes[0].legend(fontsize=8)
    return fig


def plot_lines(series: Mapping[str, Mapping[Any, float | None]], xlabel: str, ylabel: str, title: str = "",
               ylim: tuple[float, float] | None = None) -> Figure:
    """One line per series over a shared x (P values, epochs or layers)."""
    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.subplots()
    for name, values in series.items():
        xs = list(values)
        ys = [np.nan if v is None else v for v in values.values()]
        ax.plot([str(x) for x in xs] if any(isinstance(x, str) for x in xs) else xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_image_grid(rows: Mapping[str, np.ndarray], flags: Mapping[str, np.ndarray] | None = None,
                    per_row: int = 25) -> Figure:
    """Rows of (k, H, W, 3) uint8 images (Fig. 5); flagged images (e.g. wearing glasses) get a red frame."""
    n_rows = sum(math.ceil(max(len(v), 1) / per_row) for v in rows.values())
    fig = Figure(figsize=(per_row * 0.55, n_rows * 0.75 + 0.3), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_rows, per_row, squeeze=False))
    r = 0
    for name, images in rows.items():
        lines = math.ceil(max(len(images), 1) / per_row)
        for i in range(lines * per_row):
            ax = axes[r + i // per_row, i % per_row]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if i < len(images):
                ax.imshow(images[i])
                if flags is not None and flags[name][i]:
                    for s in ax.spines.values():
                        s.set_visible(True)
                        s.set_color("red")
                        s.set_linewidth(2)
            if i == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
        r += lines
    return fig


def plot_unit_probability_grid(per_p: Mapping[int, Mapping[str, DissectionResult]], group: str) -> Figure:
    """Seed 002 Fig. 7: each subgroup's probability per unit (units sorted by the first subgroup's), one row per
    P, one column per layer; the dashed line is the bias threshold."""
    ps = sorted(per_p)
    layers = list(dict.fromkeys(layer for p in ps for layer in per_p[p]))
    fig = Figure(figsize=(3.2 * len(layers), 2.2 * len(ps)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(ps), len(layers), squeeze=False))
    for i, p in enumerate(ps):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            res = per_p[p].get(layer)
            if res is None or group not in res.global_groups:
                ax.set_axis_off()
                continue
            g = res.global_groups[group]
            order = np.argsort(-g.probabilities[:, 0], kind="stable")
            for k, s in enumerate(g.subgroups):
                ax.plot(g.probabilities[order, k], label=s, lw=1)
            ax.axhline(g.threshold, color="k", lw=0.7, ls="--")
            ax.set_ylim(0, 1)
            ax.set_title(f"P = {p}, {layer}", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    return fig


def plot_probing_curves(curves: Mapping[str, ProbingResult], dashed: Sequence[str] = ()) -> Figure:
    """Accuracy over depth per attribute (seed 003 Figs. 5.1-5.4), one line per model; dashed = random init."""
    attributes = list(dict.fromkeys(a for r in curves.values() for a in r.attributes))
    fig = Figure(figsize=(4 * (len(attributes) + 1), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(attributes) + 1))
    for name, r in curves.items():
        style = "--" if name in dashed else "-"
        for ax, a in zip(axes, attributes):
            if a in r.attributes:
                ax.plot(range(len(r.layers)), r.curve(a), style, marker=".", label=name)
                ax.set_title(a)
        axes[-1].plot(range(len(r.layers)), [mean_probe_accuracy(r, lay) for lay in r.layers], style, marker=".",
                      label=name)
        axes[-1].set_title("mean over attributes")
    first = next(iter(curves.values()))
    for ax in axes:
        ax.set_xticks(range(len(first.layers)), first.layers, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0.4, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("balanced accuracy (PLS + QDA)")
    axes[-1].legend(fontsize=7)
    return fig


def plot_history(histories: Mapping[str, list[dict]], keys: Sequence[str], title: str) -> Figure:
    """Headline scalars over training checkpoints (epochs), one panel per key, one line per run."""
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, key in zip(axes, keys):
        for run, hist in histories.items():
            pts = [(h["epoch"], h[key]) for h in hist if key in h]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=run)
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    return fig


HISTORY_KEYS = {
    "dissection": re.compile(r"^dissection/[^/]+/(hnd_units|netdissect_units|region/eyes|biased/gender|biased/grayscale)$"),
    "probing": re.compile(r"^probing/(last_layer_acc/.*|mean_last_layer_acc)$"),
    "gradcam_amr": re.compile(r"^gradcam_amr/(amr/overall|amr/gt_pos|error_rate|amr_attribute/Male)$"),
}


def history_keys(name: str, histories: Mapping[str, list[dict]], limit: int = 16) -> list[str]:
    """The headline keys worth a panel: a fixed pattern per known analysis, else every numeric key."""
    keys = list(dict.fromkeys(k for hist in histories.values() for h in hist for k in h
                              if k not in ("epoch", "step") and isinstance(h[k], (int, float))))
    pattern = HISTORY_KEYS.get(name)
    chosen = [k for k in keys if pattern.match(k)] if pattern else [k for k in keys if not k.endswith("seconds")]
    return chosen[:limit]


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


class Report:
    """Collects sections (headings, paragraphs, tables, figures) and writes report.html + PNGs."""

    def __init__(self, out: Path, title: str):
        self.out, self.title = out, title
        self.parts: list[str] = []
        self.figures: dict[str, Path] = {}
        self.tables: dict[str, tuple[list[str], list[list]]] = {}
        self.findings: list[tuple[str, bool | None, str]] = []
        self.answers: list[tuple[str, str, str]] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def figure(self, name: str, fig: Figure, caption: str) -> None:
        path = self.out / f"{name}.png"
        fig.savefig(path, dpi=90)
        self.figures[name] = path
        self.parts.append(f'<figure><img src="{html.escape(path.name)}" alt="{html.escape(caption)}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> None:
        self.tables[name] = (list(columns), [list(r) for r in rows])
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f'<table id="{html.escape(name)}">{cap}<thead><tr>{head}</tr></thead>'
                          f"<tbody>{body}</tbody></table>")

    def finding(self, claim: str, holds: bool | None, evidence: str) -> None:
        self.findings.append((claim, holds, evidence))

    def answer(self, experiment: str, question: str, answer: str) -> None:
        """One line of the top summary: which model is more biased, where in the network, since which checkpoint."""
        self.answers.append((experiment, question, answer))

    def write(self) -> Path:
        summary = "".join(f"<tr><td>{html.escape(x)}</td><td>{html.escape(q)}</td><td>{html.escape(a)}</td></tr>"
                          for x, q, a in self.answers) or \
            '<tr><td colspan="3">no run carries bias metrics, so no model can be ranked</td></tr>'
        summary = ('<h2 id="summary">Summary: which model is more biased, where in the network, since which '
                   'checkpoint</h2><table id="summary-table"><thead><tr><th>experiment</th><th>question</th>'
                   f"<th>answer, from the data</th></tr></thead><tbody>{summary}</tbody></table>")
        rows = "".join(
            f'<tr class="{"ok" if h else "no" if h is False else "na"}"><td>{html.escape(c)}</td>'
            f"<td>{'holds' if h else 'does NOT hold' if h is False else 'not measured'}</td>"
            f"<td>{html.escape(e)}</td></tr>" for c, h, e in self.findings)
        findings = ('<h2 id="findings">Findings: the claims, checked</h2><table id="findings-table"><thead><tr>'
                    f"<th>claim</th><th>verdict</th><th>numbers</th></tr></thead><tbody>{rows}</tbody></table>")
        page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}"
                f"</title><style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{summary}{findings}"
                + "".join(self.parts) + "</body></html>")
        path = self.out / "report.html"
        path.write_text(page, encoding="utf-8")
        return path


_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:0.6em 0;font-size:13px}td,th{border:1px solid #bbb;padding:2px 6px}"
        "th{background:#eee}caption{text-align:left;font-style:italic}tr.ok td:nth-child(2){color:#060;font-weight:bold}"
        "tr.no td:nth-child(2){color:#b00;font-weight:bold}tr.na td:nth-child(2){color:#777}"
        "img{max-width:100%;border:1px solid #ddd}figure{margin:0.8em 0}figcaption{font-size:13px;color:#444}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return str(int(v)) if v.is_integer() else f"{v:.3f}"
    return str(v)


def _bias_runs(runs: Sequence[Run], kind: str) -> dict[int, Run]:
    """Runs of one bias experiment by P (the last one given wins for a repeated P)."""
    return {r.p: r for r in runs if r.experiment == kind and r.p is not None}


def _dictionary_for(run: Run):
    """Rebuild the Face Dictionary the run's DissectionCallback used (None when it cannot be rebuilt)."""
    from callbacks.dissection import load_dictionary

    callbacks = (run.config.get("trainer") or {}).get("callbacks") or []
    entry = next((c for c in callbacks if str(c.get("class_path", "")).endswith("DissectionCallback")), None)
    if entry is None:
        return None
    a = entry.get("init_args") or {}
    try:
        return load_dictionary(a.get("dictionary"), a.get("dictionary_count", 64), a.get("dictionary_size", 64),
                               a.get("dictionary_seed", 0), a.get("confidence", 0.9))
    except (OSError, ValueError) as err:
        print(f"report: cannot rebuild the Face Dictionary of {run.label} ({err}); Fig. 5 skipped for it")
        return None


def top_images_per_gender(result: DissectionResult, dictionary, count: int = 50) -> dict[str, np.ndarray]:
    """Seed 002 Fig. 5 from a saved result: per gender subgroup, the dictionary images of that gender that rank
    highest among the top activations of the units most selective for it (top 10% of units by P_subgroup),
    scored by sum over those units of (k - rank); indices in decreasing score."""
    g = result.global_groups["gender"]
    labels = dictionary.global_labels["gender"]
    k = result.top_images.shape[1]
    out = {}
    for j, sub in enumerate(g.subgroups):
        units = np.argsort(-g.probabilities[:, j], kind="stable")[:max(1, result.num_units // 10)]
        score = np.zeros(len(labels))
        for u in units:
            for rank, i in enumerate(result.top_images[u]):
                score[int(i)] += k - rank
        members = np.flatnonzero((labels == j) & (score > 0))
        out[sub] = members[np.argsort(-score[members], kind="stable")][:count]
    return out


def _has_glasses(dictionary) -> np.ndarray:
    """(N,) bool: the dictionary image shows eyeglasses (a non-empty eyeglasses concept mask)."""
    idx = [dictionary.concepts.index(c) for c in EYE_CONCEPTS if c in dictionary.concepts]
    if not idx:
        return np.zeros(len(dictionary), bool)
    return (dictionary.masks[:, idx] != 0).any((1, 2))


def section_eyeglasses(rep: Report, runs: Sequence[Run]) -> None:
    by_p = _bias_runs(runs, "eyeglasses")
    if not by_p:
        return
    rep.heading("Eyeglasses bias (seed 002 section 4.1)")
    ps = sorted(by_p)
    rep.text(f"Gender models trained with P% of the male and (100 - P)% of the female training images wearing "
             f"eyeglasses, P in {ps}; evaluation on an unbiased split. Dissection numbers are from each run's last "
             f"dissected checkpoint.")
    # bias-conflicting accuracy
    rows = []
    for p in ps:
        r = by_p[p]
        rows.append([p, r.label, r.metric("val/bias/aligned_accuracy"), r.metric("val/bias/conflicting_accuracy"),
                     r.metric("val/bias/gap"), r.metric("val/mean_error")])
    rep.table("bias_accuracy_eyeglasses", ["P", "run", "aligned accuracy", "conflicting accuracy", "gap",
                                           "val mean error"], rows,
              "Gender accuracy on bias-aligned (men with, women without glasses) and bias-conflicting images")
    rep.figure("eyeglasses_bias_accuracy", plot_lines(
        {"aligned": {p: by_p[p].metric("val/bias/aligned_accuracy") for p in ps},
         "conflicting": {p: by_p[p].metric("val/bias/conflicting_accuracy") for p in ps},
         "gap": {p: by_p[p].metric("val/bias/gap") for p in ps}}, "P", "accuracy", "Bias-conflicting accuracy per P"),
        "Aligned and conflicting accuracy and their gap per P (final validation)")
    _gap_over_epochs(rep, by_p, "eyeglasses")
    # dissection: Fig 6 and eyeglasses units
    diss = {p: by_p[p].last("dissection") for p in ps if by_p[p].dissection}
    if diss:
        per_region = {p: {layer: region_units(res) for layer, res in d.items()} for p, d in diss.items()}
        rep.figure("fig6_eyeglasses_regions", plot_region_units_per_p(per_region),
                   "Seed 002 Fig. 6: interpretable units per facial region per P (HND stages II-III)")
        layers = list(dict.fromkeys(layer for d in diss.values() for layer in d))
        rows = [[p] + [f"{eyeglasses_units(diss[p][lay])} / {per_region[p][lay].get('eyes', 0)}"
                       if lay in diss[p] else None for lay in layers] for p in sorted(diss)]
        rep.table("eyeglasses_units", ["P"] + layers, rows,
                  "Per layer: eyeglasses-concept units / eye-region units (last dissected checkpoint)")
        rep.figure("eyeglasses_units_per_p", plot_lines(
            {f"{lay} eyeglasses": {p: eyeglasses_units(diss[p][lay]) for p in sorted(diss) if lay in diss[p]}
             for lay in layers} | {f"{lay} eye region": {p: per_region[p][lay].get("eyes", 0) for p in sorted(diss)
                                                           if lay in diss[p]} for lay in layers},
            "P", "units", "Eyeglasses and eye-region units per P"), "Eyeglasses-concept and eye-region units per P")
        counts = {p: {lay: biased_units(diss[p][lay], "gender") for lay in diss[p]} for p in diss}
        if all(v is not None for c in counts.values() for v in c.values()):
            rep.figure("fig8_gender_biased_units", plot_lines(
                {lay: {p: counts[p].get(lay) for p in sorted(diss)} for lay in layers}, "P", "units",
                "Gender-biased units (P_female or P_male > 0.55) per layer"),
                "Units biased toward one gender (HND stage I) per layer and P")
        _fig5(rep, by_p, diss)
    # AMR per P
    amr = {p: by_p[p].last("amr") for p in ps if by_p[p].amr}
    if amr:
        rows = []
        for p, res in sorted(amr.items()):
            row = res.mean_row("amr")
            rows.append([p, row["error_rate"], row["overall"], row["gt_pos"], row["gt_neg"], row["pred_correct"],
                         row["pred_incorrect"], eye_share(res)])
        rep.table("amr_per_p", ["P", "error rate", "AMR o", "AMR gt p", "AMR gt n", "AMR pr c", "AMR pr nc",
                                "Grad-CAM share in eyeglasses block"], rows,
                  "Grad-CAM AMR of the gender logit per P (mean over the model's attributes), and the share of its "
                  "average map inside the Table A.2 eyeglasses block")
        rep.figure("amr_per_p", plot_lines({"AMR (overall)": {r[0]: r[2] for r in rows},
                                            "share in eyeglasses block": {r[0]: r[7] for r in rows}},
                                           "P", "value", "Grad-CAM of the gender model per P", (0, 1)),
                   "AMR and eyeglasses-block share of the gender Grad-CAM per P")


def _gap_over_epochs(rep: Report, by_p: Mapping[int, Run], kind: str) -> None:
    """The aligned - conflicting accuracy gap at every validation epoch, one line per P (from the W&B runs)."""
    curves = {by_p[p].label: dict(by_p[p].metrics_over_epochs.get("val/bias/gap", [])) for p in sorted(by_p)}
    if any(curves.values()):
        rep.figure(f"{kind}_gap_over_epochs", plot_lines(curves, "epoch", "aligned - conflicting accuracy",
                                                         "Bias gap over training"),
                   "Accuracy gap (aligned minus conflicting) at every validation epoch, from the W&B runs")


def _fig5(rep: Report, by_p: Mapping[int, Run], diss: Mapping[int, Mapping[str, DissectionResult]]) -> None:
    first = by_p[min(diss)]
    dictionary = _dictionary_for(first)
    if dictionary is None or "gender" not in dictionary.global_labels:
        return
    glasses = _has_glasses(dictionary)
    grid, flags, rows = {}, {}, []
    for p in sorted(diss):
        layer = list(diss[p])[-1]
        res = diss[p][layer]
        if "gender" not in res.global_groups or int(res.top_images.max(initial=-1)) >= len(dictionary):
            continue
        for sub, idx in top_images_per_gender(res, dictionary).items():
            grid[f"P{p} {sub}"] = dictionary.images[idx]
            flags[f"P{p} {sub}"] = glasses[idx]
            rows.append([p, layer, sub, len(idx), float(glasses[idx].mean()) if len(idx) else None])
    if grid:
        rep.figure("fig5_top_images_per_gender", plot_image_grid(grid, flags),
                   "Seed 002 Fig. 5: top activating dictionary images per gender per P (last layer; red frame = "
                   "eyeglasses)")
        rep.table("fig5_glasses_share", ["P", "layer", "gender", "images", "share with eyeglasses"], rows,
                  "Share of the top activating images that show eyeglasses")


def section_grayscale(rep: Report, runs: Sequence[Run]) -> None:
    by_p = _bias_runs(runs, "grayscale")
    if not by_p:
        return
    ps = sorted(by_p)
    rep.heading("Grayscale bias (seed 002 section 4.2)")
    rows = [[p, by_p[p].label, by_p[p].metric("val/bias/aligned_accuracy"),
             by_p[p].metric("val/bias/conflicting_accuracy"), by_p[p].metric("val/bias/gap")] for p in ps]
    rep.table("bias_accuracy_grayscale", ["P", "run", "aligned accuracy", "conflicting accuracy", "gap"], rows,
              "Gender accuracy on bias-aligned (gray men, colour women) and bias-conflicting images")
    _gap_over_epochs(rep, by_p, "grayscale")
    diss = {p: by_p[p].last("dissection") for p in ps if by_p[p].dissection}
    if not diss:
        return
    if any("grayscale" in res.global_groups for d in diss.values() for res in d.values()):
        rep.figure("fig7_grayscale_probabilities", plot_unit_probability_grid(diss, "grayscale"),
                   "Seed 002 Fig. 7: P_color and P_gray per unit (sorted by P_color), per layer and P")
        layers = list(dict.fromkeys(layer for d in diss.values() for layer in d))
        counts = {lay: {p: biased_units(diss[p][lay], "grayscale") for p in sorted(diss) if lay in diss[p]}
                  for lay in layers}
        rep.figure("fig8_grayscale_biased_units", plot_lines(counts, "P", "biased units",
                                                             "Grayscale-biased units per layer"),
                   "Seed 002 Fig. 8: units with P_color or P_gray > 0.55 per layer and P")
        rep.table("grayscale_biased_units", ["P"] + layers,
                  [[p] + [counts[lay].get(p) for lay in layers] for p in sorted(diss)],
                  "Grayscale-biased units per layer and P (last dissected checkpoint)")
        rep.table("grayscale_biased_units_per_checkpoint", ["P", "epoch"] + layers + ["all layers"],
                  [[p, e] + [biased_units(d[lay], "grayscale") if lay in d else None for lay in layers]
                   + [sum(biased_units(r, "grayscale") or 0 for r in d.values())]
                   for p in sorted(diss) for e, d in sorted(by_p[p].dissection.items())],
                  "Grayscale-biased units at every dissected checkpoint")


def affact_pair(runs: Sequence[Run]) -> tuple[Run, Run] | None:
    bal = [r for r in runs if r.variant == "balanced" and r.amr]
    unb = [r for r in runs if r.variant == "unbalanced" and r.amr]
    return (bal[-1], unb[-1]) if bal and unb else None


def section_affact(rep: Report, runs: Sequence[Run]) -> None:
    pair = affact_pair(runs)
    if pair is None:
        return
    from analysis.gradcam_plots import imbalance_order, plot_amr_bars, plot_kl_bars
    from callbacks.gradcam_amr import kl_series

    bal, unb = pair
    b, u = bal.last("amr"), unb.last("amr")
    rep.heading("Balanced vs unbalanced AFFACT (seed 004)")
    names = imbalance_order([a for a in b.attributes if a in u.attributes and a in CELEBA_POSITIVE_RATE])
    cols = ["attribute", "ER b", "o b", "gt p b", "gt n b", "pr c b", "pr nc b",
            "ER ub", "o ub", "gt p ub", "gt n ub", "pr c ub", "pr nc ub"]
    rows = []
    for n in names:
        row = [n]
        for res in (b, u):
            i = res.attributes.index(n)
            row += [float(res.error_rate[i])] + [float(res.scores["amr"][g, i]) for g in range(len(GROUPS))]
        rows.append(row)
    rows.append(["OVERALL"] + [b.mean_row("amr")[k] for k in ("error_rate",) + GROUPS]
                + [u.mean_row("amr")[k] for k in ("error_rate",) + GROUPS])
    rep.table("table5_1", cols, rows, f"Seed 004 Table 5.1: error rate and mean AMR per group, {bal.label} (b) vs "
                                      f"{unb.label} (ub), by increasing class imbalance")
    results = {bal.label: b, unb.label: u}
    rep.figure("fig5_4", plot_amr_bars(results, ("pred_correct", "pred_incorrect")),
               "Seed 004 Fig. 5.4: AMR for correctly vs incorrectly classified images")
    rep.figure("fig5_5", plot_amr_bars(results, ("gt_pos", "gt_neg")),
               "Seed 004 Fig. 5.5: AMR for images with the attribute present vs absent")
    rep.figure("fig5_6", plot_amr_bars(results, ("overall",)), "Seed 004 Fig. 5.6: overall AMR, b vs ub")
    if np.isfinite(b.average_maps).any() and np.isfinite(u.average_maps).any():
        rep.figure("fig5_7", plot_kl_bars(kl_series(b, u)),
                   "Seed 004 Fig. 5.7: KL distance between the average Grad-CAMs")


def section_probing(rep: Report, runs: Sequence[Run]) -> None:
    with_probes = [r for r in runs if r.probing or r.probing_random]
    if not with_probes:
        return
    rep.heading("Probing over depth (seed 003)")
    curves, dashed, rows = {}, [], []
    for r in with_probes:
        trained = r.probing_offline or r.last("probing")
        curves[r.label] = trained
        if r.probing_random is not None:
            curves[f"{r.label} random init"] = r.probing_random
            dashed.append(f"{r.label} random init")
        last = trained.layers[-1]
        rows.append([r.label, last, mean_probe_accuracy(trained, last), mean_probe_accuracy(trained),
                     mean_probe_accuracy(r.probing_random, last) if r.probing_random else None,
                     mean_probe_accuracy(r.probing_random) if r.probing_random else None])
    rep.figure("probing_depth", plot_probing_curves(curves, dashed),
               "PLS + QDA probe accuracy over depth per attribute, trained (solid) vs random-init (dashed)")
    rep.table("probing_summary", ["run", "last layer", "trained, last layer", "trained, mean over layers",
                                  "random init, last layer", "random init, mean over layers"], rows,
              "Mean probe accuracy over the probed attributes")


def section_histories(rep: Report, runs: Sequence[Run]) -> None:
    names = list(dict.fromkeys(n for r in runs for n in r.histories))
    if not names:
        return
    rep.heading("Headline numbers over training checkpoints")
    for name in names:
        hist = {r.label: r.histories[name] for r in runs if name in r.histories}
        keys = history_keys(name, hist)
        if not keys:
            continue
        rep.figure(f"history_{name}", plot_history(hist, keys, name), f"{name}: headline scalars per checkpoint")
        rows = [[r, h["epoch"]] + [h.get(k) for k in keys] for r, hs in hist.items() for h in hs]
        rep.table(f"history_{name}_table", ["run", "epoch"] + [k.split("/", 1)[-1] for k in keys], rows,
                  f"{name}: the same numbers")


# --------------------------------------------------------------------------------------------------
# Findings: the claims, with numbers
# --------------------------------------------------------------------------------------------------


def claim_eyeglasses_units(rep: Report, runs: Sequence[Run]) -> None:
    claim = "More eyeglasses / eye-region units at P = 100 than at P = 50"
    by_p = _bias_runs(runs, "eyeglasses")
    if not (50 in by_p and 100 in by_p and by_p[50].dissection and by_p[100].dissection):
        rep.finding(claim, None, "needs dissected eyeglasses runs at P = 50 and P = 100")
        return
    lo, hi = by_p[50].last("dissection"), by_p[100].last("dissection")
    layers = [lay for lay in lo if lay in hi]
    parts, tot = [], [0, 0]
    for lay in layers:
        a = eyeglasses_units(lo[lay]) + region_units(lo[lay]).get("eyes", 0)
        b = eyeglasses_units(hi[lay]) + region_units(hi[lay]).get("eyes", 0)
        tot[0] += a
        tot[1] += b
        parts.append(f"{lay}: {b} at P=100 vs {a} at P=50 (eyeglasses-concept {eyeglasses_units(hi[lay])} vs "
                     f"{eyeglasses_units(lo[lay])}, eye-region {region_units(hi[lay]).get('eyes', 0)} vs "
                     f"{region_units(lo[lay]).get('eyes', 0)})")
    holds = tot[1] > tot[0]
    since = _since(by_p[100], by_p[50], "dissection", lambda d: sum(
        eyeglasses_units(r) + region_units(r).get("eyes", 0) for r in d.values()))
    text = f"all dissected layers: {tot[1]} vs {tot[0]}; " + "; ".join(parts)
    if since is not None:
        text += f"; P=100 ahead of P=50 since the epoch-{since} checkpoint"
    rep.finding(claim, holds, text)


def _since(a: Run, b: Run, kind: str, value) -> int | None:
    va = {e: value(d) for e, d in getattr(a, kind).items()}
    vb = {e: value(d) for e, d in getattr(b, kind).items()}
    return first_epoch_holding(sorted(set(va) & set(vb)), va, vb)


def claim_grayscale_units(rep: Report, runs: Sequence[Run]) -> None:
    claim = "More grayscale-biased units as P rises"
    by_p = {p: r for p, r in _bias_runs(runs, "grayscale").items() if r.dissection}
    if len(by_p) < 2:
        rep.finding(claim, None, "needs dissected grayscale runs at two or more P (python train.py sweep "
                                 "--experiment grayscale)")
        return
    ps = sorted(by_p)
    totals = {p: sum(biased_units(r, "grayscale") or 0 for r in by_p[p].last("dissection").values()) for p in ps}
    from scipy.stats import spearmanr

    rho = float(spearmanr(ps, [totals[p] for p in ps]).statistic) if len(set(totals.values())) > 1 else 0.0
    holds = totals[ps[-1]] > totals[ps[0]] and rho > 0
    rep.finding(claim, holds, "biased units over all dissected layers: "
                + ", ".join(f"P={p}: {totals[p]}" for p in ps) + f"; Spearman rho(P, units) = {rho:.2f}")


def claim_affact_amr(rep: Report, runs: Sequence[Run]) -> None:
    claim = "The balanced model's mean AMR is above the unbalanced one's on imbalanced attributes"
    pair = affact_pair(runs)
    if pair is None:
        rep.finding(claim, None, "needs a balanced and an unbalanced run with Grad-CAM AMR "
                                 "(python train.py sweep --experiment affact)")
        return
    b, u = pair[0].last("amr"), pair[1].last("amr")
    common = [a for a in b.attributes if a in u.attributes]
    chosen = imbalanced_attributes(common)
    g = GROUPS.index("overall")

    def mean(res):
        vals = [res.scores["amr"][g, res.attributes.index(a)] for a in chosen]
        vals = [v for v in vals if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    mb, mu = mean(b), mean(u)
    h, w = b.average_maps.shape[-2:]
    resolution = (f"; Grad-CAM maps of {h}x{w} cells, so AMR moves in coarse steps at this resolution"
                  if np.isfinite(b.average_maps).any() else "")
    rep.finding(claim, bool(mb > mu), f"mean overall AMR over the {len(chosen)} most imbalanced attributes "
                f"({', '.join(chosen[:6])}{', ...' if len(chosen) > 6 else ''}): balanced {mb:.3f} vs unbalanced "
                f"{mu:.3f}; over all {len(common)}: {b.mean_row()['overall']:.3f} vs {u.mean_row()['overall']:.3f}"
                + resolution)


def claim_probes(rep: Report, runs: Sequence[Run]) -> None:
    claim = "Trained-model probes are above random-init probes"
    pairs = [(r, r.probing_offline or r.last("probing"), r.probing_random) for r in runs if r.probing_random]
    if not pairs:
        rep.finding(claim, None, "needs random-init probes (python train.py sweep ... --random-init-probes, or "
                                 "python analyze.py probe --compare-random --out <run>/analysis/probing_random_init)")
        return
    parts, ok = [], True
    for r, trained, rnd in pairs:
        last = trained.layers[-1]
        t, z = mean_probe_accuracy(trained, last), mean_probe_accuracy(rnd, last)
        tm, zm = mean_probe_accuracy(trained), mean_probe_accuracy(rnd)
        ok &= t > z and tm > zm
        fails = [w for w, a, b in (("last layer", t, z), ("mean over layers", tm, zm)) if not a > b]
        parts.append(f"{r.label}: last layer {t:.3f} vs {z:.3f}, mean over layers {tm:.3f} vs {zm:.3f}"
                     + (f" (not above random init: {', '.join(fails)})" if fails else ""))
    rep.finding(claim, ok, "; ".join(parts) + " (mean balanced accuracy over the probed attributes)")


BIAS_GAP_THRESHOLD = 0.05  # aligned minus conflicting accuracy above which a gender model counts as biased
BIAS_ATTRIBUTE = {"eyeglasses": "Eyeglasses"}
UNITS_NAME = {"eyeglasses": "eyeglasses-concept + eye-region units", "grayscale": "grayscale-biased units"}


def concept_units(kind: str, result: DissectionResult) -> int:
    """The units that carry a bias experiment's concept: eyeglasses-concept plus eye-region units (eyeglasses),
    units biased toward color or gray (grayscale)."""
    if kind == "grayscale":
        return biased_units(result, "grayscale") or 0
    return eyeglasses_units(result) + region_units(result).get("eyes", 0)


def since_above(series: Mapping[int, float], threshold: float | Mapping[int, float]) -> int | None:
    """First checkpoint (epoch) from which `series` stays above `threshold`: a number, or a reference run's
    values at the same epochs (epochs the reference lacks are skipped)."""
    ref = threshold if isinstance(threshold, Mapping) else {e: float(threshold) for e in series}
    return first_epoch_holding(sorted(set(series) & set(ref)), series, ref)


def _series(values: Mapping[int, float], ref: Mapping[int, float] | None = None, fmt: str = ".3f") -> str:
    """'epoch 0: 0.100, epoch 1: 0.200' (with ' vs <ref>' where a reference value exists)."""
    return ", ".join(f"epoch {e}: {format(v, fmt)}" + (f" vs {format(ref[e], fmt)}" if ref and e in ref else "")
                     for e, v in sorted(values.items()))


def summary_bias(rep: Report, runs: Sequence[Run], kind: str) -> None:
    """Which model of a bias series is most biased (final aligned - conflicting gap), where in the network
    (per layer, its concept units beyond the lowest-P model's; probing of the concept), and since which checkpoint
    (its gap stays above BIAS_GAP_THRESHOLD; its concept units stay above the lowest-P model's)."""
    by_p = _bias_runs(runs, kind)
    if not by_p:
        return
    name = f"{kind} bias (P = {', '.join(map(str, sorted(by_p)))})"
    gaps = {p: r.metric("val/bias/gap") for p, r in by_p.items() if r.metric("val/bias/gap") is not None}
    if not gaps:
        rep.answer(name, "which model is more biased", "not measured: no run carries bias-group metrics "
                                                       "(val/bias/gap; add BiasGroupsCallback)")
        return
    worst = by_p[max(gaps, key=gaps.get)]
    base = by_p[min(by_p)]
    gap = gaps[worst.p]
    rep.answer(name, "which model is more biased",
               f"{worst.label}: gender accuracy {gap:.3f} higher on bias-aligned than on bias-conflicting images "
               f"(conflicting accuracy {_fmt(worst.metric('val/bias/conflicting_accuracy'))}; "
               + ("above" if gap > BIAS_GAP_THRESHOLD else "not above")
               + f" the {BIAS_GAP_THRESHOLD} bias threshold). Gap per run: "
               + ", ".join(f"{by_p[p].label} {gaps[p]:.3f}" for p in sorted(gaps)) + ".")
    units = UNITS_NAME[kind]
    where = []
    if worst.dissection and base.dissection and base is not worst:
        w, b = worst.last("dissection"), base.last("dissection")
        layers = [lay for lay in w if lay in b]
        diffs = {lay: concept_units(kind, w[lay]) - concept_units(kind, b[lay]) for lay in layers}
        share = {lay: diffs[lay] / max(w[lay].num_units, 1) for lay in layers}  # layers differ in width
        per_layer = ", ".join(f"{lay} {concept_units(kind, w[lay])} vs {concept_units(kind, b[lay])} of "
                              f"{w[lay].num_units}" for lay in layers)
        top = max(share, key=share.get) if share else None
        if top is not None and diffs[top] > 0:
            where.append(f"dissection: {worst.label} has the most {units} beyond {base.label} in {top} "
                         f"({diffs[top]:+d} units, {share[top]:+.0%} of the layer); per layer, {worst.label} vs "
                         f"{base.label} (last dissected checkpoint): {per_layer}.")
        else:
            where.append(f"dissection: no layer of {worst.label} has more {units} than {base.label} "
                         f"(per layer: {per_layer}).")
    elif worst.dissection:
        w = worst.last("dissection")
        where.append(f"dissection: {units} of {worst.label} per layer: "
                     + ", ".join(f"{lay} {concept_units(kind, r)}" for lay, r in w.items())
                     + ("" if base is worst else f" ({base.label} was not dissected)") + ".")
    probing = _where_probing(worst, base)
    if probing:
        where.append(probing)
    rep.answer(name, "where in the network", " ".join(where) or "not measured: no dissection or probing in these runs")
    since = []
    series = dict(worst.metrics_over_epochs.get("val/bias/gap", []))
    if series:
        e = since_above(series, BIAS_GAP_THRESHOLD)
        since.append((f"gap above {BIAS_GAP_THRESHOLD} since the epoch-{e} checkpoint" if e is not None else
                      f"gap does not stay above {BIAS_GAP_THRESHOLD} up to the last checkpoint")
                     + f" ({_series(series)}).")
    if worst.dissection and base.dissection and base is not worst:
        va = {e: sum(concept_units(kind, r) for r in d.values()) for e, d in worst.dissection.items()}
        vb = {e: sum(concept_units(kind, r) for r in d.values()) for e, d in base.dissection.items()}
        e = since_above(va, vb)
        shared = {k: v for k, v in va.items() if k in vb}
        since.append(f"{units} (all dissected layers) "
                     + (f"above {base.label}'s since the epoch-{e} checkpoint" if e is not None else
                        f"not above {base.label}'s up to the last checkpoint")
                     + f" ({_series(shared, vb, 'd')}).")
    rep.answer(name, "since which checkpoint", f"{worst.label}: " + " ".join(since) if since else
               "not measured: no per-checkpoint gap (offline W&B run) or dissection history")


def _where_probing(worst: Run, base: Run) -> str | None:
    """Where the bias concept becomes decodable: per layer, probe accuracy of the concept in the most vs the least
    biased model (last probed checkpoint), and the first checkpoint from which the last layer stays ahead."""
    concept = BIAS_ATTRIBUTE.get(worst.experiment or "")
    a, b = worst.last("probing"), base.last("probing")
    if base is worst or concept is None or a is None or b is None or concept not in a.attributes \
            or concept not in b.attributes:
        return None
    layers = [lay for lay in a.layers if lay in b.layers]
    diff = {lay: a[(lay, concept)].layer_acc - b[(lay, concept)].layer_acc for lay in layers}
    where = max(diff, key=diff.get)
    first = next((lay for lay in layers if diff[lay] > 0.1), None)
    last = layers[-1]
    va = {e: r[(last, concept)].layer_acc for e, r in worst.probing.items() if (last, concept) in r.entries}
    vb = {e: r[(last, concept)].layer_acc for e, r in base.probing.items() if (last, concept) in r.entries}
    since = since_above(va, vb)
    return (f"probing: {concept} is decodable from {worst.label} better than from {base.label} by more than 0.1 "
            f"{'from ' + first + ' on' if first else 'at no layer'}; the largest difference is at {where} "
            f"({a[(where, concept)].layer_acc:.3f} vs {b[(where, concept)].layer_acc:.3f}); per layer: "
            + ", ".join(f"{lay} {d:+.3f}" for lay, d in diff.items())
            + (f"; at {last} ahead since the epoch-{since} checkpoint ({_series({e: va[e] for e in vb if e in va}, vb)})."
               if since is not None else "."))


def majority_bias(metrics: Mapping[str, float], attributes: Sequence[str]) -> float | None:
    """How much a multi-attribute model favours each attribute's majority class: mean over `attributes` of
    balanced error minus error (0 for a model as good on the minority as on the majority class, up to ~0.5 for
    one that always predicts the majority)."""
    vals = [(1 - metrics[f"val/balanced_accuracy/{a}"]) - metrics[f"val/error/{a}"] for a in attributes
            if f"val/balanced_accuracy/{a}" in metrics and f"val/error/{a}" in metrics]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _metrics_per_epoch(run: Run) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for key, points in run.metrics_over_epochs.items():
        for epoch, value in points:
            out.setdefault(epoch, {})[key] = value
    return out


def summary_affact(rep: Report, runs: Sequence[Run]) -> None:
    """Balanced vs unbalanced: which favours majority classes more on the imbalanced attributes (balanced error
    minus error), where (the attributes with the largest difference; Grad-CAM AMR), and since which checkpoint."""
    bal = [r for r in runs if r.variant == "balanced"]
    unb = [r for r in runs if r.variant == "unbalanced"]
    if not (bal and unb):
        return
    b, u = bal[-1], unb[-1]
    name = "class imbalance (AFFACT balanced vs unbalanced)"
    metrics = {r.label: (r.summary.get("metrics") or {}) for r in (b, u)}
    pair = affact_pair(runs)
    # the same imbalanced half as the AMR finding when the runs have Grad-CAM results
    attrs = [a for a in pair[0].last("amr").attributes if a in pair[1].last("amr").attributes] if pair else \
        sorted({k.split("/", 2)[2] for m in metrics.values() for k in m if k.startswith("val/error/")})
    chosen = imbalanced_attributes(attrs)
    mb, mu = majority_bias(metrics[b.label], chosen), majority_bias(metrics[u.label], chosen)
    if mb is None or mu is None:
        rep.answer(name, "which model is more biased", "not measured: the runs carry no per-attribute validation "
                                                       "metrics (val/error/*, val/balanced_accuracy/*)")
        return
    worst, other = (u, b) if mu >= mb else (b, u)
    rep.answer(name, "which model is more biased",
               f"{worst.label} favours the majority class more: over the {len(chosen)} most imbalanced attributes "
               f"its balanced error exceeds its error by {max(mb, mu):.3f} vs {min(mb, mu):.3f} for {other.label} "
               f"(mean balanced error {_fmt(b.metric('val/mean_balanced_error'))} balanced vs "
               f"{_fmt(u.metric('val/mean_balanced_error'))} unbalanced; mean error "
               f"{_fmt(b.metric('val/mean_error'))} vs {_fmt(u.metric('val/mean_error'))}).")
    per_attr = {a: (majority_bias(metrics[worst.label], [a]) or 0.0) - (majority_bias(metrics[other.label], [a]) or 0.0)
                for a in chosen}
    top = sorted(per_attr, key=per_attr.get, reverse=True)[:3]
    where = (f"attributes: the largest excess of {worst.label} is on " + ", ".join(f"{a} ({per_attr[a]:+.3f})" for a in top)
             + ". Network depth: no dissection or probing in these runs.")
    if pair is not None:
        rb, ru = pair[0].last("amr"), pair[1].last("amr")
        g = GROUPS.index("overall")

        def mean_amr(res):
            vals = [res.scores["amr"][g, res.attributes.index(a)] for a in chosen if a in res.attributes]
            vals = [v for v in vals if np.isfinite(v)]
            return float(np.mean(vals)) if vals else float("nan")

        where += (f" Grad-CAM: mean overall AMR on those attributes {mean_amr(rb):.3f} ({pair[0].label}) vs "
                  f"{mean_amr(ru):.3f} ({pair[1].label}); higher = more of the map inside the attribute's region.")
    rep.answer(name, "where in the network", where)
    sw = {e: majority_bias(m, chosen) for e, m in _metrics_per_epoch(worst).items()}
    so = {e: majority_bias(m, chosen) for e, m in _metrics_per_epoch(other).items()}
    sw = {e: v for e, v in sw.items() if v is not None}
    so = {e: v for e, v in so.items() if v is not None}
    if sw and so:
        e = since_above(sw, so)
        text = (f"{worst.label}'s majority-class bias is above {other.label}'s since the epoch-{e} checkpoint"
                if e is not None else f"{worst.label}'s majority-class bias does not stay above {other.label}'s "
                                      f"up to the last checkpoint")
        rep.answer(name, "since which checkpoint", f"{text} ({_series({k: sw[k] for k in so if k in sw}, so)}).")
    else:
        rep.answer(name, "since which checkpoint", "not measured: no per-checkpoint metrics (offline W&B run)")


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def build_report(paths: Sequence[str | Path], out: str | Path, title: str | None = None,
                 wandb: bool = False) -> Path:
    """Read the runs, write `<out>/report.html` and its PNGs; optionally log the same to a W&B report run."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, sweeps = load_runs(paths)
    rep = Report(out, title or f"facelens report: {', '.join(sweeps) or ', '.join(r.label for r in runs)}")
    rep.heading("Runs")
    rep.table("runs", ["run", "experiment", "P / variant", "folder", "best checkpoint", "W&B run", "analyses"],
              [[r.label, r.experiment, r.p if r.p is not None else r.variant, str(r.path),
                r.summary.get("best_checkpoint"), r.summary.get("wandb_run"),
                ", ".join(sorted(r.histories)) or "-"] for r in runs])
    for check in (claim_eyeglasses_units, claim_grayscale_units, claim_affact_amr, claim_probes):
        check(rep, runs)
    for kind in ("eyeglasses", "grayscale"):
        summary_bias(rep, runs, kind)
    summary_affact(rep, runs)
    for section in (section_eyeglasses, section_grayscale, section_affact, section_probing, section_histories):
        section(rep, runs)
    path = rep.write()
    if wandb:
        log_to_wandb(rep, out, group=next(iter(sweeps), None))
    return path


def log_to_wandb(rep: Report, out: Path, group: str | None = None) -> None:
    """The report's figures, tables and findings as one W&B run (offline unless WANDB_MODE says otherwise)."""
    import wandb

    from facelens.wandb_io import default_offline

    default_offline()
    run = wandb.init(project="facelens", job_type="report", group=group, dir=str(out), name="report")
    payload: dict[str, Any] = {f"report/figure/{k}": wandb.Image(str(p)) for k, p in rep.figures.items()}
    for name, (cols, rows) in rep.tables.items():
        payload[f"report/table/{name}"] = wandb.Table(columns=cols, data=[[_fmt(v) for v in r] for r in rows])
    payload["report/findings"] = wandb.Table(
        columns=["claim", "verdict", "numbers"],
        data=[[c, {True: "holds", False: "does not hold", None: "not measured"}[h], e] for c, h, e in rep.findings])
    payload["report/summary"] = wandb.Table(columns=["experiment", "question", "answer"],
                                            data=[list(a) for a in rep.answers])
    run.log(payload)
    where = Path(run.dir).parent
    run.finish()
    print(f"W&B report run: {where}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", nargs="+", required=True, help="run folders (runs/<id>) and/or sweep folders")
    parser.add_argument("--out", required=True, help="output folder for report.html and its PNGs")
    parser.add_argument("--title", help="page title")
    parser.add_argument("--wandb", action="store_true", help="also log figures and tables to a W&B report run")


def main(args: argparse.Namespace) -> int:
    path = build_report(args.runs, args.out, args.title, args.wandb)
    print(f"report: {path}")
    return 0
