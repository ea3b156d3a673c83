"""Where the monitor's numbers go: a CSV log (the default, needs nothing), TensorBoard, Weights & Biases.

Every writer takes one :class:`Record` per monitored step: the table of the monitor's
view (the columns of ``ostate inspect --by VIEW``) and the effective learning rate's
sketch per parameter kind (for histograms).

- :class:`CSVWriter` appends every numeric column of every row to a long CSV
  (``step,optimizer,view,key,column,value``), flushed at each step, so a run that stops
  keeps what was logged; :func:`read_log` reads it back (``ostate plot LOG --kind timeline``).
- :class:`TensorBoardWriter` writes scalars ``ostate/{column}/{key}`` (the columns in
  :data:`SCALARS` by default) and histograms ``ostate/eff_lr/{kind}`` through
  ``torch.utils.tensorboard`` (tensorboard is an optional extra).
- :class:`WandbWriter` logs the same scalars and histograms to a Weights & Biases run
  (``run.log(..., step=step)``; wandb is an optional extra).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import pandas as pd

from ostate.analysis import Sketch
from ostate.errors import OstateError
from ostate.outputs import refused_writes

LOG_NAME = "ostate_monitor.csv"
LOG_COLUMNS = ("step", "optimizer", "view", "key", "column", "value")
# The columns TensorBoard and W&B get by default: the effective learning rate's and the update's
# quantiles, the update-to-weight ratio and the trouble fractions (the CSV log keeps every column).
SCALARS = (
    *(f"eff_lr_{s}" for s in ("mean", "p5", "p25", "p50", "p75", "p95")),
    *(f"update_{s}" for s in ("rms", "p50")),
    "update_to_weight_rms",
    "eps_dominated_frac",
    "second_moment_zero_frac",
    "nonfinite_frac",
    "step_max",
)
# The column that names a row in each view's table.
KEY_COLUMNS = {"param": "name", "group": "group", "layer": "layer", "kind": "param_kind", "model": None}


@dataclass
class Record:
    """What the monitor logs at one step: its view's table and the effective LR's sketch per parameter kind."""

    step: int
    view: str
    table: pd.DataFrame
    eff_lr: dict[str, Sketch] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)

    def scalars(self, columns: Sequence[str] | None) -> dict[str, float]:
        """``{"ostate/{column}/{key}": value}`` for the finite numbers among ``columns`` (all numeric when None)."""
        out: dict[str, float] = {}
        for optimizer, key, column, value in self.entries(columns):
            prefix = "ostate" if optimizer == "optimizer" else f"ostate/{optimizer}"
            if math.isfinite(value):
                out[f"{prefix}/{column}/{key}"] = value
        return out

    def entries(self, columns: Sequence[str] | None = None) -> Iterable[tuple[str, str, str, float]]:
        """``(optimizer, key, column, value)`` for each numeric cell of the table (``columns``: only those)."""
        key_column = KEY_COLUMNS[self.view]
        for row in self.table.to_dict("records"):
            key = str(row[key_column]) if key_column else "model"
            for column, value in row.items():
                if columns is not None and column not in columns:
                    continue
                if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                    continue
                if column in ("index", "group") and self.view != "param":
                    continue
                yield str(row.get("optimizer", "optimizer")), key, column, float(value)


class Writer(Protocol):
    """What the monitor writes through: ``write`` one record per monitored step, ``close`` at the end."""

    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


class CSVWriter:
    """The long CSV log ``step,optimizer,view,key,column,value``, appended and flushed at every record.

    Appending to a log that exists (a resumed run writing to the same folder) continues it;
    a file that is not such a log is refused. Each record is written as one block of
    lines and flushed, so a run that stops leaves every finished record.

    Example:
        >>> import tempfile, os, pandas as pd
        >>> path = os.path.join(tempfile.mkdtemp(), "log.csv")
        >>> w = CSVWriter(path)
        >>> w.write(Record(10, "model", pd.DataFrame([{"optimizer": "optimizer", "eff_lr_p50": 1e-3}])))
        >>> w.close()
        >>> read_log(path)[["step", "key", "eff_lr_p50"]].values.tolist()
        [[10, 'model', 0.001]]
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            self.path = os.path.join(self.path, LOG_NAME)
        self._file: Any = None

    def _open(self) -> Any:
        exists = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        if exists:
            with open(self.path, newline="") as f:
                header = f.readline().strip()
            if header != ",".join(LOG_COLUMNS):
                raise OstateError(
                    "exists and is not an ostate monitor log", where=self.path, hint="choose another path for the log"
                )
        folder = os.path.dirname(os.path.abspath(self.path))
        with refused_writes(self.path, inside=[folder]):
            if not os.path.lexists(folder):  # a file in its place: open() below says so (ENOTDIR)
                os.makedirs(folder, exist_ok=True)
            f = open(self.path, "a", newline="")
            if not exists:
                f.write(",".join(LOG_COLUMNS) + "\n")
        return f

    def write(self, record: Record) -> None:
        if self._file is None:
            self._file = self._open()
        lines = [
            (record.step, optimizer, record.view, key, column, repr(value))
            for optimizer, key, column, value in record.entries()
        ]
        with refused_writes(self.path):  # a full disk or a lost folder: one line naming the log
            csv.writer(self._file, lineterminator="\n").writerows(lines)
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_log(path: str | os.PathLike) -> pd.DataFrame:
    """A monitor log as a table: one row per (step, optimizer, view, key), one column per logged column.

    ``path`` is the CSV or a folder holding ``ostate_monitor.csv``. A resumed run that logged
    a step twice keeps the later numbers. The ``param`` view's own ``step`` column (the
    parameter's step count in the state) is named ``state_step`` here, beside the
    training ``step`` at which it was logged.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, LOG_NAME)
    try:
        long = pd.read_csv(path, dtype={"key": str, "optimizer": str, "view": str})
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise OstateError(f"cannot read the monitor log: {error}", where=path) from error
    if list(long.columns) != list(LOG_COLUMNS):
        raise OstateError(
            "is not an ostate monitor log", where=path, hint=f"its header must be {','.join(LOG_COLUMNS)}"
        )
    if long.empty:
        raise OstateError("the monitor log holds no records yet", where=path)
    long["column"] = long["column"].where(long["column"] != "step", "state_step")
    wide = long.pivot_table(
        index=["step", "optimizer", "view", "key"], columns="column", values="value", aggfunc="last", sort=False
    )
    wide.columns.name = None
    return wide.reset_index().sort_values("step", kind="stable", ignore_index=True)


def is_log(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a monitor log, or a folder holding one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, LOG_NAME)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.readline().strip() == ",".join(LOG_COLUMNS).encode()


HISTOGRAM_BINS = 64


def display_histogram(sketch: Sketch, bins: int = HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray]:
    """``(edges, counts)`` of the sketch's finite values on ``bins`` bins: log-spaced when every value is
    positive (an effective LR spans decades), linear otherwise. Each bfloat16 bucket of the sketch
    counts in the bin holding its midpoint (TensorBoard's and W&B's histograms take these).

    Example:
        >>> import torch
        >>> s = Sketch(); s.add(torch.tensor([1e-5, 1e-4, 1e-3, 1e-3]))
        >>> edges, counts = display_histogram(s, bins=3)
        >>> counts.tolist(), len(edges)
        ([1.0, 1.0, 2.0], 4)
    """
    values, counts = sketch.histogram()
    if not len(values):
        return np.array([0.0, 1.0]), np.zeros(1)
    lo, hi = float(values[0]), float(values[-1])
    if lo > 0:
        edges = np.geomspace(lo, hi * (1 + 2.0**-7), bins + 1) if hi > lo else np.array([lo, lo * (1 + 2.0**-7)])
    else:
        edges = np.linspace(lo, hi, bins + 1) if hi > lo else np.array([lo, lo + 1.0])
    binned, _ = np.histogram(values, bins=edges, weights=counts.astype(np.float64))
    return edges, binned


class TensorBoardWriter:
    """Scalars ``ostate/{column}/{key}`` and histograms ``ostate/eff_lr/{kind}`` in a TensorBoard log folder.

    ``target`` is a folder (a ``torch.utils.tensorboard.SummaryWriter`` is made for it) or
    a ``SummaryWriter`` already in use (the Trainer's or Lightning's); ``columns`` the table
    columns logged as scalars (default :data:`SCALARS`; ``None``: every numeric column).
    """

    def __init__(self, target: Any, *, columns: Sequence[str] | None = SCALARS):
        if isinstance(target, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency: tensorboard
            except ImportError as error:
                raise OstateError(
                    "the TensorBoard writer needs the tensorboard package", hint="pip install tensorboard"
                ) from error
            self.path = os.fspath(target)
            with refused_writes(self.path):  # a file in its place, a read-only or full disk: one line
                self.writer = SummaryWriter(self.path)
            self._owned = True
        else:
            self.writer = target
            self.path = str(getattr(target, "log_dir", "the SummaryWriter's folder"))
            self._owned = False
        self.columns = columns

    def write(self, record: Record) -> None:
        # TensorBoard writes on a thread of its own and raises its failure at the next add or flush.
        with refused_writes(self.path):
            self._write(record)

    def _write(self, record: Record) -> None:
        for tag, value in record.scalars(self.columns).items():
            self.writer.add_scalar(tag, value, global_step=record.step)
        for kind, sketch in record.eff_lr.items():
            if not sketch.count:
                continue
            edges, counts = display_histogram(sketch)
            self.writer.add_histogram_raw(
                f"ostate/eff_lr/{kind}",
                min=sketch.min,
                max=sketch.max,
                num=sketch.count,
                sum=sketch.total,
                sum_squares=sketch.sumsq,
                bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(),
                global_step=record.step,
            )
        self.writer.flush()

    def close(self) -> None:
        with refused_writes(self.path):
            if self._owned:
                self.writer.close()
            else:
                self.writer.flush()


class WandbWriter:
    """The same scalars and effective-LR histograms logged to a Weights & Biases run.

    ``run`` is a run (``wandb.init(...)``'s result); by default the active ``wandb.run``.
    Logged with ``run.log(data, step=step, commit=False)``, so the monitor's numbers join
    the step the training loop logs (W&B steps only increase).
    """

    def __init__(self, run: Any = None, *, columns: Sequence[str] | None = SCALARS):
        try:
            import wandb  # optional dependency: wandb
        except ImportError as error:
            raise OstateError("the W&B writer needs the wandb package", hint="pip install wandb") from error
        self._wandb = wandb
        self.run: Any = run if run is not None else wandb.run
        if self.run is None:
            raise OstateError("no active W&B run", hint="call wandb.init(...) first, or pass run=")
        self.columns = columns

    def write(self, record: Record) -> None:
        data: dict[str, Any] = dict(record.scalars(self.columns))
        for kind, sketch in record.eff_lr.items():
            if not sketch.count:
                continue
            edges, counts = display_histogram(sketch)
            data[f"ostate/eff_lr/{kind}"] = self._wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist()))
        self.run.log(data, step=record.step, commit=False)

    def close(self) -> None:
        pass
