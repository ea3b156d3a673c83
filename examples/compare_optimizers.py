"""Train one small model with several optimizers and compare what their saved states say.

For each optimizer: train 30 steps, save a checkpoint with torch.save, load it with
ostate, print the recognised family, the median effective learning rate over all
coordinates, a family-specific column, and check ``ostate.next_update`` against the
optimizer's own next step. Third-party optimizers (transformers, bitsandbytes,
lion-pytorch, prodigyopt, dadaptation, came-pytorch, pytorch-optimizer) are included when installed.

Run: python examples/compare_optimizers.py [WORKDIR]
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from torch import nn

import ostate
from ostate.render import format_value

workdir = sys.argv[1] if len(sys.argv) > 1 else "ostate-compare"
os.makedirs(workdir, exist_ok=True)
warnings.filterwarnings("ignore", message="Paged optimizers")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 72 x 64 = 4608 weights: large enough for bitsandbytes to keep 8-bit state.
    return nn.Sequential(nn.Linear(16, 72), nn.GELU(), nn.Linear(72, 64), nn.GELU(), nn.Linear(64, 4))


def optimizers() -> dict:
    o = torch.optim
    found = {
        "SGD momentum": lambda ps: o.SGD(ps, lr=0.05, momentum=0.9),
        "AdamW": lambda ps: o.AdamW(ps, lr=1e-3, weight_decay=0.01),
        "NAdam": lambda ps: o.NAdam(ps, lr=2e-3),
        "RAdam": lambda ps: o.RAdam(ps, lr=1e-3),
        "Adagrad": lambda ps: o.Adagrad(ps, lr=0.05, lr_decay=1e-3),
        "RMSprop": lambda ps: o.RMSprop(ps, lr=1e-3, momentum=0.9),
        "Adafactor": lambda ps: o.Adafactor(ps, lr=0.01),
    }
    try:
        from transformers.optimization import Adafactor

        found["Adafactor (transformers)"] = lambda ps: Adafactor(ps, lr=None, relative_step=True)
    except ImportError:
        print("(transformers not installed: skipping its Adafactor)")
    try:
        import bitsandbytes as bnb

        found["AdamW8bit (bitsandbytes)"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
    except ImportError:
        print("(bitsandbytes not installed: skipping AdamW8bit)")
    try:
        from lion_pytorch import Lion

        found["Lion"] = lambda ps: Lion(ps, lr=1e-4)
    except ImportError:
        print("(lion-pytorch not installed: skipping Lion)")
    try:
        import prodigyopt

        found["Prodigy"] = lambda ps: prodigyopt.Prodigy(ps, lr=1.0)
    except ImportError:
        print("(prodigyopt not installed: skipping Prodigy)")
    try:
        import dadaptation

        found["DAdaptAdam"] = lambda ps: dadaptation.DAdaptAdam(ps, lr=1.0)
        found["DAdaptSGD"] = lambda ps: dadaptation.DAdaptSGD(ps, lr=1.0, momentum=0.9)
        found["DAdaptAdaGrad"] = lambda ps: dadaptation.DAdaptAdaGrad(ps, lr=1.0)
        found["DAdaptLion"] = lambda ps: dadaptation.DAdaptLion(ps, lr=1.0)
        found["DAdaptAdan"] = lambda ps: dadaptation.DAdaptAdan(ps, lr=1.0)
    except ImportError:
        print("(dadaptation not installed: skipping its optimizers)")
    try:
        from came_pytorch import CAME

        found["CAME"] = lambda ps: CAME(ps, lr=2e-4)
    except ImportError:
        print("(came-pytorch not installed: skipping CAME)")
    try:
        import pytorch_optimizer

        found["SOAP (pytorch-optimizer)"] = lambda ps: pytorch_optimizer.SOAP(ps, lr=3e-3)
    except ImportError:
        print("(pytorch-optimizer not installed: skipping SOAP)")
    return found


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 16, generator=g)
    return x, x[:, :4].sin()


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return (model(x) - y).square().mean()


# The column that says most about each family's state (see docs/optimizers.md).
FAMILY_COLUMN = {
    "sgd": "steady_state_lr",
    "radam": "rectified",
    "nadam": "mu_next",
    "adagrad": "decayed_lr",
    "rmsprop": "momentum_gain",
    "adafactor": "rho_next",
    "hf_adafactor": "next_lr",
    "bnb_adam": "state_bits",
    "lion": "zero_momentum_fraction",
    "adamw": "bias_correction2",
    "prodigy": "d",
    "dadapt_adam": "d",
    "dadapt_sgd": "d_lr",
    "dadapt_adagrad": "d",
    "dadapt_lion": "d",
    "dadapt_adan": "d",
    "came": "instability_mean",
    "soap": "preconditioned_dims",
}

print(f"{'optimizer':26s} {'recognised as':26s} {'median eff_lr':>13s}  {'family column':28s} next_update")
for label, make in optimizers().items():
    model = make_model()
    opt = make(model.parameters())
    for step in range(30):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
    path = os.path.join(workdir, label.split()[0].lower() + ".pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)

    loaded = ostate.load(path).optimizers[0]
    table = ostate.analyze(loaded, by="model").iloc[0]
    params = ostate.analyze(loaded)
    column = FAMILY_COLUMN.get(loaded.kind)
    shown = f"{column}={format_value(params[column].iloc[2])}" if column in params else "-"

    # The next step, predicted from the saved state, against the optimizer's own step().
    opt.zero_grad()
    loss_of(model, 30).backward()
    predicted = [
        ostate.next_update(p, loaded.groups[p.group], w.grad.clone(), w.detach().clone())
        for p, w in zip(loaded.params, model.parameters())
    ]
    before = [w.detach().clone() for w in model.parameters()]
    opt.step()
    error = max(
        float((ours - (w.detach() - b)).abs().max() / (w.detach() - b).abs().max().clamp_min(1e-30))
        for ours, w, b in zip(predicted, model.parameters(), before)
    )
    print(
        f"{label:26s} {loaded.kind + ' (' + loaded.kind_source + ')':26s} {table['eff_lr_p50']:13.4g}  "
        f"{shown:28s} max rel. error {error:.1e}"
    )

print("\nThe effective lr uses each group's saved lr (see docs/optimizers.md, 'Which lr').")
print("Adafactor's eff_lr is relative to the weights' RMS; Lion's and SGD's are the plain lr.")
