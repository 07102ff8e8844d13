"""Small CelebA trees on disk, in the original-release (txt) and the Kaggle (csv) layouts, for tests.

Images are real JPEGs drawn with PIL (a face ellipse with dark dots at the eyes and nose and a mouth
line between the mouth corners, so landmarks can be checked on pixels); text files follow the real
quirks: a count line, a header line (with a trailing space for the attributes), runs of spaces,
-1/1 values, no header in the partition and identity files.

    from fixtures_celeba import write_celeba, celeba_records
    root = write_celeba(tmp_path, layout="txt", n=12)
    rec = celeba_records(n=12)          # the labels and landmarks that were written
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from facelens.attributes import CELEBA_ATTRIBUTES, CELEBA_POSITIVE_RATE
from facelens.geometry import LANDMARK_NAMES

ALIGNED_SIZE = (178, 218)  # (width, height) of CelebA's img_align_celeba images
WILD_SIZE = (256, 320)
# A typical aligned CelebA face: lefteye, righteye, nose, leftmouth, rightmouth.
MEAN_ALIGNED = np.array([[69, 111], [108, 111], [88, 134], [73, 152], [105, 152]], dtype=np.float64)
LANDMARK_HEADER = [f"{n}_{a}" for n in LANDMARK_NAMES for a in "xy"]
EYE_COLOUR = (10, 10, 10)
NOSE_COLOUR = (200, 30, 30)


@dataclass
class CelebARecords:
    """What `write_celeba` writes, row i = image `names[i]`."""

    names: list[str]
    attributes: np.ndarray  # (n, 40) int8 in {-1, 1}
    landmarks: np.ndarray  # (n, 5, 2) int64, aligned images
    partition: np.ndarray  # (n,) 0 train, 1 val, 2 test
    identity: np.ndarray  # (n,) int64
    frontal: np.ndarray  # (n,) bool, by construction
    wild_landmarks: np.ndarray  # (n, 5, 2) int64, in-the-wild images
    bbox: np.ndarray  # (n, 4) x_1, y_1, width, height in the wild images


def celeba_records(n: int = 12, seed: int = 0) -> CelebARecords:
    """Deterministic labels and geometry; every 4th face (i % 4 == 3) is turned (nose off the centreline)."""
    rng = np.random.default_rng(seed)
    rates = np.array([CELEBA_POSITIVE_RATE[a] for a in CELEBA_ATTRIBUTES])
    attributes = np.where(rng.random((n, len(CELEBA_ATTRIBUTES))) < rates, 1, -1).astype(np.int8)
    frontal = np.array([i % 4 != 3 for i in range(n)])
    landmarks = np.empty((n, 5, 2), dtype=np.int64)
    wild = np.empty((n, 5, 2), dtype=np.int64)
    bbox = np.empty((n, 4), dtype=np.int64)
    for i in range(n):
        lm = MEAN_ALIGNED + rng.integers(-1, 2, size=2)  # shift the whole face by at most 1 px
        if not frontal[i]:
            lm[2, 0] += rng.choice([-14, 14])
        landmarks[i] = np.round(lm)
        # In the wild: the aligned face rotated, scaled and moved into a bigger picture.
        angle = math.radians(rng.uniform(-30, 30))
        scale = rng.uniform(0.8, 1.3)
        rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        centre = np.array(ALIGNED_SIZE) / 2
        target = np.array(WILD_SIZE) / 2 + rng.uniform(-20, 20, size=2)
        wild[i] = np.round((lm - centre) @ rot.T + target)
        lo, hi = wild[i].min(0) - 40 * scale, wild[i].max(0) + 40 * scale
        bbox[i] = [round(lo[0]), round(lo[1]), round(hi[0] - lo[0]), round(hi[1] - lo[1])]
    partition = np.array([0 if i < n // 2 else 1 if i < (3 * n) // 4 else 2 for i in range(n)])
    return CelebARecords(
        names=[f"{i + 1:06d}.jpg" for i in range(n)], attributes=attributes, landmarks=landmarks,
        partition=partition, identity=rng.integers(1, 6, size=n), frontal=frontal, wild_landmarks=wild,
        bbox=bbox,
    )


def draw_face(size: tuple[int, int], landmarks: np.ndarray, seed: int = 0) -> Image.Image:
    """A JPEG-able face: noisy background, skin ellipse, eye dots, nose dot, mouth line at `landmarks`."""
    rng = np.random.default_rng(seed)
    w, h = size
    bg = rng.integers(90, 200, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    lm = np.asarray(landmarks, dtype=np.float64)
    eye = (lm[0] + lm[1]) / 2
    mouth = (lm[3] + lm[4]) / 2
    d = float(np.linalg.norm(mouth - eye))
    centre = (eye + mouth) / 2
    draw.ellipse([centre[0] - 1.3 * d, centre[1] - 1.8 * d, centre[0] + 1.3 * d, centre[1] + 1.6 * d],
                 fill=(225, 185, 150))
    r = max(2.0, d / 12)
    for (x, y), colour in zip(lm[:3], (EYE_COLOUR, EYE_COLOUR, NOSE_COLOUR)):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    draw.line([tuple(lm[3]), tuple(lm[4])], fill=(120, 20, 40), width=max(2, int(r)))
    return img


def _write_table(path: Path, header: list[str] | None, rows: list[str], count: bool, sep: str,
                 eol: str) -> None:
    lines = []
    if count:
        lines.append(str(len(rows)))
    if header is not None:
        lines.append(sep.join(header) + (" " if sep == " " and header[0] != "image_id" else ""))
    path.write_text(eol.join(lines + rows) + eol)


def write_celeba(root: str | Path, layout: str = "txt", n: int = 12, wild: bool = False, seed: int = 0,
                 nested: bool | None = None, identity: bool | None = None, bbox: bool = True,
                 crlf: bool = False) -> Path:
    """Write a CelebA tree of `n` images under `root` and return `root`.

    layout "txt": the original release (count + header lines, space-aligned columns, identity file).
    layout "csv": the Kaggle variant (comma-separated with an `image_id` header, images nested one
    folder deeper by default, no identity file by default). `wild` adds img_celeba/ with its own
    landmarks file. The written content is `celeba_records(n, seed)`.
    """
    if layout not in ("txt", "csv"):
        raise ValueError(f"layout must be 'txt' or 'csv', got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rec = celeba_records(n, seed)
    nested = (layout == "csv") if nested is None else nested
    identity = (layout == "txt") if identity is None else identity
    eol = "\r\n" if crlf else "\n"

    def image_dir(name: str) -> Path:
        d = root / name / name if nested else root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    aligned_dir = image_dir("img_align_celeba")
    for i, name in enumerate(rec.names):
        draw_face(ALIGNED_SIZE, rec.landmarks[i], seed + i).save(aligned_dir / name, quality=92)
    if wild:
        wild_dir = image_dir("img_celeba")
        for i, name in enumerate(rec.names):
            draw_face(WILD_SIZE, rec.wild_landmarks[i], seed + i).save(wild_dir / name, quality=92)

    if layout == "txt":
        attr_rows = [f"{nm} " + " ".join(f"{v:2d}" for v in row)
                     for nm, row in zip(rec.names, rec.attributes)]
        _write_table(root / "list_attr_celeba.txt", list(CELEBA_ATTRIBUTES), attr_rows, True, " ", eol)

        def lm_rows(lms: np.ndarray) -> list[str]:
            return [nm + "".join(f"{v:{6 if j == 0 else 5}d}" for j, v in enumerate(lm.reshape(-1)))
                    for nm, lm in zip(rec.names, lms)]

        _write_table(root / "list_landmarks_align_celeba.txt", LANDMARK_HEADER, lm_rows(rec.landmarks), True,
                     " ", eol)
        if wild:
            _write_table(root / "list_landmarks_celeba.txt", LANDMARK_HEADER, lm_rows(rec.wild_landmarks),
                         True, " ", eol)
        _write_table(root / "list_eval_partition.txt", None,
                     [f"{nm} {p}" for nm, p in zip(rec.names, rec.partition)], False, " ", eol)
        if identity:
            _write_table(root / "identity_CelebA.txt", None,
                         [f"{nm} {p}" for nm, p in zip(rec.names, rec.identity)], False, " ", eol)
        if bbox:
            _write_table(root / "list_bbox_celeba.txt", ["image_id", "x_1", "y_1", "width", "height"],
                         [f"{nm}{b[0]:6d}{b[1]:4d}{b[2]:4d}{b[3]:4d}" for nm, b in zip(rec.names, rec.bbox)],
                         True, " ", eol)
    else:
        def csv_rows(values: np.ndarray) -> list[str]:
            return [",".join([nm] + [str(int(v)) for v in np.ravel(row)])
                    for nm, row in zip(rec.names, values)]

        _write_table(root / "list_attr_celeba.csv", ["image_id", *CELEBA_ATTRIBUTES],
                     csv_rows(rec.attributes), False, ",", eol)
        _write_table(root / "list_landmarks_align_celeba.csv", ["image_id", *LANDMARK_HEADER],
                     csv_rows(rec.landmarks), False, ",", eol)
        if wild:
            _write_table(root / "list_landmarks_celeba.csv", ["image_id", *LANDMARK_HEADER],
                         csv_rows(rec.wild_landmarks), False, ",", eol)
        _write_table(root / "list_eval_partition.csv", ["image_id", "partition"], csv_rows(rec.partition),
                     False, ",", eol)
        if identity:
            _write_table(root / "identity_CelebA.csv", ["image_id", "identity"], csv_rows(rec.identity),
                         False, ",", eol)
        if bbox:
            _write_table(root / "list_bbox_celeba.csv", ["image_id", "x_1", "y_1", "width", "height"],
                         csv_rows(rec.bbox), False, ",", eol)
    return root


def edit_line(path: str | Path, line: int, change: str | Callable[[str], str | None]) -> None:
    """Replace 1-based `line` of a text file by a string, or by `change(old)`; None deletes the line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    new = change(lines[line - 1]) if callable(change) else change
    if new is None:
        del lines[line - 1]
    else:
        lines[line - 1] = new
    path.write_text("\n".join(lines) + "\n")
