"""AttributeModule performance switches: channels_last and torch.compile.

channels_last must really convert weights and inputs and give the standard outputs; compile must train, keep
state_dict keys and layer names, and let hooks (analyses) see every layer.
"""
from __future__ import annotations

import copy
import pickle
import shutil

import pytest
import torch

from analysis.layers import capture
from lightning_modules.attribute_module import AttributeModule

BACKBONE = "test_resnet"  # timm's tiny ResNet: same layer names as resnet50, compiles in seconds
ATTRS = ["Male", "Smiling", "Eyeglasses"]


def _pair(**switches) -> tuple[AttributeModule, AttributeModule]:
    torch.manual_seed(0)
    plain = AttributeModule(backbone=BACKBONE, attributes=ATTRS, scheduler="none")
    fast = AttributeModule(backbone=BACKBONE, attributes=ATTRS, scheduler="none", **switches)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def _batch(n: int = 4, size: int = 48) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 3, size, size, generator=g),
            "attributes": (torch.rand(n, 40, generator=g) > 0.5).float(),
            "attribute_mask": torch.ones(n, 40, dtype=torch.bool)}


def _double_reference(module: AttributeModule, images: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(module.net).double().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        return ref(images.double())


def test_channels_last_converts_weights_and_inputs_and_matches():
    plain, fast = _pair(channels_last=True)
    plain.eval(), fast.eval()
    convs = [m for m in fast.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not all(c.weight.is_contiguous() for c in convs)
    seen = []
    hook = convs[0].register_forward_hook(
        lambda m, inp, out: seen.append((inp[0].is_contiguous(memory_format=torch.channels_last),
                                         out.is_contiguous(memory_format=torch.channels_last))))
    images = _batch()["image"]  # NCHW, contiguous
    with torch.no_grad():
        out_fast, out_plain = fast(images), plain(images)
    hook.remove()
    assert seen == [(True, True)]
    ref = _double_reference(plain, images)
    torch.testing.assert_close(out_fast.double(), ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out_plain.double(), ref, atol=2e-4, rtol=1e-4)


def test_channels_last_gradients_match_standard():
    plain, fast = _pair(channels_last=True)
    batch = _batch()
    for m in (plain, fast):
        targets, mask = m.select(batch)
        m._loss(m(batch["image"]), targets, mask).backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-3, msg=name)


def test_compile_options_are_checked():
    with pytest.raises(ValueError, match="model.compile_mode: 'fastest'"):
        AttributeModule(backbone=BACKBONE, compile=True, compile_mode="fastest")
    with pytest.raises(ValueError, match="model.compile_backend: 'nope'"):
        AttributeModule(backbone=BACKBONE, compile=True, compile_backend="nope")


def _no_log(*args, **kwargs) -> None:
    """Stands in for LightningModule.log when no trainer is attached."""


def _train_steps(module: AttributeModule, steps: int = 2) -> list[float]:
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    batch, losses = _batch(), []
    module.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_compile_trains_like_eager_and_hooks_still_fire():
    """aot_eager: the dynamo capture + compiled autograd graph without building C++ (inductor is the slow test)."""
    plain, fast = _pair(compile=True, compile_backend="aot_eager")
    plain.log = fast.log = _no_log  # no trainer attached
    assert list(fast.state_dict()) == list(plain.state_dict())  # compiled graph not registered
    torch.testing.assert_close(_train_steps(fast), _train_steps(plain), atol=1e-5, rtol=1e-5)
    assert fast.__dict__.get("_compiled_net") is not None  # the compiled path did run
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
    # an analysis hooks a layer after compilation: the forward pass falls back to the eager network
    fast.eval(), plain.eval()
    images = _batch()["image"]
    with capture(fast.net, ["layer4", "layer1"]) as got, torch.no_grad():
        out = fast(images)
    with capture(plain.net, ["layer4", "layer1"]) as want, torch.no_grad():
        ref = plain(images)
    assert set(got) == {"layer4", "layer1"}
    torch.testing.assert_close(got["layer4"], want["layer4"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # the module (with its compiled graph built) still pickles and deep-copies
    clone = pickle.loads(pickle.dumps(fast))
    assert "_compiled_net" not in clone.__dict__
    torch.testing.assert_close(clone(images), ref, atol=1e-5, rtol=1e-4)
    copy.deepcopy(fast)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="the inductor backend needs a C++ compiler to build its CPU kernels")
def test_compile_inductor_trains_one_step_on_cpu():
    plain, fast = _pair(compile=True)  # inductor, mode default
    plain.log = fast.log = _no_log
    torch.testing.assert_close(_train_steps(fast, 1), _train_steps(plain, 1), atol=1e-4, rtol=1e-4)
    assert fast.__dict__.get("_compiled_net") is not None


@pytest.mark.gpu
def test_channels_last_bf16_autocast_on_cuda():
    plain, fast = _pair(channels_last=True)
    plain, fast = plain.cuda().eval(), fast.cuda().eval()
    images = _batch()["image"].cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out_fast, out_plain = fast(images).float(), plain(images).float()
    torch.testing.assert_close(out_fast, out_plain, atol=5e-2, rtol=5e-2)
