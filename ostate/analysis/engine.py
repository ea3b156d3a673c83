"""Run the per-parameter analysis over a checkpoint: a thread pool across parameters, in order.

Parameters are independent, so they are summarised by ``workers`` threads (torch
releases the GIL inside its kernels); results come back in the optimizer's order and
each parameter's numbers do not depend on which thread computed them, so the merged
rows are identical for any number of workers. The threads, allocator and garbage
collector of the process are left as they are: the ``ostate`` program runs with one
torch intra-op thread per worker (the work is already parallel, and a fixed count keeps
every float reduction in the same order), glibc keeping freed memory and the collector
paused (:func:`ostate.analysis.native.tuning.tuned_process`); from Python, torch's
reductions use the caller's thread count.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Collection, Iterator, Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ostate.analysis.columns import CORE, OPTIONAL_STATISTICS, optional_statistics
from ostate.analysis.heads import HeadLayout, is_attention_projection, layout_from_config
from ostate.analysis.params import ParamSummary, summarize_param
from ostate.analysis.tiny import batch_key, summarize_tiny
from ostate.analysis.views import VIEWS, ViewRow, view_rows
from ostate.errors import OstateError
from ostate.optimizers import get_family
from ostate.state import Checkpoint, OptimizerState, TensorRef

Weights = Mapping[str, "TensorRef | torch.Tensor"]


def default_workers() -> int:
    """``min(4, CPU cores available to this process)``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


@dataclass
class OptimizerAnalysis:
    """One optimizer's parameter summaries, and its views."""

    optimizer: OptimizerState
    summaries: list[ParamSummary]

    def rows(self, by: str = "param") -> list[ViewRow]:
        """The rows of view ``by`` with their merged sketches (see :class:`ViewRow`)."""
        check_view(by)
        return view_rows(self.optimizer, self.summaries, by, get_family(self.optimizer.kind).second_moment)

    def table(self, by: str = "param") -> pd.DataFrame:
        return pd.DataFrame([r.row for r in self.rows(by)])


@dataclass
class Analysis:
    """The result of :func:`summarize`: per optimizer, every parameter's sketches and sums.

    Views are cheap to build from it (sketches merge), so compute it once and ask for
    as many views as needed.

    Example:
        >>> import ostate, torch
        >>> m = torch.nn.Linear(4, 2); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        >>> m(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> analysis = summarize(ostate.from_state_dict(opt.state_dict(), model=m))
        >>> [r.key for r in analysis.rows("kind")]
        ['weight', 'bias']
        >>> values, counts = analysis.rows("model")[0].sketches["eff_lr"].histogram()
        >>> int(counts.sum())
        10
    """

    optimizers: list[OptimizerAnalysis]
    notes: list[str] = field(default_factory=list)
    # The statistic families the summaries hold: "core" and the optional ones computed.
    statistics: tuple[str, ...] = (CORE, *OPTIONAL_STATISTICS)

    def rows(self, by: str = "param") -> list[ViewRow]:
        """Every optimizer's rows of view ``by``, one optimizer after the other."""
        return [row for o in self.optimizers for row in o.rows(by)]

    def table(self, by: str = "param") -> pd.DataFrame:
        """The table of view ``by`` (one row per :class:`ViewRow`)."""
        frames = [o.table(by) for o in self.optimizers]
        frames = [f for f in frames if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def check_view(by: str) -> None:
    if by not in VIEWS:
        raise OstateError(f"unknown view '{by}'", hint=f"choose one of: {', '.join(VIEWS)}")


def check_loaded(target: object, call: str, accepted: tuple[type, ...] = (Checkpoint, OptimizerState)) -> None:
    """Refuse anything but a loaded checkpoint or optimizer, saying how to get one from a path.

    Example:
        >>> check_loaded("run/ckpt.pt", "ostate.analyze")
        Traceback (most recent call last):
        ...
        ostate.errors.OstateError: run/ckpt.pt: ostate.analyze takes a loaded checkpoint, not a path (load it first: ostate.analyze(ostate.load('run/ckpt.pt')))
    """
    if isinstance(target, (str, os.PathLike)):
        path = str(os.fspath(target))
        loaded = f"ostate.load({path!r})" + ("" if Checkpoint in accepted else ".optimizers[0]")
        raise OstateError(
            f"{call} takes a loaded checkpoint, not a path", where=path, hint=f"load it first: {call}({loaded})"
        )
    if not isinstance(target, accepted):
        names = " or ".join(t.__name__ for t in accepted)
        raise OstateError(
            f"{call} takes a {names}, not a {type(target).__name__}",
            hint="load a checkpoint with ostate.load(path) or ostate.from_state_dict(state_dict)",
        )


def summarize(
    target: Checkpoint | OptimizerState,
    *,
    weights: Weights | None = None,
    heads: HeadLayout | None = None,
    workers: int | None = None,
    progress: bool = False,
    joint: bool = False,
    statistics: Collection[str] | None = None,
) -> Analysis:
    """Summarise every parameter of every optimizer in ``target``, reading each tensor once.

    Args:
        target: a loaded checkpoint (all its optimizers) or one optimizer.
        weights: the model's tensors by parameter name; by default the checkpoint's own
            (``Checkpoint.weights``). A parameter whose weight has its shape gets the
            ``weight_*`` and ``update_to_weight_rms`` columns.
        heads: how to split attention projections into heads; by default what the
            checkpoint's model config says, if anything.
        workers: threads working on different parameters (default :func:`default_workers`);
            the results are identical for any ``workers``. No setting of the process is
            changed: torch ops run with the caller's intra-op thread count (without the
            compiled loops, float32 sums can then differ in their last digits from the
            ``ostate`` program's, which uses one per worker). For the program's speed in a
            process of one's own, call this inside
            :func:`ostate.analysis.native.tuning.tuned_process`.
        progress: show a progress bar on stderr when the work takes more than a second.
        joint: also count each coordinate's (sqrt(v̂), |m̂|) in a 2-D
            histogram (``ViewRow.joints["moments"]``, :mod:`ostate.analysis.joint`), for the
            families that declare their moments (Adam, AdamW, NAdam, RAdam, bitsandbytes
            Adam). Off by default: it costs a few more passes over each chunk.
    """
    check_loaded(target, "ostate.analysis.summarize")
    if isinstance(target, Checkpoint):
        optimizers = target.optimizers
        weights = target.weights if weights is None else weights
        heads = layout_from_config(target.config) if heads is None else heads
    else:
        optimizers = [target]
    refs = {name: w if isinstance(w, TensorRef) else TensorRef.of(w) for name, w in (weights or {}).items()}
    chosen = optional_statistics(statistics)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise OstateError(f"workers must be at least 1, got {workers}")
    total = sum(p.numel or 0 for o in optimizers for p in o.params if p.has_state)
    bar = tqdm(
        total=total, unit="coord", unit_scale=True, desc="analysing", disable=not progress, delay=1.0, leave=False
    )
    results = []
    with bar:
        for optimizer in optimizers:
            results.append(
                OptimizerAnalysis(
                    optimizer,
                    list(
                        summaries(
                            optimizer,
                            weights=refs,
                            heads=heads,
                            workers=workers,
                            bar=bar,
                            joint=joint,
                            statistics=chosen,
                        )
                    ),
                )
            )
    return analysis_of(optimizers, [r.summaries for r in results], heads, statistics)


def analysis_of(
    optimizers: Sequence[OptimizerState],
    summaries: Sequence[list[ParamSummary]],
    heads: HeadLayout | None,
    statistics: Collection[str] | None,
) -> Analysis:
    """The :class:`Analysis` of ``optimizers`` from their parameters' summaries, however they were computed
    (in this process, or by workers elsewhere: :mod:`ostate.distributed`)."""
    chosen = optional_statistics(statistics)
    held = (CORE, *(s for s in OPTIONAL_STATISTICS if s in chosen))
    results = [OptimizerAnalysis(o, list(s)) for o, s in zip(optimizers, summaries)]
    notes = _notes(list(optimizers), heads) if "compressibility" in chosen else []
    return Analysis(results, notes, held)


def summaries(
    optimizer: OptimizerState,
    *,
    weights: Mapping[str, TensorRef] | None = None,
    heads: HeadLayout | None = None,
    workers: int = 1,
    bar: tqdm | None = None,
    joint: bool = False,
    statistics: frozenset[str] = frozenset(OPTIONAL_STATISTICS),
) -> Iterator[ParamSummary]:
    """Each parameter's summary in the optimizer's order, computed by ``workers`` threads
    (``joint``: with the joint histogram of its moments; ``statistics``: the optional
    families to compute; see :func:`summarize`)."""
    family = get_family(optimizer.kind)
    weights = weights or {}

    def batch(params: list) -> list[ParamSummary]:
        # Tiny parameters that can share the family's math go together (ostate.analysis.tiny); the
        # others one by one. Either way each parameter's numbers are the same.
        out: dict[int, ParamSummary] = {}
        together: dict = {}
        for i, param in enumerate(params):
            weight = weights.get(param.name)
            key = batch_key(param, family, weight, heads, joint)
            if key is None:
                out[i] = summarize_param(
                    optimizer, param, family, weight=weight, heads=heads, joint=joint, statistics=statistics
                )
            else:
                together.setdefault(key, []).append(i)
        for members in together.values():
            for i, summary in zip(
                members, summarize_tiny(optimizer, [params[i] for i in members], family, weights, statistics)
            ):
                out[i] = summary
        if bar is not None:
            bar.update(sum(p.numel or 0 for p in params if p.has_state))
        return [out[i] for i in range(len(params))]

    if workers == 1:
        for params in _batches(optimizer.params):
            yield from batch(params)
        return

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ostate") as pool:
        futures: list[Future] = [pool.submit(batch, b) for b in _batches(optimizer.params)]
        try:
            for future in futures:
                yield from future.result()
        finally:
            for future in futures:
                future.cancel()


# A task for the thread pool is one parameter, or consecutive small ones up to this many
# coordinates together: a task per tiny parameter would cost more than its work.
_BATCH_COORDS = 1 << 16


def _batches(params: list) -> Iterator[list]:
    """Consecutive runs of parameters, each run holding at most :data:`_BATCH_COORDS` coordinates (or one parameter).

    Example:
        >>> from ostate.state import ParamState
        >>> ps = [ParamState(i, f"p{i}", "fqn", 0, shape, None) for i, shape in enumerate([(4,), (4,), (1 << 20,), (2,)])]
        >>> [[p.index for p in b] for b in _batches(ps)]
        [[0, 1], [2], [3]]
    """
    run: list = []
    coords = 0
    for p in params:
        n = max(p.numel or 0, 1)
        if run and coords + n > _BATCH_COORDS:
            yield run
            run, coords = [], 0
        run.append(p)
        coords += n
    if run:
        yield run


def _notes(optimizers: list[OptimizerState], heads: HeadLayout | None) -> list[str]:
    projections = [p.name for o in optimizers for p in o.params if p.has_state and is_attention_projection(p.name)]
    if not projections:
        return []
    if heads is None:
        return [
            f"vmean_head_relchange needs the attention head size ({len(projections)} attention projections found, "
            "e.g. " + projections[0] + "): pass --heads N or --head-dim D, or keep the model's config.json "
            "beside the checkpoint"
        ]
    return [f"attention heads: {heads.describe()}"]
