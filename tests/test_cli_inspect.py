"""`ostate inspect` as a user runs it: formats, views, sorting, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

import ostate
from tests.helpers.common import Net, run_cli, run_cli_process, sha256, train


def test_table_shows_header_and_per_parameter_rows(adamw_checkpoint):
    path, model, opt = adamw_checkpoint
    result = run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "optimizer at 'optimizer': AdamW (detected)" in out
    assert "group 0: 10 params" in out and "lr=0.0005" in out and "initial_lr=0.001" in out
    assert "steps: 3 (same for every parameter)" in out
    assert "state: 10 of 10 parameters" in out
    assert "scheduler: scheduler (last_epoch=3" in out
    assert "training: epoch=1, global_step=3" in out
    for name, _ in model.named_parameters():
        assert name in out
    assert "eff_lr_p50" in out and "model-order" in out


def test_json_has_the_documented_structure_and_exact_effective_lr(adamw_checkpoint):
    path, model, opt = adamw_checkpoint
    result = run_cli("inspect", str(path), "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["path"] == str(path)
    (o,) = data["optimizers"]
    assert o["location"] == "optimizer" and o["kind"] == "adamw"
    assert o["groups"][0]["lr"] == opt.param_groups[0]["lr"]
    assert o["steps"] == {"min": 3.0, "max": 3.0, "distinct": 1, "differ": False}
    rows = {r["name"]: r for r in o["params"]}
    required = {
        "name",
        "name_source",
        "index",
        "group",
        "shape",
        "numel",
        "step",
        "exp_avg_abs_mean",
        "exp_avg_sq_mean",
        "eff_lr_min",
        "eff_lr_p50",
        "eff_lr_max",
    }
    for name, p in model.named_parameters():
        row = rows[name]
        assert required <= row.keys()
        state = opt.state[p]
        group = opt.param_groups[0]
        eta = group["lr"] / (state["exp_avg_sq"].sqrt() / (1 - 0.999**3) ** 0.5 + group["eps"])
        assert row["eff_lr_min"] == pytest.approx(float(eta.min()), rel=1e-6)
        assert row["eff_lr_max"] == pytest.approx(float(eta.max()), rel=1e-6)
        # The median comes from the sketch: within its 2**-8 relative error of an order statistic.
        lower = float(torch.quantile(eta.flatten().double(), 0.5, interpolation="lower"))
        assert row["eff_lr_p50"] == pytest.approx(lower, rel=2**-8)
        assert row["exp_avg_abs_mean"] == pytest.approx(float(state["exp_avg"].abs().mean()), rel=1e-5)
        assert row["exp_avg_sq_mean"] == pytest.approx(float(state["exp_avg_sq"].mean()), rel=1e-5)
        assert row["shape"] == list(p.shape) and row["numel"] == p.numel()


def test_csv_is_one_table_with_every_column(adamw_checkpoint):
    path, model, _ = adamw_checkpoint
    result = run_cli("inspect", str(path), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["name"] for r in rows] == [n for n, _ in model.named_parameters()]
    assert "eff_lr_p99" in rows[0] and rows[0]["shape"] == "8x4"


def test_markdown_renders_a_table(adamw_checkpoint):
    path, _, _ = adamw_checkpoint
    out = run_cli("inspect", str(path), "--format", "markdown").stdout
    assert "## optimizer at 'optimizer'" in out
    assert "| name | name_source | shape |" in out


@pytest.mark.parametrize("by,key", [("group", "group"), ("layer", "layer"), ("model", "params")])
def test_views_aggregate_rows(adamw_checkpoint, by, key):
    path, model, _ = adamw_checkpoint
    data = json.loads(run_cli("inspect", str(path), "--by", by, "--format", "json").stdout)
    rows = data["optimizers"][0]["rows"]
    if by == "layer":
        assert [r["layer"] for r in rows] == ["inp", "norm", "bn", "hidden", "head"]
        assert sum(r["numel"] for r in rows) == sum(p.numel() for p in model.parameters())
    elif by == "group":
        assert len(rows) == 1 and rows[0]["params"] == 10
    else:
        assert rows[0]["params"] == 10


def test_sort_and_top_pick_the_largest_rows(adamw_checkpoint):
    path, model, _ = adamw_checkpoint
    data = json.loads(run_cli("inspect", str(path), "--format", "json", "--sort", "numel", "--top", "2").stdout)
    rows = data["optimizers"][0]["params"]
    assert [r["numel"] for r in rows] == sorted((p.numel() for p in model.parameters()), reverse=True)[:2]
    asc = json.loads(
        run_cli("inspect", str(path), "--format", "json", "--sort", "numel", "--ascending", "--top", "1").stdout
    )
    assert asc["optimizers"][0]["params"][0]["numel"] == 3


def test_columns_option_selects_table_columns(adamw_checkpoint):
    path, _, _ = adamw_checkpoint
    out = run_cli("inspect", str(path), "--columns", "name,eff_lr_p99").stdout
    header = [line for line in out.splitlines() if line.startswith("name")][0]
    assert header.split() == ["name", "eff_lr_p99"]


def test_sgd_table_shows_momentum_statistics(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, steps=2)
    path = tmp_path / "sgd.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    out = run_cli("inspect", str(path)).stdout
    assert "SGD (detected)" in out and "momentum_buffer_abs_mean" in out and "steady_state_lr" in out
    assert "steps: none recorded in the state" in out


def one_error_line(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ostate: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_path_is_one_line_and_exit_2(tmp_path):
    one_error_line(run_cli("inspect", str(tmp_path / "missing.pt")), "no such file")


def test_the_installed_command_runs_in_its_own_process(adamw_checkpoint, tmp_path):
    path, _, _ = adamw_checkpoint
    ok = run_cli_process("inspect", str(path), "--by", "layer")
    assert ok.returncode == 0 and "hidden" in ok.stdout
    one_error_line(run_cli_process("inspect", str(tmp_path / "missing.pt")), "no such file")


def test_directory_without_checkpoint_lists_what_it_found(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    one_error_line(run_cli("inspect", str(tmp_path)), "no checkpoint layout recognised", "readme.txt")


def test_truncated_and_empty_files(tmp_path, adamw_checkpoint):
    path, _, _ = adamw_checkpoint
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:500])
    one_error_line(run_cli("inspect", str(cut)), "the zip archive ends early", "copy or save it again")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    one_error_line(run_cli("inspect", str(empty)), "file is empty")


def test_file_without_optimizer_state_names_its_keys(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"model": Net().state_dict(), "epoch": 1}, path)
    one_error_line(run_cli("inspect", str(path)), "no optimizer state found", "top-level keys: model, epoch")


def test_unknown_sort_column_and_optimizer_index(adamw_checkpoint):
    path, _, _ = adamw_checkpoint
    one_error_line(run_cli("inspect", str(path), "--sort", "nope"), "no column 'nope'")
    one_error_line(run_cli("inspect", str(path), "--optimizer-index", "3"), "no optimizer with index 3", "0: optimizer")


def test_hostile_pickle_is_refused_by_the_cli_and_debug_shows_a_traceback(tmp_path):
    import argparse

    path = tmp_path / "args.pt"
    torch.save(
        {
            "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1).state_dict(),
            "args": argparse.Namespace(a=1),
        },
        path,
    )
    one_error_line(run_cli("inspect", str(path)), "argparse.Namespace", "--trust-pickle")
    debug = run_cli_process("inspect", str(path), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    trusted = run_cli("inspect", str(path), "--trust-pickle")
    assert trusted.returncode == 0 and "warning" in trusted.stderr and "trust-pickle" in trusted.stderr


def test_inspect_never_changes_its_input(adamw_checkpoint):
    path, _, _ = adamw_checkpoint
    before = sha256(path)
    for fmt in ("table", "json", "csv", "markdown"):
        assert run_cli("inspect", str(path), "--format", fmt).returncode == 0
    assert sha256(path) == before


def test_unknown_layout_suggests_the_optimizer_option(tmp_path):
    sd = {"state": {0: {"weird": torch.ones(2)}}, "param_groups": [{"params": [0], "lr": 0.1}]}
    path = tmp_path / "odd.pt"
    torch.save(sd, path)
    result = run_cli("inspect", str(path))
    assert result.returncode == 0
    assert "unrecognised optimizer state (state keys: weird)" in result.stdout
    assert "--optimizer KIND" in result.stdout
    assert "weird_mean" in result.stdout


def test_a_checkpoint_at_lr_0_shows_its_preconditioner_instead_of_zeros_only(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.Linear(40, 2))  # a large and a tiny parameter
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(8, 30)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    opt.param_groups[0]["lr"] = 0.0  # the end of a schedule
    path = tmp_path / "end.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    table = ostate.analyze(ostate.load(path)).set_index("name")
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    for name, p in model.named_parameters():
        state = opt.state[p]
        v_hat = state["exp_avg_sq"].double() / (1 - beta2 ** float(state["step"]))
        expected = 1.0 / (v_hat.sqrt() + eps)
        assert table.loc[name, "eff_lr_max"] == 0.0
        assert table.loc[name, "precond_max"] == pytest.approx(expected.max().item(), rel=1e-5)
        assert table.loc[name, "precond_p50"] == pytest.approx(expected.median().item(), rel=0.02)
    result = run_cli("inspect", str(path))
    assert "precond_p50" in result.stdout.splitlines()[-6]
    # With a non-zero lr there is no such column: eff_lr says it.
    opt.param_groups[0]["lr"] = 1e-3
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    assert "precond_p50" not in ostate.analyze(ostate.load(path)).columns
