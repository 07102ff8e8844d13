"""analyze.py report over fake run folders whose JSON is written by the real result classes' to_dict():
every <img> resolves to a valid PNG, the tables are there, and each claim's verdict matches hand-counted numbers.
A headless-Chromium check (skipped without /usr/bin/chromium) asserts every image actually loads in a browser."""
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import analyze
from analysis.amr import GROUPS, VARIANTS, AMRResult
from analysis.dissection import DissectionConfig, DissectionResult, GlobalConceptResult
from analysis.probing import LayerAttributeProbe, ProbingResult
from analysis.report import build_report, eyeglasses_units, first_epoch_holding, load_run, region_units
from callbacks.base import write_json

CONCEPTS = ["eyes", "Eyeglasses", "mouth", "Smiling", "drawn_eyeglasses"]
REGIONS = ["eyes", "eyes", "mouth", "mouth", "eyes"]
DICT_COUNT = 24


def dissection(layer: str, eye_units: int, biased_gray: int, units: int = 10, seed: int = 0) -> DissectionResult:
    """`eye_units` units interpretable for Eyeglasses in the eyes region (one more for the mouth), and
    `biased_gray` units whose grayscale probability exceeds 0.55."""
    rng = np.random.default_rng(seed)
    c = len(CONCEPTS)
    iou = np.full((units, c), 0.01)
    regions, probs, interp = [None] * units, np.full((units, c), np.nan), np.zeros((units, c), bool)
    for u in range(eye_units):
        iou[u, 1] = 0.2
        regions[u] = "eyes"
        probs[u, [0, 1, 4]] = [0.1, 0.8, 0.1]
        interp[u, 1] = True
    mouth = eye_units
    iou[mouth, 3] = 0.1
    regions[mouth] = "mouth"
    probs[mouth, [2, 3]] = [0.2, 0.8]
    interp[mouth, 3] = True
    gray = np.full((units, 2), 0.5)
    gray[:biased_gray] = [0.2, 0.8]
    gender = np.tile([0.6, 0.4], (units, 1))
    gender[units // 2:] = [0.3, 0.7]
    top = np.stack([rng.permutation(DICT_COUNT)[:4] for _ in range(units)])
    return DissectionResult(
        layer=layer, concepts=CONCEPTS, concept_regions=REGIONS, thresholds=rng.random(units), iou=iou,
        iou_fires_only=iou.copy(),
        global_groups={"gender": GlobalConceptResult(["female", "male"], gender, gender > 0.55, 0.55),
                       "grayscale": GlobalConceptResult(["color", "grayscale"], gray, gray > 0.55, 0.55)},
        unit_regions=regions, local_probabilities=probs, local_interpretable=interp, top_images=top,
        num_images=DICT_COUNT, config=DissectionConfig())


def probing(acc: float, layers=("layer1", "layer2")) -> ProbingResult:
    entries = {}
    for i, layer in enumerate(layers):
        for attr in ("Male", "Eyeglasses"):
            a = acc + 0.05 * i
            entries[(layer, attr)] = LayerAttributeProbe(layer, attr, a, a - 0.02, a - 0.05, [1, 2], [a - 0.1, a - 0.12],
                                                         [3, 4], [a - 0.15, a - 0.2], 64, 64)
    return ProbingResult(list(layers), ["Male", "Eyeglasses"], entries, {"layer1": (8, 4, 4), "layer2": (16, 2, 2)})


def amr(attributes, overall: dict, error: float = 0.1) -> AMRResult:
    t, g = len(attributes), len(GROUPS)
    scores = {v: np.tile(np.array([overall[a] for a in attributes]), (g, 1)) for v in VARIANTS}
    maps = np.random.default_rng(len(attributes)).random((g, t, 7, 7)) + 0.01
    return AMRResult(list(attributes), np.full(t, error), np.full((g, t), 10.0), scores, maps)


def write_run(folder: Path, config: dict, metrics: dict, diss: dict | None = None, probes: dict | None = None,
              amrs: dict | None = None, random_probe: ProbingResult | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "summary.json").write_text(json.dumps({"run_dir": str(folder), "best_checkpoint": "x.ckpt",
                                                     "wandb_run": None, "metrics": metrics}))
    for name, per_epoch, to_json in (("dissection", diss, lambda d: {"layers": {k: r.to_dict() for k, r in d.items()}}),
                                     ("probing", probes, lambda r: r.to_dict()),
                                     ("gradcam_amr", amrs, lambda r: r.to_dict())):
        if not per_epoch:
            continue
        out = folder / "analysis" / name
        out.mkdir(parents=True)
        history = []
        for epoch, result in per_epoch.items():
            write_json(out / f"epoch{epoch:03d}.json", to_json(result))
            if name == "gradcam_amr":
                np.savez(out / f"epoch{epoch:03d}.npz", **result.to_arrays())
            history.append({"epoch": epoch, "step": 10 * epoch, f"{name}/seconds": 1.0,
                            f"{name}/layer4/hnd_units": float(epoch), f"{name}/mean_last_layer_acc": 0.7,
                            f"{name}/amr/overall": 0.3})
        write_json(out / "history.json", history)
    if random_probe is not None:
        out = folder / "analysis" / "probing_random_init"
        out.mkdir(parents=True)
        write_json(out / "probing_random_init.json", random_probe.to_dict())
    return folder


def bias_config(kind: str, p: int) -> dict:
    return {"data": {"init_args": {"bias": kind, "p": p}}, "model": {"init_args": {"attributes": ["Male"]}},
            "trainer": {"callbacks": [{"class_path": "callbacks.dissection.DissectionCallback",
                                       "init_args": {"dictionary_count": DICT_COUNT, "dictionary_size": 64}}]}}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for p, eyes in ((50, 1), (100, 3)):
        metrics = {"val/bias/aligned_accuracy": 0.9 + p / 1000, "val/bias/conflicting_accuracy": 1.4 - p / 100,
                   "val/bias/gap": p / 100 - 0.5 + p / 1000, "val/mean_error": 0.1}
        runs.append(write_run(root / f"eye{p}", bias_config("eyeglasses", p), metrics,
                              diss={1: {"layer4": dissection("layer4", 1, 0)},
                                    3: {"layer3": dissection("layer3", 1, 0), "layer4": dissection("layer4", eyes, 0)}},
                              probes={1: probing(0.7), 3: probing(0.8)}, amrs={3: amr(["Male"], {"Male": 0.3})},
                              random_probe=probing(0.55)))
    for p, gray in ((50, 1), (80, 2), (100, 6)):
        runs.append(write_run(root / f"gray{p}", bias_config("grayscale", p), {"val/bias/gap": 0.1},
                              diss={2: {"layer4": dissection("layer4", 1, gray)}}))
    attrs = ["Male", "Smiling", "Eyeglasses", "Bald", "Mustache", "Wearing_Hat"]
    low = {a: 0.5 for a in attrs}
    high = {a: 0.6 for a in attrs}  # the unbalanced model scores higher: the claim must be reported as failing
    for variant, overall in (("balanced", low), ("unbalanced", high)):
        cfg = {"model": {"init_args": {"loss": variant, "attributes": None}}, "data": {"init_args": {}}}
        runs.append(write_run(root / f"affact_{variant}", cfg, {}, amrs={4: amr(attrs, overall)}))
    out = tmp_path_factory.mktemp("report")
    assert analyze.main(["report", "--runs", *map(str, runs), "--out", str(out)]) == 0
    return out / "report.html"


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.rows, self._row, self._cell = [], [], [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src"))
        elif tag == "table":
            self.tables.append(a.get("id"))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self.rows.append(self._row)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def test_every_image_is_a_local_png_and_tables_are_present(report):
    page = parse(report)
    assert len(page.images) >= 10
    for src in page.images:
        assert not re.match(r"^[a-z]+:", src) and "/" not in src, src  # relative, beside the HTML
        path = report.parent / src
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
        with Image.open(path) as im:
            im.verify()
    for table in ("findings-table", "runs", "bias_accuracy_eyeglasses", "eyeglasses_units", "amr_per_p",
                  "grayscale_biased_units", "grayscale_biased_units_per_checkpoint", "table5_1", "probing_summary",
                  "fig5_glasses_share", "summary-table"):
        assert table in page.tables, table
    text = report.read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", text) and "<script" not in text and "@import" not in text
    for fig in ("fig6_eyeglasses_regions", "fig5_top_images_per_gender", "fig7_grayscale_probabilities",
                "fig8_grayscale_biased_units", "fig5_4", "fig5_5", "fig5_6", "fig5_7", "probing_depth",
                "history_dissection", "eyeglasses_bias_accuracy"):
        assert f"{fig}.png" in page.images, fig


def findings(report) -> dict[str, tuple[str, str]]:
    page = parse(report)
    start = page.rows.index(["claim", "verdict", "numbers"])
    return {r[0]: (r[1], r[2]) for r in page.rows[start + 1:start + 5]}


def test_claims_are_checked_with_numbers(report):
    f = findings(report)
    verdict, numbers = f["More eyeglasses / eye-region units at P = 100 than at P = 50"]
    # last checkpoint: layer3 1+1 vs 1+1, layer4 (3 eyeglasses + 3 eye-region) vs (1 + 1)
    assert verdict == "holds" and "all dissected layers: 8 vs 4" in numbers, numbers
    assert "since the epoch-3 checkpoint" in numbers
    verdict, numbers = f["More grayscale-biased units as P rises"]
    assert verdict == "holds" and "P=50: 1, P=80: 2, P=100: 6" in numbers and "rho(P, units) = 1.00" in numbers
    verdict, numbers = f["The balanced model's mean AMR is above the unbalanced one's on imbalanced attributes"]
    assert verdict == "does NOT hold" and "balanced 0.500 vs unbalanced 0.600" in numbers, numbers
    verdict, numbers = f["Trained-model probes are above random-init probes"]
    # trained (epoch 3): 0.80, 0.85 -> last 0.85, mean 0.825; random init 0.55, 0.60
    assert verdict == "holds" and "last layer 0.850 vs 0.600, mean over layers 0.825 vs 0.575" in numbers, numbers
    text = report.read_text()
    assert "<td>eyeglasses_P100: gender accuracy 0.600 higher on bias-aligned" in text


def test_counting_helpers_match_hand_counts(tmp_path):
    r = dissection("layer4", 3, 2)
    assert eyeglasses_units(r) == 3
    assert region_units(r) == {"eyes": 3, "mouth": 1}
    assert first_epoch_holding([1, 2, 3, 4], {1: 1, 2: 5, 3: 0, 4: 6}, {1: 2, 2: 2, 3: 2, 4: 2}) == 4
    assert first_epoch_holding([1, 2], {1: 3, 2: 3}, {1: 2, 2: 2}) == 1
    assert first_epoch_holding([1, 2], {1: 3, 2: 1}, {1: 2, 2: 2}) is None
    run = load_run(write_run(tmp_path / "r", bias_config("grayscale", 70), {}, diss={0: {"layer4": r}}))
    assert (run.label, run.experiment, run.p) == ("grayscale_P70", "grayscale", 70)
    back = run.dissection[0]["layer4"]
    assert np.array_equal(back.local_interpretable, r.local_interpretable)


def test_bad_runs_argument_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        build_report([tmp_path / "missing"], tmp_path / "out")


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHECK = ("<script>addEventListener('load',()=>{const bad=[...document.images].filter(i=>!i.complete||"
         "i.naturalWidth===0).map(i=>i.getAttribute('src'));document.body.setAttribute('data-check',"
         "'images='+document.images.length+';tables='+document.querySelectorAll('table').length+';broken='+"
         "bad.join(','));});</script>")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report):
    probe = report.with_name("report_browser_check.html")
    probe.write_text(report.read_text().replace("</body>", CHECK + "</body>"))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=50).stdout
    m = re.search(r'data-check="images=(\d+);tables=(\d+);broken=([^"]*)"', dom)
    assert m, dom[-2000:]
    page = parse(report)
    assert int(m.group(1)) == len(page.images) >= 10
    assert int(m.group(2)) == len(page.tables) >= 9
    assert m.group(3) == "", f"broken images: {m.group(3)}"


def test_wandb_report_run_gets_every_figure_and_table(tmp_path, monkeypatch):
    import wandb

    from facelens.wandb_io import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = write_run(tmp_path / "eye100", {"data": {"init_args": {"bias": "eyeglasses", "p": 100}}},
                    {"val/bias/gap": 0.4}, probes={1: probing(0.8)}, amrs={1: amr(["Male"], {"Male": 0.3})},
                    random_probe=probing(0.5))
    out = tmp_path / "out"
    build_report([run], out, wandb=True)
    wandb.finish()
    page = parse(out / "report.html")
    logged = read_offline_run(out / "wandb")
    images = {p.name.split("_0_")[0] for p in logged.media("*.png")}
    assert images == {Path(src).stem for src in page.images}
    tables = {p.name.split("_0_")[0] for p in logged.media("*.table.json")}
    assert {t for t in page.tables if t not in ("findings-table", "summary-table")} | {"findings", "summary"} == tables
