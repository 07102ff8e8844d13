"""Grad-CAM for every attribute logit: analysis.gradcam (one batched pass) against pytorch-grad-cam
(one forward and backward per target), same model, batch, device and targets.

Both sides produce what a user looks at: CAMs at image size, min-max scaled. pytorch-grad-cam is
timed through its public call (`cam(input_tensor, targets)`, one call per logit); ours is
`grad_cam` + `upsample_maps`. Its scaling (min-max, resize, min-max) is applied to our raw maps
before the maximum absolute difference is taken. The reference can be timed on fewer targets
(`--reference-targets`): each target is a separate call, so its time is extrapolated linearly.

    python bench/gradcam.py                                    # ResNet-50, 40 logits, batch 8, 224 px, CPU
    python bench/gradcam.py --batch 2 --size 128 --reference-targets 2    # a quick check
    python bench/gradcam.py --device cuda --batch 64
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.amr import minmax_normalize  # noqa: E402
from analysis.gradcam import grad_cam, upsample_maps  # noqa: E402
from analysis.layers import resolve_layer  # noqa: E402

METHODS = {"gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus", "hirescam": "HiResCAM"}


class AbsLogit:
    """pytorch-grad-cam target for |logit k| (seed 004 listing 4.3), our target='predicted'."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, output):
        return output[..., self.k].abs()


def build_model(name: str, num_logits: int, device: torch.device) -> torch.nn.Module:
    """Random-init timm model; BatchNorm statistics randomised since timm zero-initialises each block's
    last BatchNorm, which would leave the residual branches silent."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_logits)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.1
    return model.to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB process peak RSS so far"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_ours(model, images, layer, method, target, repeats, device):
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        raw = grad_cam(model, images, layer, target=target, method=method)
        up = upsample_maps(raw, images.shape[-2:])
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, raw, up


def run_reference(model, images, layer, method, target, num_targets):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = getattr(pytorch_grad_cam, METHODS[method])(model=model, target_layers=[resolve_layer(model, layer)])
    make = ClassifierOutputTarget if target == "positive" else AbsLogit
    maps = []
    start = time.perf_counter()
    try:
        for k in range(num_targets):
            maps.append(cam(input_tensor=images, targets=[make(k) for _ in range(len(images))]))
    finally:
        cam.activations_and_grads.release()
    return time.perf_counter() - start, np.stack(maps, axis=1)


def reference_scaling(raw: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's output scaling: min-max, bilinear resize, min-max."""
    return minmax_normalize(upsample_maps(minmax_normalize(raw), size)).cpu().numpy()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--logits", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--layers", nargs="+", default=["layer4", "layer3"])
    p.add_argument("--method", choices=sorted(METHODS), default="gradcam")
    p.add_argument("--target", choices=["positive", "predicted"], default="positive")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="our timing is the best of this many runs")
    p.add_argument("--reference-targets", type=int, default=None,
                   help="time pytorch-grad-cam on this many targets and extrapolate (default: all)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    n_ref = args.reference_targets or args.logits
    if not 1 <= n_ref <= args.logits:
        p.error(f"--reference-targets must be in [1, {args.logits}], got {n_ref}")

    model = build_model(args.model, args.logits, device)
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=gen).to(device)
    print(f"{args.model}, {args.logits} logits, batch {args.batch} at {args.size} px on {device} "
          f"({torch.get_num_threads()} threads), method {args.method}, target {args.target}")
    if n_ref < args.logits:
        print(f"pytorch-grad-cam timed on {n_ref} of {args.logits} targets, extrapolated linearly")
    print(f"{'layer':<10} {'ours s':>9} {'pgc s':>9} {'ratio':>8} {'max |diff|':>11}  "
          "peak memory (ours / pgc)")
    for layer in args.layers:
        run_ours(model, images, layer, args.method, args.target, 1, device)  # warm-up
        reset_peak(device)
        ours_s, raw, _ = run_ours(model, images, layer, args.method, args.target, args.repeats, device)
        ours_mem = peak_memory(device)
        reset_peak(device)
        ref_s, ref_maps = run_reference(model, images, layer, args.method, args.target, n_ref)
        ref_mem = peak_memory(device)
        ref_total = ref_s * args.logits / n_ref
        ours_scaled = reference_scaling(raw[:, :n_ref], tuple(images.shape[-2:]))
        diff = float(np.abs(ours_scaled - ref_maps).max())
        print(f"{layer:<10} {ours_s:>9.3f} {ref_total:>9.2f} {ref_total / ours_s:>7.1f}x {diff:>11.2e}  "
              f"{ours_mem} / {ref_mem}")


if __name__ == "__main__":
    main()
