"""Balanced vs unbalanced AFFACT loss on SynthFaces with CelebA's class imbalance (seed 004's contrast).

Trains the same network twice for the same number of steps, differing only in the loss, and prints the
validation mean error and mean balanced error of both, plus the attributes where they differ most.

    python bench/affact_balance.py [--epochs 5] [--num-train 3000] [--backbone resnet18] [--size 64]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_one(loss: str, args: argparse.Namespace, root: Path):
    import train

    cli = train.main([
        "--config", f"configs/affact_synth_{loss}.yaml",
        "--trainer.max_epochs", str(args.epochs), "--trainer.precision", "32-true",
        "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
        "--trainer.enable_checkpointing", "false",
        "--model.init_args.backbone", args.backbone, "--model.init_args.lr", str(args.lr),
        "--data.init_args.size", str(args.size), "--data.init_args.num_train", str(args.num_train),
        "--data.init_args.num_val", str(args.num_val), "--data.init_args.num_identities", str(args.num_train // 8),
        "--data.init_args.num_workers", str(args.workers), "--data.init_args.cache", "true",
        "--data.init_args.augment", "null",
    ], run=False)
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    return cli.model.last_report, time.perf_counter() - started, cli.trainer.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--num-val", type=int, default=1000)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for loss in ("unbalanced", "balanced"):
            report, seconds, steps = train_one(loss, args, Path(tmp) / loss)
            results[loss] = {"report": report, "seconds": seconds, "steps": steps}
            print(f"{loss}: mean error {report.mean_error:.4f}, mean balanced error {report.mean_balanced_error:.4f}"
                  f" after {steps} steps ({seconds:.0f} s)", flush=True)
    ub, b = results["unbalanced"]["report"], results["balanced"]["report"]
    print(f"\nSynthFaces (CelebA priors), {args.backbone} @ {args.size}px, {results['balanced']['steps']} steps each")
    print(f"{'':14}{'mean error':>12}{'mean balanced error':>22}{'seconds':>10}")
    for name, rep in (("unbalanced", ub), ("balanced", b)):
        print(f"{name:14}{rep.mean_error:12.4f}{rep.mean_balanced_error:22.4f}{results[name]['seconds']:10.0f}")
    print(f"majority-class baseline: mean error {ub.mean_majority_error:.4f}, mean balanced error 0.5")
    gain = (1 - b.balanced_accuracy) - (1 - ub.balanced_accuracy)
    print("\nbalanced error, per attribute (most changed first):")
    for i in sorted(range(len(ub.attributes)), key=lambda i: gain[i])[:10]:
        print(f"  {ub.attributes[i]:<22} pos {ub.positive_rate[i]:.3f}  unbalanced {1 - ub.balanced_accuracy[i]:.3f}"
              f"  balanced {1 - b.balanced_accuracy[i]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: {"report": v["report"].to_dict(), "seconds": v["seconds"],
                                                   "steps": v["steps"]} for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
