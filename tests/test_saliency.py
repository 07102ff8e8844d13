import itertools

import pytest
import torch
from torch import nn

from analysis.gradcam import grad_cam, upsample_maps
from analysis.saliency import (
    attributions, integrated_gradients, occlusion, occlusion_patches, saliency, smoothgrad,
)


def linear_model(weight: torch.Tensor) -> nn.Module:
    """logits = W . flatten(x) (no bias): the drop of any occlusion is a sum of w * x over the patch."""
    k = weight.shape[0]
    lin = nn.Linear(weight[0].numel(), k, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(weight.reshape(k, -1))
    return nn.Sequential(nn.Flatten(), lin)


def small_convnet(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 4, 3, stride=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()


def test_occlusion_equals_hand_computed_drop():
    # 1 channel, 4x4 image, 2x2 window, stride 1: 9 patches, coverage 1..4 per pixel.
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
    x = torch.rand(1, 1, 4, 4, generator=gen, dtype=torch.float64)
    model = linear_model(w)
    maps = occlusion(model, x, target="positive", window=2, stride=1, fill=0.25, signed=True)
    expected = torch.zeros(2, 4, 4, dtype=torch.float64)
    coverage = torch.zeros(4, 4, dtype=torch.float64)
    for t in range(2):
        for y0, x0 in itertools.product(range(3), range(3)):
            occluded = x[0, 0].clone()
            occluded[y0:y0 + 2, x0:x0 + 2] = 0.25
            drop = float((w[t, 0] * x[0, 0]).sum() - (w[t, 0] * occluded).sum())
            expected[t, y0:y0 + 2, x0:x0 + 2] += drop
            if t == 0:
                coverage[y0:y0 + 2, x0:x0 + 2] += 1
    expected /= coverage
    torch.testing.assert_close(maps[0], expected, rtol=1e-10, atol=1e-12)
    # Non-signed maps are the positive part; target 'negative' flips the drops.
    torch.testing.assert_close(occlusion(model, x, target="positive", window=2, stride=1, fill=0.25)[0],
                               expected.clamp_min(0))
    neg = occlusion(model, x, target="negative", window=2, stride=1, fill=0.25, signed=True)
    torch.testing.assert_close(neg[0], -expected)


def test_occlusion_disjoint_windows_and_chunking():
    # Stride = window: every pixel covered once, map = sum of w * x over its own patch (fill 0).
    gen = torch.Generator().manual_seed(2)
    w = torch.rand(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    x = torch.rand(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    model = linear_model(w)
    maps = occlusion(model, x, target="positive", window=2, stride=2, images_per_pass=3)
    prod = (w[None] * x[:, None]).sum(2)  # (B, T, 4, 4)
    patch_sums = prod.reshape(2, 3, 2, 2, 2, 2).sum((3, 5))  # (B, T, 2, 2)
    expected = patch_sums.repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(occlusion(model, x, target="positive", window=2, stride=2, images_per_pass=100),
                               maps)
    # A stride that does not reach the edge still covers it (flush last window).
    assert occlusion_patches(5, 5, 2, 2).any(0).all()
    with pytest.raises(ValueError, match="window"):
        occlusion(model, x, window=5)


def test_smoothgrad_zero_noise_equals_plain_gradient():
    model = small_convnet()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    maps = smoothgrad(model, x, target="predicted", samples=3, noise=0.0)
    logits = model(x)
    for b in range(2):
        for t in range(3):
            xi = x[b:b + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(model(xi)[0, t] * torch.sign(logits[b, t].detach()), xi)
            torch.testing.assert_close(maps[b, t], g[0].abs().sum(0), rtol=1e-9, atol=1e-12)
    # Noise changes the map; a fixed generator makes it reproducible.
    g1 = smoothgrad(model, x, noise=0.3, generator=torch.Generator().manual_seed(0))
    g2 = smoothgrad(model, x, noise=0.3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(g1, g2)
    assert not torch.allclose(g1, maps)


def test_integrated_gradients_completeness():
    model = small_convnet(3)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    baseline = torch.full_like(x, 0.5)
    attr = attributions(model, x, "integrated_gradients", target="positive", steps=64, baseline=baseline,
                        images_per_pass=7)
    gap = model(x) - model(baseline)
    torch.testing.assert_close(attr.sum((2, 3, 4)), gap.detach(), rtol=2e-3, atol=2e-4)
    # Exact on a linear model: (x - x0) * w.
    w = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    lin = linear_model(w)
    y = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    attr = attributions(lin, y, "integrated_gradients", target="positive", steps=3)
    torch.testing.assert_close(attr[0], w * y[0])
    torch.testing.assert_close(integrated_gradients(lin, y, target="positive", steps=3)[0],
                               (w * y[0]).sum(1).clamp_min(0))


def test_dispatcher_and_errors():
    model = small_convnet()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    cams = saliency(model, x, "gradcam", layer=model[2], targets=[0, 2])
    reference = upsample_maps(grad_cam(model, x, model[2], targets=[0, 2]), 8)
    torch.testing.assert_close(cams, reference)
    assert saliency(model, x, "occlusion", window=4, stride=4).shape == (2, 3, 8, 8)
    assert (saliency(model, x, "integrated_gradients", steps=4, targets=[1]) >= 0).all()
    with pytest.raises(ValueError, match="unknown method 'lime'"):
        saliency(model, x, "lime")
    with pytest.raises(ValueError, match="bad option for occlusion"):
        saliency(model, x, "occlusion", steps=3)
    with pytest.raises(ValueError, match="targets must be logit indices"):
        smoothgrad(model, x, targets=[5])
    with pytest.raises(ValueError, match="needs labels"):
        occlusion(model, x, target="ground_truth")
