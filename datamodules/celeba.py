"""CelebA from a local folder, in the original-release (txt) or the Kaggle (csv) layout.

Everything is parsed and cross-checked once at setup (counts, headers, the 40 attributes, -1/1
values, duplicates, landmarks finite and inside the image, images present, splits not empty);
every problem names the file and the 1-based line. Workers decode each JPEG and apply the
deterministic AFFACT crop onto a canvas `load_scale` times the output size (face box centred), so
samples collate; the random AFFACT augmentation (train) or the centre crop (eval) then runs on the
whole batch on its device in `on_after_batch_transfer`.

    python -m datamodules.celeba check --root /data/celeba
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.sampling import make_loader
from facelens.attributes import CELEBA_ATTRIBUTES, CELEBA_POSITIVE_RATE, NUM_ATTRIBUTES
from facelens.geometry import LANDMARK_NAMES, transform_points, warp

from .jpeg_batches import JPEG_KEY, NAME_KEY, collate_jpeg, decode_batch, read_jpeg, split_jpeg
from .transforms import (
    AffactAugment,
    AffactAugmentConfig,
    AffactCentreCrop,
    affact_crop_matrix,
    frontal_ratio,
)

SPLITS: tuple[str, ...] = ("train", "val", "test")  # partition values 0, 1, 2
LANDMARK_COLUMNS: tuple[str, ...] = tuple(f"{n}_{a}" for n in LANDMARK_NAMES for a in "xy")
BBOX_COLUMNS: tuple[str, ...] = ("x_1", "y_1", "width", "height")
LAYOUTS = ("auto", "txt", "csv")
IMAGE_SETS = {"aligned": ("img_align_celeba", "list_landmarks_align_celeba"),
              "wild": ("img_celeba", "list_landmarks_celeba")}


@dataclass(frozen=True)
class Problem:
    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line else f"{self.path}: {self.message}"


class CelebAFormatError(ValueError):
    """Bad CelebA files; `problems` lists each one with its file and 1-based line."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        more = f"\n  (and {len(self.problems) - 1} more problem(s):\n    " + "\n    ".join(
            map(str, self.problems[1:])) + ")" if len(self.problems) > 1 else ""
        super().__init__(str(self.problems[0]) + more)


class _Stop(Exception):
    """Raised internally when a problem makes further checks meaningless."""


class _Problems:
    def __init__(self, limit: int):
        self.items: list[Problem] = []
        self.limit = limit

    def add(self, path: Path, line: int | None, message: str) -> None:
        self.items.append(Problem(path, line, message))
        if len(self.items) >= self.limit:
            raise _Stop

    def fatal(self, path: Path, line: int | None, message: str) -> None:
        self.items.append(Problem(path, line, message))
        raise _Stop


@dataclass
class Table:
    """One parsed CelebA list file: `values[i]` belongs to `names[i]`, read from 1-based `lines[i]`."""

    path: Path
    columns: tuple[str, ...]
    names: list[str]
    values: np.ndarray  # (n, len(columns)) float64
    lines: np.ndarray  # (n,) int64
    rejected: set[str] = field(default_factory=set)  # names of rows left out for a wrong column count


def read_table(path: Path, columns: Sequence[str], problems: _Problems, count_line: bool, header: bool,
               csv: bool) -> Table:
    """Parse a CelebA list file into the value `columns` (a header may list them in any order).

    Rows with a wrong column count (named in `rejected`) or a repeated name are reported and left out.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        problems.fatal(path, None, f"cannot read: {e}")
    lines = text.splitlines()
    pos = 0

    def next_line() -> tuple[int, str]:
        nonlocal pos
        while pos < len(lines) and not lines[pos].strip():
            pos += 1
        if pos >= len(lines):
            problems.fatal(path, len(lines) or None, "file ends before its header / count line")
        pos += 1
        return pos, lines[pos - 1]

    declared = None
    if count_line:
        no, line = next_line()
        try:
            declared = int(line.strip())
        except ValueError:
            problems.fatal(path, no, f"first line should be the image count, found {line.strip()[:60]!r}")
    ncols = len(columns)
    order = np.arange(ncols)
    if header:
        no, line = next_line()
        found = [t.strip() for t in line.split(",")] if csv else line.split()
        if found and found[0] == "image_id":
            found = found[1:]
        elif csv:
            problems.fatal(path, no, f"header should start with 'image_id', found {line.strip()[:60]!r}")
        wanted = list(columns)
        missing = [c for c in wanted if c not in found]
        extra = [c for c in found if c not in wanted]
        dup = sorted({c for c in found if found.count(c) > 1})
        if missing or extra or dup:
            parts = [f"missing column(s) {missing}" if missing else "",
                     f"unknown column(s) {extra}" if extra else "",
                     f"duplicated column(s) {dup}" if dup else ""]
            problems.fatal(path, no, "header: " + "; ".join(p for p in parts if p)
                           + f"; expected {len(wanted)} columns: {' '.join(wanted)}")
        order = np.array([found.index(c) for c in wanted])
    columns = tuple(columns)

    names: list[str] = []
    rests: list[str] = []
    line_nos: list[int] = []
    seen: dict[str, int] = {}
    rejected: set[str] = set()
    nrows = 0
    for i in range(pos, len(lines)):
        line = lines[i]
        if csv:
            tokens = [t.strip() for t in line.split(",")]
            if len(tokens) == 1 and not tokens[0]:
                continue
        else:
            tokens = line.split()
            if not tokens:
                continue
        nrows += 1
        if len(tokens) != ncols + 1:
            problems.add(path, i + 1, f"expected {ncols + 1} columns (image name + {ncols} values), "
                                      f"found {len(tokens)}")
            rejected.add(tokens[0])
            continue
        name = tokens[0]
        if name in seen:
            problems.add(path, i + 1, f"duplicated image name {name} (first at line {seen[name]})")
            continue
        seen[name] = i + 1
        names.append(name)
        rests.append(" ".join(tokens[1:]))
        line_nos.append(i + 1)
    if declared is not None and declared != nrows:
        problems.add(path, 1, f"count line says {declared} images but the file lists {nrows}")
    if nrows == 0:
        problems.fatal(path, None, "no image rows")
    values = _parse_numbers(path, rests, line_nos, columns, problems)
    return Table(path, columns, names, values[:, order] if header else values,
                 np.asarray(line_nos, dtype=np.int64), rejected)


def _parse_numbers(path: Path, rests: list[str], line_nos: list[int], columns: Sequence[str],
                   problems: _Problems) -> np.ndarray:
    k = len(columns)
    try:
        flat = np.fromstring("\n".join(rests), sep=" ")
        if flat.size == len(rests) * k:
            return flat.reshape(len(rests), k)
    except ValueError:
        pass
    out = np.full((len(rests), k), np.nan)
    for r, (rest, no) in enumerate(zip(rests, line_nos)):
        for j, tok in enumerate(rest.split()):
            try:
                out[r, j] = float(tok)
            except ValueError:
                problems.add(path, no, f"column {columns[j]!r}: {tok!r} is not a number")
    return out


def _bad_rows(table: Table, bad: np.ndarray, problems: _Problems, what: str) -> None:
    """Report each row of `table` where the (n, k) mask `bad` is set, naming the first bad column."""
    for r in np.flatnonzero(bad.any(axis=1)):
        j = int(np.argmax(bad[r]))
        problems.add(table.path, int(table.lines[r]), f"column {table.columns[j]!r} of {table.names[r]}: "
                                                      f"value {_fmt(table.values[r, j])} {what}")


def _fmt(v: float) -> str:
    return str(int(v)) if math.isfinite(v) and v == int(v) else str(v)


@dataclass
class CelebAFiles:
    layout: str
    image_dir: Path
    attr: Path
    landmarks: Path
    partition: Path
    identity: Path | None
    bbox: Path | None


def locate(root: str | Path, layout: str = "auto", images: str = "aligned") -> CelebAFiles:
    """Find the files of one layout under `root`; `images` picks aligned (img_align_celeba) or wild."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if images not in IMAGE_SETS:
        raise ValueError(f"images must be one of {tuple(IMAGE_SETS)}, got {images!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"CelebA root {root} is not a directory")
    if layout == "auto":
        layout = next((lay for lay in ("txt", "csv") if (root / f"list_attr_celeba.{lay}").is_file()), "")
        if not layout:
            found = sorted(p.name for p in root.iterdir())[:20]
            raise FileNotFoundError(f"{root}: no list_attr_celeba.txt (original release) or "
                                    f"list_attr_celeba.csv (Kaggle layout); found: {found}")
    dir_name, lm_name = IMAGE_SETS[images]
    image_dir = root / dir_name
    if (image_dir / dir_name).is_dir():  # Kaggle nests the images one folder deeper
        image_dir = image_dir / dir_name
    files = {"attr": root / f"list_attr_celeba.{layout}", "landmarks": root / f"{lm_name}.{layout}",
             "partition": root / f"list_eval_partition.{layout}"}
    for key, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: required CelebA file is missing ({layout} layout, images={images})")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image folder is missing (images={images})")
    optional = {"identity": root / f"identity_CelebA.{layout}", "bbox": root / f"list_bbox_celeba.{layout}"}
    present = {k: (p if p.is_file() else None) for k, p in optional.items()}
    return CelebAFiles(layout, image_dir, **files, **present)


@dataclass
class CelebAIndex:
    """Every listed image, in attribute-file order, with labels, landmarks and split; and which files."""

    files: CelebAFiles
    names: list[str]
    attributes: np.ndarray  # (N, 40) int8 in {-1, 1}
    landmarks: np.ndarray  # (N, 5, 2) float32, pixels of the chosen image set
    identity: np.ndarray  # (N,) int64, -1 without identity file
    partition: np.ndarray  # (N,) int64 in {0, 1, 2}
    landmark_lines: np.ndarray  # (N,) 1-based line of each image in the landmarks file
    attr_lines: np.ndarray  # (N,) 1-based line in the attribute file
    splits: dict[str, np.ndarray] = field(default_factory=dict)  # indices into the arrays above
    frontal: np.ndarray | None = None  # (N,) bool
    frontal_kept: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (kept, total)


def _align(ref: Table, other: Table, problems: _Problems) -> np.ndarray | None:
    """Row of `other` for each image of `ref`; reports images present in only one of the two files.

    Images whose row was already rejected in either file are not reported again.
    """
    if other.names == ref.names:
        return np.arange(len(ref.names))
    where = {n: i for i, n in enumerate(other.names)}
    ref_set = set(ref.names)
    for i, n in enumerate(other.names):
        if n not in ref_set and n not in ref.rejected:
            problems.add(other.path, int(other.lines[i]), f"image {n} is not listed in {ref.path.name}")
    rows = np.array([where.get(n, -1) for n in ref.names])
    for i in np.flatnonzero(rows < 0):
        if ref.names[i] not in other.rejected:
            problems.add(ref.path, int(ref.lines[i]),
                         f"image {ref.names[i]} is missing from {other.path.name}")
    return None if (rows < 0).any() else rows


def _image_sizes(image_dir: Path, names: Sequence[str], attr: Table, problems: _Problems) -> None:
    """Every listed image exists and is not empty (one directory scan, no decoding)."""
    sizes: dict[str, int] = {}
    with os.scandir(image_dir) as it:
        for e in it:
            if e.is_file():
                sizes[e.name] = e.stat().st_size
    for i, n in enumerate(names):
        size = sizes.get(n)
        if size is None:
            problems.add(attr.path, int(attr.lines[i]), f"image file not found: {image_dir / n}")
        elif size == 0:
            problems.add(attr.path, int(attr.lines[i]), f"image file is empty (0 bytes): {image_dir / n}")


def _check_landmarks_inside(index: CelebAIndex, rows: np.ndarray, problems: _Problems) -> None:
    """Landmarks inside their image, sizes read lazily from the JPEG headers of the images in use."""
    path = index.files.landmarks
    for i in rows:
        img_path = index.files.image_dir / index.names[i]
        try:
            with Image.open(img_path) as im:
                w, h = im.size
        except (OSError, SyntaxError) as e:
            problems.add(img_path, None, f"cannot read image header: {e}")
            continue
        lm = index.landmarks[i]
        outside = (lm[:, 0] < -0.5) | (lm[:, 0] > w - 0.5) | (lm[:, 1] < -0.5) | (lm[:, 1] > h - 0.5)
        if outside.any():
            k = int(np.argmax(outside))
            problems.add(path, int(index.landmark_lines[i]),
                         f"landmark {LANDMARK_NAMES[k]} ({_fmt(lm[k, 0])}, {_fmt(lm[k, 1])}) of "
                         f"{index.names[i]} lies outside the {w}x{h} image")


def scan_celeba(root: str | Path, layout: str = "auto", images: str = "aligned", frontal_only: bool = False,
                frontal_splits: Sequence[str] = ("val", "test"), frontal_threshold: float = 0.1,
                max_samples_per_split: int | None = None, check_image_sizes: bool = True,
                max_problems: int = 20) -> CelebAIndex:
    """Parse and cross-check a CelebA tree and choose each split's images; raises `CelebAFormatError`.

    Collects up to `max_problems` problems before failing, so one run shows most of what is wrong.
    """
    files = locate(root, layout, images)
    csv = files.layout == "csv"
    problems = _Problems(max_problems)
    try:
        attr = read_table(files.attr, CELEBA_ATTRIBUTES, problems, count_line=not csv, header=True, csv=csv)
        _bad_rows(attr, ~np.isin(attr.values, (-1, 1)), problems, "is not a CelebA attribute value (-1 or 1)")
        lm = read_table(files.landmarks, LANDMARK_COLUMNS, problems, count_line=not csv, header=True, csv=csv)
        _bad_rows(lm, ~np.isfinite(lm.values), problems, "is not a finite landmark coordinate")
        part = read_table(files.partition, ("partition",), problems, count_line=False,
                          header=csv, csv=csv)
        _bad_rows(part, ~np.isin(part.values, (0, 1, 2)), problems,
                  "is not a partition (0 train, 1 val, 2 test)")
        tables = [lm, part]
        ident = None
        if files.identity is not None:
            ident = read_table(files.identity, ("identity",), problems, count_line=False,
                               header=csv, csv=csv)
            vals = ident.values
            _bad_rows(ident, ~(np.isfinite(vals) & (vals == np.round(vals)) & (vals >= 0)), problems,
                      "is not an identity number")
            tables.append(ident)
        if files.bbox is not None:
            bbox = read_table(files.bbox, BBOX_COLUMNS, problems, count_line=not csv, header=True, csv=csv)
            vals = bbox.values
            _bad_rows(bbox, ~np.isfinite(vals) | ((np.arange(4) >= 2) & (vals <= 0)), problems,
                      "is not a valid box coordinate (finite, positive width and height)")
            tables.append(bbox)
        aligned = [_align(attr, t, problems) for t in tables]
        if problems.items:
            raise _Stop
        _image_sizes(files.image_dir, attr.names, attr, problems)
        rows_lm, rows_part = aligned[0], aligned[1]
        index = CelebAIndex(
            files=files, names=attr.names, attributes=attr.values.astype(np.int8),
            landmarks=lm.values[rows_lm].reshape(-1, 5, 2).astype(np.float32),
            identity=(ident.values[aligned[2], 0].astype(np.int64) if ident is not None
                      else np.full(len(attr.names), -1, dtype=np.int64)),
            partition=part.values[rows_part, 0].astype(np.int64), landmark_lines=lm.lines[rows_lm],
            attr_lines=attr.lines,
        )
        index.frontal = is_frontal_np(index.landmarks, frontal_threshold)
        for value, split in enumerate(SPLITS):
            rows = np.flatnonzero(index.partition == value)
            keep = index.frontal[rows]
            index.frontal_kept[split] = (int(keep.sum()), len(rows))
            if len(rows) == 0:
                problems.add(files.partition, None, f"split {split!r} (partition {value}) has no images")
                continue
            if frontal_only and split in frontal_splits:
                rows = rows[keep]
                if len(rows) == 0:
                    problems.add(files.partition, None, f"split {split!r}: the frontal filter (ratio < "
                                                        f"{frontal_threshold}) keeps none of its images")
                    continue
            if max_samples_per_split is not None:
                rows = rows[:max_samples_per_split]
            index.splits[split] = rows
        if check_image_sizes and not problems.items:
            _check_landmarks_inside(index, np.concatenate(list(index.splits.values())), problems)
    except _Stop:
        pass
    if problems.items:
        raise CelebAFormatError(problems.items)
    return index


def is_frontal_np(landmarks: np.ndarray, threshold: float) -> np.ndarray:
    return (frontal_ratio(torch.from_numpy(np.asarray(landmarks, dtype=np.float64))) < threshold).numpy()


def load_image(path: Path) -> torch.Tensor:
    """(3, H, W) float32 RGB in [0, 1]; any decoding failure is raised naming the file."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise OSError(f"{path}: cannot decode image ({e})") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)


class CelebADataset(Dataset):
    """Batch-contract samples, AFFACT-cropped onto a `load_size` canvas (face box `image_size`, centred).

    With `raw` the sample holds the JPEG bytes and file name instead of `image`, and source-pixel
    landmarks: `datamodules.jpeg_batches.decode_batch` decodes and crops the whole batch on its device.
    """

    def __init__(self, index: CelebAIndex, rows: np.ndarray, image_size: int, load_size: int,
                 raw: bool = False):
        self.image_dir = index.files.image_dir
        self.names = [index.names[i] for i in rows]
        self.attributes = torch.from_numpy((index.attributes[rows] > 0).astype(np.float32))
        self.landmarks = torch.from_numpy(index.landmarks[rows].astype(np.float32))
        self.identity = torch.from_numpy(index.identity[rows])
        self.image_size, self.load_size = int(image_size), int(load_size)
        self.raw = raw

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = {
            "attributes": self.attributes[i],
            "attribute_mask": torch.ones(NUM_ATTRIBUTES, dtype=torch.bool),
            "identity": self.identity[i],
            "index": torch.tensor(i, dtype=torch.int64),
        }
        path = self.image_dir / self.names[i]
        lm = self.landmarks[i : i + 1]
        if self.raw:
            return {**sample, JPEG_KEY: read_jpeg(path), NAME_KEY: str(path), "landmarks": lm[0].clone()}
        m = affact_crop_matrix(lm, self.image_size, self.load_size)
        crop = warp(load_image(path)[None], m, self.load_size)[0].clamp_(0, 1)
        return {**sample, "image": crop, "landmarks": transform_points(m, lm.double())[0].float()}


class CelebADataModule(pl.LightningDataModule):
    """CelebA for the 40 attributes, either layout, with AFFACT crop/augmentation and the frontal filter.

    frontal_only keeps only faces whose `frontal_ratio` < frontal_threshold in `frontal_splits`
    (default the evaluation splits, as seed 004 did); augment None means the default AFFACT
    augmentation, augment_train False trains on centre crops. decode_on_device: workers only read the JPEG
    bytes; the batch is decoded (nvjpeg on CUDA) and cropped on its device (`datamodules.jpeg_batches`).
    """

    def __init__(self, root: str, image_size: int = 224, batch_size: int = 64, num_workers: int = 4,
                 layout: str = "auto", images: str = "aligned", frontal_only: bool = False,
                 frontal_splits: list[str] | None = None, frontal_threshold: float = 0.1,
                 augment: AffactAugmentConfig | None = None, augment_train: bool = True,
                 load_scale: float = 1.25,
                 max_samples_per_split: int | None = None, check_image_sizes: bool = True,
                 seed: int | None = None, pin_memory: bool = False, decode_on_device: bool = False):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"CelebADataModule.layout must be one of {LAYOUTS}, got {layout!r}")
        if images not in IMAGE_SETS:
            raise ValueError(f"CelebADataModule.images must be one of {tuple(IMAGE_SETS)}, got {images!r}")
        frontal_splits = ["val", "test"] if frontal_splits is None else list(frontal_splits)
        bad = [s for s in frontal_splits if s not in SPLITS]
        if bad:
            raise ValueError(
                f"CelebADataModule.frontal_splits: unknown split(s) {bad}; valid: {list(SPLITS)}")
        if image_size < 8:
            raise ValueError(f"CelebADataModule.image_size must be >= 8, got {image_size}")
        if load_scale < 1:
            raise ValueError(f"CelebADataModule.load_scale must be >= 1, got {load_scale}")
        if max_samples_per_split is not None and max_samples_per_split < 1:
            raise ValueError(
                f"CelebADataModule.max_samples_per_split must be >= 1, got {max_samples_per_split}")
        self.save_hyperparameters(ignore=["augment"])
        # plain data only, so checkpoints stay loadable with weights_only=True
        self.hparams["augment"] = asdict(augment) if augment is not None else None
        self.root, self.image_size = root, image_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.layout, self.images = layout, images
        self.frontal_only, self.frontal_splits = frontal_only, frontal_splits
        self.frontal_threshold = frontal_threshold
        self.load_size = int(math.ceil(image_size * load_scale))
        self.max_samples_per_split, self.check_image_sizes = max_samples_per_split, check_image_sizes
        self.pin_memory, self.decode_on_device = pin_memory, decode_on_device
        self.augment_train = augment_train
        self.augment = AffactAugment(augment or AffactAugmentConfig(), image_size, seed=seed)
        self.centre_crop = AffactCentreCrop(image_size)
        self.index: CelebAIndex | None = None
        self.datasets: dict[str, CelebADataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.index is not None:
            return
        self.index = scan_celeba(self.root, self.layout, self.images, self.frontal_only, self.frontal_splits,
                                 self.frontal_threshold, self.max_samples_per_split, self.check_image_sizes)
        self.datasets = {s: CelebADataset(self.index, rows, self.image_size, self.load_size,
                                          self.decode_on_device)
                         for s, rows in self.index.splits.items()}
        kept = ", ".join(f"{s} {k}/{n}" for s, (k, n) in self.index.frontal_kept.items())
        used = "applied to " + "/".join(self.frontal_splits) if self.frontal_only else "not applied"
        rank_zero_info(f"CelebA ({self.index.files.layout} layout, {self.index.files.image_dir}): "
                       + ", ".join(f"{s} {len(d)}" for s, d in self.datasets.items())
                       + f"; frontal filter (ratio < {self.frontal_threshold}, {used}) keeps {kept}")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        return make_loader(self.datasets[split], self.batch_size, self.num_workers, shuffle, self.hparams.seed or 0,
                           self.pin_memory, collate_jpeg if self.decode_on_device else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def transform_batch(self, batch: dict[str, Any], train: bool) -> dict[str, Any]:
        """Random AFFACT augmentation when training (and augment_train), else the centre crop.

        A batch of JPEG bytes (decode_on_device) is first decoded and cropped onto the canvas on the device of
        its landmarks.
        """
        if JPEG_KEY in batch:
            batch = decode_batch(batch, self.image_size, self.load_size)
        return self.augment(batch) if train and self.augment_train else self.centre_crop(batch)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """JPEG bytes stay in host memory, where `decode_jpeg` reads them; the rest moves."""
        if isinstance(batch, dict) and JPEG_KEY in batch:
            jpeg, rest = split_jpeg(batch)
            return {**super().transfer_batch_to_device(rest, device, dataloader_idx), **jpeg}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        return self.transform_batch(batch, train=trainer is not None and trainer.training)

    def positive_rates(self) -> dict[str, float]:
        """Positive rate of each attribute in the training split; the balanced loss reads it."""
        self.setup()
        rows = self.index.splits["train"]
        rates = (self.index.attributes[rows] > 0).mean(0)
        return {name: float(r) for name, r in zip(CELEBA_ATTRIBUTES, rates)}


def _summary(index: CelebAIndex, threshold: float) -> str:
    out = [f"layout: {index.files.layout}", f"images: {index.files.image_dir} ({len(index.names)} listed)",
           f"identity file: {index.files.identity or 'absent (identity = -1)'}",
           f"bbox file: {index.files.bbox or 'absent'}", "split sizes: " + ", ".join(
               f"{s} {int((index.partition == v).sum())}" for v, s in enumerate(SPLITS)),
           f"frontal filter (ratio < {threshold}) keeps: " + ", ".join(
               f"{s} {k}/{n} ({k / max(n, 1):.1%})" for s, (k, n) in index.frontal_kept.items()),
           "attribute positive rates (this data | CelebA):"]
    rates = (index.attributes > 0).mean(axis=0)
    out += [f"  {name:<20s} {rate:6.3f} | {CELEBA_POSITIVE_RATE[name]:.3f}"
            for name, rate in zip(CELEBA_ATTRIBUTES, rates)]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.celeba", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="parse and cross-check a CelebA folder; print a summary or problems")
    check.add_argument("--root", required=True)
    check.add_argument("--layout", default="auto", choices=LAYOUTS)
    check.add_argument("--images", default="aligned", choices=tuple(IMAGE_SETS))
    check.add_argument("--frontal-threshold", type=float, default=0.1)
    check.add_argument("--max-problems", type=int, default=20)
    check.add_argument("--skip-image-sizes", action="store_true",
                       help="do not open every JPEG header to check that landmarks lie inside the image")
    args = parser.parse_args(argv)
    try:
        index = scan_celeba(args.root, args.layout, args.images, frontal_threshold=args.frontal_threshold,
                            check_image_sizes=not args.skip_image_sizes, max_problems=args.max_problems)
    except CelebAFormatError as e:
        print(f"{len(e.problems)} problem(s) found:", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_summary(index, args.frontal_threshold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
