"""``ostate reset``: the strategies for a saved optimizer state, and checkpoints written with one applied.

- :mod:`~ostate.reset.strategies`: what to keep or reset (``reload``, ``fresh``, ``reset-m``,
  ``keep-v``, ...), as pure transforms of a state dict; the fine-tuning harness applies the same;
- :mod:`~ostate.reset.write`: :func:`reset` writes a checkpoint again with a strategy applied,
  in the format it came in.
"""

from ostate.reset.strategies import STRATEGIES, Strategy, apply_strategy, attach
from ostate.reset.write import reset

__all__ = ["STRATEGIES", "Strategy", "apply_strategy", "attach", "reset"]
