"""bench/dissection_bias.py (issue 7's measurement): the eyeglasses-balanced dictionary and the per-layer figures.

The claim itself (more eyeglasses units at P = 100 than at P = 50) needs two trained models, minutes each on
CPU; the bench prints it, and README.md gives the measured figures.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from analysis.dissection import DissectionConfig
from callbacks.dissection import run_dissection
from datamodules.face_dictionary import build_synthfaces

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_dissection_bias", ROOT / "bench" / "dissection_bias.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def dictionary():
    return build_synthfaces(60, 64, seed=3)


def _eyeglasses_pixels(d, i: int) -> np.ndarray:
    return d.mask(i)[d.concepts.index("Eyeglasses")]


def test_eyeglasses_balanced_keeps_every_wearer_and_as_many_others(dictionary):
    wearing = np.array([_eyeglasses_pixels(dictionary, i).any() for i in range(len(dictionary))])
    assert 0 < wearing.sum() < len(dictionary) / 2
    np.testing.assert_array_equal(bench.wears_eyeglasses(dictionary), wearing)
    balanced = bench.eyeglasses_balanced(dictionary)
    kept = np.array([_eyeglasses_pixels(balanced, i).any() for i in range(len(balanced))])
    assert len(balanced) == 2 * wearing.sum() and kept.sum() == wearing.sum()
    # rows travel together: image, masks, landmarks and names of one source image stay aligned
    for j, name in enumerate(balanced.source_names):
        i = dictionary.source_names.index(name) if dictionary.source_names.count(name) == 1 else None
        if i is None:
            continue
        np.testing.assert_array_equal(balanced.images[j], dictionary.images[i])
        np.testing.assert_array_equal(balanced.mask(j), dictionary.mask(i))
        np.testing.assert_array_equal(balanced.landmarks[j], dictionary.landmarks[i])
    for group, labels in balanced.global_labels.items():
        assert len(labels) == len(balanced), group


class _MaskUnits(nn.Module):
    """A 'network' whose layer has one unit per given concept, firing exactly on that concept's mask: the
    dictionary's own masks are looked up by image, so dissection must pair each unit with its concept."""

    def __init__(self, dictionary, concepts):
        super().__init__()
        images = torch.from_numpy(dictionary.images).permute(0, 3, 1, 2).float().div(255)
        self.register_buffer("keys", images.flatten(1))
        masks = np.stack([[dictionary.mask(i)[dictionary.concepts.index(c)] for c in concepts]
                          for i in range(len(dictionary))])
        self.register_buffer("maps", torch.from_numpy(masks).float())
        self.layer = nn.Identity()

    def forward(self, x):
        found = torch.cdist(x.flatten(1), self.keys).argmin(1)
        return self.layer(self.maps[found] + 1e-3 * torch.rand_like(self.maps[found]))


def test_figures_count_a_unit_that_is_the_eyeglasses_mask(dictionary):
    balanced = bench.eyeglasses_balanced(dictionary)
    net = _MaskUnits(balanced, ["Eyeglasses", "mouth"]).eval()
    report = run_dissection(net, balanced, ["layer"], DissectionConfig(quantile=0.005), device=net.keys.device)
    figures = bench.eyeglasses_figures(report.layers["layer"])
    assert figures["units"] == 2
    assert figures["best_concept_eyeglasses"] == 1
    assert figures["eyeglasses_units"] == 1
    assert figures["max_eyeglasses_iou"] > 0.2  # the unit fires on the mask (top 0.5% spill onto noise)
    assert figures["eye_region_units"] == 1
    assert figures["interpretable_units"] == 2


def test_parse_checkpoints_rejects_bad_items(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"x")
    assert bench.parse_checkpoints([f"100={ckpt}"]) == {100: ckpt}
    for bad in (f"P100={ckpt}", str(ckpt), f"50={tmp_path / 'missing.ckpt'}"):
        with pytest.raises(SystemExit, match="--checkpoints"):
            bench.parse_checkpoints([bad])
