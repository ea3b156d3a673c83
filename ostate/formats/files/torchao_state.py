r"""torchao's low-bit optimizer state (``torchao.optim``), read without torchao and without running its code.

torchao's ``AdamW8bit``, ``AdamW4bit`` and ``AdamWFp8`` (and their Adam versions) keep
each large moment as a tensor subclass, which ``torch.save`` pickles as the class and
its inner tensors. ostate admits exactly those three class names, as the stand-ins
below: unpickling builds an empty shell of the stand-in and sets its attributes (the
inner tensors and flags), and no torchao code runs. :func:`unwrap` then turns a stand-in
(or a real torchao object, when the file was loaded with ``trust_pickle``) into plain
state entries.

**Layout** (source: torchao 0.18, ``torchao/optim/subclass_8bit.py``, ``subclass_4bit.py``,
``subclass_fp8.py``; a moment is quantised when the parameter has at least 4096
elements and a multiple of the block size, otherwise it is a plain tensor):

- 8-bit (``OptimState8bit``, blocks of 256): ``codes`` (uint8, the parameter's shape),
  ``qmap`` (256 values: bitsandbytes' dynamic map, signed for the first moment and
  unsigned for the second), ``scale`` (one float32 per block);
- 4-bit (``OptimState4bit``, blocks of 128): ``codes`` (uint8, two codes per byte, high
  nibble first, flattened), ``qmap`` (16 values: a 3-exponent-bit dynamic map, signed;
  or the linear map :math:`k/16`, :math:`k = 1..16`, unsigned, without zero), ``scale``;
- FP8 (``OptimStateFp8``, blocks of 256): ``codes`` (``float8_e4m3fn``), ``scale``.

**Dequantisation**, for element :math:`j` in block :math:`b = \lfloor j/B \rfloor`
(:math:`B` = number of elements / number of scales):

.. math::
    x_j = \mathrm{qmap}[q_j]\cdot s_b \quad\text{(8- and 4-bit)}, \qquad
    x_j = \mathrm{float}(q_j)\cdot s_b \quad\text{(FP8)}

:func:`unwrap` gives the moment under its own key, as a reference that dequantises when
read (float32, the parameter's shape), and its quantisation beside it: ``{key}_quant``
(``8bit``, ``4bit`` or ``fp8``), ``{key}_scale`` and ``{key}_qmap``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ostate.errors import OstateError
from ostate.state import TensorRef

# torchao's class name -> ostate's name for the storage.
_CLASSES = {
    "torchao.optim.subclass_8bit.OptimState8bit": "8bit",
    "torchao.optim.subclass_4bit.OptimState4bit": "4bit",
    "torchao.optim.subclass_fp8.OptimStateFp8": "fp8",
}


class TorchaoOptimState(torch.Tensor):
    """An empty tensor shell with the attributes of a pickled torchao optimizer state (never computed with)."""

    quant = ""

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        raise OstateError(
            f"torchao's {cls.__name__} was read without torchao, as its inner tensors: it cannot be computed with",
            hint="ostate reads it through its dequantised values; load the file with torchao and trust_pickle=True "
            "to use the real class",
        )


def _stand_in(qualified: str, quant: str) -> type[TorchaoOptimState]:
    name = qualified.rpartition(".")[2]
    return type(name, (TorchaoOptimState,), {"__module__": __name__, "quant": quant})


TORCHAO_GLOBALS: tuple[tuple[Callable[..., Any], str], ...] = tuple(
    (_stand_in(qualified, quant), qualified) for qualified, quant in _CLASSES.items()
)


def quant_of(value: Any) -> str | None:
    """``8bit``, ``4bit`` or ``fp8`` for a torchao optimizer state (stand-in or real), else None."""
    if isinstance(value, TorchaoOptimState):
        return value.quant
    cls = type(value)
    return _CLASSES.get(f"{cls.__module__}.{cls.__qualname__}")


def dequantize(quant: str, codes: torch.Tensor, scale: torch.Tensor, qmap: torch.Tensor | None, shape) -> torch.Tensor:
    """float32 values of one torchao state, in ``shape`` (the formulas in the module docstring).

    Example:
        >>> codes = torch.tensor([0x1F], dtype=torch.uint8)  # 4-bit codes 1 and 15
        >>> dequantize("4bit", codes, torch.tensor([2.0]), torch.arange(16.0), (2,)).tolist()
        [2.0, 30.0]
    """
    if quant == "fp8":
        values = codes.float().reshape(-1)
    else:
        assert qmap is not None
        flat = codes.reshape(-1)
        if quant == "4bit":
            flat = torch.stack([flat >> 4, flat & 0b1111], dim=-1).reshape(-1)
        values = qmap.float().index_select(0, flat.int())
    n, blocks = values.numel(), scale.numel()
    if blocks == 0 or n % blocks or n != math.prod(shape):
        raise OstateError(
            f"torchao {quant} state: {n} values with {blocks} block scales do not make a tensor of shape {tuple(shape)}",
            hint="the file is damaged",
        )
    return values.view(blocks, -1).mul_(scale.float().reshape(-1, 1)).reshape(tuple(shape))


def unwrap(key: str, value: Any) -> dict[str, Any]:
    """The plain state entries of one torchao state under ``key`` (see the module docstring): the
    dequantised moment as a :class:`~ostate.state.TensorRef` that computes it when read, the inner
    ``scale`` and ``qmap`` tensors as they are."""
    quant = quant_of(value)
    assert quant is not None
    attributes = vars(value)
    try:
        codes, scale = attributes["codes"], attributes["scale"]
        qmap = attributes.get("qmap")
    except KeyError as e:
        raise OstateError(f"torchao {quant} state '{key}' has no '{e.args[0]}'", hint="the file is damaged") from None
    if not all(isinstance(t, torch.Tensor) for t in (codes, scale)) or (quant != "fp8" and qmap is None):
        raise OstateError(f"torchao {quant} state '{key}' lacks its inner tensors", hint="the file is damaged")
    shape = tuple(torch.Size(value.shape))
    out: dict[str, Any] = {
        key: TensorRef(shape, torch.float32, lambda: dequantize(quant, codes, scale, qmap, shape)),
        f"{key}_quant": quant,
        f"{key}_scale": scale,
    }
    if qmap is not None:
        out[f"{key}_qmap"] = qmap
    return out
