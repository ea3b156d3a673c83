"""Train a source model the way training scripts usually do, and return its checkpoint.

AdamW with Hugging Face's decay / no-decay split (biases and normalisation weights
without weight decay), linear warmup then cosine decay to a tenth of the peak, and a
checkpoint dict ``{'model', 'optimizer', 'lr_scheduler', 'global_step'}``. The
built-in tasks make their source checkpoints with it; it is plain enough to use for
one's own.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ostate.harness.device import to_device
from ostate.harness.progress import Progress


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two named param groups: weights with ``weight_decay``, biases and norm weights without.

    Example:
        >>> [len(g["params"]) for g in decay_groups(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), 0.1)]
        [1, 3]
    """
    norms = {
        f"{m}.weight" if m else "weight"
        for m, mod in model.named_modules()
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d))
    }
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [(n, p) for n, p in named if n.endswith("bias") or n in norms]
    decay = [(n, p) for n, p in named if not (n.endswith("bias") or n in norms)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, *, warmup: int, steps: int, floor: float = 0.1) -> float:
    """The LR factor at 0-based ``step``: linear warmup over ``warmup`` steps, then cosine to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(
    model: nn.Module,
    batches: Iterable[Any],
    loss: Callable[[nn.Module, Any], torch.Tensor],
    *,
    steps: int,
    lr: float = 3e-3,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    clip: float | None = None,
    description: str = "pretraining",
    progress: bool | str = True,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train ``model`` for ``steps`` steps on ``batches`` and return the checkpoint dict
    (``clip``: the gradients' global norm is clipped to it, as LLM training does). The model
    trains on ``device`` (each batch moved there); the checkpoint's tensors are on the CPU.

    Example:
        >>> m = nn.Linear(3, 1)
        >>> data = iter(lambda: torch.randn(8, 3), None)
        >>> ckpt = pretrain(m, data, lambda m, x: m(x).square().mean(), steps=3, progress=False)
        >>> ckpt["global_step"], sorted(ckpt["optimizer"]["param_groups"][0]["param_names"])
        (3, ['weight'])
    """
    device = torch.device(device)
    model.to(device)
    optimizer = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas)
    warmup = max(1, steps // 10) if warmup is None else warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup=warmup, steps=steps))
    stream = iter(batches)
    model.train()
    with Progress(steps, description, enabled=progress, unit="step") as bar:
        for _ in range(steps):
            value = loss(model, to_device(next(stream), device))
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            schedule.step()
            bar.update(f"loss {value.item():.3f}")
    cpu = torch.device("cpu")
    return {
        "model": to_device(model.state_dict(), cpu),
        "optimizer": to_device(optimizer.state_dict(), cpu),
        "lr_scheduler": schedule.state_dict(),
        "global_step": steps,
        "final_train_loss": float(value.item()) if steps else float("nan"),
    }
