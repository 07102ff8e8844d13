"""Occlusion, SmoothGrad and Integrated Gradients maps for many logits at once (seed 001 eq. 1 and 4).

All methods share `grad_cam`'s call shape: `method(model, images, targets=None, target="predicted",
labels=None, ...)` returns non-negative maps (B, T, H, W) at image resolution, one per image and target
logit. The target function is the same as Grad-CAM's: f_t(x) = s_t * logit_t(x) with the sign s_t of
`analysis.gradcam.target_signs` fixed at the clean image (so "predicted" explains the predicted class),
or with `score="probability"` its confidence sigmoid(s_t * logit_t(x)).

Occlusion (eq. 1) scores a patch p by f(x) - f(x with p set to the fill value); a pixel's saliency is
the mean drop over the patches that cover it. Gradient methods differentiate all T targets in one
vectorised backward (`torch.autograd.grad(..., is_grads_batched=True)`) per chunk of perturbed images.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from analysis.gradcam import TARGETS, eval_mode, grad_cam, target_indices, target_signs, upsample_maps
from analysis.layers import resolve_layer

METHODS = ("gradcam", "occlusion", "smoothgrad", "integrated_gradients")
SCORES = ("logit", "probability")
ATTRIBUTIONS = ("magnitude", "grad_x_input")
# Default bound on one chunk's input-gradient tensor (targets x images x C x H x W) and on the
# number of images in one forward pass.
DEFAULT_GRAD_BYTES = 1 << 30
DEFAULT_IMAGES_PER_PASS = 64


def target_scores(logits: torch.Tensor, indices: torch.Tensor, signs: torch.Tensor, score: str) -> torch.Tensor:
    """f_t = s_t * logit_t (score 'logit') or sigmoid(s_t * logit_t) ('probability'), shape (N, T)."""
    signed = logits[:, indices] * signs
    if score == "logit":
        return signed
    if score == "probability":
        return torch.sigmoid(signed)
    raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")


def resolve_targets(model: nn.Module, images: torch.Tensor, targets, target: str, labels, fn: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean logits (B, K), target indices (T,) and fixed signs (B, T); checks arguments."""
    if target not in TARGETS:
        raise ValueError(f"{fn}: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if images.dim() != 4:
        raise ValueError(f"{fn}: images must be (B, C, H, W), got shape {tuple(images.shape)}")
    with torch.no_grad():
        logits = model(images)
    if not torch.is_tensor(logits) or logits.dim() != 2:
        got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"{fn}: the model must map images (B, C, H, W) to logits (B, K), got {got}")
    indices = target_indices(targets, logits.shape[1], logits.device, fn)
    signs = target_signs(logits, indices, target, None if labels is None else torch.as_tensor(labels).to(logits.device))
    return logits, indices, signs.to(logits.dtype)


def _fill_tensor(images: torch.Tensor, fill, fn: str, option: str = "fill") -> torch.Tensor:
    """The replacement image (B, C, H, W): a number, 'mean' (per image and channel), 'blur' or a tensor."""
    if isinstance(fill, str):
        if fill == "mean":
            return images.mean((2, 3), keepdim=True).expand_as(images)
        if fill == "blur":
            return blur(images)
        if fill == "zero":
            return torch.zeros_like(images)
        raise ValueError(f"{fn}: {option} must be a number, 'zero', 'mean', 'blur' or a tensor, got {fill!r}")
    if torch.is_tensor(fill):
        try:
            return fill.to(images).expand_as(images)
        except RuntimeError:
            raise ValueError(f"{fn}: {option} tensor of shape {tuple(fill.shape)} does not broadcast to the "
                             f"images {tuple(images.shape)}") from None
    return torch.full_like(images, float(fill))


def blur(images: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """Gaussian blur (reflect padding), sigma default H / 16: the 'blur' baseline of insertion/deletion."""
    h, w = images.shape[-2:]
    sigma = float(sigma if sigma is not None else max(h, w) / 16)
    radius = max(1, min(int(3 * sigma + 0.5), min(h, w) - 1))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _positions(size: int, window: int, stride: int) -> list[int]:
    """Window starts every `stride` px, plus one flush with the far edge so every pixel is covered."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def occlusion_patches(height: int, width: int, window: int | tuple[int, int], stride: int | tuple[int, int],
                      device=None) -> torch.Tensor:
    """Bool masks (P, H, W) of the sliding windows, row-major order."""
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if not (1 <= wh <= height and 1 <= ww <= width):
        raise ValueError(f"occlusion: window {(wh, ww)} must be within 1 and the image size {(height, width)}")
    if sh < 1 or sw < 1:
        raise ValueError(f"occlusion: stride must be >= 1, got {(sh, sw)}")
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    masks = []
    for y in _positions(height, wh, sh):
        in_y = (rows >= y) & (rows < y + wh)
        for x in _positions(width, ww, sw):
            masks.append(in_y[:, None] & ((cols >= x) & (cols < x + ww))[None, :])
    return torch.stack(masks)


def occlusion(model: nn.Module, images: torch.Tensor, targets: Sequence[int] | torch.Tensor | None = None,
              target: str = "predicted", labels: torch.Tensor | None = None, window: int | tuple[int, int] = 8,
              stride: int | tuple[int, int] = 4, fill: float | str | torch.Tensor = 0.0, score: str = "logit",
              images_per_pass: int = DEFAULT_IMAGES_PER_PASS, signed: bool = False) -> torch.Tensor:
    """Occlusion maps (B, T, H, W), seed 001 eq. 1: H_p = f(x) - f(x with patch p filled).

    window/stride: patch side and step in pixels (int or (h, w)); a last window flush with the far edge is
    added so every pixel is covered. fill: a number, 'zero', 'mean' (per image and channel), 'blur' or a
    tensor. Each pixel gets the mean drop over the patches covering it (accumulated, divided by the
    coverage). `images_per_pass` occluded copies go through the model per forward. Maps are clamped at 0
    (evidence for the target) unless `signed`.
    """
    if score not in SCORES:
        raise ValueError(f"occlusion: score must be one of {', '.join(SCORES)}, got {score!r}")
    if images_per_pass < 1:
        raise ValueError(f"occlusion: images_per_pass must be >= 1, got {images_per_pass}")
    with eval_mode(model), torch.no_grad():
        logits, indices, signs = resolve_targets(model, images, targets, target, labels, "occlusion")
        b, c, h, w = images.shape
        base = target_scores(logits, indices, signs, score)  # (B, T)
        patches = occlusion_patches(h, w, window, stride, images.device)  # (P, H, W)
        p = patches.shape[0]
        filled = _fill_tensor(images, fill, "occlusion")
        drops = torch.empty(b, p, len(indices), dtype=base.dtype, device=images.device)
        pairs = torch.cartesian_prod(torch.arange(b, device=images.device), torch.arange(p, device=images.device))
        for start in range(0, len(pairs), images_per_pass):
            bi, pi = pairs[start:start + images_per_pass].unbind(1)
            m = patches[pi][:, None]  # (n, 1, H, W)
            occluded = torch.where(m, filled[bi], images[bi])
            scores = target_scores(model(occluded), indices, signs[bi], score)
            drops[bi, pi] = base[bi] - scores
        weights = patches.to(drops.dtype)
        coverage = weights.sum(0)
        maps = torch.einsum("bpt,phw->bthw", drops, weights) / coverage
    return maps if signed else maps.clamp_min(0)


def _input_gradients(model: nn.Module, inputs: torch.Tensor, indices: torch.Tensor, signs: torch.Tensor,
                     score: str, target_chunk: int) -> torch.Tensor:
    """d f_t / d input for all targets: (N, T, C, H, W), one batched backward per chunk of targets."""
    inputs = inputs.detach().requires_grad_(True)
    scores = target_scores(model(inputs), indices, signs, score)  # (N, T)
    n, t = scores.shape
    out = []
    for start in range(0, t, target_chunk):
        tc = min(target_chunk, t - start)
        grad_out = torch.zeros(tc, n, t, dtype=scores.dtype, device=scores.device)
        grad_out[torch.arange(tc), :, start + torch.arange(tc)] = 1
        (grads,) = torch.autograd.grad(scores, inputs, grad_out, retain_graph=start + tc < t,
                                       is_grads_batched=True)
        out.append(grads.transpose(0, 1))
    return torch.cat(out, dim=1)


def _chunks(images: torch.Tensor, num_targets: int, images_per_pass: int | None, fn: str) -> tuple[int, int]:
    """(images per forward, targets per backward) keeping one chunk's gradients under DEFAULT_GRAD_BYTES."""
    per_image_target = images[0].numel() * images.element_size()
    target_chunk = max(1, min(num_targets, DEFAULT_GRAD_BYTES // per_image_target))
    if images_per_pass is not None and images_per_pass < 1:
        raise ValueError(f"{fn}: images_per_pass must be >= 1, got {images_per_pass}")
    n = images_per_pass or max(1, min(DEFAULT_IMAGES_PER_PASS, DEFAULT_GRAD_BYTES // (per_image_target * target_chunk)))
    return n, target_chunk


def attributions(model: nn.Module, images: torch.Tensor, method: str = "integrated_gradients",
                 targets: Sequence[int] | torch.Tensor | None = None, target: str = "predicted",
                 labels: torch.Tensor | None = None, steps: int = 32, baseline: float | str | torch.Tensor = 0.0,
                 samples: int = 16, noise: float = 0.15, attribution: str = "magnitude", score: str = "logit",
                 generator: torch.Generator | None = None, images_per_pass: int | None = None) -> torch.Tensor:
    """Signed per-channel attributions (B, T, C, H, W) of a gradient method.

    integrated_gradients (seed 001 eq. 4): (x - x0) times the mean gradient at the `steps` midpoints
    alpha = (k + 1/2) / steps of the straight path from the baseline x0 (a number, 'zero', 'mean', 'blur' or
    a tensor) to x; the attributions sum to about f(x) - f(x0) (completeness).
    smoothgrad (Smilkov et al. 2017): the mean over `samples` noisy copies x + N(0, sigma^2), sigma = noise *
    (max(x) - min(x)) per image, of the gradient ('magnitude': its absolute value) or of gradient x input
    ('grad_x_input'). With noise 0 and one sample it is the plain gradient.
    Perturbed copies of the images go through the model `images_per_pass` at a time, each chunk with one
    batched backward for all targets.
    """
    fn = method
    if method not in ("integrated_gradients", "smoothgrad"):
        raise ValueError(f"attributions: method must be integrated_gradients or smoothgrad, got {method!r}")
    if score not in SCORES:
        raise ValueError(f"{fn}: score must be one of {', '.join(SCORES)}, got {score!r}")
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"{fn}: attribution must be one of {', '.join(ATTRIBUTIONS)}, got {attribution!r}")
    if steps < 1 or samples < 1:
        raise ValueError(f"{fn}: steps and samples must be >= 1, got steps={steps}, samples={samples}")
    if noise < 0:
        raise ValueError(f"{fn}: noise must be >= 0, got {noise}")
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        if images.is_inference():
            images = images.clone()
        images = images.detach()
        _, indices, signs = resolve_targets(model, images, targets, target, labels, fn)
        b = images.shape[0]
        t = len(indices)
        per_pass, target_chunk = _chunks(images, t, images_per_pass, fn)
        total = torch.zeros(b, t, *images.shape[1:], dtype=images.dtype, device=images.device)
        if method == "integrated_gradients":
            x0 = _fill_tensor(images, baseline, fn, "baseline")
            alphas = (torch.arange(steps, device=images.device, dtype=images.dtype) + 0.5) / steps
            count = steps
        else:
            spread = (images.amax((1, 2, 3)) - images.amin((1, 2, 3))) * noise  # (B,)
            count = samples
        pairs = torch.cartesian_prod(torch.arange(b, device=images.device),
                                     torch.arange(count, device=images.device))
        for start in range(0, len(pairs), per_pass):
            bi, si = pairs[start:start + per_pass].unbind(1)
            x = images[bi]
            if method == "integrated_gradients":
                inputs = x0[bi] + alphas[si, None, None, None] * (x - x0[bi])
            else:
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                inputs = x + eps * spread[bi, None, None, None]
            grads = _input_gradients(model, inputs, indices, signs[bi], score, target_chunk)
            if method == "smoothgrad":
                grads = grads * inputs[:, None] if attribution == "grad_x_input" else grads.abs()
            total.index_add_(0, bi, grads.detach())
        mean = total / count
        if method == "integrated_gradients":
            mean = mean * (images - x0)[:, None]
    return mean.detach()


def reduce_channels(attr: torch.Tensor, how: str = "positive") -> torch.Tensor:
    """(B, T, C, H, W) -> non-negative (B, T, H, W): 'positive' = max(sum over channels, 0), 'abs' = sum of
    absolute values over channels."""
    if attr.dim() != 5:
        raise ValueError(f"reduce_channels: attributions must be (B, T, C, H, W), got {tuple(attr.shape)}")
    if how == "positive":
        return attr.sum(2).clamp_min(0)
    if how == "abs":
        return attr.abs().sum(2)
    raise ValueError(f"reduce_channels: how must be 'positive' or 'abs', got {how!r}")


def integrated_gradients(model: nn.Module, images: torch.Tensor, targets=None, target: str = "predicted",
                         labels=None, steps: int = 32, baseline: float | str | torch.Tensor = 0.0,
                         reduce: str = "positive", score: str = "logit", images_per_pass: int | None = None
                         ) -> torch.Tensor:
    """Integrated Gradients maps (B, T, H, W): eq. 4 summed over colour channels, positive part by default
    (the pixels that raise the target above the baseline; reduce='abs' keeps both signs' magnitude)."""
    attr = attributions(model, images, "integrated_gradients", targets, target, labels, steps=steps,
                        baseline=baseline, score=score, images_per_pass=images_per_pass)
    return reduce_channels(attr, reduce)


def smoothgrad(model: nn.Module, images: torch.Tensor, targets=None, target: str = "predicted", labels=None,
               samples: int = 16, noise: float = 0.15, attribution: str = "magnitude", score: str = "logit",
               generator: torch.Generator | None = None, images_per_pass: int | None = None) -> torch.Tensor:
    """SmoothGrad maps (B, T, H, W): 'magnitude' sums the mean |gradient| over channels; 'grad_x_input' takes
    the positive part of the channel sum of the mean gradient x input."""
    attr = attributions(model, images, "smoothgrad", targets, target, labels, samples=samples, noise=noise,
                        attribution=attribution, score=score, generator=generator, images_per_pass=images_per_pass)
    return reduce_channels(attr, "abs" if attribution == "magnitude" else "positive")


def saliency(model: nn.Module, images: torch.Tensor, method: str, targets=None, target: str = "predicted",
             labels=None, upsample: bool = True, **kw) -> torch.Tensor:
    """Dispatch to gradcam (needs `layer`, default 'layer4'; bilinearly upsampled to the image size unless
    `upsample=False`), occlusion, smoothgrad or integrated_gradients; extra keywords go to the method."""
    common = {"targets": targets, "target": target, "labels": labels}
    if method == "gradcam":
        layer = kw.pop("layer", "layer4")
        if isinstance(layer, str):  # facelens modules hold the network as `net` (layers resolve inside it)
            layer = resolve_layer(getattr(model, "net", model), layer)
        maps = grad_cam(model, images, layer, **common, **kw)
        return upsample_maps(maps, tuple(images.shape[-2:])).clamp_min(0) if upsample else maps
    functions = {"occlusion": occlusion, "smoothgrad": smoothgrad, "integrated_gradients": integrated_gradients}
    if method not in functions:
        raise ValueError(f"saliency: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        return functions[method](model, images, **common, **kw)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise ValueError(f"saliency: bad option for {method}: {err}") from None
