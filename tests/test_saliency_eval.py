import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from analysis.saliency import saliency
from analysis.saliency_eval import (
    average_ranks, cascading_randomization, default_steps, deletion_auc, hiding_game, insertion_auc,
    pointing_game, spearman, ssim,
)

SIZE = 16
REGION = (slice(4, 9), slice(6, 12))  # the pixels the planted model reads


class RegionMean(nn.Module):
    """Planted model: logit 0 = mean of a fixed pixel region (all channels), logit 1 = minus that."""

    def forward(self, x):
        m = x[:, :, REGION[0], REGION[1]].mean((1, 2, 3))
        return torch.stack([m, -m], 1)


def test_deletion_auc_of_true_map_below_random_map():
    gen = torch.Generator().manual_seed(0)
    x = 0.5 + 0.5 * torch.rand(4, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
    model = RegionMean()
    true_map = torch.zeros(4, 1, SIZE, SIZE, dtype=torch.float64)
    true_map[:, :, REGION[0], REGION[1]] = 1
    true_map += 0.01 * torch.rand(true_map.shape, generator=gen, dtype=torch.float64)
    random_map = torch.rand(4, 1, SIZE, SIZE, generator=gen, dtype=torch.float64)
    kw = {"targets": [0], "target": "positive", "baseline": "zero", "score": "logit", "steps": 16}
    d_true, d_rand = deletion_auc(model, x, true_map, **kw), deletion_auc(model, x, random_map, **kw)
    i_true, i_rand = insertion_auc(model, x, true_map, **kw), insertion_auc(model, x, random_map, **kw)
    assert (d_true < d_rand - 0.2).all(), (d_true, d_rand)
    assert (i_true > i_rand + 0.2).all(), (i_true, i_rand)
    # Deleting the 30 region pixels (of 256) zeroes the score by fraction 30/256, so the AUC is small.
    assert (d_true < 0.1).all()


def test_hiding_game_curve_by_hand():
    # 2x2 image, model logit = weighted sum; deleting in map order to zero baseline, steps of one pixel.
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)

    class Weighted(nn.Module):
        def forward(self, x):
            return (x[:, 0] * w).sum((1, 2))[:, None]

    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    maps = torch.tensor([[[[0.1, 0.9], [0.5, 0.2]]]], dtype=torch.float64)  # order: (0,1), (1,0), (1,1), (0,0)
    curves = hiding_game(Weighted(), x, maps, "deletion", target="positive", baseline="zero", score="logit",
                         steps=4, images_per_pass=2)
    expected = torch.tensor([10.0, 8.0, 5.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(curves.scores[0, 0], expected)
    torch.testing.assert_close(curves.fractions, torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    assert curves.auc[0, 0].item() == pytest.approx(0.25 * (10 / 2 + 8 + 5 + 1 + 0 / 2))
    ins = hiding_game(Weighted(), x, maps, "insertion", target="positive", baseline="zero", score="logit", steps=4)
    torch.testing.assert_close(ins.scores[0, 0], torch.tensor([0.0, 2.0, 5.0, 9.0, 10.0], dtype=torch.float64))
    prob = hiding_game(Weighted(), x, maps, "deletion", target="positive", baseline="zero", steps=4)
    torch.testing.assert_close(prob.scores[0, 0], torch.sigmoid(expected))


def test_pointing_game_hand_made():
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 4:6, 4:6] = True
    maps = torch.zeros(3, 2, 6, 6)
    maps[0, 0, 2, 2] = 1  # inside mask 0: hit
    maps[0, 1, 0, 0] = 1  # far from mask 1: miss
    maps[1, 0, 3, 3] = 1  # diagonal neighbour of (2, 2): hit only with tolerance >= sqrt(2)
    maps[1, 1, 4, 3] = 1  # left neighbour of (4, 4): hit with tolerance 1
    # image 2: constant maps point nowhere
    hits, valid = pointing_game(maps, masks)
    assert hits.tolist() == [[True, False], [False, False], [False, False]]
    assert valid.tolist() == [[True, True], [True, True], [False, False]]
    hits1, _ = pointing_game(maps, masks, tolerance=1)
    assert hits1.tolist() == [[True, False], [False, True], [False, False]]
    hits2, _ = pointing_game(maps, masks, tolerance=2)
    assert hits2.tolist() == [[True, False], [True, True], [False, False]]
    # Per-image masks (B, T, S, S) and maps at a lower resolution (upsampled to the masks).
    small = torch.zeros(1, 1, 3, 3)
    small[0, 0, 0, 0] = 1
    per_image = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    per_image[0, 0, 0, 0] = True
    assert pointing_game(small, per_image)[0].item()
    with pytest.raises(ValueError, match="masks must be bool"):
        pointing_game(maps, masks.float())


def test_spearman_matches_scipy_with_ties_and_ssim_identity():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (3, 5, 5), generator=gen).double()  # many ties
    b = a + torch.rand(3, 5, 5, generator=gen, dtype=torch.float64) * 2
    rho = spearman(a, b)
    for i in range(3):
        assert rho[i].item() == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten()).statistic, abs=1e-12)
    from scipy.stats import rankdata
    torch.testing.assert_close(average_ranks(a.flatten(-2))[0], torch.from_numpy(rankdata(a[0].flatten()) - 1))
    assert spearman(torch.zeros(4, 4), torch.rand(4, 4)).item() == 0
    m = torch.rand(2, 16, 16, generator=gen)
    torch.testing.assert_close(ssim(m, m), torch.ones(2, dtype=torch.float64))
    assert (ssim(m, torch.rand(2, 16, 16, generator=gen)) < 0.3).all()


def planted_network() -> nn.Module:
    """Two linear layers whose first reads only REGION: the trained gradient map is the region."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 8), nn.Linear(8, 2)).double()
    with torch.no_grad():
        w = torch.zeros(8, 3, SIZE, SIZE, dtype=torch.float64)
        w[:, :, REGION[0], REGION[1]] = 1 + torch.rand(8, 3, 5, 6, dtype=torch.float64)
        net[1].weight.copy_(w.reshape(8, -1))
        net[2].weight.fill_(1.0)
    return net


def test_randomization_check_near_one_untouched_near_zero_fully_random():
    net = planted_network()
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.rand(4, 3, SIZE, SIZE, dtype=torch.float64)

    def explain(m, images):
        return saliency(m, images, "smoothgrad", target="positive", samples=1, noise=0.0)

    assert default_steps(net) == ["2", "1"]
    res = cascading_randomization(net, x, explain)
    assert res.steps == ["2", "1"] and res.spearman.shape == (2, 4, 2)
    # Top layer random, region weights kept: the map is still the region (high rank correlation).
    assert res.spearman[0].mean() > 0.6
    # Everything re-initialised: the map no longer knows the region.
    assert res.spearman[1].abs().mean() < 0.15, res.spearman[1]
    assert res.ssim[1].mean() < 0.3
    # The trained model is untouched, and a step that changes nothing the model uses gives identical maps.
    for p, q in zip(before, net.parameters()):
        assert torch.equal(p, q)
    class Front(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = net, nn.Linear(2, 2).double()

        def forward(self, images):
            return self.body(images)

    front = Front()
    same = cascading_randomization(front, x, explain, steps=["unused"])
    torch.testing.assert_close(same.spearman, torch.ones(1, 4, 2, dtype=torch.float64))
    torch.testing.assert_close(same.ssim, torch.ones(1, 4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown step"):
        cascading_randomization(front, x, explain, steps=["nope"])


def test_randomization_is_reproducible_and_leaves_rng_alone():
    net = planted_network()
    x = torch.rand(2, 3, SIZE, SIZE, dtype=torch.float64)

    def explain(m, images):
        return saliency(m, images, "integrated_gradients", target="positive", steps=2)

    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    a = cascading_randomization(net, x, explain, seed=3)
    assert torch.equal(torch.rand(1), expected_next)
    b = cascading_randomization(net, x, explain, seed=3)
    torch.testing.assert_close(a.spearman, b.spearman)
    assert np.isfinite(a.ssim.numpy()).all()
