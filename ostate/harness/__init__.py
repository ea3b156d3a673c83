"""The fine-tuning harness: reload versus reset versus partial resets, measured with error bars.

A *trial* loads a source checkpoint (weights and optimizer state), applies a strategy
from :mod:`ostate.reset.strategies` to the optimizer state, fine-tunes for a number of
steps and records losses, update and gradient sizes and effective learning rates. An
*ablation* runs a grid of trials (strategies x seeds x lr x warmup x batch size) on a
local process pool or on Ray, keeps every trial in an SQLite results store, and
summarises each strategy with 95% confidence intervals and paired tests against
``reload``. See docs/harness.md.

The parts: :class:`Task` (the user's model, data, loss and evaluation),
:class:`Sweep`, :class:`Spec`, :func:`run`, :func:`builtin_task`, :func:`load_spec`.
"""

from ostate.harness.run import Results, Spec, Sweep, run
from ostate.harness.spec import load_spec
from ostate.harness.store import ResultsStore
from ostate.harness.summary import Summary, summarize_trials
from ostate.harness.task import Task, trainer_task
from ostate.harness.tasks import TASKS, builtin_task
from ostate.harness.trial import TrialConfig, TrialResult, run_trial

__all__ = [
    "Results",
    "ResultsStore",
    "Spec",
    "Summary",
    "Sweep",
    "TASKS",
    "Task",
    "TrialConfig",
    "TrialResult",
    "builtin_task",
    "load_spec",
    "run",
    "run_trial",
    "summarize_trials",
    "trainer_task",
]
