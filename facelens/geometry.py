"""The one source of truth for face geometry: landmark order, the AFFACT crop, affine warps.

Coordinates are (x, y) in pixels with pixel centres at integers (CelebA's annotation convention):
pixel (col, row) covers [col - 0.5, col + 0.5) x [row - 0.5, row + 0.5).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# CelebA's five landmarks, in the column order of list_landmarks_*.txt.
LANDMARK_NAMES: tuple[str, ...] = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
LEFT_EYE, RIGHT_EYE, NOSE, LEFT_MOUTH, RIGHT_MOUTH = range(5)
# Index permutation that relabels landmarks after a horizontal mirror.
MIRROR_PERMUTATION: tuple[int, ...] = (RIGHT_EYE, LEFT_EYE, NOSE, RIGHT_MOUTH, LEFT_MOUTH)

# AFFACT crop (seed 004 eq. 4.1; Günther et al. 2017): square of side 5.5 d, where d is the
# eye-centre to mouth-centre distance, from 0.45 l above to 0.55 l below the eye centre.
AFFACT_SIDE_OVER_D = 5.5
AFFACT_TOP = 0.45
AFFACT_LEFT = 0.5


def eye_mouth_centres(landmarks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eye centre t_e and mouth centre t_m, each (..., 2)."""
    eye = (landmarks[..., LEFT_EYE, :] + landmarks[..., RIGHT_EYE, :]) / 2
    mouth = (landmarks[..., LEFT_MOUTH, :] + landmarks[..., RIGHT_MOUTH, :]) / 2
    return eye, mouth


def canonical_landmarks(size: int) -> torch.Tensor:
    """Where an AFFACT crop of side `size` puts the eye and mouth centres (a frontal face, eyes 1 d apart).

    Used to render synthetic faces already in crop geometry and to place mask templates.
    """
    px = size / AFFACT_SIDE_OVER_D  # d in output pixels
    cx = AFFACT_LEFT * size - 0.5
    ey = AFFACT_TOP * size - 0.5
    my = ey + px
    return torch.tensor(
        [[cx - 0.5 * px, ey], [cx + 0.5 * px, ey], [cx, ey + 0.55 * px], [cx - 0.4 * px, my], [cx + 0.4 * px, my]],
        dtype=torch.float32,
    )


def affact_matrix(landmarks: torch.Tensor, out_size: int) -> torch.Tensor:
    """Affine maps (N, 2, 3) from source pixel coordinates to AFFACT-crop pixel coordinates.

    Rotates about the eye centre so the eyes are horizontal, then scales the 5.5 d box to
    `out_size` pixels. Apply the same matrix to landmarks with `transform_points`.
    """
    lm = landmarks.to(torch.float64)
    eye, mouth = eye_mouth_centres(lm)
    d = (eye - mouth).norm(dim=-1).clamp_min(1e-6)
    delta = lm[..., RIGHT_EYE, :] - lm[..., LEFT_EYE, :]
    angle = torch.atan2(delta[..., 1], delta[..., 0])
    side = AFFACT_SIDE_OVER_D * d
    s = out_size / side
    cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
    # Row-vector form: out = s * R(-angle) (p - eye) + offset; box pixel u has centre x_l + (u + 0.5) l / S.
    off_x = AFFACT_LEFT * out_size - 0.5
    off_y = AFFACT_TOP * out_size - 0.5
    m = torch.zeros(lm.shape[:-2] + (2, 3), dtype=torch.float64, device=lm.device)
    m[..., 0, 0], m[..., 0, 1] = cos, sin
    m[..., 1, 0], m[..., 1, 1] = -sin, cos
    m[..., 0, 2] = off_x - (cos * eye[..., 0] + sin * eye[..., 1])
    m[..., 1, 2] = off_y - (-sin * eye[..., 0] + cos * eye[..., 1])
    return m.to(landmarks.dtype if landmarks.is_floating_point() else torch.float32)


def to_homogeneous(matrix: torch.Tensor) -> torch.Tensor:
    bottom = torch.zeros(matrix.shape[:-2] + (1, 3), dtype=matrix.dtype, device=matrix.device)
    bottom[..., 0, 2] = 1
    return torch.cat([matrix, bottom], dim=-2)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The affine map `outer(inner(p))`, both (..., 2, 3)."""
    return (to_homogeneous(outer) @ to_homogeneous(inner))[..., :2, :]


def invert(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(to_homogeneous(matrix.to(torch.float64)))[..., :2, :].to(matrix.dtype)


def transform_points(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply (..., 2, 3) affine maps to (..., K, 2) points."""
    return points @ matrix[..., :, :2].transpose(-1, -2) + matrix[..., None, :, 2]


def warp(images: torch.Tensor, matrix: torch.Tensor, out_size: int | tuple[int, int], mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """Resample (N, C, H, W) images so that source pixel p lands at `matrix @ p` in the output.

    One `grid_sample` for the whole batch, so it runs the same on CPU workers and on the GPU.
    """
    n, _, h, w = images.shape
    oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
    inv = invert(matrix.to(torch.float64))  # output pixel -> source pixel
    # normalised output coords -> output pixels: u = ((x_n + 1) * W - 1) / 2
    out_from_norm = torch.tensor([[ow / 2, 0, (ow - 1) / 2], [0, oh / 2, (oh - 1) / 2]], dtype=torch.float64,
                                 device=images.device)
    # source pixels -> normalised source coords: x_n = (2 x + 1) / W - 1
    norm_from_src = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1]], dtype=torch.float64,
                                 device=images.device)
    theta = compose(norm_from_src.expand(n, 2, 3), compose(inv.to(images.device), out_from_norm.expand(n, 2, 3)))
    grid = F.affine_grid(theta.to(images.dtype if images.is_floating_point() else torch.float32),
                         [n, images.shape[1], oh, ow], align_corners=False)
    src = images if images.is_floating_point() else images.float()
    return F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def rotation_about(center: torch.Tensor, degrees: torch.Tensor, scale: torch.Tensor | float = 1.0,
                   shift: torch.Tensor | None = None) -> torch.Tensor:
    """Affine maps (N, 2, 3) rotating by `degrees` and scaling about `center` (N, 2), then shifting."""
    rad = degrees * (math.pi / 180)
    scale = torch.as_tensor(scale, dtype=center.dtype, device=center.device).expand_as(rad)
    cos, sin = torch.cos(rad) * scale, torch.sin(rad) * scale
    m = torch.zeros(center.shape[:-1] + (2, 3), dtype=center.dtype, device=center.device)
    m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1] = cos, -sin, sin, cos
    m[..., :, 2] = center - (m[..., :, :2] @ center[..., :, None])[..., 0]
    if shift is not None:
        m[..., :, 2] += shift
    return m


def mirror_matrix(width: int, flip: torch.Tensor) -> torch.Tensor:
    """Horizontal mirror about the image centre where `flip` (N,) is true, identity elsewhere."""
    n = flip.shape[0]
    m = torch.zeros(n, 2, 3, dtype=torch.float32, device=flip.device)
    sign = 1 - 2 * flip.float()
    m[:, 0, 0] = sign
    m[:, 1, 1] = 1
    m[:, 0, 2] = flip.float() * (width - 1)
    return m


def mirror_landmarks(landmarks: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Relabel left/right landmarks where `flip` (N,) is true, after their coordinates were mirrored."""
    swapped = landmarks[:, list(MIRROR_PERMUTATION)]
    return torch.where(flip[:, None, None], swapped, landmarks)
