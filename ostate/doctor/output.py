"""``ostate doctor``'s output: its findings as text (``table``), ``json`` or ``markdown``."""

from __future__ import annotations

from typing import Any

from ostate.doctor.checks import Diagnosis, Evidence, Finding, exit_code
from ostate.render import jsonable
from ostate.render import render as render_as

FORMATS = ("table", "json", "markdown")
# Evidence lines shown per finding in text; JSON has all of them.
SHOWN = 10


def render(diagnosis: Diagnosis, fmt: str = "table", *, fail_on: str = "warning") -> str:
    """The diagnosis as text (``table``), ``json`` or ``markdown``.

    Example:
        >>> d = Diagnosis("ckpt.pt", "torch", [Finding("warning", "lr-zero", "a param group's learning rate is 0",
        ...     [Evidence("group 0", 10, None, "lr=0")], "Set a new schedule.", "optimizer")], {"parameters": 2})
        >>> print(render(d))  # doctest: +NORMALIZE_WHITESPACE
        checkpoint: ckpt.pt (torch)
        checked: 2 parameters
        <BLANKLINE>
        WARNING lr-zero: a param group's learning rate is 0
          optimizer at 'optimizer'; 10 coordinates
            group 0: 10 coordinates (lr=0)
          what to do: Set a new schedule.
        <BLANKLINE>
        1 warning; exit code 3 (--fail-on warning)
    """
    return render_as(
        fmt,
        table=lambda: _text(diagnosis, fail_on, markdown=False),
        json=lambda: to_json(diagnosis, fail_on=fail_on),
        markdown=lambda: _text(diagnosis, fail_on, markdown=True),
    )


def to_json(diagnosis: Diagnosis, *, fail_on: str = "warning") -> dict[str, Any]:
    """The diagnosis as JSON-ready data."""
    return jsonable(
        {
            "path": diagnosis.path,
            "format": diagnosis.format,
            "model": diagnosis.model_location,
            "checked": diagnosis.checked,
            "summary": {s: diagnosis.count(s) for s in ("error", "warning", "info")},
            "exit_code": exit_code(diagnosis, fail_on),
            "fail_on": fail_on,
            "findings": [
                {
                    "severity": f.severity,
                    "code": f.code,
                    "title": f.title,
                    "optimizer": f.optimizer,
                    "coordinates": f.coordinates,
                    "evidence": [
                        {"subject": e.subject, "coordinates": e.coordinates, "of": e.of, "detail": e.detail}
                        for e in f.evidence
                    ],
                    "advice": f.advice,
                }
                for f in diagnosis.findings
            ],
        }
    )


def _evidence_line(e: Evidence) -> str:
    amount = ""
    if e.coordinates is not None:
        amount = f"{e.coordinates:,} of {e.of:,} coordinates" if e.of else f"{e.coordinates:,} coordinates"
    text = ": ".join(part for part in (e.subject, amount) if part)
    return f"{text} ({e.detail})" if e.detail else text


def _where(f: Finding) -> str:
    parts = []
    if f.optimizer:
        parts.append(f"optimizer at '{f.optimizer}'")
    with_coordinates = [e for e in f.evidence if e.coordinates is not None]
    if len(f.evidence) > 1:
        parts.append(f"{len(f.evidence)} items")
    if with_coordinates:
        parts.append(f"{f.coordinates:,} coordinates")
    return "; ".join(parts)


def _summary(diagnosis: Diagnosis, fail_on: str) -> str:
    counts = [(diagnosis.count(s), s) for s in ("error", "warning", "info")]
    words = [f"{n} {s if n == 1 else s + 's'}" if s != "info" else f"{n} info" for n, s in counts if n]
    found = ", ".join(words) if words else "no findings"
    return f"{found}; exit code {exit_code(diagnosis, fail_on)} (--fail-on {fail_on})"


def _checked(checked: dict[str, int]) -> str:
    def plural(n: int, word: str) -> str:
        return f"{n:,} {word}" + ("" if n == 1 else "s")

    parts = []
    if "optimizers" in checked:
        parts.append(plural(checked["optimizers"], "optimizer"))
    if "parameters" in checked:
        with_state = checked.get("parameters_with_state")
        parts.append(
            plural(checked["parameters"], "parameter")
            + (f" ({with_state:,} with state)" if with_state is not None else "")
        )
    if "coordinates" in checked:
        parts.append(plural(checked["coordinates"], "coordinate"))
    return "checked: " + ", ".join(parts)


def _text(diagnosis: Diagnosis, fail_on: str, *, markdown: bool) -> str:
    checked = diagnosis.checked
    head = [f"checkpoint: {diagnosis.path} ({diagnosis.format})"]
    if diagnosis.model_location:
        head.append(f"model weights: {diagnosis.model_location}")
    if checked:
        head.append(_checked(checked))
    out = [f"- {line}" for line in head] if markdown else list(head)
    for f in diagnosis.findings:
        out.append("")
        shown = [_evidence_line(e) for e in f.evidence[:SHOWN]]
        if len(f.evidence) > SHOWN:
            shown.append(f"... and {len(f.evidence) - SHOWN} more (--format json lists them all)")
        if markdown:
            out.append(f"### {f.severity.upper()} `{f.code}`: {f.title}")
            out.append("")
            if _where(f):
                out.append(f"{_where(f)}")
                out.append("")
            out += [f"- {line}" for line in shown]
            out += ["", f"**What to do:** {f.advice}"]
        else:
            out.append(f"{f.severity.upper()} {f.code}: {f.title}")
            if _where(f):
                out.append(f"  {_where(f)}")
            out += [f"    {line}" for line in shown]
            out.append(f"  what to do: {f.advice}")
    out += ["", _summary(diagnosis, fail_on)]
    return "\n".join(out) + "\n"
