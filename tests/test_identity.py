"""IdentityDataModule over an image folder, SynthFaces and CelebA; a tiny RecognitionModule fit."""
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from datamodules.identity import IdentityDataModule, augment_batch, resize_shorter
from lightning_modules.recognition_module import RecognitionModule


def write_folder(root, identities=("alice", "bob", "carol"), per_identity=4, size=(40, 30)):
    """root/<identity>/<n>.png|jpg; identity k has a solid colour (k * 80) in the red channel."""
    for k, name in enumerate(identities):
        (root / name).mkdir(parents=True)
        for j in range(per_identity):
            arr = np.zeros((size[1], size[0], 3), np.uint8)
            arr[..., 0] = k * 80
            arr[..., 1] = j * 10
            Image.fromarray(arr).save(root / name / f"{name}_{j + 1:04d}.{'png' if j % 2 else 'jpg'}")
    return root


def test_image_folder_batches(tmp_path):
    root = write_folder(tmp_path / "faces")
    dm = IdentityDataModule(source="folder", root=str(root), resize=20, crop=16, val_per_identity=1,
                            batch_size=32, num_workers=0)
    assert dm.num_identities == 3
    assert dm.identity_names == ["alice", "bob", "carol"]
    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    assert train["image"].shape == (9, 3, 16, 16) and val["image"].shape == (3, 3, 16, 16)
    assert train["identity"].dtype == torch.int64
    assert set(val["identity"].tolist()) <= set(train["identity"].tolist()) == {0, 1, 2}
    # the label is the folder: the red level identifies the person (jpg tolerance)
    red = val["image"][:, 0].mean((1, 2)) * 255
    np.testing.assert_allclose(red.numpy(), val["identity"].numpy() * 80.0, atol=3)
    assert not val["attribute_mask"].any() and val["attributes"].shape == (3, 40)


def test_resize_shorter_side_then_crop(tmp_path):
    image = torch.rand(3, 30, 60)
    assert resize_shorter(image, 256).shape == (3, 256, 512)
    root = write_folder(tmp_path / "faces", size=(50, 25))
    dm = IdentityDataModule(source="folder", root=str(root), resize=32, crop=24, num_workers=0, val_per_identity=1)
    dm.setup()
    assert dm.datasets["train"][0]["image"].shape == (3, 24, 24)


def test_folder_errors_name_the_file(tmp_path):
    root = write_folder(tmp_path / "faces")
    (root / "dave").mkdir()
    with pytest.raises(ValueError, match="dave.*no .*images"):
        IdentityDataModule(source="folder", root=str(root), num_workers=0).setup()
    (root / "dave" / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.jpg: image file is empty"):
        IdentityDataModule(source="folder", root=str(root), num_workers=0).setup()
    (root / "dave" / "x.jpg").unlink()
    (root / "dave").rmdir()
    (root / "alice" / "x.jpg").write_bytes(b"not a jpeg")
    dm = IdentityDataModule(source="folder", root=str(root), resize=20, crop=16, num_workers=0, val_per_identity=1)
    dm.setup()
    where = [(split, i) for split in ("train", "val") for i, p in enumerate(dm.datasets[split].paths)
             if p.name == "x.jpg"]
    assert len(where) == 1
    with pytest.raises(OSError, match=r"alice/x\.jpg: cannot decode"):
        dm.datasets[where[0][0]][where[0][1]]
    with pytest.raises(FileNotFoundError, match="data.root"):
        IdentityDataModule(source="folder", root=str(tmp_path / "nowhere")).setup()
    with pytest.raises(ValueError, match="data.root"):
        IdentityDataModule(source="folder")


def test_synthfaces_identities_shared_between_train_and_val():
    dm = IdentityDataModule(source="synthfaces", synth_identities=6, images_per_identity=4, val_per_identity=1,
                            num_workers=0, batch_size=64, cache=False)
    assert dm.num_identities == 6
    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    assert len(train["identity"]) == 18 and len(val["identity"]) == 6
    assert sorted(val["identity"].tolist()) == list(range(6))
    assert set(val["identity"].tolist()) <= set(train["identity"].tolist())
    # the same identity renders with the same gender / skin tone in both splits
    for split in (train, val):
        for i, ident in enumerate(split["identity"].tolist()):
            ref = (val["identity"] == ident).nonzero()[0, 0]
            assert split["gender"][i] == val["gender"][ref] and split["skin_tone"][i] == val["skin_tone"][ref]


def test_augment_batch_gray_fraction_and_flip():
    image = torch.rand(400, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = augment_batch({"image": image, "grayscale": torch.zeros(400, dtype=torch.int64)}, 0.2, False, g)
    gray = (out["image"][:, 0] == out["image"][:, 1]).all(-1).all(-1)
    assert 0.13 < gray.float().mean() < 0.27
    assert torch.equal(out["grayscale"].bool(), gray)
    expect = 0.299 * image[gray, 0] + 0.587 * image[gray, 1] + 0.114 * image[gray, 2]
    torch.testing.assert_close(out["image"][gray, 2], expect)
    lm = torch.tensor([[[1.0, 1.0], [3.0, 1.0], [2.0, 2.0], [1.0, 3.0], [3.0, 3.0]]]).repeat(400, 1, 1)
    lm[:, 0, 1] = 0.5
    flipped = augment_batch({"image": image, "landmarks": lm}, 0.0, True, g)
    mirrored = (flipped["image"] == image.flip(-1)).all(-1).all(-1).all(-1)
    assert 0.4 < mirrored.float().mean() < 0.6
    # a mirrored face's left eye is the old right eye, reflected: x -> W - 1 - x
    assert torch.equal(flipped["landmarks"][mirrored, 1], torch.tensor([4 - 1 - 1.0, 0.5]).expand(int(mirrored.sum()), 2))


def test_one_epoch_fit_logs_identification_and_verification(tmp_path):
    dm = IdentityDataModule(source="synthfaces", synth_identities=4, images_per_identity=5, val_per_identity=2,
                            num_workers=0, batch_size=8, cache=False)
    model = RecognitionModule(backbone="resnet18", lr=0.01)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    assert model.hparams.num_identities == 4
    assert 0.0 <= float(metrics["val/identification_accuracy"]) <= 1.0
    assert 0.0 <= float(metrics["val/verification_auc"]) <= 1.0
    assert "val/tar@far=0.001" in metrics


def test_first_occurrence_drops_sampler_padding():
    from lightning_modules.recognition_module import first_occurrence

    # two ranks, 5 samples padded to 6: rank 0 gets 0, 2, 4; rank 1 gets 1, 3, 0 (the repeat)
    gathered = torch.tensor([0, 2, 4, 1, 3, 0])
    assert first_occurrence(gathered).tolist() == [0, 1, 2, 3, 4]
    assert first_occurrence(torch.tensor([-1, -1, 5])).tolist() == [0, 1, 2]


def test_lfw_pairs_file_scored_as_second_validation_set(tmp_path):
    from sklearn.metrics import roc_auc_score

    root = write_folder(tmp_path / "faces", identities=("alice", "bob", "carol", "dave"), per_identity=4)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t6\nalice\t1\t2\nbob\t3\t4\ncarol\t1\t3\nalice\t1\tbob\t2\ncarol\t2\tdave\t4\n"
                     "dave\t1\talice\t4\n")
    dm = IdentityDataModule(source="folder", root=str(root), resize=32, crop=32, num_workers=0, batch_size=4,
                            pairs_file=str(pairs))
    model = RecognitionModule(backbone="resnet18", lr=0.01)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert dm.pairs.shape == (6, 2) and dm.pairs_same.tolist() == [True] * 3 + [False] * 3
    model.eval()
    with torch.no_grad():
        images = torch.stack([dm.datasets["pairs"][i]["image"] for i in range(len(dm.datasets["pairs"]))])
        emb = torch.nn.functional.normalize(model.embed(images), dim=1)
    scores = (emb[dm.pairs[:, 0]] * emb[dm.pairs[:, 1]]).sum(1)
    expected = roc_auc_score(dm.pairs_same.numpy(), scores.numpy())
    assert float(trainer.callback_metrics["val/pairs_auc"]) == pytest.approx(expected, abs=1e-5)
    assert "val/identification_accuracy" in trainer.callback_metrics  # names unchanged by the second loader

    pairs.write_text("alice\t1\t9\n")
    with pytest.raises(FileNotFoundError, match="pair 1.*alice_0009"):
        IdentityDataModule(source="folder", root=str(root), resize=32, crop=32, num_workers=0,
                           pairs_file=str(pairs)).setup()
