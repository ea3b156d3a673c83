"""Figures of optimizer state, drawn from the analysis' sketches (never from the raw tensors).

A checkpoint is read and summarised once (:func:`ostate.analysis.summarize`); every
figure is then drawn from the merged sketches, so a huge checkpoint plots about as fast
as it inspects. The kinds (one module each, found by :mod:`ostate.plots.registry`):

- ``lr-histogram`` (:func:`plot_lr_histogram`): effective-learning-rate histograms;
- ``layer-profile`` (:func:`plot_layer_profile`): the effective learning rate layer by layer;
- ``moments`` (:func:`plot_moments`): |m̂| against √v̂ with reference lines (Adam family);
- ``compare`` (:func:`ostate.plots.compare.compare_figure`): how each parameter's state
  moved between checkpoints (``--by consecutive`` or ``first``, as ``ostate compare --against``).

Each function takes one or more paths, checkpoints, optimizers or analyses (several
are overlaid) and returns a :class:`matplotlib.figure.Figure` built without pyplot (no
display needed); :func:`save_figure` writes it as PNG, SVG or PDF, atomically. The
artists that carry numbers have a ``gid`` naming what they are and whose
(``"median|checkpoint-500"``, ``"histogram|checkpoint-500"``, ``"joint|checkpoint-500"``,
``"noise"``, ...), so a program can read the plotted values back from the Figure.

Example:
    >>> import ostate, torch, tempfile, os
    >>> m = torch.nn.Linear(4, 2); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    >>> m(torch.randn(8, 4)).sum().backward(); opt.step()
    >>> fig = plot("layer-profile", ostate.from_state_dict(opt.state_dict(), model=m))
    >>> path = save_figure(fig, os.path.join(tempfile.mkdtemp(), "profile.svg"))
    >>> os.path.getsize(path) > 0
    True
"""

from __future__ import annotations

from typing import Sequence

from matplotlib.figure import Figure

from ostate.plots.layer_profile import plot_layer_profile
from ostate.plots.lr_histogram import plot_lr_histogram
from ostate.plots.moments import plot_moments
from ostate.plots.registry import PlotKind, check_view, get_kind, plot_kinds
from ostate.plots.series import PlotInput, Series, as_series
from ostate.plots.style import save_figure

__all__ = [
    "PlotKind", "Series", "as_series", "get_kind", "plot", "plot_kinds", "plot_layer_profile", "plot_lr_histogram",
    "plot_moments", "save_figure",
]


def plot(
    kind: str,
    inputs: PlotInput | Sequence[PlotInput],
    *,
    by: str | None = None,
    labels: Sequence[str] | None = None,
    optimizer_index: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    trust_pickle: bool = False,
    format_hint: str | None = None,
    optimizer: str | None = None,
) -> Figure:
    """The figure of plot kind ``kind`` (see :func:`plot_kinds`) for one or more checkpoints.

    ``by`` splits the figure (each kind's default when ``None``); ``workers`` and
    ``progress`` go to :func:`ostate.analysis.summarize`; ``trust_pickle``,
    ``format_hint`` and ``optimizer`` to :func:`ostate.load` for path inputs.
    """
    chosen = get_kind(kind)
    by = check_view(chosen, by)  # before any reading: a wrong option fails at once
    if chosen.from_inputs is not None:
        return chosen.from_inputs(inputs, by=by, optimizer_index=optimizer_index, workers=workers, progress=progress,
                                  trust_pickle=trust_pickle, format_hint=format_hint, optimizer=optimizer)
    series = as_series(inputs, labels=labels, optimizer_index=optimizer_index, joint=chosen.joint, workers=workers,
                       progress=progress, trust_pickle=trust_pickle, format_hint=format_hint, optimizer=optimizer)
    assert chosen.draw is not None  # a kind gives draw unless it gives from_inputs
    return chosen.draw(series, by=by)
