"""`ostate ablate` as a user runs it: a built-in task, one's own task from a TOML spec, and bad input."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from tests.helpers.common import REPO, run_cli


@pytest.mark.slow
def test_ablate_a_builtin_task_prints_the_summary_writes_plots_and_resumes(tmp_path):
    args = [
        "ablate",
        "--task",
        "code-to-prose",
        "--strategies",
        "reload,keep-v,reload:^(?!head\\.)",
        "--seeds",
        "0,1",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--batch-size",
        "4",
        "--pretrain-steps",
        "3",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "1",
        "--export",
        str(tmp_path / "all.csv"),
    ]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("lr=0.001, warmup=0, batch_size=4, schedule=cosine, steps=2; target loss")
    assert [line.split()[0] for line in lines[3:6]] == ["reload", "keep-v", "reload:^(?!head\\.)"]
    assert "6 trials ran, 0 were already" in first.stderr
    # stderr is not a terminal here: plain progress lines instead of a bar
    assert "code-to-prose trials: 0/6 trials (0%)" in first.stderr and "6/6 trials (100%)" in first.stderr
    assert "verdict:" in first.stdout and "warnings:" in first.stdout  # two seeds: too few
    for name in (
        "eval_loss.png",
        "final_loss.png",
        "update_rms.png",
        "pareto.png",
        "strategies.csv",
        "paired.csv",
        "results.sqlite",
    ):
        assert (tmp_path / "out" / name).stat().st_size > 0
    exported = pd.read_csv(tmp_path / "all.csv")
    assert set(exported["strategy"]) == {"reload", "keep-v", "reload:^(?!head\\.)"}
    assert {"info", "status", "source_loss"} <= set(exported.columns) | set(exported["metric"])
    again = run_cli(*args)
    assert again.returncode == 0 and "0 trials ran, 6 were already" in again.stderr
    assert again.stdout == first.stdout


def test_ablate_ones_own_task_from_the_example_spec(tmp_path):
    shutil.copytree(REPO / "examples" / "ablation", tmp_path / "ablation-example")
    spec = tmp_path / "ablation-example" / "spec.toml"
    result = run_cli(
        "ablate",
        str(spec),
        "--strategies",
        "reload,fresh,reset-v",
        "--seeds",
        "0,1",
        "--steps",
        "3",
        "--eval-every",
        "3",
        "--workers",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-plots",
    )
    assert result.returncode == 0, result.stderr
    assert "linear-maps: 6 trials ran" in result.stderr
    out = tmp_path / "ablation-example" / "ablation"
    table = pd.read_csv(out / "strategies.csv")
    assert list(table["strategy"]) == ["reload", "fresh", "reset-v"] and (table["n"] == 2).all()
    assert not (out / "eval_loss.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["ablate"], "give SPEC.toml, --task NAME, or --source HF_FOLDER --train FILE --eval FILE"),
        (["ablate", "--task", "sans-to-serif", "--source-eval", "x.txt"], "--source-eval and --block-size go with"),
        (["ablate", "--train", "t.txt", "--eval", "e.txt"], "needs --source, --train and --eval"),
        (["ablate", "--task", "code-to-prose", "--new-head"], "task 'code-to-prose' has no new-head variant"),
        (["ablate", "--task", "sans-to-serif", "--strategies", "reload,reset"], "unknown strategy 'reset'"),
        (["ablate", "--task", "sans-to-serif", "--seeds", "a,b"], "expected comma-separated int values"),
        (["ablate", "--task", "sans-to-serif", "--address", "auto"], "--address needs --executor ray"),
    ],
)
def test_bad_ablate_input_is_one_clear_line(args, message, tmp_path):
    result = run_cli(*args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_spec_with_an_unknown_key_names_the_known_ones(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('[task]\nbuiltin = "sans-to-serif"\n[sweep]\nstrategy = ["reload"]\n')
    result = run_cli("ablate", str(spec))
    assert result.returncode == 2
    assert "unknown key(s) in [sweep]: strategy" in result.stderr and "strategies" in result.stderr


def test_a_spec_whose_module_does_not_import_says_where_to_put_it(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        '[task]\nname = "x"\nmodel = "no_such_module_xyz:m"\ntrain_batches = "a:b"\nloss = "a:b"\n'
        'evaluate = "a:b"\nsource = "s.pt"\n'
    )
    result = run_cli("ablate", str(spec))
    assert result.returncode == 2 and "cannot import 'no_such_module_xyz'" in result.stderr


@pytest.mark.slow
def test_ablate_tune_with_knobs_selects_each_strategys_lr(tmp_path):
    result = run_cli(
        "ablate",
        "--task",
        "code-to-prose",
        "--strategies",
        "reload,reset-v-ac",
        "--seeds",
        "0",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--batch-size",
        "4",
        "--pretrain-steps",
        "3",
        "--tune",
        "--schedule",
        "wsd",
        "--grad-clip",
        "1.0",
        "--beta2",
        "0.95",
        "--replay",
        "0.5",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "1",
        "--no-plots",
    )
    assert result.returncode == 0, result.stderr
    assert "6 trials ran" in result.stderr  # 2 strategies x 3 learning rates
    table = pd.read_csv(tmp_path / "out" / "strategies.csv")
    assert list(table["strategy"]) == ["reload", "reset-v-ac"] and set(table["lr"]) <= {1e-3 / 3, 1e-3, 3e-3}
    assert (table[["grad_clip", "beta2", "replay"]].iloc[0] == [1.0, 0.95, 0.5]).all()
    assert "lr and warmup: each strategy's best on the validation split" in result.stdout
