"""BiasedDataModule: exact rates at every P, constant size, unbiased evaluation split, clear errors."""
import numpy as np
import pytest
import torch

from datamodules.biased import BiasedDataModule
from datamodules.synthfaces import sample_labels
from facelens.attributes import ATTRIBUTE_INDEX

SMALL = dict(pool_size=400, num_val=200, num_identities=200, num_workers=0, cache=False, batch_size=32)


def make(bias, p, **kw):
    dm = BiasedDataModule(bias=bias, p=p, priors={"Eyeglasses": 0.5} if bias == "eyeglasses" else None,
                          **{**SMALL, **kw})
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("bias", ["eyeglasses", "grayscale"])
def test_rates_equal_p_within_one_image_and_size_constant(bias):
    sizes = set()
    for p in (50, 60, 70, 80, 90, 100):
        dm = make(bias, p)
        sel = dm.selection
        n = int(sel.male.sum())
        assert n == int((~sel.male).sum())
        # independent count from the labels of the pool (eyeglasses) / the gray flag of the items (grayscale)
        if bias == "eyeglasses":
            labels = sample_labels(400, num_identities=200, priors={"Eyeglasses": 0.5})
            glasses = labels["attributes"][sel.indices, ATTRIBUTE_INDEX["Eyeglasses"]] > 0.5
            male = labels["attributes"][sel.indices, ATTRIBUTE_INDEX["Male"]] > 0.5
            np.testing.assert_array_equal(male, sel.male)
            np.testing.assert_array_equal(glasses, sel.biased)
        else:
            glasses = sel.biased
        assert abs(glasses[sel.male].sum() - n * p / 100) <= 1
        assert abs(glasses[~sel.male].sum() - n * (100 - p) / 100) <= 1
        rates = dm.rates()
        assert abs(rates["train_male_rate"] - p / 100) <= 1 / n + 1e-12
        sizes.add(len(dm.datasets["train"]))
    assert len(sizes) == 1, sizes


def test_grayscale_is_applied_to_exactly_the_selected_images():
    dm = make("grayscale", 80)
    ds = dm.datasets["train"]
    for i in range(12):
        item = ds[i]
        image = item["image"]
        is_gray = bool(torch.allclose(image[0], image[1]) and torch.allclose(image[1], image[2]))
        assert is_gray == bool(dm.selection.biased[i]) == bool(item["bias"])
        assert bool(item["bias_aligned"]) == (bool(item["bias"]) == (item["attributes"][ATTRIBUTE_INDEX["Male"]] > 0.5))


@pytest.mark.parametrize("bias", ["eyeglasses", "grayscale"])
def test_evaluation_split_is_unbiased(bias):
    dm = make(bias, 100)
    ev = dm.eval_selection
    groups = [int((ev.male & ev.biased).sum()), int((ev.male & ~ev.biased).sum()),
              int((~ev.male & ev.biased).sum()), int((~ev.male & ~ev.biased).sum())]
    assert len(set(groups)) == 1 and groups[0] > 0, groups
    batch = next(iter(dm.val_dataloader()))
    assert batch["bias"].dtype == torch.bool and "bias_aligned" in batch


def test_positive_rates_follow_the_training_set():
    dm = make("eyeglasses", 90)
    rates = dm.positive_rates()
    assert rates["Male"] == pytest.approx(0.5)
    assert rates["Eyeglasses"] == pytest.approx(dm.selection.biased.mean())


@pytest.mark.parametrize("p", [40, 101, 49])
def test_bad_p_fails_naming_the_option(p):
    with pytest.raises(ValueError, match=r"data\.p"):
        BiasedDataModule(p=p)


def test_unknown_bias_and_source_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"data\.bias.*'hats'"):
        BiasedDataModule(bias="hats")
    with pytest.raises(ValueError, match=r"data\.source.*'imagenet'"):
        BiasedDataModule(source="imagenet")
    with pytest.raises(ValueError, match=r"data\.root"):
        BiasedDataModule(source="celeba")
    with pytest.raises(FileNotFoundError, match="data.root"):
        BiasedDataModule(source="celeba", root=str(tmp_path / "missing"))


def test_missing_attribute_fails_naming_it():
    dm = BiasedDataModule(bias="eyeglasses", priors={"Eyeglasses": 0.0}, **SMALL)
    with pytest.raises(ValueError, match="'Eyeglasses'.*missing from the data"):
        dm.setup("fit")


def test_too_large_size_per_gender_fails():
    dm = BiasedDataModule(bias="grayscale", size_per_gender=10_000, **SMALL)
    with pytest.raises(ValueError, match=r"data\.size_per_gender"):
        dm.setup("fit")


def test_celeba_source_from_fixture(tmp_path):
    from fixtures_celeba import write_celeba

    root = write_celeba(tmp_path, layout="txt", n=48)
    dm = BiasedDataModule(bias="grayscale", p=100, source="celeba", root=str(root), image_size=32, num_workers=0,
                          batch_size=8)
    dm.setup("fit")
    sel = dm.selection
    assert sel.biased[sel.male].all() and not sel.biased[~sel.male].any()
    batch = next(iter(dm.val_dataloader()))
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["image"].shape[-2:] == (32, 32) and "bias" in out
