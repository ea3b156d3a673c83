"""Find the files of a DeepSpeed checkpoint and open them safely, without DeepSpeed.

``engine.save_checkpoint(save_dir)`` writes (DeepSpeed 0.16-0.19, runtime/engine.py)::

    save_dir/latest                                   the tag of the last save ("global_step300")
    save_dir/global_step300/mp_rank_00_model_states.pt            stages 0-2: module, param_shapes, ...
    save_dir/global_step300/zero_pp_rank_{r}_mp_rank_00_model_states.pt   stage 3: one per rank
    save_dir/global_step300/[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt   one per data-parallel rank

``ds_to_universal`` writes ``<tag>_universal/`` with ``zero/optimizer_state.pt`` and one
folder per parameter, and a ``latest_universal`` file beside it.

The optimizer files pickle four small DeepSpeed objects besides tensors and plain
containers. They are unpickled into the stand-in classes below, registered under
DeepSpeed's qualified names; every other pickled global is still refused.
"""

from __future__ import annotations

import enum
import os
import pickle
import re
import types
from dataclasses import dataclass
from typing import Any

from ostate.errors import OstateError
from ostate.formats.files.members import member_path, unsafe_reason
from ostate.formats.files.torchfile import TRUST_PICKLE_HINT, AllowedGlobal, load_torch_file

LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
UNIVERSAL_STATE = os.path.join("zero", "optimizer_state.pt")
_MAX_TAG_BYTES = 1024

_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_FILE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_PIPELINE_FILE = re.compile(r"^layer_\d+-model_\d+-model_states\.pt$")
# Mixture-of-experts saves (runtime/engine.py _get_optimizer_ckpt_name, _get_expert_ckpt_name).
_EXPERT_FILE = re.compile(r"^expp_rank_\d+_mp_rank_\d+_optim_states\.pt$|(^|_)expert_\d+_mp_rank_\d+_model_states\.pt$")


class ZeroStageEnum(int, enum.Enum):
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum`` (pickled as ``ZeroStageEnum(value)``)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class LossScaler:
    """Stand-in for ``deepspeed.runtime.fp16.loss_scaler.LossScaler``: its attributes, nothing else."""


class DynamicLossScaler:
    """Stand-in for ``deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler``: its attributes, nothing else."""


class FragmentAddress:
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address``: ``numel`` and ``start``."""


DEEPSPEED_GLOBALS: tuple[AllowedGlobal, ...] = (
    (ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (DynamicLossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
)
_DEEPSPEED_NAMES = {cls: name for cls, name in DEEPSPEED_GLOBALS}

# The pure-Python pickler; typeshed declares none of the internals (save, write, memoize, proto) used below.
_PurePickler: Any = pickle._Pickler


class _DeepSpeedPickler(_PurePickler):
    """A pickler that writes the stand-in classes above under DeepSpeed's own names.

    ``torch.save(obj, f, pickle_module=DEEPSPEED_PICKLE)`` then writes a file that
    DeepSpeed unpickles into its own classes, exactly as it wrote them (pickle records a
    class by its module and name; the stand-ins' state is the original objects' ``__dict__``).
    """

    def save_global(self, obj: Any, name: str | None = None) -> None:
        qualified = _DEEPSPEED_NAMES.get(obj)
        if qualified is None:
            super().save_global(obj, name)
            return
        module, _, qualname = qualified.rpartition(".")
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
        self.memoize(obj)


def _pickle_module() -> types.ModuleType:
    module = types.ModuleType("ostate_deepspeed_pickle")
    module.Pickler = _DeepSpeedPickler  # type: ignore[attr-defined]
    module.Unpickler = pickle.Unpickler  # type: ignore[attr-defined]
    return module


# For torch.save: writes the stand-ins back under DeepSpeed's class names (see _DeepSpeedPickler).
DEEPSPEED_PICKLE = _pickle_module()


def load_file(path: str, *, trust_pickle: bool = False) -> Any:
    """A DeepSpeed ``.pt`` file's object, memory-mapped, with only DeepSpeed's four known classes allowed.

    With ``trust_pickle`` a file that needs more is loaded with full unpickling (which
    then needs DeepSpeed itself installed).
    """
    try:
        return load_torch_file(path, allowed_globals=DEEPSPEED_GLOBALS)
    except OstateError as e:
        if trust_pickle and TRUST_PICKLE_HINT == e.hint:
            return load_torch_file(path, trust_pickle=True)
        raise


@dataclass(frozen=True)
class TagFiles:
    """The files of one saved tag (``global_stepN/``), ranks in numeric order."""

    directory: str
    model_files: list[str]  # one (stages 0-2) or one per rank (stage 3)
    optim_files: list[str]  # one per data-parallel rank; empty at stage 0
    bf16: bool  # optimizer files carry the bf16_ prefix


def is_tag_dir(path: str) -> bool:
    """True for a folder holding a DeepSpeed save (model or optimizer state files, or a universal checkpoint)."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    if os.path.isfile(os.path.join(path, UNIVERSAL_STATE)):
        return True
    return any(_MODEL_FILE.match(n) or _OPTIM_FILE.match(n) for n in names)


def is_universal(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, UNIVERSAL_STATE))


def looks_like_run_dir(path: str) -> bool:
    """A ``save_dir``: a ``latest``/``latest_universal`` file, or a tag folder inside.

    Example:
        >>> import tempfile
        >>> looks_like_run_dir(tempfile.mkdtemp())
        False
    """
    for marker in (LATEST, LATEST_UNIVERSAL):
        marker_path = os.path.join(path, marker)
        # DeepSpeed's marker holds one short tag name; a bigger file of that name is something else.
        if os.path.isfile(marker_path) and os.path.getsize(marker_path) <= _MAX_TAG_BYTES:
            return True
    return bool(tag_dirs(path))


def tag_dirs(run_dir: str) -> list[str]:
    """The names of the tag folders inside a ``save_dir``, sorted."""
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        return []
    return [n for n in names if os.path.isdir(os.path.join(run_dir, n)) and is_tag_dir(os.path.join(run_dir, n))]


def resolve_tag_dir(path: str, tag: str | None = None) -> str:
    """The tag folder to read: ``path`` itself, ``path/tag``, or the one ``path/latest`` names.

    Without ``latest`` (or ``latest_universal``, used when ``latest`` is absent) a
    ``save_dir`` holding exactly one tag folder reads that one.
    """
    if is_tag_dir(path):
        if tag is not None:
            raise OstateError(
                f"is a DeepSpeed tag folder already; tag '{tag}' cannot be chosen inside it",
                where=path,
                hint="pass the folder that holds the tag folders",
            )
        return path
    found = tag_dirs(path)
    listing = ", ".join(found) if found else "none"
    if tag is not None:
        reason = unsafe_reason(tag)
        if reason is not None:
            raise OstateError(
                f"the tag '{tag}' is {reason}",
                where=path,
                hint=f"a tag is a folder inside it; tag folders here: {listing}",
            )
        chosen = os.path.join(path, tag)
        if not os.path.isdir(chosen):
            raise OstateError(f"no tag folder '{tag}'", where=path, hint=f"tag folders here: {listing}")
        return chosen
    for marker in (LATEST, LATEST_UNIVERSAL):
        marker_path = os.path.join(path, marker)
        if os.path.isfile(marker_path):
            with open(marker_path, encoding="utf-8", errors="replace") as f:
                named = f.read().strip()
            chosen = member_path(path, named, listed_in=marker_path, entry="tag") if named else path
            if not named or not os.path.isdir(chosen):
                raise OstateError(
                    f"'{marker}' names the tag '{named}', which is not here",
                    where=marker_path,
                    hint=f"the save may be incomplete; pass one of the tag folders instead: {listing}",
                )
            return chosen
    if len(found) == 1:
        return os.path.join(path, found[0])
    raise OstateError(
        "no 'latest' file to say which DeepSpeed tag to read",
        where=path,
        hint=f"pass one of the tag folders: {listing}",
    )


def tag_files(tag_dir: str) -> TagFiles:
    """The model and optimizer files of a tag folder, checked for missing ranks and unsupported layouts."""
    names = sorted(os.listdir(tag_dir))
    if any(_PIPELINE_FILE.match(n) for n in names):
        raise OstateError(
            "pipeline-parallel DeepSpeed checkpoints (layer_*-model_states.pt) are not supported",
            where=tag_dir,
            hint="convert it with deepspeed.checkpoint.ds_to_universal and read the universal checkpoint",
        )
    if any(_EXPERT_FILE.search(n) for n in names):
        raise OstateError(
            "mixture-of-experts DeepSpeed checkpoints (expert files) are not supported",
            where=tag_dir,
            hint="convert it with deepspeed.checkpoint.ds_to_universal and read the universal checkpoint",
        )
    models: dict[int, str] = {}
    optims: dict[int, str] = {}
    prefixes: set[bool] = set()
    for n in names:
        if m := _MODEL_FILE.match(n):
            _check_mp_rank(m.group(2), tag_dir, n)
            models[int(m.group(1) or 0)] = os.path.join(tag_dir, n)
        elif m := _OPTIM_FILE.match(n):
            _check_mp_rank(m.group(3), tag_dir, n)
            rank = int(m.group(2))
            if rank in optims:
                raise OstateError(
                    f"two optimizer files for data-parallel rank {rank} (with and without 'bf16_')",
                    where=tag_dir,
                    hint="files of different runs are mixed in this folder",
                )
            optims[rank] = os.path.join(tag_dir, n)
            prefixes.add(bool(m.group(1)))
    if not models:
        raise OstateError(
            "no DeepSpeed model state file (*mp_rank_00_model_states.pt)",
            where=tag_dir,
            hint=f"found: {', '.join(names[:12]) or '(empty)'}",
        )
    _check_contiguous(models, tag_dir, "model state")
    _check_contiguous(optims, tag_dir, "optimizer state")
    return TagFiles(
        tag_dir, [models[r] for r in sorted(models)], [optims[r] for r in sorted(optims)], bf16=prefixes == {True}
    )


def _check_mp_rank(mp: str, tag_dir: str, name: str) -> None:
    if int(mp) != 0:
        raise OstateError(
            f"tensor-parallel DeepSpeed checkpoints ({name}) are not supported",
            where=tag_dir,
            hint="convert it with deepspeed.checkpoint.ds_to_universal and read the universal checkpoint",
        )


def _check_contiguous(files: dict[int, str], tag_dir: str, what: str) -> None:
    if not files:
        return
    missing = sorted(set(range(max(files) + 1)) - set(files))
    if missing:
        shown = ", ".join(str(r) for r in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise OstateError(
            f"{what} files of data-parallel rank {shown} are missing ({len(files)} of {max(files) + 1} present)",
            where=tag_dir,
            hint="copy every rank's file of this tag; a ZeRO checkpoint cannot be read from some ranks alone",
        )
