"""``ostate ablate``: fine-tune from a source checkpoint under each optimizer-state strategy, with error bars."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import click

from ostate.errors import OstateError
from ostate.harness import TASKS, Spec, Sweep, builtin_task, load_spec, run
from ostate.harness.device import AUTO
from ostate.harness.executors import EXECUTORS
from ostate.harness.store import ResultsStore
from ostate.harness.text import render_summary
from ostate.harness.trial import SCHEDULES
from ostate.outputs import WriteRefused, refused_writes
from ostate.plots.style import FORMATS
from ostate_cli.common import EXIT_INTERRUPTED, handle_errors, progress_enabled, warn


def split_list(text: str) -> list[str]:
    """Split on commas outside brackets, so a strategy's regex may hold ``{1,3}`` or ``(a|b)``.

    Example:
        >>> split_list("fresh,reload:^(?!head\\\\.),reset-v:x{1,3}")
        ['fresh', 'reload:^(?!head\\\\.)', 'reset-v:x{1,3}']
    """
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def _numbers(text: str | None, kind: type, option: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in split_list(text)]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated {kind.__name__} values, got '{text}'", param_hint=option
        ) from None


@click.command()
@click.argument(
    "spec_file", required=False, type=click.Path(readable=False, dir_okay=False, path_type=str), metavar="[SPEC.toml]"
)
@click.option("--task", "task_name", type=click.Choice(TASKS), help="A built-in task (instead of SPEC.toml).")
@click.option(
    "--strategies",
    metavar="A,B,...",
    help="Strategies to compare: fresh, reload, reset-m, reset-v, reset-step (adam-rel), keep-v, the age-correct "
    "reset-m-ac and reset-v-ac, or NAME:REGEX (default: the first six).",
)
@click.option("--seeds", metavar="0,1,2", help="Seeds (default 0,1,2).")
@click.option("--steps", type=click.IntRange(min=1), help="Fine-tuning steps per trial (default 200).")
@click.option("--eval-every", type=click.IntRange(min=1), help="Evaluate every K steps (default 20).")
@click.option("--lr", "lrs", metavar="LR,...", help="Peak learning rates (default: the task's).")
@click.option("--warmup", "warmups", metavar="N,...", help="Linear warmup lengths in steps (default 0).")
@click.option("--batch-size", "batch_sizes", metavar="N,...", help="Batch sizes (default: the task's).")
@click.option(
    "--schedule",
    type=click.Choice(SCHEDULES),
    help="After warmup: cosine to 10% (default), constant, wsd (warmup-stable-decay), or continue "
    "(the source's own lr, constant).",
)
@click.option("--grad-clip", "grad_clips", metavar="NORM,...", help="Clip the gradients' norm (default 0: off).")
@click.option("--beta2", "beta2s", metavar="B,...", help="Fine-tuning optimizer's beta2 (default: its own).")
@click.option("--replay", "replays", metavar="F,...", help="Fraction of steps on source data (default 0).")
@click.option(
    "--tune",
    is_flag=True,
    help="Compare each strategy at its own best lr and warmup (chosen on the validation split, reported on "
    "the test split); default grid: the task's lr x 1/3, 1, 3.",
)
@click.option("--target-loss", type=float, help="Loss for steps-to-target (default: the baseline's mean final loss).")
@click.option("--baseline", default=None, metavar="STRATEGY", help="Strategy the others are compared with (reload).")
@click.option("--workers", type=click.IntRange(min=1), help="Trials at once (default: one per core).")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Torch threads per trial (default: cores / workers; 1 on Ray). Same value, same numbers.",
)
@click.option(
    "--device",
    metavar="DEVICE",
    help="Where trials (and a built-in task's pretraining) train: auto (default: a GPU when there is one), "
    "cpu, cuda, cuda:N.",
)
@click.option("--executor", type=click.Choice(EXECUTORS), help="local process pool (default) or ray.")
@click.option("--address", metavar="ADDR", help="With --executor ray: join this cluster (e.g. auto).")
@click.option(
    "--store",
    type=click.Path(readable=False, dir_okay=False, path_type=str),
    help="SQLite results store (default OUT/results.sqlite); reruns skip finished trials.",
)
@click.option(
    "--out",
    type=click.Path(readable=False, file_okay=False, path_type=str),
    help="Directory for summary tables and plots (default ablation-TASK).",
)
@click.option(
    "--source",
    type=click.Path(readable=False, path_type=str),
    help="The source checkpoint (any file or folder ostate inspect reads): for a built-in task "
    "(default: pretrain one and cache it), or a Hugging Face checkpoint folder with --train and --eval.",
)
@click.option(
    "--train",
    "train_file",
    type=click.Path(readable=False, dir_okay=False, path_type=str),
    help="With --source HF_FOLDER: the fine-tuning text (.txt, or .jsonl with 'text' [and 'label']).",
)
@click.option(
    "--eval",
    "eval_file",
    type=click.Path(readable=False, dir_okay=False, path_type=str),
    help="With --source HF_FOLDER: held-out target text for the eval loss.",
)
@click.option(
    "--source-eval",
    "source_eval_file",
    type=click.Path(readable=False, dir_okay=False, path_type=str),
    help="With --source HF_FOLDER: held-out source-domain text (how much the fine-tuning forgets).",
)
@click.option("--block-size", type=click.IntRange(min=2), help="With --source HF_FOLDER: tokens per window (128).")
@click.option(
    "--optimizer-index",
    type=click.IntRange(min=0),
    help="The source's optimizer when it holds several (as ostate inspect lists them).",
)
@click.option(
    "--cache-dir",
    type=click.Path(readable=False, file_okay=False, path_type=str),
    help="Where pretrained sources are cached (default ~/.cache/ostate, or $OSTATE_CACHE_DIR).",
)
@click.option("--new-head", is_flag=True, help="gpt-code-to-prose: fine-tune a new output layer (no state carried).")
@click.option("--pretrain-steps", type=click.IntRange(min=1), help="Pretraining steps of a built-in task's source.")
@click.option(
    "--export",
    type=click.Path(readable=False, dir_okay=False, path_type=str),
    help="Also write every record with its trial's settings to a .csv or .parquet file.",
)
@click.option("--plot-format", type=click.Choice(FORMATS), help="Figure format (default png).")
@click.option("--no-plots", is_flag=True, help="Write the summary tables only.")
@handle_errors(tuned=False)  # trials and pretraining set torch's threads themselves (Spec.threads), and train for long
def ablate(
    spec_file,
    task_name,
    strategies,
    seeds,
    steps,
    eval_every,
    lrs,
    warmups,
    batch_sizes,
    schedule,
    grad_clips,
    beta2s,
    replays,
    tune,
    target_loss,
    baseline,
    workers,
    threads,
    device,
    executor,
    address,
    store,
    out,
    source,
    train_file,
    eval_file,
    source_eval_file,
    block_size,
    optimizer_index,
    cache_dir,
    new_head,
    pretrain_steps,
    export,
    plot_format,
    no_plots,
):
    """Compare what to do with a checkpoint's optimizer state when fine-tuning.

    Each trial loads the source checkpoint, applies one strategy to its optimizer state,
    fine-tunes and evaluates; the summary gives each strategy's final eval loss, area
    under the eval curve and steps to a target loss with 95% confidence intervals over
    seeds, and paired differences from reload. Either a built-in task:

    \b
        ostate ablate --task code-to-prose --seeds 0,1,2 \\
            --strategies fresh,reload,reset-v,keep-v

    or a Hugging Face checkpoint folder fine-tuned on text files (no code to write):

    \b
        ostate ablate --source out/checkpoint-500 --train target.txt \\
            --eval target-eval.txt --strategies reload,fresh,keep-v

    or one's own task, described in SPEC.toml (see docs/harness.md).
    """
    text_mode = train_file is not None or eval_file is not None
    if sum(map(bool, (spec_file, task_name, text_mode))) != 1:
        raise click.UsageError("give SPEC.toml, --task NAME, or --source HF_FOLDER --train FILE --eval FILE")
    if not text_mode and (source_eval_file or block_size):
        raise click.UsageError("--source-eval and --block-size go with --train and --eval")
    progress = "bar" if progress_enabled() else "lines"  # a log (nohup, CI) gets plain lines now and then
    if spec_file:
        spec = load_spec(spec_file, device=device)
        if pretrain_steps is not None or source is not None or optimizer_index is not None or new_head:
            raise click.UsageError(
                "--source, --optimizer-index, --new-head and --pretrain-steps apply to --task; "
                "set them in SPEC.toml instead"
            )
    else:
        if text_mode:
            if not (source and train_file and eval_file):
                raise click.UsageError("a Hugging Face checkpoint as a task needs --source, --train and --eval")
            # start-up time: the text task imports transformers
            from ostate.harness.tasks.hf_text import hf_text_task

            task = hf_text_task(
                source,
                train_file,
                eval_file,
                source_eval=source_eval_file,
                block_size=block_size,
                optimizer_index=optimizer_index,
            )
        else:
            task = builtin_task(
                task_name, pretrain_steps=pretrain_steps, progress=progress, new_head=new_head, device=device or AUTO
            )
            if source is not None:
                task.source = source
            task.source_optimizer = optimizer_index
        defaults = task.defaults
        out_dir = out or f"ablation-{task.name}"
        spec = Spec(
            task=task,
            sweep=Sweep(
                lr=[defaults["lr"]],
                warmup=[defaults.get("warmup", 0)],
                grad_clip=[defaults.get("grad_clip", 0.0)],
                batch_size=[defaults["batch_size"]],
                steps=defaults["steps"],
                eval_every=defaults["eval_every"],
            ),
            store=os.path.join(out_dir, "results.sqlite"),
            out=out_dir,
        )
    _override(
        spec,
        strategies=split_list(strategies) if strategies else None,
        seeds=_numbers(seeds, int, "--seeds"),
        lr=_numbers(lrs, float, "--lr"),
        warmup=_numbers(warmups, int, "--warmup"),
        batch_size=_numbers(batch_sizes, int, "--batch-size"),
        steps=steps,
        eval_every=eval_every,
        schedule=schedule,
        grad_clip=_numbers(grad_clips, float, "--grad-clip"),
        beta2=_numbers(beta2s, float, "--beta2"),
        replay=_numbers(replays, float, "--replay"),
    )
    if tune:
        spec.tune = True
        if lrs is None:
            base = list(spec.sweep.lr)[0]
            spec.sweep.lr = [base / 3, base, base * 3]
    for key, value in dict(
        target_loss=target_loss,
        baseline=baseline,
        workers=workers,
        threads=threads,
        device=device,
        executor=executor,
        address=address,
        cache_dir=cache_dir,
        plot_format=plot_format,
    ).items():
        if value is not None:
            setattr(spec, key, value)
    if store is not None:
        spec.store = store
    if out is not None:
        spec.out = out
    if no_plots:
        spec.plots = False
    spec.progress = progress
    if spec.address and spec.executor != "ray":
        raise click.UsageError("--address needs --executor ray")

    try:
        with _keeping_trials(spec.store):
            results = run(spec)
    except KeyboardInterrupt:
        click.echo(
            f"ostate: interrupted; every finished trial is saved in {spec.store} (rerun the same command to continue)",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)

    click.echo(
        f"{spec.task.name}: {results.ran} trials ran, {results.skipped} were already in {results.store}"
        + (f", {results.busy} are being run by another process on it" if results.busy else "")
        + f"; source {results.source}",
        err=True,
    )
    for config, error in results.failed:
        warn(f"trial {config.strategy} seed {config.seed} lr {config.lr:g} failed: {error}")
    if results.summary is not None:
        click.echo(render_summary(results.summary), nl=False)
    if export:
        with _keeping_trials(spec.store), ResultsStore(spec.store) as opened:
            opened.export(export)
        results.files.append(export)
    for path in results.files:
        click.echo(f"wrote {path}", err=True)
    if results.failed:
        raise OstateError(f"{len(results.failed)} trial(s) failed (see the warnings above); rerun to retry them")


@contextlib.contextmanager
def _keeping_trials(store: str | os.PathLike) -> Iterator[None]:
    """A full or unwritable disk (the store's SQLite writes, the tables, the plots, the export) ends in
    one line that says the finished trials are kept, and how to continue."""
    try:
        with refused_writes(store, inside=[os.path.dirname(os.path.abspath(store))]):
            yield
    except WriteRefused as e:
        raise WriteRefused(
            e.path,
            e.what.removeprefix("cannot write: "),
            f"{e.hint}; every finished trial is kept in {os.fspath(store)}: then rerun the same command to "
            "continue (finished trials are skipped)",
        ) from e


def _override(spec: Spec, **values) -> None:
    for key, value in values.items():
        if value is not None:
            setattr(spec.sweep, key, value)
