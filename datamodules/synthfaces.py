"""SynthFaces: procedural, deterministic faces in AFFACT-crop geometry with exact concept masks.

Every face is a pure function of (seed, split, index): the labels come from a Gaussian copula over the
drawn CelebA attributes (configurable priors and pairwise correlations), identity-level traits
(gender, age, skin tone, hair, face geometry) are shared by all images of an identity, and the
renderer draws each concept as polygons, so its pixel mask is known exactly. Nuisances (pose,
lighting, background, noise, per-image geometry jitter) keep every attribute off any fixed pixel.

Face coordinates used while drawing: unit = d (eye-centre to mouth-centre distance), origin at the
eye centre, x to the image right, y down; the mean layout equals `facelens.geometry.canonical_landmarks`.

CLI:  python -m datamodules.synthfaces export --out DIR --count N [--seed S] [--size PX] [--split train]
      python -m datamodules.synthfaces preview [--out docs/synthfaces_preview.png]
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFilter
from scipy.special import ndtr, ndtri
from torch.utils.data import DataLoader, Dataset

from datamodules.sampling import make_loader
from datamodules.transforms import AffactAugment, AffactAugmentConfig
from facelens.attributes import (
    ATTRIBUTE_INDEX,
    CELEBA_ATTRIBUTES,
    CELEBA_POSITIVE_RATE,
    NUM_ATTRIBUTES,
    resolve_attributes,
)
from facelens.geometry import LANDMARK_NAMES, canonical_landmarks

SPLITS: tuple[str, ...] = ("train", "val", "test")
MIN_SIZE, MAX_SIZE = 64, 224
SUPERSAMPLE = 2  # drawn at 2x, downsampled with LANCZOS for anti-aliasing

# Everything except Attractive is drawn; undrawn attributes get attribute_mask False.
UNDRAWN_ATTRIBUTES: tuple[str, ...] = ("Attractive",)
DRAWN_ATTRIBUTES: tuple[str, ...] = tuple(a for a in CELEBA_ATTRIBUTES if a not in UNDRAWN_ATTRIBUTES)
# Traits of the person rather than of the photo: one latent value per identity.
IDENTITY_ATTRIBUTES: tuple[str, ...] = (
    "Male", "Young", "Pale_Skin", "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", "Bald",
    "Receding_Hairline", "Straight_Hair", "Wavy_Hair", "Big_Nose", "Pointy_Nose", "Big_Lips", "Narrow_Eyes",
    "Bushy_Eyebrows", "Arched_Eyebrows", "Chubby", "Double_Chin", "Oval_Face", "High_Cheekbones",
)
# Mutually exclusive groups, resolved in this priority order (an image has at most one of each group).
HAIR_COLOURS: tuple[str, ...] = ("Gray_Hair", "Blond_Hair", "Black_Hair", "Brown_Hair")
HAIR_TEXTURES: tuple[str, ...] = ("Wavy_Hair", "Straight_Hair")
NUM_AGE_GROUPS = 4  # 0: <20, 1: 20-39, 2: 40-59, 3: 60+  (Young <=> group 0 or 1)
NUM_SKIN_TONES = 4  # 0 lightest .. 3 darkest; Pale_Skin faces are tone 0, drawn paler

# Concept masks, in this order in `concept_masks`; the attribute each concept shows (None: facial part).
CONCEPT_ATTRIBUTE: dict[str, str | None] = {
    "background": None, "skin": None, "ears": None, "neck": None, "eyes": None, "brows": None, "nose": None,
    "mouth": None, "hair": None, "clothes": None, "wrinkles": None,
    "eyeglasses": "Eyeglasses", "hat": "Wearing_Hat", "mustache": "Mustache", "goatee": "Goatee",
    "beard": "No_Beard", "stubble": "5_o_Clock_Shadow", "sideburns": "Sideburns", "bangs": "Bangs",
    "earrings": "Wearing_Earrings", "necklace": "Wearing_Necklace", "necktie": "Wearing_Necktie",
    "lipstick": "Wearing_Lipstick", "rosy_cheeks": "Rosy_Cheeks", "eye_shadow": "Heavy_Makeup",
    "eye_bags": "Bags_Under_Eyes", "cheekbones": "High_Cheekbones", "double_chin": "Double_Chin",
    "mouth_open": "Mouth_Slightly_Open", "smile": "Smiling",
}
CONCEPTS: tuple[str, ...] = tuple(CONCEPT_ATTRIBUTE)
# Concepts drawn when their attribute is 0 (a beard is drawn when No_Beard is 0).
NEGATED_CONCEPTS: frozenset[str] = frozenset({"beard"})

# Moderate preset: CelebA's rates pulled half-way to 0.5, exclusive groups kept feasible.
_MODERATE = {a: round(0.25 + 0.5 * CELEBA_POSITIVE_RATE[a], 3) for a in DRAWN_ATTRIBUTES}
_MODERATE.update({
    "Male": 0.5, "Young": 0.7, "No_Beard": 0.7, "Goatee": 0.12, "Bald": 0.08, "Pale_Skin": 0.15,
    "Black_Hair": 0.25, "Blond_Hair": 0.2, "Brown_Hair": 0.25, "Gray_Hair": 0.12,
    "Straight_Hair": 0.3, "Wavy_Hair": 0.35, "Blurry": 0.15,
})
_UNIFORM = {a: 0.5 for a in DRAWN_ATTRIBUTES}
_UNIFORM.update({c: 0.2 for c in HAIR_COLOURS})
_UNIFORM.update({t: 1 / 3 for t in HAIR_TEXTURES})
_UNIFORM["Goatee"] = 0.25
PRIOR_PRESETS: dict[str, dict[str, float]] = {
    "default": _MODERATE,
    "celeba": {a: CELEBA_POSITIVE_RATE[a] for a in DRAWN_ATTRIBUTES},
    "uniform": _UNIFORM,
}
# Used when `correlations` is None; pass [] for independent attributes.
DEFAULT_CORRELATIONS: tuple[tuple[str, str, float], ...] = (
    ("Male", "No_Beard", -0.4), ("Male", "Goatee", 0.25), ("Male", "Mustache", 0.25), ("Male", "Sideburns", 0.25),
    ("Male", "5_o_Clock_Shadow", 0.25), ("Male", "Bald", 0.2), ("Male", "Receding_Hairline", 0.15),
    ("Male", "Wearing_Lipstick", -0.35), ("Male", "Heavy_Makeup", -0.25), ("Male", "Wearing_Earrings", -0.25),
    ("Male", "Wearing_Necklace", -0.15), ("Male", "Wearing_Necktie", 0.25), ("Male", "Arched_Eyebrows", -0.15),
    ("Male", "Rosy_Cheeks", -0.1), ("Young", "Gray_Hair", -0.5), ("Young", "Bags_Under_Eyes", -0.3),
    ("Young", "Double_Chin", -0.2), ("Young", "Bald", -0.3), ("Smiling", "Mouth_Slightly_Open", 0.4),
    ("Heavy_Makeup", "Wearing_Lipstick", 0.4), ("Chubby", "Double_Chin", 0.5), ("Mustache", "Goatee", 0.4),
)


def _prob(value: object, option: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{option}: rate for {name!r} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_rate(value: float, option: str) -> float:
    return _prob(value, option, option)


class LabelModel:
    """Priors + correlations -> a Gaussian copula over the drawn attributes, with the logical rules.

    Latent z ~ N(0, Sigma); attribute a is positive when Phi(z_a) > 1 - p_a. Identity attributes share
    their latent across an identity's images; the others are drawn per image from the conditional
    Gaussian, so every image's full latent is still exactly N(0, Sigma). Exclusive groups (hair
    colour, hair texture, goatee/full beard) use conditional rates in priority order, which keeps each
    member's marginal rate exact when the group's latents are uncorrelated.
    """

    def __init__(self, prior_preset: str = "default", priors: dict[str, float] | None = None,
                 correlations: Sequence[Sequence] | None = None):
        if prior_preset not in PRIOR_PRESETS:
            raise ValueError(f"prior_preset: unknown preset {prior_preset!r}; choose one of {sorted(PRIOR_PRESETS)}")
        rates = dict(PRIOR_PRESETS[prior_preset])
        if priors is not None:
            if not isinstance(priors, dict):
                raise ValueError(f"priors: expected a mapping attribute -> rate, got {type(priors).__name__}")
            resolve_attributes(list(priors), option="priors")
            for name, value in priors.items():
                if name in UNDRAWN_ATTRIBUTES:
                    raise ValueError(f"priors: {name!r} is not drawn by SynthFaces (undrawn: {UNDRAWN_ATTRIBUTES})")
                rates[name] = _prob(value, "priors", name)
        for group in (HAIR_COLOURS, HAIR_TEXTURES):
            if sum(rates[a] for a in group) > 1 + 1e-9:
                raise ValueError(f"priors: {', '.join(group)} are mutually exclusive, their rates must sum to <= 1 "
                                 f"(got {sum(rates[a] for a in group):.3f})")
        if rates["Goatee"] > 1 - rates["No_Beard"] + 1e-9:
            raise ValueError("priors: a goatee is a beard, so the Goatee rate must be <= 1 - No_Beard rate "
                             f"(got Goatee={rates['Goatee']}, No_Beard={rates['No_Beard']})")
        self.rates = rates
        self.correlation_matrix = self._correlation_matrix(DEFAULT_CORRELATIONS if correlations is None
                                                           else correlations)
        names = list(DRAWN_ATTRIBUTES)
        self.ident_idx = np.array([names.index(a) for a in IDENTITY_ATTRIBUTES])
        self.image_idx = np.array([i for i, a in enumerate(names) if a not in IDENTITY_ATTRIBUTES])
        s = self.correlation_matrix
        s_ii = s[np.ix_(self.ident_idx, self.ident_idx)]
        s_ri = s[np.ix_(self.image_idx, self.ident_idx)]
        s_rr = s[np.ix_(self.image_idx, self.image_idx)]
        self.chol_ident = np.linalg.cholesky(s_ii)
        self.cond_mean = s_ri @ np.linalg.inv(s_ii)
        cond_cov = s_rr - self.cond_mean @ s_ri.T
        self.chol_image = np.linalg.cholesky((cond_cov + cond_cov.T) / 2 + 1e-12 * np.eye(len(self.image_idx)))
        # Rates used against the latent uniforms (conditional rates for exclusive groups).
        q = dict(rates)
        for group in (HAIR_COLOURS, HAIR_TEXTURES):
            left = 1.0
            for a in group:
                q[a] = min(1.0, rates[a] / left) if left > 1e-12 else 0.0
                left -= rates[a]
        g = rates["Goatee"]
        q["No_Beard"] = 1.0 - ((1.0 - rates["No_Beard"] - g) / (1.0 - g) if g < 1 else 0.0)
        self.cut = np.array([1.0 - q[a] for a in names])  # positive when Phi(z) > cut

    @staticmethod
    def _correlation_matrix(correlations: Sequence[Sequence]) -> np.ndarray:
        names = list(DRAWN_ATTRIBUTES)
        sigma = np.eye(len(names))
        if isinstance(correlations, (str, bytes)) or not isinstance(correlations, Sequence):
            raise ValueError("correlations: expected a list of (attribute, attribute, rho) triples")
        for entry in correlations:
            if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != 3:
                raise ValueError(f"correlations: each entry must be (attribute, attribute, rho), got {entry!r}")
            a, b, rho = entry
            resolve_attributes([a, b] if a != b else [a], option="correlations")
            if a == b:
                raise ValueError(f"correlations: an attribute cannot be correlated with itself ({a!r})")
            for n in (a, b):
                if n in UNDRAWN_ATTRIBUTES:
                    raise ValueError(f"correlations: {n!r} is not drawn by SynthFaces")
            if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not -1.0 < float(rho) < 1.0:
                raise ValueError(f"correlations: rho for ({a}, {b}) must be in (-1, 1), got {rho!r}")
            i, j = names.index(a), names.index(b)
            sigma[i, j] = sigma[j, i] = float(rho)
        w, v = np.linalg.eigh(sigma)
        if w.min() < 1e-3:
            warnings.warn("correlations: the requested correlation matrix is not positive definite; "
                          "using the nearest valid one (eigenvalues clipped)", stacklevel=3)
            sigma = (v * np.clip(w, 1e-3, None)) @ v.T
            dinv = 1 / np.sqrt(np.diag(sigma))
            sigma = sigma * dinv[:, None] * dinv[None, :]
        return sigma


@dataclass
class Identity:
    """Traits shared by all images of one identity (face coordinates in units of d)."""
    latent: np.ndarray
    male: bool
    age_group: int
    skin_tone: int
    skin: np.ndarray
    hair: np.ndarray
    iris: tuple
    long_hair: bool
    eye_x: float
    eye_w: float
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    brow_y: float
    face_w: float
    chin_y: float
    jaw_n: float
    ear_y: float


_SKIN = np.array([[233, 196, 170], [208, 158, 122], [160, 112, 78], [100, 66, 46]], dtype=float)
_PALE = np.array([247, 228, 218], dtype=float)
_HAIR = {"Gray_Hair": (178, 178, 182), "Blond_Hair": (222, 190, 118), "Black_Hair": (28, 24, 24),
         "Brown_Hair": (98, 62, 36), None: (150, 66, 34)}  # None: auburn, none of CelebA's four colours


def _seed_seq(seed: int, split: str, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, SPLITS.index(split), *key])


def make_identity(model: LabelModel, seed: int, split: str, identity: int) -> Identity:
    """Identity traits; the latent draw comes first so labels never depend on rendering draws."""
    rng = np.random.default_rng(_seed_seq(seed, split, identity, 0xFACE))
    latent = model.chol_ident @ rng.standard_normal(len(model.ident_idx))
    names = list(DRAWN_ATTRIBUTES)
    lat = dict(zip((names[i] for i in model.ident_idx), latent))
    pos = {a: bool(ndtr(lat[a]) > model.cut[names.index(a)]) for a in lat}
    young, male = pos["Young"], pos["Male"]
    age_group = int(rng.integers(0, 2)) if young else 2 + int(rng.random() < 0.4)
    skin_tone = 0 if pos["Pale_Skin"] else int(rng.integers(0, NUM_SKIN_TONES))
    skin = (_PALE if pos["Pale_Skin"] else _SKIN[skin_tone]) + rng.normal(0, 6, 3)
    hair = np.array(_HAIR[_exclusive(pos, HAIR_COLOURS)]) + rng.normal(0, 8, 3)
    j = rng.uniform(-1, 1, 12)
    chubby, oval = pos["Chubby"], pos["Oval_Face"]
    return Identity(
        latent=latent, male=male, age_group=age_group, skin_tone=skin_tone, skin=np.clip(skin, 0, 255),
        hair=np.clip(hair, 0, 255),
        iris=tuple(int(c) for c in [(70, 45, 25), (40, 90, 140), (60, 110, 60), (30, 25, 20)][rng.integers(0, 4)]),
        long_hair=bool(rng.random() < (0.15 if male else 0.85)),
        eye_x=0.5 + 0.04 * j[0], eye_w=0.17 + 0.015 * j[1], nose_y=0.55 + 0.04 * j[2], nose_w=0.13 + 0.015 * j[3],
        mouth_y=1.0 + 0.05 * j[4], mouth_w=0.4 + 0.04 * j[5], brow_y=-0.3 + 0.03 * j[6],
        face_w=(1.02 if male else 0.96) + 0.04 * j[7] + (0.12 if chubby else 0) - (0.06 if oval else 0),
        chin_y=1.62 + 0.05 * j[8] + (0.1 if oval else 0), jaw_n=(3.0 if male else 2.3) + 0.2 * j[9]
        + (0.4 if chubby else 0) - (0.3 if oval else 0), ear_y=0.25 + 0.04 * j[10],
    )


def _exclusive(pos: dict, group: Sequence[str]) -> str | None:
    return next((a for a in group if pos[a]), None)


@dataclass
class FaceLabels:
    """Everything `sample_labels` decides for one image (no rendering)."""
    attributes: np.ndarray  # (40,) float32 0/1
    attribute_mask: np.ndarray  # (40,) bool
    identity: int
    gender: int
    age_group: int
    skin_tone: int
    grayscale: int
    full_beard: bool  # No_Beard is 0 because of a full beard (not only a goatee)


def _labels(model: LabelModel, ident: Identity, ident_id: int, rng: np.random.Generator,
            grayscale_rate: float) -> FaceLabels:
    names = list(DRAWN_ATTRIBUTES)
    z = np.empty(len(names))
    z[model.ident_idx] = ident.latent
    z[model.image_idx] = model.cond_mean @ ident.latent + model.chol_image @ rng.standard_normal(len(model.image_idx))
    raw = dict(zip(names, ndtr(z) > model.cut))
    pos = {a: bool(v) for a, v in raw.items()}
    colour, texture = _exclusive(raw, HAIR_COLOURS), _exclusive(raw, HAIR_TEXTURES)
    for a in HAIR_COLOURS:
        pos[a] = a == colour
    for a in HAIR_TEXTURES:
        pos[a] = a == texture
    full_beard = not raw["No_Beard"]
    pos["No_Beard"] = not (full_beard or raw["Goatee"])
    if pos["Bald"]:
        for a in ("Bangs", "Straight_Hair", "Wavy_Hair", "Receding_Hairline"):
            pos[a] = False
    attributes = np.zeros(NUM_ATTRIBUTES, dtype=np.float32)
    mask = np.zeros(NUM_ATTRIBUTES, dtype=bool)
    for a in names:
        attributes[ATTRIBUTE_INDEX[a]] = float(pos[a])
        mask[ATTRIBUTE_INDEX[a]] = True
    hidden = []
    if pos["Wearing_Hat"]:
        hidden += ["Bald", "Receding_Hairline"]
    if pos["Bangs"]:
        hidden.append("Receding_Hairline")
    if full_beard:
        hidden += ["5_o_Clock_Shadow", "Double_Chin"]
    for a in hidden:
        mask[ATTRIBUTE_INDEX[a]] = False
    gray = int(rng.random() < grayscale_rate)
    return FaceLabels(attributes, mask, ident_id, int(pos["Male"]), ident.age_group, ident.skin_tone, gray,
                      full_beard)


@dataclass
class SynthFace:
    """One rendered face: uint8 image (H, W, 3), labels, landmarks (5, 2) and optional masks (C, H, W)."""
    image: np.ndarray
    labels: FaceLabels
    landmarks: np.ndarray
    concept_masks: np.ndarray | None


# ----------------------------------------------------------------------------------------------------------
# Drawing
# Atoms: one id per drawn element in the painter's id buffer; concepts are unions of atoms.
_ATOMS = ("BG", "CLOTHES", "HAIR_BACK", "NECK", "EAR", "SKIN", "WRINKLE", "CHEEKBONE", "STUBBLE", "ROSY",
          "DOUBLE_CHIN", "BAGS", "EYE_SHADOW", "EYE", "BROW", "NOSE", "BEARD", "LIPS", "LIPSTICK", "MOUTH_OPEN",
          "TEETH", "SMILE_LINE", "MUSTACHE", "GOATEE", "SIDEBURN", "HAIR_FRONT", "BANGS", "HAT", "FRAME",
          "EARRING", "NECKTIE", "NECKLACE")
A = {name: i for i, name in enumerate(_ATOMS)}
_MOUTH = ("LIPS", "LIPSTICK", "MOUTH_OPEN", "TEETH")
_CONCEPT_ATOMS: dict[str, tuple[str, ...]] = {
    "background": ("BG",), "skin": ("NECK", "EAR", "SKIN", "WRINKLE", "CHEEKBONE", "STUBBLE", "ROSY",
                                    "DOUBLE_CHIN", "BAGS", "EYE_SHADOW", "SMILE_LINE"),
    "ears": ("EAR",), "neck": ("NECK",), "eyes": ("EYE",), "brows": ("BROW",), "nose": ("NOSE",),
    "mouth": _MOUTH, "hair": ("HAIR_BACK", "HAIR_FRONT", "BANGS", "SIDEBURN"), "clothes": ("CLOTHES",),
    "wrinkles": ("WRINKLE",), "eyeglasses": ("FRAME",), "hat": ("HAT",), "mustache": ("MUSTACHE",),
    "goatee": ("GOATEE",), "beard": ("BEARD",), "stubble": ("STUBBLE",), "sideburns": ("SIDEBURN",),
    "bangs": ("BANGS",), "earrings": ("EARRING",), "necklace": ("NECKLACE",), "necktie": ("NECKTIE",),
    "lipstick": ("LIPSTICK",), "rosy_cheeks": ("ROSY",), "eye_shadow": ("EYE_SHADOW",), "eye_bags": ("BAGS",),
    "cheekbones": ("CHEEKBONE",), "double_chin": ("DOUBLE_CHIN",), "mouth_open": ("MOUTH_OPEN", "TEETH"),
    "smile": ("SMILE_LINE",),
}



def _concept_lut(smiling: bool) -> np.ndarray:
    lut = np.zeros(256, dtype=np.int64)
    for k, concept in enumerate(CONCEPTS):
        atoms = _CONCEPT_ATOMS[concept] + (_MOUTH if concept == "smile" and smiling else ())
        for atom in atoms:
            lut[A[atom]] |= 1 << k
    return lut


_CONCEPT_LUT, _SMILING_LUT = _concept_lut(False), _concept_lut(True)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24, a0: float = 0.0,
             a1: float = 2 * math.pi) -> np.ndarray:
    t = np.linspace(a0, a1, n, endpoint=(a1 - a0) < 2 * math.pi - 1e-9)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _superellipse(cx: float, cy: float, rx: float, ry_up: float, ry_down: float, n_up: float, n_down: float,
                  t: np.ndarray) -> np.ndarray:
    """Head-like contour: y down; t in [0, 2pi), t in (pi, 2pi) is the upper half."""
    c, s = np.cos(t), np.sin(t)
    n = np.where(s < 0, n_up, n_down)
    ry = np.where(s < 0, ry_up, ry_down)
    x = rx * np.sign(c) * np.abs(c) ** (2 / n)
    y = ry * np.sign(s) * np.abs(s) ** (2 / n)
    return np.stack([cx + x, cy + y], axis=1)


def _mirror(points: np.ndarray) -> np.ndarray:
    return points * np.array([-1.0, 1.0])


def _rgba(colour: Sequence[float], alpha: int = 255) -> tuple[int, int, int, int]:
    r, g, b = (min(255, max(0, int(c))) for c in colour[:3])
    return (r, g, b, alpha)


def _shade(colour: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=float) * factor, 0, 255)


class _Canvas:
    """Polygons in face coordinates -> a supersampled RGB image and, optionally, an atom-id buffer.

    The id buffer is drawn at output resolution with the same shapes, so a pixel belongs to a concept
    when its centre lies inside the concept's visible shape (painter's order decides occlusion).
    """

    def __init__(self, background: Image.Image, pose: np.ndarray, px_per_unit: float, with_ids: bool):
        self.img = background
        self.draw = ImageDraw.Draw(self.img, "RGBA")
        ss = SUPERSAMPLE
        # PIL fills pixel i over [i, i+1), so output pixel centre u (landmark convention) is PIL coordinate
        # u + 0.5 at output resolution and ss * (u + 0.5) on the supersampled canvas.
        self.m = pose * ss
        self.m[:, 2] += ss / 2
        self.m1 = pose.copy()
        self.m1[:, 2] += 0.5
        self.unit = px_per_unit * ss  # supersampled pixels per face unit
        side = background.size[0] // ss
        self.ids = Image.new("L", (side, side), A["BG"]) if with_ids else None
        self.idraw = ImageDraw.Draw(self.ids) if with_ids else None
        self.lens = None

    def xy(self, pts: np.ndarray, m: np.ndarray | None = None) -> list[float]:
        m = self.m if m is None else m
        return (pts @ m[:, :2].T + m[:, 2]).ravel().tolist()

    def poly(self, pts: np.ndarray, colour: tuple, atom: str | None) -> None:
        self.draw.polygon(self.xy(pts), fill=colour)
        if atom is not None and self.idraw is not None:
            self.idraw.polygon(self.xy(pts, self.m1), fill=A[atom])

    def line(self, pts: np.ndarray, colour: tuple, width: float, atom: str | None, min_px: float = 1.0) -> None:
        """Polyline `width` face units wide, at least `min_px` output pixels."""
        w = max(width * self.unit, min_px * SUPERSAMPLE, 1)
        self.draw.line(self.xy(pts), fill=colour, width=int(round(w)), joint="curve")
        if atom is not None and self.idraw is not None:
            self.idraw.line(self.xy(pts, self.m1), fill=A[atom], width=max(1, int(round(w / SUPERSAMPLE))),
                            joint="curve")

    def dots(self, pts: np.ndarray, colour: tuple, radius_px: float) -> None:
        p = (pts @ self.m[:, :2].T + self.m[:, 2])
        for x, y in p.tolist():
            self.draw.ellipse((x - radius_px, y - radius_px, x + radius_px, y + radius_px), fill=colour)

    def lens_poly(self, pts: np.ndarray) -> None:
        if self.ids is None:
            return
        if self.lens is None:
            self.lens = Image.new("L", self.ids.size, 0)
        ImageDraw.Draw(self.lens).polygon(self.xy(pts, self.m1), fill=1)


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    """Random colour, linear gradient in a random direction, and low-frequency texture."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ang = rng.uniform(0, 2 * math.pi)
    low = 32  # smooth content: built small, then upsampled
    ramp = np.linspace(-0.5, 0.5, low, dtype=np.float32)
    t = np.cos(ang) * ramp[None, :] + np.sin(ang) * ramp[:, None] + 0.5
    strength = rng.uniform(0, 1)
    img = c0[None, None, :] + (strength * (c1 - c0))[None, None, :] * t[:, :, None]
    cells = int(rng.integers(3, 9))
    amp = rng.uniform(0, 45)
    tex = Image.fromarray(rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)).resize((low, low), Image.BICUBIC)
    img += (np.asarray(tex, dtype=np.float32) - 127.5) * (amp / 127.5)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)


class Renderer:
    """Draws one face from its labels and identity; all randomness comes from the image's own stream."""

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f"size: must be an integer in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size!r}")
        self.size = size
        canon = canonical_landmarks(size).double().numpy()
        self.eye_centre = (canon[0] + canon[1]) / 2
        self.d = float((canon[3] + canon[4])[1] / 2 - self.eye_centre[1])

    def pose(self, rng: np.random.Generator) -> np.ndarray:
        """Face coords -> output pixel coords (pixel centres at integers): rotation, scale, shift jitter."""
        rot = math.radians(rng.uniform(-8, 8))
        scale = self.d * (1 + rng.uniform(-0.08, 0.08))
        shift = rng.uniform(-0.04, 0.04, 2) * self.size
        c, s = math.cos(rot) * scale, math.sin(rot) * scale
        return np.array([[c, -s, self.eye_centre[0] + shift[0]], [s, c, self.eye_centre[1] + shift[1]]])

    def render(self, labels: FaceLabels, ident: Identity, rng: np.random.Generator,
               return_masks: bool) -> SynthFace:
        has = {a: bool(labels.attributes[ATTRIBUTE_INDEX[a]]) for a in DRAWN_ATTRIBUTES}
        full_beard = labels.full_beard
        pose = self.pose(rng)
        cv = _Canvas(_background(rng, self.size * SUPERSAMPLE), pose, self.d, return_masks)
        landmarks = self._face(cv, has, full_beard, ident, rng)
        img = cv.img.resize((self.size, self.size), Image.LANCZOS)
        if has["Blurry"]:
            img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.0, 1.6) * self.size / 64))
        x = np.asarray(img, dtype=np.float32)
        # lighting gradient, global exposure, sensor noise
        ang = rng.uniform(0, 2 * math.pi)
        ramp = np.linspace(-1, 1, self.size, dtype=np.float32)
        light = 1 + rng.uniform(0, 0.3) * (math.cos(ang) * ramp[None, :] + math.sin(ang) * ramp[:, None])
        x *= (light * rng.uniform(0.85, 1.1))[:, :, None]
        if labels.grayscale:
            x = np.repeat((x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None], 3, axis=2)
        sigma = rng.uniform(0, 6)
        noise = rng.standard_normal((self.size, self.size, 1 if labels.grayscale else 3), dtype=np.float32)
        x += sigma * noise
        image = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        masks = self._masks(cv, has) if return_masks else None
        lm_px = landmarks @ pose[:, :2].T + pose[:, 2]
        return SynthFace(image, labels, lm_px.astype(np.float32), masks)

    def _masks(self, cv: _Canvas, has: dict[str, bool]) -> np.ndarray:
        """(C, H, W) bool: atom ids -> concept bit sets through one lookup table."""
        lut = _SMILING_LUT if has["Smiling"] else _CONCEPT_LUT
        bits = lut[np.asarray(cv.ids)]
        if cv.lens is not None:
            bits |= np.asarray(cv.lens, dtype=np.int64) << CONCEPTS.index("eyeglasses")
        return ((bits[None] >> np.arange(len(CONCEPTS), dtype=np.int64)[:, None, None]) & 1).astype(bool)

    # The face, back to front. Returns the 5 landmarks in face coordinates.
    def _face(self, cv: _Canvas, has: dict[str, bool], full_beard: bool, idt: Identity,
              rng: np.random.Generator) -> np.ndarray:
        j = rng.uniform(-1, 1, 16)
        skin = _shade(idt.skin, 1 + 0.04 * j[0])
        hair = _shade(idt.hair, 1 + 0.05 * j[1])
        ex, ew = idt.eye_x + 0.012 * j[2], idt.eye_w * (1 + 0.04 * j[3])
        eh = (0.055 if has["Narrow_Eyes"] else 0.095) * (1 + 0.06 * j[4])
        ny = idt.nose_y + 0.012 * j[5]
        nw = idt.nose_w * (1.45 if has["Big_Nose"] else 1.0)
        my, mw = idt.mouth_y + 0.015 * j[6], idt.mouth_w * (1 + 0.03 * j[7])
        fw, chin = idt.face_w * (1 + 0.015 * j[8]), idt.chin_y + 0.02 * j[9]
        fcy = 0.3
        top = -1.5
        bald, long_hair = has["Bald"], idt.long_hair and not has["Bald"]
        texture = "wavy" if has["Wavy_Hair"] else "straight" if has["Straight_Hair"] else "curly"
        smile, open_ = has["Smiling"], has["Mouth_Slightly_Open"]

        # clothes and back hair
        clothes = rng.uniform(20, 235, 3)
        cloth_pts = np.array([[-3.0, 3.4], [-2.8, 2.6], [-1.3, 2.15], [-0.55, 2.05], [0.0, 2.4], [0.55, 2.05],
                              [1.3, 2.15], [2.8, 2.6], [3.0, 3.4]])
        if long_hair:
            t = np.linspace(math.pi, 2 * math.pi, 25)
            crown = _superellipse(0, fcy, fw * 1.16, fcy - top + 0.14, 1, 2.2, 2.2, t)
            wav = 0.07 if texture == "wavy" else 0.02 if texture == "curly" else 0.0
            ys = np.linspace(fcy, 2.3 + 0.1 * j[10], 10)
            side = np.stack([fw * 1.16 + 0.25 * (ys - fcy) / 2 + wav * np.sin(ys * 9 + j[11] * 3), ys], axis=1)
            back = np.concatenate([_mirror(side)[::-1][:-1], crown, side[1:]])
            back = np.concatenate([back, [[fw * 0.6, 2.3], [-fw * 0.6, 2.3]]])
            cv.poly(back, _rgba(_shade(hair, 0.85)), "HAIR_BACK")
        neck = np.array([[-0.42 * fw, 1.0], [0.42 * fw, 1.0], [0.5 * fw, 2.2], [0.0, 2.5], [-0.5 * fw, 2.2]])
        cv.poly(neck, _rgba(_shade(skin, 0.9)), "NECK")
        cv.poly(cloth_pts, _rgba(clothes), "CLOTHES")
        if has["Wearing_Necktie"]:
            tie = rng.uniform(20, 235, 3)
            cv.poly(np.array([[-0.28, 2.1], [0.0, 2.4], [0.28, 2.1], [0.0, 2.05]]) + [0, 0.02],
                    _rgba(_shade(clothes, 0.6) + 100), None)
            cv.poly(np.array([[-0.1, 2.2], [0.1, 2.2], [0.08, 2.42], [-0.08, 2.42]]), _rgba(tie), "NECKTIE")
            cv.poly(np.array([[-0.08, 2.42], [0.08, 2.42], [0.2, 3.15], [0.0, 3.35], [-0.2, 3.15]]),
                    _rgba(tie), "NECKTIE")
        # ears, head
        for sgn in (-1, 1):
            ear = _ellipse(sgn * fw * 0.97, idt.ear_y, 0.13, 0.28, 16)
            cv.poly(ear, _rgba(_shade(skin, 0.93)), "EAR")
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        head = _superellipse(0, fcy, fw, fcy - top, chin - fcy, 2.2, idt.jaw_n, t)
        if has["Double_Chin"]:
            dc = np.concatenate([_ellipse(0, chin - 0.02, 0.48, 0.17, 13, 0, math.pi)])
            cv.poly(dc, _rgba(_shade(skin, 0.94)), "DOUBLE_CHIN")
            cv.line(_ellipse(0, chin - 0.02, 0.42, 0.13, 11, 0.15, math.pi - 0.15), _rgba(_shade(skin, 0.72)),
                    0.025, "DOUBLE_CHIN")
        cv.poly(head, _rgba(skin), "SKIN")
        # skin-level details
        dark = _rgba(_shade(skin, 0.6), 150)
        if idt.age_group >= 2:
            k = 2 if idt.age_group == 2 else 4
            for i in range(k):
                y = -0.62 - 0.11 * i
                cv.line(np.array([[-0.45, y], [0.0, y - 0.03], [0.45, y]]), dark, 0.02, "WRINKLE")
            for sgn in (-1, 1):
                cv.line(np.array([[sgn * (mw + 0.12), ny - 0.05], [sgn * (mw + 0.1), my + 0.05]]), dark, 0.02,
                        "WRINKLE")
                for i in range(k // 2 + 1):
                    cv.line(np.array([[sgn * (ex + ew + 0.04), -0.03 + 0.06 * i],
                                      [sgn * (ex + ew + 0.16), -0.06 + 0.1 * i]]), dark, 0.018, "WRINKLE")
        if has["High_Cheekbones"]:
            for sgn in (-1, 1):
                cv.poly(_ellipse(sgn * 0.62, 0.3, 0.22, 0.07, 16), _rgba(_shade(skin, 1.18), 200), "CHEEKBONE")
                cv.line(np.array([[sgn * 0.85, 0.45], [sgn * 0.55, 0.52]]), _rgba(_shade(skin, 0.78), 160), 0.035,
                        "CHEEKBONE")
        beard_outer = _superellipse(0, fcy, fw * 1.03, fcy - top, chin - fcy + 0.06, 2.2, idt.jaw_n,
                                    np.linspace(0.05, math.pi - 0.05, 22))[::-1]
        beard_inner = np.array([[fw * 0.92, 0.5], [0.62, 0.8], [mw + 0.06, my + 0.04], [0.3, my + 0.2],
                                [0.0, my + 0.24]])
        beard_inner = np.concatenate([beard_inner, _mirror(beard_inner)[::-1][1:]])
        beard_poly = np.concatenate([beard_outer, beard_inner])
        facial_hair = _shade(hair, 0.8)
        if has["5_o_Clock_Shadow"] and not full_beard:
            cv.poly(beard_poly, _rgba(_shade(skin, 0.8), 140), "STUBBLE")
            u = rng.uniform(-1, 1, (160, 2)) * [fw, (chin - 0.45) / 2] + [0, (chin + 0.45) / 2]
            inside = (np.abs(u[:, 0] / fw) ** idt.jaw_n + np.abs((u[:, 1] - fcy) / (chin - fcy)) ** idt.jaw_n < 0.97)
            order = np.argsort(beard_inner[:, 0])
            inside &= u[:, 1] > np.interp(u[:, 0], beard_inner[order, 0], beard_inner[order, 1]) + 0.02
            cv.dots(u[inside], _rgba(_shade(facial_hair, 0.7), 200), max(0.8, 0.012 * cv.unit))
        if has["Rosy_Cheeks"]:
            for sgn in (-1, 1):
                cv.poly(_ellipse(sgn * 0.58, 0.5, 0.17, 0.12, 16), (225, 70, 90, 120), "ROSY")
        if has["Bags_Under_Eyes"]:
            for sgn in (-1, 1):
                cv.poly(_ellipse(sgn * ex, 0.8 * eh + 0.02, ew * 0.95, 0.09, 14, 0, math.pi), _rgba(_shade(skin, 0.7),
                                                                                              170), "BAGS")
        if has["Heavy_Makeup"]:
            shadow = [(70, 90, 170), (120, 60, 140), (110, 70, 50), (200, 90, 130)][int(rng.integers(0, 4))]
            for sgn in (-1, 1):
                cv.poly(_ellipse(sgn * ex, -0.2 * eh, ew * 1.35, eh + 0.14, 18, math.pi, 2 * math.pi),
                        _rgba(shadow, 190), "EYE_SHADOW")
        # eyes and brows
        for sgn in (-1, 1):
            t_up = np.linspace(math.pi, 2 * math.pi, 10)
            t_lo = np.linspace(0, math.pi, 10)[1:-1]
            eye = np.concatenate([np.stack([-ew * np.cos(t_up), eh * np.sin(t_up)], 1),
                                  np.stack([ew * np.cos(t_lo), 0.8 * eh * np.sin(t_lo)], 1)]) + [sgn * ex, 0]
            cv.poly(eye, (238, 236, 230, 255), "EYE")
            if has["Heavy_Makeup"]:  # eyeliner belongs to the make-up concept
                cv.line(eye[:10], (25, 15, 30, 255), 0.045, "EYE_SHADOW", min_px=1.0)
            else:
                cv.line(eye[:10], _rgba(_shade(skin, 0.35) * 0.5), 0.022, "EYE", min_px=0.5)
            r = min(eh * 0.95, 0.075)  # iris and pupil last: the eye landmark is always visible
            cv.poly(_ellipse(sgn * ex, 0, r, r, 14), _rgba(idt.iris), "EYE")
            cv.poly(_ellipse(sgn * ex, 0, r * 0.45, r * 0.45, 10), (10, 10, 10, 255), "EYE")
            thick = (0.12 if has["Bushy_Eyebrows"] else 0.05) + (0.015 if idt.male else 0)
            arch = 0.11 if has["Arched_Eyebrows"] else 0.035
            xs = np.linspace(0.18, 0.8, 9)
            peak = 0.6 if has["Arched_Eyebrows"] else 0.5
            u = (xs - 0.18) / 0.62
            yc = idt.brow_y - arch * np.where(u < peak, np.sin(u / peak * math.pi / 2),
                                               np.cos((u - peak) / (1 - peak) * math.pi / 2))
            taper = thick * (1 - 0.5 * u)
            brow = np.concatenate([np.stack([xs, yc - taper / 2], 1), np.stack([xs, yc + taper / 2], 1)[::-1]])
            brow[:, 0] *= sgn
            cv.poly(brow, _rgba(_shade(hair, 0.75) if not has["Gray_Hair"] else hair), "BROW")
        # nose
        tip = 0.13 if has["Pointy_Nose"] else 0.06
        wing = nw * (0.8 if has["Pointy_Nose"] else 1.0)
        nose = np.array([[0.06, 0.12], [wing * 0.75, ny - 0.1], [wing, ny + 0.02], [wing * 0.55, ny + 0.07],
                         [0.0, ny + tip], [-wing * 0.55, ny + 0.07], [-wing, ny + 0.02], [-wing * 0.75, ny - 0.1],
                         [-0.06, 0.12]])
        cv.poly(nose, _rgba(_shade(skin, 0.88)), "NOSE")
        cv.line(nose[1:4], _rgba(_shade(skin, 0.6)), 0.02, "NOSE", min_px=0.5)
        cv.line(nose[5:8], _rgba(_shade(skin, 0.6)), 0.02, "NOSE", min_px=0.5)
        for sgn in (-1, 1):
            cv.poly(_ellipse(sgn * wing * 0.45, ny + 0.045, wing * 0.22, 0.025, 10), _rgba(_shade(skin, 0.35)),
                    "NOSE")
        if full_beard:
            cv.poly(beard_poly, _rgba(facial_hair), "BEARD")
        # mouth: centre line c(x); corners are the landmarks
        mw_eff = mw * (1.1 if smile else 1.0)
        corner_y = my - (0.06 if smile else 0.0)
        xs = np.linspace(-mw_eff, mw_eff, 13)
        w = np.sqrt(np.clip(1 - (xs / mw_eff) ** 2, 0, 1))
        centre = corner_y + (0.09 if smile else 0.0) * (1 - (xs / mw_eff) ** 2)
        lt_u, lt_l = (0.11, 0.15) if has["Big_Lips"] else (0.07, 0.1)
        gap = (0.14 if open_ else 0.0) * w
        cupid = 1 - 0.35 * np.exp(-(xs / (0.12 * mw_eff)) ** 2)
        up_top = centre - gap / 2 - lt_u * w * cupid
        up_bot = centre - gap / 2
        lo_top = centre + gap / 2
        lo_bot = centre + gap / 2 + lt_l * w
        lip_colour = _rgba(0.55 * skin + 0.45 * np.array([175, 75, 80]))
        lip_atom = "LIPS"
        if has["Wearing_Lipstick"]:
            lip_colour = _rgba([(200, 20, 40), (215, 60, 120), (130, 20, 60), (230, 90, 90)][int(rng.integers(0, 4))])
            lip_atom = "LIPSTICK"
        cv.poly(np.concatenate([np.stack([xs, up_top], 1), np.stack([xs, up_bot], 1)[::-1]]), lip_colour, lip_atom)
        cv.poly(np.concatenate([np.stack([xs, lo_top], 1), np.stack([xs, lo_bot], 1)[::-1]]), lip_colour, lip_atom)
        if open_:  # after the lips, so the thin opening is never hidden under their edges
            cv.poly(np.concatenate([np.stack([xs, up_bot], 1), np.stack([xs, lo_top], 1)[::-1]]), (60, 20, 25, 255),
                    "MOUTH_OPEN")
            teeth_bot = up_bot + gap * 0.45
            cv.poly(np.concatenate([np.stack([xs[2:-2], up_bot[2:-2]], 1),
                                    np.stack([xs[2:-2], teeth_bot[2:-2]], 1)[::-1]]), (240, 238, 225, 255), "TEETH")
        # the lower lip's outer contour, stroked at least one pixel wide so thin lips survive at 64 px
        cv.line(np.stack([xs, lo_bot - 0.3 * lt_l * w], 1)[1:-1], lip_colour, 0.6 * lt_l, lip_atom, min_px=1.0)
        if not open_:
            cv.line(np.stack([xs, centre], 1), _rgba(_shade(lip_colour[:3], 0.55)), 0.015, lip_atom, min_px=0.5)
        if smile:
            for sgn in (-1, 1):
                crease = np.array([[sgn * (mw_eff + 0.02), ny + 0.08], [sgn * (mw_eff + 0.1), corner_y - 0.12],
                                   [sgn * (mw_eff + 0.08), corner_y + 0.06]])
                cv.line(crease, _rgba(_shade(skin, 0.65)), 0.03, "SMILE_LINE")
        if has["Mustache"]:
            bottom = np.stack([xs, up_top - 0.015], 1)[1:-1]
            top_ = np.stack([xs * 1.05, up_top - 0.12 - 0.04 * w], 1)[1:-1]
            cv.poly(np.concatenate([bottom, top_[::-1]]), _rgba(facial_hair), "MUSTACHE")
        if has["Goatee"]:
            g_top = lo_bot.max() + 0.02
            goat = np.array([[-0.24, g_top], [0.24, g_top], [0.2, chin - 0.08], [0.0, chin + 0.06],
                             [-0.2, chin - 0.08]])
            cv.poly(goat, _rgba(_shade(facial_hair, 0.85)), "GOATEE")
        # head hair
        t_cap = np.linspace(math.pi - 0.05, 2 * math.pi + 0.05, 30)
        wav_amp = 0.05 if texture == "wavy" else 0.025 if texture == "curly" else 0.0
        freq = 7 if texture == "wavy" else 18
        if not bald:
            outer = _superellipse(0, fcy, fw * 1.08, fcy - top + 0.1, 1, 2.2, 2.2, t_cap)
            outer += (wav_amp * np.abs(np.sin(t_cap * freq + j[12])))[:, None] * (outer - [0, fcy]) / 1.5
            if has["Receding_Hairline"]:
                line_pts = [[fw * 0.98, 0.2], [fw * 0.9, -0.45], [0.45, -1.2], [0.0, -1.02]]
            else:
                line_pts = [[fw * 0.98, 0.2], [fw * 0.88, -0.5], [0.6, -0.85], [0.0, -0.92]]
            hl = np.array(line_pts)
            hairline = np.concatenate([hl, _mirror(hl)[::-1][1:]])
            cap = np.concatenate([outer, hairline])
            cv.poly(cap, _rgba(hair), "HAIR_FRONT")
            if texture == "straight":
                for xx in np.linspace(-0.6, 0.6, 5):
                    cv.line(np.array([[xx * 0.3, top + 0.05], [xx, -0.95]]), _rgba(_shade(hair, 0.7)), 0.02,
                            "HAIR_FRONT", min_px=0.5)
            elif texture == "wavy":
                ys = np.linspace(top + 0.1, -0.9, 8)
                for xx in (-0.5, 0.0, 0.5):
                    cv.line(np.stack([xx + 0.06 * np.sin(ys * 12), ys], 1), _rgba(_shade(hair, 0.7)), 0.02,
                            "HAIR_FRONT", min_px=0.5)
        else:
            cv.poly(_ellipse(-0.25, -1.15, 0.3, 0.12, 14), _rgba(_shade(skin, 1.12), 160), "SKIN")
            for sgn in (-1, 1):
                fringe = np.array([[fw * 1.04, -0.25], [fw * 1.06, 0.3], [fw * 0.9, 0.3], [fw * 0.92, -0.2]])
                fringe[:, 0] *= sgn
                cv.poly(fringe, _rgba(hair), "HAIR_FRONT")
        if has["Sideburns"]:
            for sgn in (-1, 1):
                sb = np.array([[fw * 1.0, 0.15], [fw * 0.99, 0.78], [fw * 0.84, 0.72], [fw * 0.84, 0.15]])
                sb[:, 0] *= sgn
                cv.poly(sb, _rgba(_shade(hair, 0.9)), "SIDEBURN")
        if has["Bangs"]:
            xs_b = np.linspace(-0.72, 0.72, 13)
            zig = np.where(np.arange(13) % 2 == 0, -0.5, -0.6) if texture != "wavy" else \
                -0.55 + 0.05 * np.sin(xs_b * 14)
            fringe = np.concatenate([np.array([[-0.8, -0.75], [-0.4, -1.1], [0.4, -1.1], [0.8, -0.75]]),
                                     np.stack([xs_b, zig], 1)[::-1]])
            cv.poly(fringe, _rgba(_shade(hair, 0.95)), "BANGS")
        # accessories
        if has["Wearing_Hat"]:
            hat = rng.uniform(15, 240, 3)
            if rng.random() < 0.5:  # beanie
                t_hat = np.linspace(math.pi - 0.08, 2 * math.pi + 0.08, 24)
                dome = _superellipse(0, -0.72, fw * 1.14, 1.05, 0.1, 2.3, 2.3, t_hat)
                cv.poly(dome, _rgba(hat), "HAT")
                cv.poly(np.array([[-fw * 1.16, -0.92], [fw * 1.16, -0.92], [fw * 1.16, -0.7], [-fw * 1.16, -0.7]]),
                        _rgba(_shade(hat, 0.75)), "HAT")
            else:  # brimmed
                cv.poly(np.array([[-0.85, -0.85], [-0.8, -2.0], [0.0, -2.1], [0.8, -2.0], [0.85, -0.85]]),
                        _rgba(hat), "HAT")
                cv.poly(np.array([[-0.85, -1.1], [0.85, -1.1], [0.85, -0.9], [-0.85, -0.9]]),
                        _rgba(_shade(hat, 0.5)), "HAT")
                cv.poly(_ellipse(0, -0.85, 1.7, 0.2, 24), _rgba(_shade(hat, 0.85)), "HAT")
        if has["Eyeglasses"]:
            frame = _rgba([(15, 15, 15), (120, 60, 30), (160, 160, 170), (150, 20, 30)][int(rng.integers(0, 4))])
            rx, ry = ew + 0.08, max(eh, 0.07) + 0.13
            square = rng.random() < 0.5
            rims = []
            for sgn in (-1, 1):
                lens = _superellipse(sgn * ex, 0.01, rx, ry, ry, 4.0 if square else 2.0, 4.0 if square else 2.0,
                                     np.linspace(0, 2 * math.pi, 24, endpoint=False))
                cv.poly(lens, (190, 215, 235, 45), None)
                cv.lens_poly(lens)
                rims.append(lens)
            for lens in rims:
                cv.line(np.concatenate([lens, lens[:1]]), frame, 0.035, "FRAME")
            cv.line(np.array([[-ex + rx, -0.02], [0.0, -0.06], [ex - rx, -0.02]]), frame, 0.035, "FRAME")
            for sgn in (-1, 1):
                cv.line(np.array([[sgn * (ex + rx), -0.02], [sgn * fw * 0.98, -0.04]]), frame, 0.035, "FRAME")
        if has["Wearing_Earrings"]:
            metal = _rgba([(230, 190, 60), (210, 210, 220), (230, 80, 140)][int(rng.integers(0, 3))])
            hoop = rng.random() < 0.5
            for sgn in (-1, 1):
                cx, cy = sgn * fw * 0.97, idt.ear_y + 0.3
                if hoop:
                    cv.line(_ellipse(cx, cy + 0.08, 0.1, 0.1, 16, 0, 2 * math.pi - 0.3), metal, 0.04, "EARRING",
                            min_px=1.0)
                else:
                    r = max(0.07, 1.1 / self.d)
                    cv.poly(_ellipse(cx, cy, r, r, 12), metal, "EARRING")
                    cv.poly(_ellipse(cx, cy + 1.6 * r, r * 0.8, r * 1.1, 12), metal, "EARRING")
        if has["Wearing_Necklace"]:
            chain = _ellipse(0, 1.88, 0.5 * fw, 0.35, 15, 0.15, math.pi - 0.15)
            colour = _rgba([(230, 190, 60), (215, 215, 225), (245, 245, 240)][int(rng.integers(0, 3))])
            cv.line(chain, colour, 0.05, "NECKLACE", min_px=1.0)
            cv.poly(_ellipse(0, 2.27, 0.08, 0.1, 12), colour, "NECKLACE")
        return np.array([[-ex, 0.0], [ex, 0.0], [0.0, ny], [-mw_eff, corner_y], [mw_eff, corner_y]])


# ----------------------------------------------------------------------------------------------------------
# Data set, labels-only sampling, data module


def _check_count(value: int, option: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option}: must be an integer >= {minimum}, got {value!r}")
    return value


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
    return split


class SynthFaces(Dataset):
    """`num_samples` faces of one split; item i is a pure function of (seed, split, i).

    Identity of item i is i % num_identities; identity ids are offset by split so splits never share one.
    """

    def __init__(self, num_samples: int, split: str = "train", size: int = 64, num_identities: int = 500,
                 seed: int = 0, prior_preset: str = "default", priors: dict[str, float] | None = None,
                 correlations: Sequence[Sequence] | None = None, grayscale_rate: float = 0.0,
                 return_masks: bool = False):
        self.num_samples = _check_count(num_samples, "num_samples")
        self.split = _check_split(split)
        self.num_identities = _check_count(num_identities, "num_identities", 1)
        self.seed = _check_count(seed, "seed")
        self.grayscale_rate = _check_rate(grayscale_rate, "grayscale_rate")
        self.return_masks = bool(return_masks)
        self.renderer = Renderer(size)
        self.size = size
        self.model = LabelModel(prior_preset, priors, correlations)

    def __len__(self) -> int:
        return self.num_samples

    def _streams(self, index: int) -> tuple[Identity, int, np.random.Generator, np.random.Generator]:
        local = index % self.num_identities
        ident = make_identity(self.model, self.seed, self.split, local)
        label_ss, render_ss = _seed_seq(self.seed, self.split, index).spawn(2)
        global_id = SPLITS.index(self.split) * self.num_identities + local
        return ident, global_id, np.random.default_rng(label_ss), np.random.default_rng(render_ss)

    def labels(self, index: int) -> FaceLabels:
        ident, gid, label_rng, _ = self._streams(index)
        return _labels(self.model, ident, gid, label_rng, self.grayscale_rate)

    def render(self, index: int, return_masks: bool | None = None) -> SynthFace:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} SynthFaces ({self.split})")
        ident, gid, label_rng, render_rng = self._streams(index)
        labels = _labels(self.model, ident, gid, label_rng, self.grayscale_rate)
        masks = self.return_masks if return_masks is None else return_masks
        return self.renderer.render(labels, ident, render_rng, masks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return face_to_item(self.render(int(index)), int(index))


def face_to_item(face: SynthFace, index: int) -> dict[str, torch.Tensor]:
    """One sample in the batch contract of docs/ARCHITECTURE.md."""
    lab = face.labels
    item = {
        "image": torch.from_numpy(face.image).permute(2, 0, 1).float().div_(255),
        "attributes": torch.from_numpy(lab.attributes),
        "attribute_mask": torch.from_numpy(lab.attribute_mask),
        "landmarks": torch.from_numpy(face.landmarks),
        "identity": torch.tensor(lab.identity, dtype=torch.int64),
        "index": torch.tensor(index, dtype=torch.int64),
        "gender": torch.tensor(lab.gender, dtype=torch.int64),
        "age_group": torch.tensor(lab.age_group, dtype=torch.int64),
        "skin_tone": torch.tensor(lab.skin_tone, dtype=torch.int64),
        "grayscale": torch.tensor(lab.grayscale, dtype=torch.int64),
    }
    if face.concept_masks is not None:
        item["concept_masks"] = torch.from_numpy(face.concept_masks)
    return item


def sample_labels(count: int, *, seed: int = 0, split: str = "train", num_identities: int = 500,
                  prior_preset: str = "default", priors: dict[str, float] | None = None,
                  correlations: Sequence[Sequence] | None = None, grayscale_rate: float = 0.0,
                  start: int = 0) -> dict[str, np.ndarray]:
    """Labels of items start..start+count-1 without rendering (identical to the rendered items' labels)."""
    ds = SynthFaces(start + _check_count(count, "count"), split, MIN_SIZE, num_identities, seed, prior_preset,
                    priors, correlations, grayscale_rate)
    rows = [ds.labels(i) for i in range(start, start + count)]
    return {
        "attributes": np.stack([r.attributes for r in rows]) if rows else np.zeros((0, NUM_ATTRIBUTES), np.float32),
        "attribute_mask": np.stack([r.attribute_mask for r in rows]) if rows else np.zeros((0, NUM_ATTRIBUTES), bool),
        **{k: np.array([getattr(r, k) for r in rows], dtype=np.int64)
           for k in ("identity", "gender", "age_group", "skin_tone", "grayscale")},
    }


class _CachedFaces(Dataset):
    """A split rendered once: uint8 images, labels, and concept masks packed as bits of one int64 per pixel."""

    def __init__(self, source: SynthFaces, num_workers: int):
        n, s = len(source), source.size
        self.images = torch.empty(n, 3, s, s, dtype=torch.uint8)
        self.tensors: dict[str, torch.Tensor] = {}
        self.bits = torch.empty(n, s, s, dtype=torch.int64) if source.return_masks else None
        loader = DataLoader(_RawFaces(source), batch_size=32, num_workers=num_workers, collate_fn=_collate_raw)
        for chunk in loader:
            for idx, image, item in chunk:
                self.images[idx] = image
                if self.bits is not None:
                    self.bits[idx] = item.pop("concept_bits")
                for k, v in item.items():
                    if k not in self.tensors:
                        self.tensors[k] = torch.empty((n,) + tuple(v.shape), dtype=v.dtype)
                    self.tensors[k][idx] = v
        self.num_concepts = len(CONCEPTS)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {k: v[index] for k, v in self.tensors.items()}
        item["image"] = self.images[index].float().div_(255)
        if self.bits is not None:
            shifts = torch.arange(self.num_concepts, dtype=torch.int64)[:, None, None]
            item["concept_masks"] = ((self.bits[index][None] >> shifts) & 1).bool()
        return item


class _RawFaces(Dataset):
    def __init__(self, source: SynthFaces):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        face = self.source.render(index)
        item = face_to_item(face, index)
        item.pop("image")
        if face.concept_masks is not None:
            weights = torch.tensor([1 << k for k in range(len(CONCEPTS))], dtype=torch.int64)[:, None, None]
            item["concept_bits"] = (item.pop("concept_masks").long() * weights).sum(0)
        return index, torch.from_numpy(face.image).permute(2, 0, 1).contiguous(), item


def _collate_raw(batch):
    return batch


class SynthFacesDataModule(pl.LightningDataModule):
    """SynthFaces train/val/test splits with disjoint identities, in the shared batch contract.

    `augment`: AFFACT augmentation settings (None: train on the rendered faces as they are). It runs on whole
    training batches after transfer to the device; faces are already in AFFACT-crop geometry.
    """

    def __init__(self, size: int = 64, num_train: int = 4000, num_val: int = 1000, num_test: int = 1000,
                 num_identities: int = 500, seed: int = 0, batch_size: int = 64, num_workers: int = 2,
                 prior_preset: str = "default", priors: dict[str, float] | None = None,
                 correlations: list[tuple[str, str, float]] | None = None, grayscale_rate: float = 0.0,
                 return_masks: bool = False, cache: bool = False, augment: AffactAugmentConfig | None = None):
        super().__init__()
        Renderer(size)  # validates size
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test),
                            ("seed", seed), ("num_workers", num_workers)):
            _check_count(value, name)
        _check_count(num_identities, "num_identities", 1)
        _check_count(batch_size, "batch_size", 1)
        _check_rate(grayscale_rate, "grayscale_rate")
        LabelModel(prior_preset, priors, correlations)  # validates priors / correlations early
        self.save_hyperparameters(ignore=["augment"])
        # plain data only, so checkpoints stay loadable with weights_only=True
        self.hparams["augment"] = asdict(augment) if augment is not None else None
        self.size, self.seed, self.batch_size, self.num_workers = size, seed, batch_size, num_workers
        self.cache = cache
        self.augment: Callable[[dict], dict] | None = AffactAugment(augment, size) if augment is not None else None
        self.datasets: dict[str, Dataset] = {}

    def _make(self, split: str, count: int) -> Dataset:
        h = self.hparams
        ds = SynthFaces(count, split, h.size, h.num_identities, h.seed, h.prior_preset, h.priors, h.correlations,
                        h.grayscale_rate, h.return_masks)
        return _CachedFaces(ds, self.num_workers) if self.cache else ds

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if split not in self.datasets:
                self.datasets[split] = self._make(split, {"train": h.num_train, "val": h.num_val,
                                                          "test": h.num_test}[split])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup(None)
        return make_loader(self.datasets[split], self.batch_size, self.num_workers, shuffle, self.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def transform_batch(self, batch: dict, train: bool) -> dict:
        """Augmentation for training batches when configured; evaluation batches are used as rendered."""
        return self.augment(batch) if train and self.augment is not None else batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = self.trainer
        return self.transform_batch(batch, train=trainer is not None and trainer.training)

    def positive_rates(self) -> dict[str, float]:
        """Positive rate of each attribute over the known training labels (0.5 where none is known), computed
        from the label model alone, without rendering; the balanced loss reads it."""
        h = self.hparams
        labels = sample_labels(h.num_train, seed=h.seed, split="train", num_identities=h.num_identities,
                               prior_preset=h.prior_preset, priors=h.priors, correlations=h.correlations,
                               grayscale_rate=h.grayscale_rate)
        known = labels["attribute_mask"].sum(0)
        positive = (labels["attributes"] * labels["attribute_mask"]).sum(0)
        rates = np.where(known > 0, positive / np.maximum(known, 1), 0.5)
        return {name: float(r) for name, r in zip(CELEBA_ATTRIBUTES, rates)}


# ----------------------------------------------------------------------------------------------------------
# CLI


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=6)


def export(out: Path, count: int, seed: int = 0, size: int = 64, split: str = "train", num_identities: int = 500,
           prior_preset: str = "default", grayscale_rate: float = 0.0) -> dict[str, int]:
    """Write images/, labels.csv and masks/<concept>/ (a mask file only where the concept is visible)."""
    ds = SynthFaces(count, split, size, num_identities, seed, prior_preset, None, None, grayscale_rate, True)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    header = ["image", *CELEBA_ATTRIBUTES, *[f"{n}_{c}" for n in LANDMARK_NAMES for c in "xy"],
              "identity", "gender", "age_group", "skin_tone", "grayscale"]
    mask_counts = {c: 0 for c in CONCEPTS}
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for i in range(count):
            face = ds.render(i)
            name = f"{i:06d}.png"
            _save_png(face.image, out / "images" / name)
            lab = face.labels
            attrs = ["" if not lab.attribute_mask[k] else ("1" if lab.attributes[k] else "-1")
                     for k in range(NUM_ATTRIBUTES)]
            lms = [f"{v:.3f}" for v in face.landmarks.ravel()]
            writer.writerow([name, *attrs, *lms, lab.identity, lab.gender, lab.age_group, lab.skin_tone,
                             lab.grayscale])
            for k, concept in enumerate(CONCEPTS):
                if face.concept_masks[k].any():
                    folder = out / "masks" / concept
                    folder.mkdir(parents=True, exist_ok=True)
                    _save_png(face.concept_masks[k].astype(np.uint8) * 255, folder / name)
                    mask_counts[concept] += 1
    return mask_counts


def preview(out: Path, cols: int = 8, rows: int = 4, size: int = 96, seed: int = 0) -> None:
    ds = SynthFaces(cols * rows, "train", size, cols * rows, seed)
    grid = np.full((rows * (size + 2) + 2, cols * (size + 2) + 2, 3), 255, dtype=np.uint8)
    for i in range(cols * rows):
        r, c = divmod(i, cols)
        grid[2 + r * (size + 2):2 + r * (size + 2) + size, 2 + c * (size + 2):2 + c * (size + 2) + size] = \
            ds.render(i, return_masks=False).image
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    _save_png(grid, Path(out))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.synthfaces", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write images, labels.csv and concept masks")
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--count", type=int, required=True)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--size", type=int, default=64)
    ex.add_argument("--split", default="train", choices=SPLITS)
    ex.add_argument("--num-identities", type=int, default=500)
    ex.add_argument("--prior-preset", default="default", choices=sorted(PRIOR_PRESETS))
    ex.add_argument("--grayscale-rate", type=float, default=0.0)
    pv = sub.add_parser("preview", help="write a grid of faces")
    pv.add_argument("--out", type=Path, default=Path("docs/synthfaces_preview.png"))
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--size", type=int, default=96)
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            counts = export(args.out, args.count, args.seed, args.size, args.split, args.num_identities,
                            args.prior_preset, args.grayscale_rate)
            print(f"wrote {args.count} faces ({args.size} px, split {args.split}, seed {args.seed}) to {args.out}")
            print("images with a visible concept: " + ", ".join(f"{c}={n}" for c, n in counts.items() if n))
        else:
            preview(args.out, size=args.size, seed=args.seed)
            print(f"wrote preview grid to {args.out}")
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
