"""Sharded analysis callbacks: every rank analyses a disjoint part of the probe set and the merged result equals
the one-process result; a failure on one rank stops every rank instead of hanging.

Tolerances: integer counts, quantile thresholds, dissection results and probe accuracies are compared exactly
in-process; float64 running sums to 1e-12; whole JSON results of separate runs to 1e-5 (relative and
absolute), since the same image in a differently composed batch may differ in the last bits of float32.

In-process tests run the ranks as threads whose `Shard` exchanges values through a barrier (`ThreadShard`), so
the real callbacks and the real failure protocol run without a process group. The slow tests start real
two-process gloo runs (Lightning `ddp` on CPU) of this file as a script.
"""
from __future__ import annotations

import copy
import json
import math
import os
import pickle
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from analysis.amr import AMRAccumulator
from analysis.dissection import DissectionConfig, ExactTopQuantile, LayerDissector, SketchTopQuantile
from analysis.probing import probe
from callbacks.base import AnalysisRankError, Shard
from callbacks.saliency import SaliencyConfig, SaliencyReport

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # whole results of separate runs, relative and absolute


# --------------------------------------------------------------------------------------------------
# ranks as threads
# --------------------------------------------------------------------------------------------------


class Hub:
    """All-gather among `world` threads: write your slot, wait, copy all slots, wait."""

    def __init__(self, world: int):
        self.slots = [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def all_gather(self, rank: int, value):
        self.slots[rank] = pickle.dumps(value)  # values cross "processes" as pickles, as all_gather_object does
        self.barrier.wait()
        out = [pickle.loads(v) for v in self.slots]
        self.barrier.wait()
        return out


@dataclass(frozen=True)
class ThreadShard(Shard):
    hub: Hub | None = None

    def _all_gather(self, value):
        return self.hub.all_gather(self.rank, value)


def run_ranks(world: int, body, where: str = "test"):
    """body(shard) on `world` threads; returns [(result or None, exception or None)] per rank."""
    hub = Hub(world)
    out = [(None, None)] * world

    def target(rank):
        try:
            out[rank] = (body(ThreadShard(rank, world, where, hub)), None)
        except BaseException as err:  # reported to the test
            out[rank] = (None, err)

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a rank is still waiting: deadlock"
    return out


def results(out):
    errors = [e for _, e in out if e is not None]
    if errors:
        raise errors[0]
    return [r for r, _ in out]


def assert_same(a, b, path="", rel=TOLERANCE, abs_=TOLERANCE):
    """Equal JSON-like trees; floats within rel/abs tolerance (0 for exact), NaN equal to NaN."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}", rel, abs_)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", rel, abs_)
    elif isinstance(a, float) or isinstance(b, float):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return
        assert a == pytest.approx(b, rel=rel, abs=abs_), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


# --------------------------------------------------------------------------------------------------
# the shard layout and the failure protocol
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(7, 2), (7, 3), (2, 3), (12, 2)])
def test_shards_are_disjoint_cover_and_interleave_back(n, world):
    shards = [Shard(r, world) for r in range(world)]
    seen = sorted(i for s in shards for i in s.indices(n))
    assert seen == list(range(n))  # disjoint, complete, no padding
    items = torch.arange(n) * 10
    parts = [items[list(s.indices(n))] for s in shards]
    assert torch.equal(shards[0].interleave(parts), items)


def test_one_process_needs_no_process_group_and_reraises():
    shard = Shard()
    assert shard.gather({"x": 1}) == [{"x": 1}]
    with pytest.raises(KeyError, match="original"):
        shard.exchange(KeyError("original"))


@pytest.mark.parametrize("failing", [0, 1])
def test_a_rank_that_raises_stops_every_rank(failing):
    """The failing rank skips its remaining gathers; the flag exchange pairs up and both ranks raise."""

    def body(shard):
        try:
            shard.gather("first")
            if shard.rank == failing:
                raise ValueError("boom in pass 2")
            shard.gather("second")
            shard.gather("third")
        except AnalysisRankError:
            raise
        except Exception as err:
            shard.exchange(err)
        shard.exchange()

    out = run_ranks(2, body, "MyCallback (epoch 3)")
    for _, err in out:
        assert isinstance(err, AnalysisRankError)
        assert f"MyCallback (epoch 3) failed on rank {failing} of 2" in str(err)
        assert "ValueError: boom in pass 2" in str(err)


# --------------------------------------------------------------------------------------------------
# merges, in-process
# --------------------------------------------------------------------------------------------------


def _amr_inputs(n=11, t=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, t, 4, 4, generator=g)
    logits = torch.randn(n, t, generator=g)
    labels = (torch.rand(n, t, generator=g) > 0.5).float()
    label_mask = torch.rand(n, t, generator=g) > 0.2
    masks = torch.rand(n, t, 16, 16, generator=g) > 0.6
    keep = torch.rand(n, generator=g) > 0.3
    return maps, logits, labels, label_mask, masks, keep


def test_amr_accumulator_merge_equals_whole():
    attrs = ["Eyeglasses", "Male", "Smiling"]
    data = _amr_inputs()
    whole = AMRAccumulator(attrs)
    for sl in (slice(0, 5), slice(5, 11)):
        whole.update(*(x[sl] for x in data))
    parts = []
    for rank in range(2):  # uneven: 6 and 5 images
        acc = AMRAccumulator(attrs)
        idx = torch.arange(rank, 11, 2)
        for chunk in idx.split(4):
            acc.update(*(x[chunk] for x in data))
        parts.append(acc)
    merged = AMRAccumulator(attrs).merge(parts[0]).merge(parts[1].state_dict())
    merged += AMRAccumulator(attrs)  # an empty shard adds nothing
    a, b = whole.result(), merged.result()
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.error_rate, b.error_rate)
    assert a.frontal_only and b.frontal_only
    for v in a.scores:
        np.testing.assert_allclose(a.scores[v], b.scores[v], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.average_maps, b.average_maps, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="settings differ"):
        AMRAccumulator(attrs, threshold=0.5).merge(parts[0])


def _acts(n=13, u=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, u, 3, 3, generator=g)
    acts[:, 0] = acts[:, 0].round()  # ties
    return acts


@pytest.mark.parametrize("kind", ["exact", "sketch"])
def test_quantile_merge_gives_the_whole_thresholds_exactly(kind):
    acts = _acts()

    def make():
        return ExactTopQuantile(13, 0.05) if kind == "exact" else SketchTopQuantile(0.05)

    whole = make()
    whole.update(acts[:8])
    whole.update(acts[8:])
    shards = [make(), make(), make()]
    shards[0].update(acts[0::2][:4])
    shards[0].update(acts[0::2][4:])
    shards[1].update(acts[1::2])
    merged = shards[0].merge(shards[1]).merge(shards[2])  # shards[2] saw nothing
    np.testing.assert_array_equal(merged.thresholds(), whole.thresholds())
    if kind == "exact":
        per_unit = acts.transpose(0, 1).reshape(6, -1).double().numpy()
        np.testing.assert_allclose(whole.thresholds(), np.quantile(per_unit, 0.95, axis=1), rtol=1e-6)
        with pytest.raises(ValueError, match="num_images"):
            ExactTopQuantile(12, 0.05).merge(whole)


def _dissector_inputs(n=13, seed=2):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, 6, 4, 4, generator=g)
    masks = torch.rand(n, 3, 16, 16, generator=g) > 0.7
    labelled = torch.rand(n, 3, generator=g) > 0.2
    labels = torch.randint(-1, 2, (n,), generator=g)
    return acts, masks, labelled, labels


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_layer_dissector_merge_equals_whole(method):
    acts, masks, labelled, labels = _dissector_inputs()
    config = DissectionConfig(quantile=0.05, quantile_method=method, top_k=4)
    args = (["a", "b", "c"], ["r1", "r1", "r2"], {"g": ["x", "y"]}, config, 13)

    def feed(d, idx, counting):
        for chunk in torch.as_tensor(list(idx)).split(3):
            if counting:
                d.update_counts(acts[chunk], masks[chunk], labelled[chunk], {"g": labels[chunk]}, chunk)
            else:
                d.update_quantiles(acts[chunk])

    whole = LayerDissector(*args)
    feed(whole, range(13), False)
    whole.compute_thresholds()
    feed(whole, range(13), True)
    expected = whole.result()

    shards = [LayerDissector(*args) for _ in range(2)]
    for counting in (False, True):
        for rank, d in enumerate(shards):
            feed(d, range(rank, 13, 2), counting)
        states = [d.shard_state() for d in shards]
        for rank, d in enumerate(shards):
            d.merge(states[1 - rank])
        if not counting:
            for d in shards:
                np.testing.assert_array_equal(d.compute_thresholds(), expected.thresholds)
    for d in shards:
        got = d.result()
        np.testing.assert_array_equal(got.top_images, expected.top_images)
        assert_same(got.to_dict(), expected.to_dict(), rel=0, abs_=0)


def test_saliency_report_merge_adds_sums():
    config = SaliencyConfig(methods=["gradcam"])
    g = torch.Generator().manual_seed(3)
    values, valid = torch.rand(9, 2, generator=g), torch.rand(9, 2, generator=g) > 0.3
    whole, parts = SaliencyReport(["Male", "Smiling"], config), [SaliencyReport(["Male", "Smiling"], config)
                                                                 for _ in range(2)]
    whole.add("gradcam", "amr", values, valid)
    parts[0].add("gradcam", "amr", values[0::2], valid[0::2])
    parts[1].add("gradcam", "amr", values[1::2], valid[1::2])
    merged = parts[0].merge(parts[1])
    np.testing.assert_array_equal(merged.counts["gradcam"]["amr"], whole.counts["gradcam"]["amr"])
    np.testing.assert_allclose(merged.means("gradcam", "amr"), whole.means("gradcam", "amr"), rtol=1e-12)


def test_probe_sharded_over_three_ranks_equals_one_process():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU()).eval()
    g = torch.Generator().manual_seed(4)
    n = 29
    images = torch.rand(n, 3, 12, 12, generator=g)
    labels = (torch.rand(n, 40, generator=g) > 0.5).float()
    mask = torch.rand(n, 40, generator=g) > 0.1
    options = dict(attributes=["Male", "Smiling", "Eyeglasses"], n_train=8, n_val=6, n_components=3, top_k=2,
                   keep_probes=False, precision="float64")
    expected = probe(model, ["1", "3"], images, labels, mask, **options).to_dict()

    def body(shard):
        return probe(copy.deepcopy(model), ["1", "3"], images[shard.rank::3], labels, mask, shard=shard,
                     **options).to_dict()

    for got in results(run_ranks(3, body)):
        assert_same(got, expected, rel=0, abs_=0)


# --------------------------------------------------------------------------------------------------
# the real callbacks, ranks as threads
# --------------------------------------------------------------------------------------------------


def _callbacks():
    from callbacks.dissection import DissectionCallback
    from callbacks.gradcam_amr import GradCamAMRCallback
    from callbacks.probing import ProbingCallback
    from callbacks.saliency import SaliencySanityCallback

    cheap = {"smoothgrad_samples": 1, "hiding_steps": 2, "randomization_images": 2, "randomization_steps": ["fc"]}
    return [
        GradCamAMRCallback(masks="drawn", num_images=13, batch_size=4),
        SaliencySanityCallback(methods=["gradcam", "smoothgrad"], num_images=3, batch_size=2, config=cheap),
        DissectionCallback(layers=["layer4"], dictionary_count=7, dictionary_size=64, batch_size=4,
                           config={"quantile": 0.02, "top_k": 3}),
        ProbingCallback(layers=["layer3", "layer4"], attributes=["Male", "Smiling"], n_train=8, n_val=8,
                        n_components=3, top_k=2, num_images=31, batch_size=8),
    ]


def _model(cls=None):
    from lightning_modules.attribute_module import AttributeModule

    torch.manual_seed(0)
    return (cls or AttributeModule)(backbone="resnet18", attributes=["Male", "Eyeglasses", "Smiling"]).eval()


def _data():
    from datamodules.synthfaces import SynthFacesDataModule

    data = SynthFacesDataModule(size=64, num_train=8, num_val=31, num_test=8, num_identities=8, batch_size=8,
                                num_workers=0)
    data.setup("fit")
    return data


def _model_and_data():
    return _model(), _data()


def _fake_trainer(data, root: Path):
    return SimpleNamespace(datamodule=data, loggers=[], global_step=0, callbacks=[], default_root_dir=str(root),
                           world_size=1, global_rank=0)


@pytest.fixture(scope="module")
def in_process_runs(tmp_path_factory):
    """Each callback run once in one process and once as three thread ranks (every probe set then splits
    unevenly, the dictionary of 14 images too); the saved JSONs of both."""
    model, data = _model_and_data()
    out = {}
    for world in (1, 3):
        root = tmp_path_factory.mktemp(f"world{world}")
        per_rank = [_callbacks() for _ in range(world)]

        def body(shard, per_rank=per_rank, root=root):
            net = copy.deepcopy(model)
            for cb in per_rank[shard.rank]:
                cb.run_now(_fake_trainer(data, root), net, 0, shard=shard if world > 1 else None)

        results(run_ranks(world, body))
        out[world] = {p.parent.name: json.loads(p.read_text()) for p in root.rglob("epoch000.json")}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gradcam_amr", "saliency", "dissection", "probing"])
def test_callbacks_on_three_thread_ranks_equal_one_process(in_process_runs, name):
    one, three = in_process_runs[1], in_process_runs[3]
    assert name in one and name in three, (sorted(one), sorted(three))
    assert_same(three[name], one[name])
    if name == "gradcam_amr":
        assert one[name]["Male"]["count"]["overall"] == 13
    if name == "saliency":
        assert one[name]["num_images"] == 3
        assert one[name]["methods"]["smoothgrad"]["Male"]["randomization"]["steps"] == ["fc"]
    if name == "dissection":
        assert one[name]["layers"]["layer4"]["num_images"] == 14  # 7 faces and their grayscale copies


def test_a_callback_failing_on_one_thread_rank_stops_both(tmp_path):
    from callbacks.gradcam_amr import GradCamAMRCallback

    class FailsOnRankOne(GradCamAMRCallback):
        def analyse(self, model, batches, shard=None):
            if shard.rank == 1:
                raise RuntimeError("grad-cam exploded")
            return super().analyse(model, batches, shard)

    model, data = _model_and_data()

    def body(shard):
        FailsOnRankOne(num_images=5, batch_size=4).run_now(_fake_trainer(data, tmp_path), copy.deepcopy(model), 0,
                                                             shard=shard)

    for _, err in run_ranks(2, body, "FailsOnRankOne (epoch 0)"):
        assert isinstance(err, AnalysisRankError)
        assert "FailsOnRankOne (epoch 0) failed on rank 1 of 2" in str(err) and "grad-cam exploded" in str(err)
    assert not list(tmp_path.rglob("epoch000.json"))


# --------------------------------------------------------------------------------------------------
# two real processes (gloo)
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, out: Path, devices: int, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), mode, str(out), str(devices)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    runs = {}
    for devices in (1, 2):
        done = _launch("equal", tmp_path / f"devices{devices}", devices)
        assert done.returncode == 0, done.stderr[-4000:]
        runs[devices] = {p.parent.name: json.loads(p.read_text())
                         for p in (tmp_path / f"devices{devices}").rglob("epoch000.json")}
    assert set(runs[1]) == set(runs[2]) == {"gradcam_amr", "saliency", "dissection", "probing"}
    for name in runs[1]:
        assert_same(runs[2][name], runs[1][name], name)


@pytest.mark.slow
def test_two_gloo_processes_end_when_one_rank_raises(tmp_path):
    done = _launch("fail", tmp_path, 2, timeout=300)  # a hang would exceed the timeout and fail the test
    assert done.returncode != 0
    message = "AnalysisRankError: FailsOnRankOne (epoch 0) failed on rank 1 of 2 (rank 1: RuntimeError: rank one gives up)"
    assert done.stderr.count(message) >= 2, done.stderr[-4000:]  # raised by both processes


def _script(mode: str, out: str, devices: int) -> None:
    """One tiny run under Lightning (`ddp` on CPU when devices > 1). The model does not learn (zero loss, no
    forward in training), so both runs analyse the same weights."""
    import pytorch_lightning as pl

    from callbacks.gradcam_amr import GradCamAMRCallback

    from lightning_modules.attribute_module import AttributeModule

    class Frozen(AttributeModule):
        def training_step(self, batch, batch_idx):
            return sum(p.sum() for p in self.parameters()) * 0.0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    frozen, data = _model(Frozen), _data()

    class FailsOnRankOne(GradCamAMRCallback):
        def analyse(self, model, batches, shard=None):
            if shard.rank == 1:
                raise RuntimeError("rank one gives up")
            return super().analyse(model, batches, shard)

    callbacks = _callbacks() if mode == "equal" else [FailsOnRankOne(num_images=5, batch_size=4)]
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, accelerator="cpu",
                         devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=out, callbacks=callbacks)
    trainer.fit(frozen, datamodule=data)


if __name__ == "__main__":
    _script(sys.argv[1], sys.argv[2], int(sys.argv[3]))
