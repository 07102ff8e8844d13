"""Grad-CAM, Grad-CAM++ and HiResCAM for many logits at once: one forward, one batched backward.

Per-target CAM libraries run one forward and one backward per target logit. Here the layer's output
is replaced by a detached leaf during a single forward, and the gradients of all target logits with
respect to it come from one vectorised `torch.autograd.grad(..., is_grads_batched=True)`, which only
traverses the part of the network after the layer. When the layer feeds global average pooling and
a linear head, the gradient is known exactly (W_k / (h w), times the target's sign) and no backward
is run at all.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from analysis.layers import resolve_layer

METHODS = ("gradcam", "gradcampp", "hirescam")
TARGETS = ("positive", "negative", "predicted", "ground_truth")
# Grad-CAM++ denominator guard, the value pytorch-grad-cam uses, so both agree.
GRADCAMPP_EPS = 1e-6
# Default bound on the gradient tensor of one backward chunk (targets x activation size).
DEFAULT_GRAD_BYTES = 1 << 30


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (BatchNorm on running statistics, so images do not interact), then restore each
    module's own train/eval flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def target_indices(targets, num_logits: int, device: torch.device, fn: str = "grad_cam") -> torch.Tensor:
    """Logit indices (T,) to explain: all of them for None, else the given ones, checked against the logit count."""
    if targets is None:
        return torch.arange(num_logits, device=device)
    indices = torch.as_tensor(targets, dtype=torch.long).reshape(-1).to(device)
    if len(indices) == 0 or indices.min() < 0 or indices.max() >= num_logits:
        raise ValueError(f"{fn}: targets must be logit indices in [0, {num_logits}), got {indices.tolist()}")
    return indices


def target_signs(logits: torch.Tensor, indices: torch.Tensor, target: str,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
    """d(target function)/d(logit) for each image and target, shape (B, T).

    positive: logit -> 1; negative: -logit -> -1; predicted: |logit| (seed 004 listing 4.3) -> sign(logit);
    ground_truth: logit * label with label in {-1, 1} -> label.
    """
    if target == "positive":
        return torch.ones(logits.shape[0], len(indices), dtype=logits.dtype, device=logits.device)
    if target == "negative":
        return -torch.ones(logits.shape[0], len(indices), dtype=logits.dtype, device=logits.device)
    if target == "predicted":
        return torch.sign(logits.detach()[:, indices])
    if target == "ground_truth":
        if labels is None:
            raise ValueError("grad_cam: target='ground_truth' needs labels (B, K) in {0, 1} or {-1, 1}")
        return signed_labels(labels, logits.shape, "grad_cam: labels")[:, indices].to(logits.dtype)
    raise ValueError(f"grad_cam: unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def signed_labels(labels: torch.Tensor, shape: Sequence[int], what: str = "labels") -> torch.Tensor:
    """Labels given as {0, 1} or {-1, 1}, returned as float {-1, 1} (0 means absent only in the 0/1 form)."""
    labels = torch.as_tensor(labels)
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{what}: expected shape {tuple(shape)}, got {tuple(labels.shape)}")
    values = labels.float()
    if (values < 0).any():
        if not ((values == 1) | (values == -1)).all():
            raise ValueError(f"{what}: labels with -1 must be in {{-1, 1}}, got values "
                             f"{values.unique().tolist()}")
        return values
    if not ((values == 0) | (values == 1)).all():
        raise ValueError(f"{what}: labels must be in {{0, 1}} or {{-1, 1}}, got values "
                         f"{values.unique().tolist()}")
    return values * 2 - 1


def _capture_leaf(model: nn.Module, module: nn.Module, images: torch.Tensor, layer_name: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward with the layer's output replaced by a detached leaf; returns (activation leaf, logits).

    Everything up to the layer runs without autograd (no graph is needed there); the hook switches
    autograd on for the rest. Should the model reset grad mode after the layer, the forward is repeated
    with autograd on throughout.
    """
    for record_before in (False, True):
        leaves: list[torch.Tensor] = []
        problems: list[str] = []

        def hook(_m, _inp, out):
            if not torch.is_tensor(out) or out.dim() != 4:
                kind = f"tensor of shape {tuple(out.shape)}" if torch.is_tensor(out) else type(out).__name__
                problems.append(f"layer {layer_name!r} must output a (B, C, h, w) tensor, got a {kind}")
                return None
            torch.set_grad_enabled(True)
            leaf = out.detach().requires_grad_(True)
            leaves.append(leaf)
            # A clone, so an in-place op after the layer (ReLU(inplace=True)) leaves the leaf intact.
            return leaf.clone()

        handle = module.register_forward_hook(hook)
        torch.set_grad_enabled(record_before)
        try:
            logits = model(images)
        finally:
            torch.set_grad_enabled(True)
            handle.remove()
        if problems:
            raise ValueError(problems[0])
        if len(leaves) != 1:
            raise ValueError(f"layer {layer_name!r} ran {len(leaves)} times in one forward; Grad-CAM needs a "
                             "layer that runs exactly once")
        if not torch.is_tensor(logits) or logits.dim() != 2:
            got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise ValueError(f"grad_cam: the model must map images (B, 3, H, W) to logits (B, K), got {got}")
        if logits.requires_grad:
            return leaves[0], logits
    raise ValueError(f"grad_cam: the logits do not depend on layer {layer_name!r} through autograd")


def _linear_head(model: nn.Module, channels: int, outputs: int) -> nn.Linear | None:
    """The last nn.Linear mapping `channels` features to `outputs` logits, if the model has one."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)
             and m.in_features == channels and m.out_features == outputs]
    return heads[-1] if heads else None


def _closed_form_holds(activation: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor) -> bool:
    """Check d logits / d A == W / (h w) along one random direction (one cheap backward through the head)."""
    # A private generator: the check must not move the caller's random stream.
    gen = torch.Generator(device=logits.device).manual_seed(0)
    v = torch.randn(logits.shape, generator=gen, device=logits.device, dtype=logits.dtype)
    (grad,) = torch.autograd.grad(logits, activation, v, retain_graph=True)
    h, w = activation.shape[-2:]
    expected = (v @ weight.to(v.dtype))[:, :, None, None].expand_as(grad) / (h * w)
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return bool(((grad - expected).abs() <= 1e-4 * scale + 1e-4 * expected.abs()).all())


def _cams_from_weights(weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """Channel weights (B, T, C) times activations (B, C, h, w), summed over channels: (B, T, h, w)."""
    return torch.einsum("btc,bchw->bthw", weights, activation)


def _gradcampp_weights(grads: torch.Tensor, act_sums: torch.Tensor, spatial_sum: int | None) -> torch.Tensor:
    """Grad-CAM++ channel weights (Chattopadhay et al. 2018, eq. 19 with the ReLU of eq. 7).

    grads (..., C, h, w) with act_sums broadcastable to (..., C, 1, 1); or, when the gradient is constant
    over space, grads (..., C) with act_sums (..., C) and `spatial_sum` = h * w.
    """
    g2 = grads * grads
    alpha = g2 / (2 * g2 + act_sums * g2 * grads + GRADCAMPP_EPS)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    weighted = grads.clamp_min(0) * alpha
    return weighted * spatial_sum if spatial_sum is not None else weighted.sum((-2, -1))


def _closed_form_cams(activation: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor,
                      signs: torch.Tensor, method: str) -> torch.Tensor:
    h, w = activation.shape[-2:]
    grads = signs[:, :, None] * (weight[indices].to(activation.dtype) / (h * w))[None]  # (B, T, C)
    if method == "gradcampp":
        grads = _gradcampp_weights(grads, activation.sum((2, 3))[:, None, :], h * w)
    # HiResCAM equals Grad-CAM when the gradient is constant over space.
    return _cams_from_weights(grads, activation)


def _autograd_cams(activation: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor,
                   signs: torch.Tensor, method: str, chunk: int) -> torch.Tensor:
    b, k = logits.shape
    out = []
    act_sums = activation.detach().sum((2, 3))[:, :, None, None] if method == "gradcampp" else None
    act = activation.detach()
    for start in range(0, len(indices), chunk):
        idx = indices[start:start + chunk]
        t = len(idx)
        grad_out = torch.zeros(t, b, k, dtype=logits.dtype, device=logits.device)
        rows = torch.arange(t, device=logits.device)[:, None]
        images = torch.arange(b, device=logits.device)[None, :]
        grad_out[rows, images, idx[:, None]] = signs[:, start:start + t].T
        (grads,) = torch.autograd.grad(logits, activation, grad_out, retain_graph=True, is_grads_batched=True)
        grads = grads.transpose(0, 1)  # (B, t, C, h, w)
        if method == "gradcam":
            cams = _cams_from_weights(grads.mean((3, 4)), act)
        elif method == "gradcampp":
            cams = _cams_from_weights(_gradcampp_weights(grads, act_sums[:, None], None), act)
        else:
            cams = (grads * act[:, None]).sum(2)
        out.append(cams)
        del grads
    return torch.cat(out, dim=1)


def grad_cam(model: nn.Module, images: torch.Tensor, layer: str | nn.Module,
             targets: Sequence[int] | torch.Tensor | None = None, target: str = "predicted",
             method: str = "gradcam", labels: torch.Tensor | None = None, closed_form: bool | None = None,
             max_targets_per_pass: int | None = None, return_logits: bool = False
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Raw, non-negative CAMs (B, T, h, w) at the layer's resolution for T target logits of `model`.

    model: images (B, 3, H, W) -> logits (B, K). layer: a name (`layer4`, `layer3.5.conv2`) or a module.
    targets: logit indices (all K when None). target: positive | negative | predicted | ground_truth
    (the latter needs `labels` (B, K) in {0, 1} or {-1, 1}). method: gradcam | gradcampp | hirescam.
    closed_form: None detects a global-average-pool + linear head after the layer (verified by one
    backward along a random direction), True requires it, False always backpropagates.
    max_targets_per_pass: targets per batched backward (default: as many as fit in 1 GiB of gradients).
    The model runs in eval mode and gets its own train/eval flags back; parameter .grad is untouched.
    With return_logits, returns (maps, logits (B, K)) from the same forward.
    """
    if method not in METHODS:
        raise ValueError(f"grad_cam: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if target not in TARGETS:
        raise ValueError(f"grad_cam: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if images.dim() != 4:
        raise ValueError(f"grad_cam: images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if max_targets_per_pass is not None and max_targets_per_pass < 1:
        raise ValueError(f"grad_cam: max_targets_per_pass must be >= 1, got {max_targets_per_pass}")
    module = resolve_layer(model, layer) if isinstance(layer, str) else layer
    layer_name = layer if isinstance(layer, str) else type(layer).__name__

    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        if images.is_inference():
            images = images.clone()
        activation, logits = _capture_leaf(model, module, images, layer_name)
        num_logits = logits.shape[1]
        indices = target_indices(targets, num_logits, logits.device)
        signs = target_signs(logits, indices, target,
                             None if labels is None else torch.as_tensor(labels).to(logits.device))

        head = None
        if closed_form is not False:
            head = _linear_head(model, activation.shape[1], num_logits)
            if head is not None and not _closed_form_holds(activation, logits, head.weight.detach()):
                head = None
            if head is None and closed_form:
                raise ValueError(f"grad_cam: closed_form=True but layer {layer_name!r} does not feed global "
                                 "average pooling and a linear head")
        if head is not None:
            cams = _closed_form_cams(activation.detach(), head.weight.detach(), indices, signs, method)
        else:
            per_target = activation.numel() * activation.element_size()
            chunk = max_targets_per_pass or max(1, DEFAULT_GRAD_BYTES // per_target)
            cams = _autograd_cams(activation, logits, indices, signs, method, chunk)
    maps = cams.clamp_min(0).detach()
    return (maps, logits.detach()) if return_logits else maps


def upsample_maps(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (..., h, w) maps to `size` (half-pixel centres, as cv2.resize); stays >= 0."""
    if maps.dim() < 2:
        raise ValueError(f"upsample_maps: maps must be (..., h, w), got shape {tuple(maps.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    if not flat.is_floating_point():
        flat = flat.float()
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)
