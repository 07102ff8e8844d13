"""AFFACT crop, batched AFFACT augmentation and the frontal filter, against hand-computed references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fixtures_celeba import WILD_SIZE, draw_face
from scipy.ndimage import gaussian_filter

from datamodules.transforms import (
    AffactAugment,
    AffactAugmentConfig,
    AffactCentreCrop,
    affact_crop,
    affact_crop_matrix,
    frontal_ratio,
    gaussian_blur,
    is_frontal,
)
from facelens.geometry import (
    LEFT_EYE,
    LEFT_MOUTH,
    NOSE,
    RIGHT_EYE,
    RIGHT_MOUTH,
    canonical_landmarks,
    transform_points,
)

# A frontal face: eyes 40 px apart, mouth centre 50 px below the eye centre.
FACE = np.array([[0, 0], [40, 0], [20, 25], [5, 50], [35, 50]], dtype=np.float64)


def similarity(points: np.ndarray, scale: float, degrees: float, shift) -> np.ndarray:
    a = math.radians(degrees)
    rot = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return points @ rot.T + np.asarray(shift, dtype=np.float64)


def test_crop_puts_eye_centre_at_the_same_pixel_for_any_scale_and_rotation():
    rng = np.random.default_rng(0)
    size = 224
    faces = np.stack([similarity(FACE, rng.uniform(0.3, 4), rng.uniform(-180, 180), rng.uniform(-500, 500, 2))
                      for _ in range(50)])
    lm = torch.from_numpy(faces)
    p = transform_points(affact_crop_matrix(lm, size), lm).numpy()
    eye = (p[:, LEFT_EYE] + p[:, RIGHT_EYE]) / 2
    mouth = (p[:, LEFT_MOUTH] + p[:, RIGHT_MOUTH]) / 2
    # Seed 004 eq. 4.1: box of side l = 5.5 d from x_e - 0.5 l, y_e - 0.45 l; pixel 0's left edge is -0.5.
    np.testing.assert_allclose(eye, np.tile([0.5 * size - 0.5, 0.45 * size - 0.5], (50, 1)), atol=1e-9)
    np.testing.assert_allclose(p[:, RIGHT_EYE, 1] - p[:, LEFT_EYE, 1], 0, atol=1e-9)  # eyes horizontal
    assert (p[:, RIGHT_EYE, 0] > p[:, LEFT_EYE, 0]).all()
    np.testing.assert_allclose(np.linalg.norm(mouth - eye, axis=1), size / 5.5, rtol=1e-12)
    # The whole face comes out identical (a similarity is undone exactly).
    np.testing.assert_allclose(p, np.broadcast_to(p[0], p.shape), atol=1e-9)


def test_crop_canvas_centres_the_box_and_canonical_faces_stay_put():
    lm = canonical_landmarks(112)[None].double()
    m = affact_crop_matrix(lm, 112)
    np.testing.assert_allclose(m[0].numpy(), [[1, 0, 0], [0, 1, 0]], atol=1e-4)  # float32 template
    m = affact_crop_matrix(lm, 112, canvas_size=140)
    np.testing.assert_allclose(m[0].numpy(), [[1, 0, 14], [0, 1, 14]], atol=1e-4)


def _blob_image(lm: np.ndarray, h: int, w: int, sigma: float) -> torch.Tensor:
    """Grey image with a dark Gaussian dot at each eye (pixel centres at integer coordinates)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dark = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2)) for x, y in lm[:2])
    return torch.from_numpy(1 - 0.9 * dark).float().expand(3, h, w)


def _weighted_centroid(img: torch.Tensor, at: np.ndarray, radius: int = 7) -> np.ndarray:
    x0, y0 = np.round(at).astype(int)
    win = (1 - img[0, y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1].double()).numpy()
    yy, xx = np.mgrid[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
    return np.array([(win * xx).sum(), (win * yy).sum()]) / win.sum()


@pytest.mark.parametrize("scale,degrees", [(1.0, 0.0), (1.6, 25.0), (0.8, -35.0)])
def test_drawn_eye_dots_land_where_the_matrix_says(scale, degrees):
    lm = similarity(FACE, scale, degrees, (100, 120))
    img = _blob_image(lm, 320, 256, sigma=4 * scale)[None]
    crop, lm_out = affact_crop(img, torch.from_numpy(lm)[None].float(), 128)
    assert crop.shape == (1, 3, 128, 128)
    for k in (LEFT_EYE, RIGHT_EYE):
        predicted = lm_out[0, k].double().numpy()
        np.testing.assert_allclose(_weighted_centroid(crop[0], predicted), predicted, atol=0.1)
    np.testing.assert_allclose(lm_out[0, :2, 1].numpy(), 0.45 * 128 - 0.5, atol=1e-4)


def _batch(n: int, size: int = 16, value: float | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    lm = np.stack([similarity(FACE, rng.uniform(0.1, 0.3), rng.uniform(-40, 40), rng.uniform(20, 40, 2))
                   for _ in range(n)])
    shape = (n, 3, size * 4, size * 4)
    img = torch.full(shape, value) if value is not None else torch.rand(shape)
    return {"image": img, "landmarks": torch.from_numpy(lm).float(), "index": torch.arange(n)}


def _eye_angles(lm: torch.Tensor) -> np.ndarray:
    d = (lm[:, RIGHT_EYE] - lm[:, LEFT_EYE]).double()
    return torch.rad2deg(torch.atan2(d[:, 1], d[:, 0])).numpy()


def test_rotation_only_gives_eye_line_angles_with_the_configured_spread():
    out = AffactAugment(AffactAugmentConfig.off(rotation_std=20.0), image_size=16, seed=3)(_batch(3000))
    angles = _eye_angles(out["landmarks"])
    assert abs(angles.mean()) < 1.2
    assert abs(angles.std() - 20.0) < 1.0
    # Rotation is about the crop centre (7.5, 7.5) with no scale: the eye centre keeps its distance 0.8 to it.
    eye = (out["landmarks"][:, LEFT_EYE] + out["landmarks"][:, RIGHT_EYE]).double() / 2
    np.testing.assert_allclose((eye - 7.5).norm(dim=1).numpy(), 7.5 - (0.45 * 16 - 0.5), atol=1e-3)


def test_scale_and_shift_spreads_match_the_config():
    out = AffactAugment(AffactAugmentConfig.off(scale_log2_std=0.1), image_size=16, seed=4)(_batch(3000))
    lm = out["landmarks"].double()
    d = ((lm[:, LEFT_EYE] + lm[:, RIGHT_EYE]) / 2 - (lm[:, LEFT_MOUTH] + lm[:, RIGHT_MOUTH]) / 2).norm(dim=1)
    log2s = torch.log2(d / (16 / 5.5)).numpy()
    assert abs(log2s.std() - 0.1) < 0.006 and abs(log2s.mean()) < 0.006
    out = AffactAugment(AffactAugmentConfig.off(shift_std=0.05), image_size=16, seed=5)(_batch(3000))
    eye = (out["landmarks"][:, LEFT_EYE] + out["landmarks"][:, RIGHT_EYE]).double().numpy() / 2
    shift = (eye - [7.5, 0.45 * 16 - 0.5]) / 16
    np.testing.assert_allclose(shift.std(axis=0), [0.05, 0.05], atol=0.003)
    np.testing.assert_allclose(_eye_angles(out["landmarks"]), 0, atol=1e-3)


def test_gamma_only_moves_a_grey_image_by_two_to_a_normal_power():
    aug = AffactAugment(AffactAugmentConfig.off(gamma_log2_std=1.0), image_size=16, seed=6)
    out = aug(_batch(3000, value=0.5))
    v = out["image"].double().mean(dim=(1, 2, 3))
    z = torch.log2(-torch.log2(v)).numpy()  # 0.5 ** (2 ** z) recovers z
    assert abs(z.mean()) < 0.06 and abs(z.std() - 1.0) < 0.04
    # Expected mean brightness E[0.5 ** 2^Z], Z ~ N(0, 1), by quadrature.
    zz = np.linspace(-8, 8, 4001)
    expected = np.trapezoid(0.5 ** (2 ** zz) * np.exp(-zz ** 2 / 2) / math.sqrt(2 * math.pi), zz)
    assert abs(v.mean().item() - expected) < 0.01


def test_mirror_swaps_left_and_right_and_flips_the_pixels():
    rng = np.random.default_rng(2)
    lm = np.stack([similarity(FACE, 1.2, a, (110, 130)) for a in (-20, 5, 30)])
    img = torch.stack([torch.from_numpy(np.array(draw_face(WILD_SIZE, x, seed=i))).permute(2, 0, 1)
                       for i, x in enumerate(lm)]).float() / 255
    batch = {"image": img, "landmarks": torch.from_numpy(lm).float(), "concept_masks": torch.from_numpy(
        rng.random((3, 2, WILD_SIZE[1], WILD_SIZE[0])) > 0.5)}
    centre = AffactCentreCrop(96)(batch)
    flipped = AffactAugment(AffactAugmentConfig.off(mirror_p=1.0), image_size=96, seed=0)(batch)
    lmf, lmc = flipped["landmarks"], centre["landmarks"]
    assert (lmf[:, LEFT_EYE, 0] < lmf[:, RIGHT_EYE, 0]).all()
    assert (lmf[:, LEFT_MOUTH, 0] < lmf[:, RIGHT_MOUTH, 0]).all()
    # The mirror of the right eye (x -> 95 - x) is the new left eye, and so on.
    np.testing.assert_allclose(lmf[:, LEFT_EYE, 0].numpy(), 95 - lmc[:, RIGHT_EYE, 0].numpy(), atol=1e-4)
    nose = np.stack([95 - lmc[:, NOSE, 0], lmc[:, NOSE, 1]], 1)
    np.testing.assert_allclose(lmf[:, NOSE].numpy(), nose, atol=1e-4)
    torch.testing.assert_close(flipped["image"], centre["image"].flip(-1), atol=1e-5, rtol=0)
    assert flipped["concept_masks"].dtype == torch.bool
    assert torch.equal(flipped["concept_masks"], centre["concept_masks"].flip(-1))


def test_masks_follow_the_image_exactly_under_an_identity_crop():
    size = 32
    lm = canonical_landmarks(size)[None].repeat(2, 1, 1)
    masks = torch.rand(2, 3, size, size) > 0.5
    img = torch.rand(2, 3, size, size)
    out = AffactCentreCrop(size)({"image": img, "landmarks": lm, "concept_masks": masks})
    assert torch.equal(out["concept_masks"], masks)
    torch.testing.assert_close(out["image"], img, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["landmarks"], lm, atol=1e-4, rtol=0)


def test_gaussian_blur_matches_scipy_per_image():
    img = torch.zeros(3, 2, 41, 41, dtype=torch.float64)
    img[:, :, 20, 20] = 1
    img[:, 1, 12, 28] = 1
    sigma = torch.tensor([0.0, 1.0, 2.5])
    out = gaussian_blur(img, sigma)
    radius = math.ceil(3 * 2.5)
    torch.testing.assert_close(out[0], img[0])
    for i in (1, 2):
        for c in range(2):
            s = float(sigma[i])
            ref = gaussian_filter(img[i, c].numpy(), s, mode="constant", truncate=radius / s)
            np.testing.assert_allclose(out[i, c].numpy(), ref, atol=1e-12)


def test_sampled_parameters_follow_the_config_and_the_seed():
    aug = AffactAugment(AffactAugmentConfig(), image_size=224, seed=11)
    g = torch.Generator().manual_seed(0)
    p = aug.sample(40000, torch.device("cpu"), g)
    assert abs(p["blur_sigma"].mean().item() - 3 * math.sqrt(2 / math.pi)) < 0.05
    assert abs(p["flip"].double().mean().item() - 0.5) < 0.01
    assert abs(p["rotation"].std().item() - 20) < 0.3
    assert abs(torch.log2(p["gamma"]).std().item() - 1) < 0.015
    b = _batch(4, size=16)
    a1 = AffactAugment(AffactAugmentConfig(), 16, seed=1)(b)
    a2 = AffactAugment(AffactAugmentConfig(), 16, seed=1)(b)
    a3 = AffactAugment(AffactAugmentConfig(), 16, seed=2)(b)
    assert torch.equal(a1["image"], a2["image"]) and not torch.equal(a1["image"], a3["image"])
    assert a1["image"].shape == (4, 3, 16, 16) and a1["image"].min() >= 0 and a1["image"].max() <= 1
    assert torch.equal(a1["index"], b["index"])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rotation_std"):
        AffactAugmentConfig(rotation_std=-1)
    with pytest.raises(ValueError, match="mirror_p"):
        AffactAugmentConfig(mirror_p=1.5)
    with pytest.raises(KeyError, match="landmarks"):
        AffactCentreCrop(16)({"image": torch.zeros(1, 3, 8, 8)})


def test_frontal_ratio_on_hand_made_landmarks():
    # Centreline from eye centre (20, 0) to mouth centre (20, 50): c = 50; nose x offset s -> ratio s / 50.
    faces = []
    for offset in (0.0, 2.5, 4.9, 5.1, 15.0):
        f = FACE.copy()
        f[NOSE, 0] = 20 + offset
        faces.append(f)
    lm = torch.from_numpy(np.stack(faces))
    np.testing.assert_allclose(frontal_ratio(lm).numpy(), [0, 0.05, 0.098, 0.102, 0.3], atol=1e-12)
    assert is_frontal(lm).tolist() == [True, True, True, False, False]
    assert is_frontal(lm, threshold=0.2).tolist() == [True, True, True, True, False]
    # Invariant to rotation, scale, translation and a mirror (with relabelled landmarks).
    moved = torch.from_numpy(np.stack([similarity(f, 2.7, 63, (5, -9)) for f in faces]))
    np.testing.assert_allclose(frontal_ratio(moved).numpy(), frontal_ratio(lm).numpy(), atol=1e-12)
    mirrored = lm.clone()
    mirrored[..., 0] *= -1
    mirrored = mirrored[:, [RIGHT_EYE, LEFT_EYE, NOSE, RIGHT_MOUTH, LEFT_MOUTH]]
    np.testing.assert_allclose(frontal_ratio(mirrored).numpy(), frontal_ratio(lm).numpy(), atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentation_runs_on_the_gpu_like_on_the_cpu():
    b = _batch(8, size=32)
    cfg = AffactAugmentConfig(blur_std=0.0, gamma_log2_std=0.0)
    aug = AffactAugment(cfg, 32, seed=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    params = aug.sample(8, torch.device("cuda"), g)
    m = aug.matrix(b["landmarks"].cuda(), params)
    from datamodules.transforms import _apply
    gpu = _apply({k: v.cuda() for k, v in b.items()}, m, 32, params["flip"])
    cpu = _apply(b, m.cpu(), 32, params["flip"].cpu())
    torch.testing.assert_close(gpu["image"].cpu(), cpu["image"], atol=1e-4, rtol=0)
    full = AffactAugment(AffactAugmentConfig(), 32, seed=0)({k: v.cuda() for k, v in b.items()})
    assert full["image"].is_cuda and full["image"].shape == (8, 3, 32, 32)
