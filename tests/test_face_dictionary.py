import json

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.face_dictionary import (
    ELLIPSE_RECIPES, FaceDictionary, balanced_subset, build, build_synthfaces, build_utkface, chi2_radius2,
    ellipse_masks, main, merge, parse_utkface_name, to_grayscale,
)
from facelens.geometry import canonical_landmarks


@pytest.fixture(scope="module")
def small():
    return build_synthfaces(24, size=64, seed=1)


def recipe(name):
    return [r for r in ELLIPSE_RECIPES if r[0] == name]


def test_chi2_radius_matches_scipy():
    from scipy.stats import chi2

    for p in (0.5, 0.9, 0.99):
        assert chi2_radius2(p) == pytest.approx(chi2.ppf(p, 2), rel=1e-12)


def test_eyes_ellipse_covers_both_eyes_not_the_mouth():
    size = 112
    lm = canonical_landmarks(size).double().numpy()
    # a rotated, shifted face too: the ellipse must follow the landmarks
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    lm2 = (lm - lm.mean(0)) @ rot.T + lm.mean(0) + np.array([4.0, -3.0])
    masks = ellipse_masks(np.stack([lm, lm2]), (size, size), 0.9, recipe("eyes") + recipe("mouth"))
    for i, l in enumerate((lm, lm2)):
        px = np.rint(l).astype(int)
        eyes, mouth = masks[i, 0], masks[i, 1]
        assert eyes[px[0, 1], px[0, 0]] and eyes[px[1, 1], px[1, 0]]
        assert not eyes[px[3, 1], px[3, 0]] and not eyes[px[4, 1], px[4, 0]] and not eyes[px[2, 1], px[2, 0]]
        assert mouth[px[3, 1], px[3, 0]] and mouth[px[4, 1], px[4, 0]] and not mouth[px[0, 1], px[0, 0]]
    # a higher confidence level gives a larger ellipse; area = pi * r^2 * sqrt(det S)
    small_area = ellipse_masks(lm[None], (size, size), 0.5, recipe("eyes")).sum()
    big_area = ellipse_masks(lm[None], (size, size), 0.95, recipe("eyes")).sum()
    assert big_area > small_area
    d = np.linalg.norm((lm[3] + lm[4]) / 2 - (lm[0] + lm[1]) / 2)
    expected = np.pi * chi2_radius2(0.95) * 0.42 * 0.1 * d**2
    assert big_area == pytest.approx(expected, rel=0.05)


def test_round_trip_through_disk(small, tmp_path):
    small.save(tmp_path / "d")
    back = FaceDictionary.load(tmp_path / "d")
    np.testing.assert_array_equal(back.images, small.images)
    np.testing.assert_array_equal(back.masks, small.masks)
    np.testing.assert_array_equal(back.labelled, small.labelled)
    np.testing.assert_allclose(back.landmarks, small.landmarks)
    assert back.concepts == small.concepts and back.concept_regions == small.concept_regions
    assert back.global_groups == small.global_groups
    for g in small.global_groups:
        np.testing.assert_array_equal(back.global_labels[g], small.global_labels[g])
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert set(index["regions"]) >= {"eyes", "brows", "nose", "mouth", "cheeks", "chin", "forehead_hair"}
    assert "drawn_eyeglasses" in index["regions"]["eyes"] and "Eyeglasses" in index["regions"]["eyes"]
    with pytest.raises(FileNotFoundError, match="index.json"):
        FaceDictionary.load(tmp_path / "missing")


def test_synthfaces_content_and_batches(small):
    n = 24
    assert len(small) == 2 * n  # colour images plus their grayscale copies
    assert small.global_groups["skin_tone"] == ["light", "dark"] and "ethnicity" not in small.global_groups
    # the drawn eyeglasses mask exists exactly where the Eyeglasses ellipse concept is present
    k_drawn, k_ell = small.concepts.index("drawn_eyeglasses"), small.concepts.index("Eyeglasses")
    for i in range(n):
        m = small.mask(i)
        assert m[k_drawn].any() == m[k_ell].any()
        assert m[small.concepts.index("eyes")].any()
    gray = small.images[small.global_labels["grayscale"] == 1].astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    batch = next(iter(small.dataloader(batch_size=5)))
    assert batch["image"].shape == (5, 3, 64, 64) and batch["image"].max() <= 1
    assert batch["concept_masks"].shape == (5, len(small.concepts), 64, 64) and batch["concept_masks"].dtype == torch.bool
    assert batch["concept_labelled"].shape == (5, len(small.concepts))
    assert set(small.global_groups) <= set(batch) and batch["index"].tolist() == [0, 1, 2, 3, 4]


def test_global_sets_are_balanced(small):
    for g, subs in small.global_groups.items():
        counts = [(small.global_labels[g] == s).sum() for s in range(len(subs))]
        assert len(set(counts)) == 1, (g, counts)
    rng = np.random.default_rng(0)
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7 + [-1] * 2)
    out = balanced_subset(labels, 3, None, rng)
    assert [(out == s).sum() for s in range(3)] == [3, 3, 3]
    assert ((out == labels) | (out == -1)).all()
    assert [(balanced_subset(labels, 3, 2, rng) == s).sum() for s in range(3)] == [2, 2, 2]


def test_grayscale_weights():
    img = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    assert to_grayscale(img)[0, :, 0].tolist() == [76, 150, 29]


def write_utk(folder, names):
    folder.mkdir()
    for k, n in enumerate(names):
        Image.fromarray(np.full((20, 20, 3), 10 * k, np.uint8)).save(folder / n)


def test_utkface_names_parse_and_form_global_sets(tmp_path, small):
    assert parse_utkface_name("/x/26_1_2_20170116174525125.jpg.chip.jpg") == (26, 1, 2)
    assert parse_utkface_name("61_0_4_20170117191626447.jpg") == (61, 0, 4)
    with pytest.raises(ValueError, match="bad_name.jpg"):
        parse_utkface_name("bad_name.jpg")
    names = [f"{a}_{g}_{r}_2017011{k}.jpg" for k, (a, g, r) in enumerate(
        [(5, 0, 0), (25, 1, 1), (45, 0, 2), (70, 1, 3), (15, 1, 0), (30, 0, 1), (50, 1, 2), (65, 0, 3), (33, 0, 4)])]
    write_utk(tmp_path / "utk", names)
    d = build_utkface(tmp_path / "utk", size=64, grayscale=False)
    assert d.global_groups["ethnicity"] == ["white", "black", "asian", "indian"]
    assert [(d.global_labels["ethnicity"] == s).sum() for s in range(4)] == [2, 2, 2, 2]
    others = d.source_names.index(names[-1])
    assert d.global_labels["ethnicity"][others] == -1  # race 4 (others) is left out
    assert [(d.global_labels["age_group"] == s).sum() for s in range(4)] == [2, 2, 2, 2]
    assert d.concepts == []
    m = merge([small, d])
    assert len(m) == len(small) + 9 and not m.labelled[len(small):].any()
    assert (m.global_labels["ethnicity"][:len(small)] == -1).all()
    bad = tmp_path / "bad"
    write_utk(bad, ["1_0_0_1.jpg", "oops.jpg"])
    with pytest.raises(ValueError, match="oops.jpg"):
        build_utkface(bad)


def test_cli_builds_a_loadable_dictionary(tmp_path, capsys):
    assert main(["build", "--source", "synthfaces", "--out", str(tmp_path / "cli"), "--count", "6", "--size", "64",
                 "--seed", "3"]) == 0
    d = FaceDictionary.load(tmp_path / "cli")
    assert len(d) == 12 and d.size == (64, 64)
    assert "12 images" in capsys.readouterr().out
    with pytest.raises(ValueError, match="source"):
        build("imagenet")
