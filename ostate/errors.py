"""The one error type a user sees: what went wrong, where, and what to do about it."""

from __future__ import annotations


class OstateError(Exception):
    """A problem with the input that the user can act on.

    The command line prints it as one line and exits with code 2; the Python API
    raises it. ``where`` is usually a path (and a location inside the checkpoint),
    ``hint`` what to do next.

    Example:
        >>> str(OstateError("no optimizer state found", where="model.pt",
        ...                 hint="top-level keys: model, epoch"))
        'model.pt: no optimizer state found (top-level keys: model, epoch)'
    """

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None):
        # One line, whatever the message quotes (a library's multi-line error, a damaged file's bytes).
        self.what = _one_line(what)
        self.where = where if where is None else _one_line(where)
        self.hint = hint if hint is None else _one_line(hint)
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text} ({self.hint})" if self.hint else text


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
