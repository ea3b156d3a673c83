"""Draw a checkpoint's optimizer state, and two checkpoints of one run on the same axes.

The demo model is trained once for 300 AdamW steps, saving a checkpoint every 100 steps
(as a training script saving periodically would). The last checkpoint is read and
summarised once (with the joint histogram of its moments), and all three kinds of
figure are drawn from that one analysis; then steps 100 and 300 are overlaid. The
figures are written as PNG files into the working directory (or WORKDIR); the images
in docs/plots.md are these files.

Run: python examples/plot_checkpoint.py [WORKDIR]
"""

from __future__ import annotations

import os
import sys

import ostate
from ostate import figures
from ostate.analysis import summarize
from ostate.demo import make_demo_run
from ostate.plots import plot_layer_profile, plot_lr_histogram, plot_moments, save_figure

workdir = sys.argv[1] if len(sys.argv) > 1 else "."
first, _middle, last = make_demo_run(os.path.join(workdir, "run"), steps=300, save_every=100)

# One pass over the checkpoint; every figure below is drawn from its sketches.
analysis = summarize(ostate.load(last), joint=True)
label = ["checkpoint-300"]
figures = {
    "plot-lr-histogram.png": plot_lr_histogram(analysis, by="kind", labels=label),
    "plot-layer-profile.png": plot_layer_profile(analysis, by="kind", labels=label),
    "plot-moments.png": plot_moments(analysis, by="group", labels=label),
    # Two snapshots of the same run, from their paths: ostate.figures loads and summarises
    # each once and labels it by its path.
    "plot-overlay-lr-histogram.png": figures.plot_lr_histogram([first, last], by="group"),
    "plot-overlay-layer-profile.png": figures.plot_layer_profile([first, last], by="layer"),
    "plot-overlay-moments.png": figures.plot_moments([first, last], by="group"),
}
for name, figure in figures.items():
    print("wrote", save_figure(figure, os.path.join(workdir, name), dpi=90))

# The plotted numbers are the table's: read the median line back from the figure.
figure = figures["plot-layer-profile.png"]
(line,) = [ln for ln in figure.axes[0].get_lines() if ln.get_gid() == "median|checkpoint-300|weight"]
table = analysis.table("param")
weights = table[table["param_kind"] == "weight"]
print("median effective lr of the weights, layer by layer (figure = table):")
for x, y in zip(line.get_xdata(), line.get_ydata()):
    layer = figure.axes[0].get_xticklabels()[int(x)].get_text()
    print(f"  {layer:<12} {y:.4g} = {float(weights[weights['layer'] == layer]['eff_lr_p50'].iloc[0]):.4g}")
