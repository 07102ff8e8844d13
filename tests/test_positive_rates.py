"""Datamodules report training positive rates (for the balanced loss) and augment only training batches."""
import numpy as np
import pytest
import torch
from fixtures_celeba import celeba_records, write_celeba

from datamodules.celeba import CelebADataModule
from datamodules.synthfaces import SynthFacesDataModule, sample_labels
from datamodules.transforms import AffactAugmentConfig
from facelens.attributes import ATTRIBUTE_INDEX, CELEBA_ATTRIBUTES


def test_synthfaces_positive_rates_follow_the_labels():
    dm = SynthFacesDataModule(num_train=600, num_identities=60, prior_preset="celeba", num_workers=0)
    rates = dm.positive_rates()
    labels = sample_labels(600, num_identities=60, prior_preset="celeba")
    for name in ("Eyeglasses", "Male", "Young", "Bald"):
        j = ATTRIBUTE_INDEX[name]
        known = labels["attribute_mask"][:, j]
        assert rates[name] == pytest.approx(labels["attributes"][known, j].mean())
    assert rates["Attractive"] == 0.5  # never drawn, never labelled
    assert rates["Eyeglasses"] < 0.15 and rates["Young"] > 0.6  # CelebA-like imbalance


def test_celeba_positive_rates_from_the_train_split(tmp_path):
    root = write_celeba(tmp_path / "celeba", layout="txt", n=12)
    records = celeba_records(12)
    dm = CelebADataModule(str(root), image_size=64, batch_size=4, num_workers=0)
    rates = dm.positive_rates()
    train = records.partition == 0
    expected = (records.attributes[train] > 0).mean(0)
    np.testing.assert_allclose([rates[n] for n in CELEBA_ATTRIBUTES], expected)


def test_synthfaces_augments_training_batches_only():
    dm = SynthFacesDataModule(num_train=8, num_val=8, num_identities=4, batch_size=8, num_workers=0,
                              augment=AffactAugmentConfig())
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    same = dm.transform_batch(dict(batch), train=False)
    torch.testing.assert_close(same["image"], batch["image"])
    moved = dm.transform_batch(dict(batch), train=True)
    assert moved["image"].shape == batch["image"].shape
    assert (moved["landmarks"] - batch["landmarks"]).abs().max() > 0.5
    assert SynthFacesDataModule(num_workers=0).augment is None
