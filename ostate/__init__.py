"""ostate: what is in your optimizer state, and should you keep it when you fine-tune?

The public surface:

- :func:`load` reads a checkpoint file or directory (safely, lazily) into a :class:`Checkpoint`.
- :func:`convert` writes one optimizer's state as safetensors or a plain torch state dict.
- :func:`from_state_dict` wraps an in-memory optimizer state dict the same way.
- :func:`analyze` turns one into a table (per parameter, group, layer or model).
- :func:`describe` summarises one optimizer (kind, groups, steps, sizes).
- :func:`effective_lr` and :func:`next_update` apply an optimizer family's exact math.
- :class:`Monitor` summarises a live optimizer's state every N steps while it trains.
"""

from ostate.analysis import analyze, describe
from ostate.convert import convert
from ostate.errors import OstateError
from ostate.loading import from_state_dict, load
from ostate.monitor import Monitor
from ostate.optimizers import effective_lr, next_update
from ostate.state import Checkpoint, OptimizerState, ParamState, TensorRef

__version__ = "0.1.0"

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
