"""Where each CelebA attribute is expected in an AFFACT-aligned face: the AMR masks of seed 004.

Version 1 (Table A.1) places boxes relative to the five landmarks of each image; version 2
(Table A.2) is a fixed layout of 32 x 32 blocks on the 224-px crop. Both tables are data below, in
the table's own units (pixels of a 224-px crop, blocks of 32 px); masks of any square size S come
from scaling them by S / 224. Hair attributes are `mask_global - ellipse` (v1) and
`mask_global - mask_face` (v2); attributes with a left and a right box are the union of both.

Pixel (col, row) has its centre at integer coordinates (facelens.geometry). A v1 box [x_l, x_r) x
[y_t, y_b) holds the pixels whose centres lie in it, so moving the landmarks by k px moves the mask
by k px. A v2 box covers the pixels whose area lies in its blocks.

Where the seed's text of Table A.1 is illegible, the cell follows its row's mirror or the row with the
same region: Narrow_Eyes x_r = x_er + 13 (as every other eye box), Pointy_Nose = Big_Nose, Goatee
spans the mouth corners from y_mc to y_mc + 30, Wearing_Lipstick x_ml - 10 .. x_mr + 10,
Wearing_Hat starts at the top of the image, Sideburns and Earrings are mirror images, and the
derived variables y_hairline = y_ec - (y_mc - y_ec), y_fc = y_ec - (y_mc - y_ec) / 2.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from facelens.attributes import CELEBA_ATTRIBUTES, resolve_attributes
from facelens.geometry import LEFT_EYE, LEFT_MOUTH, NOSE, RIGHT_EYE, RIGHT_MOUTH

TABLE_SIZE = 224  # the crop size both tables are written for
BLOCK = 32  # Table A.2 block side at TABLE_SIZE

# A coordinate of Table A.1 is (variable, offset in 224-px units). Variables are landmarks (x_el: left
# eye x, ...), the derived ones of the table's last row, "zero" (the image's top/left edge) and "side"
# (its bottom/right edge, 224 in the table).
V1_VARIABLES: tuple[str, ...] = ("x_el", "x_er", "y_ec", "x_n", "y_n", "x_ml", "x_mr", "y_mc",
                                 "x_hc", "y_hl", "y_fc", "zero", "side")
HAIR = "hair"  # marker: mask_global minus the face (ellipse in v1, mask_face in v2)

_GLOBAL_V1 = (("x_n", -80), ("x_n", 75), ("y_n", -100), ("side", 0))
_MOUTH_V1 = (("x_ml", -6), ("x_mr", 6), ("y_mc", -10), ("y_mc", 15))
_BROWS_V1 = (("x_el", -13), ("x_er", 13), ("y_ec", -18), ("y_ec", -2))
_NOSE_V1 = (("x_n", -15), ("x_n", 15), ("y_n", -15), ("y_n", 8))
_SKIN_V1 = (("x_n", -50), ("x_n", 55), ("y_ec", -45), ("y_mc", 35))
_BEARD_V1 = (("x_ml", -25), ("x_mr", 25), ("y_ec", 4), ("y_mc", 32))
_HAIRLINE_V1 = (("x_hc", -55), ("x_hc", 55), ("y_hl", -30), ("y_hl", 15))
_NECK_V1 = (("x_ml", -30), ("x_mr", 30), ("y_mc", 30), ("side", 0))
_CHEEKS_V1 = ((("x_el", -25), ("x_n", 0), ("y_ec", 4), ("y_n", 5)),
              (("x_n", 0), ("x_er", 25), ("y_ec", 4), ("y_n", 5)))

# Table A.1: attribute -> boxes (x_l, x_r, y_t, y_b), or HAIR.
MASKS_V1: dict[str, tuple | str] = {
    "5_o_Clock_Shadow": (_BEARD_V1,),
    "Arched_Eyebrows": (_BROWS_V1,),
    "Attractive": (_GLOBAL_V1,),
    "Bags_Under_Eyes": ((("x_el", -13), ("x_er", 13), ("y_ec", 4), ("y_ec", 15)),),
    "Bald": (_HAIRLINE_V1,),
    "Bangs": ((("x_el", -15), ("x_er", 15), ("y_fc", -12), ("y_fc", 15)),),
    "Big_Lips": (_MOUTH_V1,),
    "Big_Nose": (_NOSE_V1,),
    "Black_Hair": HAIR,
    "Blond_Hair": HAIR,
    "Blurry": (_GLOBAL_V1,),
    "Brown_Hair": HAIR,
    "Bushy_Eyebrows": (_BROWS_V1,),
    "Chubby": (_GLOBAL_V1,),
    "Double_Chin": ((("x_ml", -6), ("x_mr", 6), ("y_mc", 30), ("y_mc", 60)),),
    "Eyeglasses": ((("x_el", -22), ("x_er", 22), ("y_ec", -15), ("y_ec", 15)),),
    "Goatee": ((("x_ml", 0), ("x_mr", 0), ("y_mc", 0), ("y_mc", 30)),),
    "Gray_Hair": HAIR,
    "Heavy_Makeup": (_SKIN_V1,),
    "High_Cheekbones": _CHEEKS_V1,
    "Male": (_GLOBAL_V1,),
    "Mouth_Slightly_Open": (_MOUTH_V1,),
    "Mustache": ((("x_ml", -10), ("x_mr", 10), ("y_mc", -15), ("y_mc", 0)),),
    "Narrow_Eyes": ((("x_el", -13), ("x_er", 13), ("y_ec", -10), ("y_ec", 10)),),
    "No_Beard": (_BEARD_V1,),
    "Oval_Face": (_SKIN_V1,),
    "Pale_Skin": (_SKIN_V1,),
    "Pointy_Nose": (_NOSE_V1,),
    "Receding_Hairline": (_HAIRLINE_V1,),
    "Rosy_Cheeks": _CHEEKS_V1,
    "Sideburns": ((("x_el", -25), ("x_el", -5), ("y_ec", 4), ("y_n", 28)),
                  (("x_er", 5), ("x_er", 25), ("y_ec", 4), ("y_n", 28))),
    "Smiling": (_MOUTH_V1,),
    "Straight_Hair": HAIR,
    "Wavy_Hair": HAIR,
    "Wearing_Earrings": ((("x_el", -34), ("x_el", -12), ("y_n", -15), ("y_n", 42)),
                         (("x_er", 12), ("x_er", 34), ("y_n", -15), ("y_n", 42))),
    "Wearing_Hat": ((("x_hc", -70), ("x_hc", 70), ("zero", 0), ("y_hl", 15)),),
    "Wearing_Lipstick": ((("x_ml", -10), ("x_mr", 10), ("y_mc", -10), ("y_mc", 15)),),
    "Wearing_Necklace": (_NECK_V1,),
    "Wearing_Necktie": (_NECK_V1,),
    "Young": (_GLOBAL_V1,),
}
MASK_GLOBAL_V1 = _GLOBAL_V1
# v1 hair: mask_global minus ellipse(centre = (x_n, y_n - 15), r_long = 60 (vertical), r_short = 45).
HAIR_ELLIPSE_V1 = {"centre": (("x_n", 0), ("y_n", -15)), "r_vertical": 60, "r_horizontal": 45}

# Table A.2: attribute -> boxes (x_l, x_r, y_t, y_b) in 32-px blocks, or HAIR.
_GLOBAL_V2 = (1, 6, 1, 7)
_SIDES_V2 = ((1, 3, 3, 6), (4, 6, 3, 6))
MASKS_V2: dict[str, tuple | str] = {
    "5_o_Clock_Shadow": ((2, 5, 3, 5),),
    "Arched_Eyebrows": ((2, 5, 2, 4),),
    "Attractive": (_GLOBAL_V2,),
    "Bags_Under_Eyes": ((2, 5, 2, 4),),
    "Bald": ((2, 5, 0, 3),),
    "Bangs": ((2, 5, 2, 4),),
    "Big_Lips": ((2, 5, 4, 5),),
    "Big_Nose": ((2, 5, 3, 5),),
    "Black_Hair": HAIR,
    "Blond_Hair": HAIR,
    "Blurry": (_GLOBAL_V2,),
    "Brown_Hair": HAIR,
    "Bushy_Eyebrows": ((2, 5, 2, 4),),
    "Chubby": (_GLOBAL_V2,),
    "Double_Chin": ((2, 5, 5, 6),),
    "Eyeglasses": ((2, 5, 2, 4),),
    "Goatee": ((3, 4, 4, 6),),
    "Gray_Hair": HAIR,
    "Heavy_Makeup": ((2, 5, 3, 5),),
    "High_Cheekbones": ((2, 5, 3, 5),),
    "Male": (_GLOBAL_V2,),
    "Mouth_Slightly_Open": ((2, 5, 4, 5),),
    "Mustache": ((2, 5, 4, 5),),
    "Narrow_Eyes": ((2, 5, 2, 4),),
    "No_Beard": ((2, 5, 3, 5),),
    "Oval_Face": ((2, 5, 1, 6),),
    "Pale_Skin": ((2, 5, 1, 6),),
    "Pointy_Nose": ((2, 5, 3, 5),),
    "Receding_Hairline": ((2, 5, 0, 3),),
    "Rosy_Cheeks": ((2, 5, 3, 5),),
    "Sideburns": _SIDES_V2,
    "Smiling": ((2, 5, 4, 5),),
    "Straight_Hair": HAIR,
    "Wavy_Hair": HAIR,
    "Wearing_Earrings": _SIDES_V2,
    "Wearing_Hat": ((1, 6, 0, 3),),
    "Wearing_Lipstick": ((2, 5, 4, 5),),
    "Wearing_Necklace": ((2, 5, 5, 7),),
    "Wearing_Necktie": ((2, 5, 5, 7),),
    "Young": (_GLOBAL_V2,),
}
MASK_GLOBAL_V2 = _GLOBAL_V2
MASK_FACE_V2 = (2, 5, 2, 7)

assert set(MASKS_V1) == set(CELEBA_ATTRIBUTES) == set(MASKS_V2)


def v1_variables(landmarks: torch.Tensor, size: int) -> torch.Tensor:
    """The variables of Table A.1 (B, len(V1_VARIABLES)) from landmarks (B, 5, 2) of a size-S image."""
    lm = landmarks.to(torch.float32)
    x_el, y_el = lm[:, LEFT_EYE, 0], lm[:, LEFT_EYE, 1]
    x_er, y_er = lm[:, RIGHT_EYE, 0], lm[:, RIGHT_EYE, 1]
    x_n, y_n = lm[:, NOSE, 0], lm[:, NOSE, 1]
    x_ml, x_mr = lm[:, LEFT_MOUTH, 0], lm[:, RIGHT_MOUTH, 0]
    y_ec = (y_el + y_er) / 2
    y_mc = (lm[:, LEFT_MOUTH, 1] + lm[:, RIGHT_MOUTH, 1]) / 2
    x_hc = (x_el + x_er) / 2
    y_hl = y_ec - (y_mc - y_ec)
    y_fc = y_ec - (y_mc - y_ec) / 2
    zero = torch.zeros_like(x_n)
    side = torch.full_like(x_n, float(size))
    values = {"x_el": x_el, "x_er": x_er, "y_ec": y_ec, "x_n": x_n, "y_n": y_n, "x_ml": x_ml, "x_mr": x_mr,
              "y_mc": y_mc, "x_hc": x_hc, "y_hl": y_hl, "y_fc": y_fc, "zero": zero, "side": side}
    return torch.stack([values[v] for v in V1_VARIABLES], dim=1)


def _term_tensors(boxes: Sequence[tuple], device) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor([[V1_VARIABLES.index(var) for var, _ in box] for box in boxes], device=device)
    offset = torch.tensor([[float(off) for _, off in box] for box in boxes], device=device)
    return index, offset


def _check_size(size: int, fn: str) -> int:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{fn}: size must be a positive int (pixels of the square image), got {size!r}")
    return size


def masks_v1(landmarks: torch.Tensor, size: int, attributes: Sequence[str] | None = None) -> torch.Tensor:
    """Table A.1 masks (B, A, S, S) bool from landmarks (B, 5, 2) in pixels of the size-S AFFACT crop."""
    size = _check_size(size, "masks_v1")
    if landmarks.dim() != 3 or tuple(landmarks.shape[1:]) != (5, 2):
        raise ValueError(f"masks_v1: landmarks must be (B, 5, 2), got shape {tuple(landmarks.shape)}")
    names = resolve_attributes(attributes, "masks_v1: attributes")
    device = landmarks.device
    scale = size / TABLE_SIZE
    values = v1_variables(landmarks, size)  # (B, V)
    coords = torch.arange(size, device=device, dtype=torch.float32)

    def boxes_mask(boxes: Sequence[tuple]) -> torch.Tensor:
        index, offset = _term_tensors(boxes, device)
        edges = values[:, index] + offset * scale  # (B, P, 4)
        in_x = (coords >= edges[..., 0:1]) & (coords < edges[..., 1:2])  # (B, P, S)
        in_y = (coords >= edges[..., 2:3]) & (coords < edges[..., 3:4])
        return (in_y[..., :, None] & in_x[..., None, :]).any(dim=1)  # (B, S, S)

    (cx, ox), (cy, oy) = HAIR_ELLIPSE_V1["centre"]
    ex = values[:, V1_VARIABLES.index(cx)] + ox * scale
    ey = values[:, V1_VARIABLES.index(cy)] + oy * scale
    rx, ry = HAIR_ELLIPSE_V1["r_horizontal"] * scale, HAIR_ELLIPSE_V1["r_vertical"] * scale
    ellipse = (((coords[None, None, :] - ex[:, None, None]) / rx) ** 2
               + ((coords[None, :, None] - ey[:, None, None]) / ry) ** 2) <= 1
    hair = boxes_mask((MASK_GLOBAL_V1,)) & ~ellipse

    out = torch.empty(landmarks.shape[0], len(names), size, size, dtype=torch.bool, device=device)
    for i, name in enumerate(names):
        entry = MASKS_V1[name]
        out[:, i] = hair if entry == HAIR else boxes_mask(entry)
    return out


def masks_v2(size: int = TABLE_SIZE, attributes: Sequence[str] | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
    """Table A.2 masks (A, S, S) bool, the same for every image; blocks scale to S / 7 px."""
    size = _check_size(size, "masks_v2")
    names = resolve_attributes(attributes, "masks_v2: attributes")
    # Pixel i covers [i, i + 1) in edge coordinates; block edge b sits at b * S / 7.
    centres = (torch.arange(size, device=device, dtype=torch.float64) + 0.5) * (TABLE_SIZE / BLOCK) / size

    def box(b: tuple[int, int, int, int]) -> torch.Tensor:
        xl, xr, yt, yb = b
        in_x = (centres >= xl) & (centres < xr)
        in_y = (centres >= yt) & (centres < yb)
        return in_y[:, None] & in_x[None, :]

    hair = box(MASK_GLOBAL_V2) & ~box(MASK_FACE_V2)
    out = torch.empty(len(names), size, size, dtype=torch.bool, device=device)
    for i, name in enumerate(names):
        entry = MASKS_V2[name]
        if entry == HAIR:
            out[i] = hair
        else:
            mask = torch.zeros(size, size, dtype=torch.bool, device=device)
            for b in entry:
                mask |= box(b)
            out[i] = mask
    return out


def attribute_masks(version: int, size: int, landmarks: torch.Tensor | None = None,
                    attributes: Sequence[str] | None = None) -> torch.Tensor:
    """Masks of Table A.1 (version 1: needs landmarks, (B, A, S, S)) or A.2 (version 2: (A, S, S))."""
    if version == 1:
        if landmarks is None:
            raise ValueError("attribute_masks: mask version 1 needs landmarks (B, 5, 2)")
        return masks_v1(landmarks, size, attributes)
    if version == 2:
        device = landmarks.device if landmarks is not None else None
        return masks_v2(size, attributes, device=device)
    raise ValueError(f"attribute_masks: mask version must be 1 or 2, got {version!r}")
