"""Identity-labelled face data for recognition training (seed 003 section 5.1.1).

Three sources, one batch contract (`identity` int64 in 0..num_identities-1):
  folder      `root/<identity>/<image>` (VGGFace2 / LFW style, jpg or png)
  celeba      CelebA identities (`identity_CelebA.txt`), AFFACT-aligned crops of the training partition
  synthfaces  rendered faces, image i showing identity i % num_identities

Validation holds out `val_per_identity` images of every training identity: identification accuracy is measured on
them and verification pairs are formed among them (by `RecognitionModule`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from analysis.verification import read_lfw_pairs
from datamodules.celeba import CelebADataset, load_image, scan_celeba
from datamodules.sampling import make_loader
from datamodules.synthfaces import SynthFaces, _CachedFaces
from facelens.attributes import NUM_ATTRIBUTES
from facelens.geometry import MIRROR_PERMUTATION

IDENTITY_SOURCES = ("folder", "celeba", "synthfaces")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def scan_image_folder(root: str | Path, min_images: int = 1) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images and identity labels of `root/<identity>/<image>`; identities sorted by folder name.

    Fails naming the folder or file for a missing root, an identity folder without images and empty image files.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: image folder {root} is not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"data.root: {root} has no identity sub-folders (expected root/<identity>/<image>)")
    paths, labels, names = [], [], []
    for folder in folders:
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"{folder}: identity folder has no {'/'.join(IMAGE_SUFFIXES)} images")
        for path in images:
            if path.stat().st_size == 0:
                raise ValueError(f"{path}: image file is empty")
        if len(images) < min_images:
            continue
        labels += [len(names)] * len(images)
        paths += images
        names.append(folder.name)
    if len(names) < 2:
        raise ValueError(f"data.root: {root} has {len(names)} identities with >= {min_images} images; need 2")
    return paths, np.asarray(labels, np.int64), names


def split_per_identity(labels: np.ndarray, held_out: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices for training and validation: `held_out` random images of each identity go to validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for identity in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == identity))
        val.append(rows[:held_out])
        train.append(rows[held_out:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def resize_shorter(image: torch.Tensor, side: int) -> torch.Tensor:
    """Resize (3, H, W) so its shorter side is `side` (bilinear, antialiased)."""
    h, w = image.shape[-2:]
    scale = side / min(h, w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def _unlabelled(image: torch.Tensor, identity: int, index: int) -> dict[str, torch.Tensor]:
    return {"image": image, "attributes": torch.zeros(NUM_ATTRIBUTES),
            "attribute_mask": torch.zeros(NUM_ATTRIBUTES, dtype=torch.bool),
            "landmarks": torch.full((5, 2), float("nan")),  # unknown for folder images
            "identity": torch.tensor(identity, dtype=torch.int64), "index": torch.tensor(index, dtype=torch.int64)}


class ImageFolderFaces(Dataset):
    """Folder images resized (shorter side `resize`) and cropped to `crop` (random when `train`, else centred)."""

    def __init__(self, paths: list[Path], labels: np.ndarray, resize: int, crop: int, train: bool):
        self.paths, self.labels = list(paths), np.asarray(labels)
        self.resize, self.crop, self.train = resize, crop, train

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = resize_shorter(load_image(self.paths[i]), self.resize)
        h, w = image.shape[-2:]
        if self.train:
            top = int(torch.randint(0, h - self.crop + 1, (1,)))  # workers are seeded per epoch by the loader
            left = int(torch.randint(0, w - self.crop + 1, (1,)))
        else:
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
        crop = image[:, top:top + self.crop, left:left + self.crop].clamp(0, 1).contiguous()
        return _unlabelled(crop, int(self.labels[i]), i)


class Relabelled(Dataset):
    """Rows of a contract dataset with identity replaced by a contiguous label and `index` by the row number."""

    def __init__(self, base: Dataset, rows: np.ndarray, labels: np.ndarray):
        self.base, self.rows, self.labels = base, np.asarray(rows), np.asarray(labels)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.base[int(self.rows[i])])
        item["identity"] = torch.tensor(int(self.labels[i]), dtype=torch.int64)
        item["index"] = torch.tensor(i, dtype=torch.int64)
        return item


def augment_batch(batch: dict, grayscale_p: float, flip: bool, generator: torch.Generator | None = None) -> dict:
    """Seed 003 training augmentation on a whole batch: `grayscale_p` of the images turned gray, half mirrored."""
    out = dict(batch)
    image = batch["image"]
    b, device = image.shape[0], image.device
    gray = torch.rand(b, generator=generator) < grayscale_p
    if gray.any():
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=device).view(1, 3, 1, 1)
        luma = (image * weights).sum(1, keepdim=True).expand_as(image)
        image = torch.where(gray.to(device)[:, None, None, None], luma, image)
        if "grayscale" in batch:
            out["grayscale"] = torch.where(gray.to(device), torch.ones_like(batch["grayscale"]), batch["grayscale"])
    if flip:
        mirror = (torch.rand(b, generator=generator) < 0.5).to(device)
        image = torch.where(mirror[:, None, None, None], image.flip(-1), image)
        if "landmarks" in batch:
            lm = batch["landmarks"]
            flipped = lm[:, list(MIRROR_PERMUTATION)].clone()
            flipped[..., 0] = image.shape[-1] - 1 - flipped[..., 0]  # pixel-centre convention of geometry.mirror_matrix
            out["landmarks"] = torch.where(mirror.to(lm.device)[:, None, None], flipped, lm)
    out["image"] = image.contiguous()
    return out


class IdentityDataModule(pl.LightningDataModule):
    """Recognition data with held-out images of the training identities for validation.

    Args:
        source: "folder" (`root/<identity>/<image>`), "celeba" (`root` = CelebA root with identity_CelebA.txt)
            or "synthfaces".
        root: data folder for folder / celeba.
        resize, crop: folder images: shorter side resized to `resize`, then a `crop` square (random for training,
            centred for validation). CelebA: AFFACT-aligned crops of side `crop`. SynthFaces render at `synth_size`.
        grayscale_p, flip: training augmentation (seed 003: 20% grayscale; horizontal flip).
        val_per_identity: held-out images per identity; identities need `val_per_identity + 1` images.
        synth_identities, images_per_identity, synth_size: SynthFaces only (named apart from the model's
            num_identities, which Lightning would otherwise require to be equal in both hparams).
        max_identities: keep only the first identities (quick runs on large folders).
        pairs_file: an LFW-style `pairs.txt`; its pairs are scored as a second validation set (`val/pairs_*`).
        pairs_root: folder of the pair images, `<name>/<name>_<NNNN>.jpg` as in LFW (default: root).
    """

    def __init__(self, source: str = "synthfaces", root: str | None = None, resize: int = 256, crop: int = 224,
                 grayscale_p: float = 0.2, flip: bool = True, val_per_identity: int = 2, synth_identities: int = 100,
                 images_per_identity: int = 12, synth_size: int = 64, max_identities: int | None = None,
                 batch_size: int = 64, num_workers: int = 2, seed: int = 0, cache: bool = True,
                 pairs_file: str | None = None, pairs_root: str | None = None):
        super().__init__()
        if source not in IDENTITY_SOURCES:
            raise ValueError(f"data.source: {source!r} is not one of {IDENTITY_SOURCES}")
        if source != "synthfaces" and root is None:
            raise ValueError(f"data.root: source={source} needs a data folder")
        if not 0.0 <= grayscale_p <= 1.0:
            raise ValueError(f"data.grayscale_p: must be in [0, 1], got {grayscale_p}")
        if crop > resize:
            raise ValueError(f"data.crop: {crop} is larger than data.resize {resize}")
        if val_per_identity < 1:
            raise ValueError(f"data.val_per_identity: must be >= 1, got {val_per_identity}")
        if source == "synthfaces" and images_per_identity <= val_per_identity:
            raise ValueError(f"data.images_per_identity: {images_per_identity} leaves no training image after "
                             f"data.val_per_identity={val_per_identity}")
        if source == "synthfaces" and synth_identities < 2:
            raise ValueError(f"data.synth_identities: need at least 2, got {synth_identities}")
        self.save_hyperparameters()
        self.source, self.batch_size, self.num_workers, self.seed = source, batch_size, num_workers, seed
        self.grayscale_p, self.flip = grayscale_p, flip
        self.datasets: dict[str, Dataset] = {}
        self.identity_names: list[str] = []
        self._num_identities: int | None = synth_identities if source == "synthfaces" else None
        self._generator = torch.Generator().manual_seed(seed)
        self.pairs: torch.Tensor | None = None  # (P, 2) rows of the pair-image set
        self.pairs_same: torch.Tensor | None = None  # (P,) bool

    @property
    def num_identities(self) -> int:
        """Number of training identities (labels 0..num_identities-1); scans the data if needed."""
        if self._num_identities is None:
            self.setup()
        return self._num_identities

    def _keep(self, labels: np.ndarray) -> np.ndarray:
        """Rows whose identity has enough images (and is among the first max_identities), relabelled 0..K-1."""
        h = self.hparams
        ids, counts = np.unique(labels, return_counts=True)
        ids = ids[counts > h.val_per_identity]
        if h.max_identities is not None:
            ids = ids[:h.max_identities]
        if len(ids) < 2:
            raise ValueError(f"data.root: only {len(ids)} identities have more than data.val_per_identity="
                             f"{h.val_per_identity} images; need 2")
        return ids

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        h = self.hparams
        if self.source == "synthfaces":
            k = h.synth_identities
            faces = SynthFaces(k * h.images_per_identity, "train", h.synth_size, k, h.seed)
            base = _CachedFaces(faces, h.num_workers) if h.cache else faces
            position = np.arange(len(faces)) // k  # the how-many-th image of its identity
            labels = np.arange(len(faces)) % k
            is_val = position >= h.images_per_identity - h.val_per_identity
            train_rows, val_rows = np.flatnonzero(~is_val), np.flatnonzero(is_val)
            self.datasets = {"train": Relabelled(base, train_rows, labels[train_rows]),
                             "val": Relabelled(base, val_rows, labels[val_rows])}
            self.identity_names = [str(i) for i in range(k)]
        else:
            if self.source == "folder":
                paths, labels, names = scan_image_folder(h.root)
            else:
                index = scan_celeba(h.root)
                if index.files.identity is None:
                    raise FileNotFoundError(f"data.root: {h.root} has no identity_CelebA.txt (or .csv); "
                                            f"CelebA recognition needs it")
                rows = index.splits["train"]
                labels, names = index.identity[rows], None
            ids = self._keep(labels)
            keep = np.flatnonzero(np.isin(labels, ids))
            mapped = np.searchsorted(ids, labels[keep])
            train, val = split_per_identity(mapped, h.val_per_identity, h.seed)
            if self.source == "folder":
                chosen = [paths[i] for i in keep]
                self.datasets = {
                    "train": ImageFolderFaces([chosen[i] for i in train], mapped[train], h.resize, h.crop, True),
                    "val": ImageFolderFaces([chosen[i] for i in val], mapped[val], h.resize, h.crop, False)}
                self.identity_names = [names[i] for i in ids]
            else:
                base = CelebADataset(index, rows[keep], h.crop, h.crop)
                self.datasets = {"train": Relabelled(base, train, mapped[train]),
                                 "val": Relabelled(base, val, mapped[val])}
                self.identity_names = [str(i) for i in ids]
            self._num_identities = len(ids)
        if h.pairs_file:
            self._setup_pairs(Path(h.pairs_file), Path(h.pairs_root or h.root or "."))
        rank_zero_info(f"Identity data ({self.source}): {self._num_identities} identities, "
                       f"{len(self.datasets['train'])} training / {len(self.datasets['val'])} held-out images")

    def _setup_pairs(self, pairs_file: Path, root: Path) -> None:
        """Resolve every image a pairs file names (LFW naming) and keep each image once."""
        rows: dict[Path, int] = {}
        pairs = []
        for number, (name_a, i_a, name_b, i_b) in enumerate(read_lfw_pairs(pairs_file), start=1):
            ends = []
            for name, i in ((name_a, i_a), (name_b, i_b)):
                found = [root / name / f"{name}_{i:04d}{ext}" for ext in (".jpg", ".jpeg", ".png")]
                path = next((f for f in found if f.is_file()), None)
                if path is None:
                    raise FileNotFoundError(f"{pairs_file}, pair {number}: no image {found[0]} (data.pairs_root)")
                ends.append(rows.setdefault(path, len(rows)))
            pairs.append(ends)
        paths = list(rows)
        h = self.hparams
        self.datasets["pairs"] = ImageFolderFaces(paths, np.full(len(paths), -1), h.resize, h.crop, False)
        self.pairs = torch.tensor(pairs, dtype=torch.int64)
        self.pairs_same = torch.tensor([a == b for a, _, b, _ in read_lfw_pairs(pairs_file)])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return make_loader(self.datasets[split], self.batch_size, self.num_workers, shuffle, self.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Held-out images of the training identities; plus the pairs-file images when one is given."""
        held_out = self._loader("val", False)
        return [held_out, self._loader("pairs", False)] if "pairs" in self.datasets else held_out

    def test_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            return augment_batch(batch, self.grayscale_p, self.flip, self._generator)
        return batch
