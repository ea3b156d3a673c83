"""Progress of long phases (pretraining a source, running trials): a bar for a person at a
terminal, plain lines for a log (nohup, CI), or nothing.

``mode`` is ``"bar"`` (or ``True``): a tqdm bar on stderr; ``"lines"``: a line such as
``code-to-prose trials: 3/18 (17%), 2m10s elapsed, ~10m50s left`` on stderr at the start,
then at most every ``interval`` seconds, and at the end; ``False`` (or ``"off"``):
nothing. The command line picks ``bar`` when stderr is a terminal and ``lines`` otherwise.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm

MODES = ("bar", "lines", "off")


def _mode(enabled: bool | str) -> str:
    if enabled is True:
        return "bar"
    if enabled is False:
        return "off"
    if enabled not in MODES:
        raise ValueError(f"progress must be one of {MODES}, True or False, not {enabled!r}")
    return str(enabled)


class Progress:
    """Counts ``total`` units of work; ``update(note)`` after each.

    Example:
        >>> with Progress(2, "demo", enabled="off") as p:
        ...     p.update(); p.update()
        >>> p.done
        2
    """

    def __init__(
        self, total: int, description: str, *, enabled: bool | str = True, unit: str = "trial", interval: float = 30.0
    ):
        self.total, self.description, self.unit, self.interval = total, description, unit, interval
        self.mode = _mode(enabled) if total else "off"
        self.done = 0
        self.started = time.monotonic()
        self._last = -float("inf")
        self._bar: Any = None
        if self.mode == "bar":
            self._bar = tqdm(total=total, desc=description, unit=unit, leave=False, delay=1.0)
        elif self.mode == "lines":
            self._line()

    def update(self, note: str = "") -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
        elif self.mode == "lines" and (self.done == self.total or time.monotonic() - self._last >= self.interval):
            self._line(note)

    def _line(self, note: str = "") -> None:
        self._last = time.monotonic()
        elapsed = self._last - self.started
        text = f"{self.description}: {self.done}/{self.total} {self.unit}s ({100 * self.done / self.total:.0f}%)"
        text += f", {_duration(elapsed)} elapsed"
        if 0 < self.done < self.total:
            text += f", ~{_duration(elapsed / self.done * (self.total - self.done))} left"
        if note:
            text += f" [{note}]"
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _duration(seconds: float) -> str:
    """``2m10s``-style durations.

    Example:
        >>> _duration(130.2), _duration(4.0), _duration(3725)
        ('2m10s', '4s', '1h02m')
    """
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
