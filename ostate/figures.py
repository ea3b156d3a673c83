"""Figures of checkpoints: read and summarise them, then draw (``ostate plot``).

:mod:`ostate.plots` draws from analysis results and never reads a checkpoint; this
module is the step before it. It takes what a user has at hand (paths, checkpoints from
:func:`ostate.load`, optimizers, or analyses made earlier), loads and summarises each
input once into a :class:`~ostate.plots.Series` (labelled by its path, shortened to the
part that tells the paths apart), or for the ``compare`` kind computes the
:class:`~ostate.compare.compute.Comparison` of the checkpoints, and hands that to the
kind's drawing.

Example:
    >>> import ostate, torch, tempfile, os
    >>> m = torch.nn.Linear(4, 2); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    >>> m(torch.randn(8, 4)).sum().backward(); opt.step()
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, path)
    >>> [ax.get_title() for ax in plot("lr-histogram", path).axes]
    ['whole model', 'weight parameters', 'bias parameters']
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import pandas as pd
from matplotlib.figure import Figure

from ostate.analysis import Analysis, OptimizerAnalysis, summarize
from ostate.compare.compute import Comparison, compare
from ostate.distributed import RayExecutor, summarize_on_ray
from ostate.errors import OstateError
from ostate.loading import IN_MEMORY, load, pick_optimizer
from ostate.monitor.writers import is_log, read_log
from ostate.plots import layer_profile, lr_histogram, moments
from ostate.plots import plot as draw
from ostate.plots.kind import COMPARISON, TIMELINE, check_plot_view
from ostate.plots.registry import get_kind
from ostate.plots.series import Series, analysed, as_list, require_moments
from ostate.plots.timeline import Timeline
from ostate.state import Checkpoint, OptimizerState

FigureInput = Union[str, os.PathLike, Checkpoint, OptimizerState, Analysis, OptimizerAnalysis, Series]
# The view a timeline of checkpoints shows when none is asked for.
TIMELINE_VIEW = "kind"


def plot(
    kind: str,
    inputs: FigureInput | Sequence[FigureInput] | Comparison,
    *,
    by: str | None = None,
    labels: Sequence[str] | None = None,
    optimizer_index: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    trust_pickle: bool = False,
    format_hint: str | None = None,
    optimizer: str | None = None,
    executor: RayExecutor | None = None,
) -> Figure:
    """The figure of plot kind ``kind`` (see :func:`ostate.plots.plot_kinds`) for one or more checkpoints.

    ``by`` splits the figure (each kind's default when ``None``; for ``compare``, how the
    checkpoints are paired); ``workers`` and ``progress`` go to
    :func:`ostate.analysis.summarize`; ``trust_pickle``, ``format_hint`` and ``optimizer``
    to :func:`ostate.load` for path inputs; ``executor`` analyses checkpoints on Ray
    (:mod:`ostate.distributed`), with the same figure. The ``compare`` kind takes the paths of the
    checkpoints, oldest first (or a computed comparison).
    """
    chosen = get_kind(kind)
    if chosen.takes == TIMELINE:
        if by is not None:
            check_plot_view(chosen, by)  # before any reading: a wrong option fails at once
        return chosen.draw(
            timeline_of(
                inputs,  # type: ignore[arg-type]
                by=by,
                optimizer_index=optimizer_index,
                workers=workers,
                progress=progress,
                trust_pickle=trust_pickle,
                format_hint=format_hint,
                optimizer=optimizer,
            ),
            by=by,
        )
    view = check_plot_view(chosen, by)  # before any reading: a wrong option fails at once
    if chosen.takes == COMPARISON:
        if not isinstance(inputs, Comparison):
            inputs = _compared(
                inputs,
                against=view,
                optimizer_index=optimizer_index,
                workers=workers,
                progress=progress,
                trust_pickle=trust_pickle,
                format_hint=format_hint,
                executor=executor,
            )
        return draw(kind, inputs, by=by)
    if isinstance(inputs, Comparison):
        raise OstateError(
            f"the {kind} plot draws checkpoints or analyses, not a comparison",
            hint="a comparison is drawn by the compare kind",
        )
    series = as_series(
        inputs,
        labels=labels,
        optimizer_index=optimizer_index,
        joint=chosen.joint,
        workers=workers,
        progress=progress,
        trust_pickle=trust_pickle,
        format_hint=format_hint,
        optimizer=optimizer,
        executor=executor,
    )
    return chosen.draw(series, by=view)


def plot_lr_histogram(
    inputs: FigureInput | Sequence[FigureInput],
    *,
    by: str = "kind",
    labels: Sequence[str] | None = None,
    optimizer_index: int | None = None,
    per_decade: int | None = None,
    title: str | None = None,
) -> Figure:
    """:func:`ostate.plots.plot_lr_histogram` of paths, checkpoints, optimizers or analyses."""
    series = as_series(inputs, labels=labels, optimizer_index=optimizer_index)
    return lr_histogram.draw(series, by=by, per_decade=per_decade, title=title)


def plot_layer_profile(
    inputs: FigureInput | Sequence[FigureInput],
    *,
    by: str = "kind",
    labels: Sequence[str] | None = None,
    optimizer_index: int | None = None,
    title: str | None = None,
) -> Figure:
    """:func:`ostate.plots.plot_layer_profile` of paths, checkpoints, optimizers or analyses."""
    series = as_series(inputs, labels=labels, optimizer_index=optimizer_index)
    return layer_profile.draw(series, by=by, title=title)


def plot_moments(
    inputs: FigureInput | Sequence[FigureInput],
    *,
    by: str = "group",
    labels: Sequence[str] | None = None,
    optimizer_index: int | None = None,
    title: str | None = None,
) -> Figure:
    """:func:`ostate.plots.plot_moments` of paths, checkpoints, optimizers or analyses
    (those read here are summarised with the joint histogram of the moments)."""
    series = as_series(inputs, labels=labels, optimizer_index=optimizer_index, joint=True)
    return moments.draw(series, by=by, title=title)


def timeline_of(
    inputs: FigureInput | Timeline | Sequence[FigureInput],
    *,
    by: str | None = None,
    optimizer_index: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    trust_pickle: bool = False,
    format_hint: str | None = None,
    optimizer: str | None = None,
) -> Timeline:
    """The rows of view ``by`` over steps, from a monitor log or from several checkpoints.

    ``inputs`` is a :class:`~ostate.plots.timeline.Timeline`, the path of a monitor log
    (``ostate_monitor.csv`` or the folder holding it: its view unless ``by`` names another
    it holds), or checkpoints (paths or loaded), each analysed once at view ``by``
    (default ``kind``) and placed at its step: the checkpoint's ``global_step`` when it
    records one, else the largest step count in its state.
    """
    if isinstance(inputs, Timeline):
        return inputs
    items = as_list(inputs)
    if len(items) == 1 and isinstance(items[0], (str, os.PathLike)) and is_log(items[0]):
        return _logged_timeline(os.fspath(items[0]), by)
    view = by or TIMELINE_VIEW
    tables: list[tuple[float, pd.DataFrame, str | None]] = []
    for item in items:
        where = _path_of(item)
        if isinstance(item, (str, os.PathLike)):
            item = load(item, trust_pickle=trust_pickle, optimizer=optimizer, format_hint=format_hint)
        if not isinstance(item, Checkpoint):
            raise OstateError(
                f"a timeline of checkpoints takes their paths or ostate.load results, not a {type(item).__name__}",
                hint="or pass the monitor's log (ostate_monitor.csv)",
            )
        chosen = pick_optimizer(item, optimizer_index)
        table = summarize(chosen, weights=item.weights, workers=workers, progress=progress).table(view)
        step = item.metadata.get("global_step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            steps = table["step_max"].dropna() if "step_max" in table else []
            step = float(max(steps)) if len(steps) else float(len(tables))
        tables.append((step, table, where))
    tables.sort(key=lambda t: t[0])
    source = ", ".join(w for _, _, w in tables if w) if len(tables) <= 3 else f"{len(tables)} checkpoints"
    return Timeline.of_tables([(step, table) for step, table, _ in tables], view, source)


def _logged_timeline(path: str, by: str | None) -> Timeline:
    frame = read_log(path)
    views = list(dict.fromkeys(frame["view"]))
    view = by if by is not None else views[-1]
    if view not in views:
        raise OstateError(
            f"the monitor log holds the {', '.join(views)} view{'s' if len(views) > 1 else ''}, not {view}",
            where=path,
            hint=f"pass --by {views[-1]}",
        )
    frame = frame[frame["view"] == view].drop(columns="view")
    if frame["optimizer"].nunique() > 1:  # several optimizers: their rows apart
        frame = frame.assign(key=frame["optimizer"] + ":" + frame["key"])
    return Timeline(frame.reset_index(drop=True), view, path)


def as_series(
    inputs: FigureInput | Sequence[FigureInput],
    *,
    labels: Sequence[str] | None = None,
    optimizer_index: int | None = None,
    joint: bool = False,
    workers: int | None = None,
    progress: bool = False,
    trust_pickle: bool = False,
    format_hint: str | None = None,
    optimizer: str | None = None,
    executor: RayExecutor | None = None,
) -> list[Series]:
    """One :class:`~ostate.plots.Series` per input, each loaded and summarised once.

    Args:
        inputs: a path, a :class:`~ostate.Checkpoint`, an :class:`~ostate.OptimizerState`,
            an :class:`~ostate.analysis.Analysis` (from ``summarize``), or a list of them.
        labels: legend labels, one per input (default: the paths, shortened; "checkpoint N"
            for inputs without a path).
        optimizer_index: which optimizer of an input that holds several.
        joint: summarise with the joint histogram of the moments (the moments plot
            needs it); an analysis made without it is refused then.
        workers, progress: as for :func:`ostate.analysis.summarize`.
        trust_pickle, format_hint, optimizer: as for :func:`ostate.load`, for path inputs.
        executor: analyse checkpoints on Ray (:func:`ostate.distributed.summarize_on_ray`).
    """
    items = as_list(inputs)
    if labels is not None and len(labels) != len(items):
        raise OstateError(f"{len(labels)} labels for {len(items)} inputs", hint="give one label per input")
    paths = [_path_of(item) for item in items]
    named = short_labels([p for p in paths if p is not None])
    default_labels, position = [], 0
    for i, (item, path) in enumerate(zip(items, paths)):
        if isinstance(item, Series):
            default_labels.append(item.label)
        elif path is None:
            default_labels.append(f"checkpoint {i + 1}" if len(items) > 1 else "")
        else:
            default_labels.append(named[position])
            position += 1
    out = []
    for item, path, label in zip(items, paths, labels if labels is not None else default_labels):
        analysis = _analysed(
            item,
            where=path,
            optimizer_index=optimizer_index,
            joint=joint,
            workers=workers,
            progress=progress,
            trust_pickle=trust_pickle,
            format_hint=format_hint,
            optimizer=optimizer,
            executor=executor,
        )
        out.append(Series(label, analysis))
    return out


def _path_of(item: FigureInput) -> str | None:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, Checkpoint):
        return item.path if item.path != IN_MEMORY else None
    return None


def _analysed(
    item: FigureInput,
    *,
    where: str | None,
    optimizer_index: int | None,
    joint: bool,
    workers: int | None,
    progress: bool,
    trust_pickle: bool,
    format_hint: str | None,
    optimizer: str | None,
    executor: RayExecutor | None = None,
) -> OptimizerAnalysis:
    if isinstance(item, (str, os.PathLike)):
        item = load(item, trust_pickle=trust_pickle, optimizer=optimizer, format_hint=format_hint)
    if isinstance(item, Checkpoint):
        picked = pick_optimizer(item, optimizer_index)
        if executor is not None:
            if joint:
                require_moments(picked.kind, where)
            position = next(i for i, o in enumerate(item.optimizers) if o is picked)
            # Plots use no weight statistics and no optional statistics (as below).
            item = summarize_on_ray(
                item, executor, optimizers=[position], use_weights=False, joint=joint, statistics=()
            ).optimizers[0]
        else:
            item = picked
    if isinstance(item, OptimizerState):
        if joint:  # before the work of summarising: say at once that there is nothing to draw
            require_moments(item.kind, where)
        # Plots use no weight statistics (the model's tensors are not read) and no optional statistics.
        item = summarize(item, weights={}, joint=joint, workers=workers, progress=progress, statistics=()).optimizers[0]
    if not isinstance(item, (Series, Analysis, OptimizerAnalysis)):
        raise OstateError(
            f"cannot plot a {type(item).__name__}",
            hint="give a path, a checkpoint from ostate.load, an optimizer, or an analysis from summarize",
        )
    return analysed(item, optimizer_index=optimizer_index, joint=joint, where=where)


def _compared(
    inputs,
    *,
    against: str,
    optimizer_index: int | None,
    workers: int | None,
    progress: bool,
    trust_pickle: bool,
    format_hint: str | None,
    executor: RayExecutor | None = None,
) -> Comparison:
    """``ostate plot --kind compare``: compare the checkpoints at the given paths, oldest first."""
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise OstateError(
            "the compare plot reads checkpoints from their paths",
            hint="pass paths, or a comparison from ostate.compare.compute.compare(...)",
        )
    return compare(
        *paths,
        against=against,
        optimizer_index=optimizer_index,
        trust_pickle=trust_pickle,
        format_hint=format_hint,
        workers=workers,
        progress=progress,
        executor=executor,
    )


def short_labels(paths: Sequence[str]) -> list[str]:
    """The paths without the leading and trailing components they all share.

    One path keeps its last component. Paths that are the same get a number.

    Example:
        >>> short_labels(["runs/a/checkpoint-500", "runs/a/checkpoint-1000"])
        ['checkpoint-500', 'checkpoint-1000']
        >>> short_labels(["out/checkpoint-500/optimizer.pt", "out/checkpoint-1000/optimizer.pt"])
        ['checkpoint-500', 'checkpoint-1000']
        >>> short_labels(["/data/ckpt.pt"]), short_labels(["a.pt", "a.pt"])
        (['ckpt.pt'], ['a.pt', 'a.pt (2)'])
    """
    parts = [[p for p in os.path.normpath(path).split(os.sep) if p] or [path] for path in paths]
    if len(parts) <= 1:
        return [p[-1] for p in parts]
    shortest = min(len(p) for p in parts)
    prefix = 0
    while prefix < shortest - 1 and len({p[prefix] for p in parts}) == 1:
        prefix += 1
    suffix = 0
    while suffix < shortest - prefix - 1 and len({p[-1 - suffix] for p in parts}) == 1:
        suffix += 1
    labels = ["/".join(p[prefix : len(p) - suffix]) for p in parts]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out
