"""AMR masks: Table A.2 blocks, Table A.1 boxes that follow the landmarks, scaling to other sizes."""
from __future__ import annotations

import pytest
import torch

from analysis.face_regions import masks_v1, masks_v2, attribute_masks
from facelens.attributes import ATTRIBUTE_INDEX, CELEBA_ATTRIBUTES
from facelens.geometry import canonical_landmarks

# Seed 004 Table A.2 as printed: x_l x_r y_t y_b in multiples of 32 px; "hair" = mask_global - mask_face.
TABLE_A2 = """
5_o_Clock_Shadow 2 5 3 5
Arched_Eyebrows 2 5 2 4
Attractive 1 6 1 7
Bags_Under_Eyes 2 5 2 4
Bald 2 5 0 3
Bangs 2 5 2 4
Big_Lips 2 5 4 5
Big_Nose 2 5 3 5
Black_Hair hair
Blond_Hair hair
Blurry 1 6 1 7
Brown_Hair hair
Bushy_Eyebrows 2 5 2 4
Chubby 1 6 1 7
Double_Chin 2 5 5 6
Eyeglasses 2 5 2 4
Goatee 3 4 4 6
Gray_Hair hair
Heavy_Makeup 2 5 3 5
High_Cheekbones 2 5 3 5
Male 1 6 1 7
Mouth_Slightly_Open 2 5 4 5
Mustache 2 5 4 5
Narrow_Eyes 2 5 2 4
No_Beard 2 5 3 5
Oval_Face 2 5 1 6
Pale_Skin 2 5 1 6
Pointy_Nose 2 5 3 5
Receding_Hairline 2 5 0 3
Rosy_Cheeks 2 5 3 5
Sideburns 1 3 3 6 4 6 3 6
Smiling 2 5 4 5
Straight_Hair hair
Wavy_Hair hair
Wearing_Earrings 1 3 3 6 4 6 3 6
Wearing_Hat 1 6 0 3
Wearing_Lipstick 2 5 4 5
Wearing_Necklace 2 5 5 7
Wearing_Necktie 2 5 5 7
Young 1 6 1 7
"""


def _block_mask(boxes, size=224, block=32):
    mask = torch.zeros(size, size, dtype=torch.bool)
    for xl, xr, yt, yb in boxes:
        mask[yt * block:yb * block, xl * block:xr * block] = True
    return mask


def test_v2_matches_table_blocks():
    masks = masks_v2(224)
    assert masks.shape == (40, 224, 224) and masks.dtype == torch.bool
    rows = [line.split() for line in TABLE_A2.strip().splitlines()]
    assert [r[0] for r in rows] == list(CELEBA_ATTRIBUTES)
    for name, *cells in rows:
        if cells == ["hair"]:
            expected = _block_mask([(1, 6, 1, 7)]) & ~_block_mask([(2, 5, 2, 7)])
        else:
            numbers = [int(c) for c in cells]
            expected = _block_mask([tuple(numbers[i:i + 4]) for i in range(0, len(numbers), 4)])
        assert torch.equal(masks[ATTRIBUTE_INDEX[name]], expected), name


def test_v2_scales_with_image_size():
    full = masks_v2(224)
    assert torch.equal(masks_v2(112), full[:, ::2, ::2])
    assert torch.equal(masks_v2(448)[:, ::2, ::2], full)
    sub = masks_v2(224, attributes=["Young", "Bald"])
    assert torch.equal(sub, full[[ATTRIBUTE_INDEX["Young"], ATTRIBUTE_INDEX["Bald"]]])


def _landmarks(nose=(100.0, 120.0)):
    """Eyes at y=100, x=80/120; nose as given; mouth corners at (88, 140) and (112, 140)."""
    lm = torch.tensor([[80.0, 100.0], [120.0, 100.0], list(nose), [88.0, 140.0], [112.0, 140.0]])
    return lm[None]


def test_v1_boxes_hand_computed():
    m = masks_v1(_landmarks(), 224)
    assert m.shape == (1, 40, 224, 224)
    expected = torch.zeros(224, 224, dtype=torch.bool)
    expected[105:128, 85:115] = True  # Big_Nose: x_n -15..+15, y_n -15..+8
    assert torch.equal(m[0, ATTRIBUTE_INDEX["Big_Nose"]], expected)
    expected = torch.zeros(224, 224, dtype=torch.bool)
    expected[85:115, 58:142] = True  # Eyeglasses: x_el - 22 .. x_er + 22, y_ec -15..+15
    assert torch.equal(m[0, ATTRIBUTE_INDEX["Eyeglasses"]], expected)
    expected = torch.zeros(224, 224, dtype=torch.bool)
    expected[170:224, 58:142] = True  # Wearing_Necklace: x_ml - 30 .. x_mr + 30, y_mc + 30 .. 224
    assert torch.equal(m[0, ATTRIBUTE_INDEX["Wearing_Necklace"]], expected)


def test_v1_two_part_and_hair_masks():
    m = masks_v1(_landmarks(), 224)[0]
    side = m[ATTRIBUTE_INDEX["Sideburns"]]
    expected = torch.zeros(224, 224, dtype=torch.bool)
    expected[104:148, 55:75] = True  # left: x_el - 25 .. x_el - 5; y_ec + 4 .. y_n + 28
    expected[104:148, 125:145] = True  # right: x_er + 5 .. x_er + 25
    assert torch.equal(side, expected)
    hair = m[ATTRIBUTE_INDEX["Black_Hair"]]
    for name in ("Blond_Hair", "Brown_Hair", "Gray_Hair", "Straight_Hair", "Wavy_Hair"):
        assert torch.equal(m[ATTRIBUTE_INDEX[name]], hair)
    glob = m[ATTRIBUTE_INDEX["Attractive"]]  # mask_global: x_n - 80 .. x_n + 75, y_n - 100 .. 224
    assert glob[20:224, 20:175].all() and glob.sum() == 204 * 155
    # The ellipse around (x_n, y_n - 15) = (100, 105), radii 45 across and 60 down, is cut out of it.
    assert not hair[105, 100] and not hair[105, 144] and not hair[164, 100]
    assert hair[105, 146] and hair[166, 100] and hair[21, 21]
    assert torch.equal(hair & ~glob, torch.zeros_like(hair))


@pytest.mark.parametrize("shift", [(3, -2), (-5, 4), (0, 7)])
def test_v1_masks_move_with_the_landmarks(shift):
    base = canonical_landmarks(224)[None]
    dx, dy = shift
    moved = masks_v1(base + torch.tensor([dx, dy], dtype=torch.float32), 224)
    ref = masks_v1(base, 224)
    rolled = torch.roll(ref, shifts=(dy, dx), dims=(-2, -1))
    k = max(abs(dx), abs(dy))
    inner = (slice(None), slice(None), slice(k, 224 - k), slice(k, 224 - k))
    # Only the image's own edges (224 in the table, the top for Wearing_Hat) stay put.
    assert torch.equal(moved[inner], rolled[inner])
    assert ref.flatten(2).any(-1).all()


def test_v1_batched_and_scaled():
    lm = torch.cat([_landmarks(), _landmarks((104.0, 118.0))])
    both = masks_v1(lm, 224)
    assert torch.equal(both[1:], masks_v1(lm[1:], 224))
    half = masks_v1(_landmarks() / 2, 112)[0, ATTRIBUTE_INDEX["Big_Nose"]]
    expected = torch.zeros(112, 112, dtype=torch.bool)
    expected[53:64, 43:58] = True  # x_n = 50 -> [42.5, 57.5), y_n = 60 -> [52.5, 64)
    assert torch.equal(half, expected)


def test_dispatch_and_errors():
    assert torch.equal(attribute_masks(2, 224), masks_v2(224))
    assert torch.equal(attribute_masks(1, 224, _landmarks()), masks_v1(_landmarks(), 224))
    with pytest.raises(ValueError, match="needs landmarks"):
        attribute_masks(1, 224)
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        attribute_masks(3, 224)
    with pytest.raises(ValueError, match=r"\(B, 5, 2\)"):
        masks_v1(torch.zeros(2, 4, 2), 224)
    with pytest.raises(ValueError, match="unknown attribute"):
        masks_v2(224, attributes=["Sunglasses"])
