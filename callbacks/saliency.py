"""Saliency beyond Grad-CAM and its trust checks (seed 001) at training checkpoints (`SaliencySanityCallback`)
and on saved checkpoints (`python analyze.py saliency ...`).

Per method and attribute: AMR against the attribute masks (seed 004), deletion and insertion AUC (the hiding
game), pointing accuracy, and the cascading randomisation similarity per step (Adebayo et al.).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from analysis.amr import amr_scores, minmax_normalize
from analysis.face_regions import attribute_masks
from analysis.gradcam import TARGETS
from analysis.saliency import METHODS, saliency
from analysis.saliency_eval import BASELINES, cascading_randomization, hiding_game, pointing_game
from callbacks.base import ONE_PROCESS, AnalysisCallback, Shard, write_json
from facelens.attributes import resolve_attributes


@dataclass
class SaliencyConfig:
    """Options of the saliency report. Windows and strides are pixels of the model's input images."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    target: str = "predicted"
    layer: str = "layer4"                     # Grad-CAM layer
    occlusion_window: int = 16
    occlusion_stride: int = 8
    occlusion_fill: float | str = 0.0         # seed 001 eq. 1: x * (1 - p), i.e. zeros; or 'mean', 'blur'
    smoothgrad_samples: int = 16
    smoothgrad_noise: float = 0.15
    ig_steps: int = 32
    ig_baseline: float | str = 0.0
    hiding_steps: int = 16
    hiding_baseline: str = "blur"
    hiding_score: str = "probability"
    insertion: bool = True
    mask_version: int = 1
    pointing_tolerance: int = 0
    amr_relative_threshold: float = 0.5       # second AMR with D = map > this * max(map)
    randomization_images: int = 4             # images of the first batch used for the sanity check
    randomization_steps: list[str] | None = None
    images_per_pass: int = 64
    seed: int = 0

    def __post_init__(self):
        self.methods = list(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"saliency methods: unknown {bad or 'empty list'}; choose from {', '.join(METHODS)}")
        if self.target not in TARGETS:
            raise ValueError(f"saliency target: {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.hiding_baseline not in BASELINES:
            raise ValueError(f"saliency hiding_baseline: {self.hiding_baseline!r} is not one of {BASELINES}")
        if self.randomization_images < 0:
            raise ValueError(f"saliency randomization_images must be >= 0, got {self.randomization_images}")

    def method_options(self, method: str) -> dict[str, Any]:
        if method == "gradcam":
            return {"layer": self.layer}
        if method == "occlusion":
            return {"window": self.occlusion_window, "stride": self.occlusion_stride, "fill": self.occlusion_fill,
                    "images_per_pass": self.images_per_pass}
        if method == "smoothgrad":
            return {"samples": self.smoothgrad_samples, "noise": self.smoothgrad_noise}
        return {"steps": self.ig_steps, "baseline": self.ig_baseline}


SCALARS = ("amr", "amr_relative", "energy", "deletion_auc", "insertion_auc", "pointing", "pointing_gt_pos")


class SaliencyReport:
    """Per method: per attribute means of SCALARS and the randomisation similarity per step; plus an example
    image with each method's maps for the figure."""

    def __init__(self, attributes: Sequence[str], config: SaliencyConfig):
        self.attributes = list(attributes)
        self.config = config
        t = len(self.attributes)
        self.sums = {m: {k: np.zeros(t) for k in SCALARS} for m in config.methods}
        self.counts = {m: {k: np.zeros(t) for k in SCALARS} for m in config.methods}
        self.randomization: dict[str, dict] = {}
        self.example_image: np.ndarray | None = None
        self.example_maps: dict[str, np.ndarray] = {}
        self.num_images = 0

    def add(self, method: str, name: str, values: torch.Tensor, valid: torch.Tensor) -> None:
        values = values.detach().double().cpu().numpy()
        valid = valid.detach().cpu().numpy().astype(bool)
        self.sums[method][name] += np.where(valid, values, 0).sum(0)
        self.counts[method][name] += valid.sum(0)

    def merge(self, other: SaliencyReport) -> SaliencyReport:
        """Add another shard's sums and counts (e.g. another rank's images); the example and the randomisation
        check are kept from whichever report has them (the one holding the probe set's first image). Returns
        self."""
        if other.attributes != self.attributes or other.config.methods != self.config.methods:
            raise ValueError(f"SaliencyReport.merge: attributes or methods differ: {self.attributes}, "
                             f"{self.config.methods} vs {other.attributes}, {other.config.methods}")
        for m in self.config.methods:
            for k in SCALARS:
                self.sums[m][k] += other.sums[m][k]
                self.counts[m][k] += other.counts[m][k]
        self.num_images += other.num_images
        self.randomization = self.randomization or other.randomization
        if self.example_image is None:
            self.example_image, self.example_maps = other.example_image, other.example_maps
        return self

    def means(self, method: str, name: str) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums[method][name] / self.counts[method][name]

    def to_dict(self) -> dict[str, Any]:
        methods = {}
        for m in self.config.methods:
            per_attr = {}
            for i, a in enumerate(self.attributes):
                entry = {k: _finite(self.means(m, k)[i]) for k in SCALARS}
                rnd = self.randomization.get(m)
                if rnd is not None:
                    entry["randomization"] = {"steps": rnd["steps"], "spearman": [s[i] for s in rnd["spearman"]],
                                              "ssim": [s[i] for s in rnd["ssim"]]}
                per_attr[a] = entry
            methods[m] = per_attr
        return {"attributes": self.attributes, "num_images": self.num_images, "config": asdict(self.config),
                "methods": methods}

    def headline(self) -> dict[str, float]:
        """Per method, means over attributes; randomisation similarity after the first and the last step."""
        out = {}
        for m in self.config.methods:
            for k in SCALARS:
                v = self.means(m, k)
                if np.isfinite(v).any():
                    out[f"{m}/{k}"] = float(np.nanmean(v))
            rnd = self.randomization.get(m)
            if rnd is not None:
                for metric in ("spearman", "ssim"):
                    out[f"{m}/randomization_{metric}_first"] = float(np.mean(rnd[metric][0]))
                    out[f"{m}/randomization_{metric}_last"] = float(np.mean(rnd[metric][-1]))
        return out


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _fixed_labels(logits: torch.Tensor) -> torch.Tensor:
    """The trained model's predictions as {-1, 1} labels: with target='ground_truth' they keep the explained
    function fixed while the randomised model's own predictions change."""
    return torch.where(logits > 0, 1.0, -1.0)


def run_saliency(model: nn.Module, batches: Sequence[dict], config: SaliencyConfig | None = None,
                 attributes: Sequence[str] | None = None, randomization: bool = True) -> SaliencyReport:
    """All methods and checks of `config` on evaluation batches (batch contract) for a facelens attribute
    model (`model.attribute_names`, `model.select(batch)`); `randomization=False` leaves out the cascading
    randomisation check (run on the first batch's first images). SmoothGrad's noise for an image is drawn
    from `config.seed` and the image's `index`, so maps do not depend on how images are batched."""
    config = config or SaliencyConfig()
    names = list(getattr(model, "attribute_names", []))
    chosen = resolve_attributes(attributes, "saliency attributes") if attributes is not None else names
    missing = [a for a in chosen if a not in names]
    if missing:
        raise ValueError(f"saliency attributes: {missing} are not outputs of this model ({names})")
    targets = [names.index(a) for a in chosen]
    report = SaliencyReport(chosen, config)
    for bi, batch in enumerate(batches):
        images = batch["image"]
        labels, label_mask = model.select(batch)
        labels, label_mask = labels[:, targets], label_mask[:, targets].bool()
        size = images.shape[-1]
        masks = attribute_masks(config.mask_version, size, batch.get("landmarks"), chosen)
        report.num_images += images.shape[0]
        for method in config.methods:
            opts = config.method_options(method)
            if method == "smoothgrad":
                maps = _seeded_smoothgrad(model, batch, report.num_images - images.shape[0], targets, labels, config)
            else:
                maps = saliency(model, images, method, targets=targets, target=config.target, labels=labels, **opts)
            scores = amr_scores(maps, masks)
            rel = amr_scores(maps / maps.amax((-2, -1), keepdim=True).clamp_min(1e-30), masks,
                             config.amr_relative_threshold)
            report.add(method, "amr", scores.amr, label_mask)
            report.add(method, "energy", scores.energy, label_mask)
            report.add(method, "amr_relative", rel.amr, label_mask)
            hide = {"targets": targets, "target": config.target, "labels": labels, "steps": config.hiding_steps,
                    "baseline": config.hiding_baseline, "score": config.hiding_score,
                    "images_per_pass": config.images_per_pass}
            report.add(method, "deletion_auc", hiding_game(model, images, maps, "deletion", **hide).auc, label_mask)
            if config.insertion:
                report.add(method, "insertion_auc", hiding_game(model, images, maps, "insertion", **hide).auc,
                           label_mask)
            hits, valid = pointing_game(maps, masks, config.pointing_tolerance)
            report.add(method, "pointing", hits.double(), label_mask & valid)
            report.add(method, "pointing_gt_pos", hits.double(), label_mask & valid & (labels > 0))
            if bi == 0:
                report.example_maps[method] = minmax_normalize(maps[0].double()).cpu().numpy()
        if bi == 0:
            report.example_image = images[0].detach().float().permute(1, 2, 0).cpu().numpy()
            if randomization and config.randomization_images > 0:
                randomize(model, images[:config.randomization_images], targets, config, report)
    return report


def _seeded_smoothgrad(model: nn.Module, batch: dict, first: int, targets: list[int], labels: torch.Tensor,
                       config: SaliencyConfig) -> torch.Tensor:
    """SmoothGrad one image at a time, each with noise from a generator seeded by (seed, image index); the
    index is the batch's `index` entry, else the image's position in the stream (`first` + offset)."""
    images = batch["image"]
    index = batch.get("index")
    index = index.tolist() if torch.is_tensor(index) else list(range(first, first + images.shape[0]))
    opts = config.method_options("smoothgrad")
    maps = []
    for i, item in enumerate(index):
        gen = torch.Generator(images.device).manual_seed(config.seed * 1_000_003 + int(item))
        maps.append(saliency(model, images[i:i + 1], "smoothgrad", targets=targets, target=config.target,
                             labels=labels[i:i + 1], generator=gen, **opts))
    return torch.cat(maps)


def randomize(model: nn.Module, images: torch.Tensor, targets: list[int], config: SaliencyConfig,
              report: SaliencyReport) -> None:
    """The cascading randomisation check of every method on `images`, stored in `report.randomization`."""
    with torch.no_grad():
        fixed = _fixed_labels(model(images))
    for method in config.methods:
        opts = config.method_options(method)

        def explain(m, x, method=method, opts=opts):
            # Same noise for trained and randomised models: the maps differ only through the weights.
            gen = {"generator": torch.Generator(x.device).manual_seed(config.seed)} if method == "smoothgrad" else {}
            return saliency(m, x, method, targets=targets, target="ground_truth", labels=fixed, **opts, **gen)

        res = cascading_randomization(model, images, explain, config.randomization_steps, seed=config.seed)
        means = res.mean()
        report.randomization[method] = {"steps": res.steps, **means}


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------


def methods_figure(report: SaliencyReport, max_attributes: int = 8):
    """Seed 001 Fig. 4 style: one row per attribute, the example image then each method's map over it."""
    from matplotlib.figure import Figure

    attrs = report.attributes[:max_attributes]
    methods = [m for m in report.config.methods if m in report.example_maps]
    fig = Figure(figsize=(1.6 * (len(methods) + 1), 1.6 * len(attrs) + 0.4))
    axes = fig.subplots(len(attrs), len(methods) + 1, squeeze=False)
    image = np.clip(report.example_image, 0, 1) if report.example_image is not None else None
    for r, attr in enumerate(attrs):
        i = report.attributes.index(attr)
        axes[r, 0].imshow(image)
        axes[r, 0].set_ylabel(attr, fontsize=7)
        for c, m in enumerate(methods, start=1):
            axes[r, c].imshow(image)
            axes[r, c].imshow(report.example_maps[m][i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title(m, fontsize=7)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def randomization_figure(report: SaliencyReport):
    """Mean Spearman and SSIM over attributes per cumulative randomisation step, one line per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3))
    axes = fig.subplots(1, 2)
    for m, rnd in report.randomization.items():
        for ax, metric in zip(axes, ("spearman", "ssim")):
            ax.plot(range(len(rnd["steps"])), [float(np.mean(v)) for v in rnd[metric]], marker="o", label=m)
            ax.set_xticks(range(len(rnd["steps"])), rnd["steps"], rotation=45, fontsize=7)
            ax.set_title(f"{metric} to trained-model maps", fontsize=8)
            ax.set_ylim(-0.2, 1.05)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def report_figures(report: SaliencyReport) -> dict[str, Any]:
    figs = {"methods": methods_figure(report)}
    if report.randomization:
        figs["randomization"] = randomization_figure(report)
    return figs


def _figure_array(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


# --------------------------------------------------------------------------------------------------
# callback
# --------------------------------------------------------------------------------------------------


class SaliencySanityCallback(AnalysisCallback):
    """Randomisation sanity check and deletion AUC (plus AMR and pointing) of `methods` on a small probe set at
    checkpoints; scalars and figures to the loggers, JSON beside the checkpoint. `config` takes any
    `SaliencyConfig` field (insertion is off by default here to halve the cost)."""

    name = "saliency"
    sharded = True

    def __init__(self, methods: list[str] | None = None, attributes: list[str] | None = None,
                 config: dict | None = None, every_n_epochs: int = 10, num_images: int = 4, split: str = "val",
                 batch_size: int = 8, run_on_last_epoch: bool = True):
        super().__init__(every_n_epochs=every_n_epochs, num_images=num_images, split=split, batch_size=batch_size,
                         run_on_last_epoch=run_on_last_epoch)
        options = {"insertion": False, "randomization_images": min(num_images, 4), **(config or {})}
        if methods is not None:
            options["methods"] = methods
        valid = {f.name for f in fields(SaliencyConfig)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"SaliencySanityCallback.config: unknown option(s) {unknown}; options: {sorted(valid)}")
        self.config = SaliencyConfig(**options)
        self.attributes = attributes
        self._head: list[dict] | None = None

    def probe_batches(self, trainer: pl.Trainer, device: torch.device, shard: Shard | None = None) -> list[dict]:
        """This rank's share; rank zero of several also loads the probe set's head (the images of the
        randomisation check, which a single process takes from its first batch)."""
        self._head = None
        if shard is not None and shard.world_size > 1 and shard.is_zero and self.config.randomization_images > 0:
            loader = getattr(trainer.datamodule, f"{self.split}_dataloader")()
            head = range(min(self.config.randomization_images, self.batch_size, self.num_images,
                             len(loader.dataset)))
            self._head = self.load_probe(trainer, loader.dataset, device, head, loader.collate_fn)
        return super().probe_batches(trainer, device, shard)

    def analyse(self, model: nn.Module, batches: list[dict], shard: Shard = ONE_PROCESS) -> SaliencyReport:
        """Every rank scores its shard; the sums are gathered and added in rank order; rank zero then runs the
        randomisation check on the first probe images."""
        one = shard.world_size == 1
        part = run_saliency(model, batches, self.config, self.attributes, randomization=one)
        parts = shard.gather(part)
        report = parts[0]
        for other in parts[1:]:
            report.merge(other)
        if report.num_images == 0:
            raise ValueError(f"SaliencySanityCallback: the {self.split} split gave no probe images")
        if not one and shard.is_zero and self._head:
            images = self._head[0]["image"][:self.config.randomization_images]
            names = list(model.attribute_names)
            randomize(model, images, [names.index(a) for a in report.attributes], self.config, report)
        return report

    def headline(self, result: SaliencyReport) -> dict[str, float]:
        return result.headline()

    def log_extra(self, trainer: pl.Trainer, result: SaliencyReport, epoch: int) -> None:
        loggers = [lg for lg in trainer.loggers if hasattr(lg, "experiment") and hasattr(lg, "log_table")]
        if not loggers:
            return
        import wandb

        figs = report_figures(result)
        images = {f"{self.name}/{k}": wandb.Image(_figure_array(f)) for k, f in figs.items()}
        for logger in loggers:
            logger.experiment.log(images, step=trainer.global_step)


# --------------------------------------------------------------------------------------------------
# analyze.py saliency
# --------------------------------------------------------------------------------------------------


def _number_or_word(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from callbacks.offline import add_common_arguments

    add_common_arguments(parser)
    d = SaliencyConfig()
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--attributes", help="comma-separated attributes (default: all outputs of the model)")
    parser.add_argument("--target", default=d.target, choices=TARGETS)
    parser.add_argument("--layer", default=d.layer, help="Grad-CAM layer")
    parser.add_argument("--occlusion-window", type=int, default=d.occlusion_window, help="patch side in pixels")
    parser.add_argument("--occlusion-stride", type=int, default=d.occlusion_stride, help="patch step in pixels")
    parser.add_argument("--occlusion-fill", type=_number_or_word, default=d.occlusion_fill,
                        help="a number, zero, mean or blur")
    parser.add_argument("--smoothgrad-samples", type=int, default=d.smoothgrad_samples)
    parser.add_argument("--smoothgrad-noise", type=float, default=d.smoothgrad_noise,
                        help="noise sigma as a fraction of the image's value range")
    parser.add_argument("--ig-steps", type=int, default=d.ig_steps)
    parser.add_argument("--ig-baseline", type=_number_or_word, default=d.ig_baseline,
                        help="a number, zero, mean or blur")
    parser.add_argument("--hiding-steps", type=int, default=d.hiding_steps, help="points of deletion/insertion")
    parser.add_argument("--hiding-baseline", default=d.hiding_baseline, choices=BASELINES)
    parser.add_argument("--hiding-score", default=d.hiding_score, choices=("probability", "logit"))
    parser.add_argument("--mask-version", type=int, default=d.mask_version, choices=(1, 2))
    parser.add_argument("--pointing-tolerance", type=int, default=d.pointing_tolerance, help="pixels")
    parser.add_argument("--amr-relative-threshold", type=float, default=d.amr_relative_threshold)
    parser.add_argument("--randomization-images", type=int, default=d.randomization_images)
    parser.add_argument("--randomization-steps", help="comma-separated backbone children, top down "
                        "(default: all parametrised children, output first)")
    parser.add_argument("--images-per-pass", type=int, default=d.images_per_pass)
    parser.add_argument("--figure-attributes", type=int, default=8, help="rows of the methods figure")


def main(args: argparse.Namespace) -> int:
    from callbacks.offline import build_datamodule, load_model, output_dir, probe_batches, wandb_run

    def split(text):
        return [s.strip() for s in text.split(",") if s.strip()] if text else None

    config = SaliencyConfig(
        methods=split(args.methods), target=args.target, layer=args.layer, occlusion_window=args.occlusion_window,
        occlusion_stride=args.occlusion_stride, occlusion_fill=args.occlusion_fill,
        smoothgrad_samples=args.smoothgrad_samples, smoothgrad_noise=args.smoothgrad_noise, ig_steps=args.ig_steps,
        ig_baseline=args.ig_baseline, hiding_steps=args.hiding_steps, hiding_baseline=args.hiding_baseline,
        hiding_score=args.hiding_score, mask_version=args.mask_version, pointing_tolerance=args.pointing_tolerance,
        amr_relative_threshold=args.amr_relative_threshold, randomization_images=args.randomization_images,
        randomization_steps=split(args.randomization_steps), images_per_pass=args.images_per_pass)
    model = load_model(args)
    batches = probe_batches(args, build_datamodule(args))
    if not batches:
        raise ValueError(f"--split {args.split}: no probe images")
    report = run_saliency(model, batches, config, split(args.attributes))
    out = output_dir(args)
    payload = {"checkpoint": str(args.checkpoint), **report.to_dict()}
    write_json(out / "saliency.json", payload)
    figs = report_figures(report)
    figs["methods"] = methods_figure(report, args.figure_attributes)
    for key, fig in figs.items():
        fig.savefig(out / f"saliency_{key}.png", dpi=110)
    run = wandb_run(args, "saliency")
    if run is not None:
        import wandb

        run.log({**{f"saliency/{k}": v for k, v in report.headline().items()},
                 **{f"saliency/{k}": wandb.Image(str(out / f"saliency_{k}.png")) for k in figs}})
        run.finish()
    for key, value in sorted(report.headline().items()):
        print(f"{key}: {value:.4f}")
    print(f"wrote {out / 'saliency.json'}")
    return 0
