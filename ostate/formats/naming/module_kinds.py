"""Parameter kinds from a live model's module types, where the model is at hand.

The name rule (:func:`ostate.analysis.params.param_kind`) guesses a parameter's kind from
its name; a model in hand says it outright: a parameter of a normalisation module
(``nn.LayerNorm``, ``nn.GroupNorm``, the batch and instance norms, ``nn.RMSNorm``, and
any module class whose name ends in ``Norm``, as transformers' ``LlamaRMSNorm``) is a
``norm``, one of an ``nn.Embedding`` an ``embedding``. Other parameters are left to the
name rule (``weight``, ``bias``, ``other``).
"""

from __future__ import annotations

from torch import nn

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def module_kinds(model: nn.Module) -> dict[str, str]:
    """``{parameter name: "norm" | "embedding"}`` for the parameters whose module says so.

    Example:
        >>> module_kinds(nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 2)))
        {'0.weight': 'embedding', '1.weight': 'norm', '1.bias': 'norm'}
    """
    kinds: dict[str, str] = {}
    for prefix, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        for name, _ in module.named_parameters(recurse=False):
            kinds[f"{prefix}.{name}" if prefix else name] = kind
    return kinds


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, _NORMS) or type(module).__name__.endswith("Norm"):
        return "norm"
    return None
