"""Where trials run: in this process, on a local process pool (the default), or on Ray.

Every executor runs the same :func:`run_job` and sets the same number of torch
threads per trial, so a trial gives the same numbers whichever runs it (torch's CPU
kernels can round differently with another thread count, hence ``threads`` is fixed
per trial rather than left to each worker). Results come back as trials finish; the
caller stores each one at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import multiprocessing
import os
import pickle
import signal
import sys
import sysconfig
import tarfile
import tempfile
import traceback
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterator, Sequence

from ostate.distributed import ray_session
from ostate.errors import OstateError
from ostate.harness.task import Task
from ostate.harness.trial import TrialConfig, TrialResult, run_trial
from ostate.outputs import atomic_directory, atomic_path

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Job:
    """One trial to run: the task, the source checkpoint's path, the settings, torch's thread
    count and the device the trial trains on (``cpu``, ``cuda``, ``cuda:N``)."""

    task: Task
    source: str
    config: TrialConfig
    threads: int
    device: str = "cpu"


@dataclass
class Outcome:
    """A finished job: its result, or the error that stopped it."""

    job: Job
    result: TrialResult | None = None
    error: str | None = None


def run_job(job: Job) -> Outcome:
    """Run one trial; an exception becomes the outcome's error (so one bad trial stops no other)."""
    try:
        return Outcome(job, result=run_trial(job.task, job.source, job.config, threads=job.threads, device=job.device))
    except OstateError as e:
        return Outcome(job, error=str(e))
    except Exception as e:  # report the trial's own failure with where it happened
        where = traceback.extract_tb(e.__traceback__)[-1]
        error = f"{type(e).__name__}: {e} (at {os.path.basename(where.filename)}:{where.lineno})"
        if "same device" in str(e):  # a task's own tensors left on the CPU while the model is on a GPU
            error += (
                f"; the trial trains on {job.device}: make the task's tensors on "
                "next(model.parameters()).device, or run with --device cpu"
            )
        return Outcome(job, error=error)


def default_threads(workers: int) -> int:
    """Torch threads per trial when not given: the cores shared out among the workers."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_local(jobs: Sequence[Job], *, workers: int) -> Iterator[Outcome]:
    """Run jobs on ``workers`` processes (``spawn``ed: no threads inherited mid-flight), or in
    this process when ``workers`` is 1. Outcomes come in the order trials finish."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield run_job(job)
        return
    try:
        pickle.dumps(jobs[0].task)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise OstateError(
            f"the task cannot be sent to worker processes ({e})",
            hint="define its functions at module level (no lambdas or closures), or run with "
            "workers=1 or the Ray executor",
        ) from None
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)), mp_context=context, initializer=_ignore_interrupts
    )
    try:
        futures = [pool.submit(run_job, job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()
    except BaseException:
        # Ctrl-C (or an error here): the workers ignore SIGINT, so the parent alone decides;
        # it stops them at once, which ends their unfinished trials (none of which is stored).
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=10)
        raise
    pool.shutdown(wait=True)


def _ignore_interrupts() -> None:
    """In a pool worker: leave Ctrl-C to the parent (a terminal sends SIGINT to the whole
    process group; a worker that raised KeyboardInterrupt would print a traceback and leave
    the pool waiting for a result that never comes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_ray(jobs: Sequence[Job], *, address: str | None = None, num_cpus: int | None = None) -> Iterator[Outcome]:
    """Run jobs as Ray tasks, each reserving ``threads`` CPUs (and a whole GPU when its device
    is a CUDA one: Ray shows a task only the GPUs it reserved).

    ``address`` joins an existing cluster (``auto``, or ``ray://host:10001``); without it
    a local Ray is started with ``num_cpus`` CPUs (and stopped after;
    :func:`ostate.distributed.ray_session`, shared with inspect's Ray executor). The source
    checkpoint travels through Ray's object store, so workers need not share a disk;
    they need ostate (and a user task's module) installed.
    """
    with ray_session(address, num_cpus=num_cpus) as ray:
        pending: dict[Any, Job] = {}
        try:
            for module in user_modules(jobs[0].task) if jobs else ():
                # the workers may not have the user's task module (a spec's folder is on this
                # process's sys.path only): its functions travel by value with each job
                ray.cloudpickle.register_pickle_by_value(module)
            sources = {path: ray.put(_read(path)) for path in {job.source for job in jobs}}
            remote = ray.remote(_run_on_ray)
            pending = {
                remote.options(num_cpus=job.threads, num_gpus=1 if job.device.startswith("cuda") else 0).remote(
                    job, sources[job.source]
                ): job
                for job in jobs
            }
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        yield ray.get(ref)
                    except Exception as e:  # the worker itself died
                        yield Outcome(job, error=f"Ray task failed: {type(e).__name__}: {e}")
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise


def user_modules(task: Task) -> list[ModuleType]:
    """The modules of a task's parts that are the user's own: neither ostate's nor installed
    (site-packages) nor the standard library's. Ray ships these by value to its workers."""
    installed = {os.path.realpath(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"])}
    found: dict[str, ModuleType] = {}
    for field in dataclasses.fields(task):
        part = getattr(task, field.name)
        while isinstance(part, functools.partial):
            part = part.func
        if not callable(part):
            continue
        name = getattr(part, "__module__", None) or ""
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if module is None or not path or name.split(".")[0] in ("ostate", "ostate_cli", "__main__"):
            continue
        real = os.path.realpath(path)
        if any(real.startswith(root + os.sep) for root in installed):
            continue
        found[name] = module
    return list(found.values())


def _read(path: str) -> bytes:
    """A source checkpoint as bytes: a file's content, or a folder as an uncompressed tar archive."""
    if os.path.isdir(path):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            archive.add(path, arcname=".")
        return _FOLDER + buffer.getvalue()
    with open(path, "rb") as f:
        return f.read()


_FOLDER = b"ostate-folder\0"


def local_source(source_bytes: bytes) -> str:
    """Where :func:`_read`'s bytes are on this machine: written once per content (a file, or a
    folder unpacked with tarfile's ``data`` filter: no links out, no absolute paths)."""
    digest = hashlib.sha256(source_bytes).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"ostate-source-{digest}")
    if os.path.exists(path):
        return path
    if source_bytes.startswith(_FOLDER):
        with atomic_directory(path) as tmp, tarfile.open(fileobj=io.BytesIO(source_bytes[len(_FOLDER) :])) as archive:
            archive.extractall(tmp, filter="data")
    else:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(source_bytes)
    return path


def _run_on_ray(job: Job, source_bytes: bytes) -> Outcome:
    """On a Ray worker: write the source checkpoint to a local file or folder named by its content
    (once per node; the path on the driver may not exist here, or hold another file), then run."""
    return run_job(dataclasses.replace(job, source=local_source(source_bytes)))


def execute(
    jobs: Sequence[Job], *, executor: str = "local", workers: int = 1, address: str | None = None
) -> Iterator[Any]:
    """Outcomes of ``jobs`` on the named executor, as they finish."""
    if executor == "local":
        return run_local(jobs, workers=workers)
    if executor == "ray":
        return run_ray(jobs, address=address, num_cpus=workers)
    raise OstateError(f"unknown executor '{executor}'", hint=f"choose one of: {', '.join(EXECUTORS)}")
