"""The results store: every trial's settings and records in one SQLite file.

Two tables (stdlib ``sqlite3``, no server):

- ``trials``: ``trial_id`` (key), ``task``, ``source`` (the source checkpoint's
  fingerprint), the settings as columns (``strategy``, ``seed``, ``lr``, ``warmup``,
  ``batch_size``, ``steps``, ``eval_every``, ``schedule``), ``status`` (``done`` or
  ``failed``), ``info`` (JSON: what happened, wall time, threads, errors) and ``finished``
  (Unix time);
- ``records``: long format, ``(trial_id, step, metric, grp, value)``; ``grp`` is the
  param group (-1: the whole model).

A trial is written in one transaction when it finishes, so an interrupted run leaves
only whole trials behind, and a rerun skips every ``done`` trial (failed ones run again).

A third table, ``claims`` (``trial_id`` key, ``owner`` = ``host:pid``, ``claimed``), makes
two processes on one store share the work: a process runs only the trials it claimed
(one ``INSERT`` each, atomic in SQLite), and releases its claims when it stops; a claim
of a process that is gone (same host, no such pid) is taken over.

Columns added by later versions (the knobs ``grad_clip``, ``beta2``, ``replay``) are
added to an older store on opening, with 0 (off) for its trials.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import asdict, fields
from typing import Any, Iterable

import pandas as pd

from ostate.errors import OstateError
from ostate.harness.trial import TrialConfig, TrialResult
from ostate.outputs import WriteRefused, atomic_path, folder_refusal, write_refusal

SCHEMA_VERSION = 1
CONFIG_COLUMNS = tuple(f.name for f in fields(TrialConfig))
_SQL_TYPES = {
    "strategy": "TEXT",
    "schedule": "TEXT",
    "lr": "REAL",
    "grad_clip": "REAL",
    "beta2": "REAL",
    "replay": "REAL",
}
_ADDED_COLUMNS = ("grad_clip", "beta2", "replay")  # columns newer than the first schema (default 0)


class ResultsStore:
    """An SQLite results store (created on first use).

    Example:
        >>> import tempfile, os
        >>> store = ResultsStore(os.path.join(tempfile.mkdtemp(), "r.sqlite"))
        >>> config = TrialConfig("reload", seed=0, lr=1e-3, steps=2)
        >>> store.save(TrialResult("t1", "demo", config, [(2, "eval_loss", -1, 1.5)]), source="abc")
        >>> store.done_ids(), list(store.records()["value"])
        ({'t1'}, [1.5])
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=60)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            if refusal := write_refusal(e):  # a folder it cannot be created in, not a damaged store
                raise WriteRefused(self.path, *(folder_refusal(directory) or refusal)) from None
            raise OstateError(f"not a results store ({e})", where=self.path) from None
        if version not in (0, SCHEMA_VERSION):
            raise OstateError(
                f"results store schema {version} is not supported (this ostate writes {SCHEMA_VERSION})",
                where=self.path,
            )
        columns = ", ".join(f"{c} {_SQL_TYPES.get(c, 'INTEGER')} NOT NULL" for c in CONFIG_COLUMNS)
        with self._db:
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS trials (trial_id TEXT PRIMARY KEY, task TEXT NOT NULL, "
                f"source TEXT NOT NULL, {columns}, status TEXT NOT NULL, info TEXT NOT NULL, finished REAL NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS records (trial_id TEXT NOT NULL, step INTEGER NOT NULL, "
                "metric TEXT NOT NULL, grp INTEGER NOT NULL, value REAL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS records_by_trial ON records (trial_id, metric)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS claims (trial_id TEXT PRIMARY KEY, owner TEXT NOT NULL, claimed REAL NOT NULL)"
            )
            have = {row[1] for row in self._db.execute("PRAGMA table_info(trials)")}
            for column in _ADDED_COLUMNS:
                if column not in have:
                    self._db.execute(f"ALTER TABLE trials ADD COLUMN {column} {_SQL_TYPES[column]} NOT NULL DEFAULT 0")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def claim(self, trial_ids: list[str]) -> list[str]:
        """Claim trials for this process; returns those it got (not done, not claimed by a live
        process). Each claim is one atomic insert, so two processes never get the same trial."""
        got = []
        for trial_id in trial_ids:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT owner FROM claims WHERE trial_id = ?", (trial_id,)).fetchone()
                if row is not None and row[0] != self.owner and _alive(row[0]):
                    continue
                done = self._db.execute(
                    "SELECT 1 FROM trials WHERE trial_id = ? AND status = 'done'", (trial_id,)
                ).fetchone()
                if done:
                    continue
                self._db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (trial_id, self.owner, time.time()))
                got.append(trial_id)
        return got

    def release(self, trial_ids: Iterable[str] | None = None) -> None:
        """Give back this process's claims (all of them when ``trial_ids`` is None)."""
        with self._db:
            if trial_ids is None:
                self._db.execute("DELETE FROM claims WHERE owner = ?", (self.owner,))
            else:
                self._db.executemany(
                    "DELETE FROM claims WHERE trial_id = ? AND owner = ?", [(t, self.owner) for t in trial_ids]
                )

    def done_ids(self) -> set[str]:
        """The ids of the trials that finished."""
        return {row[0] for row in self._db.execute("SELECT trial_id FROM trials WHERE status = 'done'")}

    def save(self, result: TrialResult, *, source: str, status: str = "done") -> None:
        """Write one trial (replacing an earlier attempt) in a single transaction."""
        config = asdict(result.config)
        names = ["trial_id", "task", "source", *CONFIG_COLUMNS, "status", "info", "finished"]
        values = [
            result.trial_id,
            result.task,
            source,
            *(config[c] for c in CONFIG_COLUMNS),
            status,
            json.dumps(result.info, default=str),
            time.time(),
        ]
        with self._db:
            self._db.execute("DELETE FROM records WHERE trial_id = ?", (result.trial_id,))
            self._db.execute(
                f"INSERT OR REPLACE INTO trials ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", values
            )
            self._db.executemany(
                "INSERT INTO records VALUES (?, ?, ?, ?, ?)",
                [(result.trial_id, s, m, g, v) for s, m, g, v in result.records],
            )

    def save_failure(self, trial_id: str, task: str, config: TrialConfig, *, source: str, error: str) -> None:
        """Record a trial that raised (a rerun tries it again)."""
        self.save(TrialResult(trial_id, task, config, [], {"error": error}), source=source, status="failed")

    def trials(self, *, status: str | None = "done") -> pd.DataFrame:
        """One row per trial (only finished ones unless ``status=None``)."""
        query = "SELECT * FROM trials" + (" WHERE status = ?" if status else "") + " ORDER BY rowid"
        return pd.read_sql_query(query, self._db, params=(status,) if status else ())

    def records(self, metrics: Iterable[str] | None = None) -> pd.DataFrame:
        """The records of finished trials, long format: trial_id, step, metric, grp, value."""
        query = "SELECT r.* FROM records r JOIN trials t USING (trial_id) WHERE t.status = 'done'"
        params: tuple = ()
        if metrics is not None:
            metrics = list(metrics)
            query += f" AND r.metric IN ({', '.join('?' * len(metrics))})"
            params = tuple(metrics)
        return pd.read_sql_query(query + " ORDER BY r.rowid", self._db, params=params)

    def table(self) -> pd.DataFrame:
        """Every record with its trial's columns (task, source, settings, status, info,
        finished): the export's layout."""
        return self.trials().merge(self.records(), on="trial_id", how="inner")

    def export(self, path: str | os.PathLike) -> str:
        """Write :meth:`table` to ``path`` (``.csv`` or ``.parquet``, atomically); returns the path."""
        path = os.fspath(path)
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in (".csv", ".parquet"):
            raise OstateError(
                "cannot tell the export format from the file name",
                where=path,
                hint="use a name ending in .csv or .parquet",
            )
        table = self.table()
        with atomic_path(path) as tmp:
            if suffix == ".csv":
                table.to_csv(tmp, index=False)
            else:
                try:
                    table.to_parquet(tmp, index=False)
                except ImportError:
                    raise OstateError(
                        "writing Parquet needs pyarrow", where=path, hint="pip install pyarrow (or export to .csv)"
                    ) from None
        return path


def _alive(owner: str) -> bool:
    """Whether the process that holds a claim still runs (a claim from another host counts as alive)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True
