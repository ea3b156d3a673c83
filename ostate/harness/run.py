"""An ablation from start to end: source -> trials (skipping finished ones) -> store -> summary and plots."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ostate.errors import OstateError
from ostate.harness.device import AUTO, parse_device, resolve_device
from ostate.harness.executors import EXECUTORS, Job, default_threads, execute
from ostate.harness.progress import Progress
from ostate.harness.source import Source, load_source
from ostate.harness.store import ResultsStore
from ostate.harness.summary import Summary, summarize_trials
from ostate.harness.task import Task, resolve_source
from ostate.harness.transfer import load_weights, optimizer_like_source, transfer_state
from ostate.harness.trial import TrialConfig, trial_context
from ostate.outputs import atomic_path
from ostate.reset.strategies import STRATEGIES, Strategy, apply_strategy, optimizer_kind

DEFAULT_STRATEGIES = STRATEGIES


@dataclass
class Sweep:
    """The grid of trials: every strategy x seed x lr x warmup x batch size (x grad_clip x beta2
    x replay, the knobs of :class:`TrialConfig`, 0 meaning off), each run for ``steps`` steps
    with evaluation every ``eval_every`` steps."""

    strategies: Sequence[str] = DEFAULT_STRATEGIES
    seeds: Sequence[int] = (0, 1, 2)
    lr: Sequence[float] = (1e-3,)
    warmup: Sequence[int] = (0,)
    batch_size: Sequence[int] = (32,)
    steps: int = 200
    eval_every: int = 20
    schedule: str = "cosine"
    grad_clip: Sequence[float] = (0.0,)
    beta2: Sequence[float] = (0.0,)
    replay: Sequence[float] = (0.0,)

    def configs(self) -> list[TrialConfig]:
        """Every trial of the grid, strategies outermost.

        Example:
            >>> len(Sweep(strategies=["reload", "fresh"], seeds=[0, 1], lr=[1e-3, 3e-3]).configs())
            8
        """
        strategies = [str(Strategy.parse(s)) for s in self.strategies]
        if len(set(strategies)) != len(strategies):
            raise OstateError(f"a strategy is listed twice: {', '.join(strategies)}")
        return [
            TrialConfig(
                strategy=s,
                seed=int(seed),
                lr=float(lr),
                warmup=int(w),
                batch_size=int(b),
                steps=self.steps,
                eval_every=self.eval_every,
                schedule=self.schedule,
                grad_clip=float(clip),
                beta2=float(beta2),
                replay=float(replay),
            )
            for s, lr, w, b, clip, beta2, replay, seed in itertools.product(
                strategies, self.lr, self.warmup, self.batch_size, self.grad_clip, self.beta2, self.replay, self.seeds
            )
        ]


@dataclass
class Spec:
    """A whole ablation: the task, the sweep and where and how to run it.

    ``store`` is the SQLite results store (reruns skip its finished trials); ``out``
    a directory for the summary tables and plots (none written when ``None``);
    ``plots`` whether to draw figures there as well; ``executor`` ``local`` (a process pool of
    ``workers``, default one per core) or
    ``ray`` (``address`` to join a cluster); ``threads`` torch threads per trial
    (default: cores / workers locally, 1 on Ray); ``target_loss`` for steps-to-target
    (default: the baseline's mean final eval loss); ``tune`` compares each strategy at its
    own best ``lr`` and ``warmup`` of the sweep (selected on the task's validation split,
    reported on its test split: :func:`~ostate.harness.summary.select_tuned`); ``device``
    where the trials train (:mod:`ostate.harness.device`: ``auto`` is the GPU when this
    machine has one; on Ray, ``auto`` is the CPU and ``cuda`` reserves a GPU per trial).
    """

    task: Task
    sweep: Sweep = field(default_factory=Sweep)
    store: str | os.PathLike = "ablation/results.sqlite"
    out: str | os.PathLike | None = "ablation"
    executor: str = "local"
    workers: int | None = None
    threads: int | None = None
    address: str | None = None
    cache_dir: str | None = None
    target_loss: float | None = None
    baseline: str = "reload"
    plots: bool = True
    plot_format: str = "png"
    tune: bool = False
    progress: bool | str = True  # "bar", "lines" (plain lines for a log) or False
    device: str = AUTO


@dataclass
class Results:
    """What :func:`run` did: how many trials ran, were skipped (done before) or left to another
    process on the same store (``busy``), which failed, the summary and files."""

    store: str
    source: str
    ran: int
    skipped: int
    failed: list[tuple[TrialConfig, str]]
    summary: Summary | None
    files: list[str] = field(default_factory=list)
    busy: int = 0  # trials another process on the same store had claimed (it runs them)


def run(spec: Spec) -> Results:
    """Run an ablation: every trial of ``spec.sweep`` not yet in the store, then the summary and plots.

    Example (a source checkpoint made on the spot; one's own task from plain callables):
        >>> import os, tempfile, torch
        >>> d = tempfile.mkdtemp(); source = os.path.join(d, "source.pt")
        >>> x = torch.randn(64, 4); y = x.sum(1, keepdim=True)
        >>> def mse(m, batch): return (m(batch[0]) - batch[1]).square().mean()
        >>> m = torch.nn.Linear(4, 1); opt = torch.optim.AdamW(m.named_parameters(), lr=1e-2)
        >>> for _ in range(5): opt.zero_grad(); mse(m, (x, y)).backward(); opt.step()
        >>> torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, source)
        >>> task = Task("linear", model=lambda: torch.nn.Linear(4, 1), train_batches=lambda n, g: [(x[:n], y[:n])],
        ...             loss=mse, evaluate=lambda m: float(mse(m, (x, y))), source=source)
        >>> spec = Spec(task, Sweep(strategies=["reload", "fresh"], seeds=[0, 1], steps=3, eval_every=3),
        ...             store=os.path.join(d, "r.sqlite"), out=None, workers=1, progress=False)
        >>> r = run(spec); (r.ran, r.skipped), list(r.summary.strategies["strategy"])
        ((4, 0), ['reload', 'fresh'])
        >>> run(spec).ran  # finished trials are skipped
        0
    """
    if spec.tune and spec.task.validate is None:
        raise OstateError(
            f"--tune selects on a validation split, but task '{spec.task.name}' has none",
            hint="give the task validate(model) (TOML: validate = 'module:function'); every built-in task has one",
        )
    if spec.executor not in EXECUTORS:
        raise OstateError(f"unknown executor '{spec.executor}'", hint=f"choose one of: {', '.join(EXECUTORS)}")
    configs = spec.sweep.configs()  # bad settings fail here, before any pretraining
    task = spec.task
    source_path = resolve_source(task, spec.cache_dir)
    source = load_source(source_path, optimizer_index=task.source_optimizer)
    # a trainer task's model is built by its trainer, in the trial
    optimizer = check_strategies(task, source, [c.strategy for c in configs]) if task.trainer is None else None
    workers = spec.workers or (os.cpu_count() or 1)
    threads = spec.threads or (default_threads(workers) if spec.executor == "local" else 1)
    device = trial_device(spec)
    context = trial_context(task, optimizer, threads, device)

    ids = {c: c.trial_id(task.name, source.fingerprint, context) for c in configs}
    failed: list[tuple[TrialConfig, str]] = []
    with ResultsStore(spec.store) as store:
        done = store.done_ids()
        todo = [c for c in configs if ids[c] not in done]
        claimed = set(store.claim([ids[c] for c in todo]))
        busy = [c for c in todo if ids[c] not in claimed]  # another process runs them
        todo = [c for c in todo if ids[c] in claimed]
        jobs = [Job(task, source_path, c, threads, str(device)) for c in todo]
        try:
            with Progress(len(jobs), f"{task.name} trials", enabled=spec.progress) as bar:
                for outcome in execute(jobs, executor=spec.executor, workers=workers, address=spec.address):
                    config = outcome.job.config
                    if outcome.result is not None:
                        # this process's id is the one claimed and summarised (a Ray worker that got the
                        # task's module by value cannot hash its file)
                        outcome.result.trial_id = ids[config]
                        store.save(outcome.result, source=source.fingerprint)
                    else:
                        store.save_failure(
                            ids[config],
                            task.name,
                            config,
                            source=source.fingerprint,
                            error=outcome.error or "unknown error",
                        )
                        failed.append((config, outcome.error or "unknown error"))
                    store.release([ids[config]])
                    bar.update(f"{config.strategy} seed {config.seed}")
        finally:
            store.release()
        wanted = set(ids.values())
        trials = store.trials()
        trials = trials[trials["trial_id"].isin(wanted)]
        records = store.records()
        records = records[records["trial_id"].isin(wanted)]
    summary = None
    files: list[str] = []
    if not trials.empty:
        summary = summarize_trials(
            trials,
            records,
            baseline=spec.baseline,
            target=spec.target_loss,
            order=[str(Strategy.parse(s)) for s in spec.sweep.strategies],
            tune=spec.tune,
        )
        if task.trainer is not None:  # the cells are labelled by the sweep, which the trainer may not follow
            summary.warnings.insert(
                0,
                f"the trials ran under the task's own {task.trainer_kind or 'hf'} trainer: the lr, warmup, batch "
                "size and schedule in the cell labels are the settings each trial's trainer was given "
                "(make_trainer(config, ...)); the trainer's own arguments decide what it used",
            )
        if spec.out is not None:
            files = write_outputs(summary, spec.out, fmt=spec.plot_format if spec.plots else None, title=task.name)
    ran = len(todo) - len(failed)
    skipped = len(configs) - len(todo) - len(busy)
    return Results(os.fspath(spec.store), source_path, ran, skipped, failed, summary, files, busy=len(busy))


def check_strategies(task: Task, source: Source, strategies: Sequence[str]) -> torch.optim.Optimizer:
    """Apply each strategy once to the source state, before any trial runs, so that a strategy
    that cannot apply (``reset-v`` on SGD, a regex that matches nothing) stops the ablation
    with one clear error instead of failing in every trial. Returns the fine-tuning optimizer
    it built (its hyperparameters enter the trial ids)."""
    model = task.model()
    load_weights(model, source)
    optimizer = (task.optimizer or optimizer_like_source(source))(model, 1e-3)
    transfer = transfer_state(source, optimizer, model)
    for strategy in dict.fromkeys(strategies):
        try:
            apply_strategy(transfer.state_dict, strategy, names=transfer.names, kind=optimizer_kind(optimizer))
        except OstateError as e:
            raise OstateError(f"strategy '{strategy}': {e}", where=source.path) from None
    return optimizer


def write_outputs(
    summary: Summary, directory: str | os.PathLike, *, fmt: str | None = "png", title: str = ""
) -> list[str]:
    """The summary tables (``strategies.csv``, ``paired.csv``, ``trials.csv``) and, unless ``fmt``
    is ``None``, the plots."""
    # start-up time: matplotlib only when the figures are drawn
    from ostate.harness.plots import write_plots

    directory = os.fspath(directory)
    files = []
    for name, frame in (("strategies", summary.strategies), ("paired", summary.paired), ("trials", summary.trials)):
        path = os.path.join(directory, f"{name}.csv")
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
        files.append(path)
    return files + (write_plots(summary, directory, fmt=fmt, title=title) if fmt else [])


def trial_device(spec: Spec) -> torch.device:
    """Where ``spec``'s trials train: its ``device`` on this machine; on Ray, ``auto`` is the CPU
    (a Ray task sees no GPU it did not reserve) and a CUDA device is taken as given (the
    workers have the GPUs, not necessarily this machine).

    Example:
        >>> from ostate.harness.task import Task
        >>> t = Task("t", model=None, train_batches=None, loss=None, evaluate=None)
        >>> trial_device(Spec(t, executor="ray")), trial_device(Spec(t, device="cpu"))
        (device(type='cpu'), device(type='cpu'))
    """
    if spec.executor == "ray":
        return torch.device("cpu") if spec.device == AUTO else parse_device(spec.device)
    return resolve_device(spec.device)
