"""Tables as text, Markdown, CSV and JSON: the renderings every tool's output shares.

``ostate inspect`` (:mod:`ostate.report`), ``ostate compare`` (:mod:`ostate.compare.output`),
``ostate doctor`` (:mod:`ostate.doctor.output`) and the ablation summary
(:mod:`ostate.harness.text`) build their own lines; the cells, the tables and the choice
of format are made here, the same way for all of them:

- :func:`format_value`, :func:`format_shape`, :func:`format_bytes`: one value as text;
- :func:`for_text`: a frame as the text renderings and CSV show it (shapes as ``AxB``);
- :func:`cells`: a frame's columns as rows of text cells;
- :func:`text_table`, :func:`markdown_table`: text cells as aligned columns or a Markdown table;
- :func:`jsonable`, :func:`json_text`, :func:`csv_text`: JSON-ready data and the JSON and CSV texts;
- :func:`render`: the one dispatch from ``--format`` to a tool's renderer.

This module is below every tool: it imports nothing of ostate but :mod:`ostate.errors`.
"""

from __future__ import annotations

import json as jsonlib
import math
from typing import AbstractSet, Any, Callable, Sequence

import pandas as pd

from ostate.errors import OstateError

# Every output format, in the order --help and errors list them; a tool offers those it has renderers for.
FORMATS = ("table", "csv", "json", "markdown")


def render(
    fmt: str,
    *,
    table: Callable[[], str] | None = None,
    csv: Callable[[], pd.DataFrame] | None = None,
    json: Callable[[], Any] | None = None,
    markdown: Callable[[], str] | None = None,
) -> str:
    """The output in format ``fmt``, made by the tool's renderer for it.

    ``table`` and ``markdown`` make the text; ``csv`` the frame written with every column
    (:func:`csv_text`); ``json`` JSON-ready data (:func:`json_text`). Only the formats given
    a renderer are offered: any other is refused, naming those (in :data:`FORMATS` order).
    Only the chosen renderer runs.

    Example:
        >>> frame = pd.DataFrame({"name": ["a"], "shape": [(2, 3)], "n": [1.5]})
        >>> print(render("csv", csv=lambda: frame, json=lambda: {"n": 1.5}), end="")
        name,shape,n
        a,2x3,1.5
        >>> render("json", json=lambda: {"n": 1.5})
        '{\\n  "n": 1.5\\n}\\n'
        >>> render("markdown", json=lambda: {})
        Traceback (most recent call last):
        ...
        ostate.errors.OstateError: unknown format 'markdown' (choose one of: json)
    """
    renderers = {"table": table, "csv": csv, "json": json, "markdown": markdown}
    offered = [f for f in FORMATS if renderers[f] is not None]
    if fmt not in offered:
        raise OstateError(f"unknown format '{fmt}'", hint=f"choose one of: {', '.join(offered)}")
    renderer = renderers[fmt]
    assert renderer is not None  # offered formats have one
    made = renderer()
    if fmt == "json":
        return json_text(made)
    if fmt == "csv":
        return csv_text(made)
    return made


def json_text(data: Any) -> str:
    """JSON-ready data (see :func:`jsonable`) as indented JSON text with a final newline; NaN is refused.

    The text of ``json.dumps(data, indent=2, allow_nan=False)``. Indented JSON is encoded in
    Python, piece by piece: ``dumps`` keeps every piece (a key, a number, a separator) until
    it joins them, millions for a table of 50,000 rows, several times the text's own size.
    Here they are joined every :data:`_JOIN_EVERY` pieces as they come.

    Example:
        >>> data = {"a": [1, 2.5], "b": None}
        >>> json_text(data) == jsonlib.dumps(data, indent=2, allow_nan=False) + chr(10)
        True
    """
    parts: list[str] = []
    pending: list[str] = []
    for piece in jsonlib.JSONEncoder(indent=2, allow_nan=False).iterencode(data):
        pending.append(piece)
        if len(pending) >= _JOIN_EVERY:
            parts.append("".join(pending))
            pending.clear()
    parts.append("".join(pending))
    parts.append("\n")
    return "".join(parts)


# Pieces of encoded JSON joined at once by json_text: a few MB of text.
_JOIN_EVERY = 1 << 16


def csv_text(table: pd.DataFrame) -> str:
    """Every column of ``table`` as CSV (shapes as ``AxB``, see :func:`for_text`), without the index."""
    return for_text(table).to_csv(index=False)


def jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data: NaN and infinities become null, tensors and numpy scalars
    Python numbers, anything else unknown its ``repr``.

    Example:
        >>> jsonable({"a": float("nan"), 1: (2, 3.5)})
        {'a': None, '1': [2, 3.5]}
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if hasattr(value, "item") and callable(value.item):
        try:
            return jsonable(value.item())
        except (ValueError, RuntimeError):
            return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def for_text(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` as text and CSV show it: a ``shape`` column as ``AxB`` (``scalar``, ``?``)."""
    table = table.copy()
    if "shape" in table.columns:
        table["shape"] = [format_shape(s) for s in table["shape"]]
    return table


def cells(table: pd.DataFrame, columns: Sequence[str]) -> list[list[str]]:
    """The ``columns`` of ``table`` as rows of text cells (:func:`for_text`, then :func:`format_value`).

    Example:
        >>> cells(pd.DataFrame({"shape": [(4, 2), ()], "x": [0.5, float("nan")]}), ["shape", "x"])
        [['4x2', '0.5'], ['scalar', '-']]
    """
    shown = for_text(table)
    return [[format_value(v) for v in record] for record in shown[list(columns)].itertuples(index=False, name=None)]


def format_shape(shape: Any) -> str:
    if shape is None or (isinstance(shape, float) and math.isnan(shape)):
        return "?"
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def format_value(value: Any) -> str:
    """One value as a table cell: ``-`` for none or NaN, 4 significant digits, whole floats as integers.

    Example:
        >>> [format_value(v) for v in (None, True, 3.0, 0.000123456, float("nan"), (1, 2.5))]
        ['-', 'yes', '3', '0.0001235', '-', '(1, 2.5)']
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4g}"
    if hasattr(value, "item") and callable(value.item):
        return format_value(value.item())
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(format_value(v) for v in value) + ")"
    return str(value)


def format_bytes(n: float) -> str:
    """A size in bytes, binary units: ``512 B``, ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def text_table(head: list[str], rows: list[list[str]], *, left: AbstractSet[str] = frozenset()) -> str:
    """Aligned plain-text columns: the ``left`` ones left-aligned, the others right-aligned.

    Example:
        >>> print(text_table(["name", "n"], [["a", "10"], ["bb", "2"]], left={"name"}))
        name   n
        ----  --
        a     10
        bb     2
    """
    if not rows:
        return "(no rows)"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    text_cols = {i for i, h in enumerate(head) if h in left}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in text_cols else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown (GitHub) table of text cells, ``|`` escaped.

    Example:
        >>> print(markdown_table(["name", "n"], [["a|b", "1"]]))
        | name | n |
        |---|---|
        | a\\|b | 1 |
    """
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)
