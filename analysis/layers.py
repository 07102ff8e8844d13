"""Address layers by the names the backbone gives them (`layer4`, `layer3.5.conv2`, ...)."""
from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called `name`; a wrong name fails with the closest valid names and the full list."""
    modules = dict(model.named_modules())
    for candidate in (name, f"backbone.{name}"):  # facelens models wrap the timm network as `backbone`
        if candidate in modules and name != "":
            return modules[candidate]
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(name, valid, n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown layer {name!r} for {type(model).__name__}.{hint} Valid layers: {', '.join(valid)}")


@contextlib.contextmanager
def capture(model: nn.Module, layers: Sequence[str], detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of named layers during forward passes inside the `with` block."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        module = resolve_layer(model, name)

        def hook(_m, _inp, out, name=name):
            out = out[0] if isinstance(out, (tuple, list)) else out
            # cloned: a later in-place op (e.g. ReLU(inplace=True) after a BatchNorm) would change it otherwise
            store[name] = out.detach().clone() if detach else out

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
