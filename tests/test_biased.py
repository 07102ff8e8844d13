import numpy as np
import pytest
import torch

from datamodules.biased import BiasedDataset, check_rate, feasible_size_per_gender, select_biased, to_gray


def pool(seed=0, n=3000):
    rng = np.random.default_rng(seed)
    male = rng.random(n) < 0.45
    glasses = rng.random(n) < np.where(male, 0.3, 0.15)
    return male, glasses


@pytest.mark.parametrize("kind", ["eyeglasses", "grayscale"])
def test_rates_equal_p_within_one_image_and_size_is_constant(kind):
    male, glasses = pool()
    sizes = set()
    for p in range(50, 101, 10):
        sel = select_biased(male, glasses if kind == "eyeglasses" else None, p, kind, seed=p)
        n_male, n_female = sel.male.sum(), (~sel.male).sum()
        assert n_male == n_female
        assert abs(sel.biased[sel.male].sum() - p / 100 * n_male) <= 1
        assert abs(sel.biased[~sel.male].sum() - (100 - p) / 100 * n_female) <= 1
        if kind == "eyeglasses":  # the selection really picked images with / without glasses
            np.testing.assert_array_equal(glasses[sel.indices], sel.biased)
        np.testing.assert_array_equal(male[sel.indices], sel.male)
        assert len(np.unique(sel.indices)) == len(sel.indices)
        sizes.add(len(sel.indices))
    assert len(sizes) == 1


def test_feasible_size_is_the_largest_that_works_for_every_p():
    male, glasses = pool(1)
    n = feasible_size_per_gender(male, glasses)
    for p in (50, 100):
        select_biased(male, glasses, p, "eyeglasses", size_per_gender=n)
    with pytest.raises(ValueError, match="size_per_gender"):
        select_biased(male, glasses, 100, "eyeglasses", size_per_gender=n + 1)


@pytest.mark.parametrize("bad", [40, 101, 49, 75.5, "80", True])
def test_bad_rate_fails_clearly(bad):
    with pytest.raises(ValueError, match="data.p.*50..100"):
        check_rate(bad)


def test_eyeglasses_bias_needs_labels():
    male, _ = pool()
    with pytest.raises(ValueError, match="Eyeglasses"):
        select_biased(male, None, 80, "eyeglasses")


def test_biased_dataset_grays_and_flags():
    base = [{"image": torch.rand(3, 4, 4), "attributes": torch.zeros(40)} for _ in range(4)]
    ds = BiasedDataset(base, np.array([2, 0]), np.array([True, False]), np.array([True, True]),
                       apply_gray=np.array([True, False]))
    gray = ds[0]["image"]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    expected = 0.299 * base[2]["image"][0] + 0.587 * base[2]["image"][1] + 0.114 * base[2]["image"][2]
    torch.testing.assert_close(gray[0], expected)
    assert ds[0]["bias_aligned"] and not ds[1]["bias_aligned"]
    torch.testing.assert_close(ds[1]["image"], base[0]["image"])
    assert torch.allclose(to_gray(torch.rand(2, 3, 5, 5)).std(1), torch.zeros(2, 5, 5), atol=1e-6)
