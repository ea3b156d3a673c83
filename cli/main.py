"""The ``ostate`` command group. Each command lives in its own module and is added here."""

from __future__ import annotations

import click

import ostate
from ostate_cli.ablate_cmd import ablate
from ostate_cli.compare_cmd import compare
from ostate_cli.convert_cmd import convert
from ostate_cli.demo_cmd import demo
from ostate_cli.doctor_cmd import doctor
from ostate_cli.inspect_cmd import inspect
from ostate_cli.plot_cmd import plot
from ostate_cli.reset_cmd import reset


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(ostate.__version__, prog_name="ostate")
def main() -> None:
    """What is in your optimizer state, and should you keep it when you fine-tune?

    Run `ostate demo` to make a small checkpoint and inspect it, or
    `ostate inspect PATH` on your own (a file or a checkpoint directory);
    `ostate plot PATH -o OUT.png` draws it (effective-lr histograms, layer
    profiles, moments); `ostate convert IN OUT` writes its optimizer state as
    safetensors or .pt; `ostate compare A B` shows how the state moved between
    checkpoints; `ostate doctor PATH` lists what is wrong with it (exit code for
    CI); `ostate reset PATH --strategy S -o OUT` writes it with a strategy
    applied; `ostate ablate` measures which handling of the optimizer state works best
    for fine-tuning.
    """


main.add_command(inspect)
main.add_command(demo)
main.add_command(convert)
main.add_command(ablate)
main.add_command(plot)
main.add_command(reset)
main.add_command(doctor)
main.add_command(compare)

if __name__ == "__main__":
    main()
