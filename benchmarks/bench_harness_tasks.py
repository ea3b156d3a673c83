"""Time per fine-tuning step and per eval of each built-in task, side by side in one run.

    python benchmarks/bench_harness_tasks.py [--steps 10] [--threads 2] [--devices cpu,cuda]

Each task's source model is pretrained for 2 steps only (the time of a step does not
depend on how well the model is trained); then one ``reload`` trial of ``--steps``
steps with one evaluation at the end runs under the task's default batch size (after an
untimed trial of one step, which makes and caches the task's data), on each
device of ``--devices`` (default: the CPU, and the GPU too when torch sees one). Prints
seconds per step and per trial of 200 steps with 10 evaluations (extrapolated), and the
ratio to code-to-prose on the CPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import torch

from ostate.harness import TrialConfig, builtin_task, run_trial


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name, device in itertools.product(
            ("code-to-prose", "sans-to-serif", "gpt-code-to-prose"), args.devices.split(",")
        ):
            task = builtin_task(name, pretrain_steps=2, progress=False, device="cpu")
            path = os.path.join(directory, f"{name}.pt")
            if not os.path.exists(path):
                task.pretrain(path)
            batch = task.defaults["batch_size"]
            warm = TrialConfig("reload", 0, 1e-3, steps=1, eval_every=1, batch_size=batch)
            run_trial(task, path, warm, threads=args.threads, device=device)  # data made and cached, kernels loaded
            t0 = time.perf_counter()
            run_trial(
                task,
                path,
                TrialConfig("reload", 0, 1e-3, steps=1, eval_every=1, batch_size=batch),
                threads=args.threads,
                device=device,
            )
            one = time.perf_counter() - t0  # 1 step, 2 evaluations, set-up
            t0 = time.perf_counter()
            run_trial(
                task,
                path,
                TrialConfig("reload", 0, 1e-3, steps=1 + args.steps, eval_every=10**6, batch_size=batch),
                threads=args.threads,
                device=device,
            )
            many = time.perf_counter() - t0  # 1 + steps steps, 2 evaluations, set-up
            per_step = (many - one) / args.steps
            per_eval_and_setup = one - per_step
            params = sum(p.numel() for p in task.model().parameters())
            rows.append((name, device, params, batch, per_step, per_step * 200 + per_eval_and_setup * 5.5))
    base = rows[0][4]
    print(f"torch threads {args.threads}; {args.steps} timed steps per task")
    print(
        f"{'task':20} {'device':>6} {'params':>10} {'batch':>5} {'s/step':>8} "
        f"{'x code-to-prose cpu':>20} {'s per 200-step trial':>21}"
    )
    for name, device, params, batch, step, trial in rows:
        print(f"{name:20} {device:>6} {params:>10,} {batch:>5} {step:>8.3f} {step / base:>20.2f} {trial:>21.0f}")


if __name__ == "__main__":
    main()
