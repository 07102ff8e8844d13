"""Grad-CAM maps of every attribute scored by the Acceptable Mask Ratio (seed 004), at training checkpoints
(`GradCamAMRCallback`) and on saved checkpoints (`python analyze.py gradcam ...`), with one code path.

Masks: `v1` (Table A.1, boxes from each image's landmarks), `v2` (Table A.2, fixed 32-px blocks) or `drawn`
(SynthFaces only: the exact pixels where the attribute's concept was drawn, the referee ground truth; v2 for
attributes without a drawn concept). A drawn mask is empty where the concept is absent, so with `drawn` the
ground-truth-negative AMR of such attributes is 0 by construction: read `gt_pos`.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from analysis.amr import GROUPS, AMRAccumulator, AMRResult, kl_distance
from analysis.face_regions import masks_v1, masks_v2
from analysis.gradcam import METHODS, TARGETS, grad_cam
from analysis.gradcam_plots import plot_amr_bars, plot_kl_bars, plot_map_grid
from analysis.layers import resolve_layer
from callbacks.base import ONE_PROCESS, AnalysisCallback, Shard, write_json
from datamodules.synthfaces import CONCEPT_ATTRIBUTE, CONCEPTS, SynthFaces, face_to_item
from datamodules.transforms import is_frontal
from facelens.attributes import resolve_attributes

MASK_KINDS = ("v1", "v2", "drawn")
# attribute -> the SynthFaces concept that draws it
DRAWN_CONCEPT: dict[str, str] = {attr: concept for concept, attr in CONCEPT_ATTRIBUTE.items() if attr is not None}


def cam_network(model: nn.Module) -> nn.Module:
    """A facelens module's `net` (so `layer4` resolves inside its timm backbone), or the model itself."""
    return getattr(model, "net", model)


def amr_masks(kind: str, batch: dict, attributes: Sequence[str]) -> torch.Tensor:
    """Masks for `attributes` at the batch's image size: (B, T, S, S) for v1 and drawn, (T, S, S) for v2.

    Batches are in AFFACT-crop geometry (SynthFaces, evaluation-prepared CelebA), so the landmarks in pixels of
    the S-px image are what Table A.1 expects, with its offsets scaled by S / 224."""
    images = batch["image"]
    size = int(images.shape[-1])
    if images.shape[-2] != size:
        raise ValueError(f"amr_masks: AMR masks need square images, got {tuple(images.shape[-2:])}")
    if kind == "v1":
        return masks_v1(batch["landmarks"], size, attributes)
    if kind == "v2":
        return masks_v2(size, attributes, device=images.device)
    if kind == "drawn":
        if "concept_masks" not in batch:
            raise ValueError("amr_masks: masks='drawn' needs batches with `concept_masks` (SynthFaces with "
                             "return_masks=True)")
        concept = batch["concept_masks"].to(images.device, torch.bool)
        fallback = masks_v2(size, attributes, device=images.device)
        out = fallback[None].repeat(concept.shape[0], 1, 1, 1)
        for i, name in enumerate(attributes):
            if name in DRAWN_CONCEPT:
                out[:, i] = concept[:, CONCEPTS.index(DRAWN_CONCEPT[name])]
        return out
    raise ValueError(f"amr_masks: masks must be one of {', '.join(MASK_KINDS)}, got {kind!r}")


def check_settings(layer: str, method: str, target: str, masks: str, where: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{where}.method: {method!r} is not one of {', '.join(METHODS)}")
    if target not in TARGETS:
        raise ValueError(f"{where}.target: {target!r} is not one of {', '.join(TARGETS)}")
    if masks not in MASK_KINDS:
        raise ValueError(f"{where}.masks: {masks!r} is not one of {', '.join(MASK_KINDS)}")
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"{where}.layer: a layer name such as 'layer4' is needed, got {layer!r}")


def run_amr(model: nn.Module, batches: Sequence[dict], layer: str = "layer4", method: str = "gradcam",
            target: str = "predicted", masks: str = "v2", threshold: float = 0.0, frontal: bool = False,
            frontal_threshold: float = 0.1, attributes: Sequence[str] | None = None,
            map_normalization: str = "minmax") -> AMRResult:
    """Table 5.1 of one AttributeModule over the batches: every attribute's map from one batched Grad-CAM
    pass per batch, streamed through `AMRAccumulator`. Labels the batch does not know (attribute_mask False)
    are excluded; with `frontal`, only faces `is_frontal(landmarks, frontal_threshold)` count."""
    return accumulate_amr(model, batches, layer, method, target, masks, threshold, frontal, frontal_threshold,
                          attributes, map_normalization).result()


def accumulate_amr(model: nn.Module, batches: Sequence[dict], layer: str = "layer4", method: str = "gradcam",
                   target: str = "predicted", masks: str = "v2", threshold: float = 0.0, frontal: bool = False,
                   frontal_threshold: float = 0.1, attributes: Sequence[str] | None = None,
                   map_normalization: str = "minmax") -> AMRAccumulator:
    """`run_amr`'s running sums before the result (accumulators of image shards merge into the whole's)."""
    check_settings(layer, method, target, masks, "gradcam")
    net = cam_network(model)
    resolve_layer(net, layer)  # a wrong name fails here with the valid names
    names = list(getattr(model, "attribute_names", None) or [])
    if not names:
        raise ValueError("gradcam: the model has no `attribute_names` (an AttributeModule is needed)")
    chosen = resolve_attributes(attributes, "gradcam: attributes") if attributes is not None else names
    missing = [a for a in chosen if a not in names]
    if missing:
        raise ValueError(f"gradcam: attributes {missing} are not predicted by the model ({', '.join(names)})")
    index = [names.index(a) for a in chosen]
    acc = AMRAccumulator(chosen, threshold, map_normalization)
    for batch in batches:
        labels, label_mask = model.select(batch)
        maps, logits = grad_cam(net, batch["image"], layer, targets=index, target=target, method=method,
                                labels=labels if target == "ground_truth" else None, return_logits=True)
        keep = is_frontal(batch["landmarks"], frontal_threshold).to(maps.device) if frontal else None
        acc.update(maps, logits[:, index], labels[:, index], label_mask[:, index],
                   amr_masks(masks, batch, chosen), keep)
    if frontal:
        acc.frontal_only = True
    return acc


def flat_dict(result: AMRResult) -> dict[str, Any]:
    """The shape of issue 5: one entry per attribute at the top level (`error_rate`, `amr` with the groups
    overall / gt_pos / gt_neg / pred_correct / pred_incorrect, plus counts and the other variants), then
    `correlation` and the remaining Table 5.1 summaries."""
    rich = result.to_dict()
    out: dict[str, Any] = dict(rich.pop("attributes"))
    out["attribute_names"] = list(result.attributes)
    out.update(rich)
    return out


def kl_series(base: AMRResult, compare: AMRResult) -> dict[str, dict[str, float | None]]:
    """The three bar series of Fig 5.7 (read from seed 004 section 5: base vs compared model overall, and
    within the compared model correct vs incorrect and present vs absent)."""
    size = max(base.average_maps.shape[-1], compare.average_maps.shape[-1])
    same = base.average_maps.shape[-2:] == compare.average_maps.shape[-2:]
    return {
        "base vs compare": kl_distance(base, compare, "overall", size=None if same else size),
        "compare: correct vs incorrect": kl_distance(compare, compare, "pred_correct", "pred_incorrect"),
        "compare: present vs absent": kl_distance(compare, compare, "gt_pos", "gt_neg"),
    }


class GradCamReport:
    """One model's AMRResult (and optionally a compared model's, with KL distances) plus the settings."""

    def __init__(self, result: AMRResult, settings: dict[str, Any], compare: AMRResult | None = None,
                 labels: tuple[str, str] = ("base", "compare")):
        self.result, self.settings, self.compare, self.labels = result, dict(settings), compare, labels
        self.kl = kl_series(result, compare) if compare is not None else None

    def to_dict(self) -> dict[str, Any]:
        out = flat_dict(self.result)
        out["settings"] = self.settings
        if self.compare is not None:
            out["compare"] = flat_dict(self.compare)
            out["kl"] = self.kl["base vs compare"]
            out["kl_within_compare"] = {"correct_vs_incorrect": self.kl["compare: correct vs incorrect"],
                                        "present_vs_absent": self.kl["compare: present vs absent"]}
        return out

    def results(self) -> dict[str, AMRResult]:
        out = {self.labels[0]: self.result}
        if self.compare is not None:
            out[self.labels[1]] = self.compare
        return out

    def headline(self) -> dict[str, float]:
        """Mean over attributes of error rate and each group's AMR, the correlation, and per-attribute AMR."""
        out = {}
        for key, value in self.result.mean_row("amr").items():
            out[key if key == "error_rate" else f"amr/{key}"] = value
        out["correlation"] = self.result.correlation("amr")
        g = GROUPS.index("overall")
        for i, name in enumerate(self.result.attributes):
            out[f"amr_attribute/{name}"] = self.result.scores["amr"][g, i]
        return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}

    def figures(self, size: int | None = None) -> dict[str, Any]:
        """Figs 5.4-5.6 (AMR bars), 5.7 (KL, when comparing), 5.8-5.10 (average-map grids) by name."""
        results = self.results()
        figs = {
            "fig5_4_amr_correct_incorrect": plot_amr_bars(results, ("pred_correct", "pred_incorrect")),
            "fig5_5_amr_present_absent": plot_amr_bars(results, ("gt_pos", "gt_neg")),
            "fig5_6_amr_overall": plot_amr_bars(results, ("overall",)),
            "fig5_8_maps_correct_incorrect": plot_map_grid(results, ("pred_correct", "pred_incorrect"), size),
            "fig5_9_maps_present_absent": plot_map_grid(results, ("gt_pos", "gt_neg"), size),
            "fig5_10_maps_overall": plot_map_grid(results, ("overall",), size),
        }
        if self.kl is not None:
            figs["fig5_7_kl"] = plot_kl_bars(self.kl)
        return figs


def save_arrays(path: Path, result: AMRResult) -> Path:
    """`AMRResult.to_arrays()` as an NPZ file (written to a temp file, then renamed)."""
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **result.to_arrays())
    tmp.replace(path)
    return path


class _DrawnMasks(Dataset):
    """SynthFaces items rendered with their concept masks (for masks='drawn' on a datamodule without them)."""

    def __init__(self, source: SynthFaces):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return face_to_item(self.source.render(int(index), return_masks=True), int(index))


def with_drawn_masks(dataset: Dataset, where: str) -> Dataset:
    """The dataset itself when it yields concept masks, else a SynthFaces view that renders them."""
    if getattr(dataset, "return_masks", False) or getattr(dataset, "bits", None) is not None:
        return dataset
    if isinstance(dataset, SynthFaces):
        return _DrawnMasks(dataset)
    raise ValueError(f"{where}: masks='drawn' needs SynthFaces data (the datamodule gives "
                     f"{type(dataset).__name__}; for cached SynthFaces set return_masks=True)")


class GradCamAMRCallback(AnalysisCallback):
    """Grad-CAM + AMR (seed 004 Table 5.1) of the module's attributes on the first `num_images` of `split`
    every `every_n_epochs` epochs: scalars (mean AMR per group, error rate, correlation, per-attribute AMR),
    a Table 5.1-style table and average-map grids to the loggers; JSON + NPZ under the run's
    `analysis/gradcam_amr/`."""

    name = "gradcam_amr"
    sharded = True

    def __init__(self, layer: str = "layer4", method: str = "gradcam", target: str = "predicted",
                 masks: str = "v2", threshold: float = 0.0, frontal: bool = False, frontal_threshold: float = 0.1,
                 attributes: list[str] | None = None, map_normalization: str = "minmax",
                 every_n_epochs: int = 3, num_images: int = 128, split: str = "val", batch_size: int = 32,
                 run_on_last_epoch: bool = True):
        super().__init__(every_n_epochs=every_n_epochs, num_images=num_images, split=split, batch_size=batch_size,
                         run_on_last_epoch=run_on_last_epoch)
        check_settings(layer, method, target, masks, "GradCamAMRCallback")
        if attributes is not None:
            resolve_attributes(attributes, "GradCamAMRCallback.attributes")
        self.layer, self.method, self.target, self.masks = layer, method, target, masks
        self.threshold, self.frontal, self.frontal_threshold = float(threshold), bool(frontal), frontal_threshold
        self.attributes = attributes
        self.map_normalization = map_normalization
        self._image_size: int | None = None

    @property
    def settings(self) -> dict[str, Any]:
        return {"layer": self.layer, "method": self.method, "target": self.target, "masks": self.masks,
                "threshold": self.threshold, "frontal": self.frontal, "frontal_threshold": self.frontal_threshold,
                "map_normalization": self.map_normalization, "split": self.split, "num_images": self.num_images}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail at setup, not after an epoch: a bad layer name (listing the valid ones), unknown attributes."""
        try:
            resolve_layer(cam_network(pl_module), self.layer)
        except ValueError as err:
            raise ValueError(f"GradCamAMRCallback.layer: {err}") from None
        names = getattr(pl_module, "attribute_names", [])
        missing = [a for a in (self.attributes or []) if a not in names]
        if missing:
            raise ValueError(f"GradCamAMRCallback.attributes: {missing} are not predicted by the model")

    def probe_batches(self, trainer: pl.Trainer, device: torch.device, shard: Shard | None = None) -> list[dict]:
        if self.masks != "drawn":
            return super().probe_batches(trainer, device, shard)
        dataset = with_drawn_masks(getattr(trainer.datamodule, f"{self.split}_dataloader")().dataset,
                                   "GradCamAMRCallback.masks")
        n = min(self.num_images, len(dataset))
        return self.load_probe(trainer, dataset, device, shard.indices(n) if shard else range(n))

    def analyse(self, model: nn.Module, batches: list[dict], shard: Shard = ONE_PROCESS) -> GradCamReport:
        """Each rank accumulates its shard; the accumulators' sums are gathered and added in rank order."""
        if batches:
            self._image_size = int(batches[0]["image"].shape[-1])
        acc = accumulate_amr(model, batches, self.layer, self.method, self.target, self.masks, self.threshold,
                             self.frontal, self.frontal_threshold, self.attributes, self.map_normalization)
        states = shard.gather(acc.state_dict())
        merged = AMRAccumulator(acc.attributes, self.threshold, self.map_normalization)
        for state in states:
            merged.merge(state)
        if merged.state_dict()["counts"] is None:
            raise ValueError(f"GradCamAMRCallback: the {self.split} split gave no probe images")
        return GradCamReport(merged.result(), self.settings)

    def headline(self, result: GradCamReport) -> dict[str, float]:
        return result.headline()

    def save(self, trainer: pl.Trainer, result: GradCamReport, epoch: int) -> Path:
        path = super().save(trainer, result, epoch)
        save_arrays(path.with_suffix(".npz"), result.result)
        return path

    def log_extra(self, trainer: pl.Trainer, result: GradCamReport, epoch: int) -> None:
        loggers = [lg for lg in trainer.loggers if hasattr(lg, "log_table")]
        if not loggers:
            return
        import wandb

        from callbacks.dissection import figure_array

        r = result.result
        figs = {
            "maps_present_absent": plot_map_grid({"model": r}, ("gt_pos", "gt_neg"), self._image_size),
            "maps_correct_incorrect": plot_map_grid({"model": r}, ("pred_correct", "pred_incorrect"),
                                                    self._image_size),
        }
        images = {f"{self.name}/{k}": wandb.Image(figure_array(f)) for k, f in figs.items()}
        rows = r.to_table("amr", order="imbalance")
        for logger in loggers:
            logger.log_table(key=f"{self.name}/table", columns=list(r.TABLE_COLUMNS), data=rows,
                             step=trainer.global_step)
            logger.experiment.log(images, step=trainer.global_step)


# --------------------------------------------------------------------------------------------------
# analyze.py gradcam
# --------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from callbacks.offline import add_common_arguments

    add_common_arguments(parser)
    parser.add_argument("--compare", help="a second checkpoint (seed 004: the unbalanced model); adds KL distances")
    parser.add_argument("--layer", default="layer4", help="layer name as the backbone names it")
    parser.add_argument("--method", default="gradcam", choices=METHODS)
    parser.add_argument("--target", default="predicted", choices=TARGETS,
                        help="predicted = |logit| (seed 004 listing 4.3)")
    parser.add_argument("--masks", default="v2", choices=MASK_KINDS,
                        help="v1: Table A.1 landmark boxes, v2: Table A.2 blocks, drawn: SynthFaces concept masks")
    parser.add_argument("--threshold", type=float, default=0.0, help="discriminative area: map > threshold")
    parser.add_argument("--frontal", action="store_true", help="only frontal faces (seed 004 footnote 3)")
    parser.add_argument("--frontal-threshold", type=float, default=0.1)
    parser.add_argument("--attributes", nargs="+", help="subset of the model's attributes (default: all)")


def main(args: argparse.Namespace) -> int:
    from callbacks.offline import build_datamodule, load_model, output_dir, probe_batches, wandb_run
    from datamodules.synthfaces import SynthFacesDataModule
    from lightning_modules.checkpoint import load_module

    check_settings(args.layer, args.method, args.target, args.masks, "analyze.py gradcam")
    model = load_model(args)
    datamodule = build_datamodule(args)
    if args.masks == "drawn":
        if not isinstance(datamodule, SynthFacesDataModule):
            raise ValueError("--masks drawn needs SynthFaces data (--data synthfaces)")
        datamodule = build_datamodule(args, return_masks=True)
    batches = probe_batches(args, datamodule)
    if not batches:
        raise ValueError(f"--split {args.split}: no probe images")
    options = dict(layer=args.layer, method=args.method, target=args.target, masks=args.masks,
                   threshold=args.threshold, frontal=args.frontal, frontal_threshold=args.frontal_threshold,
                   attributes=args.attributes)
    result = run_amr(model, batches, **options)
    compare = None
    if args.compare:
        other = load_module(args.compare).to(args.device).eval()
        compare = run_amr(other, batches, **options)
    settings = {**options, "checkpoint": str(args.checkpoint), "compare": args.compare, "split": args.split,
                "num_images": sum(int(b["image"].shape[0]) for b in batches)}
    labels = (Path(args.checkpoint).stem, Path(args.compare).stem if args.compare else "compare")
    if labels[0] == labels[1]:
        labels = ("base", "compare")
    report = GradCamReport(result, settings, compare, labels)
    out = output_dir(args)
    write_json(out / "gradcam_amr.json", report.to_dict())
    save_arrays(out / "gradcam_amr.npz", result)
    if compare is not None:
        save_arrays(out / "gradcam_amr_compare.npz", compare)
    figs = report.figures(int(batches[0]["image"].shape[-1]))
    for key, fig in figs.items():
        fig.savefig(out / f"{key}.png", dpi=100)
    run = wandb_run(args, "gradcam")
    if run is not None:
        import wandb

        run.log({"gradcam_amr/table": wandb.Table(columns=list(result.TABLE_COLUMNS),
                                                  data=result.to_table("amr", order="imbalance")),
                 **{f"gradcam_amr/{k}": v for k, v in report.headline().items()},
                 **{f"gradcam_amr/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("fig*.png"))}})
        run.finish()
    mean = result.mean_row("amr")
    print(f"{len(result.attributes)} attributes: mean AMR overall {mean['overall']}, gt_pos {mean['gt_pos']}, "
          f"gt_neg {mean['gt_neg']}; correlation(error, AMR) {result.correlation():.3f}")
    print(f"wrote {out / 'gradcam_amr.json'}")
    return 0
