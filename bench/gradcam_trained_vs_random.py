"""Issue 5's claim on SynthFaces: a model trained to detect eyeglasses has a clearly higher eyeglasses AMR
than the same architecture at random initialisation.

    python bench/gradcam_trained_vs_random.py                  # resnet18, 64 px, 4 epochs: ~10 CPU-minutes
    python bench/gradcam_trained_vs_random.py --epochs 2 --layers layer3 layer4 --out /tmp/amr

Trains a resnet18 AttributeModule on Eyeglasses (SynthFaces, uniform priors: half the faces wear glasses),
then scores it and `--random-seeds` randomly initialised copies of the same architecture on the same
validation faces wearing glasses, with Grad-CAM (`--target`) against the exact drawn eyeglasses masks. Three
scores per layer: the seed's AMR (map > 0), AMR over the pixels above `--relative-threshold` of each map's
range (min-max normalised, as pytorch-grad-cam shows a CAM), and the share of map energy inside the mask. At
64 px the seed's threshold counts nearly the whole upsampled map, so the AMR (> 0) of any network is close to
the mask's share of the image; the relative threshold and the energy are the scores that can tell the
networks apart. Prints the trained score, the random-init mean and standard deviation, and z = (trained -
mean) / std; with --out, writes the same as JSON.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.amr import AMRAccumulator, minmax_normalize  # noqa: E402
from analysis.gradcam import TARGETS, grad_cam  # noqa: E402
from callbacks.gradcam_amr import amr_masks, cam_network  # noqa: E402
from datamodules.synthfaces import SynthFaces, SynthFacesDataModule  # noqa: E402
from facelens.attributes import CELEBA_ATTRIBUTES  # noqa: E402
from lightning_modules.attribute_module import AttributeModule  # noqa: E402
from lightning_modules.checkpoint import load_module  # noqa: E402

SCORES = ("amr", "amr_relative", "energy")
EYEGLASSES = CELEBA_ATTRIBUTES.index("Eyeglasses")


def probe_batches(size: int, count: int, seed: int, batch_size: int, device: torch.device) -> list[dict]:
    """Validation faces wearing eyeglasses (identities disjoint from training), with their drawn masks.

    Renders faces until `count` wear glasses, so every scored face has a non-empty eyeglasses mask."""
    data = SynthFaces(4 * count, "val", size, max(1, count), seed, prior_preset="uniform", return_masks=True)
    kept: list[dict] = []
    for batch in DataLoader(data, batch_size=batch_size):
        wear = batch["attributes"][:, EYEGLASSES] > 0
        kept.append({k: v[wear] for k, v in batch.items()})
        if sum(len(b["image"]) for b in kept) >= count:
            break
    faces = {k: torch.cat([b[k] for b in kept])[:count] for k in kept[0]}
    if len(faces["image"]) < count:
        raise ValueError(f"probe_batches: only {len(faces['image'])} of {4 * count} faces wear eyeglasses")
    return [{k: v[i:i + batch_size].to(device) for k, v in faces.items()} for i in range(0, count, batch_size)]


def eyeglasses_scores(model: AttributeModule, batches: list[dict], layer: str, target: str,
                      relative_threshold: float, masks: str = "drawn") -> dict[str, float]:
    """Mean AMR (> 0), AMR above the relative threshold, energy and error rate over the batches."""
    net = cam_network(model)
    index = model.attribute_names.index("Eyeglasses")
    raw, relative = AMRAccumulator(["Eyeglasses"]), AMRAccumulator(["Eyeglasses"], relative_threshold)
    for batch in batches:
        all_labels, all_known = model.select(batch)
        labels, label_mask = all_labels[:, [index]], all_known[:, [index]]
        maps, logits = grad_cam(net, batch["image"], layer, targets=[index], target=target,
                                labels=all_labels if target == "ground_truth" else None, return_logits=True)
        mask = amr_masks(masks, batch, ["Eyeglasses"])
        raw.update(maps, logits[:, [index]], labels, label_mask, mask)
        relative.update(minmax_normalize(maps), logits[:, [index]], labels, label_mask, mask)
    r, q = raw.result(), relative.result()
    return {"amr": float(r.scores["amr"][0, 0]), "amr_relative": float(q.scores["amr"][0, 0]),
            "energy": float(r.scores["energy"][0, 0]), "error_rate": float(r.error_rate[0])}


def train(attributes: list[str], size: int, num_train: int, epochs: int, seed: int
          ) -> tuple[AttributeModule, pl.Trainer]:
    pl.seed_everything(seed)
    data = SynthFacesDataModule(size=size, num_train=num_train, num_val=64, num_test=16,
                                num_identities=max(50, num_train // 8), seed=seed, batch_size=64,
                                num_workers=0, prior_preset="uniform", cache=True)
    model = AttributeModule(backbone="resnet18", attributes=attributes, lr=0.003)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         accelerator="auto", devices=1)
    trainer.fit(model, datamodule=data)
    return model, trainer


def compare(trained: AttributeModule, batches: list[dict], layers: list[str], random_seeds: int, seed: int,
            target: str, relative_threshold: float, masks: str = "drawn") -> dict:
    """Per layer: the trained model's scores and each random-init seed's, with mean, std and z per score."""
    device = trained.device
    accepted = inspect.signature(AttributeModule.__init__).parameters
    hparams = {k: v for k, v in trained.hparams.items() if k in accepted and k != "pretrained_path"}
    randoms = []
    for k in range(random_seeds):
        torch.manual_seed(seed + 1000 + k)
        randoms.append(AttributeModule(**hparams).to(device).eval())
    trained.eval()
    out: dict = {}
    for layer in layers:
        mine = eyeglasses_scores(trained, batches, layer, target, relative_threshold, masks)
        theirs = [eyeglasses_scores(r, batches, layer, target, relative_threshold, masks) for r in randoms]
        entry = {"trained": mine, "random": theirs}
        for score in SCORES:
            values = np.array([t[score] for t in theirs])
            std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            entry[score] = {"trained": mine[score], "random_mean": float(values.mean()), "random_std": std,
                            "z": (mine[score] - float(values.mean())) / std if std > 0 else float("nan")}
        out[layer] = entry
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attributes", nargs="+", default=["Eyeglasses"], help="trained attributes (need Eyeglasses)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--num-images", type=int, default=128, help="validation faces with eyeglasses scored")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--layers", nargs="+", default=["layer3", "layer4"])
    parser.add_argument("--random-seeds", type=int, default=5, help="random initialisations compared")
    parser.add_argument("--target", default="predicted", choices=TARGETS)
    parser.add_argument("--relative-threshold", type=float, default=0.5,
                        help="fraction of each map's range above which a pixel counts for amr_relative")
    parser.add_argument("--masks", default="drawn", choices=["drawn", "v1", "v2"],
                        help="drawn: the exact eyeglasses pixels; v1 / v2: the seed's Table A.1 / A.2 regions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, help="score this saved AttributeModule instead of training")
    parser.add_argument("--save", type=Path, help="save the trained model's checkpoint here")
    parser.add_argument("--out", type=Path, help="JSON file for the scores")
    args = parser.parse_args(argv)
    if "Eyeglasses" not in args.attributes:
        raise SystemExit("--attributes must include Eyeglasses")
    if args.random_seeds < 2:
        raise SystemExit("--random-seeds must be at least 2 (the spread needs two)")
    if not 0 <= args.relative_threshold < 1:
        raise SystemExit("--relative-threshold must lie in [0, 1)")

    if args.checkpoint:
        model = load_module(args.checkpoint)
        model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if "Eyeglasses" not in model.attribute_names:
            raise SystemExit(f"--checkpoint {args.checkpoint}: the model does not predict Eyeglasses")
    else:
        started = time.perf_counter()
        model, trainer = train(args.attributes, args.size, args.num_train, args.epochs, args.seed)
        print(f"trained {args.epochs} epochs on {args.num_train} faces ({args.size} px) in "
              f"{time.perf_counter() - started:.0f} s")
        if args.save:
            trainer.save_checkpoint(args.save)
    batches = probe_batches(args.size, args.num_images, args.seed, 64, model.device)
    result = compare(model, batches, args.layers, args.random_seeds, args.seed, args.target, args.relative_threshold,
                     args.masks)
    print(f"{args.num_images} validation faces wearing eyeglasses, {args.masks} masks, target {args.target}, "
          f"{args.random_seeds} random initialisations\n")
    print(f"{'layer':<8}{'score':<14}{'trained':>9}{'random mean':>13}{'std':>8}{'z':>8}")
    for layer, entry in result.items():
        print(f"{layer:<8}{'error rate':<14}{entry['trained']['error_rate']:9.3f}")
        for score in SCORES:
            s = entry[score]
            print(f"{layer:<8}{score:<14}{s['trained']:9.3f}{s['random_mean']:13.3f}{s['random_std']:8.3f}"
                  f"{s['z']:8.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()}, "layers": result}, indent=1))
    return result


if __name__ == "__main__":
    main()
