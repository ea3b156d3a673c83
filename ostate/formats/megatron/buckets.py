"""Cut Megatron-core's distributed-optimizer flat buffers into parameters.

Layout (megatron-core 0.16, ``distributed/param_and_grad_buffer.py::_ParamAndGradBuffer``
and ``optimizer/distrib_optimizer.py::get_parameter_state_dp_zero``):

- The model's trainable parameters are grouped by dtype, in ``named_parameters()`` order;
  each group has one buffer (``state[gbuf_idx][(param_dtype, grad_dtype)]``).
- A buffer holds its parameters in *reverse* order (roughly backprop order). With the
  distributed optimizer each parameter starts at a multiple of 64 elements, and the
  buffer is cut into buckets of about ``bucket_size`` elements; each bucket's end is
  padded to a multiple of ``lcm(dp_world_size, 128)``.
- ``distrib_optim.pt`` keeps, per buffer and key (``param``, ``exp_avg``, ``exp_avg_sq``),
  the buckets joined with the padding *after* each bucket removed, but the padding
  before each parameter kept. The older format (before Feb 2024) keeps a list of
  per-bucket tensors instead of one joined tensor, which megatron joins and reads the
  same way (``_update_legacy_world_tensors``).

So a parameter's place in a buffer follows from the parameters' sizes and the bucket
size, which the checkpoint does not record: one bucket is tried, then Megatron's default
bucket size (40,000,000 elements), and the layout whose total matches the saved buffer is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ostate.errors import OstateError

PARAM_ALIGNMENT = 64  # _pad_start_of_param_if_needed
DEFAULT_BUCKET_SIZE = 40_000_000  # DistributedDataParallelConfig: max(40_000_000, 1_000_000 * dp) for dp <= 40


@dataclass(frozen=True)
class Slot:
    """Where one parameter lies in its buffer's unpadded, joined form."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def layout(params: Sequence[tuple[str, tuple[int, ...]]], bucket_size: int | None) -> tuple[list[Slot], list[int]]:
    """The slots of ``params`` (in model order) and each bucket's unpadded size, as megatron lays them out.

    Example:
        >>> slots, buckets = layout([("w", (3, 10)), ("b", (3,))], None)
        >>> [(s.name, s.offset) for s in slots], buckets
        ([('b', 0), ('w', 64)], [94])
    """
    slots: list[Slot] = []
    buckets: list[int] = []
    base = 0  # where the current bucket starts in the joined (unpadded) buffer
    start = 0  # next parameter's start inside the current bucket
    end = 0
    for name, shape in reversed(params):
        start = _pad(start, PARAM_ALIGNMENT)
        end = start + math.prod(shape)
        slots.append(Slot(name, shape, base + start))
        if bucket_size is not None and end >= bucket_size:
            buckets.append(end)
            base, start, end = base + end, 0, 0
        else:
            start = end
    if end:
        buckets.append(end)
    return slots, buckets


def layout_for_total(params: Sequence[tuple[str, tuple[int, ...]]], numel_unpadded: int, where: str) -> list[Slot]:
    """The slots of ``params`` in a joined buffer of ``numel_unpadded`` elements (bucket sizes not saved)."""
    tried = []
    for bucket_size in (None, DEFAULT_BUCKET_SIZE):
        slots, buckets = layout(params, bucket_size)
        if sum(buckets) == numel_unpadded:
            return slots
        tried.append(sum(buckets))
    raise OstateError(
        f"the model's parameters do not match the optimizer buffer of {numel_unpadded} elements "
        f"(laid out in one bucket they take {tried[0]}, in buckets of {DEFAULT_BUCKET_SIZE:,} {tried[1]})",
        where=where,
        hint="model_optim_rng.pt and distrib_optim.pt may come from different saves, or the run used a "
        "non-default --ddp-bucket-size, which the checkpoint does not record",
    )
