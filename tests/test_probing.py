"""PLS/VIP/QDA probing (seed 003) against scikit-learn and planted signals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from sklearn.cross_decomposition import PLSRegression
from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
from torch import nn

from analysis.probing import (
    PLS, QDA, ColumnBlocks, ProbingResult, RowBlocks, ablation_study, balanced_split, conv_and_block_layers,
    extract_features, layer_row_blocks, plot_accuracy_over_depth, plot_mean_accuracy, plot_vip_analysis, probe,
    probe_features, single_feature_accuracy, vip_analysis, vip_scores,
)
from facelens.attributes import ATTRIBUTE_INDEX

FITTED = ("x_weights_", "x_scores_", "x_loadings_", "y_loadings_", "y_weights_", "x_rotations_", "coef_")


def rel_err(ours: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(ours.cpu().numpy() - ref).max() / np.abs(ref).max())


def sklearn_vip(sk: PLSRegression) -> np.ndarray:
    """Standard VIP computed independently in numpy from scikit-learn's fit."""
    W, T, q = sk.x_weights_, sk.x_scores_, sk.y_loadings_.ravel()
    ss = q**2 * (T**2).sum(0)
    return np.sqrt(W.shape[0] * ((W / np.linalg.norm(W, axis=0)) ** 2 @ ss) / ss.sum())


def assert_matches_sklearn(pls: PLS, sk: PLSRegression, X: torch.Tensor) -> None:
    for name in FITTED:
        assert rel_err(getattr(pls, name), getattr(sk, name)) < 1e-4, name
    ref_vip = sklearn_vip(sk)
    assert rel_err(pls.vip_, ref_vip) < 1e-4
    assert np.corrcoef(pls.vip_.numpy(), ref_vip)[0, 1] > 0.9999
    assert rel_err(pls.transform(X), sk.transform(X.double().numpy())) < 1e-4


@pytest.fixture(scope="module")
def relu_data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(150, 1200, generator=gen).relu() + 0.5  # non-zero means, like activations
    y = ((X[:, :6].sum(1) + torch.randn(150, generator=gen)) > X[:, :6].sum(1).median()).float()
    return X, y


def test_pls_matches_sklearn_on_random_data(relu_data):
    X, y = relu_data
    sk = PLSRegression(8, scale=False).fit(X.double().numpy(), y.numpy())
    pls = PLS(8).fit(X, y)
    assert_matches_sklearn(pls, sk, X)
    # scikit-learn's sign convention: the largest-magnitude weight of each component is positive
    W = pls.x_weights_
    assert (W.gather(0, W.abs().argmax(0, keepdim=True)) > 0).all()
    assert torch.allclose(pls.x_weights_.norm(dim=0), torch.ones(8, dtype=torch.float64))
    assert (pls.vip_**2).mean().item() == pytest.approx(1.0)
    assert pls._dtype == torch.float64  # "auto" on a small matrix
    # float32 products (the default on large matrices): same targets, the error does not grow with k
    fast = PLS(8, precision="float32").fit(X, y)
    assert fast._dtype == torch.float32
    assert_matches_sklearn(fast, sk, X)
    per_component = (fast.x_weights_ - torch.from_numpy(sk.x_weights_)).abs().max(0).values
    assert per_component[-1] < 1e-5


def test_streaming_equals_in_memory(relu_data):
    X, y = relu_data
    full = PLS(6, precision="float64").fit(X, y)
    col_blocks = ColumnBlocks(lambda: (X[:, i:i + 250] for i in range(0, X.shape[1], 250)))
    row_blocks = RowBlocks(lambda: (X[i:i + 40] for i in range(0, len(X), 40)))
    cols = PLS(6, precision="float64").fit(col_blocks, y)
    rows = PLS(6, precision="float64").fit(row_blocks, y)
    assert cols.n_passes_ == 7 and rows.n_passes_ == 13
    for other in (cols, rows):
        for name in FITTED + ("vip_", "x_mean_"):
            assert torch.allclose(getattr(other, name), getattr(full, name), rtol=1e-9, atol=1e-12), name
    for fast in (PLS(6).fit(col_blocks, y), PLS(6).fit(row_blocks, y)):  # streamed input: float32 by default
        assert fast._dtype == torch.float32
        for name in FITTED + ("vip_",):
            assert rel_err(getattr(fast, name), getattr(full, name).numpy()) < 1e-5, name
    assert torch.allclose(full.transform(RowBlocks(lambda: (X[i:i + 40] for i in range(0, len(X), 40)))),
                          full.transform(X), atol=1e-10)
    assert torch.allclose(full.transform(ColumnBlocks(lambda: (X[:, i:i + 250] for i in range(0, X.shape[1], 250)))),
                          full.transform(X), atol=1e-10)


def test_pls_matches_sklearn_on_a_network_layer():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    images = torch.rand(16, 3, 64, 64)
    feats, shapes = extract_features(model, ["layer2"], images, batch_size=16)
    X = feats["layer2"]
    assert shapes["layer2"] == (128, 8, 8) and X.shape == (16, 128 * 64)
    y = (images[:, 0].mean((1, 2)) > images[:, 0].mean()).float()
    sk = PLSRegression(8, scale=False).fit(X.double().numpy(), y.numpy())
    assert_matches_sklearn(PLS(8).fit(X, y), sk, X)
    assert_matches_sklearn(PLS(8, precision="float32").fit(X, y), sk, X)
    # streaming straight from the model: every pass re-runs the network
    streamed = PLS(2).fit(layer_row_blocks(model, "layer2", images, batch_size=8), y)
    assert rel_err(streamed.x_weights_, sk.x_weights_[:, :2]) < 1e-4


def test_pls_rejects_bad_input(relu_data):
    X, y = relu_data
    with pytest.raises(ValueError, match="n_components"):
        PLS(0)
    with pytest.raises(ValueError, match="n_samples=10"):
        PLS(2).fit(X, y[:10])
    with pytest.raises(ValueError, match="exceeds"):
        PLS(20).fit(X[:10], y[:10])


def test_qda_predictions_equal_sklearn():
    gen = torch.Generator().manual_seed(1)
    X0 = torch.randn(120, 3, generator=gen) @ torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 2.0]])
    X1 = torch.randn(60, 3, generator=gen) * torch.tensor([0.5, 2.0, 1.0]) + torch.tensor([1.0, -0.5, 0.5])
    X, y = torch.cat([X0, X1]), torch.cat([torch.zeros(120), torch.ones(60)]).long()
    test = torch.randn(500, 3, generator=gen) * 2
    ours = QDA().fit(X, y)
    sk = QuadraticDiscriminantAnalysis().fit(X.numpy(), y.numpy())
    assert np.array_equal(ours.predict(test).numpy(), sk.predict(test.numpy()))
    assert np.allclose(ours.decision_function(test).numpy(), sk._decision_function(test.numpy()), atol=1e-8)
    reg = QDA(reg_param=0.3).fit(X, y)
    sk_reg = QuadraticDiscriminantAnalysis(reg_param=0.3).fit(X.numpy(), y.numpy())
    assert np.array_equal(reg.predict(test).numpy(), sk_reg.predict(test.numpy()))


def test_single_feature_accuracy_equals_per_column_sklearn_qda():
    gen = torch.Generator().manual_seed(2)
    y = (torch.rand(200, generator=gen) > 0.4).long()
    X = torch.randn(200, 7, generator=gen) * (1 + y[:, None] * torch.arange(7)) + y[:, None] * 0.3
    Xv, yv = X[100:], y[100:]
    accs = single_feature_accuracy(X[:100], y[:100], Xv, yv, chunk=3)
    for j in range(7):
        sk = QuadraticDiscriminantAnalysis().fit(X[:100, j:j + 1].numpy(), y[:100].numpy())
        assert accs[j].item() == pytest.approx((sk.predict(Xv[:, j:j + 1].numpy()) == yv.numpy()).mean())


def planted(n: int, m: int, seed: int, noise: float = 0.2):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.randn(n, m, generator=gen).relu()
    X[:, 123] = y + noise * torch.randn(n, generator=gen)
    return X, y


def test_planted_feature_gets_top_vip_and_near_perfect_accuracy():
    X, y = planted(1000, 4 * 8 * 8, seed=3)
    entry = probe_features(X[:500], y[:500], X[500:], y[500:], (4, 8, 8), "toy", "Eyeglasses")
    assert int(entry.vip.argmax()) == 123
    assert entry.top_neurons[0] == 123 and entry.best_neuron == 123
    assert entry.top_channels[0] == 1  # neuron 123 lies in channel 123 // 64
    assert entry.layer_acc > 0.95 and entry.neuron_acc > 0.95 and entry.best_neuron_acc > 0.97
    assert entry.best_channel == 1 and entry.best_channel_acc > 0.95
    by_acc = probe_features(X[:500], y[:500], X[500:], y[500:], (256,), neuron_ranking="accuracy")
    assert by_acc.top_neurons[0] == 123 and by_acc.channel_acc is None and by_acc.top_channels == []


def test_vip_analysis_prefers_vip_over_activation():
    gen = torch.Generator().manual_seed(4)
    n, m = 600, 300
    y = torch.arange(n) % 2
    X = torch.randn(n, m, generator=gen) + 5 * torch.rand(m, generator=gen)  # activation level unrelated to y
    X[:, :30] += y[:, None] * torch.linspace(0.1, 2.0, 30)  # graded signal
    pls = PLS(4).fit(X[:300], y[:300])
    res = vip_analysis(X[:300], y[:300], X[300:], y[300:], pls.vip_, n_neurons=40)
    assert len(res.neurons) == len(set(res.neurons)) == 40
    assert res.corr_vip > 0.8 and res.corr_vip > res.corr_activation + 0.3
    assert plot_vip_analysis(res, pls.vip_).axes


def test_balanced_split_sizes_and_balance():
    gen = torch.Generator().manual_seed(5)
    labels = (torch.rand(3000, generator=gen) < 0.3).long()
    known = torch.rand(3000, generator=gen) > 0.1
    train, val = balanced_split(labels, known, 256, 512, seed=7)
    assert len(train) == 256 and len(val) == 512
    assert labels[train].sum() == 128 and labels[val].sum() == 256
    assert known[train].all() and known[val].all()
    assert not set(train.tolist()) & set(val.tolist())
    again = balanced_split(labels, known, 256, 512, seed=7)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(train, balanced_split(labels, known, 256, 512, seed=8)[0])
    _, short = balanced_split(labels, known, 256, 4000, seed=7)  # validation capped by the smaller class
    assert labels[short].sum() * 2 == len(short) and len(short) == 2 * (int((labels[known] == 1).sum()) - 128)
    with pytest.raises(ValueError, match="Bald"):
        balanced_split(labels, known, 2000, 10, attribute="Bald")


def test_conv_and_block_layers_of_resnet18():
    model = timm.create_model("resnet18", pretrained=False)
    names = conv_and_block_layers(model)
    assert names[0] == "conv1" and "layer1.0" in names and "layer4.1.conv2" in names
    assert names.index("layer1.0.conv1") < names.index("layer1.0") < names.index("layer1.1")
    assert conv_and_block_layers(model, convs=False) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


class Toy(nn.Module):
    """Conv stack whose first block sees a bright square when the attribute is present."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return self.head(self.mid(self.stem(x)))


@pytest.fixture(scope="module")
def toy_probe():
    gen = torch.Generator().manual_seed(6)
    n = 240
    images = torch.rand(n, 3, 12, 12, generator=gen) * 0.5
    labels = torch.zeros(n, 40)
    col = ATTRIBUTE_INDEX["Eyeglasses"]
    labels[:, col] = (torch.arange(n) % 2).float()
    images[labels[:, col] > 0, :, 3:7, 3:9] += 0.5
    labels[:, ATTRIBUTE_INDEX["Smiling"]] = (torch.rand(n, generator=gen) > 0.5).float()
    model = Toy()
    result = probe(model, ["stem", "mid", "head"], images, labels, attributes=["Eyeglasses", "Smiling"],
                   n_train=96, n_val=96, n_components=4, top_k=3, batch_size=64)
    return model, images, labels, result


def test_probe_end_to_end_and_json(toy_probe, tmp_path):
    _, _, _, result = toy_probe
    entry = result[("stem", "Eyeglasses")]
    assert entry.layer_acc > 0.95 and entry.n_train == 96 and entry.n_val == 96
    assert len(entry.top_channels) == 3 and len(entry.top_neurons) == 3
    data = json.loads(json.dumps(result.to_dict()))
    cell = data["results"]["mid"]["Smiling"]
    for key in ("layer_acc", "channel_acc", "neuron_acc", "top_channels", "top_neurons", "best_channel_acc",
                "best_neuron_acc"):
        assert key in cell
    again = ProbingResult.from_dict(data)
    assert again.to_table() == result.to_table() and len(result.to_table()) == 6
    assert result.curve("Eyeglasses") == [result[(lay, "Eyeglasses")].layer_acc for lay in ["stem", "mid", "head"]]
    assert plot_accuracy_over_depth(result).axes and plot_mean_accuracy({"toy": result}).axes
    with pytest.raises(KeyError, match="Blurry"):
        result[("stem", "Blurry")]


def test_ablation_zero_percent_changes_nothing_and_full_drops_to_chance(toy_probe):
    model, images, labels, result = toy_probe
    ab = ablation_study(model, result, images, "stem", "Eyeglasses", fractions=(0.0, 0.1, 1.0), labels=labels)
    assert set(ab.baseline) == {"mid", "head"}
    for layer in ("mid", "head"):
        assert ab.baseline[layer]["layer"] == pytest.approx(result[(layer, "Eyeglasses")].layer_acc)
        for rep in ("layer", "channels", "neurons"):
            assert ab.drop(0.0, layer, rep) == 0.0
            assert ab.accuracy[1.0][layer][rep] == pytest.approx(0.5)  # constant features, balanced classes
    assert ab.mean_drop(1.0) > 0.4
    assert {row["fraction"] for row in ab.to_table()} == {0.0, 0.1, 1.0}
    with pytest.raises(ValueError, match="later layers"):
        ablation_study(model, result, images, "head", "Eyeglasses", labels=labels)
