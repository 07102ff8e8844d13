"""Attribute losses: plain BCE (unbalanced) and MOON-style balancing toward a target distribution (balanced)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def moon_weights(source_rate: torch.Tensor, target_rate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-attribute probabilities p(+1), p(-1) of keeping a sample's error (Rudd et al. 2016, MOON).

    With source positive rate S and target rate T, the over-represented class is kept with probability

        p(+1) = T (1 - S) / (S (1 - T))   if S > T, else 1
        p(-1) = S (1 - T) / (T (1 - S))   if S < T, else 1

    so that among the kept errors the positive fraction is exactly T: S p(+1) / (S p(+1) + (1 - S) p(-1)) = T.
    """
    s = source_rate.clamp(1e-6, 1 - 1e-6)
    t = target_rate.clamp(1e-6, 1 - 1e-6)
    ratio = (t * (1 - s)) / (s * (1 - t))
    return ratio.clamp(max=1.0), (1.0 / ratio).clamp(max=1.0)


def attribute_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, kind: str = "unbalanced",
                   source_rate: torch.Tensor | None = None, target_rate: torch.Tensor | None = None,
                   sampling: bool = False) -> torch.Tensor:
    """Mean binary cross-entropy over the known labels (mask True).

    `unbalanced`: BCE with logits. `balanced`: each term weighted by the MOON probability of its class
    (`moon_weights`); with `sampling=True` the term is kept by a Bernoulli draw with that probability, as in MOON,
    otherwise weighted by it (same expectation, less noise). The mean divides by the number of known labels.
    """
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weight = mask.to(bce.dtype)
    if kind == "balanced":
        if source_rate is None or target_rate is None:
            raise ValueError("balanced loss needs source and target positive rates")
        p_pos, p_neg = moon_weights(source_rate.to(bce), target_rate.to(bce))
        keep = torch.where(targets > 0.5, p_pos, p_neg)
        if sampling:
            keep = torch.bernoulli(keep.expand_as(bce))
        weight = weight * keep
    elif kind != "unbalanced":
        raise ValueError(f"loss: unknown kind {kind!r}; use 'balanced' or 'unbalanced'")
    return (bce * weight).sum() / mask.sum().clamp_min(1)
