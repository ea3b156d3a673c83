"""Time per fine-tuning step and per eval of each built-in task, side by side in one run.

    python benchmarks/bench_harness_tasks.py [--steps 10] [--threads 2]

Each task's source model is pretrained for 2 steps only (the time of a step does not
depend on how well the model is trained); then one ``reload`` trial of ``--steps``
steps with one evaluation at the end runs under the task's default batch size. Prints
seconds per step and per trial of 200 steps with 10 evaluations (extrapolated), and the
ratio to code-to-prose.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from ostate.harness import TrialConfig, builtin_task, run_trial


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name in ("code-to-prose", "sans-to-serif", "gpt-code-to-prose"):
            task = builtin_task(name, pretrain_steps=2, progress=False)
            path = os.path.join(directory, f"{name}.pt")
            task.pretrain(path)
            batch = task.defaults["batch_size"]
            t0 = time.perf_counter()
            run_trial(
                task,
                path,
                TrialConfig("reload", 0, 1e-3, steps=1, eval_every=1, batch_size=batch),
                threads=args.threads,
            )
            one = time.perf_counter() - t0  # 1 step, 2 evaluations, set-up
            t0 = time.perf_counter()
            run_trial(
                task,
                path,
                TrialConfig("reload", 0, 1e-3, steps=1 + args.steps, eval_every=10**6, batch_size=batch),
                threads=args.threads,
            )
            many = time.perf_counter() - t0  # 1 + steps steps, 2 evaluations, set-up
            per_step = (many - one) / args.steps
            per_eval_and_setup = one - per_step
            params = sum(p.numel() for p in task.model().parameters())
            rows.append((name, params, batch, per_step, per_step * 200 + per_eval_and_setup * 5.5))
    base = rows[0][3]
    print(f"torch threads {args.threads}; {args.steps} timed steps per task")
    print(f"{'task':20} {'params':>10} {'batch':>5} {'s/step':>8} {'x code-to-prose':>16} {'s per 200-step trial':>21}")
    for name, params, batch, step, trial in rows:
        print(f"{name:20} {params:>10,} {batch:>5} {step:>8.3f} {step / base:>16.1f} {trial:>21.0f}")


if __name__ == "__main__":
    main()
