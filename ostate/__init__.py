"""ostate: what is in your optimizer state, and should you keep it when you fine-tune?

The public surface:

- :func:`load` reads a checkpoint file or directory (safely, lazily) into a :class:`Checkpoint`.
- :func:`convert` writes one optimizer's state as safetensors or a plain torch state dict.
- :func:`from_state_dict` wraps an in-memory optimizer state dict the same way.
- :func:`analyze` turns one into a table (per parameter, group, layer or model).
- :func:`describe` summarises one optimizer (kind, groups, steps, sizes).
- :func:`effective_lr` and :func:`next_update` apply an optimizer family's exact math.

The names are imported on first use (PEP 562), so ``import ostate`` and ``ostate --version``
do not pay for torch until something needs it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ostate.analysis import analyze, describe
    from ostate.convert import convert
    from ostate.errors import OstateError
    from ostate.loading import from_state_dict, load
    from ostate.monitor import Monitor
    from ostate.optimizers import effective_lr, next_update
    from ostate.state import Checkpoint, OptimizerState, ParamState, TensorRef

__version__ = "0.1.0"

# Each public name and the module that defines it.
_PUBLIC = {
    "Checkpoint": "ostate.state",
    "OptimizerState": "ostate.state",
    "Monitor": "ostate.monitor",
    "OstateError": "ostate.errors",
    "ParamState": "ostate.state",
    "TensorRef": "ostate.state",
    "analyze": "ostate.analysis",
    "convert": "ostate.convert",
    "describe": "ostate.analysis",
    "effective_lr": "ostate.optimizers",
    "from_state_dict": "ostate.loading",
    "load": "ostate.loading",
    "next_update": "ostate.optimizers",
}

__all__ = [
    "Checkpoint",
    "Monitor",
    "OptimizerState",
    "OstateError",
    "ParamState",
    "TensorRef",
    "analyze",
    "convert",
    "describe",
    "effective_lr",
    "from_state_dict",
    "load",
    "next_update",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ostate' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


class _Package(types.ModuleType):
    """Keeps each public name the function or class: importing the submodule ``ostate.convert``
    would otherwise bind the module over the function ``ostate.convert``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
