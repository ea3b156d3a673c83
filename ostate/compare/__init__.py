"""``ostate compare``: how the optimizer state moved between checkpoints, parameter by parameter.

- :mod:`~ostate.compare.compute`: the comparison itself (:func:`compare`), streamed pair by pair;
- :mod:`~ostate.compare.output`: its tables as text, CSV, JSON or Markdown.
"""

from ostate.compare.compute import AGAINST, MOVER_METRIC, Comparison, PairComparison, ParamComparison, compare

__all__ = ["AGAINST", "MOVER_METRIC", "Comparison", "PairComparison", "ParamComparison", "compare"]
