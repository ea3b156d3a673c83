"""An ablation described in a TOML file (``ostate ablate SPEC.toml``).

.. code-block:: toml

    [task]                       # one's own task: module:function for each part
    name = "my-task"
    model = "mytask:make_model"
    train_batches = "mytask:train_batches"
    loss = "mytask:loss"
    evaluate = "mytask:evaluate"
    source = "source.pt"         # weights + optimizer state: any checkpoint ostate inspect reads
    source_optimizer = 0         # which optimizer, when the source holds several
    optimizer = "mytask:make_optimizer"   # optional
    source_evaluate = "mytask:evaluate_source"   # optional: held-out source data (forgetting)
    source_batches = "mytask:source_batches"     # optional: source data for replay
    validate = "mytask:validate"                 # optional: a validation split (for --tune)
    # or a built-in task:  builtin = "code-to-prose"   (pretrain_steps = 1500)

    [sweep]                      # every key optional
    strategies = ["fresh", "reload", "reset-v", "keep-v"]
    seeds = [0, 1, 2]
    lr = [1e-3]
    warmup = [0]
    batch_size = [32]
    steps = 200
    eval_every = 20
    schedule = "cosine"          # constant, wsd, continue
    grad_clip = 0                # max gradient norm (0: off); a list sweeps it
    beta2 = 0                    # the fine-tuning optimizer's beta2 (0: its own)
    replay = 0                   # fraction of steps on source data

    [run]                        # every key optional
    store = "ablation/results.sqlite"
    out = "ablation"
    executor = "local"           # or "ray" (address = "auto")
    workers = 2
    threads = 1
    target_loss = 1.5
    baseline = "reload"
    plot_format = "png"
    cache_dir = "~/.cache/ostate"
    device = "auto"              # where trials and a built-in task's pretraining train: cpu, cuda, cuda:N

Relative paths are relative to the TOML file, and its directory is put on
``sys.path`` so that a task module beside it imports.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Any, Callable

import tomllib

from ostate.errors import OstateError
from ostate.harness.device import AUTO
from ostate.harness.run import Spec, Sweep
from ostate.harness.task import Task
from ostate.harness.tasks import builtin_task

_TASK_CALLABLES = (
    "model",
    "train_batches",
    "loss",
    "evaluate",
    "optimizer",
    "pretrain",
    "source_evaluate",
    "source_batches",
    "validate",
)
_TASK_KEYS = {
    "name",
    "source",
    "source_optimizer",
    "fingerprint",
    "description",
    "builtin",
    "pretrain_steps",
    "new_head",
    *_TASK_CALLABLES,
}
_SWEEP_KEYS = {f.name for f in dataclasses.fields(Sweep)}
_RUN_KEYS = {f.name for f in dataclasses.fields(Spec)} - {"task", "sweep"}
_LISTS = ("strategies", "seeds", "lr", "warmup", "batch_size", "grad_clip", "beta2", "replay")


def load_spec(path: str | os.PathLike, *, device: str | None = None) -> Spec:
    """Read an ablation spec from a TOML file; ``device`` (given) replaces its ``[run] device``.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp(); p = os.path.join(d, "a.toml")
        >>> _ = open(p, "w").write('[task]\\nbuiltin = "sans-to-serif"\\n[sweep]\\nseeds = [0, 1]\\nlr = 3e-3\\n')
        >>> spec = load_spec(p)
        >>> spec.task.name, list(spec.sweep.seeds), list(spec.sweep.lr), spec.store == os.path.join(d, "ablation", "results.sqlite")
        ('sans-to-serif', [0, 1], [0.003], True)
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise OstateError("no such file", where=path) from None
    except tomllib.TOMLDecodeError as e:
        raise OstateError(f"not valid TOML: {e}", where=path) from None
    base = os.path.dirname(os.path.abspath(path))
    _check_keys(data, {"task", "sweep", "run"}, path, "top level")
    task_table = data.get("task")
    if not isinstance(task_table, dict):
        raise OstateError("the spec needs a [task] table", where=path)
    sweep_table, run_table = data.get("sweep", {}), data.get("run", {})
    _check_keys(task_table, _TASK_KEYS, path, "[task]")
    _check_keys(sweep_table, _SWEEP_KEYS, path, "[sweep]")
    _check_keys(run_table, _RUN_KEYS, path, "[run]")

    device = device or str(run_table.get("device", AUTO))
    task = _task(task_table, base, path, device)
    sweep_values = {k: (list(v) if isinstance(v, list) else [v]) if k in _LISTS else v for k, v in sweep_table.items()}
    sweep = Sweep(
        **{
            **{k: v for k, v in task.defaults.items() if k in _SWEEP_KEYS and k not in _LISTS},
            **{k: [v] for k, v in task.defaults.items() if k in _LISTS},
            **sweep_values,
        }
    )
    run_values = {**run_table, "device": device}
    for key in ("store", "out", "cache_dir"):
        if isinstance(run_values.get(key), str):
            run_values[key] = _relative(run_values[key], base)
    run_values.setdefault("store", os.path.join(base, "ablation", "results.sqlite"))
    run_values.setdefault("out", os.path.join(base, "ablation"))
    return Spec(task=task, sweep=sweep, **run_values)


def _task(table: dict[str, Any], base: str, path: str, device: str) -> Task:
    if "builtin" in table:
        extra = set(table) - {"builtin", "pretrain_steps", "source", "source_optimizer", "new_head"}
        if extra:
            raise OstateError(
                f"[task] with builtin takes only pretrain_steps, source, source_optimizer and new_head, "
                f"not {', '.join(sorted(extra))}",
                where=path,
            )
        task = builtin_task(
            table["builtin"],
            pretrain_steps=table.get("pretrain_steps"),
            new_head=bool(table.get("new_head", False)),
            device=device,
        )
        task.source_optimizer = table.get("source_optimizer")
        if "source" in table:
            task.source = _relative(table["source"], base)
        return task
    missing = [k for k in ("name", "model", "train_batches", "loss", "evaluate") if k not in table]
    if missing:
        raise OstateError(
            f"[task] lacks {', '.join(missing)}",
            where=path,
            hint="give module:function for model, train_batches, loss and evaluate, or builtin = NAME",
        )
    if base not in sys.path:
        sys.path.insert(0, base)
    parts: dict[str, Any] = {k: import_callable(table[k], where=path) for k in _TASK_CALLABLES if k in table}
    source = _relative(table["source"], base) if "source" in table else None
    return Task(
        name=table["name"],
        source=source,
        source_optimizer=table.get("source_optimizer"),
        fingerprint=str(table.get("fingerprint", "")),
        description=str(table.get("description", "")),
        **parts,
    )


def import_callable(reference: str, *, where: str | None = None) -> Callable[..., Any]:
    """The object named by ``module:attribute`` (``package.module:name``).

    Example:
        >>> import_callable("os.path:join")("a", "b") == os.path.join("a", "b")
        True
    """
    module_name, sep, attribute = str(reference).partition(":")
    if not sep or not module_name or not attribute:
        raise OstateError(f"'{reference}' is not of the form module:function", where=where)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise OstateError(
            f"cannot import '{module_name}': {e}",
            where=where,
            hint="put the module beside the spec file or on PYTHONPATH",
        ) from None
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise OstateError(f"'{module_name}' has no '{attribute}'", where=where)
        obj = getattr(obj, part)
    if not callable(obj):
        raise OstateError(f"'{reference}' is not callable", where=where)
    return obj


def _relative(value: str, base: str) -> str:
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.join(base, value)


def _check_keys(table: Any, allowed: set[str], path: str, where: str) -> None:
    if not isinstance(table, dict):
        raise OstateError(f"{where} must be a table", where=path)
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise OstateError(
            f"unknown key(s) in {where}: {', '.join(unknown)}", where=path, hint=f"known: {', '.join(sorted(allowed))}"
        )
