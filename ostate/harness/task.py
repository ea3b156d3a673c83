"""A fine-tuning task: the swappable parts a trial is made of, as plain callables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ostate.errors import OstateError
from ostate.harness.transfer import OptimizerFactory

Batches = Callable[[int, torch.Generator], Iterable[Any]]
Evaluate = Callable[[nn.Module], "float | Mapping[str, float]"]


@dataclass
class Task:
    """What a trial needs from the user.

    - ``model()``: a new fine-tuning model (the source weights are loaded into it by name);
    - ``train_batches(batch_size, generator)``: an iterable of training batches, drawn
      with ``generator`` (seeded per trial); it is iterated again when it ends (a
      ``DataLoader`` with ``generator=generator`` reshuffles each pass);
    - ``loss(model, batch)``: the training loss of one batch (a scalar tensor);
    - ``evaluate(model)``: the eval loss, a float, or a mapping with ``loss`` and any
      other metrics (recorded as ``eval_<name>``); called under ``torch.no_grad()``
      with the model in eval mode;
    - ``source``: the source checkpoint (weights and optimizer state: any file or
      folder ``ostate.load`` reads), or ``None`` with ``pretrain(path)`` that writes
      one (the harness caches it, keyed by ``fingerprint``); ``source_optimizer``
      chooses the optimizer of a source holding several (by index, as ``ostate inspect`` lists them);
    - ``optimizer(model, lr)``: the fine-tuning optimizer; by default one of the
      source's class with the source's param groups (new parameters in a group of
      their own), every group at the trial's peak lr;
    - ``defaults``: sweep values the command line uses unless told otherwise
      (``lr``, ``batch_size``, ``steps``, ...).

    Optional parts (every built-in task has them; a user's task may leave them out):

    - ``source_evaluate(model)``: the loss (or mapping with ``loss``) on held-out *source*
      data, called at every eval step beside ``evaluate`` and recorded as ``source_loss``
      (``source_<name>``): the forgetting side of the answer;
    - ``source_batches(batch_size, generator)``: source training batches, for
      ``TrialConfig.replay`` (a fraction of the steps trains on a source batch);
    - ``validate(model)``: a validation split, recorded as ``val_loss`` (``val_<name>``);
      ``ostate ablate --tune`` selects each strategy's learning rate on it and reports
      ``evaluate`` (then the test split) at the selected one.

    Trials run by one's own trainer (:mod:`ostate.harness.trainers`): ``trainer(config,
    callbacks)`` builds a Hugging Face ``Trainer`` (``trainer_kind="hf"``) or returns
    Lightning's ``(trainer, module, *fit_args)`` (``trainer_kind="lightning"``) with
    ``callbacks`` added; each trial resumes it from ``source``. ``model``,
    ``train_batches`` and ``loss`` are then the trainer's business: :func:`trainer_task`
    builds such a task.

    Functions must be importable (defined at module level) for the local process pool;
    Ray also accepts closures.
    """

    name: str
    model: Callable[[], nn.Module]
    train_batches: Batches
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Evaluate
    source: str | os.PathLike | None = None
    pretrain: Callable[[str], Any] | None = None
    optimizer: OptimizerFactory | None = None
    source_optimizer: int | None = None
    trainer: Callable[[Any, list[Any]], Any] | None = None
    trainer_kind: str = ""
    fingerprint: str = ""
    description: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    source_evaluate: Evaluate | None = None
    source_batches: Batches | None = None
    validate: Evaluate | None = None


def default_cache_dir() -> str:
    """``$OSTATE_CACHE_DIR``, else ``$XDG_CACHE_HOME/ostate``, else ``~/.cache/ostate``."""
    if os.environ.get("OSTATE_CACHE_DIR"):
        return os.environ["OSTATE_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ostate")


def resolve_source(task: Task, cache_dir: str | None = None) -> str:
    """The path of the task's source checkpoint, pretraining and caching it on first use.

    Example:
        >>> resolve_source(Task("t", model=nn.Identity, train_batches=None, loss=None, evaluate=None,
        ...                     source="model.pt"))
        'model.pt'
    """
    if task.source is not None:
        return os.fspath(task.source)
    if task.pretrain is None:
        raise OstateError(
            f"task '{task.name}' has neither a source checkpoint nor a pretrain function",
            hint="give Task(source=PATH) (TOML: source = 'path.pt')",
        )
    directory = os.path.join(cache_dir or default_cache_dir(), "sources")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{task.name}-{task.fingerprint or 'default'}.pt")
    if not os.path.exists(path):
        task.pretrain(path)
    return path


def trainer_task(
    name: str,
    trainer: Callable[[Any, list[Any]], Any],
    evaluate: Evaluate,
    source: str | os.PathLike,
    *,
    kind: str,
    source_optimizer: int | None = None,
    source_evaluate: Evaluate | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Task:
    """A task whose trials are run by one's own trainer (``kind``: ``hf`` or ``lightning``),
    resumed from the checkpoint ``source`` that trainer wrote; ``evaluate(model)`` (and
    ``source_evaluate``, the forgetting side) are called at the eval steps."""
    if kind not in ("hf", "lightning"):
        raise OstateError(f"unknown trainer kind '{kind}'", hint="hf (transformers.Trainer) or lightning")
    return Task(
        name=name,
        model=_trainers_part,
        train_batches=_trainers_part,
        loss=_trainers_part,
        evaluate=evaluate,
        source=source,
        source_optimizer=source_optimizer,
        trainer=trainer,
        trainer_kind=kind,
        source_evaluate=source_evaluate,
        defaults=dict(defaults or {}),
    )


def _trainers_part(*args: Any) -> Any:
    raise OstateError("in a trainer task the trainer builds the model, draws the batches and computes the loss")
