"""Probing (seed 003) at training checkpoints (`ProbingCallback`) and on saved checkpoints
(`python analyze.py probe ...`): PLS + QDA accuracy of layers, top channels and top neurons per attribute."""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from torch import nn

from analysis.layers import resolve_layer
from analysis.probing import (
    ProbingResult, ablation_study, collect_batches, conv_and_block_layers, extract_features, plot_accuracy_over_depth,
    plot_mean_accuracy, plot_vip_analysis, probe, vip_analysis,
)
from callbacks.base import ONE_PROCESS, AnalysisCallback, Shard, write_json
from facelens.attributes import ATTRIBUTE_INDEX, resolve_attributes

log = logging.getLogger(__name__)

KINDS = ("layer_acc", "channel_acc", "neuron_acc")
# With several ranks, features of at most this many bytes are gathered at once (a group of layers).
GATHERED_FEATURE_BYTES = 256 << 20


# --------------------------------------------------------------------------------------------------
# Shared by the callback and the subcommand
# --------------------------------------------------------------------------------------------------


def probed_network(model: nn.Module) -> nn.Module:
    """The network whose layers are probed: a facelens module's `net` (layer names such as `layer3.1`
    resolve inside its timm `backbone`), or the model itself."""
    return getattr(model, "net", model)


def default_layers(model: nn.Module, convs: bool = False) -> list[str]:
    """Residual-block outputs of the backbone in depth order (with every convolution when `convs`)."""
    net = probed_network(model)
    return conv_and_block_layers(getattr(net, "backbone", net), convs=convs, blocks=True)


def resolve_layers(model: nn.Module, layers: Sequence[str] | str | None, option: str = "layers") -> list[str]:
    """None or 'blocks': residual blocks; 'all': convolutions and blocks; else names checked against the model
    (a wrong name fails with the valid probing points and the closest module names)."""
    if layers is None or layers in ("blocks", ["blocks"]):
        return default_layers(model)
    if layers in ("all", ["all"]):
        return default_layers(model, convs=True)
    names = [layers] if isinstance(layers, str) else list(layers)
    net = probed_network(model)
    for name in names:
        try:
            resolve_layer(net, name)
        except ValueError as err:
            raise ValueError(f"{option}: {err}\nProbing points of this model (convolutions and blocks): "
                             f"{', '.join(default_layers(model, convs=True))}") from None
    if len(set(names)) != len(names):
        raise ValueError(f"{option}: duplicated layer names in {names}")
    return names


def labelled_attributes(data: dict[str, torch.Tensor], requested: Sequence[str] | None, model: nn.Module,
                        option: str = "attributes") -> list[str]:
    """Requested attributes (default: the model's) that the probe data labels; a requested attribute
    without labels fails, while defaults the data does not label are left out."""
    mask = data["attribute_mask"].bool()
    labelled = {name for name, i in ATTRIBUTE_INDEX.items() if mask[:, i].any()}
    if requested is not None:
        names = resolve_attributes(requested, option)
        missing = [n for n in names if n not in labelled]
        if missing:
            raise ValueError(f"{option}: {missing} carry no labels in the probe data; labelled attributes: "
                             f"{', '.join(n for n in ATTRIBUTE_INDEX if n in labelled)}")
        return names
    names = list(getattr(model, "attribute_names", None) or ATTRIBUTE_INDEX)
    return [n for n in names if n in labelled]


def feasible_attributes(data: dict[str, torch.Tensor], attributes: Sequence[str],
                        n_train: int) -> tuple[list[str], dict]:
    """Split attributes into those with enough labelled samples of each class for a balanced training set of
    n_train plus validation, and the rest with their class counts."""
    keep, skipped = [], {}
    for name in attributes:
        col = ATTRIBUTE_INDEX[name]
        known = data["attribute_mask"][:, col].bool()
        pos = int((data["attributes"][known, col] > 0.5).sum())
        neg = int(known.sum()) - pos
        if min(pos, neg) >= n_train // 2 + 1:
            keep.append(name)
        else:
            skipped[name] = {"positives": pos, "negatives": neg}
    return keep, skipped


def _collect(batches: list[dict]) -> dict[str, torch.Tensor]:
    """`collect_batches`, or empty tensors for a rank whose shard holds no image."""
    if batches:
        return collect_batches(batches)
    n = len(ATTRIBUTE_INDEX)
    return {"image": torch.zeros(0, 3, 1, 1), "attributes": torch.zeros(0, n),
            "attribute_mask": torch.zeros(0, n, dtype=torch.bool)}


def mean_curve(result: ProbingResult, kind: str = "layer_acc") -> list[float]:
    """Mean accuracy over attributes at each depth (the Fig 5.4 curve)."""
    out = []
    for layer in result.layers:
        vals = [getattr(result.entries[(layer, a)], kind) for a in result.attributes]
        vals = [v for v in vals if v is not None]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return out


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Callback
# --------------------------------------------------------------------------------------------------


class ProbingCallback(AnalysisCallback):
    """Probes chosen layers for chosen attributes every `every_n_epochs` epochs (seed 003 section 5.1).

    The probe pool is the first `num_images` evaluation-prepared images of `split`; each attribute draws a
    balanced sample of `n_train` training and up to `n_val` validation images from it (the same sample at
    every epoch, so curves over training compare like with like). Attributes the pool cannot balance are
    skipped and listed under `config.skipped` in the JSON. A layer whose sampled features exceed
    `max_feature_mib` is streamed: its PLS passes run over batches of activations recomputed from the images,
    never one matrix. The defaults (the residual blocks of a resnet18, 128 + 128 images, 64 px) take seconds per
    attribute on CPU.

    Logs scalars `probing/last_layer_acc/<attribute>`, `probing/mean_layer_acc/<layer>`,
    `probing/mean_last_layer_acc`; W&B gets the result table and the Figs 5.1-5.3 accuracy-over-depth plot.
    """

    name = "probing"
    sharded = True

    def __init__(self, layers: list[str] | str | None = None, attributes: list[str] | None = None,
                 n_train: int = 128, n_val: int = 128, n_components: int = 8, top_k: int = 8, seed: int = 0,
                 precision: str = "auto", every_n_epochs: int = 3, num_images: int = 512, split: str = "val",
                 batch_size: int = 64, run_on_last_epoch: bool = True, max_feature_mib: float = 2048):
        super().__init__(every_n_epochs, num_images, split, batch_size, run_on_last_epoch)
        if max_feature_mib <= 0:
            raise ValueError(f"ProbingCallback.max_feature_mib must be positive, got {max_feature_mib}")
        if n_train < 2 or n_train % 2 or n_val < 2 or n_val % 2:
            raise ValueError(f"ProbingCallback: n_train and n_val must be even and >= 2, got {n_train}, {n_val}")
        if num_images < n_train + n_val:
            raise ValueError(f"ProbingCallback: num_images={num_images} cannot hold n_train={n_train} + n_val={n_val}")
        if attributes is not None:
            attributes = resolve_attributes(attributes, "ProbingCallback.attributes")
        self.layers, self.attributes = layers, attributes
        self.n_train, self.n_val, self.n_components, self.top_k = n_train, n_val, n_components, top_k
        self.seed, self.precision = seed, precision
        self.max_feature_bytes = int(max_feature_mib * 2**20)

    def analyse(self, model: nn.Module, batches: list[dict], shard: Shard = ONE_PROCESS) -> ProbingResult:
        """Labels of every rank's shard are gathered in probe-set order, so all ranks draw the same balanced
        samples; `probe` then shards feature extraction and fits over the ranks (see its `shard`)."""
        data = _collect(batches)
        if shard.world_size > 1:
            parts = shard.gather({k: data[k] for k in ("attributes", "attribute_mask")})
            data.update({k: shard.interleave([p[k] for p in parts]) for k in ("attributes", "attribute_mask")})
        layers = resolve_layers(model, self.layers, "ProbingCallback.layers")
        wanted = labelled_attributes(data, self.attributes, model, "ProbingCallback.attributes")
        attributes, skipped = feasible_attributes(data, wanted, self.n_train)
        if skipped:
            log.warning("ProbingCallback: too few samples of one class among %d probe images for %s; raise num_images",
                        len(data["attributes"]), skipped)
        if not attributes:
            raise ValueError(f"ProbingCallback: no attribute can be balanced with n_train={self.n_train} in "
                             f"num_images={self.num_images} images (class counts {skipped})")
        device = next(model.parameters()).device
        several = shard.world_size > 1
        result = probe(probed_network(model), layers, data["image"], data["attributes"], data["attribute_mask"],
                       attributes, self.n_train, self.n_val, self.n_components, self.top_k, seed=self.seed,
                       batch_size=self.batch_size, device=device, keep_probes=False, precision=self.precision,
                       max_feature_bytes=min(self.max_feature_bytes, GATHERED_FEATURE_BYTES) if several
                       else self.max_feature_bytes,
                       shard=shard if several else None)
        result.config["skipped"] = skipped
        return result

    def headline(self, result: ProbingResult) -> dict[str, float]:
        last = result.layers[-1]
        out = {f"last_layer_acc/{a}": result[(last, a)].layer_acc for a in result.attributes}
        out.update({f"mean_layer_acc/{layer}": v for layer, v in zip(result.layers, mean_curve(result))})
        out["mean_last_layer_acc"] = mean_curve(result)[-1]
        return out

    def log_extra(self, trainer: pl.Trainer, result: ProbingResult, epoch: int) -> None:
        from callbacks.run_directory import run_dir

        fig = plot_accuracy_over_depth(result)
        folder = run_dir(trainer) / "analysis" / self.name
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / f"epoch{epoch:03d}.png", dpi=110)
        rows = result.to_table()
        columns = list(rows[0])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.log_table(key=f"{self.name}/table", columns=columns,
                                 data=[[row[c] for c in columns] for row in rows], step=trainer.global_step)
                logger.experiment.log({f"{self.name}/accuracy_over_depth": wandb.Image(fig),
                                       "trainer/global_step": trainer.global_step})
        import matplotlib.pyplot as plt

        plt.close(fig)


# --------------------------------------------------------------------------------------------------
# analyze.py probe
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from callbacks.offline import add_common_arguments

    add_common_arguments(parser)
    parser.set_defaults(num_images=2048)
    parser.add_argument("--layers", nargs="+", default=None,
                        help="layer names (e.g. layer1.0 layer4.1), 'blocks' (default: residual blocks) or 'all' "
                             "(every convolution and block)")
    parser.add_argument("--attributes", nargs="+", default=None,
                        help="attributes to probe (default: the model's attributes the data labels; 'all')")
    parser.add_argument("--n-train", type=int, default=512, help="balanced training sample per attribute")
    parser.add_argument("--n-val", type=int, default=512, help="balanced validation sample per attribute (at most)")
    parser.add_argument("--n-components", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=8, help="top channels / neurons")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "float64"))
    parser.add_argument("--compare-random", action="store_true",
                        help="probe the trained and the random-init model and plot both (Fig 5.4)")
    parser.add_argument("--ablation", metavar="LAYER",
                        help="zero the top 1/5/10%% VIP neurons of LAYER and report later layers' drops (Table 5.4)")
    parser.add_argument("--vip-analysis", action="store_true",
                        help="VIP vs single-neuron accuracy against mean positive activation (section 5.3)")
    parser.add_argument("--vip-neurons", type=int, default=50)


def _probe_one(args: argparse.Namespace, model: nn.Module, data: dict, layers: list[str],
               attributes: list[str]) -> ProbingResult:
    return probe(probed_network(model), layers, data["image"], data["attributes"], data["attribute_mask"],
                 attributes, args.n_train, args.n_val, args.n_components, args.top_k, seed=args.seed,
                 batch_size=args.batch_size, device=args.device, precision=args.precision)


def _write_result(result: ProbingResult, folder: Path, stem: str = "probing") -> None:
    write_json(folder / f"{stem}.json", result.to_dict())
    save_figure(plot_accuracy_over_depth(result), folder / f"{stem}_accuracy_over_depth.png")


def main(args: argparse.Namespace) -> int:
    from callbacks.offline import build_datamodule, output_dir, probe_batches, wandb_run

    if args.compare_random and args.random_init:
        raise ValueError("--compare-random already probes the random-init model; drop --random-init")
    out = output_dir(args)
    model = _load(args)
    layers = resolve_layers(model, args.layers, "--layers")
    data = collect_batches(probe_batches(args, build_datamodule(args)))
    attributes = labelled_attributes(data, args.attributes, model, "--attributes")
    usable, skipped = feasible_attributes(data, attributes, args.n_train)
    if skipped:
        raise ValueError(f"--n-train {args.n_train}: too few samples of one class among --num-images "
                         f"{args.num_images} for {skipped}; raise --num-images or lower --n-train")
    if args.ablation is not None:
        resolve_layers(model, [args.ablation], "--ablation")
        if args.ablation not in layers or args.ablation == layers[-1]:
            raise ValueError(f"--ablation {args.ablation}: must be one of the probed --layers other than the last "
                             f"({', '.join(layers[:-1])})")

    result = _probe_one(args, model, data, layers, usable)
    result.config["random_init"] = bool(args.random_init)
    _write_result(result, out)
    summary = {"mean_layer_acc": dict(zip(layers, mean_curve(result)))}
    curves = {"random init" if args.random_init else "trained": result}
    if args.compare_random:
        random_model = _load(argparse.Namespace(**{**vars(args), "random_init": True}))
        baseline = _probe_one(args, random_model, data, layers, usable)
        baseline.config["random_init"] = True
        _write_result(baseline, out, "probing_random_init")
        curves["random init"] = baseline
        summary["random_init_mean_layer_acc"] = dict(zip(layers, mean_curve(baseline)))
    save_figure(plot_mean_accuracy(curves), out / "mean_accuracy_over_depth.png")

    if args.ablation is not None:
        ablations = {a: ablation_study(probed_network(model), result, data["image"], args.ablation, a,
                                       batch_size=args.batch_size, device=args.device,
                                       labels=data["attributes"]).to_dict() for a in usable}
        write_json(out / "ablation.json", ablations)
    if args.vip_analysis:
        write_json(out / "vip_analysis.json", _vip_analyses(args, model, data, result, out))

    run = wandb_run(args, "probe")
    if run is not None:
        import wandb

        rows = result.to_table()
        run.log({"probing/table": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows]),
                 **{f"probing/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("*.png"))}})
        run.finish()
    print(json.dumps(summary, indent=1))
    return 0


def _load(args: argparse.Namespace) -> nn.Module:
    """The checkpoint's module; a random init is drawn from --seed, so baselines are reproducible."""
    from callbacks.offline import load_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return load_model(args)


def _vip_analyses(args: argparse.Namespace, model: nn.Module, data: dict, result: ProbingResult,
                  out: Path) -> dict[str, Any]:
    """Section 5.3 for every probed (layer, attribute), with a Fig 5.9 plot per pair."""
    analyses: dict[str, Any] = {}
    pool = torch.unique(torch.cat([torch.cat(split) for split in result.splits.values()]))  # sampled images only
    for layer in result.layers:
        feats, _ = extract_features(probed_network(model), [layer], data["image"][pool], args.batch_size, args.device)
        X = feats[layer]
        for attr in result.attributes:
            train, val = (torch.searchsorted(pool, idx) for idx in result.splits[attr])
            y = (data["attributes"][pool, ATTRIBUTE_INDEX[attr]] > 0.5).long()
            vip = result[(layer, attr)].vip
            analysis = vip_analysis(X[train], y[train], X[val], y[val], vip, args.vip_neurons, args.seed)
            analyses.setdefault(layer, {})[attr] = analysis.to_dict()
            save_figure(plot_vip_analysis(analysis, vip, f"{layer} {attr}"), out / f"vip_{layer}_{attr}.png")
    return analyses
