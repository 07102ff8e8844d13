"""AMR per image (hand-computed), Table 5.1 aggregation (against float64 numpy), KL distance (by hand)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import rel_entr
from scipy.stats import pearsonr

from analysis.amr import GROUPS, AMRAccumulator, amr_scores, kl_distance, kl_divergence, pearson
from analysis.gradcam import upsample_maps
from facelens.attributes import CELEBA_ATTRIBUTES


def _hand_case():
    cam = torch.tensor([[0, 0, 0, 0], [0, 2, 1, 0], [0, 3, 0, 0], [0, 0, 0, 4]], dtype=torch.float32)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 1:3] = True
    return cam[None, None], mask[None]


def test_amr_hand_computed():
    maps, masks = _hand_case()
    s = amr_scores(maps, masks)
    # D = 4 pixels > 0, 3 of them in the 4-pixel mask; (I - M) / I = 12 / 16.
    assert s.amr_unadjusted.item() == pytest.approx(3 / 4)
    assert s.amr.item() == pytest.approx(3 / 4 * 12 / 16)
    # Energy: (2 + 1 + 3) of 10 inside.
    assert s.energy.item() == pytest.approx(6 / 10 * 12 / 16)
    t = amr_scores(maps, masks, threshold=1.5)  # D = {2, 3, 4}, 2 inside
    assert t.amr_unadjusted.item() == pytest.approx(2 / 3)
    assert t.amr.item() == pytest.approx(2 / 3 * 12 / 16)
    assert t.energy.item() == pytest.approx(6 / 10 * 12 / 16)


def test_amr_empty_map_scores_zero_and_shapes():
    maps, masks = _hand_case()
    zero = amr_scores(torch.zeros_like(maps), masks)
    assert zero.amr.item() == 0 and zero.amr_unadjusted.item() == 0 and zero.energy.item() == 0
    per_image = amr_scores(maps.expand(3, 1, 4, 4), masks[None].expand(3, 1, 4, 4))
    assert per_image.amr.shape == (3, 1)
    torch.testing.assert_close(per_image.amr, amr_scores(maps, masks).amr.expand(3, 1))
    with pytest.raises(ValueError, match="masks must be"):
        amr_scores(maps, masks.expand(2, 4, 4))


def test_small_maps_are_upsampled_to_the_mask():
    maps = torch.rand(2, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(1)) > 0.6
    direct = amr_scores(upsample_maps(maps, 12), masks, threshold=0.3)
    auto = amr_scores(maps, masks, threshold=0.3)
    for v in ("amr", "amr_unadjusted", "energy"):
        torch.testing.assert_close(getattr(auto, v), getattr(direct, v))


def _numpy_amr(cam, mask, threshold):
    disc = cam > threshold
    adjust = (mask.size - mask.sum()) / mask.size
    ratio = (disc & mask).sum() / disc.sum() if disc.sum() else 0.0
    energy = (cam * mask).sum() / cam.sum() if cam.sum() > 0 else 0.0
    return {"amr": ratio * adjust, "amr_unadjusted": ratio, "energy": energy * adjust}


def _random_batches(rng, t, size, batches):
    out = []
    for i, b in enumerate(batches):
        maps = rng.random((b, t, size, size)) * (rng.random((b, t, size, size)) > 0.4)
        maps[0, 0] = 0  # one empty map
        masks = rng.random((b, t, size, size)) > 0.5 if i == 0 else rng.random((t, size, size)) > 0.5
        out.append({"maps": maps, "logits": rng.normal(size=(b, t)),
                    "labels": (rng.random((b, t)) > 0.4) * 1.0,
                    "label_mask": rng.random((b, t)) > 0.15, "keep": rng.random(b) > 0.2, "masks": masks})
    return out


def test_aggregation_equals_numpy_float64():
    rng = np.random.default_rng(0)
    names = list(CELEBA_ATTRIBUTES[:4])
    batches = _random_batches(rng, len(names), 6, [7, 5, 6])
    acc = AMRAccumulator(names, threshold=0.2)
    for bt in batches:
        acc.update(torch.tensor(bt["maps"], dtype=torch.float32), torch.tensor(bt["logits"]),
                   torch.tensor(bt["labels"]), torch.tensor(bt["label_mask"]), torch.tensor(bt["masks"]),
                   keep=torch.tensor(bt["keep"]))
    res = acc.result()

    # Independent float64 reference: one loop over every (image, attribute).
    records = {g: {v: [[] for _ in names] for v in ("amr", "amr_unadjusted", "energy")} for g in GROUPS}
    maps_by_group = {g: [[] for _ in names] for g in GROUPS}
    errors = [[] for _ in names]
    for bt in batches:
        for b in range(len(bt["logits"])):
            for t in range(len(names)):
                if not (bt["keep"][b] and bt["label_mask"][b, t]):
                    continue
                cam = bt["maps"][b, t].astype(np.float32).astype(np.float64)
                mask = bt["masks"][b, t] if bt["masks"].ndim == 4 else bt["masks"][t]
                label = 1 if bt["labels"][b, t] == 1 else -1
                error = bt["logits"][b, t] * label < 0
                errors[t].append(error)
                groups = ["overall", "gt_pos" if label > 0 else "gt_neg",
                          "pred_incorrect" if error else "pred_correct"]
                scores = _numpy_amr(cam, mask, 0.2)
                shifted = cam - cam.min()
                for g in groups:
                    for v, s in scores.items():
                        records[g][v][t].append(s)
                    maps_by_group[g][t].append(shifted / (shifted.max() + 1e-7))
    np.testing.assert_allclose(res.error_rate, [np.mean(e) for e in errors], rtol=1e-12)
    for gi, g in enumerate(GROUPS):
        np.testing.assert_array_equal(res.counts[gi], [len(x) for x in records[g]["amr"]])
        for v in ("amr", "amr_unadjusted", "energy"):
            expected = [np.mean(x) if x else np.nan for x in records[g][v]]
            np.testing.assert_allclose(res.scores[v][gi], expected, rtol=1e-6, atol=1e-9)
        for t in range(len(names)):
            expected_map = np.mean(maps_by_group[g][t], axis=0)
            np.testing.assert_allclose(res.average_maps[gi, t], expected_map, rtol=1e-6)
    rho = np.corrcoef(res.error_rate, [np.mean(x) for x in records["overall"]["amr"]])[0, 1]
    assert res.correlation() == pytest.approx(rho, rel=1e-6)
    assert res.frontal_only


def test_label_mask_and_keep_exclude_entries():
    maps, masks = _hand_case()
    acc = AMRAccumulator(["Eyeglasses"])
    acc.update(maps.expand(3, 1, 4, 4), torch.tensor([[1.0], [-1.0], [2.0]]),
               torch.tensor([[1.0], [1.0], [0.0]]),
               torch.tensor([[True], [True], [False]]), masks, keep=torch.tensor([True, False, True]))
    res = acc.result()
    assert res.counts[:, 0].tolist() == [1, 1, 0, 1, 0]
    assert res.error_rate[0] == 0
    assert res.scores["amr"][0, 0] == pytest.approx(3 / 4 * 12 / 16)
    assert math.isnan(res.scores["amr"][2, 0])


def test_to_dict_and_table_shapes():
    rng = np.random.default_rng(1)
    names = ["Bald", "Smiling", "Young"]
    acc = AMRAccumulator(names)
    for bt in _random_batches(rng, 3, 6, [8]):
        acc.update(torch.tensor(bt["maps"]), torch.tensor(bt["logits"]), torch.tensor(bt["labels"]),
                   None, torch.tensor(bt["masks"]))
    res = acc.result()
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert set(d["attributes"]) == set(names)
    assert set(d["attributes"]["Bald"]["amr"]) == set(GROUPS)
    assert d["attributes"]["Bald"]["error_rate"] == pytest.approx(res.error_rate[0])
    assert d["correlation"] == pytest.approx(res.correlation())
    rows = res.to_table(order="imbalance")
    assert [r[0] for r in rows] == ["Smiling", "Young", "Bald", "OVERALL"]
    assert rows[-1][2] == pytest.approx(np.mean(res.scores["amr"][0]))
    assert set(res.to_arrays()) >= {"average_maps", "error_rate", "score_amr", "counts"}


def test_pearson_matches_scipy():
    x, y = np.random.default_rng(2).random((2, 40))
    assert pearson(x, y) == pytest.approx(pearsonr(x, y)[0], rel=1e-12)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]))


def test_kl_by_hand():
    p = np.ones((2, 2))
    q = np.array([[1.0, 1.0], [1.0, 5.0]])
    expected = 3 * 0.25 * math.log(0.25 / 0.125) + 0.25 * math.log(0.25 / 0.625)
    assert kl_divergence(p, q, eps=0.0) == pytest.approx(expected, rel=1e-12)
    assert kl_divergence(p, p, eps=0.0) == 0


def test_kl_distance_between_results():
    rng = np.random.default_rng(3)
    names = ["Eyeglasses", "Smiling"]
    results = []
    for _ in range(2):
        acc = AMRAccumulator(names, map_normalization="none")
        for bt in _random_batches(rng, 2, 5, [6]):
            acc.update(torch.tensor(bt["maps"]), torch.tensor(bt["logits"]), torch.tensor(bt["labels"]),
                       None, torch.tensor(bt["masks"]))
        results.append(acc.result())
    kl = kl_distance(results[0], results[1], eps=1e-10)
    for t, name in enumerate(names):
        p = results[0].average_maps[0, t] + 1e-10
        q = results[1].average_maps[0, t] + 1e-10
        expected = rel_entr(p / p.sum(), q / q.sum()).sum()
        assert kl[name] == pytest.approx(expected, rel=1e-9)
    within = kl_distance(results[0], results[0], group="gt_pos", group_b="gt_neg")
    g = results[0].average_maps
    p, q = g[1, 0] + 1e-10, g[2, 0] + 1e-10
    assert within["Eyeglasses"] == pytest.approx(rel_entr(p / p.sum(), q / q.sum()).sum(), rel=1e-9)
