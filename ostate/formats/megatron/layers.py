"""Which of megatron's ``torch_dist`` sharded keys stack the layers of a transformer block, and how they split.

``TransformerBlock.sharded_state_dict`` (megatron-core ``transformer/transformer_block.py``)
saves homogeneous layers under one key per module, without the layer number
(``decoder.layers.mlp.linear_fc1.weight``), each layer's tensor with the offset
``(0, layer, num_layers)`` and ``prepend_axis_num=1``: the key holds one tensor of shape
``(num_layers, *shape)``, layer ``i`` at index ``i`` of the first axis. Layers saved with
their number in the key (``decoder.layers.3.``: heterogeneous layers, MoE every n-th layer,
``singleton_local_shards``, Mamba and multi-token-prediction layers) have no added axis.

Expert parameters (``...layers.mlp.experts.``) get a second prepended axis, the experts,
and their per-expert names depend on the expert module (``SequentialMLP``:
``local_experts.<e>.``, ``TEGroupedMLP``: ``weight<e>``, legacy ``GroupedMLP``: one
reshaped tensor), which the checkpoint does not record: they stay stacked.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Mapping

# a ``layers.`` segment followed by a segment that is not a layer number
_STACKED = re.compile(r"(?:^|\.)layers\.(?!\d+\.)")


def stacked_block(key: str) -> str | None:
    """The prefix, through ``layers.``, of a key that stacks a block's layers; ``None`` for any other key.

    Example:
        >>> stacked_block("decoder.layers.mlp.linear_fc1.weight")
        'decoder.layers.'
        >>> stacked_block("decoder.layers.3.mlp.linear_fc1.weight") is None
        True
    """
    found = _STACKED.search(key)
    return key[: found.end()] if found else None


def is_expert(key: str) -> bool:
    """An expert's key: its stacked tensor has an expert axis after the layer axis."""
    block = stacked_block(key)
    return block is not None and "experts" in key[len(block) :].split(".")


def prepended_axes(key: str) -> int:
    """Leading axes megatron prepends to a stacked key's own shape: the layer axis (not known for experts: 0)."""
    return 1 if stacked_block(key) is not None and not is_expert(key) else 0


def layer_name(key: str, layer: int) -> str:
    """The per-layer name of one layer of a stacked key: the layer number after ``layers.``.

    Example:
        >>> layer_name("decoder.layers.self_attention.linear_qkv.layer_norm_weight", 1)
        'decoder.layers.1.self_attention.linear_qkv.layer_norm_weight'
    """
    block = stacked_block(key)
    if block is None:
        raise ValueError(f"'{key}' does not stack layers")
    return f"{block}{layer}.{key[len(block) :]}"


def split_layers(shapes: Mapping[str, tuple[int, ...]], args: Any) -> tuple[dict[str, int], list[str]]:
    """The stacked keys to show per layer (``{key: number of layers}``) and a warning for each kind kept whole.

    A non-expert key under ``<block>.layers.`` has one prepended axis, the layers; its length
    is the block's ``num_layers``. All keys of a block must agree on it, and for the
    ``decoder.`` block it must equal ``args.num_layers`` where common.pt records Megatron-LM's
    ``args``; otherwise the block's keys stay stacked.

    Example:
        >>> shapes = {"decoder.layers.mlp.linear_fc1.weight": (2, 32, 8), "decoder.layers.mlp.linear_fc1.bias": (2, 32)}
        >>> split_layers(shapes, None)
        ({'decoder.layers.mlp.linear_fc1.weight': 2, 'decoder.layers.mlp.linear_fc1.bias': 2}, [])
        >>> split_layers({"decoder.layers.mlp.experts.linear_fc1.weight": (2, 4, 64, 8)}, None)[1]  # doctest: +ELLIPSIS
        ["'decoder.layers.mlp.experts.linear_fc1.weight' is kept stacked (shape (2, 4, 64, 8)...]
    """
    blocks: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    experts: list[str] = []
    for key, shape in shapes.items():
        block = stacked_block(key)
        if block is None:
            continue
        if is_expert(key):
            experts.append(key)
        else:
            blocks[block][key] = shape
    split: dict[str, int] = {}
    warnings: list[str] = []
    recorded = _num_layers(args)
    for block, keys in blocks.items():
        lengths = {shape[0] for shape in keys.values() if shape}
        first = next(iter(keys))
        if len(lengths) != 1 or any(not shape for shape in keys.values()):
            warnings.append(
                f"'{first}' and the other {len(keys) - 1} keys under '{block}' are kept stacked: their first axes "
                f"({sorted(lengths)}) do not agree on the number of layers"
            )
        elif block == "decoder.layers." and recorded is not None and lengths != {recorded}:
            warnings.append(
                f"'{first}' and the other {len(keys) - 1} keys under '{block}' are kept stacked: their first axis "
                f"({lengths.pop()}) is not the checkpoint's num_layers ({recorded})"
            )
        else:
            n = lengths.pop()
            split.update({key: n for key in keys})
    if experts:
        more = f" and {len(experts) - 1} more expert keys are" if len(experts) > 1 else " is"
        warnings.append(
            f"'{experts[0]}'{more} kept stacked (shape {tuple(shapes[experts[0]])}: layers, experts, then the "
            "expert's own axes): how megatron's expert module names and stacks its experts is not recorded in the "
            "checkpoint"
        )
    return split, warnings


def _num_layers(args: Any) -> int | None:
    """``num_layers`` of Megatron-LM's ``args`` (saved in common.pt), when recorded."""
    value = args.get("num_layers") if isinstance(args, Mapping) else getattr(args, "num_layers", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
