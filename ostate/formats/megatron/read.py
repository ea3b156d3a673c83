"""Read a Megatron checkpoint saved with the distributed optimizer in the older per-rank layout.

Megatron-LM (``--use-distributed-optimizer --ckpt-format torch``) writes::

    <save>/latest_checkpointed_iteration.txt        the iteration to read ("release" or a number)
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt   {'model': state dict, 'optimizer': {...}, 'iteration', 'args', ...}
    <save>/iter_0000100/mp_rank_00/distrib_optim.pt     the optimizer's parameter state (DP rank 0 gathers it)

``model_optim_rng.pt`` holds the model's weights (names, shapes, dtypes) and the optimizer's
``param_groups`` without their ``params`` (``DistributedOptimizer.state_dict``);
``distrib_optim.pt`` holds flat fp32 buffers of the master weights (``param``) and of
``exp_avg`` / ``exp_avg_sq`` (``get_parameter_state_dp_zero``), cut into parameters as
:mod:`ostate.formats.megatron.buckets` describes. Tensor and pipeline parallel size 1
(one ``mp_rank_00`` folder) is read; Megatron itself is not needed.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch

from ostate.errors import OstateError
from ostate.formats.deepspeed.zero import RankPieces
from ostate.formats.files.torchfile import load_torch_file
from ostate.formats.megatron import dist
from ostate.formats.megatron.buckets import Slot, layout_for_total
from ostate.formats.megatron.groups import MEGATRON_GLOBALS, param_groups
from ostate.formats.naming import discover
from ostate.formats.naming.objects import model_entries
from ostate.formats.naming.torch_optim import read_optimizer
from ostate.formats.reader import Reader
from ostate.state import Checkpoint, TensorRef

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
_RANK_DIR = re.compile(r"^mp_rank_\d\d(_\d\d\d)?$")
_STATE_KEYS = ("exp_avg", "exp_avg_sq")
_MAX_TRACKER_BYTES = 64


def sniff(path: str) -> int:
    """3 for a torch_dist folder, a rank folder holding ``distrib_optim.pt`` or an iteration folder of
    such rank folders; 2 for a save folder whose tracker file names one of these; else 0."""
    if not os.path.isdir(path):
        return 0
    if os.path.isfile(os.path.join(path, OPTIM_FILE)) or dist.is_torch_dist(path):
        return 3
    if any(os.path.isfile(os.path.join(path, r, OPTIM_FILE)) for r in _rank_dirs(path)):
        return 3
    return 2 if os.path.isfile(os.path.join(path, TRACKER)) and _tracked_is_megatron(path) else 0


def read(path: str, *, trust_pickle: bool = False) -> Checkpoint:
    """Read a Megatron save folder, one ``iter_*`` folder, or its ``mp_rank_00`` folder."""
    path = iteration_dir(os.fspath(path))
    try:
        if dist.is_torch_dist(path):
            return dist.read(path, trust_pickle=trust_pickle)
        return _read_rank_dir(resolve_rank_dir(path), trust_pickle=trust_pickle)
    except (KeyError, AttributeError, TypeError, IndexError, ValueError) as e:
        # The files unpickled (safely) but do not hold what Megatron writes: a damaged or hand-made file.
        raise OstateError(
            f"the files do not have the layout Megatron writes ({type(e).__name__}: {e})",
            where=path,
            hint="a file may be damaged, or from a Megatron version ostate does not know; rerun with --debug",
        ) from e


def _read_rank_dir(rank_dir: str, *, trust_pickle: bool) -> Checkpoint:
    model_path = os.path.join(rank_dir, MODEL_FILE)
    optim_path = os.path.join(rank_dir, OPTIM_FILE)
    for f in (model_path, optim_path):
        if not os.path.isfile(f):
            raise OstateError(
                f"no {os.path.basename(f)} in this Megatron rank folder",
                where=rank_dir,
                hint=f"a distributed-optimizer checkpoint keeps {MODEL_FILE} and {OPTIM_FILE} side by side",
            )
    saved = load_torch_file(model_path, trust_pickle=trust_pickle, allowed_globals=MEGATRON_GLOBALS)
    optim = load_torch_file(optim_path, trust_pickle=trust_pickle)
    return _read(rank_dir, saved, optim, model_path, optim_path)


def _read(rank_dir: str, saved: Any, optim: Any, model_path: str, optim_path: str) -> Checkpoint:
    if not isinstance(saved, Mapping) or not isinstance(saved.get("model"), Mapping):
        hint = "virtual pipeline stages (model0, model1, ...) are not supported" if "model0" in (saved or {}) else ""
        raise OstateError(
            "not a Megatron model file (no 'model' state dict)",
            where=model_path,
            hint=hint or discover.top_level_summary(saved),
        )
    if not isinstance(optim, Mapping) or not any(isinstance(k, int) for k in optim):
        raise OstateError(
            "not a Megatron distributed-optimizer file (no per-buffer entries)",
            where=optim_path,
            hint=discover.top_level_summary(optim),
        )
    model: Mapping[str, Any] = saved["model"]
    trainable = [
        (name, t)
        for name, t in model.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not name.endswith("_extra_state")
    ]
    slots = _slots(trainable, optim, optim_path)
    groups, assignment, warnings = param_groups(saved, [(s.name, s.shape) for s, _ in slots], model_path)
    step = groups[0].get("step") if groups else None

    state: dict[str, dict[str, Any]] = {}
    weights: dict[str, TensorRef] = {}
    for slot, buffer in slots:
        entry: dict[str, Any] = {} if step is None else {"step": torch.tensor(float(step))}
        for key in _STATE_KEYS:
            entry[key] = buffer[key].ref(slot.offset, slot.shape)
        state[slot.name] = entry
        weights[slot.name] = buffer["param"].ref(slot.offset, slot.shape)
    names = [name for name, _ in trainable]
    groups_with_params = [
        dict({k: v for k, v in g.items() if k != "params"}, params=[n for n in names if assignment[n] == i])
        for i, g in enumerate(groups)
    ]
    entries = model_entries({n: model[n] for n in names})
    opt = read_optimizer({"state": state, "param_groups": groups_with_params}, OPTIM_FILE, model=("model", entries))
    opt.warnings[:0] = warnings
    opt.extra = {k: v for k, v in (saved.get("optimizer") or {}).items() if k == "grad_scaler"}
    for name, t in model.items():
        if name not in weights and isinstance(t, torch.Tensor) and t.is_floating_point():
            weights[name] = TensorRef.of(t)
    metadata: dict[str, Any] = {"optimizer_class": "megatron DistributedOptimizer"}
    if isinstance(saved.get("iteration"), int):
        metadata["global_step"] = saved["iteration"]
    return Checkpoint(
        path=rank_dir,
        format="megatron",
        optimizers=[opt],
        weights=weights,
        weights_location=f"fp32 master weights ({OPTIM_FILE} 'param'); the rest from {MODEL_FILE} 'model'",
        schedulers=[dict(s, _location=loc) for loc, s in discover.find_schedulers(saved)],
        metadata=metadata,
    )


def _slots(
    trainable: Sequence[tuple[str, torch.Tensor]], optim: Mapping[Any, Any], where: str
) -> list[tuple[Slot, dict[str, RankPieces]]]:
    """Each trainable parameter's slot in its buffer, with that buffer's joined tensors by key."""
    by_dtype: OrderedDict[torch.dtype, list[tuple[str, tuple[int, ...]]]] = OrderedDict()
    for name, t in trainable:
        by_dtype.setdefault(t.dtype, []).append((name, tuple(t.shape)))
    buffers = [(k, v) for idx in sorted(k for k in optim if isinstance(k, int)) for k, v in optim[idx].items()]
    if len(buffers) != len(by_dtype):
        raise OstateError(
            f"{len(buffers)} optimizer buffers for {len(by_dtype)} parameter dtypes of the model",
            where=where,
            hint="mixture-of-experts buffers and frozen parameters are not supported; "
            "the model and optimizer files may come from different saves",
        )
    out: list[tuple[Slot, dict[str, RankPieces]]] = []
    for (dtypes, world), (dtype, params) in zip(buffers, by_dtype.items()):
        param_dtype = dtypes[0] if isinstance(dtypes, tuple) else None
        if param_dtype is not None and len(buffers) > 1 and param_dtype != dtype:
            raise OstateError(
                f"the optimizer buffer for {param_dtype} parameters does not match the model's {dtype} parameters",
                where=where,
            )
        pieces = {k: world[k] if isinstance(world[k], list) else [world[k]] for k in ("param", *_STATE_KEYS)}
        joined = {k: RankPieces(v) for k, v in pieces.items()}
        # Before Feb 2024 a list of per-bucket tensors: megatron joins them and reads them as one (_update_legacy_world_tensors).
        total = int(world["numel_unpadded"]) if "numel_unpadded" in world else joined["param"].numel
        slots = layout_for_total(params, total, where)
        short = [k for k, j in joined.items() if j.numel < max((s.offset + s.numel for s in slots), default=0)]
        if short:
            raise OstateError(f"the optimizer buffer '{short[0]}' is shorter than the model's parameters", where=where)
        out.extend((s, joined) for s in slots)
    order = {name: i for i, (name, _) in enumerate(trainable)}
    out.sort(key=lambda item: order[item[0].name])
    return out


def iteration_dir(path: str) -> str:
    """The iteration folder a save folder's tracker file names; any other folder as it is."""
    if not os.path.isdir(path):
        raise OstateError("not a directory; a Megatron checkpoint is a folder", where=path)
    if os.path.isfile(os.path.join(path, TRACKER)):
        path = os.path.join(path, _iteration_dir(path))
        if not os.path.isdir(path):
            raise OstateError(
                f"{TRACKER} names a folder that is not here", where=path, hint="copy that iteration's folder"
            )
    return path


def resolve_rank_dir(path: str) -> str:
    """The ``mp_rank_00`` folder of ``path`` (an ``iter_*`` folder or the rank folder itself)."""
    if os.path.isfile(os.path.join(path, OPTIM_FILE)) or os.path.isfile(os.path.join(path, MODEL_FILE)):
        return path
    ranks = _rank_dirs(path)
    if not ranks:
        raise OstateError(
            "no mp_rank_* folder in this Megatron iteration folder",
            where=path,
            hint=f"pass the save folder (with {TRACKER}), an iter_* folder, or its mp_rank_00 folder",
        )
    if len(ranks) > 1:
        raise OstateError(
            f"{len(ranks)} model-parallel rank folders ({', '.join(ranks[:4])}...)",
            where=path,
            hint="ostate reads Megatron checkpoints with tensor and pipeline parallel size 1; "
            "pass one mp_rank_* folder to read its part",
        )
    return os.path.join(path, ranks[0])


def _iteration_dir(save_dir: str) -> str:
    tracker = os.path.join(save_dir, TRACKER)
    with open(tracker, "rb") as f:
        text = f.read(_MAX_TRACKER_BYTES + 1).decode("utf-8", "replace").strip()
    if text == "release":
        return "release"
    if not text.isdigit():
        raise OstateError(
            f"{TRACKER} should hold an iteration number or 'release', it holds {text[:40]!r}", where=tracker
        )
    return f"iter_{int(text):07d}"


def _tracked_is_megatron(save_dir: str) -> bool:
    try:
        iteration = os.path.join(save_dir, _iteration_dir(save_dir))
    except (OSError, OstateError):
        return False
    return dist.is_torch_dist(iteration) or any(
        os.path.isfile(os.path.join(iteration, r, OPTIM_FILE)) for r in _rank_dirs(iteration)
    )


def _rank_dirs(path: str) -> list[str]:
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(n for n in names if _RANK_DIR.match(n) and os.path.isdir(os.path.join(path, n)))


READER = Reader(
    name="megatron",
    summary="a Megatron checkpoint: torch_dist (DCP + metadata.json) or iter_*/mp_rank_00/ with distrib_optim.pt",
    sniff=sniff,
    read=read,
)
