"""What a figure draws: one labelled series per checkpoint, each an analysed optimizer.

Every plot kind but ``compare`` takes a list of :class:`Series`. :func:`as_series` makes
them from analyses (:func:`ostate.analysis.summarize`) or series made earlier; reading and
summarising paths, checkpoints and optimizers is one layer up, in
:func:`ostate.figures.as_series`, so nothing here reads a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from ostate.analysis import Analysis, OptimizerAnalysis, ViewRow
from ostate.errors import OstateError
from ostate.optimizers import Family, families, get_family

PlotInput = Union[Analysis, OptimizerAnalysis, "Series"]


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
            >>> from ostate.analysis import summarize
            >>> m = torch.nn.Linear(2, 1); opt = torch.optim.AdamW(m.parameters())
            >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
            >>> as_series([summarize(ostate.from_state_dict(opt.state_dict()))], labels=["run"])[0].describe()
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
) -> list[Series]:
    """One :class:`Series` per analysed input.

    Args:
        inputs: an :class:`~ostate.analysis.Analysis` (from ``summarize``), one optimizer's
            :class:`~ostate.analysis.OptimizerAnalysis`, a :class:`Series`, or a list of them.
            (:func:`ostate.figures.as_series` also takes paths, checkpoints and optimizers.)
        labels: legend labels, one per input (default: a series keeps its label, the others
            are "checkpoint N", or no label for a single input).
        optimizer_index: which optimizer of an analysis that holds several.
        joint: the series are for the moments plot: each must have the joint histogram of
            the moments (``summarize(..., joint=True)``).
    """
    items = as_list(inputs)
    if labels is not None and len(labels) != len(items):
        raise OstateError(f"{len(labels)} labels for {len(items)} inputs", hint="give one label per input")
    if labels is None:
        labels = [
            item.label if isinstance(item, Series) else f"checkpoint {i + 1}" if len(items) > 1 else ""
            for i, item in enumerate(items)
        ]
    return [
        Series(label, analysed(item, optimizer_index=optimizer_index, joint=joint))
        for item, label in zip(items, labels)
    ]


def as_list(inputs) -> list:
    """``inputs`` as a list (one input, or a list or tuple of them); an error when there is none."""
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not items:
        raise OstateError("nothing to plot", hint="give at least one checkpoint")
    return items


def analysed(
    item: PlotInput, *, optimizer_index: int | None = None, joint: bool = False, where: str | None = None
) -> OptimizerAnalysis:
    """The optimizer analysis a figure draws for ``item`` (``where``: its path, for errors)."""
    if isinstance(item, Series):
        item = item.analysis
    elif isinstance(item, Analysis):
        item = _pick_analysed(item, optimizer_index)
    if not isinstance(item, OptimizerAnalysis):
        raise OstateError(
            f"cannot plot a {type(item).__name__}",
            hint="give an analysis from summarize; ostate.figures reads paths, checkpoints and optimizers",
        )
    if joint:
        require_moments(item.optimizer.kind, where)
        if not any(s.joints for s in item.summaries) and any(s.row["has_state"] for s in item.summaries):
            raise OstateError(
                "this analysis has no joint histogram of the moments",
                hint="summarize the checkpoint with summarize(..., joint=True), or pass the checkpoint itself",
            )
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
        hint=f"the moments plot is for {with_moments}; for this checkpoint use kind=lr-histogram or kind=layer-profile",
    )


def _pick_analysed(analysis: Analysis, index: int | None) -> OptimizerAnalysis:
    found = ", ".join(f"{i}: {o.optimizer.location}" for i, o in enumerate(analysis.optimizers))
    if index is None:
        if len(analysis.optimizers) == 1:
            return analysis.optimizers[0]
        raise OstateError(
            f"the analysis holds {len(analysis.optimizers)} optimizers",
            hint=f"choose one with optimizer_index=K ({found})",
        )
    if not 0 <= index < len(analysis.optimizers):
        raise OstateError(f"no optimizer with index {index}", hint=f"found {found}")
    return analysis.optimizers[index]
