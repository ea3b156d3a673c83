"""``ostate.Monitor``: the optimizer's state summarised every N steps while it trains.

Every ``every`` steps the monitor reads the live optimizer's tensors where they are
(:mod:`ostate.monitor.live`: no state-dict copy, no file, no tensor copied), summarises
them into sketches exactly as ``ostate inspect`` does (the same families, formulas and
columns), merges the sketches of data-parallel ranks (:mod:`ostate.monitor.ranks`) and
hands one :class:`~ostate.monitor.writers.Record` to its writers. It changes nothing in
the process (threads, allocator, garbage collector, random number generators) and
nothing in the optimizer: training with and without it gives bit-identical weights
(tests/test_monitor.py).
"""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

import pandas as pd
import torch

from ostate.analysis import OptimizerAnalysis, summaries
from ostate.analysis.engine import check_view
from ostate.errors import OstateError
from ostate.formats.naming.module_kinds import module_kinds
from ostate.monitor import ranks
from ostate.monitor.deepspeed_live import engine_module, whole_shape, zero_checkpoint
from ostate.monitor.live import is_sharded_parameter, live_checkpoint, parameter_names, unwrap
from ostate.monitor.watch import check_rows, warn
from ostate.monitor.writers import LOG_NAME, CSVWriter, Record, Writer

WriterSpec = Union[Writer, str, "os.PathLike[str]", Sequence[Writer], None]


class Monitor:
    """Summarise ``optimizer``'s state every ``every`` steps and write it (rank 0 only).

    Args:
        optimizer: the ``torch.optim.Optimizer`` (or accelerate's, Lightning's or
            ``ZeroRedundancyOptimizer``'s wrapper of it), or DeepSpeed's ZeRO optimizer
            (``engine.optimizer``, stages 1-3 and ``BF16_Optimizer``) or engine.
        model: names the parameters (``named_parameters()``), and gives the weights for
            ``update_to_weight_rms``; without it parameters are ``param.<index>`` (given a
            DeepSpeed engine, its ``module``).
        every: summarise at every step that is a multiple of ``every``.
        by: the view logged: ``param``, ``group``, ``layer``, ``kind`` or ``model``
            (the rows of ``ostate inspect --by``).
        writer: a writer (:class:`~ostate.monitor.writers.CSVWriter`,
            :class:`~ostate.monitor.writers.TensorBoardWriter`,
            :class:`~ostate.monitor.writers.WandbWriter`), several in a list, or a path
            for the CSV log (a folder gets ``ostate_monitor.csv``); default
            ``ostate_monitor.csv`` in the current folder.
        checks: raise :class:`~ostate.monitor.watch.MonitorWarning` for what
            :mod:`ostate.monitor.watch` finds (NaN state, eps-domination jumping, the
            second moment collapsing after a reset).
        shards: ``auto`` (sharded when the parameters are FSDP2 ``DTensor`` shards or the
            optimizer is a ``ZeroRedundancyOptimizer`` or DeepSpeed's ZeRO), ``replicated`` (every rank holds
            the whole state: rank 0 summarises it alone) or ``sharded`` (every rank
            summarises its share and rank 0 merges them).
        kind: the optimizer family instead of detecting it (``adamw``, ``sgd``, ...).
        workers: threads summarising parameters (default 1: the training keeps the cores).

    Example:
        >>> import torch, tempfile, os
        >>> model = torch.nn.Linear(4, 2); opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> log = os.path.join(tempfile.mkdtemp(), "monitor.csv")
        >>> with Monitor(opt, model, every=2, by="param", writer=log) as monitor:
        ...     for _ in range(4):
        ...         model(torch.randn(8, 4)).square().mean().backward(); opt.step(); opt.zero_grad()
        ...         record = monitor.step()
        >>> record.step, list(record.table["name"]), bool((record.table["eff_lr_p50"] > 0).all())
        (4, ['weight', 'bias'], True)
    """

    def __init__(
        self,
        optimizer: Any,
        model: torch.nn.Module | None = None,
        *,
        every: int = 100,
        by: str = "layer",
        writer: WriterSpec = None,
        checks: bool = False,
        shards: str = "auto",
        kind: str | None = None,
        workers: int = 1,
    ):
        check_view(by)
        if every < 1:
            raise OstateError(f"every must be at least 1, got {every}")
        if shards not in ranks.SHARDS:
            raise OstateError(f"unknown shards='{shards}'", hint=f"choose one of: {', '.join(ranks.SHARDS)}")
        model = engine_module(optimizer, model)
        if unwrap(optimizer).zero is not None:  # a clear error now, not at the first monitored step
            _check_zero(shards, model)
        self.optimizer = optimizer
        self.model = model
        self.every = every
        self.by = by
        self.checks = checks
        self.shards = shards
        self.kind = kind
        self.workers = workers
        self.writers: list[Writer] = _writers(writer)
        self.last: Record | None = None
        self._calls = 0
        self._logged: int | None = None
        self._previous: dict[str, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ the loop
    def step(self, step: int | None = None) -> Record | None:
        """Call after ``optimizer.step()``: summarises and writes when the step is a multiple of ``every``.

        ``step`` is the global step (a Trainer's); by default the monitor counts its own
        calls. Returns the record written (rank 0), ``None`` otherwise.
        """
        self._calls += 1
        step = self._calls if step is None else int(step)
        if step % self.every or step == self._logged:  # a step counted twice (gradient accumulation): once
            return None
        self._logged = step
        return self.log(step)

    def log(self, step: int) -> Record | None:
        """Summarise and write now, as step ``step`` (every rank must call it together when sharded)."""
        record = self.summarize(step)
        if record is None:
            return None
        for writer in self.writers:
            writer.write(record)
        self.last = record
        return record

    def summarize(self, step: int = 0) -> Record | None:
        """The record of the state as it is now (rank 0; ``None`` on the other ranks), nothing written."""
        live = unwrap(self.optimizer)
        rank, size = ranks.world()
        # ZeRO's pieces of parameters are merged into whole ones even on a single rank.
        sharded = self._sharded(live.sharded) and (size > 1 or live.zero is not None)
        if not sharded and rank != 0:
            return None
        if live.zero is not None:
            checkpoint = zero_checkpoint(live.zero, self.model, kind=self.kind)
        else:
            names = parameter_names(self.model)
            kinds = module_kinds(self.model) if self.model is not None else None
            checkpoint = live_checkpoint(live.optimizer, names, kind=self.kind, kinds=kinds)
        optimizer = checkpoint.optimizers[0]
        with torch.no_grad():
            mine = list(summaries(optimizer, weights=checkpoint.weights, workers=self.workers))
        if sharded:
            per_rank = ranks.gathered(mine)
            if per_rank is None:
                return None
            shapes = {n: whole_shape(p) for n, p in self.model.named_parameters()} if self.model is not None else {}
            mine = ranks.merged(per_rank, optimizer.kind, shapes)
        analysis = OptimizerAnalysis(optimizer, mine)
        rows = analysis.rows(self.by)
        table = pd.DataFrame([r.row for r in rows])
        eff_lr = {str(r.key): r.sketches["eff_lr"] for r in analysis.rows("kind") if "eff_lr" in r.sketches}
        record = Record(step, self.by, table, eff_lr)
        if self.checks:
            current = {str(r.key): r.row for r in rows}
            record.findings = check_rows(current, self._previous, optimizer.kind, step)
            self._previous = current
            warn(record.findings)
        return record

    def _sharded(self, wrapper_shards: bool) -> bool:
        if self.shards != "auto":
            return self.shards == "sharded"
        if wrapper_shards:
            return True
        params = [p for g in unwrap(self.optimizer).optimizer.param_groups for p in g["params"]]
        return any(is_sharded_parameter(p) for p in params)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the writers (a CSV log is complete after every step already)."""
        for writer in self.writers:
            writer.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_zero(shards: str, model: torch.nn.Module | None) -> None:
    if shards == "replicated":
        raise OstateError(
            "shards='replicated' cannot describe DeepSpeed's ZeRO optimizer: every rank holds a different partition",
            hint="leave shards='auto'",
        )
    if model is None:
        raise OstateError(
            "the monitor needs the model to name the pieces of DeepSpeed's ZeRO partitions",
            hint="pass the model: Monitor(engine.optimizer, engine.module), or the engine itself: Monitor(engine)",
        )


def _writers(spec: WriterSpec) -> list[Writer]:
    if spec is None:
        return [CSVWriter(LOG_NAME)]
    if isinstance(spec, (str, os.PathLike)):
        return [CSVWriter(spec)]
    if isinstance(spec, (list, tuple)):
        return list(spec)
    if hasattr(spec, "write") and hasattr(spec, "close"):
        return [spec]
    raise OstateError(
        f"cannot write the monitor's records to a {type(spec).__name__}",
        hint="pass a path for the CSV log, a writer (CSVWriter, TensorBoardWriter, WandbWriter) or a list of them",
    )
