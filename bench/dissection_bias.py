"""Issue 7's claim on SynthFaces: the gender model trained with eyeglasses bias P = 100 has more units paired
with eyeglasses (or the eye region) than the P = 50 model.

    python bench/dissection_bias.py                                   # trains P = 50 and P = 100 (demo settings)
    python bench/dissection_bias.py --checkpoints 50=P50.ckpt 100=P100.ckpt --quantiles 0.005 0.05

Trains configs/bias_eyeglasses.yaml (resnet18) once per P, or loads saved checkpoints, and dissects each model
over the same SynthFaces Face Dictionary (ellipse concepts plus the exact drawn masks) at every quantile and
layer given. Per P, layer and quantile it prints the units paired with an eyeglasses concept (HND stage III or
NetDissect's top concept above the IoU threshold, as the report counts them), the eye-region units (stage II
region `eyes` with a stage III concept), all NetDissect-interpretable units, and two threshold-free figures:
the units whose best concept is an eyeglasses concept whatever its IoU, and the best eyeglasses IoU of any unit.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from analysis.dissection import IOU_VARIANTS, DissectionConfig, DissectionResult  # noqa: E402
from analysis.report import EYE_CONCEPTS, eyeglasses_units, region_units  # noqa: E402
from callbacks.dissection import run_dissection  # noqa: E402
from datamodules.face_dictionary import FaceDictionary, build_synthfaces  # noqa: E402
from lightning_modules.checkpoint import load_module  # noqa: E402


def train_model(p: int, args: argparse.Namespace, out: Path):
    """configs/bias_eyeglasses.yaml at bias rate P; returns (model, bias gap on the unbiased split)."""
    cli = train.main([
        "--config", "configs/bias_eyeglasses.yaml", "--trainer.max_epochs", str(args.epochs),
        "--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", str(out / f"p{p}"),
        "--trainer.default_root_dir", str(out / f"p{p}"), "--trainer.enable_progress_bar", "false",
        "--data.init_args.p", str(p), "--data.init_args.pool_size", str(args.pool_size),
        "--data.init_args.num_val", str(args.num_val), "--data.init_args.image_size", str(args.size),
        "--data.init_args.num_workers", "0", "--model.init_args.lr", str(args.lr),
        "--seed_everything", str(args.seed),
    ], run=False)
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    print(f"P = {p}: trained {args.epochs} epochs in {time.perf_counter() - started:.0f} s, "
          f"bias gap {metrics['val/bias/gap']:.3f}", flush=True)
    return cli.model, float(metrics["val/bias/gap"])


def eyeglasses_figures(result: DissectionResult) -> dict[str, float]:
    """The counts and threshold-free figures printed per layer (see the module docstring)."""
    idx = [result.concepts.index(c) for c in EYE_CONCEPTS if c in result.concepts]
    best_is_glasses = np.isin(result.netdissect_concept, idx)
    return {"eyeglasses_units": eyeglasses_units(result), "eye_region_units": region_units(result).get("eyes", 0),
            "interpretable_units": int(result.netdissect_interpretable.sum()),
            "best_concept_eyeglasses": int(best_is_glasses.sum()),
            "max_eyeglasses_iou": float(result.iou[:, idx].max()) if idx else float("nan"),
            "units": result.num_units}


def eyeglasses_balanced(dictionary: FaceDictionary) -> FaceDictionary:
    """The dictionary's images with eyeglasses and as many without (the first ones), so that an eyeglasses
    detector's top-quantile pixels can cover the concept; the global sets are no longer balanced."""
    wearing = wears_eyeglasses(dictionary)
    keep = np.sort(np.concatenate([np.flatnonzero(wearing), np.flatnonzero(~wearing)[:int(wearing.sum())]]))
    return replace(dictionary, images=dictionary.images[keep], masks=dictionary.masks[keep],
                   labelled=dictionary.labelled[keep], landmarks=dictionary.landmarks[keep],
                   global_labels={g: v[keep] for g, v in dictionary.global_labels.items()},
                   source_names=[dictionary.source_names[i] for i in keep])


def wears_eyeglasses(dictionary: FaceDictionary) -> np.ndarray:
    """(N,) bool: the image's eyeglasses ellipse is non-empty (masks are bit-packed: any non-zero byte)."""
    c = dictionary.concepts.index("Eyeglasses")
    return dictionary.labelled[:, c] & dictionary.masks[:, c].any(1)


def parse_checkpoints(items: list[str]) -> dict[int, Path]:
    out = {}
    for item in items:
        p, sep, path = item.partition("=")
        if not sep or not p.isdigit() or not Path(path).is_file():
            raise SystemExit(f"--checkpoints: expected P=PATH to an existing checkpoint, got {item!r}")
        out[int(p)] = Path(path)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--checkpoints", nargs="+", default=[], help="P=PATH: dissect saved models, no training")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--pool-size", type=int, default=3000, help="SynthFaces training pool the selection uses")
    parser.add_argument("--num-val", type=int, default=800)
    parser.add_argument("--size", type=int, default=64, help="image size for training and the dictionary")
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3", "layer4"])
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.005, 0.05])
    parser.add_argument("--iou-threshold", type=float, default=0.04,
                        help="NetDissect's interpretability threshold, also HND stage II's minimum region IoU")
    parser.add_argument("--hnd-iou", default="netdissect", choices=IOU_VARIANTS, help="IoU of HND stages II-III")
    parser.add_argument("--dictionary-count", type=int, default=200, help="SynthFaces rendered for the dictionary")
    parser.add_argument("--balance-eyeglasses", action="store_true",
                        help="keep the dictionary's eyeglasses images and as many without")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON file for the figures")
    args = parser.parse_args(argv)

    models, gaps = {}, {}
    if args.checkpoints:
        for p, path in parse_checkpoints(args.checkpoints).items():
            models[p] = load_module(path).eval()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for p in args.p:
                models[p], gaps[p] = train_model(p, args, Path(tmp))
    dictionary = build_synthfaces(args.dictionary_count, args.size, args.seed)
    if args.balance_eyeglasses:
        dictionary = eyeglasses_balanced(dictionary)
    wearing = int(wears_eyeglasses(dictionary).sum())
    print(f"dictionary: {len(dictionary)} SynthFaces at {args.size} px, {wearing} with eyeglasses\n")
    figures: dict = {}
    print(f"{'P':>4} {'layer':<7}{'quantile':>9}{'units':>6}{'glasses':>8}{'eyes':>6}{'interp.':>8}"
          f"{'best=glasses':>13}{'max glasses IoU':>16}")
    for q in args.quantiles:
        config = DissectionConfig(quantile=q, iou_threshold=args.iou_threshold, region_min_iou=args.iou_threshold,
                                  hnd_iou=args.hnd_iou)
        for p, model in models.items():
            report = run_dissection(model, dictionary, args.layers, config)
            for layer, result in report.layers.items():
                f = eyeglasses_figures(result)
                figures.setdefault(str(p), {}).setdefault(layer, {})[str(q)] = f
                print(f"{p:>4} {layer:<7}{q:>9}{f['units']:>6}{f['eyeglasses_units']:>8}{f['eye_region_units']:>6}"
                      f"{f['interpretable_units']:>8}{f['best_concept_eyeglasses']:>13}"
                      f"{f['max_eyeglasses_iou']:>16.3f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()},
                                        "bias_gap": {str(p): g for p, g in gaps.items()}, "figures": figures},
                                       indent=1))
    return {"figures": figures, "bias_gap": gaps}


if __name__ == "__main__":
    main()
