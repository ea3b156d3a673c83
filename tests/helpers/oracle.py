"""The oracle for optimizer math: the real optimizer's next ``step()``, against ostate's ``next_update``.

Train a real optimizer some steps, save its state with ``torch.save``, load it through
``ostate.load``, then compute the gradient of one more batch and compare ostate's
prediction of the next step with the change the optimizer's own ``step()`` makes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import ostate
from ostate.state import OptimizerState
from tests.helpers.common import Net, train

TOLERANCE = 1e-5


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest absolute difference over the largest absolute value of ``theirs``."""
    scale = theirs.abs().max().clamp_min(1e-30)
    return float((ours - theirs).abs().max() / scale)


def saved_and_loaded(
    tmp_path, model: nn.Module, opt: torch.optim.Optimizer, *, kind: str | None = None, state_dict: dict | None = None
) -> OptimizerState:
    """Save model and optimizer with torch.save, as a training script would, and load them through ostate."""
    path = tmp_path / "state.pt"
    torch.save({"model": model.state_dict(), "optimizer": state_dict or opt.state_dict()}, path)
    return ostate.load(path, optimizer=kind).optimizers[0]


def set_next_gradient(model: nn.Module, *, seed: int = 99) -> None:
    """Gradients of one more batch, as the next ``step()`` will see them."""
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed)).to(dtype)
    for p in model.parameters():
        p.grad = None
    model(x).square().mean().backward()


def predicted_updates(loaded: OptimizerState, model: nn.Module) -> list[torch.Tensor]:
    """ostate's next update of every parameter that has state, in the optimizer's order."""
    out = []
    for i, p in enumerate(model.parameters()):
        param = loaded.params[i]
        out.append(ostate.next_update(param, loaded.groups[param.group], p.grad.clone(), p.detach().clone()))
    return out


def actual_step(model: nn.Module, step: Callable[[], None]) -> list[torch.Tensor]:
    """The change of every parameter that ``step()`` makes."""
    before = [p.detach().clone() for p in model.parameters()]
    step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def update_quantity_errors(tmp_path, make: Callable, *, steps: int) -> list[float]:
    """Train a float64 Net with the optimizer ``make`` builds, save and load it, and compare the
    family's ``update`` quantity (the next step's change with a zero gradient) with the real
    optimizer's step on zero gradients: one relative error per parameter."""
    from ostate.optimizers import get_family

    torch.manual_seed(0)
    model = Net().double()
    opt = make(model.parameters())
    train(model, opt, steps=steps)
    loaded = saved_and_loaded(tmp_path, model, opt)
    family = get_family(loaded.kind)
    predicted = []
    for p in loaded.params:
        chunk = {k: ref.read().reshape(-1) for k, ref in p.tensors().items() if ref.shape == p.shape}
        predicted.append(family.quantities(chunk, loaded.groups[p.group], p)["update"])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    actual = actual_step(model, opt.step)
    assert len(predicted) == len(actual)
    return [relative_error(ours.double(), theirs.reshape(-1)) for ours, theirs in zip(predicted, actual)]


def assert_matches(predicted: list[torch.Tensor], actual: list[torch.Tensor], tolerance: float = TOLERANCE) -> None:
    for i, (ours, theirs) in enumerate(zip(predicted, actual)):
        assert ours.shape == theirs.shape, f"parameter {i}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
        error = relative_error(ours, theirs)
        assert error <= tolerance, f"parameter {i}: relative error {error:.3g}"


def check_next_update(
    tmp_path,
    make_opt: Callable,
    steps: int,
    *,
    kind: str | None = None,
    model: nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
) -> OptimizerState:
    """Train ``steps`` steps, save, load, and compare ostate's next update with the real next step."""
    torch.manual_seed(0)
    model = (model if model is not None else Net()).to(dtype)
    opt = make_opt(model.parameters())
    train(model, opt, steps=steps)
    loaded = saved_and_loaded(tmp_path, model, opt)
    if kind is not None:
        assert (loaded.kind, loaded.kind_source) == (kind, "detected")
    set_next_gradient(model)
    predicted = predicted_updates(loaded, model)
    assert_matches(predicted, actual_step(model, opt.step))
    return loaded
