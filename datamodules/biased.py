"""Controlled-bias training sets for gender classification (seed 002 section 4).

Eyeglasses bias: P% of the male training images wear eyeglasses and (100 - P)% of the female ones do.
Grayscale bias: P% of the male training images are turned gray and (100 - P)% of the female ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

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
