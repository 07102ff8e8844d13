import json

import numpy as np
import pytest
import torch
from fixtures_training import tiny_fit

import analyze
from analysis.amr import GROUPS, amr_scores
from analysis.face_regions import masks_v2
from analysis.gradcam import grad_cam
from callbacks.gradcam_amr import GradCamAMRCallback, amr_masks, run_amr
from datamodules.synthfaces import CONCEPTS, SynthFaces
from datamodules.transforms import frontal_ratio, is_frontal
from facelens.wandb_io import read_offline_run

ATTRS = ["Eyeglasses", "Male", "Smiling"]
AMR_KEYS = {"overall", "gt_pos", "gt_neg", "pred_correct", "pred_incorrect"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny resnet18 fit with the callback (drawn masks) and an offline W&B logger."""
    tmp = tmp_path_factory.mktemp("fit")
    cb = GradCamAMRCallback(masks="drawn", num_images=12, batch_size=8)
    checkpoint, model = tiny_fit(tmp, cb, "resnet18", ATTRS)
    return tmp, checkpoint, cb, model


def _reference(model, batches, masks_of, frontal=None):
    """Per-image loop in float64 from the same maps: mean AMR per group and error rate, by hand."""
    net = model.net
    rows = []
    for batch in batches:
        maps, logits = grad_cam(net, batch["image"], "layer4", return_logits=True)
        scores = amr_scores(maps.double(), masks_of(batch)).amr
        labels, mask = model.select(batch)
        keep = is_frontal(batch["landmarks"], frontal) if frontal else torch.ones(len(labels), dtype=torch.bool)
        for b in range(len(labels)):
            for t in range(len(ATTRS)):
                if mask[b, t] and keep[b]:
                    rows.append((t, float(labels[b, t]), float(logits[b, t] > 0), float(scores[b, t])))
    out = {}
    for t in range(len(ATTRS)):
        r = [x for x in rows if x[0] == t]
        pos = [s for _, y, _, s in r if y == 1]
        correct = [s for _, y, p, s in r if y == p]
        out[ATTRS[t]] = {"overall": np.mean([s for *_, s in r]), "gt_pos": np.mean(pos) if pos else None,
                         "pred_correct": np.mean(correct) if correct else None,
                         "error_rate": 1 - len(correct) / len(r)}
    return out


def test_callback_writes_json_npz_and_history(fitted):
    tmp, _, cb, _ = fitted
    files = sorted(tmp.rglob("analysis/gradcam_amr/epoch000.json"))
    assert files, list(tmp.rglob("*.json"))
    data = json.loads(files[0].read_text())
    for name in ATTRS:
        assert AMR_KEYS == set(data[name]["amr"])
        assert 0 <= data[name]["error_rate"] <= 1
        assert sum(data[name]["count"][g] for g in ("gt_pos", "gt_neg")) == data[name]["count"]["overall"] == 12
    assert data["settings"]["masks"] == "drawn" and "correlation" in data and "kl" not in data
    arrays = np.load(files[0].with_suffix(".npz"))
    assert arrays["average_maps"].shape == (len(GROUPS), len(ATTRS), 2, 2)  # layer4 of a 64-px resnet18
    assert list(arrays["attributes"]) == ATTRS
    np.testing.assert_allclose(arrays["score_amr"][0], [data[n]["amr"]["overall"] for n in ATTRS])
    h = cb.history[-1]
    assert h["gradcam_amr/amr/overall"] == pytest.approx(np.mean([data[n]["amr"]["overall"] for n in ATTRS]))
    assert {"gradcam_amr/amr/gt_pos", "gradcam_amr/amr/gt_neg", "gradcam_amr/error_rate",
            "gradcam_amr/amr_attribute/Eyeglasses"} <= set(h)
    run = read_offline_run(tmp / "wandb")
    assert run.metric("gradcam_amr/amr/overall")[-1] == pytest.approx(h["gradcam_amr/amr/overall"])
    tables = [json.loads(p.read_text()) for p in run.media("*.table.json")]
    table = next(t for t in tables if "gt_pos" in t["columns"])
    assert [row[0] for row in table["data"]][-1] == "OVERALL" and len(table["data"]) == len(ATTRS) + 1
    assert len(run.media("*.png")) >= 2, "average-map grids missing"


def test_run_amr_matches_per_image_reference(fitted):
    """The streamed Table 5.1 equals a per-image float64 loop, for v2 and drawn masks and the frontal filter."""
    _, _, _, model = fitted
    model.eval()
    ds = SynthFaces(10, "val", 64, 10, return_masks=True)
    items = [ds[i] for i in range(10)]
    batches = [{k: torch.stack([it[k] for it in items[s:s + 5]]) for k in items[0]} for s in (0, 5)]
    drawn = run_amr(model, batches, masks="drawn")
    ref = _reference(model, batches, lambda b: amr_masks("drawn", b, ATTRS))
    for i, name in enumerate(ATTRS):
        assert drawn.scores["amr"][0, i] == pytest.approx(ref[name]["overall"], abs=1e-6)
        assert drawn.error_rate[i] == pytest.approx(ref[name]["error_rate"])
        if ref[name]["pred_correct"] is not None:
            assert drawn.scores["amr"][3, i] == pytest.approx(ref[name]["pred_correct"], abs=1e-6)
    # drawn eyeglasses mask is the rendered concept; Male (no drawn concept) falls back to v2
    m = amr_masks("drawn", batches[0], ATTRS)
    assert torch.equal(m[:, 0], batches[0]["concept_masks"][:, CONCEPTS.index("eyeglasses")])
    assert torch.equal(m[:, 1], masks_v2(64, ["Male"])[0].expand(5, -1, -1))
    # SynthFaces poses are all frontal at seed 004's 0.1: a median threshold makes the filter drop half
    cut = float(torch.cat([frontal_ratio(b["landmarks"]) for b in batches]).median()) + 1e-9
    frontal = run_amr(model, batches, masks="v2", frontal=True, frontal_threshold=cut)
    ref = _reference(model, batches, lambda b: masks_v2(64, ATTRS), frontal=cut)
    assert frontal.frontal_only
    n_front = int(sum(is_frontal(b["landmarks"], cut).sum() for b in batches))
    assert 0 < n_front < 10, n_front
    assert frontal.counts[0, 0] == n_front
    for i, name in enumerate(ATTRS):
        assert frontal.scores["amr"][0, i] == pytest.approx(ref[name]["overall"], abs=1e-6)


def test_v1_masks_follow_landmarks(fitted):
    ds = SynthFaces(2, "val", 64, 2)
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ("image", "landmarks")}
    m = amr_masks("v1", batch, ["Eyeglasses"])
    assert m.shape == (2, 1, 64, 64)
    shifted = dict(batch, landmarks=batch["landmarks"] + torch.tensor([3.0, 2.0]))
    assert torch.equal(amr_masks("v1", shifted, ["Eyeglasses"])[:, 0, 2:, 3:], m[:, 0, :-2, :-3])


def test_analyze_gradcam_writes_json_figures_and_kl(fitted, tmp_path):
    _, ckpt, _, _ = fitted
    out = tmp_path / "out"
    assert analyze.main(["gradcam", "--checkpoint", ckpt, "--num-images", "8", "--batch-size", "8", "--device",
                         "cpu", "--out", str(out), "--compare", ckpt, "--masks", "v1", "--random-init"]) == 0
    data = json.loads((out / "gradcam_amr.json").read_text())
    assert "correlation" in data and data["settings"]["masks"] == "v1"
    assert set(data["kl"]) == set(ATTRS)
    base, other = np.load(out / "gradcam_amr.npz"), np.load(out / "gradcam_amr_compare.npz")
    for i, name in enumerate(ATTRS):
        assert set(data[name]["amr"]) == AMR_KEYS and "error_rate" in data[name]
        assert set(data["compare"][name]["amr"]) == AMR_KEYS
        # KL(random-init base || trained) of the overall average maps, by hand in float64
        p = base["average_maps"][0, i].astype(np.float64) + 1e-10
        q = other["average_maps"][0, i].astype(np.float64) + 1e-10
        p, q = p / p.sum(), q / q.sum()
        assert data["kl"][name] == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-9, abs=1e-12)
        assert data["kl"][name] > 0
    pngs = {p.name for p in out.glob("*.png")}
    assert {"fig5_4_amr_correct_incorrect.png", "fig5_5_amr_present_absent.png", "fig5_6_amr_overall.png",
            "fig5_7_kl.png", "fig5_8_maps_correct_incorrect.png", "fig5_9_maps_present_absent.png",
            "fig5_10_maps_overall.png"} <= pngs


def test_bad_settings_fail_clearly(fitted):
    _, _, _, model = fitted
    cb = GradCamAMRCallback(layer="layer9")
    with pytest.raises(ValueError, match="GradCamAMRCallback.layer.*layer9.*layer4"):
        cb.setup(None, model, "fit")
    with pytest.raises(ValueError, match="masks.*v1, v2, drawn"):
        GradCamAMRCallback(masks="v3")
    with pytest.raises(ValueError, match="method"):
        GradCamAMRCallback(method="scorecam")
    batch = {"image": torch.rand(1, 3, 64, 64), "landmarks": torch.rand(1, 5, 2)}
    with pytest.raises(ValueError, match="concept_masks"):
        amr_masks("drawn", batch, ["Eyeglasses"])

