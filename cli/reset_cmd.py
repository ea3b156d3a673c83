"""``ostate reset``: write a checkpoint again with a strategy applied to its optimizer state."""

from __future__ import annotations

import click

from ostate.optimizers import families
from ostate.reset.strategies import STRATEGIES
from ostate.reset.write import SCHEDULER_CHOICES, lr_lines
from ostate.reset.write import reset as reset_checkpoint
from ostate_cli.common import base_config_option, format_hint_option, handle_errors, trust_pickle_option


@click.command()
@click.argument("path", type=click.Path(readable=False, dir_okay=True, path_type=str))
@click.option(
    "--strategy",
    "strategy",
    required=True,
    metavar="STRATEGY",
    help=f"What to do with the optimizer state: {', '.join(STRATEGIES)}; NAME:REGEX restricts it to "
    "the parameters whose names match (see docs/strategies.md).",
)
@click.option(
    "--params",
    metavar="REGEX",
    help="Apply the strategy only to the parameters whose names match REGEX (re.search); the others are "
    "reloaded (for --strategy reload: started fresh).",
)
@click.option(
    "-o",
    "--out",
    "out",
    required=True,
    type=click.Path(readable=False, dir_okay=True, path_type=str),
    help="Where to write the result: a file for a file, a directory for a checkpoint directory.",
)
@click.option(
    "--optimizer-index",
    type=click.IntRange(min=0),
    metavar="K",
    help="Only the K-th optimizer (0-based) of a checkpoint that holds several (default: all).",
)
@click.option(
    "--optimizer",
    "kind",
    type=click.Choice(sorted(families())),
    metavar="KIND",
    help="Treat the state as this optimizer family instead of detecting it.",
)
@click.option(
    "--lr",
    type=float,
    metavar="LR",
    help="Write LR as every param group's lr (and initial_lr, where the groups have one): the lr of the "
    "resumed run's first step, since load_state_dict (DeepSpeed: load_checkpoint) restores the saved one "
    "over the new optimizer's. "
    "Default: keep the saved lr (the source run's last).",
)
@click.option(
    "--initial-lr",
    type=float,
    metavar="LR",
    help="Write LR as every param group's initial_lr, the base a LambdaLR built after loading takes "
    "(default: --lr where given, else as saved).",
)
@click.option(
    "--scheduler",
    type=click.Choice(SCHEDULER_CHOICES),
    default="keep",
    show_default=True,
    help="Keep the saved scheduler state, or drop it so that the resumed run's own scheduler starts afresh "
    "(torch.save files, Lightning's lr_schedulers; a Trainer, accelerate or DeepSpeed folder needs its "
    "scheduler state).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never PATH).")
@trust_pickle_option
@format_hint_option
@base_config_option
@handle_errors
def reset(
    path,
    strategy,
    params,
    out,
    optimizer_index,
    kind,
    lr,
    initial_lr,
    scheduler,
    overwrite,
    trust_pickle,
    format_hint,
    base_config,
):
    """Write checkpoint PATH to OUT with STRATEGY applied to its optimizer state.

    Everything else is kept as it was: the other entries of a torch.save or Lightning
    file, the other files of a Hugging Face Trainer, accelerate or DeepSpeed folder, the
    model entries of a torch.distributed.checkpoint folder. OUT has PATH's format and is
    written atomically; PATH is never written to.

    \b
    ostate reset ckpt.pt --strategy reset-v -o ckpt-reset-v.pt
    ostate reset out/checkpoint-500 --strategy fresh --params '^lm_head\\.' -o out/checkpoint-500-head
    ostate reset last.ckpt --strategy reset-m --lr 1e-4 --scheduler drop -o start.ckpt
    ostate reset last.ckpt --strategy reset-m --lr 1e-4 --scheduler drop -o finetune-start.ckpt
    """
    result = reset_checkpoint(
        path,
        out,
        strategy,
        params=params,
        optimizer_index=optimizer_index,
        optimizer=kind,
        trust_pickle=trust_pickle,
        format_hint=format_hint,
        base_config=base_config,
        overwrite=overwrite,
        lr=lr,
        initial_lr=initial_lr,
        scheduler=scheduler,
    )
    click.echo(f"wrote {result.out} ({result.format}) with strategy {result.strategy}", err=True)
    for o in result.optimizers:
        counts = ", ".join(
            f"{'no state' if action == 'none' else action} {n}" for action, n in sorted(o.counts().items())
        )
        click.echo(f"  optimizer at '{o.location}' ({o.kind}): {counts} (parameters)", err=True)
        ages = [a for a in o.v_ages if a is not None]
        if ages:
            click.echo(
                f"  age of v recorded per param group (ostate_v_age): "
                f"{', '.join('-' if a is None else f'{a:g}' for a in o.v_ages)}",
                err=True,
            )
    for line in lr_lines(result):
        click.echo(f"  {line}", err=True)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
