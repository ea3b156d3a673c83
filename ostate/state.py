"""The core records: a checkpoint, the optimizers in it, and each parameter's state.

Readers (``ostate.formats``) build these; the math (``ostate.optimizers``) and the
statistics (``ostate.analysis``) read them. Tensors stay on disk until asked for:
a :class:`TensorRef` knows its shape and dtype and reads its data only on ``read()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

# ``OptimizerState.kind_source`` of a record a reader built, before ``ostate.load`` decides its family.
UNIDENTIFIED = "unidentified"

# How a parameter's name was found, from most to least certain.
NAME_SOURCES = ("param_names", "fqn", "model-order", "group-order", "hf-decay-rule", "shape-match", "none")


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A tensor inside a checkpoint: shape and dtype now, data on ``read()``.

    Example:
        >>> ref = TensorRef.of(torch.zeros(3, 4))
        >>> ref.shape, ref.numel, ref.nbytes
        ((3, 4), 12, 48)
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    _reader: Callable[[], torch.Tensor] = field(repr=False)
    _release: Callable[[int, int | None], None] | None = field(default=None, repr=False)
    # Where the data is: ``cpu`` for files and host memory, the accelerator for a live GPU tensor.
    device: str = field(default="cpu", compare=False)

    @classmethod
    def of(cls, tensor: torch.Tensor, release: Callable[[int, int | None], None] | None = None) -> TensorRef:
        """Wrap a tensor that is already addressable (in memory or memory-mapped).

        ``release(start, stop)`` gives back the memory of elements ``start:stop`` of the
        flattened tensor (``stop=None``: to the end); see :meth:`release`.
        """
        return cls(tuple(tensor.shape), tensor.dtype, lambda: tensor, release, tensor.device.type)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def read(self) -> torch.Tensor:
        """The tensor's data (for memory-mapped files, pages are read as they are touched)."""
        return self._reader()

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Give back the memory that reading elements ``start:stop`` (flattened) took, where the format allows.

        For a memory-mapped file the pages are dropped from this process and read
        again from the file (or the page cache) if touched later; a change made in
        place to those elements of the tensor is lost. ostate never writes to them.
        """
        if self._release is not None:
            self._release(start, stop)


@dataclass
class ParamState:
    """One parameter's optimizer state.

    ``state`` holds the optimizer's own keys (``exp_avg``, ``exp_avg_sq``,
    ``momentum_buffer``, ...): tensors as :class:`TensorRef`, anything else as saved
    (a Python int ``step``, LBFGS lists). ``step`` is the step count read from the
    state, or ``None`` when the optimizer keeps none (SGD) or the parameter has no state.

    ``frozen`` marks a parameter that the checkpoint saves outside the optimizer: the
    model has it but does not train it (DeepSpeed keeps frozen parameters beside the
    optimizer's partitions). It has no state, and readers put such parameters in a param
    group of their own whose only entry is ``{"frozen": True}`` (no hyperparameters; see
    :meth:`OptimizerState.is_frozen_group`). A parameter that is in the optimizer but
    never stepped is not frozen: it merely has no state.
    """

    index: int | str
    name: str
    name_source: str
    group: int
    shape: tuple[int, ...] | None
    step: float | None
    state: dict[str, Any] = field(default_factory=dict)
    frozen: bool = False

    @property
    def has_state(self) -> bool:
        return bool(self.state)

    @property
    def numel(self) -> int | None:
        if self.shape is None:
            return None
        n = 1
        for d in self.shape:
            n *= d
        return n

    def tensors(self) -> dict[str, TensorRef]:
        """The state entries that are tensors."""
        return {k: v for k, v in self.state.items() if isinstance(v, TensorRef)}

    def read(self, key: str) -> torch.Tensor:
        """One state tensor's data."""
        value = self.state[key]
        if isinstance(value, TensorRef):
            return value.read()
        return torch.as_tensor(value)

    @property
    def state_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())


@dataclass
class OptimizerState:
    """One optimizer found in a checkpoint.

    ``kind`` is the detected family (``adamw``, ``sgd``, ...; ``unknown`` when nothing
    fits) and ``kind_source`` says how it was decided: ``detected`` from state and
    group keys, ``assumed`` when the keys fit more than one family and the most common
    reading was taken, ``user`` when given with ``--optimizer``, or ``ds_config``
    when a DeepSpeed config named it because the groups could not tell (``unidentified``
    while a reader builds it: :func:`ostate.load` decides the family, see
    :mod:`ostate.optimizers.identify`). ``state_keys`` are every key seen in the saved
    per-parameter state, what the family is decided from. ``groups`` are the
    param groups' hyperparameters (without ``params``); ``location`` is where the
    state sits inside the checkpoint (``optimizer``, ``optimizer_states[0]``).
    """

    location: str
    kind: str
    kind_source: str
    groups: list[dict[str, Any]]
    params: list[ParamState]
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # Names of the model's entries in the model's own order, when the checkpoint has the
    # model (layers are listed in this order).
    model_order: list[str] = field(default_factory=list)
    state_keys: frozenset[str] = frozenset()
    # How the names were adjusted after they were found (a wrapper's prefix dropped, ...), for the header.
    name_notes: list[str] = field(default_factory=list)
    # Kinds (``norm``, ``embedding``) that the model's module types give, by parameter name, when
    # the model was at hand (a module passed in Python, a model rebuilt from its config); else the name rule.
    param_kinds: dict[str, str] = field(default_factory=dict)

    def group_of(self, param: ParamState) -> dict[str, Any]:
        return self.groups[param.group]

    def is_frozen_group(self, index: int) -> bool:
        """Whether param group ``index`` holds frozen parameters only (:attr:`ParamState.frozen`):
        the group a reader adds for them, which the optimizer itself does not have."""
        members = [p for p in self.params if p.group == index]
        return bool(members) and all(p.frozen for p in members)

    def param(self, name: str) -> ParamState:
        """The parameter with this name (KeyError if none)."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass
class Checkpoint:
    """What :func:`ostate.load` returns: the optimizers in a checkpoint, and what else it holds.

    ``weights`` maps parameter names to the model's tensors when the checkpoint has
    them (read lazily); ``config`` is the model's configuration when one was found; ``schedulers`` are LR-scheduler state dicts; ``metadata``
    holds scalars such as ``epoch`` and ``global_step``; ``format`` names the layout
    that was recognised (``torch``, ``lightning``, ...).
    """

    path: str
    format: str
    optimizers: list[OptimizerState]
    weights: Mapping[str, TensorRef] | None = None
    weights_location: str | None = None
    # The model's configuration when the checkpoint carries one (a config dict inside it,
    # or a config.json beside the file): used to find attention heads.
    config: dict[str, Any] | None = None
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
