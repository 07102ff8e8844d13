import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from analysis.dissection import (
    DissectionConfig,
    DissectionResult,
    ExactTopQuantile,
    LayerDissector,
    SketchTopQuantile,
    concept_scores,
    dissect,
    mask_areas,
    netdissect_iou,
    plot_biased_counts,
    plot_concept_histogram,
    plot_coverage,
    plot_region_counts,
    plot_top_images,
    plot_unit_probabilities,
    stage1_global_concepts,
    stage3_local_concepts,
)

_spec = importlib.util.spec_from_file_location("bench_dissection", Path(__file__).parents[1] / "bench" / "dissection.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The machine is shared; one thread avoids OpenMP oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def numpy_thresholds(acts: np.ndarray, q: float) -> np.ndarray:
    return np.array([np.quantile(acts[:, u].astype(np.float64).ravel(), 1 - q) for u in range(acts.shape[1])])


@pytest.mark.parametrize("q", [0.005, 0.1, 0.6])
def test_exact_thresholds_equal_numpy(q):
    rng = np.random.default_rng(1)
    acts = np.maximum(rng.standard_normal((37, 6, 5, 4)), 0).astype(np.float32)  # ReLU: many tied zeros
    acts[:, 3] *= 1e-3
    est = ExactTopQuantile(num_images=37, quantile=q)
    for s in range(0, 37, 8):
        est.update(torch.from_numpy(acts[s:s + 8]))
    np.testing.assert_allclose(est.thresholds(), numpy_thresholds(acts, q), rtol=1e-12, atol=0)


@pytest.mark.parametrize("q", [0.01, 0.5])  # small k: sorted buffers; large k: heaps
def test_exact_thresholds_stay_exact_when_updated_after_a_merge(q):
    acts = np.random.default_rng(2).standard_normal((30, 4, 6, 6)).astype(np.float32)
    first, second = ExactTopQuantile(30, q), ExactTopQuantile(30, q)
    first.update(torch.from_numpy(acts[:10]))
    second.update(torch.from_numpy(acts[10:20]))
    first.merge(second).update(torch.from_numpy(acts[20:]))
    np.testing.assert_allclose(first.thresholds(), numpy_thresholds(acts, q), rtol=1e-12, atol=0)


def test_exact_thresholds_refuse_more_images_than_declared():
    est = ExactTopQuantile(num_images=4)
    est.update(torch.ones(4, 2, 3, 3))
    with pytest.raises(ValueError, match="num_images=4"):
        est.update(torch.ones(1, 2, 3, 3))


def test_sketch_thresholds_within_documented_error():
    rng = np.random.default_rng(2)
    acts = (rng.standard_normal((60, 5, 7, 7)) * np.array([1, 10, 0.01, 3, 1])[None, :, None, None])
    acts[:, 4] = -np.abs(acts[:, 4])  # a unit whose top quantile is negative
    acts = acts.astype(np.float32)
    alpha = 0.002
    est = SketchTopQuantile(0.005, relative_error=alpha)
    for s in range(0, 60, 16):
        est.update(torch.from_numpy(acts[s:s + 16]))
    got = est.thresholds()
    for u in range(5):
        x = np.sort(acts[:, u].astype(np.float64).ravel())
        virtual = (len(x) - 1) * (1 - 0.005)
        lo, hi = x[int(np.floor(virtual))], x[min(int(np.floor(virtual)) + 1, len(x) - 1)]
        exact = np.quantile(x, 1 - 0.005)
        bound = alpha * max(abs(lo), abs(hi)) + 1e-6
        assert abs(got[u] - exact) <= bound, (u, got[u], exact, bound)
        assert abs(got[u] - exact) > 0 or u == 4  # it is an approximation, not a copy


def planted_dictionary(n=24, h=16, scale=4, seed=0):
    """Concept 0: a 2x2-cell block per image; unit 0 copies it, unit 1 is noise, unit 2 copies concept 1."""
    rng = np.random.default_rng(seed)
    hm = h * scale
    acts = np.abs(rng.standard_normal((n, 3, h, h))).astype(np.float32) * 0.01
    masks = np.zeros((n, 2, hm, hm), dtype=bool)
    for i in range(n):
        y, x = rng.integers(1, h - 3, size=2)
        acts[i, 0, y:y + 2, x:x + 2] += 1
        masks[i, 0, y * scale:(y + 2) * scale, x * scale:(x + 2) * scale] = True
        y, x = rng.integers(0, h - 6, size=2)
        masks[i, 1, y * scale:(y + 6) * scale, x * scale:(x + 6) * scale] = True
        acts[i, 2, y:y + 6, x:x + 6] += 1
    acts[:, 1] = rng.standard_normal((n, h, h))
    return acts, masks


def test_planted_unit_pairs_with_its_concept_and_noise_does_not():
    acts, masks = planted_dictionary()
    n, _, h, w = acts.shape
    # quantile = the planted block's share of unit 0's values, placed so the threshold falls halfway
    # between background and block: the upsampled block thresholds to the 8x8 mask less its 4
    # corner pixels (bilinear 0.625 * 0.625 < 0.5), IoU 60 / 64
    q = (4 * n - 0.5) / (n * h * w - 1)
    thresholds, iou = netdissect_iou(torch.from_numpy(acts), torch.from_numpy(masks), quantile=q)
    assert iou[0].argmax() == 0 and iou[0, 0] == pytest.approx(60 / 64, abs=1e-3)
    assert iou[1].max() < 0.04
    assert iou[0, 1] < 0.1


@pytest.mark.parametrize("tally", ["compiled", "sparse", "dense"])
@pytest.mark.parametrize("fires_only", [False, True])
def test_iou_matches_numpy_reference(tally, fires_only):
    acts, masks = bench.synthetic_dictionary(20, 24, 6, feature_size=7, mask_size=56, planted=4, seed=3)
    labelled = torch.rand(20, 6, generator=torch.Generator().manual_seed(0)) < 0.8
    masks &= labelled[:, :, None, None]
    cfg = DissectionConfig(tally=tally, chunk_elements=5000)  # small chunks exercise the chunk loop
    t, iou = netdissect_iou(acts, masks, 0.02, labelled=labelled, fires_only=fires_only, config=cfg, batch_size=7)
    t_ref, iou_ref = bench.reference_netdissect(acts.numpy(), masks.numpy(), 0.02, labelled.numpy(), fires_only)
    np.testing.assert_allclose(t, t_ref, rtol=1e-12)
    np.testing.assert_allclose(iou, iou_ref, atol=1e-6, rtol=0)
    assert iou_ref.max() > 0.1  # the planted units make the comparison non-trivial


@pytest.mark.parametrize("feature_size, mask_size, concepts", [
    (7, 112, 70),  # more concepts than one 62-bit membership word
    (14, 9, 5),  # masks coarser than the maps
    (1, 16, 3),  # (B, U) vectors as 1x1 maps
    (6, 6, 4),  # no resampling
])
def test_compiled_tally_matches_reference_across_shapes(feature_size, mask_size, concepts):
    acts, masks = bench.synthetic_dictionary(12, 10, concepts, feature_size=feature_size, mask_size=mask_size,
                                             planted=4, seed=5)
    labelled = torch.rand(12, concepts, generator=torch.Generator().manual_seed(1)) < 0.8
    cfg = DissectionConfig(tally="compiled")
    for fires_only in (False, True):
        _, iou = netdissect_iou(acts, masks, 0.05, labelled=labelled, fires_only=fires_only, config=cfg, batch_size=5)
        _, iou_ref = bench.reference_netdissect(acts.numpy(), (masks & labelled[:, :, None, None]).numpy(), 0.05,
                                                labelled.numpy(), fires_only)
        np.testing.assert_allclose(iou, iou_ref, atol=1e-6, rtol=0)
        assert iou_ref.max() > 0.02  # non-trivial counts


def test_compiled_tally_with_a_distinct_concept_set_at_almost_every_pixel():
    rng = np.random.default_rng(0)
    acts = rng.random((6, 5, 7, 7)).astype(np.float32)
    masks = rng.random((6, 30, 100, 100)) < 0.5  # ~60,000 distinct concept sets: the id tables must grow
    _, iou = netdissect_iou(acts, masks, 0.05, config=DissectionConfig(tally="compiled"), batch_size=6)
    _, iou_ref = bench.reference_netdissect(acts, masks, 0.05)
    np.testing.assert_allclose(iou, iou_ref, atol=1e-6, rtol=0)


def test_channels_last_activations_give_the_same_ious():
    acts, masks = bench.synthetic_dictionary(10, 12, 4, feature_size=7, mask_size=28, planted=4, seed=9)
    _, iou = netdissect_iou(acts, masks, 0.05)
    _, iou_cl = netdissect_iou(acts.to(memory_format=torch.channels_last), masks, 0.05)
    np.testing.assert_array_equal(iou_cl, iou)
    assert iou.max() > 0.05


def test_non_integer_upsampling_matches_reference():
    acts, masks = bench.synthetic_dictionary(10, 16, 4, feature_size=5, mask_size=23, planted=4, seed=4)
    t, iou = netdissect_iou(acts, masks, 0.03)
    _, iou_ref = bench.reference_netdissect(acts.numpy(), masks.numpy(), 0.03)
    np.testing.assert_allclose(iou, iou_ref, atol=1e-6, rtol=0)


def test_fires_only_hand_case():
    # one unit, one concept, three 2x2 images (no upsampling); the top two values are the 5s
    acts = torch.zeros(3, 1, 2, 2)
    acts[0, 0, 0, 0] = 5
    acts[2, 0, 0, 1] = 5
    masks = torch.zeros(3, 1, 2, 2, dtype=torch.bool)
    masks[0, 0, 0, 0] = masks[0, 0, 1, 1] = True  # |A & M| = 1
    masks[1, 0, 0, 0] = True  # unit silent here
    masks[2, 0, 1, 0] = True  # unit fires elsewhere
    t, iou = netdissect_iou(acts, masks, quantile=0.13)  # virtual index 9.57: t = 0.57 * 5
    assert t[0] == pytest.approx(0.57 * 5)
    assert iou[0, 0] == pytest.approx(1 / (2 + 4 - 1))  # NetDissect: every image's mask in the union
    _, iou_fires = netdissect_iou(acts, masks, quantile=0.13, fires_only=True)
    assert iou_fires[0, 0] == pytest.approx(1 / (2 + 3 - 1))  # HND: image 1 left out


def test_mask_areas_equal_sum():
    m = torch.rand(3, 5, 9, 7) < 0.3  # 63 pixels: not a multiple of 8
    assert torch.equal(mask_areas(m), m.flatten(2).sum(-1))


def test_concept_scores_hand_computed():
    ms = np.array([[0.0], [0.5], [1.0]])
    member = np.array([[1, 0], [1, 0], [0, 1]], dtype=bool)
    # ranks 1, 2, 3: CS_0 = (1 * 0 + 2 * 0.5) / 2, CS_1 = 3 * 1 / 1
    np.testing.assert_allclose(concept_scores(ms, member), [[0.5, 3.0]])


def test_stage1_grayscale_unit_is_biased():
    rng = np.random.default_rng(5)
    gray = np.repeat([0, 1], 500)
    ms = rng.random((1000, 3))  # unit 1: indifferent
    ms[:, 0] = np.where(gray == 1, 1 + rng.random(1000), 0)  # fires only on grayscale images
    ms[:, 2] = np.where(gray == 0, 1 + rng.random(1000), 0)  # fires only on colour images
    labels = gray.copy()
    labels[::10] = -1  # unknown labels are left out
    res = stage1_global_concepts(ms, labels, ["color", "grayscale"])
    assert res.threshold == 0.55
    assert res.probabilities[0, 1] > 0.55 and res.biased[0, 1] and not res.biased[0, 0]
    assert not res.biased[1].any()
    assert res.biased[2, 0]
    np.testing.assert_allclose(res.probabilities.sum(1), 1)
    four = stage1_global_concepts(ms, rng.integers(0, 4, 1000), ["a", "b", "c", "d"])
    assert four.threshold == 0.3


def test_stage3_marks_two_concepts_for_a_unit_that_responds_to_both():
    rng = np.random.default_rng(6)
    n, k = 200, 4  # mouth region: smiling, lipstick, mustache, mouth_open
    presence = np.zeros((n, k), dtype=bool)
    presence[np.arange(n), np.arange(n) % k] = True
    ms = rng.random((n, 2)) * 0.1
    ms[:, 0] += 2 * (presence[:, 0] | presence[:, 1])  # unit 0: smiling or lipstick
    ms[:, 1] += 2 * presence[:, 2]  # unit 1: mustache only
    iou = np.full((2, k), 0.2)
    regions = ["mouth"] * k
    probs, interp = stage3_local_concepts(ms, presence, iou, regions, ["mouth", "mouth"])
    assert interp[0].tolist() == [True, True, False, False]  # both above 1.5 / 4
    assert interp[1].tolist() == [False, False, True, False]
    np.testing.assert_allclose(probs.sum(1), 1)
    # eq. 3: a concept the unit cannot localise loses its share
    iou[0, 1] = 0.01
    _, interp = stage3_local_concepts(ms, presence, iou, regions, ["mouth", "mouth"])
    assert interp[0].tolist() == [True, False, False, False]


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(4)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_streaming_equals_in_memory(method):
    g = torch.Generator().manual_seed(7)
    images = torch.rand(30, 3, 32, 32, generator=g)
    masks = torch.rand(30, 3, 16, 16, generator=g) < 0.2
    gray = torch.randint(0, 2, (30,), generator=g)
    gray[:3] = -1
    loader = [{"image": images[s:s + 8], "concept_masks": masks[s:s + 8], "grayscale": gray[s:s + 8],
               "index": torch.arange(s, min(s + 8, 30)) + 100} for s in range(0, 30, 8)]
    model = TinyNet()
    cfg = DissectionConfig(quantile=0.05, quantile_method=method, top_k=3)
    res = dissect(model, loader, ["conv", "pool"], ["a", "b", "c"], {"a": "eyes", "b": "eyes", "c": "mouth"},
                  {"grayscale": ["color", "grayscale"]}, cfg, num_images=30, progress=False)
    with torch.no_grad():
        conv = model.conv(images)
        acts = {"conv": conv, "pool": model.pool(torch.relu(conv))}
    for name, r in res.items():
        t, iou = netdissect_iou(acts[name], masks, 0.05, config=cfg)
        np.testing.assert_allclose(r.thresholds, t, rtol=1e-6)
        np.testing.assert_allclose(r.iou, iou, atol=1e-12)
        assert r.global_groups["grayscale"].probabilities.shape == (6, 2)
        assert set(r.top_images.ravel()) <= set(range(100, 130))
        best = acts[name].amax((2, 3)).argmax(0)
        np.testing.assert_array_equal(r.top_images[:, 0], best.numpy() + 100)
    if method == "exact":
        _, iou_ref = bench.reference_netdissect(acts["conv"].numpy(), masks.numpy(), 0.05)
        np.testing.assert_allclose(res["conv"].iou, iou_ref, atol=1e-6)


def small_result() -> DissectionResult:
    acts, masks = planted_dictionary(n=20)
    n = len(acts)
    cfg = DissectionConfig(quantile=(4 * n - 0.5) / (n * 256 - 1))
    d = LayerDissector(["glasses", "beard"], ["eyes", "chin"], {"gender": ["f", "m"]}, cfg, num_images=n,
                       layer="layer4")
    d.update_quantiles(torch.from_numpy(acts))
    d.compute_thresholds()
    d.update_counts(torch.from_numpy(acts), torch.from_numpy(masks),
                    global_labels={"gender": torch.arange(n) % 2})
    return d.result()


def test_result_dict_roundtrip_and_table():
    r = small_result()
    d = json.loads(json.dumps(r.to_dict()))
    assert d["units"][0]["netdissect"]["concept"] == "glasses" and d["units"][0]["hnd"]["region"] == "eyes"
    assert d["units"][0]["hnd"]["concepts"][0]["concept"] == "glasses"
    assert set(d["units"][0]["hnd"]["global"]["gender"]["probabilities"]) == {"f", "m"}
    back = DissectionResult.from_dict(d)
    np.testing.assert_allclose(back.iou, r.iou)
    np.testing.assert_array_equal(back.local_interpretable, r.local_interpretable)
    np.testing.assert_array_equal(back.hnd_interpretable, r.hnd_interpretable)
    table = r.to_table()
    assert len(table["data"]) == 3 and len(table["columns"]) == len(table["data"][0])


def test_plots_return_figures():
    r = small_result()
    results = {"layer3": r, "layer4": r}
    fig = plot_coverage(results, percent=False)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights[:2] == [r.hnd_interpretable.sum()] * 2 and heights[2:] == [r.netdissect_interpretable.sum()] * 2
    for fig in (plot_concept_histogram(r), plot_region_counts(r), plot_unit_probabilities(results, "gender"),
                plot_biased_counts({"P=50": results, "P=100": results}, "gender"),
                plot_top_images(torch.rand(3, 3, 64, 64), torch.rand(3, 16, 16), 0.5, titles=["a", "b", "c"])):
        assert isinstance(fig, Figure) and fig.axes


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="num_images"):
        LayerDissector(["a"], ["r"])
    with pytest.raises(ValueError, match="tally"):
        DissectionConfig(tally="fast")
    d = LayerDissector(["a", "b"], ["r", "r"], num_images=2)
    d.update_quantiles(torch.rand(2, 3, 4, 4))
    d.compute_thresholds()
    with pytest.raises(ValueError, match=r"masks must be \(B=2, C=2"):
        d.update_counts(torch.rand(2, 3, 4, 4), torch.zeros(2, 3, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown layer"):
        dissect(TinyNet(), [], ["nope"], ["a"], ["r"], num_images=1, progress=False)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_non_finite_activations_are_rejected_in_pass_1(bad, method):
    acts = torch.rand(4, 3, 5, 5)
    acts[2, 1, 3, 0] = bad
    diss = LayerDissector(["a"], ["eyes"], config=DissectionConfig(quantile_method=method), num_images=4)
    with pytest.raises(ValueError, match="NaN or inf"):
        diss.update_quantiles(acts)


def test_non_finite_activations_are_rejected_in_pass_2():
    acts = torch.rand(4, 3, 5, 5)
    diss = LayerDissector(["a"], ["eyes"], num_images=4)
    diss.update_quantiles(acts)
    diss.compute_thresholds()
    acts[1, 2, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        diss.update_counts(acts, torch.ones(4, 1, 10, 10, dtype=torch.bool))


@pytest.mark.gpu
def test_gpu_dense_tally_equals_cpu_compiled_tally():
    acts, masks = bench.synthetic_dictionary(40, 64, 12, feature_size=7, mask_size=112, planted=8, seed=6)
    t_cpu, iou_cpu = netdissect_iou(acts, masks, 0.01, config=DissectionConfig(tally="compiled"))
    t_gpu, iou_gpu = netdissect_iou(acts.cuda(), masks.cuda(), 0.01, config=DissectionConfig(tally="dense"))
    np.testing.assert_array_equal(t_gpu, t_cpu)
    np.testing.assert_allclose(iou_gpu, iou_cpu, atol=1e-6, rtol=0)


def test_without_numba_the_cpu_falls_back_to_the_torch_tally(monkeypatch):
    import analysis.dissection as dissection_module

    monkeypatch.setattr(dissection_module, "dissection_kernel", None)
    acts, masks = bench.synthetic_dictionary(12, 10, 5, feature_size=7, mask_size=28, planted=4, seed=8)
    t, iou = netdissect_iou(acts, masks, 0.05)  # auto: sparse on the CPU, torch top-k buffer
    t_ref, iou_ref = bench.reference_netdissect(acts.numpy(), masks.numpy(), 0.05)
    np.testing.assert_allclose(t, t_ref, rtol=1e-12)
    np.testing.assert_allclose(iou, iou_ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="needs numba"):
        netdissect_iou(acts, masks, 0.05, config=DissectionConfig(tally="compiled"))
