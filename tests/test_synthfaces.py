"""SynthFaces: determinism, labels vs drawn concepts, landmarks, priors/correlations, CLI, data module."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.synthfaces import (
    CONCEPT_ATTRIBUTE,
    CONCEPTS,
    DRAWN_ATTRIBUTES,
    HAIR_COLOURS,
    NEGATED_CONCEPTS,
    SynthFaces,
    SynthFacesDataModule,
    main,
    sample_labels,
)
from facelens.attributes import ATTRIBUTE_INDEX, CELEBA_ATTRIBUTES
from facelens.geometry import LANDMARK_NAMES

AI = ATTRIBUTE_INDEX


@pytest.fixture(scope="module")
def uniform_faces():
    """120 faces at 64 px with every drawable attribute common, with masks."""
    ds = SynthFaces(120, size=64, seed=3, prior_preset="uniform", num_identities=120, return_masks=True)
    return [ds.render(i) for i in range(len(ds))]


def test_same_seed_and_index_give_identical_bytes():
    a = SynthFaces(5, size=80, seed=11, return_masks=True)
    b = SynthFaces(5, size=80, seed=11, return_masks=True)
    for i in (0, 4):
        fa, fb = a.render(i), b.render(i)
        assert fa.image.tobytes() == fb.image.tobytes()
        assert fa.concept_masks.tobytes() == fb.concept_masks.tobytes()
        assert np.array_equal(fa.landmarks, fb.landmarks)
    other = SynthFaces(5, size=80, seed=12).render(0)
    assert other.image.tobytes() != a.render(0).image.tobytes()
    assert a.render(1).image.tobytes() != a.render(0).image.tobytes()


def test_drawn_concepts_present_exactly_when_labelled(uniform_faces):
    checked = {c: 0 for c, a in CONCEPT_ATTRIBUTE.items() if a is not None}
    positives = dict(checked)
    for face in uniform_faces:
        lab = face.labels
        assert face.concept_masks.shape == (len(CONCEPTS), 64, 64) and face.concept_masks.dtype == bool
        for k, concept in enumerate(CONCEPTS):
            attr = CONCEPT_ATTRIBUTE[concept]
            if attr is None or not lab.attribute_mask[AI[attr]]:
                continue
            present = bool(lab.attributes[AI[attr]]) != (concept in NEGATED_CONCEPTS)
            if concept == "beard":  # No_Beard = 0 can also mean a goatee only
                present = lab.full_beard
                assert lab.full_beard <= (lab.attributes[AI["No_Beard"]] == 0)
            assert bool(face.concept_masks[k].any()) == present, (concept, lab)
            checked[concept] += 1
            positives[concept] += present
    # every attribute concept was seen both present and absent
    for concept in checked:
        assert 0 < positives[concept] < checked[concept], concept


def test_concept_masks_lie_where_the_concept_belongs(uniform_faces):
    def centroid_y(mask):
        ys, _ = np.nonzero(mask)
        return ys.mean()

    for face in uniform_faces:
        lm = face.landmarks
        eye_y, mouth_y, nose_y = lm[:2, 1].mean(), lm[3:, 1].mean(), lm[2, 1]
        d = mouth_y - eye_y
        m = {c: face.concept_masks[k] for k, c in enumerate(CONCEPTS)}
        assert not (m["background"] & m["skin"]).any()
        if m["eyeglasses"].any():
            assert abs(centroid_y(m["eyeglasses"]) - eye_y) < 0.35 * d
        if m["hat"].any():
            assert centroid_y(m["hat"]) < eye_y - 0.8 * d
        if m["necktie"].any():
            assert centroid_y(m["necktie"]) > mouth_y + 1.2 * d
        if m["mustache"].any():
            assert nose_y < centroid_y(m["mustache"]) < mouth_y + 0.1 * d
        if m["goatee"].any():
            assert centroid_y(m["goatee"]) > mouth_y
        if m["bangs"].any():
            assert centroid_y(m["bangs"]) < eye_y
        # lipstick is painted lips: inside the mouth
        assert not (m["lipstick"] & ~m["mouth"]).any()
        assert not (m["mouth_open"] & ~m["mouth"]).any()


def test_landmarks_inside_image_in_celeba_order_and_on_the_drawn_parts(uniform_faces):
    assert LANDMARK_NAMES == ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
    for face in uniform_faces:
        lm = face.landmarks
        assert lm.shape == (5, 2) and lm.dtype == np.float32
        assert (lm >= 0).all() and (lm <= 63).all()
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
        assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])
        eyes = face.concept_masks[CONCEPTS.index("eyes")]
        nose = face.concept_masks[CONCEPTS.index("nose")]
        for i in (0, 1):  # the eye landmark is the iris centre, which nothing covers
            x, y = np.rint(lm[i]).astype(int)
            assert eyes[y, x]
        x, y = np.rint(lm[2]).astype(int)
        assert nose[y - 1:y + 2, x - 1:x + 2].any()
        # mouth corners are the ends of the drawn mouth
        ys, xs = np.nonzero(face.concept_masks[CONCEPTS.index("mouth")])
        corners = np.stack([xs, ys], 1)
        for i in (3, 4):
            assert np.hypot(*(corners - lm[i]).T).min() < 1.5


def test_attribute_mask_covers_the_drawn_attributes():
    labels = sample_labels(50, seed=1)
    mask = labels["attribute_mask"]
    assert mask.shape == (50, 40) and mask.dtype == bool
    assert mask.any(0).sum() >= 20
    assert len(DRAWN_ATTRIBUTES) >= 20
    assert not mask[:, AI["Attractive"]].any()  # undrawn -> masked, never a silent 0
    # occlusion: a hat hides baldness, a full beard hides stubble
    full = sample_labels(300, seed=2, prior_preset="uniform")
    hat = full["attributes"][:, AI["Wearing_Hat"]] == 1
    assert not full["attribute_mask"][hat, AI["Bald"]].any()
    assert full["attribute_mask"][~hat, AI["Bald"]].all()


def test_priors_are_honoured_without_correlations():
    priors = {"Eyeglasses": 0.3, "Smiling": 0.7, "Wearing_Hat": 0.1, "Male": 0.4, "Blond_Hair": 0.3,
              "Gray_Hair": 0.2, "Black_Hair": 0.1, "Brown_Hair": 0.2, "No_Beard": 0.6, "Goatee": 0.15}
    n = 1500
    labels = sample_labels(n, seed=4, num_identities=n, priors=priors, correlations=[])
    rates = labels["attributes"].mean(0)
    for name, p in priors.items():
        tol = 4.5 * math.sqrt(p * (1 - p) / n)
        assert abs(rates[AI[name]] - p) < tol, (name, rates[AI[name]], p)
    # the celeba preset reproduces CelebA's imbalance
    celeba = sample_labels(n, seed=5, num_identities=n, prior_preset="celeba", correlations=[])
    rates = celeba["attributes"].mean(0)
    assert abs(rates[AI["Eyeglasses"]] - 0.065) < 0.03 and abs(rates[AI["Young"]] - 0.774) < 0.05


def test_logical_constraints_hold():
    labels = sample_labels(800, seed=6, num_identities=800, prior_preset="uniform")
    a = labels["attributes"]
    assert (a[:, [AI[c] for c in HAIR_COLOURS]].sum(1) <= 1).all()
    assert not ((a[:, AI["Straight_Hair"]] == 1) & (a[:, AI["Wavy_Hair"]] == 1)).any()
    bald = a[:, AI["Bald"]] == 1
    assert bald.any() and (a[bald][:, [AI["Bangs"], AI["Receding_Hairline"]]] == 0).all()
    goatee = a[:, AI["Goatee"]] == 1
    assert goatee.any() and (a[goatee, AI["No_Beard"]] == 0).all()
    assert (labels["gender"] == a[:, AI["Male"]]).all()
    young = a[:, AI["Young"]] == 1
    assert (labels["age_group"][young] <= 1).all() and (labels["age_group"][~young] >= 2).all()


@pytest.mark.parametrize("rho", [0.6, -0.6])
def test_configured_correlation_shows_with_its_sign(rho):
    labels = sample_labels(800, seed=7, num_identities=800, correlations=[("Smiling", "Eyeglasses", rho)])
    x, y = labels["attributes"][:, AI["Smiling"]], labels["attributes"][:, AI["Eyeglasses"]]
    phi = np.corrcoef(x, y)[0, 1]
    assert phi * np.sign(rho) > 0.2
    indep = sample_labels(800, seed=7, num_identities=800, correlations=[])["attributes"]
    assert abs(np.corrcoef(indep[:, AI["Smiling"]], indep[:, AI["Eyeglasses"]])[0, 1]) < 0.12


def test_identities_disjoint_across_splits_and_traits_stable():
    ids = {s: sample_labels(40, split=s, num_identities=20) for s in ("train", "val", "test")}
    sets = {s: set(v["identity"].tolist()) for s, v in ids.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    tr = ids["train"]
    for ident in sets["train"]:
        sel = tr["identity"] == ident
        assert sel.sum() == 2
        for key in ("gender", "age_group", "skin_tone"):
            assert len(set(tr[key][sel].tolist())) == 1


def test_grayscale_flag_makes_gray_images():
    ds = SynthFaces(4, size=64, grayscale_rate=1.0)
    face = ds.render(0)
    assert face.labels.grayscale == 1
    assert (face.image[..., 0] == face.image[..., 1]).all() and (face.image[..., 1] == face.image[..., 2]).all()
    assert SynthFaces(4, size=64).render(0).labels.grayscale == 0


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_cli_is_byte_identical(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["export", "--out", str(tmp_path / name), "--count", "3", "--seed", "5", "--size", "64"]) == 0
    assert "wrote 3 faces" in capsys.readouterr().out
    da, db = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert da == db and "images/000002.png" in da and "masks/skin/000000.png" in da
    rows = (tmp_path / "a" / "labels.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:41] == ["image", *CELEBA_ATTRIBUTES] and header[41:43] == ["lefteye_x", "lefteye_y"]
    assert header[-5:] == ["identity", "gender", "age_group", "skin_tone", "grayscale"] and len(rows) == 4
    first = rows[1].split(",")
    assert first[1 + AI["Attractive"]] == "" and set(first[1:41]) <= {"", "1", "-1"}
    main(["export", "--out", str(tmp_path / "c"), "--count", "3", "--seed", "6", "--size", "64"])
    assert _tree_digest(tmp_path / "c") != da


@pytest.mark.parametrize("kwargs, option", [
    ({"size": 63}, "size"), ({"size": 225}, "size"), ({"priors": {"Glasses": 0.5}}, "priors"),
    ({"priors": {"Male": 1.5}}, "priors"), ({"priors": {"Attractive": 0.5}}, "priors"),
    ({"priors": {"Black_Hair": 0.6, "Blond_Hair": 0.6}}, "priors"),
    ({"correlations": [("Male", "Beard", 0.3)]}, "correlations"),
    ({"correlations": [("Male", "Eyeglasses", 1.5)]}, "correlations"),
    ({"correlations": [("Male", "Eyeglasses")]}, "correlations"),
    ({"grayscale_rate": 1.2}, "grayscale_rate"), ({"prior_preset": "realistic"}, "prior_preset"),
    ({"num_identities": 0}, "num_identities"), ({"batch_size": 0}, "batch_size"),
])
def test_bad_options_raise_errors_naming_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        SynthFacesDataModule(**kwargs)


def test_unrepresentable_correlations_are_projected_with_a_warning():
    with pytest.warns(UserWarning, match="correlations"):
        labels = sample_labels(10, correlations=[("Male", "Smiling", 0.95), ("Male", "Eyeglasses", 0.95),
                                                 ("Smiling", "Eyeglasses", -0.95)])
    assert labels["attributes"].shape == (10, 40)


def test_datamodule_batches_follow_the_contract():
    dm = SynthFacesDataModule(size=64, num_train=10, num_val=6, num_test=4, num_identities=5, batch_size=4,
                              num_workers=0, return_masks=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    expect = {"image": ((4, 3, 64, 64), torch.float32), "attributes": ((4, 40), torch.float32),
              "attribute_mask": ((4, 40), torch.bool), "landmarks": ((4, 5, 2), torch.float32),
              "identity": ((4,), torch.int64), "index": ((4,), torch.int64), "gender": ((4,), torch.int64),
              "age_group": ((4,), torch.int64), "skin_tone": ((4,), torch.int64), "grayscale": ((4,), torch.int64),
              "concept_masks": ((4, len(CONCEPTS), 64, 64), torch.bool)}
    assert set(batch) == set(expect)
    for key, (shape, dtype) in expect.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert set(batch["attributes"].unique().tolist()) <= {0.0, 1.0}
    # shuffling is seeded: the same order twice
    order = [b["index"].tolist() for b in dm.train_dataloader()]
    assert order == [b["index"].tolist() for b in dm.train_dataloader()] and sorted(sum(order, [])) == list(range(10))
    # the cache holds exactly what rendering gives
    cached = SynthFacesDataModule(size=64, num_train=10, num_val=6, num_test=4, num_identities=5, batch_size=6,
                                  num_workers=0, return_masks=True, cache=True)
    cached.setup("validate")
    dm.setup("validate")
    plain = next(iter(SynthFacesDataModule(size=64, num_val=6, num_identities=5, batch_size=6, num_workers=0,
                                           return_masks=True).val_dataloader()))
    got = next(iter(cached.val_dataloader()))
    for key in expect:
        assert torch.equal(plain[key], got[key]), key


def test_augment_hook_runs_only_on_training_batches():
    dm = SynthFacesDataModule(num_workers=0)
    batch = {"image": torch.zeros(1, 3, 64, 64)}
    dm.trainer = SimpleNamespace(training=True)
    assert dm.on_after_batch_transfer(batch, 0) is batch  # no augmentation set
    dm.augment = lambda b: {**b, "augmented": True}
    assert dm.on_after_batch_transfer(batch, 0)["augmented"]
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer(batch, 0) is batch


def _best_single_pixel_accuracy(images: np.ndarray, y: np.ndarray) -> float:
    """Best accuracy of a threshold on one pixel value (either direction), over all pixels and channels."""
    x = images.reshape(len(images), -1).astype(np.float64)
    order = np.argsort(x, axis=0, kind="stable")
    ys = y[order]  # labels sorted by each feature
    pos_below = np.cumsum(ys, axis=0)
    k = np.arange(1, len(y) + 1)[:, None]
    # predict 0 below the cut, 1 above (or the reverse)
    acc = (k - pos_below + (y.sum() - pos_below)) / len(y)
    return float(np.maximum(acc, 1 - acc).max())


def test_no_fixed_pixel_reveals_eyeglasses(monkeypatch):
    n = 240
    ds = SynthFaces(n, size=64, seed=8, num_identities=n, priors={"Eyeglasses": 0.5}, correlations=[])
    y = np.array([ds.labels(i).attributes[AI["Eyeglasses"]] for i in range(n)], dtype=np.int64)
    jittered = np.stack([ds.render(i).image for i in range(n)])
    # reference: the same faces with the pose jitter switched off
    fixed = ds.renderer.pose(np.random.default_rng(0))
    fixed[:, :2] = np.eye(2) * ds.renderer.d
    fixed[:, 2] = ds.renderer.eye_centre

    def no_jitter(rng):
        rng.uniform(size=4)
        return fixed.copy()

    monkeypatch.setattr(ds.renderer, "pose", no_jitter)
    aligned = np.stack([ds.render(i).image for i in range(n)])
    acc_jittered = _best_single_pixel_accuracy(jittered, y)
    acc_aligned = _best_single_pixel_accuracy(aligned, y)
    print(f"best single-pixel accuracy: jittered {acc_jittered:.3f}, aligned {acc_aligned:.3f}")
    assert acc_aligned > 0.75
    assert acc_jittered < 0.72 and acc_jittered < acc_aligned - 0.1
