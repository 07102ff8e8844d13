"""`probe` streams a layer whose sampled features exceed `max_feature_bytes`: the result equals the in-memory one."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from analysis.probing import (
    layer_row_blocks, probe, single_feature_accuracy, streamed_single_feature_accuracy)
from facelens.attributes import ATTRIBUTE_INDEX
from test_ddp_analyses import results, run_ranks  # ranks as threads (tests/ is on sys.path under pytest)

ATTRS = ["Eyeglasses", "Smiling"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ELU())  # 6 x 10 x 10 = 600 features
        self.mid = nn.Sequential(nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.Tanh())  # 5 x 5 x 5 = 125
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(5, 12)  # vector layer: no channels

    def forward(self, x):
        return self.head(self.pool(self.mid(self.stem(x))).flatten(1))


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(3)
    n = 120
    images = torch.rand(n, 3, 10, 10, generator=gen) * 0.5
    labels = torch.zeros(n, 40)
    labels[:, ATTRIBUTE_INDEX["Eyeglasses"]] = (torch.arange(n) % 2).float()
    images[labels[:, ATTRIBUTE_INDEX["Eyeglasses"]] > 0, :, 2:5, 2:7] += 0.3
    labels[:, ATTRIBUTE_INDEX["Smiling"]] = (torch.rand(n, generator=gen) > 0.5).float()
    mask = torch.rand(n, 40, generator=gen) > 0.1
    return Net().eval(), images, labels, mask


def _assert_equal(streamed, memory, layers):
    for layer in layers:
        for attr in ATTRS:
            s, m = streamed[(layer, attr)], memory[(layer, attr)]
            assert s.top_channels == m.top_channels and s.top_neurons == m.top_neurons, (layer, attr)
            for key in ("layer_acc", "channel_acc", "neuron_acc", "top_channel_accs", "top_neuron_accs",
                        "n_train", "n_val"):
                assert getattr(s, key) == getattr(m, key), (layer, attr, key)
            if m.vip is not None:
                torch.testing.assert_close(s.vip, m.vip, rtol=1e-4, atol=0)


@pytest.mark.parametrize("ranking", ["vip", "accuracy"])
def test_streamed_probe_equals_in_memory(data, ranking):
    model, images, labels, mask = data
    layers = ["stem", "mid", "head"]
    options = dict(attributes=ATTRS, n_train=40, n_val=30, n_components=4, top_k=3, batch_size=16,
                   neuron_ranking=ranking)
    memory = probe(model, layers, images, labels, mask, **options)
    calls = []
    hook = model.stem.register_forward_hook(lambda _m, inp, _o: calls.append(len(inp[0])))
    try:
        # budget below one sampled layer of stem (600 features x pool x 4 bytes) but above mid and head
        pool = len(torch.unique(torch.cat([torch.cat(s) for s in memory.splits.values()])))
        streamed = probe(model, layers, images, labels, mask, max_feature_bytes=125 * 4 * pool + 12 * 4 * pool,
                         **options)
    finally:
        hook.remove()
    assert max(calls) <= 16  # stem's activations were only ever made batch by batch ...
    assert sum(calls) > 2 * 4 * 70  # ... in many passes over the training images
    _assert_equal(streamed, memory, layers)
    probes = streamed[("stem", "Eyeglasses")].probes  # kept probes index the whole layer, as in memory
    for rep, fitted in memory[("stem", "Eyeglasses")].probes.items():
        again = probes[rep]
        assert (fitted.columns is None) == (again.columns is None)
        if fitted.columns is not None:
            assert torch.equal(fitted.columns, again.columns)


def test_everything_streamed_with_a_tiny_budget(data):
    model, images, labels, mask = data
    layers = ["stem", "mid", "head"]
    options = dict(attributes=ATTRS, n_train=40, n_val=30, n_components=4, top_k=3, batch_size=16,
                   precision="float32")
    memory = probe(model, layers, images, labels, mask, **options)
    streamed = probe(model, layers, images, labels, mask, max_feature_bytes=1, **options)
    _assert_equal(streamed, memory, layers)


def test_streamed_single_feature_accuracy_equals_in_memory(data):
    model, images, labels, _ = data
    y = labels[:64, ATTRIBUTE_INDEX["Smiling"]].long()
    blocks = layer_row_blocks(model, "stem", images[:64], batch_size=10)
    X = torch.cat(list(blocks.make()))
    expected = single_feature_accuracy(X, y, X, y, chunk=256)
    torch.testing.assert_close(streamed_single_feature_accuracy(blocks, y, chunk=256), expected, rtol=0, atol=1e-12)
    index = torch.tensor([5, 0, 7, 3])
    cols = torch.tensor([4, 1, 599])
    part = torch.cat(list(layer_row_blocks(model, "stem", images, 3, index=index, columns=cols).make()))
    torch.testing.assert_close(part, X[index][:, cols], rtol=1e-6, atol=1e-7)  # convolutions round per batch size


def test_streamed_probe_sharded_over_two_ranks_equals_one_process(data):
    model, images, labels, mask = data
    options = dict(attributes=ATTRS, n_train=40, n_val=30, n_components=4, top_k=3, batch_size=16,
                   keep_probes=False, max_feature_bytes=125 * 4 * 100)
    expected = probe(model, ["stem", "mid"], images, labels, mask, **options)

    def body(shard):
        return probe(copy.deepcopy(model), ["stem", "mid"], images[shard.rank::2], labels, mask, shard=shard,
                     **options).to_dict()

    for got in results(run_ranks(2, body)):
        assert got == expected.to_dict()


def test_bad_budget_is_rejected(data):
    model, images, labels, mask = data
    with pytest.raises(ValueError, match="max_feature_bytes"):
        probe(model, ["stem"], images, labels, mask, attributes=ATTRS, n_train=40, n_val=30, max_feature_bytes=0)


class _Skip(nn.Module):
    """A module whose forward never calls its child."""

    def __init__(self):
        super().__init__()
        self.child = nn.Linear(2, 2)

    def forward(self, x):
        return x


def test_row_blocks_stop_at_the_layer_and_restore_the_mode(data):
    model, images, _, _ = data
    later = []
    hook = model.head.register_forward_hook(lambda *_: later.append(1))
    model.train()
    try:
        blocks = list(layer_row_blocks(model, "mid", images[:5], batch_size=2).make())
        assert model.training  # eval during the passes only
    finally:
        hook.remove()
        model.eval()
    assert [len(b) for b in blocks] == [2, 2, 1] and blocks[0].shape[1] == 125 and not later
    with pytest.raises(RuntimeError, match="never called layer 'child'"):
        list(layer_row_blocks(_Skip(), "child", torch.zeros(2, 2)).make())
