"""Which parameters hold attention heads, and how many rows make one head.

Adam-mini (Zhang et al. 2024, arXiv 2406.16793) keeps one second moment per attention
head for the query and key projections. A head is visible in a projection's weight
only when the layout is known, so ostate splits a parameter into heads only when all
of this holds:

- its name is an attention projection weight: the module's name is one of
  :data:`PROJECTIONS` (``q_proj``, ``k_proj``, ``v_proj``, ``qkv_proj``, ``query``,
  ``key``, ``value``, ``query_key_value``, ``Wqkv``, ``wq``, ...) and the parameter is its
  ``weight``, or the parameter is ``in_proj_weight`` (``torch.nn.MultiheadAttention``);
- it is a matrix stored as ``(out_features, in_features)`` (``torch.nn.Linear``), so
  that one head is a block of consecutive rows;
- the head size is known: ``head_dim`` from the model config, else its hidden size
  divided by its number of attention heads, else what the user gave (``--head-dim``,
  or ``--heads N``: the head size is then ``in_features / N``);
- the rows divide into whole heads.

Fused projections (``qkv``, ``query_key_value``, ``in_proj_weight``) split into blocks of
``head_dim`` rows: each block is one head's query, key or value whichever way the
heads are interleaved. GPT-2's ``c_attn`` (a ``Conv1D`` stored as ``(in, out)``, heads
along columns) is not split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

PROJECTIONS = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "qkv_proj",
        "query",
        "key",
        "value",
        "query_key_value",
        "q",
        "k",
        "v",
        "qkv",
        "wq",
        "wk",
        "wv",
        "wqkv",
        "to_q",
        "to_k",
        "to_v",
        "q_lin",
        "k_lin",
        "v_lin",
    }
)
_HEADS_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "nhead", "encoder_attention_heads")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "hidden_dim")


@dataclass(frozen=True)
class HeadLayout:
    """How to find heads: a fixed ``head_dim``, or ``num_heads`` (head size = in_features / heads).

    ``source`` says where the numbers came from (``config``, ``user``).

    Example:
        >>> layout = HeadLayout(head_dim=64, source="user")
        >>> layout.rows_per_head("layers.0.attn.q_proj.weight", (512, 512))
        64
        >>> layout.rows_per_head("layers.0.mlp.up.weight", (2048, 512)) is None
        True
    """

    head_dim: int | None = None
    num_heads: int | None = None
    source: str = "user"

    def rows_per_head(self, name: str, shape: tuple[int, ...] | None) -> int | None:
        """Rows per head of this parameter, or None when it is not split into heads."""
        if shape is None or len(shape) != 2 or not is_attention_projection(name):
            return None
        head_dim = self.head_dim
        if head_dim is None and self.num_heads:
            head_dim = shape[1] // self.num_heads if shape[1] % self.num_heads == 0 else None
        if not head_dim or shape[0] % head_dim != 0:
            return None
        return head_dim

    def describe(self) -> str:
        if self.head_dim is not None:
            return f"head_dim={self.head_dim} ({self.source})"
        return f"{self.num_heads} heads, head_dim = in_features / {self.num_heads} ({self.source})"


def is_attention_projection(name: str) -> bool:
    """True for the weight of a query/key/value (or fused) projection, by the rule above."""
    parts = name.split(".")
    if parts[-1] == "in_proj_weight":
        return True
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2].lower() in PROJECTIONS


def layout_from_config(config: Mapping[str, Any] | None) -> HeadLayout | None:
    """The head layout a model config states (HF ``config.json`` keys and common aliases).

    Example:
        >>> layout_from_config({"hidden_size": 768, "num_attention_heads": 12}).head_dim
        64
    """
    if not config:
        return None
    head_dim = config.get("head_dim")
    if isinstance(head_dim, int) and head_dim > 0:
        return HeadLayout(head_dim=head_dim, source="config")
    heads = next((config[k] for k in _HEADS_KEYS if isinstance(config.get(k), int) and config[k] > 0), None)
    hidden = next((config[k] for k in _HIDDEN_KEYS if isinstance(config.get(k), int) and config[k] > 0), None)
    if heads and hidden and hidden % heads == 0:
        return HeadLayout(head_dim=hidden // heads, source="config")
    if heads:
        return HeadLayout(num_heads=heads, source="config")
    return None
