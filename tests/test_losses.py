import math

import pytest
import torch

from lightning_modules.losses import attribute_loss, moon_weights


def bce(logit: float, y: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_moon_weights_reach_target_distribution():
    source = torch.tensor([0.1, 0.5, 0.8])
    target = torch.tensor([0.5, 0.5, 0.5])
    p_pos, p_neg = moon_weights(source, target)
    # minority class always kept, majority thinned
    assert torch.allclose(p_pos, torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(p_neg, torch.tensor([1 / 9, 1.0, 1.0]))
    effective = source * p_pos / (source * p_pos + (1 - source) * p_neg)
    assert torch.allclose(effective, target)


def test_balanced_loss_equals_hand_computed_value():
    logits = torch.tensor([[2.0, -1.0], [-0.5, 0.3], [1.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    source = torch.tensor([0.8, 0.25])  # attribute 0: positives dominate; attribute 1: negatives dominate
    target = torch.tensor([0.5, 0.5])
    # p(+1) for attr 0 = 0.5*0.2/(0.8*0.5) = 0.25, p(-1) = 1; attr 1: p(+1) = 1, p(-1) = 0.25*0.5/(0.5*0.75) = 1/3
    w = [[0.25, 1 / 3], [1.0, 1.0], [0.25, 0.0]]
    expected = sum(w[i][j] * bce(logits[i, j].item(), targets[i, j].item())
                   for i in range(3) for j in range(2) if mask[i, j]) / 5
    got = attribute_loss(logits, targets, mask, "balanced", source, target)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_unbalanced_loss_is_masked_bce_mean():
    logits = torch.tensor([[0.5, -2.0, 1.5]])
    targets = torch.tensor([[1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, False, True]])
    expected = (bce(0.5, 1) + bce(1.5, 0)) / 2
    assert attribute_loss(logits, targets, mask).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_loss_sampling_matches_expectation():
    torch.manual_seed(0)
    logits = torch.zeros(20000, 1)
    targets = (torch.rand(20000, 1) < 0.9).float()
    mask = torch.ones_like(targets, dtype=torch.bool)
    args = (logits, targets, mask, "balanced", torch.tensor([0.9]), torch.tensor([0.5]))
    sampled = attribute_loss(*args, sampling=True)
    weighted = attribute_loss(*args)
    assert sampled.item() == pytest.approx(weighted.item(), rel=0.05)


def test_unknown_loss_kind_is_named():
    with pytest.raises(ValueError, match="focal"):
        attribute_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "focal")
