"""JPEG bytes from the workers, decoded in one call per batch on the batch's device, then the AFFACT canvas.

Decoding dominates a CPU data loader (PIL manages about 2,200 CelebA images per second per core), so in this
mode workers only read each file's bytes; `decode_jpegs` decodes the whole batch with
`torchvision.io.decode_jpeg` (nvjpeg on CUDA, libjpeg on the CPU) and `jpeg_to_canvas` warps every image
onto the same canvas the CPU workers of `datamodules.celeba` produce (AFFACT crop of side `image_size`
centred on a `canvas_size` canvas), so the augmentation and centre crop that follow are unchanged.
Images of different sizes (the in-the-wild set) are warped one size group at a time.

The JPEG bytes stay on the CPU when the batch is moved (`decode_jpeg` reads its input from host memory);
`split_jpeg` separates them so a datamodule's `transfer_batch_to_device` can move only the rest.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.io
from torch.utils.data import default_collate

from datamodules.transforms import affact_crop_matrix
from facelens.geometry import transform_points, warp

JPEG_KEY = "jpeg"  # list of (n_bytes,) uint8 CPU tensors, one per image
NAME_KEY = "jpeg_name"  # list of file names, for error messages
JPEG_KEYS = (JPEG_KEY, NAME_KEY)
_SOI = b"\xff\xd8"  # every JPEG file starts with the start-of-image marker


def read_jpeg(path: str | Path) -> torch.Tensor:
    """The file's bytes as a (n,) uint8 tensor; an empty or non-JPEG file is an `OSError` naming it."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise OSError(f"{path}: cannot read image file ({e})") from e
    if data.size < 4 or data[:2].tobytes() != _SOI:
        head = data[:4].tobytes()
        raise OSError(f"{path}: not a JPEG file (starts with {head!r}, expected {_SOI!r}); "
                      "decode_on_device reads JPEG files only")
    return torch.from_numpy(data)


def collate_jpeg(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation for every key except the variable-length JPEG bytes and names, which stay lists."""
    rest = default_collate([{k: v for k, v in s.items() if k not in JPEG_KEYS} for s in samples])
    for key in JPEG_KEYS:
        if key in samples[0]:
            rest[key] = [s[key] for s in samples]
    return rest


def split_jpeg(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JPEG entries, everything else): move only the second to the device."""
    return ({k: v for k, v in batch.items() if k in JPEG_KEYS},
            {k: v for k, v in batch.items() if k not in JPEG_KEYS})


def _decode(data: torch.Tensor | list[torch.Tensor], device: torch.device):
    with warnings.catch_warnings():
        # torchvision >= 0.29 flags its image IO as deprecated in favour of torchcodec; it still works
        warnings.filterwarnings("ignore", message=".*image decoding and encoding.*deprecated", category=Warning)
        return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=device)


def decode_jpegs(data: list[torch.Tensor], device: torch.device | str,
                 names: list[str] | None = None) -> list[torch.Tensor]:
    """Decode a batch of JPEGs in one call into (3, H, W) uint8 RGB tensors on `device`.

    A corrupt image fails the whole call, so on failure the images are decoded one by one on the CPU to
    name the culprit in the `OSError`.
    """
    device = torch.device(device)
    if not data:
        raise ValueError("decode_jpegs: empty batch")
    data = [d.cpu() for d in data]
    try:
        return list(_decode(data, device))
    except RuntimeError as batch_error:
        for i, d in enumerate(data):
            try:
                _decode(d, torch.device("cpu"))
            except RuntimeError as e:
                name = names[i] if names is not None else f"image {i} of the batch"
                raise OSError(f"{name}: cannot decode JPEG ({e})") from e
        raise batch_error


def jpeg_to_canvas(images: list[torch.Tensor], landmarks: torch.Tensor, image_size: int,
                   canvas_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AFFACT-crop decoded images (list of (3, H, W) uint8) onto (B, 3, S, S) float canvases in [0, 1].

    `landmarks` (B, 5, 2) are in source pixels; returns the canvases and the landmarks on them. One warp per
    distinct image size, on the images' device, with the same matrices as the CPU workers.
    """
    if len(images) != landmarks.shape[0]:
        raise ValueError(f"jpeg_to_canvas: {len(images)} images but {landmarks.shape[0]} landmark sets")
    device = images[0].device
    lm = landmarks.to(device)
    m = affact_crop_matrix(lm, image_size, canvas_size)
    out = torch.empty(len(images), 3, canvas_size, canvas_size, device=device, dtype=torch.float32)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    for rows in groups.values():
        idx = torch.tensor(rows, device=device)
        stack = torch.stack([images[i] for i in rows]).float().div_(255)
        out[idx] = warp(stack, m[idx], canvas_size).clamp_(0, 1)
    return out, transform_points(m, lm.to(torch.float64)).to(landmarks.dtype)


def decode_batch(batch: dict[str, Any], image_size: int, canvas_size: int) -> dict[str, Any]:
    """A batch with JPEG bytes -> the batch contract with `image` on the device of `batch['landmarks']`."""
    jpeg, out = split_jpeg(batch)
    device = out["landmarks"].device
    images = decode_jpegs(jpeg[JPEG_KEY], device, jpeg.get(NAME_KEY))
    out["image"], out["landmarks"] = jpeg_to_canvas(images, out["landmarks"], image_size, canvas_size)
    return out
