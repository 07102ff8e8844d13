"""Does a saliency map deserve trust? Seed 001 section 2.5: the hiding game (deletion and insertion curves),
the pointing game, and the model-parameter randomisation sanity check (Adebayo et al. 2018).

Deletion starts from the image and replaces pixels, most salient first, by a baseline (a blurred copy or
zeros); insertion starts from the baseline and puts the image's pixels back in the same order. The target
score after each step traces a curve over the fraction of pixels changed; its area (trapezoid rule on
[0, 1]) is the AUC. A faithful map makes the deletion AUC low and the insertion AUC high. The score is the
target's confidence sigmoid(s * logit) by default (bounded, comparable across attributes), or the signed
logit s * logit, with the sign s of `analysis.gradcam.target_signs` fixed at the clean image.

The randomisation check re-initialises the model's blocks cumulatively from the output down (each
parametrised module through its own `reset_parameters`) and compares the maps with those of the trained
model: Spearman's rank correlation of the raw maps (ties get average ranks; Adebayo et al.'s main metric)
and SSIM of the min-max normalised maps (Gaussian window 11 px, sigma 1.5, as Wang et al. 2004). A map
that depends on what the model learned decorrelates as more layers are randomised.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from analysis.amr import minmax_normalize
from analysis.gradcam import eval_mode, upsample_maps
from analysis.saliency import SCORES, _fill_tensor, resolve_targets, target_scores

BASELINES = ("blur", "zero")


def _check_maps(maps: torch.Tensor, images: torch.Tensor, num_targets: int | None, fn: str) -> torch.Tensor:
    if maps.dim() != 4 or maps.shape[0] != images.shape[0] or (num_targets is not None and maps.shape[1] != num_targets):
        t = "T" if num_targets is None else num_targets
        raise ValueError(f"{fn}: maps must be (B, {t}, h, w) with B={images.shape[0]}, got {tuple(maps.shape)}")
    if tuple(maps.shape[-2:]) != tuple(images.shape[-2:]):
        maps = upsample_maps(maps, tuple(images.shape[-2:]))
    return maps


@dataclass
class HidingCurves:
    """Deletion or insertion: fractions (S+1,), scores (B, T, S+1) and their area under the curve (B, T)."""

    mode: str
    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor


def hiding_game(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, mode: str = "deletion",
                targets: Sequence[int] | torch.Tensor | None = None, target: str = "predicted",
                labels: torch.Tensor | None = None, steps: int = 16, baseline: str | float = "blur",
                score: str = "probability", images_per_pass: int = 64) -> HidingCurves:
    """Deletion or insertion curves for maps (B, T, h, w) explaining `targets` of `model` on `images`.

    At step k of `steps`, the round(k / steps * H * W) most salient pixels (all channels) are replaced by the
    baseline ('blur', 'zero', a number or a tensor) in deletion, or are the only image pixels kept in
    insertion. Ties in a map keep row-major order. Perturbed images go `images_per_pass` per forward.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"hiding_game: mode must be 'deletion' or 'insertion', got {mode!r}")
    if score not in SCORES:
        raise ValueError(f"hiding_game: score must be one of {', '.join(SCORES)}, got {score!r}")
    if steps < 1 or images_per_pass < 1:
        raise ValueError(f"hiding_game: steps and images_per_pass must be >= 1, got {steps}, {images_per_pass}")
    with eval_mode(model), torch.no_grad():
        _, indices, signs = resolve_targets(model, images, targets, target, labels, "hiding_game")
        b, c, h, w = images.shape
        t = len(indices)
        maps = _check_maps(maps, images, t, "hiding_game").to(images.device)
        base = _fill_tensor(images, 0.0 if baseline == "zero" else baseline, "hiding_game", "baseline")
        order = torch.argsort(-maps.reshape(b, t, h * w).float(), dim=-1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(h * w, device=order.device).expand_as(order))
        rank = rank.view(b, t, h, w)
        counts = torch.round(torch.linspace(0, h * w, steps + 1, device=images.device)).long()
        scores = torch.empty(b, t, steps + 1, dtype=images.dtype, device=images.device)
        triples = torch.cartesian_prod(torch.arange(b, device=images.device), torch.arange(t, device=images.device),
                                       torch.arange(steps + 1, device=images.device))
        for start in range(0, len(triples), images_per_pass):
            bi, ti, ki = triples[start:start + images_per_pass].unbind(1)
            changed = (rank[bi, ti] < counts[ki, None, None])[:, None]  # (n, 1, H, W)
            if mode == "deletion":
                x = torch.where(changed, base[bi], images[bi])
            else:
                x = torch.where(changed, images[bi], base[bi])
            logits = model(x)
            s = target_scores(logits, indices, signs[bi], score)  # (n, T)
            scores[bi, ti, ki] = s.gather(1, ti[:, None])[:, 0]
    fractions = counts.to(scores.dtype) / (h * w)
    auc = torch.trapezoid(scores, fractions, dim=-1)
    return HidingCurves(mode, fractions, scores, auc)


def deletion_auc(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, **kw) -> torch.Tensor:
    """Area under the deletion curve (B, T): lower means the map found the pixels the score needs."""
    return hiding_game(model, images, maps, "deletion", **kw).auc


def insertion_auc(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, **kw) -> torch.Tensor:
    """Area under the insertion curve (B, T): higher means the map's top pixels suffice."""
    return hiding_game(model, images, maps, "insertion", **kw).auc


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hits (B, T) bool and valid (B, T) bool of the pointing game (Zhang et al. 2018).

    The map (upsampled to the S x S masks, given (T, S, S) or (B, T, S, S)) points at its maximum (the first
    in row-major order on ties); a hit is a maximum inside the mask grown by `tolerance` pixels (Euclidean
    disk). Constant maps point nowhere: not valid, and not hits.
    """
    if maps.dim() != 4:
        raise ValueError(f"pointing_game: maps must be (B, T, h, w), got {tuple(maps.shape)}")
    if masks.dtype != torch.bool or masks.dim() not in (3, 4) or masks.shape[-3] != maps.shape[1]:
        raise ValueError(f"pointing_game: masks must be bool (T, S, S) or (B, T, S, S) with T={maps.shape[1]}, "
                         f"got {masks.dtype} {tuple(masks.shape)}")
    if tolerance < 0:
        raise ValueError(f"pointing_game: tolerance must be >= 0 pixels, got {tolerance}")
    b, t = maps.shape[:2]
    masks = masks.to(maps.device)
    if masks.dim() == 3:
        masks = masks[None].expand(b, -1, -1, -1)
    size = masks.shape[-2:]
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = upsample_maps(maps, tuple(size))
    if tolerance > 0:
        r = torch.arange(-tolerance, tolerance + 1, device=maps.device, dtype=torch.float32)
        disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= tolerance ** 2).float()[None, None]
        grown = F.conv2d(masks.reshape(-1, 1, *size).float(), disk, padding=tolerance) > 0
        masks = grown.view(b, t, *size)
    flat = maps.reshape(b, t, -1)
    valid = flat.amax(-1) > flat.amin(-1)
    peak = flat.argmax(-1)
    hits = masks.reshape(b, t, -1).gather(-1, peak[..., None])[..., 0] & valid
    return hits, valid


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based) along the last axis, ties sharing their average rank, as scipy.stats.rankdata."""
    x = x.contiguous()
    ordered = x.sort(-1).values
    lo = torch.searchsorted(ordered, x, right=False)
    hi = torch.searchsorted(ordered, x, right=True)
    return (lo + hi - 1).to(torch.float64) / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rho between maps (..., h, w), per leading index; 0 where either map is constant."""
    ra = average_ranks(a.flatten(-2).double())
    rb = average_ranks(b.flatten(-2).double())
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    denom = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    return torch.where(denom > 0, (ra * rb).sum(-1) / denom.clamp_min(1e-300), torch.zeros_like(denom))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of maps (..., h, w) with values in [0, 1] (Wang et al. 2004: Gaussian window, C1 = 0.01^2,
    C2 = 0.03^2, valid region only); the window shrinks to fit small maps."""
    lead = a.shape[:-2]
    h, w = a.shape[-2:]
    window = max(1, min(window, h, w))
    x = a.reshape(-1, 1, h, w).double()
    y = b.reshape(-1, 1, h, w).double()
    r = torch.arange(window, device=a.device, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    k = (g[:, None] * g[None, :])[None, None]

    def filt(z):
        return F.conv2d(z, k)

    mx, my = filt(x), filt(y)
    vx = filt(x * x) - mx * mx
    vy = filt(y * y) - my * my
    cxy = filt(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3)).reshape(lead)


def randomization_root(model: nn.Module) -> nn.Module:
    """The network whose children are the randomisation steps: a facelens module's `net.backbone`, else the
    model itself."""
    net = getattr(model, "net", model)
    return getattr(net, "backbone", net)


def _resettable(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if hasattr(m, "reset_parameters")
            and any(True for _ in m.parameters(recurse=False))]


def default_steps(model: nn.Module) -> list[str]:
    """Children of `randomization_root(model)` holding parameters, from the output down (e.g. fc, layer4, ...,
    conv1 for a ResNet)."""
    root = randomization_root(model)
    return [name for name, child in reversed(list(root.named_children())) if _resettable(child)]


@dataclass
class RandomizationResult:
    """Cumulative randomisation: after step i, steps[:i + 1] are re-initialised. spearman and ssim are
    (S, B, T) per step, image and target."""

    steps: list[str]
    spearman: torch.Tensor
    ssim: torch.Tensor

    def mean(self) -> dict[str, list[list[float]]]:
        """Per step, per target: mean over images."""
        return {"spearman": self.spearman.mean(1).tolist(), "ssim": self.ssim.mean(1).tolist()}


def cascading_randomization(model: nn.Module, images: torch.Tensor,
                            explain: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                            steps: Sequence[str] | None = None, seed: int = 0,
                            reference: torch.Tensor | None = None) -> RandomizationResult:
    """Adebayo et al.'s cascading model-parameter randomisation test.

    explain(model, images) -> maps (B, T, h, w) (e.g. `lambda m, x: saliency(m, x, "smoothgrad", targets=...)`;
    fix its targets and signs, e.g. target='positive', so the maps explain the same function throughout).
    steps: names of sub-modules of `randomization_root(model)` re-initialised cumulatively in the given order
    (default: `default_steps`, top down). The model is deep-copied; the original is untouched; random draws
    come from a private stream seeded with `seed`. `reference` reuses maps of the trained model.
    """
    steps = list(default_steps(model) if steps is None else steps)
    if not steps:
        raise ValueError("cascading_randomization: no step to randomise (the model has no parametrised children)")
    original = explain(model, images) if reference is None else reference
    working = copy.deepcopy(model)
    root = randomization_root(working)
    modules = dict(root.named_modules())
    unknown = [s for s in steps if s not in modules or s == ""]
    if unknown:
        raise ValueError(f"cascading_randomization: unknown step(s) {unknown}; children of the network are "
                         f"{[n for n, _ in root.named_children()]}")
    devices = sorted({p.device for p in working.parameters() if p.device.type == "cuda"}, key=str)
    rho, sim = [], []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name in steps:
            for m in _resettable(modules[name]):
                m.reset_parameters()
            maps = explain(working, images)
            if maps.shape != original.shape:
                raise ValueError(f"cascading_randomization: explain returned {tuple(maps.shape)} after step "
                                 f"{name!r}, {tuple(original.shape)} before")
            rho.append(spearman(original, maps))
            sim.append(ssim(minmax_normalize(original.double()), minmax_normalize(maps.double())))
    return RandomizationResult(steps, torch.stack(rho).cpu(), torch.stack(sim).cpu())
