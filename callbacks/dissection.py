"""Network Dissection and Hierarchical Network Dissection (seed 002) at training checkpoints
(`DissectionCallback`) and on saved checkpoints (`python analyze.py dissect ...`), over a Face Dictionary."""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from analysis.dissection import (
    DissectionConfig, DissectionResult, Dissector, plot_concept_histogram, plot_coverage, plot_region_counts,
    plot_top_images,
)
from analysis.layers import capture, resolve_layer
from callbacks.base import ONE_PROCESS, AnalysisCallback, Shard, write_json
from datamodules.face_dictionary import FaceDictionary, build_synthfaces


def dissected_network(model: nn.Module) -> nn.Module:
    """A facelens module's `net` (layer names such as `layer4` resolve inside its timm backbone), or the model."""
    return getattr(model, "net", model)


def load_dictionary(path: str | Path | None, count: int = 64, size: int = 64, seed: int = 0,
                    confidence: float = 0.9) -> FaceDictionary:
    """A saved dictionary, or (path None) a small SynthFaces one built in memory."""
    if path is not None:
        return FaceDictionary.load(path)
    return build_synthfaces(count, size, seed, confidence)


class DissectionReport:
    """Per-layer `DissectionResult`s of one model over one dictionary."""

    def __init__(self, layers: Mapping[str, DissectionResult], dictionary: str = ""):
        self.layers = dict(layers)
        self.dictionary = dictionary

    def to_dict(self) -> dict[str, Any]:
        return {"dictionary": self.dictionary, "layers": {n: r.to_dict() for n, r in self.layers.items()}}

    def headline(self) -> dict[str, float]:
        """Interpretable units (count, fraction) per layer for both methods, units per region, biased units."""
        out: dict[str, float] = {}
        for name, r in self.layers.items():
            out[f"{name}/netdissect_units"] = int(r.netdissect_interpretable.sum())
            out[f"{name}/netdissect_fraction"] = float(r.netdissect_interpretable.mean())
            out[f"{name}/hnd_units"] = int(r.hnd_interpretable.sum())
            out[f"{name}/hnd_fraction"] = float(r.hnd_interpretable.mean())
            local = r.local_interpretable.any(1)
            for region in dict.fromkeys(r.concept_regions):
                out[f"{name}/region/{region}"] = sum(1 for u, reg in enumerate(r.unit_regions)
                                                     if reg == region and local[u])
            for group, g in r.global_groups.items():
                out[f"{name}/biased/{group}"] = int(g.biased.any(1).sum())
        return out

    def to_table(self) -> dict[str, list]:
        tables = [r.to_table() for r in self.layers.values()]
        return {"columns": tables[0]["columns"] if tables else [], "data": [row for t in tables for row in t["data"]]}


def run_dissection(model: nn.Module, dictionary: FaceDictionary, layers: Sequence[str],
                   config: DissectionConfig | None = None, batch_size: int = 32,
                   device: torch.device | str | None = None, progress: bool = False,
                   shard: Shard = ONE_PROCESS) -> DissectionReport:
    """Both methods on `layers` of `model` (a facelens module or a plain network) over the dictionary.

    With several ranks each one streams its `shard` of the dictionary; after pass 1 the quantile states are
    gathered and merged (every rank gets the same exact thresholds), after pass 2 the counts and per-image rows,
    so the report equals a one-process run's."""
    from tqdm.auto import tqdm

    net = dissected_network(model)
    for name in layers:
        resolve_layer(net, name)  # a wrong name fails here with the valid names
    diss = Dissector(net, list(layers), **dictionary.dissect_arguments(), config=config, num_images=len(dictionary),
                     device=device)
    loader = DataLoader(Subset(dictionary.dataset(), shard.indices(len(dictionary))), batch_size=batch_size,
                        shuffle=False)
    was_training = net.training
    net.eval()
    try:
        for desc in ("dissection pass 1/2 (thresholds)", "dissection pass 2/2 (counts)"):
            for batch in tqdm(loader, desc=desc, disable=not progress):
                diss.update(batch)
            states = shard.gather({n: d.shard_state() for n, d in diss.layer_dissectors.items()})
            for rank, state in enumerate(states):
                if rank != shard.rank:
                    for name, d in diss.layer_dissectors.items():
                        d.merge(state[name])
            if not diss.counting:
                diss.start_counting()
    finally:
        net.train(was_training)
    return DissectionReport(diss.results(), dictionary.source)


@torch.no_grad()
def top_unit_figures(model: nn.Module, dictionary: FaceDictionary, result: DissectionResult, units: Sequence[int],
                     device: torch.device | str | None = None) -> dict[int, Any]:
    """For each unit, its top dictionary images with its thresholded map overlaid."""
    net = dissected_network(model)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    figures = {}
    for u in units:
        idx = [int(i) for i in result.top_images[u]]
        if not idx:
            continue
        images = torch.from_numpy(dictionary.images[idx]).permute(0, 3, 1, 2).float().div(255)
        with capture(net, [result.layer]) as store:
            net(images.to(device))
        maps = store[result.layer][:, u].float().cpu()
        title = (f"{result.layer} unit {u}: {result.concepts[result.netdissect_concept[u]]} "
                 f"IoU {result.netdissect_iou[u]:.3f}")
        figures[u] = plot_top_images(images, maps, float(result.thresholds[u]), title=title)
    return figures


def report_figures(model: nn.Module, dictionary: FaceDictionary, report: DissectionReport, top_units: int = 3,
                   device: torch.device | str | None = None) -> dict[str, Any]:
    """Named figures: Fig. 10 and Fig. 9 per layer, coverage (Figs. 12-13), top images of the best units."""
    figs: dict[str, Any] = {"coverage": plot_coverage(report.layers)}
    for name, r in report.layers.items():
        figs[f"{name}/concepts"] = plot_concept_histogram(r)
        figs[f"{name}/regions"] = plot_region_counts(r)
        best = np.argsort(-r.netdissect_iou, kind="stable")[:top_units]
        for u, fig in top_unit_figures(model, dictionary, r, best, device).items():
            figs[f"{name}/unit{u:04d}"] = fig
    return figs


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def figure_array(fig) -> np.ndarray:
    """(H, W, 4) uint8 pixels of a matplotlib Figure drawn with Agg (works without pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


class DissectionCallback(AnalysisCallback):
    """NetDissect + HND of `layers` over a Face Dictionary (a saved one at `dictionary`, or SynthFaces
    built in memory with `dictionary_count` images of `dictionary_size` px); scalars, tables and figures
    to the loggers, JSON beside the checkpoint."""

    name = "dissection"
    sharded = True

    def __init__(self, layers: list[str] | None = None, dictionary: str | None = None, dictionary_count: int = 64,
                 dictionary_size: int = 64, dictionary_seed: int = 0, confidence: float = 0.9,
                 config: dict | None = None, top_units: int = 3, every_n_epochs: int = 10, batch_size: int = 32,
                 run_on_last_epoch: bool = True):
        super().__init__(every_n_epochs=every_n_epochs, num_images=max(dictionary_count, 1), batch_size=batch_size,
                         run_on_last_epoch=run_on_last_epoch)
        self.layers = list(layers or ["layer4"])
        self.dictionary_path = dictionary
        self.dictionary_options = (dictionary_count, dictionary_size, dictionary_seed, confidence)
        try:
            self.config = DissectionConfig(**(config or {}))
        except TypeError as err:
            raise ValueError(f"DissectionCallback.config: {err}; options: {list(asdict(DissectionConfig()))}") from None
        self.top_units = top_units
        self._dictionary: FaceDictionary | None = None

    @property
    def dictionary(self) -> FaceDictionary:
        if self._dictionary is None:
            self._dictionary = load_dictionary(self.dictionary_path, *self.dictionary_options)
        return self._dictionary

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail at setup, not after an epoch: bad layer names and a missing dictionary."""
        net = dissected_network(pl_module)
        for name in self.layers:
            try:
                resolve_layer(net, name)
            except ValueError as err:
                raise ValueError(f"DissectionCallback.layers: {err}") from None
        _ = self.dictionary

    def probe_batches(self, trainer: pl.Trainer, device: torch.device, shard: Shard | None = None) -> list[dict]:
        return []  # the dictionary is the probe set, sharded by `run_dissection`

    def analyse(self, model: nn.Module, batches: list[dict], shard: Shard = ONE_PROCESS) -> DissectionReport:
        with torch.no_grad():
            return run_dissection(model, self.dictionary, self.layers, self.config, self.batch_size, shard=shard)

    def headline(self, result: DissectionReport) -> dict[str, float]:
        return result.headline()

    def log_extra(self, trainer: pl.Trainer, result: DissectionReport, epoch: int) -> None:
        loggers = [lg for lg in trainer.loggers if hasattr(lg, "log_table")]
        if not loggers:
            return
        import wandb

        figs = report_figures(trainer.lightning_module, self.dictionary, result, self.top_units)
        for logger in loggers:
            table = result.to_table()
            logger.log_table(key=f"{self.name}/units", columns=table["columns"], data=table["data"],
                             step=trainer.global_step)
            logger.experiment.log({f"{self.name}/{k}": wandb.Image(figure_array(f)) for k, f in figs.items()},
                                  step=trainer.global_step)
        for f in figs.values():
            _close(f)


# --------------------------------------------------------------------------------------------------
# analyze.py dissect
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from callbacks.offline import add_common_arguments

    add_common_arguments(parser)
    parser.add_argument("--layers", nargs="+", default=["layer4"], help="layer names as the backbone names them")
    parser.add_argument("--dictionary", help="a saved Face Dictionary folder (default: SynthFaces in memory)")
    parser.add_argument("--dictionary-count", type=int, default=200, help="images of the in-memory dictionary")
    parser.add_argument("--quantile", type=float, default=0.005, help="top activation quantile per unit")
    parser.add_argument("--quantile-method", choices=("exact", "sketch"), default="exact")
    parser.add_argument("--iou-threshold", type=float, default=0.04)
    parser.add_argument("--top-units", type=int, default=3, help="units per layer shown with their top images")


def main(args: argparse.Namespace) -> int:
    from callbacks.offline import load_model, output_dir, wandb_run

    model = load_model(args)
    dictionary = load_dictionary(args.dictionary, args.dictionary_count, args.size or 64)
    config = DissectionConfig(quantile=args.quantile, quantile_method=args.quantile_method,
                              iou_threshold=args.iou_threshold)
    report = run_dissection(model, dictionary, args.layers, config, args.batch_size, args.device, progress=True)
    out = output_dir(args)
    payload = {"checkpoint": str(args.checkpoint), "dictionary": args.dictionary or "synthfaces (in memory)",
               "layers": {n: r.to_dict() for n, r in report.layers.items()}}
    write_json(out / "dissection.json", payload)
    figs = report_figures(model, dictionary, report, args.top_units, args.device)
    for key, fig in figs.items():
        fig.savefig(out / f"{key.replace('/', '_')}.png", dpi=100)
        _close(fig)
    run = wandb_run(args, "dissect")
    if run is not None:
        import wandb

        table = report.to_table()
        run.log({"dissection/units": wandb.Table(**table), **{f"dissection/{k}": v for k, v in report.headline().items()},
                 **{f"dissection/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("*.png"))}})
        run.finish()
    for name, r in report.layers.items():
        print(f"{name}: {int(r.netdissect_interpretable.sum())}/{r.num_units} NetDissect-interpretable, "
              f"{int(r.hnd_interpretable.sum())}/{r.num_units} HND-interpretable")
    print(f"wrote {out / 'dissection.json'}")
    return 0
