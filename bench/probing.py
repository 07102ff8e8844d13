"""Our torch PLS1 against scikit-learn's PLSRegression(scale=False) on the same matrix.

    python bench/probing.py                       # 2048 x 100352, 8 components, CPU
    python bench/probing.py --features 16384 --device cuda --repeats 3
    OMP_NUM_THREADS=2 python bench/probing.py --features 49152   # same thread count for both sides

Prints both times, their ratio, the VIP correlation and the largest relative weight error, and peak
memory (process RSS on CPU, allocator peak on CUDA).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.probing import PLS, vip_scores  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--features", type=int, default=100352)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("auto", "float32", "float64"), default="auto",
                        help="PLS(precision=...): auto = float32 products on a matrix this large (errors ~1e-6), "
                             "float64 matches sklearn to 1e-12")
    parser.add_argument("--block-columns", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="timed fits of ours (the best is reported)")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if min(args.samples, args.features) < args.components:
        parser.error("--samples and --features must be at least --components")

    gen = torch.Generator().manual_seed(args.seed)
    # ReLU-like activations (non-negative, non-zero mean) with a planted signal.
    X = torch.randn(args.samples, args.features, generator=gen).relu_()
    y = (X[:, :32].sum(1) + 4 * torch.randn(args.samples, generator=gen) > X[:, :32].sum(1).median()).float()
    device = torch.device(args.device)
    Xd = X.to(device)
    print(f"X {args.samples} x {args.features} float32 ({X.numel() * 4 / 2**20:.0f} MiB), "
          f"{args.components} components, device {device}, precision {args.precision}, "
          f"torch threads {torch.get_num_threads()}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    PLS(args.components, block_columns=args.block_columns, precision=args.precision).fit(Xd[:, :2048], y)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ours_times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        pls = PLS(args.components, block_columns=args.block_columns, precision=args.precision).fit(Xd, y)
        sync()
        ours_times.append(time.perf_counter() - start)
    ours = min(ours_times)
    mem = (f"CUDA peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda"
           else f"process peak RSS {peak_rss_mib():.0f} MiB")
    print(f"ours:    {ours:8.3f} s  ({pls.n_passes_} passes over X; {mem})")
    if args.skip_sklearn:
        return

    from sklearn.cross_decomposition import PLSRegression

    Xn, yn = X.numpy(), y.numpy()
    start = time.perf_counter()
    sk = PLSRegression(args.components, scale=False).fit(Xn, yn)
    theirs = time.perf_counter() - start
    print(f"sklearn: {theirs:8.3f} s  (process peak RSS {peak_rss_mib():.0f} MiB)")
    vip_sk = vip_scores(torch.from_numpy(sk.x_weights_), torch.from_numpy(sk.x_scores_),
                        torch.from_numpy(sk.y_loadings_)).numpy()
    vip_ours = pls.vip_.cpu().numpy()
    w_err = np.abs(pls.x_weights_.cpu().numpy() - sk.x_weights_).max() / np.abs(sk.x_weights_).max()
    print(f"speed-up {theirs / ours:.1f}x   VIP correlation {np.corrcoef(vip_ours, vip_sk)[0, 1]:.8f}   "
          f"max relative weight error {w_err:.2e}")


if __name__ == "__main__":
    main()
