"""Which handling of the optimizer state fine-tunes best? A tiny ablation of one's own task.

A small MLP is trained on one regression map (the source checkpoint: weights and AdamW
state), then fine-tuned on a nearby map under six strategies for the optimizer state,
three seeds each. The harness prints each strategy's final eval loss, area under the
eval curve and steps to reach reload's final loss, with 95% confidence intervals, and
the paired difference from reload. Runs in seconds; every file goes under ./ablation-example.

The same task from the command line: examples/ablation/spec.toml (`ostate ablate spec.toml`).
"""

from __future__ import annotations

import os
import sys

from ostate.harness import Spec, Sweep, Task, run
from ostate.harness.text import render_summary

OUT = "ablation-example"

# The task's parts are plain functions; this example uses the ones the TOML form names
# (examples/ablation/mytask.py), so both forms run the same task.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ablation"))
import mytask  # noqa: E402


def main() -> None:
    # 1. The source checkpoint: what a user already has (weights + optimizer state).
    source = os.path.join(OUT, "source.pt")
    if not os.path.exists(source):
        os.makedirs(OUT, exist_ok=True)
        mytask.pretrain(source)

    # 2. The task (plain callables) and the sweep.
    task = Task(
        "linear-maps",
        model=mytask.make_model,
        train_batches=mytask.train_batches,
        loss=mytask.loss,
        evaluate=mytask.evaluate,
        source=source,
        source_evaluate=mytask.evaluate_source,  # forgetting: the source loss beside the target's
        validate=mytask.validate,  # the validation split tune=True selects on
    )
    sweep = Sweep(
        strategies=["fresh", "reload", "reset-v-ac", "keep-v"],
        seeds=[0, 1, 2],
        lr=[3e-4, 1e-3],  # tune=True: each strategy at its own best lr (validation), reported on the test split
        steps=30,
        eval_every=5,
    )

    # 3. Run (workers=1: in this process; leave it out for one worker per core) and read the answer.
    results = run(
        Spec(
            task,
            sweep,
            store=os.path.join(OUT, "results.sqlite"),
            out=OUT,
            workers=1,
            threads=1,
            progress=False,
            tune=True,
        )
    )
    print(render_summary(results.summary))
    print(f"{results.ran} trials ran, {results.skipped} were already in {results.store}")
    print("wrote", ", ".join(sorted(os.path.basename(f) for f in results.files)))


if __name__ == "__main__":
    main()
