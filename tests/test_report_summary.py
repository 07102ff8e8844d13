"""The report's top summary answers which model is more biased, where in the network and since which checkpoint,
from hand-set numbers in two synthetic sweep folders (reported together, as `--runs A B`): the sentences must name
the right run, layer, attributes and epochs, and say plainly when a measure never crosses its threshold."""
import json
from pathlib import Path

import pytest
from test_report import Page, bias_config, dissection, parse, write_run

import analysis.report as report_module
from analysis.report import BIAS_GAP_THRESHOLD, _wandb_metrics, build_report, majority_bias, since_above
from experiments import RunSpec, write_manifest

# Per-epoch validation metrics the fake W&B runs return (key: the summary's "wandb_run" field).
EPOCHS: dict[str, dict[str, list[tuple[int, float]]]] = {
    "wb/gray100": {"val/bias/gap": [(0, 0.01), (1, 0.08), (2, 0.04), (3, 0.2), (4, 0.3)]},
    "wb/gray50": {"val/bias/gap": [(0, 0.0), (4, 0.02)]},
    "wb/eye100": {"val/bias/gap": [(0, 0.06), (1, 0.04)]},
}
IMBALANCED = ("Bald", "Mustache")  # of Male, Smiling, Bald, Mustache: the two farthest from a 0.5 CelebA rate


def _majority(bias_per_epoch: list[tuple[int, float]]) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch metrics whose majority bias (balanced error - error) on both imbalanced attributes is the value."""
    out: dict[str, list[tuple[int, float]]] = {}
    for a in IMBALANCED:
        out[f"val/error/{a}"] = [(e, 0.0) for e, _ in bias_per_epoch]
        out[f"val/balanced_accuracy/{a}"] = [(e, 1 - v) for e, v in bias_per_epoch]
    return out


EPOCHS["wb/unbalanced"] = _majority([(0, 0.1), (1, 0.3), (2, 0.32)])
EPOCHS["wb/balanced"] = _majority([(0, 0.2), (1, 0.1), (2, 0.035)])


def _with_wandb(folder: Path, key: str) -> Path:
    summary = json.loads((folder / "summary.json").read_text())
    summary["wandb_run"] = key
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _sweep(root: Path, sweep_id: str, experiment: str, runs: dict[str, Path]) -> Path:
    specs = [RunSpec(name=n, experiment=experiment, root=str(d.parent), command=[], status="done", run_dir=str(d),
                     p=int(n.rsplit("P", 1)[1]) if "_P" in n else None,
                     variant=n.split("_", 1)[1] if experiment == "affact" else None) for n, d in runs.items()]
    write_manifest(root / sweep_id, experiment, sweep_id, "synthfaces", specs)
    return root / sweep_id


def _affact_metrics(per_attr: dict[str, tuple[float, float]]) -> dict[str, float]:
    m = {"val/mean_error": 0.1, "val/mean_balanced_error": 0.2}
    for a, (err, bal_acc) in per_attr.items():
        m[f"val/error/{a}"], m[f"val/balanced_accuracy/{a}"] = err, bal_acc
    return m


@pytest.fixture(scope="module")
def summary(tmp_path_factory) -> dict[tuple[str, str], str]:
    root = tmp_path_factory.mktemp("sweeps")
    mp = pytest.MonkeyPatch()
    mp.setattr(report_module, "_wandb_metrics", lambda key: EPOCHS.get(key, {}))
    gray = {}
    # grayscale units per layer and epoch: P=100 equals P=50 at epoch 1 and is ahead at epoch 3 (layer4 +6, layer3 +2)
    for p, gap, units in ((50, 0.02, {1: (1, 1), 3: (1, 2)}), (100, 0.3, {1: (1, 1), 3: (3, 8)})):
        metrics = {"val/bias/gap": gap, "val/bias/conflicting_accuracy": 0.9 - gap}
        diss = {e: {"layer3": dissection("layer3", 0, g3), "layer4": dissection("layer4", 0, g4)}
                for e, (g3, g4) in units.items()}
        folder = write_run(root / f"g{p}" / "runs" / "x", bias_config("grayscale", p), metrics, diss=diss)
        gray[f"grayscale_P{p}"] = _with_wandb(folder, f"wb/gray{p}")
    eye = {}
    for p, gap in ((50, 0.01), (100, 0.04)):  # the most biased one stays under the 0.05 threshold
        folder = write_run(root / f"e{p}" / "runs" / "x", bias_config("eyeglasses", p), {"val/bias/gap": gap})
        eye[f"eyeglasses_P{p}"] = _with_wandb(folder, f"wb/eye{p}")
    affact = {}
    for variant, per_attr in (("balanced", {"Male": (0.05, 0.95), "Smiling": (0.1, 0.9), "Bald": (0.1, 0.85),
                                            "Mustache": (0.12, 0.86)}),
                              ("unbalanced", {"Male": (0.05, 0.95), "Smiling": (0.1, 0.9), "Bald": (0.02, 0.6),
                                              "Mustache": (0.04, 0.7)})):
        cfg = {"model": {"init_args": {"loss": variant, "attributes": None}}, "data": {"init_args": {}}}
        folder = write_run(root / f"a{variant}" / "runs" / "x", cfg, _affact_metrics(per_attr))
        affact[f"affact_{variant}"] = _with_wandb(folder, f"wb/{variant}")
    sweeps = [_sweep(root, "gray", "grayscale", gray), _sweep(root, "eye", "eyeglasses", eye),
              _sweep(root, "aff", "affact", affact)]
    out = root / "report"
    build_report(sweeps, out)
    mp.undo()
    page = parse(out / "report.html")
    assert page.tables[0] == "summary-table"  # the summary comes first, above the findings
    start = page.rows.index(["experiment", "question", "answer, from the data"])
    rows = page.rows[start + 1:]
    return {(r[0].split(" ")[0], r[1]): r[2] for r in rows[:rows.index(["claim", "verdict", "numbers"])]}


def test_grayscale_answers(summary):
    which = summary[("grayscale", "which model is more biased")]
    assert which.startswith("grayscale_P100: gender accuracy 0.300 higher on bias-aligned"), which
    assert "above the 0.05 bias threshold" in which and "grayscale_P50 0.020, grayscale_P100 0.300" in which
    where = summary[("grayscale", "where in the network")]
    assert "most grayscale-biased units beyond grayscale_P50 in layer4 (+6 units, +60% of the layer)" in where, where
    assert "layer3 3 vs 1 of 10, layer4 8 vs 2 of 10" in where
    since = summary[("grayscale", "since which checkpoint")]
    # the gap is above 0.05 at epoch 1, dips at 2, and stays above from 3 on; units tie at 1, lead at 3
    assert "gap above 0.05 since the epoch-3 checkpoint" in since, since
    assert "above grayscale_P50's since the epoch-3 checkpoint (epoch 1: 2 vs 2, epoch 3: 11 vs 3)" in since


def test_eyeglasses_answers_say_when_nothing_crosses(summary):
    which = summary[("eyeglasses", "which model is more biased")]
    assert which.startswith("eyeglasses_P100: gender accuracy 0.040") and "not above the 0.05 bias threshold" in which
    assert summary[("eyeglasses", "where in the network")].startswith("not measured")
    since = summary[("eyeglasses", "since which checkpoint")]
    assert "gap does not stay above 0.05 up to the last checkpoint (epoch 0: 0.060, epoch 1: 0.040)" in since, since


def test_affact_answers(summary):
    key = "class"
    which = summary[(key, "which model is more biased")]
    # unbalanced: Bald 0.40 - 0.02, Mustache 0.30 - 0.04 -> 0.320; balanced: 0.15 - 0.10, 0.14 - 0.12 -> 0.035
    assert which.startswith("affact_unbalanced favours the majority class more: over the 2 most imbalanced"), which
    assert "by 0.320 vs 0.035 for affact_balanced" in which
    assert "Bald (+0.330), Mustache (+0.240)" in summary[(key, "where in the network")]
    since = summary[(key, "since which checkpoint")]
    assert since.startswith("affact_unbalanced's majority-class bias is above affact_balanced's since the epoch-1 "
                            "checkpoint (epoch 0: 0.100 vs 0.200, epoch 1: 0.300 vs 0.100, epoch 2: 0.320 vs 0.035)")


def test_threshold_helpers_match_hand_cases():
    assert since_above({0: 0.01, 1: 0.08, 2: 0.04, 3: 0.2}, BIAS_GAP_THRESHOLD) == 3
    assert since_above({0: 0.06, 1: 0.04}, BIAS_GAP_THRESHOLD) is None
    assert since_above({1: 5, 2: 6, 3: 7}, {1: 5, 3: 2}) == 3  # epoch 2 has no reference value: skipped
    m = {"val/error/Bald": 0.02, "val/balanced_accuracy/Bald": 0.6, "val/error/Mustache": 0.04,
         "val/balanced_accuracy/Mustache": 0.7}
    assert majority_bias(m, ["Bald", "Mustache"]) == pytest.approx(((0.4 - 0.02) + (0.3 - 0.04)) / 2, abs=1e-12)
    assert majority_bias(m, ["Male"]) is None


def test_per_epoch_metrics_are_read_back_from_an_offline_wandb_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(project="facelens", dir=str(tmp_path), name="t")
    for epoch, gap in ((0, 0.1), (1, 0.2)):
        run.log({"epoch": epoch, "val/bias/gap": gap, "val/error/Bald": gap / 2, "train/loss": 1.0})
    where = Path(run.dir).parent
    run.finish()
    got = _wandb_metrics(str(where))
    assert got["val/bias/gap"] == [(0, 0.1), (1, 0.2)]
    assert got["val/error/Bald"] == [(0, 0.05), (1, 0.1)]
    assert "train/loss" not in got


def test_page_without_bias_metrics_says_so(tmp_path):
    folder = write_run(tmp_path / "r", bias_config("grayscale", 60), {})
    build_report([folder], tmp_path / "out")
    page: Page = parse(tmp_path / "out" / "report.html")
    start = page.rows.index(["experiment", "question", "answer, from the data"])
    assert page.rows[start + 1][1] == "which model is more biased"
    assert page.rows[start + 1][2].startswith("not measured: no run carries bias-group metrics")


def test_same_run_name_in_two_sweeps_is_kept_apart(tmp_path):
    from analysis.report import load_runs

    sweeps = []
    for sweep_id in ("s1", "s2"):
        folder = write_run(tmp_path / sweep_id / "grayscale_P60" / "runs" / "x", bias_config("grayscale", 60), {})
        sweeps.append(_sweep(tmp_path, sweep_id, "grayscale", {"grayscale_P60": folder}))
    other = write_run(tmp_path / "s3" / "eyeglasses_P50" / "runs" / "x", bias_config("eyeglasses", 50), {})
    sweeps.append(_sweep(tmp_path, "s3", "eyeglasses", {"eyeglasses_P50": other}))
    runs, found = load_runs(sweeps)
    assert [r.label for r in runs] == ["s1/grayscale_P60", "s2/grayscale_P60", "eyeglasses_P50"]
    assert list(found) == ["s1", "s2", "s3"]
