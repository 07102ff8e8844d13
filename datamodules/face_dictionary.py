"""Face Dictionary (seed 002, Sec. 3.1): images with local concept masks and balanced global concept sets.

Local concepts get binary masks from 2D Gaussian confidence ellipses placed by the five landmarks
(`ELLIPSE_RECIPES`: one row per concept; centre = a landmark combination plus an offset, covariance =
diagonal standard deviations, both in the face frame and in units of d, the eye-centre to mouth-centre
distance; the mask is {x : (x - mu)^T S^-1 (x - mu) <= chi2_2(confidence)}). Attribute concepts are
drawn only where the image has the attribute and are labelled only where the attribute is known.
SynthFaces adds its exact drawn masks as concepts `drawn_<name>`. No source has FACS action units;
the SynthFaces/CelebA mouth actions smile (AU12, lip corner puller) and mouth open (AU25, lips part)
are tagged kind "action_unit".

Global concepts are balanced image sets: an image carries a group's label only if it was drawn into
that group's balanced set (-1 otherwise). What each source provides:
  synthfaces: gender (2), age_group (4), skin_tone (2: tones 0-1 light, 2-3 dark), grayscale (2)
  celeba:     gender (2), age_group (2: Young / not Young); Pale_Skin is a pallor attribute, not a
              skin-tone group, so there is no skin tone; no ethnicity
  utkface:    gender (2), age_group (4), ethnicity (4: White, Black, Asian, Indian; "Others" dropped);
              no landmarks in the file names, so global sets only
Grayscale: grayscale copies of the colour images of the balanced set (label 1; originals 0).

On disk (`save` / `load`):
  DIR/index.json      format version, source, size, confidence, concepts [{name, region, kind}],
                      regions {region: [concepts]}, global_groups {group: [subgroups]}, and per image
                      {file, source_name, landmarks, labelled: [concepts], global: {group: label}}
  DIR/images/NNNNNN.png   RGB images (all the same size)
  DIR/masks.npz       `masks`: uint8 (N, C, ceil(H*W/8)) np.packbits of the (C, H, W) bool masks

CLI:  python -m datamodules.face_dictionary build --source synthfaces --out DIR --count N [--size PX] [--seed S]
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from facelens.attributes import ATTRIBUTE_INDEX
from facelens.geometry import LANDMARK_NAMES, affact_matrix, transform_points, warp

FORMAT_VERSION = 1
REGIONS: tuple[str, ...] = ("eyes", "brows", "nose", "mouth", "cheeks", "chin", "forehead_hair")
SOURCES = ("synthfaces", "celeba", "utkface")

# name, region, kind, attribute (None: a facial part, always present), anchor landmark weights
# (lefteye, righteye, nose, leftmouth, rightmouth), centre offset (dx, dy), std (sx, sy); face frame,
# units of d. A negative attribute name ("-No_Beard") means the concept is present when it is 0.
ELLIPSE_RECIPES: tuple[tuple, ...] = (
    ("eyes", "eyes", "part", None, (0.5, 0.5, 0, 0, 0), (0.0, 0.0), (0.42, 0.1)),
    ("brows", "brows", "part", None, (0.5, 0.5, 0, 0, 0), (0.0, -0.22), (0.42, 0.07)),
    ("nose", "nose", "part", None, (0, 0, 1, 0, 0), (0.0, -0.2), (0.1, 0.22)),
    ("mouth", "mouth", "part", None, (0, 0, 0, 0.5, 0.5), (0.0, 0.0), (0.26, 0.09)),
    ("cheeks", "cheeks", "part", None, (0, 0, 1, 0, 0), (0.0, 0.1), (0.55, 0.13)),
    ("chin", "chin", "part", None, (0, 0, 0, 0.5, 0.5), (0.0, 0.4), (0.22, 0.1)),
    ("forehead", "forehead_hair", "part", None, (0.5, 0.5, 0, 0, 0), (0.0, -0.62), (0.42, 0.16)),
    ("Eyeglasses", "eyes", "attribute", "Eyeglasses", (0.5, 0.5, 0, 0, 0), (0.0, 0.02), (0.5, 0.14)),
    ("Bags_Under_Eyes", "eyes", "attribute", "Bags_Under_Eyes", (0.5, 0.5, 0, 0, 0), (0.0, 0.14), (0.4, 0.05)),
    ("Narrow_Eyes", "eyes", "attribute", "Narrow_Eyes", (0.5, 0.5, 0, 0, 0), (0.0, 0.0), (0.38, 0.06)),
    ("Arched_Eyebrows", "brows", "attribute", "Arched_Eyebrows", (0.5, 0.5, 0, 0, 0), (0.0, -0.24), (0.4, 0.06)),
    ("Bushy_Eyebrows", "brows", "attribute", "Bushy_Eyebrows", (0.5, 0.5, 0, 0, 0), (0.0, -0.22), (0.42, 0.08)),
    ("Big_Nose", "nose", "attribute", "Big_Nose", (0, 0, 1, 0, 0), (0.0, -0.15), (0.14, 0.24)),
    ("Pointy_Nose", "nose", "attribute", "Pointy_Nose", (0, 0, 1, 0, 0), (0.0, -0.05), (0.08, 0.15)),
    ("Big_Lips", "mouth", "attribute", "Big_Lips", (0, 0, 0, 0.5, 0.5), (0.0, 0.0), (0.24, 0.1)),
    ("Wearing_Lipstick", "mouth", "attribute", "Wearing_Lipstick", (0, 0, 0, 0.5, 0.5), (0.0, 0.0), (0.22, 0.07)),
    ("Mustache", "mouth", "attribute", "Mustache", (0, 0, 0.5, 0.25, 0.25), (0.0, 0.05), (0.25, 0.06)),
    ("Smiling", "mouth", "action_unit", "Smiling", (0, 0, 0, 0.5, 0.5), (0.0, 0.0), (0.3, 0.1)),
    ("Mouth_Slightly_Open", "mouth", "action_unit", "Mouth_Slightly_Open", (0, 0, 0, 0.5, 0.5), (0.0, 0.02),
     (0.16, 0.08)),
    ("Rosy_Cheeks", "cheeks", "attribute", "Rosy_Cheeks", (0, 0, 1, 0, 0), (0.0, 0.0), (0.5, 0.1)),
    ("High_Cheekbones", "cheeks", "attribute", "High_Cheekbones", (0, 0, 1, 0, 0), (0.0, -0.15), (0.55, 0.08)),
    ("5_o_Clock_Shadow", "cheeks", "attribute", "5_o_Clock_Shadow", (0, 0, 0, 0.5, 0.5), (0.0, 0.1),
     (0.5, 0.22)),
    ("Sideburns", "cheeks", "attribute", "Sideburns", (0.5, 0.5, 0, 0, 0), (0.0, 0.3), (0.8, 0.2)),
    ("Goatee", "chin", "attribute", "Goatee", (0, 0, 0, 0.5, 0.5), (0.0, 0.3), (0.14, 0.12)),
    ("Beard", "chin", "attribute", "-No_Beard", (0, 0, 0, 0.5, 0.5), (0.0, 0.3), (0.45, 0.2)),
    ("Double_Chin", "chin", "attribute", "Double_Chin", (0, 0, 0, 0.5, 0.5), (0.0, 0.55), (0.25, 0.08)),
    ("Bangs", "forehead_hair", "attribute", "Bangs", (0.5, 0.5, 0, 0, 0), (0.0, -0.6), (0.45, 0.14)),
    ("Receding_Hairline", "forehead_hair", "attribute", "Receding_Hairline", (0.5, 0.5, 0, 0, 0), (0.0, -0.85),
     (0.4, 0.1)),
    ("Bald", "forehead_hair", "attribute", "Bald", (0.5, 0.5, 0, 0, 0), (0.0, -1.0), (0.6, 0.2)),
    ("Wearing_Hat", "forehead_hair", "attribute", "Wearing_Hat", (0.5, 0.5, 0, 0, 0), (0.0, -1.1), (0.75, 0.22)),
)
# SynthFaces drawn concepts kept as `drawn_<name>`, with their region and kind (the rest have no facial part).
DRAWN_REGIONS: dict[str, tuple[str, str]] = {
    "eyes": ("eyes", "part"), "brows": ("brows", "part"), "nose": ("nose", "part"), "mouth": ("mouth", "part"),
    "hair": ("forehead_hair", "part"), "eyeglasses": ("eyes", "attribute"), "eye_shadow": ("eyes", "attribute"),
    "eye_bags": ("eyes", "attribute"), "mustache": ("mouth", "attribute"), "lipstick": ("mouth", "attribute"),
    "smile": ("mouth", "action_unit"), "mouth_open": ("mouth", "action_unit"), "rosy_cheeks": ("cheeks", "attribute"),
    "cheekbones": ("cheeks", "attribute"), "stubble": ("cheeks", "attribute"), "sideburns": ("cheeks", "attribute"),
    "wrinkles": ("cheeks", "attribute"), "goatee": ("chin", "attribute"), "beard": ("chin", "attribute"),
    "double_chin": ("chin", "attribute"), "bangs": ("forehead_hair", "attribute"),
    "hat": ("forehead_hair", "attribute"),
}
AGE_GROUPS_4 = ["0-19", "20-39", "40-59", "60+"]
UTK_RACES = ["white", "black", "asian", "indian"]  # race 4 ("others") is left out of the ethnicity set
UTK_NAME = re.compile(r"^(\d+)_([01])_([0-4])_(\d+)\.(jpg|jpeg|png)(\.chip\.jpg)?$", re.IGNORECASE)


@dataclass
class FaceDictionary:
    """Images (N, H, W, 3) uint8, packed masks (N, C, ceil(HW/8)) uint8, labelled (N, C) bool, and the
    global labels {group: (N,) int64, -1 = not in that group's balanced set}."""

    images: np.ndarray
    masks: np.ndarray
    labelled: np.ndarray
    concepts: list[str]
    concept_regions: list[str]
    concept_kinds: list[str]
    global_groups: dict[str, list[str]]
    global_labels: dict[str, np.ndarray]
    landmarks: np.ndarray  # (N, 5, 2) float32, NaN where unknown
    source_names: list[str]
    source: str = "synthfaces"
    confidence: float = 0.9

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> tuple[int, int]:
        return self.images.shape[1], self.images.shape[2]

    @property
    def regions(self) -> dict[str, list[str]]:
        """Each facial part with its concepts (seed 002 Fig. 2)."""
        out: dict[str, list[str]] = {r: [] for r in REGIONS}
        for c, r in zip(self.concepts, self.concept_regions):
            out.setdefault(r, []).append(c)
        return out

    def mask(self, i: int) -> np.ndarray:
        """(C, H, W) bool masks of image i."""
        h, w = self.size
        return np.unpackbits(self.masks[i], axis=-1, count=h * w).reshape(len(self.concepts), h, w).astype(bool)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        entries = []
        for i in range(len(self)):
            name = f"images/{i:06d}.png"
            Image.fromarray(self.images[i]).save(folder / name)
            entries.append({"file": name, "source_name": self.source_names[i],
                            "landmarks": None if np.isnan(self.landmarks[i]).any() else self.landmarks[i].tolist(),
                            "labelled": [c for c, k in zip(self.concepts, self.labelled[i]) if k],
                            "global": {g: int(v[i]) for g, v in self.global_labels.items()}})
        np.savez_compressed(folder / "masks.npz", masks=self.masks)
        index = {"format_version": FORMAT_VERSION, "source": self.source, "size": list(self.size),
                 "confidence": self.confidence, "landmark_names": list(LANDMARK_NAMES),
                 "concepts": [{"name": c, "region": r, "kind": k}
                              for c, r, k in zip(self.concepts, self.concept_regions, self.concept_kinds)],
                 "regions": self.regions, "global_groups": self.global_groups, "images": entries}
        (folder / "index.json").write_text(json.dumps(index, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> FaceDictionary:
        folder = Path(folder)
        path = folder / "index.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no Face Dictionary index (build one with "
                                    "`python -m datamodules.face_dictionary build`)")
        index = json.loads(path.read_text())
        if index.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {index.get('format_version')!r}, expected {FORMAT_VERSION}")
        concepts = [c["name"] for c in index["concepts"]]
        entries = index["images"]
        images = []
        for e in entries:
            img = np.asarray(Image.open(folder / e["file"]).convert("RGB"))
            if list(img.shape[:2]) != index["size"]:
                raise ValueError(f"{folder / e['file']}: size {img.shape[:2]}, index.json says {index['size']}")
            images.append(img)
        masks = np.load(folder / "masks.npz")["masks"]
        if masks.shape[:2] != (len(entries), len(concepts)):
            raise ValueError(f"{folder / 'masks.npz'}: masks {masks.shape[:2]} do not match {len(entries)} images "
                             f"x {len(concepts)} concepts in index.json")
        pos = {c: k for k, c in enumerate(concepts)}
        labelled = np.zeros((len(entries), len(concepts)), dtype=bool)
        for i, e in enumerate(entries):
            labelled[i, [pos[c] for c in e["labelled"]]] = True
        groups = {g: list(s) for g, s in index["global_groups"].items()}
        return cls(images=np.stack(images) if images else np.zeros((0, *index["size"], 3), np.uint8), masks=masks,
                   labelled=labelled, concepts=concepts, concept_regions=[c["region"] for c in index["concepts"]],
                   concept_kinds=[c["kind"] for c in index["concepts"]], global_groups=groups,
                   global_labels={g: np.array([e["global"].get(g, -1) for e in entries], np.int64) for g in groups},
                   landmarks=np.array([e["landmarks"] if e["landmarks"] is not None else np.full((5, 2), np.nan)
                                       for e in entries], np.float32).reshape(-1, 5, 2),
                   source_names=[e["source_name"] for e in entries], source=index["source"],
                   confidence=float(index["confidence"]))

    def dataset(self) -> FaceDictionaryDataset:
        return FaceDictionaryDataset(self)

    def dataloader(self, batch_size: int = 32, num_workers: int = 0) -> DataLoader:
        """Batches in the form `analysis.dissection.dissect` expects, in dictionary order."""
        return DataLoader(self.dataset(), batch_size=batch_size, shuffle=False, num_workers=num_workers)

    def dissect_arguments(self) -> dict:
        """concepts, concept_regions and global_groups keyword arguments of `dissect` / `Dissector`."""
        return {"concepts": list(self.concepts), "concept_regions": list(self.concept_regions),
                "global_groups": {g: list(s) for g, s in self.global_groups.items()}}


class FaceDictionaryDataset(Dataset):
    """Items: image (3, H, W) float in [0, 1], concept_masks (C, H, W) bool, concept_labelled (C,) bool,
    one int64 label per global group (-1 unknown), index."""

    def __init__(self, dictionary: FaceDictionary):
        self.d = dictionary

    def __len__(self) -> int:
        return len(self.d)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"image": torch.from_numpy(self.d.images[i]).permute(2, 0, 1).float().div_(255),
                "concept_masks": torch.from_numpy(self.d.mask(i)),
                "concept_labelled": torch.from_numpy(self.d.labelled[i].copy()),
                "index": torch.tensor(i, dtype=torch.int64)}
        for g, labels in self.d.global_labels.items():
            item[g] = torch.tensor(int(labels[i]), dtype=torch.int64)
        return item


# ----------------------------------------------------------------------------------------------
# Masks


def chi2_radius2(confidence: float) -> float:
    """Squared Mahalanobis radius of a 2D Gaussian confidence ellipse: chi2 quantile with 2 dof."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return -2.0 * math.log1p(-confidence)


def ellipse_parameters(landmarks: np.ndarray, recipe: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Centre (N, 2) and covariance (N, 2, 2) in pixels of one ELLIPSE_RECIPES row for landmarks (N, 5, 2)."""
    _, _, _, _, weights, offset, std = recipe
    lm = np.asarray(landmarks, dtype=np.float64)
    eye = (lm[:, 0] + lm[:, 1]) / 2
    mouth = (lm[:, 3] + lm[:, 4]) / 2
    d = np.linalg.norm(mouth - eye, axis=1)
    ex = lm[:, 1] - lm[:, 0]
    ex = ex / np.maximum(np.linalg.norm(ex, axis=1, keepdims=True), 1e-9)
    ey = np.stack([-ex[:, 1], ex[:, 0]], axis=1)  # down the face when x runs left to right
    rot = np.stack([ex, ey], axis=2)  # columns: face axes in image coordinates
    centre = np.einsum("k,nkj->nj", np.asarray(weights, np.float64) / np.sum(weights), lm)
    centre = centre + d[:, None] * (offset[0] * ex + offset[1] * ey)
    cov = rot @ np.diag(np.square(std)) @ rot.transpose(0, 2, 1) * (d**2)[:, None, None]
    return centre, cov


def ellipse_masks(landmarks: np.ndarray, size: tuple[int, int], confidence: float = 0.9,
                  recipes: Sequence[tuple] = ELLIPSE_RECIPES) -> np.ndarray:
    """(N, R, H, W) bool: pixel centres inside each recipe's Gaussian confidence ellipse."""
    h, w = size
    r2 = chi2_radius2(confidence)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((len(landmarks), len(recipes), h, w), dtype=bool)
    for k, recipe in enumerate(recipes):
        centre, cov = ellipse_parameters(landmarks, recipe)
        inv = np.linalg.inv(cov)
        dx = xs[None] - centre[:, 0, None, None]
        dy = ys[None] - centre[:, 1, None, None]
        m2 = inv[:, 0, 0, None, None] * dx**2 + 2 * inv[:, 0, 1, None, None] * dx * dy + inv[:, 1, 1, None, None] * dy**2
        out[:, k] = m2 <= r2
    return out


def _attribute_presence(recipe: tuple, attributes: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(present, labelled), each (N,), of one recipe from 40-attribute labels in {0, 1} and a known mask."""
    name = recipe[3]
    n = len(attributes)
    if name is None:
        return np.ones(n, bool), np.ones(n, bool)
    negate = name.startswith("-")
    col = ATTRIBUTE_INDEX[name.lstrip("-")]
    value = attributes[:, col] > 0.5
    return (~value if negate else value), known[:, col].astype(bool)


def _local_concepts(landmarks: np.ndarray, attributes: np.ndarray, known: np.ndarray, size: tuple[int, int],
                    confidence: float) -> tuple[np.ndarray, np.ndarray]:
    masks = ellipse_masks(landmarks, size, confidence)
    labelled = np.zeros(masks.shape[:2], bool)
    for k, recipe in enumerate(ELLIPSE_RECIPES):
        present, lab = _attribute_presence(recipe, attributes, known)
        masks[:, k] &= (present & lab)[:, None, None]
        labelled[:, k] = lab
    return masks, labelled


def _pack(masks: np.ndarray) -> np.ndarray:
    n, c = masks.shape[:2]
    return np.packbits(masks.reshape(n, c, -1), axis=-1)


# ----------------------------------------------------------------------------------------------
# Balanced global sets


def balanced_subset(labels: np.ndarray, num_subgroups: int, per_subgroup: int | None,
                    rng: np.random.Generator) -> np.ndarray:
    """Labels with all but an equal number of images per subgroup set to -1 (the smallest subgroup's
    count, capped at per_subgroup); a subgroup without images leaves the whole group empty."""
    labels = np.asarray(labels, np.int64)
    members = [np.flatnonzero(labels == s) for s in range(num_subgroups)]
    n = min(len(m) for m in members)
    if per_subgroup is not None:
        n = min(n, per_subgroup)
    out = np.full_like(labels, -1)
    for s, m in enumerate(members):
        out[np.sort(rng.choice(m, n, replace=False))] = s
    return out


def to_grayscale(images: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma in all three channels (the same weights as datamodules.biased.to_gray)."""
    luma = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.repeat(np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def _finish(images, masks, labelled, concepts, regions, kinds, groups, raw_labels, landmarks, names, source,
            confidence, per_subgroup, grayscale, seed) -> FaceDictionary:
    """Balance the global groups and append grayscale copies of a balanced colour set."""
    rng = np.random.default_rng(seed)
    labels = {g: balanced_subset(raw_labels[g], len(groups[g]), per_subgroup, rng) for g in groups}
    if grayscale:
        n = len(images) if per_subgroup is None else min(per_subgroup, len(images))
        pick = np.sort(rng.choice(len(images), n, replace=False))
        images = np.concatenate([images, to_grayscale(images[pick])])
        masks = np.concatenate([masks, np.zeros((n, *masks.shape[1:]), masks.dtype)])
        labelled = np.concatenate([labelled, np.zeros((n, labelled.shape[1]), bool)])
        landmarks = np.concatenate([landmarks, landmarks[pick]])
        names = names + [f"{names[i]} (grayscale)" for i in pick]
        labels = {g: np.concatenate([v, np.full(n, -1)]) for g, v in labels.items()}
        gray = np.full(len(images), -1)
        gray[pick], gray[len(images) - n:] = 0, 1
        groups = {**groups, "grayscale": ["color", "grayscale"]}
        labels["grayscale"] = gray
    return FaceDictionary(images=images, masks=masks, labelled=labelled, concepts=concepts, concept_regions=regions,
                          concept_kinds=kinds, global_groups=groups, global_labels=labels,
                          landmarks=landmarks.astype(np.float32), source_names=names, source=source,
                          confidence=confidence)


def _ellipse_vocabulary() -> tuple[list[str], list[str], list[str]]:
    return [r[0] for r in ELLIPSE_RECIPES], [r[1] for r in ELLIPSE_RECIPES], [r[2] for r in ELLIPSE_RECIPES]


# ----------------------------------------------------------------------------------------------
# Sources


def build_synthfaces(count: int, size: int = 64, seed: int = 0, confidence: float = 0.9, split: str = "test",
                     per_subgroup: int | None = None, grayscale: bool = True, drawn: bool = True) -> FaceDictionary:
    """`count` SynthFaces images with ellipse concepts (and exact `drawn_*` masks), balanced global sets."""
    from datamodules.synthfaces import CONCEPTS, SynthFaces

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    ds = SynthFaces(count, split, size, seed=seed, return_masks=drawn)
    faces = [ds.render(i) for i in range(count)]
    images = np.stack([f.image for f in faces])
    landmarks = np.stack([f.landmarks for f in faces]).astype(np.float64)
    attrs = np.stack([f.labels.attributes for f in faces])
    known = np.stack([f.labels.attribute_mask for f in faces])
    masks, labelled = _local_concepts(landmarks, attrs, known, (size, size), confidence)
    concepts, regions, kinds = _ellipse_vocabulary()
    if drawn:
        keep = [CONCEPTS.index(c) for c in DRAWN_REGIONS]
        masks = np.concatenate([masks, np.stack([f.concept_masks[keep] for f in faces])], axis=1)
        labelled = np.concatenate([labelled, np.ones((count, len(keep)), bool)], axis=1)
        concepts += [f"drawn_{c}" for c in DRAWN_REGIONS]
        regions += [r for r, _ in DRAWN_REGIONS.values()]
        kinds += [k for _, k in DRAWN_REGIONS.values()]
    groups = {"gender": ["female", "male"], "age_group": list(AGE_GROUPS_4), "skin_tone": ["light", "dark"]}
    raw = {"gender": np.array([f.labels.gender for f in faces]),
           "age_group": np.array([f.labels.age_group for f in faces]),
           "skin_tone": np.array([f.labels.skin_tone >= 2 for f in faces], np.int64)}
    return _finish(images, _pack(masks), labelled, concepts, regions, kinds, groups, raw, landmarks,
                   [f"synthfaces/{split}/{i}" for i in range(count)], "synthfaces", confidence, per_subgroup,
                   grayscale, seed)


def build_celeba(root: str | Path, count: int, size: int = 112, seed: int = 0, confidence: float = 0.9,
                 split: str = "test", per_subgroup: int | None = None, grayscale: bool = True) -> FaceDictionary:
    """`count` CelebA images of `split` (AFFACT-cropped to `size`), ellipse concepts from the landmarks,
    gender (Male) and 2 age groups (Young) as global sets."""
    from datamodules.celeba import load_image, scan_celeba

    index = scan_celeba(root)
    rows = index.splits.get(split)
    if rows is None or len(rows) == 0:
        raise ValueError(f"{root}: CelebA has no images in split {split!r}")
    rows = rows[:count]
    lm_src = torch.from_numpy(index.landmarks[rows]).float()
    matrix = affact_matrix(lm_src, size)
    images, landmarks = [], transform_points(matrix, lm_src).double().numpy()
    for k, r in enumerate(rows):
        img = load_image(index.files.image_dir / index.names[r])
        out = warp(img[None], matrix[k:k + 1], size)[0]
        images.append((out.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    attrs = (index.attributes[rows] > 0).astype(np.float32)
    known = np.ones_like(attrs, bool)
    masks, labelled = _local_concepts(landmarks, attrs, known, (size, size), confidence)
    concepts, regions, kinds = _ellipse_vocabulary()
    groups = {"gender": ["female", "male"], "age_group": ["old", "young"]}
    raw = {"gender": attrs[:, ATTRIBUTE_INDEX["Male"]].astype(np.int64),
           "age_group": attrs[:, ATTRIBUTE_INDEX["Young"]].astype(np.int64)}
    return _finish(np.stack(images), _pack(masks), labelled, concepts, regions, kinds, groups, raw, landmarks,
                   [index.names[r] for r in rows], "celeba", confidence, per_subgroup, grayscale, seed)


def parse_utkface_name(path: str | Path) -> tuple[int, int, int]:
    """(age, gender, race) from `[age]_[gender]_[race]_[date&time].jpg`; gender 0 male, 1 female; race 0-4."""
    name = Path(path).name
    m = UTK_NAME.match(name)
    if not m:
        raise ValueError(f"{path}: not a UTKFace name [age]_[gender 0|1]_[race 0-4]_[date&time].jpg")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def age_group_4(age: np.ndarray) -> np.ndarray:
    """0-19, 20-39, 40-59, 60+ (SynthFaces' age groups)."""
    return np.clip(np.asarray(age) // 20, 0, 3).astype(np.int64)


def build_utkface(folder: str | Path, size: int = 64, seed: int = 0, per_subgroup: int | None = None,
                  count: int | None = None, grayscale: bool = True) -> FaceDictionary:
    """Global sets only (no landmarks in the names): gender, 4 age groups, 4 ethnicities."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if count is not None:
        files = files[:count]
    if not files:
        raise ValueError(f"{folder}: no UTKFace images (*.jpg)")
    parsed = np.array([parse_utkface_name(p) for p in files], np.int64).reshape(-1, 3)
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in files])
    race = parsed[:, 2]
    groups = {"gender": ["female", "male"], "age_group": list(AGE_GROUPS_4), "ethnicity": list(UTK_RACES)}
    raw = {"gender": 1 - parsed[:, 1], "age_group": age_group_4(parsed[:, 0]), "ethnicity": np.where(race < 4, race, -1)}
    n = len(files)
    return _finish(images, np.zeros((n, 0, (size * size + 7) // 8), np.uint8), np.zeros((n, 0), bool), [], [], [],
                   groups, raw, np.full((n, 5, 2), np.nan), [p.name for p in files], "utkface", 0.9, per_subgroup,
                   grayscale, seed)


def merge(dictionaries: Sequence[FaceDictionary]) -> FaceDictionary:
    """One dictionary from several of the same image size: concepts and groups are united; an image is
    unlabelled for concepts its source lacks and -1 for groups its source lacks."""
    if not dictionaries:
        raise ValueError("merge needs at least one dictionary")
    sizes = {d.size for d in dictionaries}
    if len(sizes) != 1:
        raise ValueError(f"merge: dictionaries have different image sizes {sorted(sizes)}")
    h, w = sizes.pop()
    concepts: dict[str, tuple[str, str]] = {}
    groups: dict[str, list[str]] = {}
    for d in dictionaries:
        for c, r, k in zip(d.concepts, d.concept_regions, d.concept_kinds):
            concepts.setdefault(c, (r, k))
        for g, s in d.global_groups.items():
            if g in groups and groups[g] != s:
                raise ValueError(f"merge: group {g!r} has subgroups {groups[g]} in one dictionary and {s} in another")
            groups.setdefault(g, list(s))
    names = list(concepts)
    parts_masks, parts_lab = [], []
    for d in dictionaries:
        n = len(d)
        full = np.zeros((n, len(names), h * w), bool)
        lab = np.zeros((n, len(names)), bool)
        for j, c in enumerate(d.concepts):
            k = names.index(c)
            full[:, k] = np.unpackbits(d.masks[:, j], axis=-1, count=h * w).astype(bool)
            lab[:, k] = d.labelled[:, j]
        parts_masks.append(np.packbits(full, axis=-1))
        parts_lab.append(lab)
    return FaceDictionary(
        images=np.concatenate([d.images for d in dictionaries]), masks=np.concatenate(parts_masks),
        labelled=np.concatenate(parts_lab), concepts=names, concept_regions=[concepts[c][0] for c in names],
        concept_kinds=[concepts[c][1] for c in names], global_groups=groups,
        global_labels={g: np.concatenate([d.global_labels.get(g, np.full(len(d), -1)) for d in dictionaries])
                       for g in groups},
        landmarks=np.concatenate([d.landmarks for d in dictionaries]),
        source_names=[n for d in dictionaries for n in d.source_names],
        source="+".join(d.source for d in dictionaries), confidence=dictionaries[0].confidence)


def build(source: str = "synthfaces", count: int = 200, size: int = 64, seed: int = 0, confidence: float = 0.9,
          root: str | Path | None = None, utkface: str | Path | None = None, per_subgroup: int | None = None,
          grayscale: bool = True) -> FaceDictionary:
    """A dictionary from one source, plus UTKFace global sets when `utkface` names its folder."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "synthfaces":
        d = build_synthfaces(count, size, seed, confidence, per_subgroup=per_subgroup, grayscale=grayscale)
    elif source == "celeba":
        if root is None:
            raise ValueError("source 'celeba' needs root (the CelebA folder)")
        d = build_celeba(root, count, size, seed, confidence, per_subgroup=per_subgroup, grayscale=grayscale)
    else:
        if utkface is None and root is None:
            raise ValueError("source 'utkface' needs the UTKFace folder (root or utkface)")
        return build_utkface(utkface or root, size, seed, per_subgroup, count, grayscale)
    if utkface is not None:
        d = merge([d, build_utkface(utkface, size, seed, per_subgroup, grayscale=False)])
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datamodules.face_dictionary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a Face Dictionary and save it")
    b.add_argument("--source", default="synthfaces", choices=SOURCES)
    b.add_argument("--out", required=True)
    b.add_argument("--count", type=int, default=200)
    b.add_argument("--size", type=int, default=64)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--confidence", type=float, default=0.9, help="Gaussian ellipse confidence level")
    b.add_argument("--root", help="CelebA (or UTKFace) folder")
    b.add_argument("--utkface", help="UTKFace folder whose images join the global sets")
    b.add_argument("--per-subgroup", type=int, help="cap on images per global subgroup")
    b.add_argument("--no-grayscale", action="store_true", help="no grayscale copies")
    args = p.parse_args(argv)
    if args.count < 1 or args.size < 8:
        p.error("--count must be >= 1 and --size >= 8")
    d = build(args.source, args.count, args.size, args.seed, args.confidence, args.root, args.utkface,
              args.per_subgroup, not args.no_grayscale)
    out = d.save(args.out)
    sets = {g: {s: int((d.global_labels[g] == i).sum()) for i, s in enumerate(subs)}
            for g, subs in d.global_groups.items()}
    print(f"{out}: {len(d)} images, {len(d.concepts)} local concepts, global sets {sets}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
