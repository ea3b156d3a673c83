"""What a figure draws: one labelled series per checkpoint, each an analysed optimizer.

Every plot kind takes a list of :class:`Series`. :func:`as_series` makes them from what
a user has at hand (paths, loaded checkpoints, optimizers, or analyses made earlier),
loading and summarising each input once; labels are the paths, shortened to the part
that tells them apart (``checkpoint-500`` and ``checkpoint-1000``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence, Union, cast

from ostate.analysis import Analysis, OptimizerAnalysis, ViewRow, summarize
from ostate.errors import OstateError
from ostate.loading import IN_MEMORY, load
from ostate.convert import pick_optimizer
from ostate.optimizers import Family, families, get_family
from ostate.state import Checkpoint, OptimizerState

PlotInput = Union[str, os.PathLike, Checkpoint, OptimizerState, Analysis, OptimizerAnalysis, "Series"]


@dataclass
class Series:
    """One checkpoint's analysed optimizer, and the label it has in a figure's legend and title."""

    label: str
    analysis: OptimizerAnalysis
    _rows: dict[str, list[ViewRow]] = field(default_factory=dict, repr=False, compare=False)

    def rows(self, by: str) -> list[ViewRow]:
        """The rows of view ``by`` with their merged sketches (built once per view)."""
        if by not in self._rows:
            self._rows[by] = self.analysis.rows(by)
        return self._rows[by]

    @property
    def family(self) -> Family:
        return get_family(self.analysis.optimizer.kind)

    @property
    def step(self) -> float | None:
        """The largest step count of its parameters (``None`` when the state keeps none)."""
        steps = [s.row["step"] for s in self.analysis.summaries if s.row["step"] is not None]
        return max(steps) if steps else None

    def describe(self) -> str:
        """``label (AdamW, step 300)``, for titles.

        Example:
            >>> import ostate, torch
            >>> m = torch.nn.Linear(2, 1); opt = torch.optim.AdamW(m.parameters())
            >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
            >>> as_series([ostate.from_state_dict(opt.state_dict())], labels=["run"])[0].describe()
            'run (AdamW, step 1)'
        """
        step = self.step
        where = f", step {step:g}" if step is not None else ""
        return f"{self.label} ({self.family.label}{where})" if self.label else f"{self.family.label}{where}"


def as_series(
    inputs: PlotInput | Sequence[PlotInput],
    *,
    labels: Sequence[str] | None = None,
    optimizer_index: int | None = None,
    joint: bool = False,
    workers: int | None = None,
    progress: bool = False,
    trust_pickle: bool = False,
    format_hint: str | None = None,
    optimizer: str | None = None,
) -> list[Series]:
    """One :class:`Series` per input, each loaded and summarised once.

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
    """
    # a str is a Sequence but one input: only a list or tuple is several
    items = cast("list[PlotInput]", list(inputs) if isinstance(inputs, (list, tuple)) else [inputs])
    if not items:
        raise OstateError("nothing to plot", hint="give at least one checkpoint")
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
        analysis = _analysed(item, where=path, optimizer_index=optimizer_index, joint=joint, workers=workers,
                             progress=progress, trust_pickle=trust_pickle, format_hint=format_hint,
                             optimizer=optimizer)
        out.append(Series(label, analysis))
    return out


def _path_of(item: PlotInput) -> str | None:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, Checkpoint):
        return item.path if item.path != IN_MEMORY else None
    return None


def _analysed(item: PlotInput, *, where: str | None, optimizer_index: int | None, joint: bool, workers: int | None,
              progress: bool, trust_pickle: bool, format_hint: str | None, optimizer: str | None) -> OptimizerAnalysis:
    if isinstance(item, Series):
        item = item.analysis
    if isinstance(item, (str, os.PathLike)):
        item = load(item, trust_pickle=trust_pickle, optimizer=optimizer, format_hint=format_hint)
    if isinstance(item, Checkpoint):
        item = pick_optimizer(item, optimizer_index)
    elif isinstance(item, Analysis):
        item = _pick_analysed(item, optimizer_index)
    if isinstance(item, OptimizerState):
        if joint:  # before the work of summarising: say at once that there is nothing to draw
            require_moments(item.kind, where)
        # Plots use no weight statistics: the model's tensors are not read.
        item = summarize(item, weights={}, joint=joint, workers=workers, progress=progress).optimizers[0]
    if not isinstance(item, OptimizerAnalysis):
        raise OstateError(f"cannot plot a {type(item).__name__}",
                          hint="give a path, a checkpoint from ostate.load, an optimizer, or an analysis from "
                               "summarize")
    if joint:
        require_moments(item.optimizer.kind, where)
        if not any(s.joints for s in item.summaries) and any(s.row["has_state"] for s in item.summaries):
            raise OstateError("this analysis has no joint histogram of the moments",
                              hint="summarize the checkpoint with summarize(..., joint=True), or pass the checkpoint "
                                   "itself")
    return item


def require_moments(kind: str, where: str | None = None) -> None:
    """A clear error when optimizer family ``kind`` keeps no moving averages of both g and g²."""
    family = get_family(kind)
    if family.moments is not None:
        return
    with_moments = ", ".join(f.label for f in families().values() if f.moments is not None)
    raise OstateError(
        f"{family.label} state has no pair of moving averages of the gradient and its square (m and v), "
        "so there is nothing to draw in a moments plot",
        where=where,
        hint=f"the moments plot is for {with_moments}; for this checkpoint use --kind lr-histogram or "
             "--kind layer-profile",
    )


def _pick_analysed(analysis: Analysis, index: int | None) -> OptimizerAnalysis:
    found = ", ".join(f"{i}: {o.optimizer.location}" for i, o in enumerate(analysis.optimizers))
    if index is None:
        if len(analysis.optimizers) == 1:
            return analysis.optimizers[0]
        raise OstateError(f"the analysis holds {len(analysis.optimizers)} optimizers",
                          hint=f"choose one with --optimizer-index K ({found})")
    if not 0 <= index < len(analysis.optimizers):
        raise OstateError(f"no optimizer with index {index}", hint=f"found {found}")
    return analysis.optimizers[index]


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
