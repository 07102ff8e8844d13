"""Network Dissection: analysis.dissection against a per-unit NumPy NetDissect-Lite reference.

The reference follows NetDissect-Lite's tally loop (feature_operation.py): one (image, unit) pair
at a time, skip the pair when the map's maximum is not above the threshold, upsample it
bilinearly to mask size, threshold, add |A & M| and |A| to running tallies. Two deliberate
differences: thresholds come from exact `np.quantile` (NetDissect-Lite uses an approximate
quantile sketch) and the union counts |A| over every image where the concept is labelled (not
NetDissect-Lite's Broden-category rule), which is the definition both implementations share.

The default is issue 7's layer (2048 units, 7 px maps, 40 concepts, 112 px masks) over 100 images, on
one CPU thread for both sides; the last line projects both to the full 10,000-image dictionary.

    python bench/dissection.py                                  # CPU, compiled tally
    python bench/dissection.py --tally sparse                   # the torch CPU tally, for comparison
    python bench/dissection.py --device cuda --images 10000 --reference-images 20
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.dissection import DissectionConfig, netdissect_iou  # noqa: E402


def interpolation_matrix(n_src: int, n_out: int) -> np.ndarray:
    """(n_out, n_src) bilinear weights: half-pixel centres, edge clamped (PIL / align_corners=False)."""
    src = np.maximum((np.arange(n_out) + 0.5) * n_src / n_out - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_src - 1)
    i1 = np.minimum(i0 + 1, n_src - 1)
    lam = src - i0
    m = np.zeros((n_out, n_src))
    np.add.at(m, (np.arange(n_out), i0), 1 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


def reference_netdissect(activations: np.ndarray, masks: np.ndarray, quantile: float = 0.005,
                         labelled: np.ndarray | None = None, fires_only: bool = False,
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds (U,) and IoU (U, C), float64, one (image, unit) pair at a time."""
    acts = np.asarray(activations, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    n, u, h, w = acts.shape
    _, c, hm, wm = masks.shape
    labelled = np.ones((n, c), dtype=bool) if labelled is None else np.asarray(labelled, dtype=bool)
    thresholds = np.array([np.quantile(acts[:, j].ravel(), 1 - quantile) for j in range(u)])
    ry, rx = interpolation_matrix(h, hm), interpolation_matrix(w, wm)
    tally_both = np.zeros((u, c))
    tally_units = np.zeros((u, c))
    tally_labels = np.zeros(c)
    tally_labels_fired = np.zeros((u, c))
    for i in range(n):
        pixels = (masks[i] & labelled[i][:, None, None]).reshape(c, -1)
        label_area = pixels.sum(1)
        tally_labels += label_area
        for j in range(u):
            feature_map = acts[i, j]
            if feature_map.max() > thresholds[j]:
                up = ry @ feature_map @ rx.T
                indexes = np.flatnonzero(up.ravel() > thresholds[j])
                if len(indexes) == 0:
                    continue
                tally_both[j] += pixels[:, indexes].sum(1)
                tally_units[j] += len(indexes) * labelled[i]
                tally_labels_fired[j] += label_area
    union = tally_units + (tally_labels_fired if fires_only else tally_labels[None]) - tally_both
    iou = np.divide(tally_both, union, out=np.zeros_like(tally_both), where=union > 0)
    return thresholds, iou


def synthetic_dictionary(images: int, units: int, concepts: int, feature_size: int = 7, mask_size: int = 112,
                         planted: int = 0, seed: int = 0, device: str | torch.device = "cpu",
                         chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (N, U, h, h) float32 (smoothed ReLU noise) and ellipse masks (N, C, H, H) bool.

    Unit j < `planted` copies concept j's mask (area-pooled to feature size) plus weak noise.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    centre = torch.rand(concepts, 2, generator=g, device=device) * 0.6 + 0.2
    radius = torch.rand(concepts, 2, generator=g, device=device) * 0.12 + 0.06
    grid = (torch.arange(mask_size, device=device, dtype=torch.float32) + 0.5) / mask_size
    masks = torch.empty(images, concepts, mask_size, mask_size, dtype=torch.bool, device=device)
    for s in range(0, images, chunk):
        b = min(chunk, images - s)
        c = centre + 0.04 * torch.randn(b, concepts, 2, generator=g, device=device)
        present = torch.rand(b, concepts, generator=g, device=device) < 0.7
        dx = (grid[None, None, None, :] - c[..., 0, None, None]) / radius[:, 0, None, None]
        dy = (grid[None, None, :, None] - c[..., 1, None, None]) / radius[:, 1, None, None]
        masks[s:s + b] = (dx**2 + dy**2 <= 1) & present[..., None, None]
    acts = torch.empty(images, units, feature_size, feature_size, device=device)
    for s in range(0, images, chunk):
        b = min(chunk, images - s)
        noise = torch.randn(b, units, feature_size, feature_size, generator=g, device=device)
        a = F.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False).relu()
        if planted:
            k = min(planted, concepts, units)
            pooled = F.adaptive_avg_pool2d(masks[s:s + b, :k].float(), feature_size)
            a[:, :k] = 3 * pooled + 0.05 * a[:, :k]
        acts[s:s + b] = a
    return acts, masks


def peak_memory_mb(device: torch.device) -> str:
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        return f"GPU peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB, host peak RSS {host:.0f} MiB"
    return f"host peak RSS {host:.0f} MiB"


def timed(fn, repeats: int = 1):
    """(result, fastest wall time of `repeats` calls)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return out, best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--units", type=int, default=2048)
    p.add_argument("--concepts", type=int, default=40)
    p.add_argument("--feature-size", type=int, default=7)
    p.add_argument("--mask-size", type=int, default=112)
    p.add_argument("--quantile", type=float, default=0.005)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tally", choices=["auto", "compiled", "dense", "sparse"], default="auto")
    p.add_argument("--quantile-method", choices=["exact", "sketch"], default="exact")
    p.add_argument("--chunk-elements", type=int, default=1 << 24,
                   help="upsampled elements per tally step (raise on a GPU)")
    p.add_argument("--reference-images", type=int, default=None,
                   help="run the NumPy reference on the first N images only (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="time each side this many times, keep the fastest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the reference uses one core)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    for name in ("images", "units", "concepts", "feature_size", "mask_size", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    ref_n = min(args.reference_images or args.images, args.images)
    torch.set_grad_enabled(False)
    torch.set_num_threads(max(1, args.threads))

    acts, masks = synthetic_dictionary(args.images, args.units, args.concepts, args.feature_size, args.mask_size,
                                       planted=min(8, args.units), seed=args.seed, device=device)
    cfg = DissectionConfig(tally=args.tally, quantile_method=args.quantile_method, chunk_elements=args.chunk_elements)
    print(f"device={device} images={args.images} units={args.units} concepts={args.concepts} "
          f"features={args.feature_size}px masks={args.mask_size}px tally={args.tally} "
          f"quantile={args.quantile} ({args.quantile_method}) torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")

    run = lambda n: netdissect_iou(acts[:n], masks[:n], args.quantile, config=cfg,  # noqa: E731
                                   batch_size=args.batch_size)
    run(min(args.batch_size, args.images))  # warm-up (kernels, allocator)
    if ref_n < args.images:
        _, t_full = timed(lambda: run(args.images))
        print(f"ours, all {args.images} images: {t_full:.3f} s "
              f"({t_full / (args.images * args.units) * 1e6:.3f} us per image-unit)")
    (t_ours, iou_ours), s_ours = timed(lambda: run(ref_n), args.repeats)
    a_np, m_np = acts[:ref_n].cpu().numpy(), masks[:ref_n].cpu().numpy()
    (t_ref, iou_ref), s_ref = timed(lambda: reference_netdissect(a_np, m_np, args.quantile), args.repeats)
    pairs = ref_n * args.units
    print(f"fastest of {args.repeats} runs each, on {ref_n} images: ours {s_ours:.3f} s ({s_ours / pairs * 1e6:.3f} us/image-unit), "
          f"NumPy reference {s_ref:.3f} s ({s_ref / pairs * 1e6:.2f} us/image-unit), ratio {s_ref / s_ours:.1f}x")
    print(f"max |threshold difference| {np.abs(t_ours - t_ref).max():.3g}, "
          f"max |IoU difference| {np.abs(iou_ours - iou_ref).max():.3g}, "
          f"interpretable units (IoU > 0.04): ours {(iou_ours.max(1) > 0.04).sum()}, "
          f"reference {(iou_ref.max(1) > 0.04).sum()}")
    full = 10_000 * args.units
    print(f"projected to 10,000 images x {args.units} units: ours {s_ours / pairs * full:.0f} s, "
          f"NumPy reference {s_ref / pairs * full / 60:.0f} min")
    print(peak_memory_mb(device))


if __name__ == "__main__":
    main()
