"""``ostate plot``: figures from the command line, overlays, and one-line errors for bad input."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.common import Net, run_cli, run_cli_process, sha256, train

MAGIC = {"png": b"\x89PNG", "svg": b"<svg", "pdf": b"%PDF"}


@pytest.mark.parametrize(("kind", "fmt"), [("lr-histogram", "png"), ("layer-profile", "svg"), ("moments", "pdf")])
def test_each_kind_is_written_in_the_format_of_the_extension(kind, fmt, demo_run, tmp_path):
    out = tmp_path / f"figure.{fmt}"
    before = sha256(demo_run[0])
    result = run_cli("plot", demo_run[0], "-o", str(out), "--kind", kind)
    assert result.returncode == 0, result.stderr
    assert MAGIC[fmt] in out.read_bytes()[:4096]
    assert f"wrote {out}: {kind} of 1 checkpoint" in result.stderr
    assert sha256(demo_run[0]) == before  # the input is untouched


def test_several_checkpoints_go_into_one_figure_and_an_old_figure_is_replaced(demo_run, tmp_path):
    out = tmp_path / "lr.png"
    out.write_bytes(b"an earlier figure")
    result = run_cli("plot", *demo_run, "-o", str(out), "--by", "group", "--dpi", "60")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "lr-histogram of 2 checkpoints" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["lr.png"]  # no temporary file left behind


def test_moments_of_sgd_state_is_one_line_saying_what_to_do(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "sgd.pt")
    result = run_cli("plot", str(tmp_path / "sgd.pt"), "-o", str(tmp_path / "m.png"), "--kind", "moments")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ostate: error:" in lines[0] and "--kind lr-histogram" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "{tmp}/lr.jpg"], "unsupported figure format"),
        (["-o", "{tmp}/lr.png", "--kind", "layer-profile", "--by", "model"], "cannot be split --by model"),
        (["-o", "{tmp}/missing/lr.png"], "the output's directory does not exist"),
        (["-o", "{tmp}/lr.png", "--optimizer-index", "3"], "no optimizer with index 3"),
    ],
)
def test_bad_options_fail_with_one_line_and_exit_2(args, message, demo_run, tmp_path):
    result = run_cli("plot", demo_run[0], *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_a_trainer_checkpoint_directory_plots_layers_in_model_order(gpt2_run, tmp_path):
    from ostate.figures import plot_layer_profile

    result = run_cli("plot", str(gpt2_run.checkpoint), "-o", str(tmp_path / "profile.png"), "--kind", "layer-profile")
    assert result.returncode == 0, result.stderr
    fig = plot_layer_profile(str(gpt2_run.checkpoint), by="layer")
    layers = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    # The model's order: embeddings, then block 0 before block 1, then the final norm.
    assert (
        layers.index("transformer.wte")
        < layers.index("transformer.h.0.attn.c_attn")
        < layers.index("transformer.h.1.attn.c_attn")
        < layers.index("transformer.ln_f")
    )


def test_a_figure_is_never_written_into_an_input_directory(gpt2_run, tmp_path):
    checkpoint = gpt2_run.checkpoint
    inside = checkpoint / "lr.png"
    result = run_cli("plot", str(checkpoint), "-o", str(inside))
    assert result.returncode == 2
    assert "never writes to its inputs" in result.stderr
    assert not inside.exists()


def test_plot_requires_an_output(demo_run):
    result = run_cli("plot", demo_run[0])
    assert result.returncode == 2 and "-o" in result.stderr


@pytest.mark.slow
def test_end_to_end_in_a_fresh_process_without_a_display(demo_run, tmp_path):
    env = {"DISPLAY": "", "MPLBACKEND": ""}
    result = run_cli_process("plot", *demo_run, "-o", str(tmp_path / "moments.png"), "--kind", "moments", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "moments.png").read_bytes()[:4] == b"\x89PNG"
