"""Controlled-bias training sets for gender classification (seed 002 section 4).

Eyeglasses bias: P% of the male training images wear eyeglasses and (100 - P)% of the female ones do.
Grayscale bias: P% of the male training images are turned gray and (100 - P)% of the female ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.celeba import CelebADataModule
from datamodules.sampling import make_loader
from datamodules.synthfaces import SynthFaces, _CachedFaces, sample_labels
from facelens.attributes import ATTRIBUTE_INDEX, CELEBA_ATTRIBUTES

BIAS_KINDS = ("eyeglasses", "grayscale")


def check_rate(p: int, option: str = "data.p") -> int:
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 50 <= p <= 100:
        raise ValueError(f"{option}: bias rate P must be an integer percentage in 50..100, got {p!r}")
    return int(p)


@dataclass
class BiasedSelection:
    """Which images a biased training set uses and which of them carry the bias concept."""

    indices: np.ndarray  # into the pool
    male: np.ndarray  # bool per selected image
    biased: np.ndarray  # bool per selected image: wears eyeglasses / is turned gray
    p: int
    kind: str

    def rates(self) -> dict[str, float]:
        """Achieved rates: fraction of males / females carrying the concept."""
        return {"male_rate": float(self.biased[self.male].mean()), "female_rate": float(self.biased[~self.male].mean()),
                "size": int(len(self.indices)), "males": int(self.male.sum()), "females": int((~self.male).sum())}


def feasible_size_per_gender(male: np.ndarray, concept: np.ndarray | None) -> int:
    """The largest number of images per gender for which every P in 50..100 can be built with that same size.

    Eyeglasses: P = 100 needs n males with and n females without glasses; P = 50 needs n/2 males without and
    n/2 females with. Grayscale is applied by us, so only the gender counts limit it.
    """
    male = np.asarray(male, bool)
    if concept is None:
        return int(min(male.sum(), (~male).sum()))
    concept = np.asarray(concept, bool)
    m_with, m_without = (male & concept).sum(), (male & ~concept).sum()
    f_with, f_without = (~male & concept).sum(), (~male & ~concept).sum()
    return int(min(m_with, f_without, 2 * m_without, 2 * f_with))


def select_biased(male: np.ndarray, concept: np.ndarray | None, p: int, kind: str, size_per_gender: int | None = None,
                  seed: int = 0) -> BiasedSelection:
    """Pick a training set of 2 n images (n per gender) with the bias rate P, exactly up to rounding.

    `concept` holds the eyeglasses label of every pool image (None for grayscale, which we apply ourselves).
    """
    p = check_rate(p)
    if kind not in BIAS_KINDS:
        raise ValueError(f"data.bias: {kind!r} is not one of {BIAS_KINDS}")
    male = np.asarray(male, bool)
    if kind == "eyeglasses" and concept is None:
        raise ValueError("eyeglasses bias needs the Eyeglasses label of every image")
    limit = feasible_size_per_gender(male, concept if kind == "eyeglasses" else None)
    n = limit if size_per_gender is None else int(size_per_gender)
    if n < 1 or n > limit:
        raise ValueError(f"data.size_per_gender: {n} images per gender requested, but the data allow 1..{limit} "
                         f"for every P in 50..100")
    rng = np.random.default_rng(seed)
    with_male = round(n * p / 100)
    with_female = round(n * (100 - p) / 100)
    chosen, is_male, is_biased = [], [], []
    for gender, n_with in ((True, with_male), (False, with_female)):
        pool = np.flatnonzero(male == gender)
        if kind == "eyeglasses":
            have = pool[np.asarray(concept, bool)[pool]]
            lack = pool[~np.asarray(concept, bool)[pool]]
            picked_with = rng.choice(have, n_with, replace=False)
            picked_without = rng.choice(lack, n - n_with, replace=False)
            picked = np.concatenate([picked_with, picked_without])
        else:
            picked = rng.choice(pool, n, replace=False)
        flags = np.zeros(n, bool)
        flags[:n_with] = True
        chosen.append(picked)
        is_male.append(np.full(n, gender))
        is_biased.append(flags)
    order = rng.permutation(2 * n)
    return BiasedSelection(np.concatenate(chosen)[order], np.concatenate(is_male)[order],
                           np.concatenate(is_biased)[order], p, kind)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma replicated to three channels; works on (3, H, W) or (B, 3, H, W)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(3, 1, 1)
    luma = (images * weights).sum(-3, keepdim=True)
    return luma.expand_as(images).contiguous()


class BiasedDataset(Dataset):
    """A view of a contract-following dataset: the selected images, gray where the selection says so, each with
    `bias` (carries the concept) and `bias_aligned` (concept agrees with gender as the bias says)."""

    def __init__(self, base: Dataset, indices: np.ndarray, male: np.ndarray, biased: np.ndarray,
                 apply_gray: np.ndarray | None = None):
        self.base, self.indices = base, np.asarray(indices)
        self.male, self.biased = np.asarray(male, bool), np.asarray(biased, bool)
        self.apply_gray = np.zeros(len(indices), bool) if apply_gray is None else np.asarray(apply_gray, bool)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.base[int(self.indices[i])])
        if self.apply_gray[i]:
            sample["image"] = to_gray(sample["image"])
            if "grayscale" in sample:
                sample["grayscale"] = torch.tensor(1, dtype=torch.int64)
        sample["bias"] = torch.tensor(bool(self.biased[i]))
        sample["bias_aligned"] = torch.tensor(bool(self.biased[i]) == bool(self.male[i]))
        return sample


SOURCES = ("synthfaces", "celeba")
_CONCEPT_ATTRIBUTE = {"eyeglasses": "Eyeglasses", "grayscale": None}


def _labels_known(attributes: np.ndarray, mask: np.ndarray | None, name: str, where: str) -> np.ndarray:
    """The 0/1 column of `name`; fails naming the attribute when it is unlabelled or never/always positive."""
    column = ATTRIBUTE_INDEX[name]
    if mask is not None and not np.asarray(mask)[:, column].all():
        raise ValueError(f"data.bias: attribute {name!r} is not labelled for every image of {where}")
    values = np.asarray(attributes)[:, column] > 0.5
    if values.all() or not values.any():
        state = "positive" if values.any() else "negative"
        raise ValueError(f"data.bias: attribute {name!r} is {state} for every image of {where}, so it is missing "
                         f"from the data (a biased gender set needs both values)")
    return values


class _PoolView:
    """The selected items of a SynthFaces pool, looking like a SynthFaces split to the render cache."""

    def __init__(self, faces: SynthFaces, indices: np.ndarray):
        self.faces, self.indices = faces, np.asarray(indices)
        self.size, self.return_masks = faces.size, False

    def __len__(self) -> int:
        return len(self.indices)

    def render(self, index: int):
        return self.faces.render(int(self.indices[index]))


class BiasedDataModule(pl.LightningDataModule):
    """Gender training data with a controlled bias (seed 002 section 4) and an unbiased evaluation split.

    Training set: `select_biased` at rate P over the source's training pool; its size (2 x size_per_gender) is the
    same for every P. Evaluation: the P = 50 selection of the source's validation pool (the four gender x concept
    groups equally large). Batches carry `bias` / `bias_aligned` for `callbacks.bias_groups.BiasGroupsCallback`.

    Args:
        bias: "eyeglasses" (selected by the Eyeglasses label) or "grayscale" (applied at load time).
        p: percentage of male images with the concept; (100 - p)% of female images have it. 50..100.
        source: "synthfaces" (rendered, default) or "celeba" (needs `root`).
        root: CelebA root folder (either layout, see `datamodules.celeba`).
        size_per_gender: training images per gender; None = the largest size feasible for every P.
        pool_size / num_val: SynthFaces training / validation pool sizes the selections draw from.
        priors: SynthFaces attribute rates (e.g. {"Eyeglasses": 0.5} so more of the pool is usable).
        image_size: SynthFaces render size, CelebA crop size.
        cache: render the selected SynthFaces images once at setup.
        max_samples_per_split: CelebA only, caps each split (quick runs).
    """

    def __init__(self, bias: str = "eyeglasses", p: int = 100, source: str = "synthfaces", root: str | None = None,
                 size_per_gender: int | None = None, pool_size: int = 8000, num_val: int = 2000,
                 num_identities: int = 2000, priors: dict[str, float] | None = None, image_size: int = 64,
                 batch_size: int = 64, num_workers: int = 2, seed: int = 0, cache: bool = True,
                 max_samples_per_split: int | None = None):
        super().__init__()
        if bias not in BIAS_KINDS:
            raise ValueError(f"data.bias: {bias!r} is not one of {BIAS_KINDS}")
        check_rate(p)
        if source not in SOURCES:
            raise ValueError(f"data.source: {source!r} is not one of {SOURCES}")
        if source == "celeba":
            if root is None:
                raise ValueError("data.root: source=celeba needs the CelebA root folder (--data.init_args.root DIR)")
            if not Path(root).is_dir():
                raise FileNotFoundError(f"data.root: CelebA root {root} is not a directory")
        if size_per_gender is not None and size_per_gender < 1:
            raise ValueError(f"data.size_per_gender: must be >= 1 or null, got {size_per_gender}")
        for name, value, low in (("pool_size", pool_size, 2), ("num_val", num_val, 4), ("batch_size", batch_size, 1),
                                 ("num_workers", num_workers, 0), ("num_identities", num_identities, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{name}: must be an integer >= {low}, got {value!r}")
        self.save_hyperparameters()
        self.bias, self.p, self.source = bias, int(p), source
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.celeba: CelebADataModule | None = None
        self.datasets: dict[str, BiasedDataset] = {}
        self.selection: BiasedSelection | None = None
        self.eval_selection: BiasedSelection | None = None
        self._train_attributes: np.ndarray | None = None
        self._train_mask: np.ndarray | None = None

    # -- pools: (dataset, attributes (N, 40), attribute_mask (N, 40) or None, description)
    def _synth_pool(self, split: str, count: int):
        h = self.hparams
        faces = SynthFaces(count, split, h.image_size, h.num_identities, h.seed, priors=h.priors, grayscale_rate=0.0)
        labels = sample_labels(count, seed=h.seed, split=split, num_identities=h.num_identities, priors=h.priors)
        return faces, labels["attributes"], labels["attribute_mask"], f"the SynthFaces {split} pool ({count} images)"

    def _celeba_pool(self, split: str):
        if self.celeba is None:
            h = self.hparams
            self.celeba = CelebADataModule(h.root, image_size=h.image_size, batch_size=h.batch_size,
                                           num_workers=h.num_workers, seed=h.seed,
                                           max_samples_per_split=h.max_samples_per_split)
            self.celeba.setup()
        if split not in self.celeba.datasets:
            raise ValueError(f"data.root: CelebA split {split!r} has no images")
        ds = self.celeba.datasets[split]
        return ds, ds.attributes.numpy(), None, f"the CelebA {split} split ({len(ds)} images)"

    def _build(self, split: str, p: int, size_per_gender: int | None) -> tuple[BiasedDataset, BiasedSelection]:
        h = self.hparams
        if self.source == "celeba":
            base, attributes, mask, where = self._celeba_pool(split)
        else:
            base, attributes, mask, where = self._synth_pool(split, h.pool_size if split == "train" else h.num_val)
        male = _labels_known(attributes, mask, "Male", where)
        concept_name = _CONCEPT_ATTRIBUTE[self.bias]
        concept = None if concept_name is None else _labels_known(attributes, mask, concept_name, where)
        if split != "train":  # an even size per gender makes the four evaluation groups exactly equal
            size_per_gender = max(1, feasible_size_per_gender(male, concept) // 2 * 2)
        try:
            sel = select_biased(male, concept, p, self.bias, size_per_gender, seed=h.seed + (split != "train"))
        except ValueError as err:
            raise ValueError(f"{err} ({where})") from None
        if split == "train":
            self._train_attributes = np.asarray(attributes)[sel.indices]
            self._train_mask = None if mask is None else np.asarray(mask)[sel.indices]
        gray = sel.biased if self.bias == "grayscale" else None
        if self.source == "synthfaces" and h.cache:
            base, indices = _CachedFaces(_PoolView(base, sel.indices), h.num_workers), np.arange(len(sel.indices))
        else:
            indices = sel.indices
        return BiasedDataset(base, indices, sel.male, sel.biased, gray), sel

    def setup(self, stage: str | None = None) -> None:
        if "train" not in self.datasets:
            self.datasets["train"], self.selection = self._build("train", self.p, self.hparams.size_per_gender)
            self.datasets["val"], self.eval_selection = self._build("val", 50, None)
            self._report()

    def rates(self) -> dict[str, float]:
        """Achieved training rates (male_rate, female_rate, sizes) and the evaluation split's."""
        if self.selection is None:
            self.setup()
        out = {f"train_{k}": v for k, v in self.selection.rates().items()}
        out.update({f"eval_{k}": v for k, v in self.eval_selection.rates().items()})
        return out

    def _report(self) -> None:
        values = self.rates()
        rank_zero_info(f"Biased {self.bias} data (P={self.p}, {self.source}): males with {self.bias} "
                       f"{values['train_male_rate']:.4f}, females {values['train_female_rate']:.4f}, "
                       f"{values['train_size']} training images; evaluation {values['eval_size']} images at P=50")
        trainer = getattr(self, "trainer", None)
        logger = getattr(trainer, "logger", None) if trainer is not None else None
        if logger is not None:
            logger.log_hyperparams({"bias_rates": {"p": self.p, "bias": self.bias, **values}})

    def positive_rates(self) -> dict[str, float]:
        """Positive rate of each CelebA attribute in the (biased) training set; the balanced loss reads it."""
        if self._train_attributes is None:
            self.setup()
        positive = self._train_attributes > 0.5
        known = np.ones_like(positive) if self._train_mask is None else self._train_mask
        rates = (positive & known).sum(0) / np.maximum(known.sum(0), 1)
        return {name: float(r) for name, r in zip(CELEBA_ATTRIBUTES, rates)}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        return make_loader(self.datasets[split], self.batch_size, self.num_workers, shuffle, self.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """CelebA canvases get the AFFACT crop / augmentation of `CelebADataModule`; SynthFaces pass through."""
        if self.celeba is None:
            return batch
        trainer = getattr(self, "trainer", None)
        return self.celeba.transform_batch(batch, train=trainer is not None and trainer.training)
