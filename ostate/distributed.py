"""Analyse one checkpoint on many machines: Ray tasks read disjoint parameters, the driver merges.

Every statistic of ostate is a mergeable sketch or an additive sum per parameter, and
each parameter's numbers do not depend on where they were computed. So the work
splits by parameter: :func:`summarize_on_ray` cuts each optimizer's parameters into
contiguous runs of about equal size (coordinates with state), one per Ray task; each
task loads the checkpoint itself (its index: the readers are lazy), streams only its
own parameters' tensors (memory-mapped pages, DCP byte ranges, safetensors offsets:
the bytes of the shard files holding them) and returns their summaries; the driver
puts them back in the optimizer's order, and every table, view and plot is built from
them exactly as from a local run (tested bit for bit). :func:`map_on_ray` runs any
such function (``ostate compare`` sends pairs of parameters through it).

Workers must see the checkpoint under the same path (shared storage) and have ostate
installed. Ray is an optional dependency (``pip install 'ostate[ray]'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterator, Sequence

from ostate.analysis.columns import optional_statistics
from ostate.analysis.engine import Analysis, analysis_of, summaries
from ostate.analysis.heads import HeadLayout, layout_from_config
from ostate.analysis.native.tuning import tuned_process
from ostate.analysis.params import ParamSummary
from ostate.errors import OstateError
from ostate.loading import IN_MEMORY, load
from ostate.state import Checkpoint, TensorRef

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class RayExecutor:
    """Where and how to run the analysis on Ray.

    ``address`` joins a running cluster (``auto``, ``host:6379``, ``ray://host:10001``);
    without it a local Ray is started on this machine's cores and stopped afterwards
    (or the one already initialised in this process is used). ``tasks`` is how many
    pieces each checkpoint is cut into (default: the cluster's CPUs). The load options
    are the ones the driver used, so that every worker reads the same checkpoint.
    """

    address: str | None = None
    tasks: int | None = None
    trust_pickle: bool = False
    optimizer: str | None = None
    format_hint: str | None = None
    base_config: str | None = None

    def load(self, path: str) -> Checkpoint:
        return load(
            path,
            trust_pickle=self.trust_pickle,
            optimizer=self.optimizer,
            format_hint=self.format_hint,
            base_config=self.base_config,
        )


@contextlib.contextmanager
def ray_session(address: str | None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """The ``ray`` module, initialised: joined to ``address``, or this process's Ray, or a local
    one with ``num_cpus`` CPUs (default: all of them; ignored when joining ``address``).

    Started without the dashboard and without workers' logs on this process's output; shut
    down on exit only if this call started it (a Ray the caller initialised stays up). Used
    by every Ray executor of ostate: inspect, plot and compare here, the fine-tuning harness's.
    """
    try:
        # optional dependency (ostate[ray])
        import ray
    except ImportError:
        raise OstateError("the Ray executor needs Ray", hint="pip install 'ostate[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(
                address=address,
                num_cpus=None if address else num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise OstateError(
                f"cannot start or join Ray ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})",
                where=address,
                hint="check --address (ray status shows a running cluster's), or leave it out for a local Ray",
            ) from None
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def map_on_ray(function: Callable[..., Any], calls: Sequence[tuple], executor: RayExecutor) -> list[Any]:
    """``[function(*args) for args in calls]``, each call a Ray task (one CPU), results in order.

    ``function`` must be importable on the workers (defined at module level in ostate).
    An :class:`OstateError` raised in a task is raised here as it was.
    """
    with ray_session(executor.address) as ray:
        remote = ray.remote(num_cpus=1, max_retries=0)(_reported)
        refs = [remote.remote(function, *args) for args in calls]
        try:
            results = ray.get(refs)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
    for result in results:
        if isinstance(result, _Failed):
            raise OstateError(result.message)
    return results


@dataclass(frozen=True)
class _Failed:
    message: str


def _reported(function: Callable[..., Any], *args: Any) -> Any:
    # An OstateError's message comes back as a value: Ray would wrap the exception in its own.
    try:
        return function(*args)
    except OstateError as e:
        return _Failed(str(e))


def cluster_cpus(executor: RayExecutor) -> int:
    """How many tasks to cut a checkpoint into: ``executor.tasks``, or the cluster's CPUs."""
    if executor.tasks is not None:
        if executor.tasks < 1:
            raise OstateError(f"tasks must be at least 1, got {executor.tasks}")
        return executor.tasks
    with ray_session(executor.address) as ray:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))


def slices(sizes: Sequence[int], pieces: int) -> list[tuple[int, int]]:
    """Cut ``len(sizes)`` items into at most ``pieces`` contiguous runs of about equal total size.

    Example:
        >>> slices([4, 4, 1, 1, 1, 1], 2)
        [(0, 2), (2, 6)]
        >>> slices([1, 1], 5)
        [(0, 1), (1, 2)]
    """
    total = sum(max(s, 1) for s in sizes)
    out: list[tuple[int, int]] = []
    start = 0
    seen = 0
    for i, size in enumerate(sizes):
        seen += max(size, 1)
        if seen * pieces >= total * (len(out) + 1) and len(out) < pieces - 1:
            out.append((start, i + 1))
            start = i + 1
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def summarize_on_ray(
    checkpoint: Checkpoint,
    executor: RayExecutor,
    *,
    optimizers: Sequence[int] | None = None,
    use_weights: bool = True,
    heads: HeadLayout | None = None,
    joint: bool = False,
    statistics: Collection[str] | None = None,
) -> Analysis:
    """What :func:`ostate.analysis.summarize` returns for ``checkpoint``, computed by Ray tasks.

    ``optimizers`` are positions in ``checkpoint.optimizers`` (default: all);
    ``use_weights=False`` leaves the model's weights unread (as ``weights={}`` does);
    ``heads``, ``joint`` and ``statistics`` are :func:`~ostate.analysis.summarize`'s.
    """
    if checkpoint.path == IN_MEMORY:
        raise OstateError("the Ray executor needs a checkpoint on disk", hint="save it first, or run locally")
    path = os.path.abspath(checkpoint.path)
    positions = list(range(len(checkpoint.optimizers))) if optimizers is None else list(optimizers)
    chosen = [checkpoint.optimizers[i] for i in positions]
    pieces = cluster_cpus(executor)
    calls = []
    for position, optimizer in zip(positions, chosen):
        sizes = [p.numel or 0 if p.has_state else 0 for p in optimizer.params]
        for start, stop in slices(sizes, pieces):
            names = tuple(p.name for p in optimizer.params[start:stop])
            calls.append((executor, path, position, start, stop, names, use_weights, heads, joint, statistics))
    results = map_on_ray(summarize_slice, calls, executor) if calls else []
    per_optimizer: dict[int, list[ParamSummary]] = {position: [] for position in positions}
    for call, result in zip(calls, results):
        per_optimizer[call[2]].extend(result)
    if heads is None:
        heads = layout_from_config(checkpoint.config)
    return analysis_of(chosen, [per_optimizer[p] for p in positions], heads, statistics)


def summarize_slice(
    executor: RayExecutor,
    path: str,
    position: int,
    start: int,
    stop: int,
    names: tuple[str, ...],
    use_weights: bool,
    heads: HeadLayout | None,
    joint: bool,
    statistics: Collection[str] | None,
) -> list[ParamSummary]:
    """On a worker: the summaries of parameters ``start:stop`` of optimizer ``position`` (one thread)."""
    with tuned_process():  # as the ostate program runs: one torch thread, the same float reductions
        checkpoint = executor.load(path)
        optimizer = checkpoint.optimizers[position] if position < len(checkpoint.optimizers) else None
        if optimizer is None or tuple(p.name for p in optimizer.params[start:stop]) != names:
            raise OstateError(
                "a Ray worker read another checkpoint than the driver's",
                where=path,
                hint="the workers must see the same files under the same path (shared storage)",
            )
        part = dataclasses.replace(optimizer, params=optimizer.params[start:stop])
        weights: dict[str, TensorRef] = {}
        if use_weights and checkpoint.weights:
            weights = {n: w if isinstance(w, TensorRef) else TensorRef.of(w) for n, w in checkpoint.weights.items()}
        if heads is None:
            heads = layout_from_config(checkpoint.config)
        return list(
            summaries(
                part, weights=weights, heads=heads, workers=1, joint=joint, statistics=optional_statistics(statistics)
            )
        )


def checked_executor(name: str, address: str | None) -> None:
    """Refuse an unknown executor name, or an address without Ray."""
    if name not in EXECUTORS:
        raise OstateError(f"unknown executor '{name}'", hint=f"choose one of: {', '.join(EXECUTORS)}")
    if address is not None and name != "ray":
        raise OstateError("--address is for --executor ray", hint="add --executor ray, or leave --address out")
