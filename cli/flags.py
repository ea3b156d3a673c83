"""Library messages name Python parameters (``heads=N``); the command line shows its own flags (``--heads N``).

The library raises errors that a Python caller can act on, so they name the keyword
arguments of its functions. Before printing one, the CLI rewrites each parameter it has
a flag for; anything else (``weight_decay=0.01`` in a message about a param group) is
left as it is, and so is a keyword argument inside a call the message shows as Python
(``Task(optimizer=...)``, ``compare(a, b, against=...)``).
"""

from __future__ import annotations

import re

# Python keyword argument -> the flag that sets it, for every flag a library message mentions.
FLAGS = {
    "against": "--against",
    "base_config": "--base-config",
    "by": "--by",
    "fail_on": "--fail-on",
    "format_hint": "--format-hint",
    "head_dim": "--head-dim",
    "heads": "--heads",
    "kind": "--kind",
    "optimizer": "--optimizer",
    "optimizer_index": "--optimizer-index",
    "params": "--params",
    "workers": "--workers",
}
# Switches: ``name=True`` in a message is the bare flag.
SWITCHES = {"overwrite": "--overwrite", "trust_pickle": "--trust-pickle"}

_NAME = r"(?<![\w.-])(?<!\w\()(?<!, )({names})="
_VALUED = re.compile(_NAME.format(names="|".join(sorted(FLAGS, key=len, reverse=True))))
_SWITCH = re.compile(_NAME.format(names="|".join(sorted(SWITCHES, key=len, reverse=True))) + "True")


def as_flags(message: str) -> str:
    """``message`` with the Python parameters that have flags written as those flags.

    Example:
        >>> as_flags("pass heads=N or head_dim=D (weight_decay=0.01 stays)")
        'pass --heads N or --head-dim D (weight_decay=0.01 stays)'
        >>> as_flags("rerun with trust_pickle=True only if you trust it; drop params= or the ':REGEX'")
        "rerun with --trust-pickle only if you trust it; drop --params or the ':REGEX'"
        >>> as_flags("build it as Task(optimizer=...), or compare(a, b, against='first')")
        "build it as Task(optimizer=...), or compare(a, b, against='first')"
    """
    message = _SWITCH.sub(lambda m: SWITCHES[m.group(1)], message)
    return _VALUED.sub(lambda m: FLAGS[m.group(1)] + ("" if _ends(message, m.end()) else " "), message)


def _ends(message: str, at: int) -> bool:
    return at >= len(message) or message[at] in " ,;)"
