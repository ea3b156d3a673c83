"""``ostate inspect``: the header and per-parameter (or group, layer, model) table of a checkpoint."""

from __future__ import annotations

import click

import ostate
from ostate.analysis import VIEWS, HeadLayout
from ostate.optimizers import families
from ostate.render import FORMATS
from ostate.report import inspect as build_report
from ostate.report import render
from ostate_cli.common import (
    base_config_option,
    executor_options,
    format_hint_option,
    handle_errors,
    progress_enabled,
    ray_executor,
    trust_pickle_option,
    warn,
    workers_option,
)


@click.command()
@click.argument("path", type=click.Path(readable=False, dir_okay=True, path_type=str))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True, help="Output format.")
@click.option(
    "--by",
    type=click.Choice(VIEWS),
    default="param",
    show_default=True,
    help="One row per parameter, param group, layer (module prefix of the name), parameter kind "
    "(embedding, weight, norm, bias, other) or the whole model.",
)
@click.option("--sort", metavar="COLUMN", help="Order rows by this column, largest first.")
@click.option("--ascending", is_flag=True, help="With --sort: smallest first.")
@click.option("--top", type=click.IntRange(min=1), metavar="N", help="Show only the first N rows.")
@click.option(
    "--optimizer-index",
    type=click.IntRange(min=0),
    metavar="K",
    help="Only the K-th optimizer (0-based) when the file holds several.",
)
@click.option(
    "--optimizer",
    "kind",
    type=click.Choice(sorted(families())),
    metavar="KIND",
    help=f"Treat the state as this optimizer family instead of detecting it: {', '.join(sorted(families()))}.",
)
@click.option(
    "--columns",
    metavar="A,B,...",
    help="Columns for table/markdown output ('all' for every column, computing every statistic).",
)
@click.option(
    "--compressibility",
    is_flag=True,
    help="Also compute Adam-mini compressibility (vmean_*_relchange) and the 8-bit error (*_q8_relerr): "
    "about as costly as the default statistics together; --columns naming one of them does it too.",
)
@workers_option
@executor_options
@click.option(
    "--heads",
    type=click.IntRange(min=1),
    metavar="N",
    help="Attention heads per layer, for vmean_head_relchange (head size = in_features / N); "
    "default: from the model config in or beside the checkpoint.",
)
@click.option(
    "--head-dim",
    type=click.IntRange(min=1),
    metavar="D",
    help="Rows per attention head in q/k/v projection weights (overrides --heads and the config).",
)
@trust_pickle_option
@format_hint_option
@base_config_option
@handle_errors
def inspect(
    path,
    fmt,
    by,
    sort,
    ascending,
    top,
    optimizer_index,
    kind,
    columns,
    compressibility,
    workers,
    executor,
    address,
    heads,
    head_dim,
    trust_pickle,
    format_hint,
    base_config,
):
    """Show the optimizer state in the checkpoint at PATH.

    PATH is a file or a directory: a torch.save file (.pt, .pth, .bin, .ckpt; Lightning
    too), a Hugging Face Trainer checkpoint-N/ directory, an accelerate save_state
    directory, a torch.distributed.checkpoint directory (torchtitan too), a DeepSpeed
    checkpoint folder (the save folder, or one tag folder inside it), or optimizer
    state in .safetensors. The layout is recognised from the contents.
    """
    # --executor and --address are checked before any reading
    on_ray = ray_executor(
        executor, address, trust_pickle=trust_pickle, optimizer=kind, format_hint=format_hint, base_config=base_config
    )
    checkpoint = ostate.load(
        path, trust_pickle=trust_pickle, optimizer=kind, format_hint=format_hint, base_config=base_config
    )
    report = build_report(
        checkpoint,
        by=by,
        sort=sort,
        ascending=ascending,
        top=top,
        optimizer_index=optimizer_index,
        columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None,
        progress=progress_enabled(),
        workers=workers,
        compressibility=compressibility,
        executor=on_ray,
        heads=HeadLayout(head_dim=head_dim, source="--head-dim")
        if head_dim
        else (HeadLayout(num_heads=heads, source="--heads") if heads else None),
    )
    if fmt in ("csv", "json"):  # machine formats: warnings go to stderr as well
        for w in report.warnings + [w for o in report.optimizers for w in o.description["warnings"]]:
            warn(w)
    click.echo(render(report, fmt), nl=False)
