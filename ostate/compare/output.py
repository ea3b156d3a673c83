"""``ostate compare``'s output: each pair's summary, largest movers and per-parameter table,
as text (``table``), ``csv``, ``json`` or ``markdown`` (the renderers of :mod:`ostate.render`)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ostate.compare.compute import MOVER_METRIC, PRECOND_MOVER_METRIC, Comparison, PairComparison
from ostate.errors import OstateError
from ostate.render import cells, format_value, jsonable, markdown_table, text_table
from ostate.render import render as render_as

# The columns the text renderings show by default (csv and json have every column).
COLUMNS = (
    "name",
    "status",
    "shape",
    "step_delta",
    "m_cosine",
    "log10_v_ratio_p50",
    "log10_v_ratio_iqr",
    "eff_lr_relchange_p50",
    "unchanged_frac",
)
MOVER_COLUMNS = ("name", MOVER_METRIC, "eff_lr_relchange_p50", "m_cosine", "log10_v_ratio_p50", "unchanged_frac")
_LEFT = {"name", "status", "shape"}


def render(
    comparison: Comparison,
    fmt: str = "table",
    *,
    top: int = 10,
    columns: list[str] | None = None,
    sort: str | None = None,
    ascending: bool = False,
) -> str:
    """The comparison as text (``table``), ``csv``, ``json`` or ``markdown``.

    ``columns`` replaces the text renderings' columns (``["all"]``: every one); ``sort``
    orders the parameter rows by a column; ``top`` is the number of largest movers shown.

    Example:
        >>> import ostate, torch, copy
        >>> from ostate.compare.compute import compare_optimizers
        >>> m = torch.nn.Linear(3, 1); opt = torch.optim.AdamW(m.parameters())
        >>> m(torch.ones(2, 3)).sum().backward(); opt.step(); before = copy.deepcopy(opt.state_dict()); opt.step()
        >>> a, b = (ostate.from_state_dict(sd, model=m).optimizers[0] for sd in (before, opt.state_dict()))
        >>> text = render(Comparison(["a", "b"], "consecutive", [compare_optimizers(a, b, a_label="a", b_label="b")]))
        >>> text.splitlines()[:3]
        ["A: a ('(root)')", "B: b ('(root)')", 'optimizer: adamw']
    """
    return render_as(
        fmt,
        table=lambda: _text(comparison, top, columns, sort, ascending, markdown=False),
        csv=lambda: _sorted(comparison.table(), sort, ascending),
        json=lambda: to_json(comparison, top=top),
        markdown=lambda: _text(comparison, top, columns, sort, ascending, markdown=True),
    )


def to_json(comparison: Comparison, *, top: int = 10) -> dict[str, Any]:
    """The comparison as JSON-ready data (NaN becomes null)."""
    return jsonable(
        {
            "paths": comparison.paths,
            "against": comparison.against,
            "mover_metric": MOVER_METRIC,
            "pairs": [
                {
                    "a": pair.a,
                    "b": pair.b,
                    "optimizer_a": pair.optimizer_a,
                    "optimizer_b": pair.optimizer_b,
                    "kind_a": pair.kind_a,
                    "kind_b": pair.kind_b,
                    "warnings": pair.warnings,
                    "counts": _counts(pair),
                    "model": pair.model.row,
                    "movers": list(pair.movers(top)["name"]) if not pair.table().empty else [],
                    "params": pair.table().to_dict(orient="records"),
                }
                for pair in comparison.pairs
            ],
        }
    )


def _counts(pair: PairComparison) -> dict[str, int]:
    table = pair.table()
    return {} if table.empty else {str(k): int(v) for k, v in table["status"].value_counts().items()}


def _sorted(table: pd.DataFrame, sort: str | None, ascending: bool) -> pd.DataFrame:
    if sort is None or table.empty:
        return table
    if sort not in table.columns:
        raise OstateError(f"no column '{sort}' to sort by", hint=f"columns: {', '.join(map(str, table.columns))}")
    return table.sort_values(sort, ascending=ascending, na_position="last", kind="stable")


def _pair_header(pair: PairComparison) -> list[str]:
    model = pair.model.row
    kinds = pair.kind_a if pair.kind_a == pair.kind_b else f"{pair.kind_a} -> {pair.kind_b}"
    lines = [f"A: {pair.a} ('{pair.optimizer_a}')", f"B: {pair.b} ('{pair.optimizer_b}')", f"optimizer: {kinds}"]
    counts = ", ".join(f"{n} {status}" for status, n in _counts(pair).items())
    lines.append(f"parameters: {counts or 'none'}")
    if model.get("params"):
        lines.append(
            "whole model: m_cosine "
            + format_value(model.get("m_cosine"))
            + ", log10 v ratio median "
            + format_value(model.get("log10_v_ratio_p50"))
            + f" (p5 {format_value(model.get('log10_v_ratio_p5'))}, p95 {format_value(model.get('log10_v_ratio_p95'))})"
            + ", eff lr change median "
            + format_value(model.get("eff_lr_relchange_p50"))
            + ", unchanged "
            + format_value(model.get("unchanged_frac"))
            + (
                ", preconditioner change median " + format_value(model.get("precond_relchange_p50"))
                if pair.mover_metric() == PRECOND_MOVER_METRIC
                else ""
            )
        )
    lines += [f"warning: {w}" for w in pair.warnings]
    return lines


def _text(
    comparison: Comparison, top: int, columns: list[str] | None, sort: str | None, ascending: bool, *, markdown: bool
) -> str:
    out: list[str] = []
    for number, pair in enumerate(comparison.pairs):
        if number:
            out.append("")
        header = _pair_header(pair)
        if markdown:
            out.append(f"## {pair.a} -> {pair.b}")
            out.append("")
            out += [f"- {line}" for line in header]
        else:
            out += header
        table = pair.table()
        if table.empty:
            out += ["", "(no parameters)"]
            continue
        movers = pair.movers(top)
        if not movers.empty:
            out += [
                "",
                f"largest movers (by {pair.mover_metric()}):"
                if not markdown
                else f"### Largest movers (by {pair.mover_metric()})",
                "",
            ]
            head = [c for c in MOVER_COLUMNS if c in movers.columns]
            if pair.mover_metric() != MOVER_METRIC:  # ranked by the preconditioner: show its change
                head[1:1] = [c for c in (PRECOND_MOVER_METRIC, "precond_relchange_p50") if c in movers.columns]
            out.append(
                markdown_table(head, cells(movers, head))
                if markdown
                else text_table(head, cells(movers, head), left=_LEFT)
            )
        shown = _columns(table, columns)
        out += ["", "### Parameters" if markdown else "parameters:", ""]
        table = _sorted(table, sort, ascending)
        out.append(
            markdown_table(shown, cells(table, shown))
            if markdown
            else text_table(shown, cells(table, shown), left=_LEFT)
        )
    return "\n".join(out) + "\n"


def _columns(table: pd.DataFrame, requested: list[str] | None) -> list[str]:
    if requested == ["all"]:
        return list(table.columns)
    if requested:
        missing = [c for c in requested if c not in table.columns]
        if missing:
            raise OstateError(f"no column {', '.join(missing)}", hint=f"columns: {', '.join(map(str, table.columns))}")
        return requested
    return [c for c in COLUMNS if c in table.columns]
