"""CelebADataModule on fixture trees in both layouts: batches, labels, geometry, errors with file and line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from fixtures_celeba import celeba_records, edit_line, write_celeba
from torch import nn

from datamodules.celeba import CelebADataModule, CelebAFormatError, main, scan_celeba
from datamodules.transforms import AffactAugmentConfig
from facelens.attributes import CELEBA_ATTRIBUTES
from facelens.geometry import LEFT_EYE, RIGHT_EYE

SIZE = 64
N = 12


def _dm(root: Path, **kw) -> CelebADataModule:
    args = dict(image_size=SIZE, batch_size=4, num_workers=0, seed=0)
    args.update(kw)
    dm = CelebADataModule(str(root), **args)
    dm.setup("fit")
    return dm


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, len(CELEBA_ATTRIBUTES)))


def _dark_centroid(img: torch.Tensor, at: np.ndarray, radius: int = 4) -> np.ndarray:
    x0, y0 = np.round(at).astype(int)
    win = img[:, y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
    dark = (win < 0.25).all(dim=0).numpy()
    ys, xs = np.nonzero(dark)
    return np.array([xs.mean() + x0 - radius, ys.mean() + y0 - radius])


@pytest.mark.parametrize("layout", ["txt", "csv"])
def test_batches_from_both_layouts_and_one_optimisation_step(tmp_path, layout):
    root = write_celeba(tmp_path / layout, layout=layout, n=N)
    rec = celeba_records(N)
    dm = _dm(root)
    assert dm.index.files.layout == layout
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 6, "val": 3, "test": 3}
    assert dm.load_size == 80

    raw = next(iter(dm.train_dataloader()))
    assert raw["image"].shape == (4, 3, 80, 80)
    train = dm.transform_batch(raw, train=True)
    assert train["image"].shape == (4, 3, SIZE, SIZE) and train["image"].dtype == torch.float32
    assert 0 <= train["image"].min() and train["image"].max() <= 1
    assert train["landmarks"].shape == (4, 5, 2) and train["landmarks"].dtype == torch.float32
    rows = np.flatnonzero(rec.partition == 0)[train["index"].numpy()]
    expected = torch.from_numpy((rec.attributes[rows] > 0).astype(np.float32))
    assert train["attributes"].dtype == torch.float32 and torch.equal(train["attributes"], expected)
    assert train["attribute_mask"].dtype == torch.bool and train["attribute_mask"].all()
    assert train["identity"].dtype == torch.int64 and train["index"].dtype == torch.int64
    want_id = rec.identity[rows] if layout == "txt" else np.full(4, -1)
    assert train["identity"].tolist() == list(want_id)

    val = dm.transform_batch(next(iter(dm.val_dataloader())), train=False)
    assert val["image"].shape == (3, 3, SIZE, SIZE)
    vrows = np.flatnonzero(rec.partition == 1)
    assert torch.equal(val["attributes"], torch.from_numpy((rec.attributes[vrows] > 0).astype(np.float32)))
    # Centre crop: eye centre at (0.5 S - 0.5, 0.45 S - 0.5), eyes horizontal, and the drawn dots are there.
    eye = (val["landmarks"][:, LEFT_EYE] + val["landmarks"][:, RIGHT_EYE]) / 2
    torch.testing.assert_close(eye, torch.tensor([[31.5, 28.3]]).expand(3, 2), atol=1e-3, rtol=0)
    for i in range(3):
        for k in (LEFT_EYE, RIGHT_EYE):
            at = val["landmarks"][i, k].numpy()
            np.testing.assert_allclose(_dark_centroid(val["image"][i], at), at, atol=1.0)

    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(train["image"])
    loss = nn.functional.binary_cross_entropy_with_logits(logits[train["attribute_mask"]],
                                                          train["attributes"][train["attribute_mask"]])
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _tiny_model()
        self.seen: dict[str, tuple] = {}

    def training_step(self, batch, _):
        self.seen["train"] = tuple(batch["image"].shape)
        return nn.functional.binary_cross_entropy_with_logits(self.net(batch["image"]), batch["attributes"])

    def validation_step(self, batch, _):
        self.seen["val"] = tuple(batch["image"].shape)
        lm = batch["landmarks"]
        self.seen["val_eye"] = ((lm[:, LEFT_EYE] + lm[:, RIGHT_EYE]) / 2).tolist()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_step_uses_augmentation_for_train_and_centre_crop_for_val(tmp_path):
    root = write_celeba(tmp_path, layout="csv", n=N)
    dm = CelebADataModule(str(root), image_size=SIZE, batch_size=4, num_workers=0, seed=0)
    model = _Tiny()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert model.seen["train"] == (4, 3, SIZE, SIZE) and model.seen["val"] == (3, 3, SIZE, SIZE)
    np.testing.assert_allclose(model.seen["val_eye"], [[31.5, 28.3]] * 3, atol=1e-3)


def test_wild_images_are_aligned_from_their_own_landmarks(tmp_path):
    root = write_celeba(tmp_path, layout="txt", n=N, wild=True)
    dm = _dm(root, images="wild")
    assert dm.index.files.image_dir.name == "img_celeba"
    val = dm.transform_batch(next(iter(dm.val_dataloader())), train=False)
    for i in range(3):
        for k in (LEFT_EYE, RIGHT_EYE):
            at = val["landmarks"][i, k].numpy()
            np.testing.assert_allclose(_dark_centroid(val["image"][i], at), at, atol=1.0)
    np.testing.assert_allclose(val["landmarks"][:, RIGHT_EYE, 1], val["landmarks"][:, LEFT_EYE, 1], atol=1e-3)


def test_frontal_filter_and_sample_limit(tmp_path, capsys):
    root = write_celeba(tmp_path, n=N)
    rec = celeba_records(N)
    dm = _dm(root, frontal_only=True)
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 6, "val": 2, "test": 2}
    assert dm.index.frontal_kept == {"train": (5, 6), "val": (2, 3), "test": (2, 3)}
    np.testing.assert_array_equal(dm.index.frontal, rec.frontal)
    dm = _dm(root, frontal_only=True, frontal_splits=["train", "val", "test"])
    assert len(dm.datasets["train"]) == 5
    assert set(dm.datasets["train"].names) == {n for n, f, p in zip(rec.names, rec.frontal, rec.partition)
                                               if f and p == 0}
    dm = _dm(root, max_samples_per_split=2)
    assert [len(d) for d in dm.datasets.values()] == [2, 2, 2]
    with pytest.raises(CelebAFormatError, match="frontal filter"):
        _dm(root, frontal_only=True, frontal_threshold=0.0)
    with pytest.raises(ValueError, match="frontal_splits"):
        CelebADataModule(str(root), frontal_splits=["dev"])


def test_crlf_and_missing_optional_files_are_fine(tmp_path):
    root = write_celeba(tmp_path, n=N, crlf=True, identity=False, bbox=False)
    dm = _dm(root)
    assert dm.index.files.identity is None and (dm.index.identity == -1).all()


def _attr_value_line(value: str):
    def change(line: str) -> str:
        tokens = line.split()
        tokens[6] = value
        return " ".join(tokens)
    return change


# (layout, file, line to edit, change, expected line in the message, expected text)
MALFORMED = [
    ("txt", "list_attr_celeba.txt", 5, lambda s: s.rsplit(" ", 1)[0], 5, "expected 41 columns"),
    ("txt", "list_attr_celeba.txt", 3, _attr_value_line("0"), 3, "-1 or 1"),
    ("csv", "list_attr_celeba.csv", 4, lambda s: s.replace(",-1,", ",2,", 1), 4, "-1 or 1"),
    ("txt", "list_attr_celeba.txt", 1, "13", 1, "count line says 13"),
    ("txt", "list_attr_celeba.txt", 2, lambda s: s.replace("Eyeglasses", "Glasses"), 2, "missing column"),
    ("txt", "list_landmarks_align_celeba.txt", 4, lambda s: "000001.jpg" + s[10:], 4, "duplicated image"),
    ("csv", "list_landmarks_align_celeba.csv", 5, lambda s: s.rsplit(",", 1)[0] + ",nan", 5, "not a finite"),
    ("txt", "list_landmarks_align_celeba.txt", 5, lambda s: s[:10] + "   500" + s[16:], 5,
     "outside the 178x218"),
    ("txt", "list_eval_partition.txt", 2, "000002.jpg 3", 2, "not a partition"),
    ("txt", "list_eval_partition.txt", 3, None, 5, "missing from list_eval_partition.txt"),
    ("csv", "list_bbox_celeba.csv", 7, lambda s: s.rsplit(",", 1)[0] + ",0", 7, "positive width"),
]


@pytest.mark.parametrize("layout,name,line,change,at,text", MALFORMED)
def test_malformed_files_raise_naming_file_and_line(tmp_path, layout, name, line, change, text, at):
    root = write_celeba(tmp_path, layout=layout, n=N)
    edit_line(root / name, line, change)
    with pytest.raises(CelebAFormatError) as err:
        scan_celeba(root)
    first = str(err.value.problems[0])
    expect_file = "list_attr_celeba.txt" if "missing from" in text else name
    assert f"{expect_file}:{at}:" in first and text in first, first


def test_missing_and_empty_images_and_empty_split(tmp_path):
    root = write_celeba(tmp_path, n=N)
    (root / "img_align_celeba" / "000004.jpg").unlink()
    (root / "img_align_celeba" / "000005.jpg").write_bytes(b"")
    with pytest.raises(CelebAFormatError) as err:
        scan_celeba(root)
    msgs = [str(p) for p in err.value.problems]
    assert "list_attr_celeba.txt:6:" in msgs[0] and "not found" in msgs[0] and "000004.jpg" in msgs[0]
    assert "list_attr_celeba.txt:7:" in msgs[1] and "empty (0 bytes)" in msgs[1]

    root = write_celeba(tmp_path / "split", n=N)
    for line in range(10, 13):  # the three test images become validation images
        edit_line(root / "list_eval_partition.txt", line, lambda s: s[:-1] + "1")
    with pytest.raises(CelebAFormatError,
                       match=r"list_eval_partition.txt: split 'test' \(partition 2\) has no images"):
        scan_celeba(root)


def test_corrupt_jpeg_fails_at_load_naming_the_file(tmp_path):
    root = write_celeba(tmp_path, n=N)
    path = root / "img_align_celeba" / "000002.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, scan data truncated
    dm = _dm(root)
    with pytest.raises(OSError, match="000002.jpg"):
        dm.datasets["train"][1]
    path.write_bytes(b"not a jpeg at all")
    with pytest.raises(CelebAFormatError, match="000002.jpg.*cannot read image header"):
        scan_celeba(root)


def test_check_cli_summary_and_problems(tmp_path, capsys):
    root = write_celeba(tmp_path, layout="csv", n=N)
    assert main(["check", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "layout: csv" in out and "train 6, val 3, test 3" in out
    assert "keeps: train 5/6 (83.3%), val 2/3 (66.7%), test 2/3 (66.7%)" in out
    rates = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith("  ")}
    expected = (celeba_records(N).attributes > 0).mean(axis=0)
    np.testing.assert_allclose([rates[a] for a in CELEBA_ATTRIBUTES], expected, atol=5e-4)
    for line in (3, 6):
        edit_line(root / "list_attr_celeba.csv", line, lambda s: s.replace(",-1", ",0", 1))
    assert main(["check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "list_attr_celeba.csv:3:" in err and "list_attr_celeba.csv:6:" in err


def test_augmentation_config_reaches_the_datamodule(tmp_path):
    root = write_celeba(tmp_path, n=N)
    dm = _dm(root, augment=AffactAugmentConfig.off(mirror_p=1.0))
    raw = next(iter(dm.val_dataloader()))
    flipped, centre = dm.transform_batch(raw, train=True), dm.transform_batch(raw, train=False)
    torch.testing.assert_close(flipped["image"], centre["image"].flip(-1), atol=1e-5, rtol=0)
    assert (flipped["landmarks"][:, LEFT_EYE, 0] < flipped["landmarks"][:, RIGHT_EYE, 0]).all()
    dm = _dm(root, augment_train=False)
    torch.testing.assert_close(dm.transform_batch(raw, train=True)["image"], centre["image"])
