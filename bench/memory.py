"""Peak host memory of probing and dissection on an early, large layer (resnet50 `layer1` at 224 px: 256 x 56 x 56
= 802,816 features per image).

Each measurement runs in a fresh child process (so peaks do not mix): it builds the model and the probe data,
records the resident set size, runs one analysis with the callback's settings, and reports the peak RSS
(`resource.getrusage` ru_maxrss) and its growth over the RSS before the analysis. The analysis runs at two probe
set sizes: a streaming analysis has the same growth at both, one that holds a full-layer matrix grows with
the number of images, and the bench extrapolates that growth linearly to the callback's default sizes.

    python bench/memory.py [--backbone resnet50] [--size 224] [--layer layer1] [--images 32 64] [--probe-budget-mib M]
                            [--probe-batch-size B]

--probe-budget-mib sets probing's `max_feature_bytes` (the callback's is 2 GiB): a layer whose sampled features
exceed it is streamed, so a budget below the smaller pool's layer matrix measures the streaming path at both sizes.
A streamed pass holds one batch of activations (--probe-batch-size images, the callback's batch_size): its peak
grows with the training set only while that is smaller than the batch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
BUDGET = 16 * GIB


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("memory bench: no VmRSS in /proc/self/status")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(kind: str, backbone: str, size: int, layer: str, images: int, probe_budget: int | None = None,
            probe_batch_size: int = 64) -> dict:
    """One analysis in this process: RSS before, peak RSS, and the layer's features per image.
    probe_budget: probing's max_feature_bytes in place of the callback's; probe_batch_size: its batch_size."""
    import torch

    from analysis.layers import capture
    from lightning_modules.attribute_module import AttributeModule

    torch.manual_seed(0)
    model = AttributeModule(backbone=backbone, attributes=["Male", "Eyeglasses", "Smiling", "Wearing_Hat",
                                                           "Blond_Hair"]).eval()
    with torch.no_grad(), capture(model.net, [layer]) as store:
        model.net(torch.zeros(1, 3, size, size))
        features = math.prod(store[layer].shape[1:])
    if kind == "probing":
        from callbacks.probing import ProbingCallback
        from torch.utils.data import default_collate

        from datamodules.synthfaces import SynthFaces

        # the callback's defaults (5 attributes, n_components, top_k, precision) with a smaller balanced sample
        half = images // 2
        cb = ProbingCallback(layers=[layer], n_train=half - half % 2, n_val=half - half % 2, num_images=4 * images,
                           batch_size=probe_batch_size,
                           **({} if probe_budget is None else {"max_feature_mib": probe_budget / 2**20}))
        source = SynthFaces(4 * images, split="val", size=size, seed=1)
        batches = [default_collate([source[i] for i in range(lo, min(lo + 64, 4 * images))])
                   for lo in range(0, 4 * images, 64)]
        before = rss_bytes()
        result = cb.analyse(model, batches)
        summary = {a: round(result[(layer, a)].layer_acc, 3) for a in result.attributes}
        images = len(torch.unique(torch.cat([torch.cat(s) for s in result.splits.values()])))  # the pool
    else:
        from callbacks.dissection import DissectionCallback

        cb = DissectionCallback(layers=[layer], dictionary_count=images, dictionary_size=size)
        _ = cb.dictionary
        before = rss_bytes()
        result = cb.analyse(model, [])
        summary = {"netdissect_units": int(result.layers[layer].netdissect_interpretable.sum())}
    return {"kind": kind, "images": images, "features": features, "before": before, "peak": peak_bytes(),
            "summary": summary}


def child(kind: str, args: argparse.Namespace, images: int) -> dict:
    """`measure` in a fresh interpreter, so ru_maxrss is this analysis's alone."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import memory; "
            f"print('RESULT', json.dumps(memory.measure({kind!r}, {args.backbone!r}, {args.size}, {args.layer!r}, "
            f"{images}, {args.probe_budget}, {args.probe_batch_size})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"memory bench: {kind} with {images} images failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--layer", default="layer1")
    parser.add_argument("--images", type=int, nargs=2, default=[32, 64],
                        help="two probe set sizes (probing: balanced training + validation images; dissection: "
                             "dictionary images)")
    parser.add_argument("--kinds", nargs="+", default=["probing", "dissection"], choices=("probing", "dissection"))
    parser.add_argument("--probe-budget-mib", type=float, default=None,
                        help="probing's max_feature_bytes in MiB (default: the callback's); layers over it stream")
    parser.add_argument("--probe-batch-size", type=int, default=64, help="probing's batch_size (the callback's: 64)")
    args = parser.parse_args(argv)
    if args.probe_batch_size < 1:
        parser.error(f"--probe-batch-size must be positive, got {args.probe_batch_size}")
    if args.probe_budget_mib is not None and args.probe_budget_mib <= 0:
        parser.error(f"--probe-budget-mib must be positive, got {args.probe_budget_mib}")
    args.probe_budget = None if args.probe_budget_mib is None else int(args.probe_budget_mib * 2**20)

    from callbacks.dissection import DissectionCallback
    from callbacks.probing import ProbingCallback

    probing, dissection = ProbingCallback(), DissectionCallback()
    # images the callback's default settings analyse: probing's pool of balanced samples (at most num_images),
    # dissection's dictionary
    default_images = {"probing": min(probing.num_images, 5 * (probing.n_train + probing.n_val)),
                      "dissection": dissection.num_images}
    budget = "callback default" if args.probe_budget is None else f"{args.probe_budget_mib:g} MiB"
    print(f"{args.backbone} {args.layer} at {args.size} px; probing max_feature_bytes {budget}, batch_size "
          f"{args.probe_batch_size}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| analysis | images | features / image | RSS before GiB | peak RSS GiB | growth GiB | "
          "growth per image MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    worst = 0.0
    for kind in args.kinds:
        runs = [child(kind, args, n) for n in args.images]
        for r in runs:
            growth = r["peak"] - r["before"]
            print(f"| {kind} | {r['images']} | {r['features']:,} | {r['before'] / GIB:.2f} | {r['peak'] / GIB:.2f} "
                  f"| {growth / GIB:.2f} | {growth / r['images'] / 2**20:.1f} |")
        small, large = runs
        slope = ((large["peak"] - large["before"]) - (small["peak"] - small["before"])) \
            / (large["images"] - small["images"])
        n = default_images[kind]
        projected = large["peak"] + slope * (n - large["images"])
        worst = max(worst, projected)
        print(f"  {kind}: {slope / 2**20:.1f} MiB more peak per extra image "
              f"({large['features'] * 4 / 2**20:.1f} MiB is one image's float32 layer); projected peak at the "
              f"default {n} images: {projected / GIB:.1f} GiB")
    print(f"worst projected peak {worst / GIB:.1f} GiB ({'within' if worst < BUDGET else 'OVER'} 16 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
