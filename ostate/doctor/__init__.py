"""``ostate doctor``: what is wrong, or worth knowing, about a checkpoint's optimizer state.

- :mod:`~ostate.doctor.checks`: the checks, each a function from the checkpoint to findings,
  and :func:`diagnose` that runs them;
- :mod:`~ostate.doctor.output`: the findings as text, JSON or Markdown.
"""

from ostate.doctor.checks import CODES, FAIL_ON, Diagnosis, Finding, diagnose, exit_code

__all__ = ["CODES", "FAIL_ON", "Diagnosis", "Finding", "diagnose", "exit_code"]
