"""Seed 003 Fig 5.4 contrast on SynthFaces: do a trained model's later layers probe better than the
same network at random initialisation, for attributes drawn in the image?

    python bench/probing_trained_vs_random.py --out /tmp/fig54   # resnet18, 64 px, 1500 faces x 3 epochs
    python bench/probing_trained_vs_random.py --epochs 2 --num-train 1000   # quicker, weaker contrast

The defaults took 11 min on 2 cores shared with other jobs (load ~8: 9 min training, 1.5 min probing);
mean layer accuracy over the later half of the blocks: trained 0.707, random init 0.589.

Trains a resnet18 AttributeModule, probes the residual-block outputs of the trained network and of a copy
taken before training (same seed, same probe samples), and prints both depth curves (mean layer accuracy
over attributes), their means over all and over the later half of the layers, and the per-attribute gain
at the last layer. With --out, writes both probing JSONs and the Fig 5.4 plot.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.probing import collect_batches, plot_mean_accuracy, probe  # noqa: E402
from callbacks.probing import default_layers, mean_curve, probed_network  # noqa: E402
from datamodules.synthfaces import SynthFacesDataModule  # noqa: E402
from lightning_modules.attribute_module import AttributeModule  # noqa: E402

DRAWN = ["Eyeglasses", "Wearing_Hat", "Smiling", "Male", "Bangs", "Mustache", "Wearing_Necktie", "Blond_Hair"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attributes", nargs="+", default=DRAWN, help="drawn SynthFaces attributes to train and probe")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=1500)
    parser.add_argument("--num-images", type=int, default=1024, help="validation pool the probe samples come from")
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-val", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for probing JSONs and the Fig 5.4 plot")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed)
    data = SynthFacesDataModule(size=args.size, num_train=args.num_train, num_val=args.num_images, num_test=16,
                                num_identities=max(50, args.num_train // 8), seed=args.seed, batch_size=64,
                                num_workers=0, prior_preset="uniform", cache=True)
    model = AttributeModule(backbone="resnet18", attributes=args.attributes, lr=0.003)
    untrained = copy.deepcopy(model)
    started = time.perf_counter()
    trainer = pl.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="auto", devices=1)
    trainer.fit(model, datamodule=data)
    metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
    print(f"trained {args.epochs} epochs on {args.num_train} faces in {time.perf_counter() - started:.0f} s; "
          f"val/mean_error {metrics.get('val/mean_error', float('nan')):.3f}")

    loader = data.val_dataloader()
    pool = collect_batches(loader, args.num_images)
    layers = default_layers(model)
    results = {}
    for label, net in (("trained", model), ("random init", untrained)):
        started = time.perf_counter()
        results[label] = probe(probed_network(net.eval()), layers, pool["image"], pool["attributes"],
                               pool["attribute_mask"], args.attributes, args.n_train, args.n_val, seed=args.seed,
                               batch_size=128, keep_probes=False)
        print(f"probed {label}: {len(layers)} layers x {len(args.attributes)} attributes in "
              f"{time.perf_counter() - started:.0f} s")

    curves = {label: mean_curve(res) for label, res in results.items()}
    half = len(layers) // 2
    print(f"\n{'layer':<10}" + "".join(f"{label:>14}" for label in curves))
    for i, layer in enumerate(layers):
        print(f"{layer:<10}" + "".join(f"{curve[i]:14.3f}" for curve in curves.values()))
    for label, curve in curves.items():
        later = sum(curve[half:]) / (len(curve) - half)
        print(f"{label:<12} mean over depth {sum(curve) / len(curve):.3f}   later half {later:.3f}")
    last = layers[-1]
    gains = {a: results["trained"][(last, a)].layer_acc - results["random init"][(last, a)].layer_acc
             for a in args.attributes}
    print("last-layer gain per attribute: " + ", ".join(f"{a} {g:+.3f}" for a, g in gains.items()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for label, res in results.items():
            (args.out / f"probing_{label.replace(' ', '_')}.json").write_text(json.dumps(res.to_dict(), indent=1))
        plot_mean_accuracy(results).savefig(args.out / "fig5_4_mean_accuracy.png", dpi=110)


if __name__ == "__main__":
    main()
