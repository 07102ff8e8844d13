"""Issue 5's claim on SynthFaces: a model trained to detect eyeglasses has a clearly higher eyeglasses AMR than
the same architecture at random initialisation.

    python bench/gradcam_trained_vs_random.py                  # resnet18, 64 px, 3 epochs: a few minutes on 2 cores
    python bench/gradcam_trained_vs_random.py --epochs 2 --layers layer3 layer4 --out /tmp/amr

Trains a resnet18 AttributeModule on a few drawn attributes (Eyeglasses first), keeps a copy taken before
training (same seed), and scores both on the same validation faces with Grad-CAM (`predicted` target) and
AMR against the exact drawn eyeglasses masks (the referee) and the Table A.2 (v2) masks. Prints, per layer
and mask kind, the eyeglasses AMR for all faces and for faces wearing glasses. With --out, writes both
models' gradcam_amr JSONs (the analyze.py shape) per layer and mask kind.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.gradcam_amr import GradCamReport, run_amr  # noqa: E402
from datamodules.synthfaces import SynthFaces, SynthFacesDataModule  # noqa: E402
from facelens.attributes import CELEBA_ATTRIBUTES  # noqa: E402
from lightning_modules.attribute_module import AttributeModule  # noqa: E402

ATTRIBUTES = ["Eyeglasses", "Wearing_Hat", "Smiling", "Male", "Mustache", "Bangs"]


def probe_batches(size: int, count: int, seed: int, batch_size: int, device: torch.device) -> list[dict]:
    """Validation faces (identities disjoint from training) with their drawn concept masks."""
    data = SynthFaces(count, "val", size, max(1, count // 2), seed, prior_preset="uniform", return_masks=True)
    return [{k: v.to(device) for k, v in b.items()} for b in DataLoader(data, batch_size=batch_size)]


def eyeglasses_amr(model: torch.nn.Module, batches: list[dict], layer: str, masks: str) -> dict[str, float]:
    result = run_amr(model, batches, layer=layer, masks=masks, attributes=["Eyeglasses"])
    return {"overall": float(result.scores["amr"][0, 0]), "gt_pos": float(result.scores["amr"][1, 0]),
            "gt_neg": float(result.scores["amr"][2, 0]), "error_rate": float(result.error_rate[0]),
            "result": result}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attributes", nargs="+", default=ATTRIBUTES, help="trained attributes (need Eyeglasses)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-images", type=int, default=256, help="validation faces scored")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--layers", nargs="+", default=["layer4", "layer3"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for the gradcam_amr JSONs")
    args = parser.parse_args(argv)
    if "Eyeglasses" not in args.attributes:
        raise SystemExit("--attributes must include Eyeglasses")

    pl.seed_everything(args.seed)
    data = SynthFacesDataModule(size=args.size, num_train=args.num_train, num_val=64, num_test=16,
                                num_identities=max(50, args.num_train // 8), seed=args.seed, batch_size=64,
                                num_workers=0, prior_preset="uniform", cache=True)
    model = AttributeModule(backbone="resnet18", attributes=args.attributes, lr=0.003)
    untrained = copy.deepcopy(model)
    started = time.perf_counter()
    trainer = pl.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         accelerator="auto", devices=1)
    trainer.fit(model, datamodule=data)
    print(f"trained {args.epochs} epochs on {args.num_train} faces ({args.size} px) in "
          f"{time.perf_counter() - started:.0f} s")

    device = model.device
    untrained.to(device)
    batches = probe_batches(args.size, args.num_images, args.seed, 64, device)
    n_pos = int(sum(b["attributes"][:, CELEBA_ATTRIBUTES.index("Eyeglasses")].sum() for b in batches))
    print(f"scoring {args.num_images} validation faces ({n_pos} with eyeglasses)\n")
    print(f"{'layer':<8}{'masks':<7}{'model':<13}{'error':>7}{'AMR all':>9}{'AMR glasses':>13}{'AMR none':>10}")
    summary: dict = {}
    for layer in args.layers:
        for masks in ("drawn", "v2"):
            scored = {}
            for label, net in (("trained", model.eval()), ("random init", untrained.eval())):
                s = eyeglasses_amr(net, batches, layer, masks)
                scored[label] = s
                print(f"{layer:<8}{masks:<7}{label:<13}{s['error_rate']:7.3f}{s['overall']:9.3f}"
                      f"{s['gt_pos']:13.3f}{s['gt_neg']:10.3f}")
                if args.out:
                    args.out.mkdir(parents=True, exist_ok=True)
                    name = f"gradcam_amr_{layer}_{masks}_{label.replace(' ', '_')}.json"
                    report = GradCamReport(s["result"], {"layer": layer, "masks": masks, "model": label})
                    (args.out / name).write_text(json.dumps(report.to_dict(), indent=1))
            summary[(layer, masks)] = {k: {g: v[g] for g in ("overall", "gt_pos", "gt_neg", "error_rate")}
                                       for k, v in scored.items()}
    return summary


if __name__ == "__main__":
    main()
