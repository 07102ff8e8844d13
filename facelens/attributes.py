"""The one source of truth for CelebA's 40 attribute names, their order and their base rates."""
from __future__ import annotations

from collections.abc import Sequence

# CelebA's order, as in the header line of list_attr_celeba.txt.
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald",
    "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair",
    "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)
NUM_ATTRIBUTES = len(CELEBA_ATTRIBUTES)
ATTRIBUTE_INDEX: dict[str, int] = {name: i for i, name in enumerate(CELEBA_ATTRIBUTES)}

# Fraction of positive labels over all 202,599 CelebA images (seed 004, Fig. 3.1).
CELEBA_POSITIVE_RATE: dict[str, float] = {
    "5_o_Clock_Shadow": 0.111, "Arched_Eyebrows": 0.267, "Attractive": 0.513, "Bags_Under_Eyes": 0.205,
    "Bald": 0.022, "Bangs": 0.152, "Big_Lips": 0.241, "Big_Nose": 0.235, "Black_Hair": 0.239,
    "Blond_Hair": 0.148, "Blurry": 0.051, "Brown_Hair": 0.205, "Bushy_Eyebrows": 0.142,
    "Chubby": 0.058, "Double_Chin": 0.047, "Eyeglasses": 0.065, "Goatee": 0.063, "Gray_Hair": 0.042,
    "Heavy_Makeup": 0.387, "High_Cheekbones": 0.455, "Male": 0.417, "Mouth_Slightly_Open": 0.483,
    "Mustache": 0.042, "Narrow_Eyes": 0.115, "No_Beard": 0.835, "Oval_Face": 0.284, "Pale_Skin": 0.043,
    "Pointy_Nose": 0.277, "Receding_Hairline": 0.080, "Rosy_Cheeks": 0.066, "Sideburns": 0.057,
    "Smiling": 0.482, "Straight_Hair": 0.208, "Wavy_Hair": 0.320, "Wearing_Earrings": 0.189,
    "Wearing_Hat": 0.048, "Wearing_Lipstick": 0.472, "Wearing_Necklace": 0.123, "Wearing_Necktie": 0.073,
    "Young": 0.774,
}


def resolve_attributes(names: Sequence[str] | None, option: str = "attributes") -> list[str]:
    """Validate attribute names (None or 'all' means all 40); the error names the option and the bad name."""
    if names is None or (isinstance(names, str) and names == "all") or list(names) == ["all"]:
        return list(CELEBA_ATTRIBUTES)
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in ATTRIBUTE_INDEX]
    if unknown:
        raise ValueError(
            f"{option}: unknown attribute(s) {unknown}; valid CelebA attributes are: {', '.join(CELEBA_ATTRIBUTES)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{option}: duplicated attribute names in {list(names)}")
    return list(names)


def attribute_indices(names: Sequence[str]) -> list[int]:
    return [ATTRIBUTE_INDEX[n] for n in resolve_attributes(names)]


def imbalance_order(names: Sequence[str] | None = None) -> list[str]:
    """Attributes ordered by increasing class imbalance |p - 0.5|, as in seed 004's tables."""
    names = resolve_attributes(names)
    return sorted(names, key=lambda n: abs(CELEBA_POSITIVE_RATE[n] - 0.5))
