"""AFFACT alignment, batched AFFACT augmentation and the frontal-pose filter.

All geometry comes from `facelens.geometry`: the crop is computed from the five landmarks, and
every augmentation is folded into one affine map per image, so each batch needs exactly one
`grid_sample` whether it lives on the CPU or the GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from facelens.geometry import (
    MIRROR_PERMUTATION,
    NOSE,
    affact_matrix,
    compose,
    eye_mouth_centres,
    mirror_matrix,
    rotation_about,
    transform_points,
    warp,
)

# Blur sigmas in the config are in pixels of a crop of this size (AFFACT's network input).
BLUR_REFERENCE_SIZE = 224


def affact_crop_matrix(landmarks: torch.Tensor, out_size: int,
                       canvas_size: int | None = None) -> torch.Tensor:
    """Affine maps (N, 2, 3), float64, from source pixels to the AFFACT crop of side `out_size`.

    With `canvas_size` > `out_size` the crop box stays `out_size` pixels wide but sits centred in a
    larger canvas, keeping context around the face for a later random crop.
    """
    m = affact_matrix(landmarks.to(torch.float64), out_size)
    if canvas_size is not None and canvas_size != out_size:
        m = m.clone()
        m[..., :, 2] += (canvas_size - out_size) / 2
    return m


def affact_crop(images: torch.Tensor, landmarks: torch.Tensor, out_size: int,
                canvas_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AFFACT-crop (N, C, H, W) images; returns the crops and their landmarks (same matrix, exactly)."""
    m = affact_crop_matrix(landmarks, out_size, canvas_size)
    size = out_size if canvas_size is None else canvas_size
    out = warp(images, m.to(images.device), size)
    return out, transform_points(m, landmarks.to(torch.float64)).to(landmarks.dtype)


def frontal_ratio(landmarks: torch.Tensor) -> torch.Tensor:
    """Pose score s / c per face (..., 5, 2) -> (...): small for frontal faces.

    Seed 004 (sec. 4.4.1, footnote 3) draws the face centreline from the eye centre to the mouth
    centre and calls a face frontal when "c / s < 0.1", with c the centreline and s the distance of
    the nose tip from it. Read literally, c / s would be large for frontal faces (nose on the line,
    s -> 0), contradicting its own Figure 4.5 ("smaller than in the non-frontal image"), so the ratio
    implemented is the one that is small when frontal: s = perpendicular distance of the nose tip
    from the (infinite) line through eye centre and mouth centre, divided by c = the centreline
    length |t_e - t_m|. It is invariant to translation, rotation, scale and mirroring.
    """
    lm = torch.as_tensor(landmarks, dtype=torch.float64)
    eye, mouth = eye_mouth_centres(lm)
    axis = mouth - eye
    c = axis.norm(dim=-1)
    rel = lm[..., NOSE, :] - eye
    s = (axis[..., 0] * rel[..., 1] - axis[..., 1] * rel[..., 0]).abs() / c.clamp_min(1e-12)
    return torch.where(c > 0, s / c.clamp_min(1e-12), torch.full_like(c, math.inf))


def is_frontal(landmarks: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Bool (...): faces whose `frontal_ratio` is below `threshold` (seed 004 uses 0.1)."""
    return frontal_ratio(landmarks) < threshold


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of (N, C, H, W) with its own sigma (N,) in pixels; sigma 0 leaves it unchanged.

    Separable, one grouped convolution per axis for the whole batch.
    """
    n, ch, h, w = images.shape
    sigma = sigma.to(device=images.device, dtype=torch.float64).clamp_min(0)
    smax = float(sigma.max()) if n else 0.0
    radius = min(int(math.ceil(3 * smax)), h - 1, w - 1)
    if radius < 1:
        return images
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float64)
    s = sigma.clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (x[None] / s) ** 2)
    k = torch.where((sigma < 1e-3)[:, None], (x == 0).to(k.dtype).expand_as(k), k)
    k = (k / k.sum(dim=1, keepdim=True)).to(images.dtype)
    k = k.repeat_interleave(ch, dim=0)  # one kernel per (image, channel) group
    flat = images.reshape(1, n * ch, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * ch)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * ch)
    return flat.reshape(n, ch, h, w)


@dataclass
class AffactAugmentConfig:
    """AFFACT training augmentation (Günther et al. 2017); setting a spread to 0 switches that part off.

    scale = 2^N(0, scale_log2_std); rotation ~ N(0, rotation_std) degrees; shift ~ N(0, shift_std) x crop
    size per axis; mirror with probability mirror_p; Gaussian blur sigma ~ |N(0, blur_std)| pixels
    (of a 224-pixel crop, scaled with the crop size); gamma = 2^N(0, gamma_log2_std).
    """

    scale_log2_std: float = 0.1
    rotation_std: float = 20.0
    shift_std: float = 0.05
    mirror_p: float = 0.5
    blur_std: float = 3.0
    gamma_log2_std: float = 1.0

    def __post_init__(self) -> None:
        for name in ("scale_log2_std", "rotation_std", "shift_std", "blur_std", "gamma_log2_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"AffactAugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.mirror_p <= 1:
            raise ValueError(f"AffactAugmentConfig.mirror_p must be in [0, 1], got {self.mirror_p}")

    @classmethod
    def off(cls, **on: float) -> AffactAugmentConfig:
        """Everything switched off except the fields given, e.g. `off(rotation_std=20)`."""
        fields = dict(scale_log2_std=0.0, rotation_std=0.0, shift_std=0.0, mirror_p=0.0, blur_std=0.0,
                      gamma_log2_std=0.0)
        fields.update(on)
        return cls(**fields)


def _check_batch(batch: dict[str, Any]) -> None:
    for key in ("image", "landmarks"):
        if key not in batch:
            raise KeyError(f"AFFACT transforms need batch['{key}'] (see docs/ARCHITECTURE.md); "
                           f"got keys {sorted(batch)}")
    img, lm = batch["image"], batch["landmarks"]
    if img.dim() != 4 or lm.dim() != 3 or lm.shape[1:] != (5, 2) or lm.shape[0] != img.shape[0]:
        raise ValueError(f"expected image (B, C, H, W) and landmarks (B, 5, 2), got {tuple(img.shape)} and "
                         f"{tuple(lm.shape)}")


def _apply(batch: dict[str, Any], m: torch.Tensor, size: int, flip: torch.Tensor | None) -> dict[str, Any]:
    """Warp image (bilinear), concept masks (nearest) and landmarks with the (B, 2, 3) maps `m`."""
    out = dict(batch)
    img = batch["image"]
    out["image"] = warp(img, m.to(img.device), size).clamp_(0, 1)
    lm = transform_points(m.to(batch["landmarks"].device), batch["landmarks"].to(torch.float64))
    if flip is not None:
        lm = torch.where(flip.to(lm.device)[:, None, None], lm[:, list(MIRROR_PERMUTATION)], lm)
    out["landmarks"] = lm.to(batch["landmarks"].dtype)
    masks = batch.get("concept_masks")
    if masks is not None:
        warped = warp(masks.float(), m.to(masks.device), size, mode="nearest", padding_mode="zeros")
        out["concept_masks"] = warped > 0.5
    return out


class AffactCentreCrop:
    """Deterministic AFFACT crop of side `image_size` from each image's landmarks (evaluation)."""

    def __init__(self, image_size: int = 224):
        self.image_size = int(image_size)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        _check_batch(batch)
        return _apply(batch, affact_crop_matrix(batch["landmarks"], self.image_size), self.image_size, None)


class AffactAugment:
    """Random AFFACT augmentation of a whole batch into crops of side `image_size`.

    Crop (from the landmarks), scale, rotation, shift and mirror are composed into one affine map per
    image; then per-image Gaussian blur and gamma. Works on any batch of the contract: CelebA loaded
    with context, or SynthFaces already in crop geometry. Random numbers come from a generator on
    the batch's device, seeded from `seed` (or from torch's global RNG when None, so that
    `seed_everything` governs it); pass `generator=` to a call to control it explicitly.
    """

    def __init__(self, config: AffactAugmentConfig | None = None, image_size: int = 224,
                 seed: int | None = None):
        self.config = config or AffactAugmentConfig()
        self.image_size = int(image_size)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)))
            g = torch.Generator(device=device)
            g.manual_seed(seed)
            self._generators[key] = g
        return self._generators[key]

    def sample(self, n: int, device: torch.device, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-image parameters: scale, rotation (deg), shift (B, 2) px, flip, blur sigma (px), gamma."""
        c = self.config
        z = torch.randn(n, 6, generator=generator, device=device, dtype=torch.float64)
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return {
            "scale": torch.exp2(z[:, 0] * c.scale_log2_std),
            "rotation": z[:, 1] * c.rotation_std,
            "shift": z[:, 2:4] * (c.shift_std * self.image_size),
            "flip": u < c.mirror_p,
            "blur_sigma": z[:, 4].abs() * (c.blur_std * self.image_size / BLUR_REFERENCE_SIZE),
            "gamma": torch.exp2(z[:, 5] * c.gamma_log2_std),
        }

    def matrix(self, landmarks: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The one affine map per image: crop, then mirror, scale/rotate about the crop centre, shift."""
        n, size = landmarks.shape[0], self.image_size
        crop = affact_crop_matrix(landmarks, size).to(params["scale"].device)
        centre = torch.full((n, 2), (size - 1) / 2, dtype=torch.float64, device=crop.device)
        aug = rotation_about(centre, params["rotation"], params["scale"], params["shift"])
        flip = mirror_matrix(size, params["flip"]).to(torch.float64)
        return compose(aug, compose(flip, crop))

    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        _check_batch(batch)
        img = batch["image"]
        device = img.device
        params = self.sample(img.shape[0], device, generator or self._generator(device))
        out = _apply(batch, self.matrix(batch["landmarks"], params), self.image_size, params["flip"])
        if self.config.blur_std > 0:
            out["image"] = gaussian_blur(out["image"], params["blur_sigma"])
        if self.config.gamma_log2_std > 0:
            gamma = params["gamma"].to(out["image"].dtype)[:, None, None, None]
            out["image"] = out["image"].clamp(0, 1).pow(gamma)
        return out
