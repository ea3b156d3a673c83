"""Real checkpoints of every optimizer family ostate knows, for recognition and inspect tests.

Each entry builds the real optimizer on a small model, trains it a few steps as users
do and returns ``(model, optimizer)``; ``save`` writes the usual training checkpoint.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from tests.helpers.common import Net, train

O = torch.optim


class Matrices(nn.Module):
    """Bias-free linear layers: every parameter is a matrix (Muon's requirement)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16, bias=False)
        self.head = nn.Linear(16, 3, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.inp(x)))


class Embedder(nn.Module):
    """An embedding with sparse gradients (SparseAdam's use)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6, sparse=True)

    def forward(self, x):
        return self.embed(x.abs().mul(4).long().clamp(max=19)).sum(dim=-1)


class Big(nn.Module):
    """One matrix large enough for bitsandbytes' 8-bit state (4480 elements)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 70)
        self.big = nn.Linear(70, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.relu(self.big(torch.relu(self.inp(x)))))


def lbfgs_train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` LBFGS steps on a fixed batch (LBFGS steps with a closure)."""
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


def _schedulefree(params):
    import schedulefree

    opt = schedulefree.AdamWScheduleFree(params, lr=2e-3, warmup_steps=5)
    opt.train()
    return opt


def _schedulefree_variant(name: str, **kwargs):
    def make(params):
        import schedulefree

        opt = getattr(schedulefree, name)(params, **kwargs)
        opt.train()
        return opt

    return make


def _lion(params):
    import lion_pytorch

    return lion_pytorch.Lion(params, lr=1e-4, weight_decay=0.1)


def _prodigy(params):
    import prodigyopt

    return prodigyopt.Prodigy(params, lr=1.0, weight_decay=0.01)


def _dadapt_adam(params):
    import dadaptation

    return dadaptation.DAdaptAdam(params, lr=1.0)


def _dadaptation(name: str, **kwargs):
    def make(params):
        import dadaptation

        return getattr(dadaptation, name)(params, lr=1.0, **kwargs)

    return make


def _hf_adafactor(params):
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=None, relative_step=True, scale_parameter=True, warmup_init=False)


def _bnb(name: str, **kwargs):
    def make(params):
        import bitsandbytes as bnb

        return getattr(bnb.optim, name)(params, **kwargs)

    return make


# name -> (expected kind, model class, optimizer factory)
FAMILIES: dict[str, tuple[str, Callable[[], nn.Module], Callable]] = {
    "SGD": ("sgd", Net, lambda ps: O.SGD(ps, lr=0.05, momentum=0.9, nesterov=True)),
    "Adam": ("adam", Net, lambda ps: O.Adam(ps, lr=1e-3, amsgrad=True)),
    "AdamW": ("adamw", Net, lambda ps: O.AdamW(ps, lr=1e-3)),
    "Adamax": ("adamax", Net, lambda ps: O.Adamax(ps)),
    "NAdam": ("nadam", Net, lambda ps: O.NAdam(ps)),
    "RAdam": ("radam", Net, lambda ps: O.RAdam(ps)),
    "Adagrad": ("adagrad", Net, lambda ps: O.Adagrad(ps, lr_decay=0.01)),
    "RMSprop": ("rmsprop", Net, lambda ps: O.RMSprop(ps, centered=True, momentum=0.9)),
    "Adadelta": ("adadelta", Net, lambda ps: O.Adadelta(ps)),
    "ASGD": ("asgd", Net, lambda ps: O.ASGD(ps, t0=2)),
    "Rprop": ("rprop", Net, lambda ps: O.Rprop(ps)),
    "SparseAdam": ("sparse_adam", Embedder, lambda ps: O.SparseAdam(ps)),
    "Adafactor": ("adafactor", Net, lambda ps: O.Adafactor(ps)),
    "Muon": ("muon", Matrices, lambda ps: O.Muon(ps, lr=0.02)),
    "LBFGS": ("lbfgs", Net, lambda ps: O.LBFGS(ps, max_iter=3, history_size=4)),
    "transformers.Adafactor": ("hf_adafactor", Net, _hf_adafactor),
    "lion_pytorch.Lion": ("lion", Net, _lion),
    "schedulefree.AdamWScheduleFree": ("schedulefree_adamw", Net, _schedulefree),
    "schedulefree.SGDScheduleFree": (
        "schedulefree_sgd",
        Net,
        _schedulefree_variant("SGDScheduleFree", lr=0.05, weight_decay=0.01),
    ),
    # Without the silent phase its first step moves (the first-step suite checks a step that moves).
    "schedulefree.RAdamScheduleFree": (
        "schedulefree_radam",
        Net,
        _schedulefree_variant("RAdamScheduleFree", lr=2e-3, silent_sgd_phase=False),
    ),
    "prodigyopt.Prodigy": ("prodigy", Net, _prodigy),
    "dadaptation.DAdaptAdam": ("dadapt_adam", Net, _dadapt_adam),
    "dadaptation.DAdaptSGD": ("dadapt_sgd", Net, _dadaptation("DAdaptSGD", momentum=0.9, weight_decay=0.01)),
    "dadaptation.DAdaptAdaGrad": ("dadapt_adagrad", Net, _dadaptation("DAdaptAdaGrad", weight_decay=0.01)),
    "dadaptation.DAdaptLion": ("dadapt_lion", Net, _dadaptation("DAdaptLion", weight_decay=0.01)),
    "dadaptation.DAdaptAdan": ("dadapt_adan", Net, _dadaptation("DAdaptAdan")),
    "bitsandbytes.AdamW8bit": ("bnb_adam", Big, _bnb("AdamW8bit", lr=1e-3)),
    "bitsandbytes.Lion8bit": ("bnb_lion", Big, _bnb("Lion8bit", lr=1e-4)),
    "bitsandbytes.SGD8bit": ("bnb_momentum", Big, _bnb("SGD8bit", lr=0.01, momentum=0.9)),
    "bitsandbytes.RMSprop8bit": ("bnb_rmsprop", Big, _bnb("RMSprop8bit", lr=1e-3)),
    "bitsandbytes.Adagrad8bit": ("bnb_adagrad", Big, _bnb("Adagrad8bit", lr=0.01)),
}


class Wide(nn.Module):
    """A 64x64 matrix (4096 elements: quantised by torchao) between small layers (kept in float32)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 64)
        self.big = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.relu(self.big(torch.relu(self.inp(x)))))


def _torchao(name: str, **kwargs):
    def make(model: nn.Module):
        import torchao.optim

        return getattr(torchao.optim, name)(model.parameters(), **kwargs)

    return make


def _galore(model: nn.Module):
    import galore_torch

    # Its matrices projected (inp 8 x 4 from the right, head 3 x 8 from the left), the rest plain AdamW.
    matrices = [model.inp.weight, model.hidden.weight, model.head.weight]
    others = [p for p in model.parameters() if all(p is not m for m in matrices)]
    return galore_torch.GaLoreAdamW(
        [{"params": matrices, "rank": 2, "update_proj_gap": 3, "scale": 0.5, "proj_type": "std"}, {"params": others}],
        lr=1e-2,
        weight_decay=0.1,
    )


def _adam_mini(model: nn.Module):
    import contextlib
    import io

    import adam_mini

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its block choices
        return adam_mini.Adam_mini(model.named_parameters(), lr=1e-3, dim=8, n_heads=2)


def _came(model: nn.Module):
    import came_pytorch

    return came_pytorch.CAME(model.parameters(), lr=2e-4, weight_decay=0.1)


def _soap(model: nn.Module):
    import pytorch_optimizer

    return pytorch_optimizer.SOAP(model.parameters(), lr=3e-3, precondition_1d=True, max_precondition_dim=6)


# The families of issue 22 whose optimizers need the model (names, groups, a quantised size): name ->
# (kind, model class, optimizer factory taking the model, the package to skip without).
MODEL_FAMILIES: dict[str, tuple[str, Callable[[], nn.Module], Callable[[nn.Module], torch.optim.Optimizer], str]] = {
    "torchao.AdamW8bit": ("torchao_adamw", Wide, _torchao("AdamW8bit", lr=1e-3, weight_decay=0.1), "torchao"),
    "torchao.AdamW4bit": ("torchao_adamw", Wide, _torchao("AdamW4bit", lr=1e-3), "torchao"),
    "torchao.AdamWFp8": ("torchao_adamw", Wide, _torchao("AdamWFp8", lr=1e-3, betas=(0.8, 0.99)), "torchao"),
    "torchao.Adam8bit": ("torchao_adam", Wide, _torchao("Adam8bit", lr=1e-3, weight_decay=0.1), "torchao"),
    "galore_torch.GaLoreAdamW": ("galore_adamw", Net, _galore, "galore_torch"),
    "adam_mini.Adam_mini": ("adam_mini", Net, _adam_mini, "adam_mini"),
    "came_pytorch.CAME": ("came", Net, _came, "came_pytorch"),
    "pytorch_optimizer.SOAP": ("soap", Net, _soap, "pytorch_optimizer"),
}


def trained(name: str, steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    _kind, make_model, make_opt = FAMILIES[name]
    torch.manual_seed(0)
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes on CPU, torch's sparse tensor notice
        opt = make_opt(model.parameters())
        if name == "LBFGS":
            lbfgs_train(model, opt, steps)
        else:
            train(model, opt, steps=steps)
    return model, opt


def save(path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "global_step": 3}, path)
