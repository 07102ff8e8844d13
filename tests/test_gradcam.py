"""Batched Grad-CAM against pytorch-grad-cam, one target at a time, on a random-init ResNet-18."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import analysis.gradcam as gradcam_module
from analysis.gradcam import grad_cam, upsample_maps

NUM_CLASSES = 6
REFERENCE = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "hirescam": HiResCAM}
# A conv in the middle of the network and the last stage, in forward order (pytorch-grad-cam pairs the
# gradients it records with its target layers assuming that order).
LAYERS = ("layer3.1.conv2", "layer4")


def _random_resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES)
    # timm zero-initialises each block's last BatchNorm; random statistics make every path carry signal.
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.1
            m.running_mean = torch.randn(m.num_features, generator=gen) * 0.1
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5
    model.fc.weight.data *= 5
    return model


@pytest.fixture(scope="module")
def model():
    return _random_resnet()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 80, 80, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def labels():
    return (torch.rand(2, NUM_CLASSES, generator=torch.Generator().manual_seed(3)) > 0.5).float()


class _Target:
    """A pytorch-grad-cam target callable on one image's logits."""

    def __init__(self, k: int, kind: str, label: float = 1.0):
        self.k, self.kind, self.label = k, kind, label

    def __call__(self, output):
        logit = output[self.k]
        return {"positive": logit, "negative": -logit, "predicted": logit.abs(),
                "ground_truth": logit * self.label}[self.kind]


@pytest.fixture(scope="module")
def reference(model, images, labels):
    """pytorch-grad-cam's raw CAMs (ReLU of get_cam_image, before its resize), one target per image.

    pytorch-grad-cam takes one target per image, so the batch is repeated once per logit (image i of
    repeat k gets target k) and one backward per target function records activations and gradients of
    both layers; the three methods differ only in how they turn those into a map.
    """
    recorded: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    modules = [dict(model.named_modules())[layer] for layer in LAYERS]
    b = len(images)

    def record(kind: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        cam = GradCAM(model, modules)
        try:
            if kind == "positive":
                targets = [ClassifierOutputTarget(k) for k in range(NUM_CLASSES) for _ in range(b)]
            else:
                targets = [_Target(k, kind, float(2 * labels[i, k] - 1))
                           for k in range(NUM_CLASSES) for i in range(b)]
            outputs = cam.activations_and_grads(images.repeat(NUM_CLASSES, 1, 1, 1))
            model.zero_grad()
            sum(t(o) for t, o in zip(targets, outputs)).backward()
            return ([a.numpy() for a in cam.activations_and_grads.activations],
                    [g.numpy() for g in cam.activations_and_grads.gradients])
        finally:
            cam.activations_and_grads.release()

    def maps(layer: str, kind: str, method: str) -> np.ndarray:
        if kind not in recorded:
            recorded[kind] = record(kind)
        i = LAYERS.index(layer)
        acts, grads = recorded[kind][0][i], recorded[kind][1][i]
        cam = REFERENCE[method](model, [modules[i]])
        cam.activations_and_grads.release()
        out = np.maximum(cam.get_cam_image(images, modules[i], None, acts, grads, False), 0)
        return out.reshape(NUM_CLASSES, b, *out.shape[1:]).transpose(1, 0, 2, 3)

    return maps


def _normalised(maps: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's own min-max scaling, applied map by map."""
    flat = maps.reshape(-1, *maps.shape[-2:]).astype(np.float32)
    return scale_cam_image(flat).reshape(maps.shape)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "hirescam"])
@pytest.mark.parametrize("kind", ["positive", "negative", "predicted", "ground_truth"])
def test_maps_equal_pytorch_grad_cam(model, images, labels, reference, layer, method, kind):
    ours = grad_cam(model, images, layer, target=kind, method=method, labels=labels)
    ref = reference(layer, kind, method)
    assert ours.shape == ref.shape
    assert (ours >= 0).all()
    assert ref.max() > 0  # a non-trivial comparison
    assert np.abs(_normalised(ours.numpy()) - _normalised(ref)).max() < 1e-4


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "hirescam"])
@pytest.mark.parametrize("kind", ["positive", "negative", "predicted", "ground_truth"])
def test_closed_form_equals_batched_autograd(model, images, labels, method, kind):
    closed = grad_cam(model, images, "layer4", target=kind, method=method, labels=labels, closed_form=True)
    batched = grad_cam(model, images, "layer4", target=kind, method=method, labels=labels, closed_form=False)
    assert closed.abs().max() > 0
    torch.testing.assert_close(closed, batched, rtol=1e-5, atol=1e-6 * float(batched.max()))


def test_closed_form_is_detected_only_where_it_holds(model, images, monkeypatch):
    calls = []
    original = gradcam_module._closed_form_cams
    monkeypatch.setattr(gradcam_module, "_closed_form_cams",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    grad_cam(model, images, "layer4")
    assert calls == [1]
    grad_cam(model, images, "layer4.1.conv2")  # BatchNorm, residual and ReLU follow: no closed form
    assert calls == [1]
    with pytest.raises(ValueError, match="closed_form=True"):
        grad_cam(model, images, "layer4.1.conv2", closed_form=True)


def test_chunking_and_target_subsets_do_not_change_maps(model, images):
    full = grad_cam(model, images, "layer3", method="gradcampp", closed_form=False)
    chunked = grad_cam(model, images, "layer3", method="gradcampp", max_targets_per_pass=4)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-7)
    subset = grad_cam(model, images, "layer3", targets=[4, 1], method="gradcampp", max_targets_per_pass=1)
    torch.testing.assert_close(subset, full[:, [4, 1]], rtol=1e-5, atol=1e-7)


def test_label_conventions_and_target_signs(model, images, labels):
    a = grad_cam(model, images, "layer4", target="ground_truth", labels=labels)
    b = grad_cam(model, images, "layer4", target="ground_truth", labels=labels * 2 - 1)
    torch.testing.assert_close(a, b)
    pos = grad_cam(model, images, "layer4", target="positive")
    neg = grad_cam(model, images, "layer4", target="negative")
    pred = grad_cam(model, images, "layer4", target="predicted")
    with torch.no_grad():
        model.eval()
        positive_logit = (model(images) > 0)[:, :, None, None]
    torch.testing.assert_close(pred, torch.where(positive_logit, pos, neg))


def test_model_state_and_gradients_are_left_as_found(images):
    model = _random_resnet()
    model.train()
    model.layer2.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    stats = model.bn1.running_mean.clone()
    maps, logits = grad_cam(model, images, "layer3", return_logits=True)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert torch.equal(model.bn1.running_mean, stats)
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images))
    assert maps.shape == (2, NUM_CLASSES, 5, 5)


def test_runs_inside_inference_mode(model, images):
    expected = grad_cam(model, images, "layer3")
    with torch.inference_mode():
        got = grad_cam(model, images, "layer3")
    torch.testing.assert_close(got, expected)


def test_bad_options_fail_clearly(model, images):
    with pytest.raises(ValueError, match="Valid layers"):
        grad_cam(model, images, "layer9")
    with pytest.raises(ValueError, match="unknown method"):
        grad_cam(model, images, "layer4", method="scorecam")
    with pytest.raises(ValueError, match="unknown target"):
        grad_cam(model, images, "layer4", target="max")
    with pytest.raises(ValueError, match="logit indices"):
        grad_cam(model, images, "layer4", targets=[NUM_CLASSES])
    with pytest.raises(ValueError, match="needs labels"):
        grad_cam(model, images, "layer4", target="ground_truth")
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        grad_cam(model, images, "layer4", target="ground_truth", labels=torch.full((2, NUM_CLASSES), 2.0))


def test_upsample_matches_cv2_resize():
    cv2 = pytest.importorskip("cv2")
    maps = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(4))
    up = upsample_maps(maps, 224)
    assert up.shape == (2, 3, 224, 224) and (up >= 0).all()
    ref = cv2.resize(maps[1, 2].numpy(), (224, 224), interpolation=cv2.INTER_LINEAR)
    assert np.abs(up[1, 2].numpy() - ref).max() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu(images):
    model = _random_resnet()
    cpu = grad_cam(model, images, "layer3", method="gradcampp")
    gpu = grad_cam(model.cuda(), images.cuda(), "layer3", method="gradcampp")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-5 * float(cpu.max()))


def test_facelens_model_by_timm_layer_name(images):
    from lightning_modules.backbones import create_backbone

    torch.manual_seed(0)
    net = create_backbone("resnet18", 4)
    state = torch.random.get_rng_state()
    auto = grad_cam(net, images, "layer4", method="gradcampp")
    assert torch.equal(torch.random.get_rng_state(), state)  # the closed-form check uses its own generator
    batched = grad_cam(net, images, "backbone.layer4", method="gradcampp", closed_form=False)
    assert auto.shape == (2, 4, 3, 3) and auto.max() > 0
    torch.testing.assert_close(auto, batched, rtol=1e-5, atol=1e-6 * float(batched.max()))
