"""`ostate inspect` on every family's real checkpoint: it runs, and shows the family's own columns."""

from __future__ import annotations

import json

import pytest

import ostate
from ostate.optimizers import get_family
from ostate.report import inspect
from tests.helpers.common import run_cli
from tests.helpers.families import FAMILIES, save, trained

pytest.importorskip("transformers")
pytest.importorskip("lion_pytorch")
pytest.importorskip("schedulefree")
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved checkpoint per family (trained once for the whole module)."""
    root = tmp_path_factory.mktemp("families")
    paths = {}
    for name in FAMILIES:
        model, opt = trained(name)
        paths[name] = root / f"{name}.pt"
        save(paths[name], model, opt)
    return paths


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_display_column_of_the_family_is_in_the_table(checkpoints, name):
    checkpoint = ostate.load(checkpoints[name])
    report = inspect(checkpoint)
    (o,) = report.optimizers
    family = get_family(o.description["kind"])
    missing = [c for c in family.display if c not in o.table.columns]
    assert not missing, f"{family.name}: display columns missing from the table: {missing}"
    assert [c for c in o.columns if c in family.display] == list(family.display)
    # Every other view works too.
    for by in ("group", "layer", "model"):
        assert not inspect(checkpoint, by=by).optimizers[0].table.empty


FAMILY_COLUMNS = {
    "RAdam": ("rectified", "rect_factor"),
    "Adagrad": ("decayed_lr",),
    "SGD": ("momentum_buffer_abs_mean", "steady_state_lr"),
    "NAdam": ("mu_next", "momentum_coef"),
    "Adafactor": ("factored", "variance_mean", "rho_next"),
    "transformers.Adafactor": ("factored", "exp_avg_sq_mean", "next_lr"),
    "bitsandbytes.AdamW8bit": ("state_bits", "blocksize", "state2_zero_fraction", "exp_avg_sq_mean"),
    "LBFGS": ("n_iter", "func_evals", "history", "H_diag"),
    "schedulefree.AdamWScheduleFree": ("k", "train_mode", "scheduled_lr"),
    "schedulefree.SGDScheduleFree": ("k", "train_mode", "scheduled_lr", "averaging_weight"),
    "schedulefree.RAdamScheduleFree": ("k", "rectified", "scheduled_lr", "eff_lr_p50"),
    "Muon": ("adjusted_lr",),
    "ASGD": ("eta", "averaging"),
}


@pytest.mark.parametrize("name", sorted(FAMILY_COLUMNS))
def test_text_table_shows_the_family_columns(checkpoints, name):
    result = run_cli("inspect", str(checkpoints[name]))
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("name "))
    for column in FAMILY_COLUMNS[name]:
        assert column in header.split(), f"{column} not in: {header}"
    assert get_family(FAMILIES[name][0]).label in result.stdout


def test_radam_table_says_whether_rectification_is_on(checkpoints):
    result = run_cli("inspect", str(checkpoints["RAdam"]), "--format", "json")
    rows = json.loads(result.stdout)["optimizers"][0]["params"]
    # 3 steps with beta2 = 0.999: the next step (4) is not rectified yet.
    assert {r["rectified"] for r in rows} == {False}
    assert all(r["rect_factor"] is None for r in rows)


def test_lbfgs_summary_sits_on_the_first_parameter_and_notes_what_cannot_be_computed(checkpoints):
    result = run_cli("inspect", str(checkpoints["LBFGS"]), "--format", "json")
    data = json.loads(result.stdout)["optimizers"][0]
    rows = data["params"]
    assert rows[0]["n_iter"] >= 1 and rows[0]["history"] >= 1
    assert all(r.get("n_iter") is None for r in rows[1:])
    assert any("summary only" in note for note in data["notes"])


def test_the_output_says_which_lr_the_numbers_use(checkpoints):
    out = run_cli("inspect", str(checkpoints["Rprop"])).stdout
    assert "saved lr" in out or "group's saved lr" in out
    assert "initial step size" in out  # Rprop's note: its lr is only the initial step size


def test_optimizer_option_is_offered_for_every_family():
    result = run_cli("inspect", "--help")
    for kind in (
        "radam",
        "nadam",
        "bnb_adam",
        "hf_adafactor",
        "schedulefree_adamw",
        "schedulefree_sgd",
        "schedulefree_radam",
        "lbfgs",
    ):
        assert kind in result.stdout


def test_every_family_is_documented_with_its_kind_name():
    from ostate.optimizers import families
    from tests.helpers.common import REPO

    optimizers_page = (REPO / "docs" / "optimizers.md").read_text()
    cli_page = (REPO / "docs" / "cli.md").read_text()
    for name in families():
        if name != "unknown":
            assert f"`{name}`" in optimizers_page, f"{name} missing from docs/optimizers.md"
        assert f"`{name}`" in cli_page, f"{name} missing from the --optimizer list in docs/cli.md"
