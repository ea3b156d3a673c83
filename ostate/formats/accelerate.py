"""Reader for ``Accelerator.save_state`` directories, and the optimizer files they share with the HF Trainer.

``accelerate/checkpointing.py::save_accelerator_state`` writes one file per prepared
object: ``model.safetensors`` (``model_1.safetensors``, ... for more models; or
``pytorch_model.bin`` with ``safe_serialization=False``), ``optimizer.bin``
(``optimizer_1.bin``, ...; each a plain ``torch.optim`` state dict),
``scheduler.bin`` (``scheduler_1.bin``, ...), ``random_states_<rank>.pkl``, and
``scaler.pt`` with fp16. Under FSDP with sharded state dicts
(``accelerate/utils/fsdp_utils.py::save_fsdp_optimizer``) optimizer ``i`` is a DCP
directory ``optimizer_<i>/`` holding ``{"optimizer": <FQN-keyed state>}``.

Optimizer ``i`` is named by model ``i`` when its shapes fit (else by any other model
in the folder that fits): by order for ``.bin`` weights, by unique shapes for
``.safetensors`` weights, which keep no order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ostate.errors import OstateError
from ostate.formats.dcp import read as dcp
from ostate.formats.files.torchfile import load_torch_file
from ostate.formats.naming import discover
from ostate.formats.naming.torch_optim import read_optimizer
from ostate.formats.naming.weights import Weights, find_weights, model_indices, name_by_weights
from ostate.formats.reader import Reader
from ostate.state import Checkpoint, OptimizerState

_OPTIMIZER_FILE = re.compile(r"^optimizer(?:_(\d+))?\.(?:bin|pt)$")
_OPTIMIZER_DIR = re.compile(r"^optimizer_(\d+)$")
_SCHEDULER_FILE = re.compile(r"^scheduler(?:_(\d+))?\.(?:bin|pt)$")
_RNG_FILE = re.compile(r"^(?:random_states_\d+\.pkl|rng_state(?:_\d+)?\.pth)$")


@dataclass(frozen=True)
class OptimizerSource:
    """One saved optimizer: a ``torch.save`` file or a DCP directory."""

    index: int
    path: str
    name: str
    is_dcp: bool


def optimizer_sources(directory: str) -> list[OptimizerSource]:
    """The optimizers saved in a directory, by their accelerate / Trainer file names, in index order."""
    found = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        file_match = _OPTIMIZER_FILE.match(name)
        dir_match = _OPTIMIZER_DIR.match(name)
        if file_match and os.path.isfile(path):
            found.append(OptimizerSource(int(file_match.group(1) or 0), path, name, False))
        elif dir_match and dcp.sniff(path):
            found.append(OptimizerSource(int(dir_match.group(1)), path, name, True))
    return sorted(found, key=lambda s: (s.index, s.name))


def read_source(source: OptimizerSource, *, trust_pickle: bool) -> list[OptimizerState]:
    """The optimizers in one saved optimizer file or DCP directory (unnamed unless the state carries names)."""
    if source.is_dcp:
        inner = dcp.read(source.path, trust_pickle=trust_pickle)
        for o in inner.optimizers:
            o.location = located(source, o.location)
        return inner.optimizers
    obj = load_torch_file(source.path, trust_pickle=trust_pickle)
    found = discover.find_optimizers(obj)
    if not found:
        raise OstateError("no optimizer state found", where=source.path, hint=discover.top_level_summary(obj))
    return [read_optimizer(sd, located(source, loc)) for loc, sd in found]


def located(source: OptimizerSource, inner: str) -> str:
    """The location of an optimizer found at ``inner`` inside a saved optimizer file or DCP directory.

    Example:
        >>> f = OptimizerSource(0, "ckpt/optimizer.pt", "optimizer.pt", False)
        >>> located(f, discover.ROOT), located(OptimizerSource(0, "s/optimizer_0", "optimizer_0", True), "optimizer")
        ('optimizer.pt', 'optimizer_0/optimizer')
    """
    if source.is_dcp:
        return f"{source.name}/{inner}"
    return source.name if inner == discover.ROOT else f"{source.name}:{inner}"


def read_schedulers(directory: str, *, trust_pickle: bool = False) -> tuple[list[dict], list[str]]:
    """LR scheduler state dicts saved as ``scheduler.pt`` / ``scheduler.bin`` / ``scheduler_<i>.bin``."""
    schedulers, warnings = [], []
    for name in sorted(n for n in os.listdir(directory) if _SCHEDULER_FILE.match(n)):
        try:
            obj = load_torch_file(os.path.join(directory, name), trust_pickle=trust_pickle)
        except OstateError as e:
            warnings.append(f"scheduler not read: {e}")
            continue
        schedulers += [
            dict(s, _location=name if loc == discover.ROOT else f"{name}:{loc}")
            for loc, s in discover.find_schedulers(obj)
        ]
    return schedulers, warnings


def process_count(directory: str) -> int:
    """How many processes saved RNG state (one file per rank), 0 when none did."""
    return sum(1 for n in os.listdir(directory) if _RNG_FILE.match(n))


def name_unnamed(optimizer: OptimizerState, models: list[Weights], preferred: int) -> None:
    """Name an optimizer by the first saved model (``preferred`` first) whose shapes fit it."""
    if not optimizer.params or all(p.name_source != "none" for p in optimizer.params):
        return
    ordered = sorted(range(len(models)), key=lambda i: i != preferred)
    first_warnings: list[str] | None = None
    for i in ordered:
        naming = name_by_weights(optimizer, models[i])
        if naming.source != "none":
            optimizer.warnings.extend(naming.warnings)
            return
        if first_warnings is None:
            first_warnings = naming.warnings
    optimizer.warnings.extend(first_warnings or [])


def sniff(path: str) -> int:
    if not os.path.isdir(path):
        return 0
    # accelerate names optimizers optimizer.bin, optimizer_<i>.bin, optimizer_<i>/; a lone optimizer.pt is the Trainer's.
    return 2 if any(s.name != "optimizer.pt" for s in optimizer_sources(path)) else 0


def read(path: str, *, trust_pickle: bool = False) -> Checkpoint:
    """Read an ``Accelerator.save_state`` directory (see the module docstring)."""
    if not os.path.isdir(path):
        raise OstateError("not a directory; accelerate's save_state writes a directory", where=path)
    sources = optimizer_sources(path)
    if not sources:
        raise OstateError(
            "no optimizer file (optimizer.bin, optimizer_<i>.bin or an optimizer_<i>/ DCP folder)",
            where=path,
            hint=f"found: {', '.join(sorted(os.listdir(path))) or '(empty)'}",
        )
    warnings: list[str] = []
    missing = sorted(set(range(max(s.index for s in sources) + 1)) - {s.index for s in sources})
    if missing:  # accelerate numbers optimizers from 0 without gaps: one was lost or not copied
        warnings.append(
            f"no file for optimizer {', '.join(map(str, missing))} (optimizer.bin, optimizer_<i>.bin); "
            "the checkpoint is incomplete: the optimizers found are shown"
        )
    numbered = [(i, w) for i in model_indices(path) if (w := find_weights(path, index=i, trust_pickle=trust_pickle))]
    models = [w for _, w in numbered]
    for w in models:
        warnings.extend(w.warnings)
    readable = [(i, w) for i, w in numbered if w.entries]
    optimizers = []
    for source in sources:
        for o in read_source(source, trust_pickle=trust_pickle):
            if readable:
                same = [k for k, (i, _) in enumerate(readable) if i == source.index]
                name_unnamed(o, [w for _, w in readable], preferred=same[0] if same else 0)
            optimizers.append(o)
    schedulers, scheduler_warnings = read_schedulers(path, trust_pickle=trust_pickle)
    metadata = {"processes": n} if (n := process_count(path)) else {}
    first = models[0] if models else None
    location = None
    if first is not None:
        location = first.location + (f" (+{len(models) - 1} more models)" if len(models) > 1 else "")
    return Checkpoint(
        path=path,
        format="accelerate",
        optimizers=optimizers,
        weights=first.tensors if first is not None else None,
        weights_location=location,
        schedulers=schedulers,
        metadata=metadata,
        warnings=warnings + scheduler_warnings,
    )


READER = Reader(
    "accelerate", "an Accelerator.save_state directory (optimizer.bin, model.safetensors, ...)", sniff, read
)
