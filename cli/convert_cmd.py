"""``ostate convert``: write one optimizer's state as safetensors or as a plain torch state dict."""

from __future__ import annotations

import click

import ostate
from ostate_cli.common import format_hint_option, handle_errors, progress_enabled, trust_pickle_option


@click.command()
@click.argument("source", metavar="IN", type=click.Path(readable=False, dir_okay=True, path_type=str))
@click.argument("out", metavar="OUT", type=click.Path(readable=False, dir_okay=False, path_type=str))
@click.option(
    "--optimizer-index",
    type=click.IntRange(min=0),
    metavar="K",
    help="Which optimizer (0-based) when IN holds several.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never IN).")
@trust_pickle_option
@format_hint_option
@handle_errors
def convert(source, out, optimizer_index, overwrite, trust_pickle, format_hint):
    """Write the optimizer state of checkpoint IN to OUT.

    IN is anything `ostate inspect` reads. OUT ending in .safetensors gets optimizer
    state in safetensors (tensors `state.<name>.<key>`, param groups as JSON
    metadata; see docs/formats.md); OUT ending in .pt a plain torch optimizer state
    dict that `Optimizer.load_state_dict` accepts. OUT is written atomically.
    """
    written = ostate.convert(
        source,
        out,
        optimizer_index=optimizer_index,
        trust_pickle=trust_pickle,
        format_hint=format_hint,
        overwrite=overwrite,
        progress=progress_enabled(),
    )
    with_state = sum(1 for p in written.params if p.has_state)
    click.echo(
        f"wrote {out}: {written.kind} state of {with_state} of {len(written.params)} parameters "
        f"from '{written.location}'",
        err=True,
    )
