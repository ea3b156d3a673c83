"""Statistics of optimizer state per parameter, param group, layer, parameter kind or whole model.

Every number comes from mergeable sketches and additive sums
(:mod:`ostate.analysis.sketch`): each parameter's are computed once, streaming its
tensors, and merged upward for the coarser views. :func:`summarize` does the pass
and returns an :class:`Analysis` whose views (tables, or rows with their merged
sketches for histograms and plots) cost no further reading; :func:`analyze` is the
one-call table.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Collection

if TYPE_CHECKING:
    import pandas as pd

    from ostate.analysis.columns import OPTIONAL_STATISTICS, STATS
    from ostate.analysis.engine import Analysis, OptimizerAnalysis, default_workers, summaries, summarize
    from ostate.analysis.heads import HeadLayout
    from ostate.analysis.params import ParamSummary
    from ostate.analysis.sketch import Sketch
    from ostate.analysis.summary import describe
    from ostate.analysis.views import VIEWS, ViewRow
    from ostate.state import Checkpoint, OptimizerState

# Each name and the module that defines it, imported on first use (PEP 562): importing
# ostate.analysis.native (``ostate --version``) must not pay for torch and pandas.
_PUBLIC = {
    "Analysis": "ostate.analysis.engine",
    "HeadLayout": "ostate.analysis.heads",
    "OPTIONAL_STATISTICS": "ostate.analysis.columns",
    "OptimizerAnalysis": "ostate.analysis.engine",
    "ParamSummary": "ostate.analysis.params",
    "STATS": "ostate.analysis.columns",
    "Sketch": "ostate.analysis.sketch",
    "VIEWS": "ostate.analysis.views",
    "ViewRow": "ostate.analysis.views",
    "default_workers": "ostate.analysis.engine",
    "describe": "ostate.analysis.summary",
    "summaries": "ostate.analysis.engine",
    "summarize": "ostate.analysis.engine",
}

__all__ = [
    "Analysis",
    "HeadLayout",
    "OPTIONAL_STATISTICS",
    "OptimizerAnalysis",
    "ParamSummary",
    "STATS",
    "Sketch",
    "VIEWS",
    "ViewRow",
    "analyze",
    "default_workers",
    "describe",
    "summaries",
    "summarize",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ostate.analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def analyze(
    target: Checkpoint | OptimizerState,
    by: str = "param",
    *,
    progress: bool = False,
    workers: int | None = None,
    heads: HeadLayout | None = None,
    statistics: Collection[str] | None = None,
) -> pd.DataFrame:
    """A table of optimizer-state statistics, one row per parameter, group, layer, kind or model.

    Args:
        target: a loaded checkpoint (all its optimizers, and its model's weights when
            it has them) or one optimizer.
        by: ``param``, ``group``, ``layer`` (module prefix of the name), ``kind``
            (embedding, weight, norm, bias, other) or ``model``.
        progress: show a progress bar on stderr for long work.
        workers: threads working on different parameters (default ``min(4, cores)``).
        heads: how to find attention heads (default: the checkpoint's model config).
        statistics: the optional statistic families besides the core (``compressibility``,
            ``q8``); ``None``, the default, computes every one (see :func:`summarize`).

    Columns are described in docs/columns.md; quantity columns are named
    ``{quantity}_{stat}`` with stat in mean, rms, min, max, p1, p5, p25, p50, p75, p95, p99.
    For several views of one checkpoint, call :func:`summarize` once and take its views.

    Example:
        >>> import ostate, torch
        >>> m = torch.nn.Linear(4, 2); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        >>> m(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> df = ostate.analyze(ostate.from_state_dict(opt.state_dict(), model=m))
        >>> list(df["name"]), bool((df["eff_lr_p50"] > 0).all())
        (['weight', 'bias'], True)
    """
    from ostate.analysis.engine import check_loaded, check_view, summarize  # on use: see _PUBLIC

    check_loaded(target, "ostate.analyze")
    check_view(by)
    return summarize(target, progress=progress, workers=workers, heads=heads, statistics=statistics).table(by)
