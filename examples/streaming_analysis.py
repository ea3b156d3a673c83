"""Every view of one checkpoint from a single streaming pass: kinds, layers, compressibility, 8-bit error.

A small attention model (embedding, q/k/v projections, LayerNorm, MLP, head) is trained
for a few AdamW steps and saved the Hugging Face way, with a config.json beside the
checkpoint (which tells ostate the attention head size). ostate then reads the
checkpoint once, on two threads, and everything below comes from the sketches it kept.

Run: python examples/streaming_analysis.py [WORKDIR]
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from torch import nn

import ostate
from ostate.analysis import summarize


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(width, width, bias=False)
        self.input_layernorm = nn.LayerNorm(width)
        self.up_proj = nn.Linear(width, 4 * width)
        self.down_proj = nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        x = self.input_layernorm(h)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        att = nn.functional.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True
        )
        h = h + self.o_proj(att.transpose(1, 2).reshape(b, t, d))
        return h + self.down_proj(torch.relu(self.up_proj(h)))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, width: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


workdir = sys.argv[1] if len(sys.argv) > 1 else "ostate-streaming"
os.makedirs(workdir, exist_ok=True)
torch.manual_seed(0)
model = TinyLM()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog ") * 20)
for _step in range(30):
    start = torch.randint(0, len(text) - 33, (4,))
    batch = torch.stack([text[s : s + 33] for s in start])
    loss = nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
path = os.path.join(workdir, "checkpoint.pt")
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}, f)

# One pass over the checkpoint (memory-mapped, two threads); every view below is a merge.
analysis = summarize(ostate.load(path), workers=2)
print("\n".join(analysis.notes))

print("\nper parameter kind:")
kinds = analysis.table("kind")
print(
    kinds[
        [
            "param_kind",
            "params",
            "numel",
            "eff_lr_p50",
            "update_to_weight_rms",
            "second_moment_zero_frac",
            "eps_dominated_frac",
        ]
    ].to_string(index=False)
)

print("\ncould the second moment be shared (Adam-mini) or stored in 8 bits (bitsandbytes)?")
params = analysis.table("param")
attention = params[params["name"].str.contains("layers.0.")]
print(
    attention[
        [
            "name",
            "vmean_tensor_relchange",
            "vmean_row_relchange",
            "vmean_head_relchange",
            "exp_avg_q8_relerr",
            "exp_avg_sq_q8_relerr",
        ]
    ].to_string(index=False)
)

# Histograms come from the merged sketches: no raw data is needed for a plot.
(whole,) = analysis.rows("model")
values, counts = whole.sketches["eff_lr"].histogram()
decades = np.floor(np.log10(values))
print("\neffective learning rate, coordinates per decade (whole model):")
for decade in np.unique(decades):
    print(f"  1e{int(decade):+d} .. 1e{int(decade) + 1:+d}: {int(counts[decades == decade].sum()):7d}")
