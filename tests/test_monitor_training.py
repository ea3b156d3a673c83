"""The monitor inside real trainings: transformers' Trainer, Lightning's Trainer, and two gloo ranks on CPU
(DDP, torch's ZeroRedundancyOptimizer, FSDP2)."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest
import torch

import ostate
from ostate.monitor import read_log

QUANTILES = ["eff_lr_p5", "eff_lr_p50", "eff_lr_p95", "exp_avg_sq_p50", "update_p50"]


@pytest.mark.slow
def test_hugging_face_trainer_callback_logs_every_n_steps_what_inspect_shows(tmp_path):
    pytest.importorskip("transformers")
    from ostate.integrations.transformers import MonitorCallback
    from tests.helpers.builders import tiny_gpt2, train_with_trainer

    callback = MonitorCallback(every=2, by="layer")
    run = train_with_trainer(tmp_path, tiny_gpt2(), steps=4, save_steps=4, callbacks=[callback])
    log = read_log(tmp_path / "ostate_monitor.csv")
    assert sorted(log["step"].unique()) == [2, 4]
    # The checkpoint written at step 4 holds the state the monitor read at step 4.
    expected = ostate.analyze(ostate.load(run.checkpoint), by="layer").set_index("layer")
    last = log[log["step"] == 4].set_index("key")
    assert sorted(last.index) == sorted(expected.index)
    for column in QUANTILES + ["numel", "step_max"]:
        assert last.loc[expected.index, column].tolist() == pytest.approx(expected[column].tolist(), rel=1e-12)
    assert callback.monitor is not None and callback.monitor.last is not None
    assert "transformer.h.0.attn.c_attn" in set(callback.monitor.last.table["layer"])


@pytest.mark.slow
def test_lightning_trainer_callback_logs_every_n_optimizer_steps(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from ostate.integrations.lightning import MonitorCallback
    from tests.test_lightning import Module

    torch.manual_seed(0)
    callback = MonitorCallback(every=2, by="param")
    trainer = L.Trainer(
        max_steps=6,
        accumulate_grad_batches=2,  # two batches per optimizer step: still one record per step
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    module = Module()
    data = torch.utils.data.TensorDataset(torch.randn(256, 4))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    log = read_log(tmp_path / "ostate_monitor.csv")
    assert sorted(log["step"].unique()) == [2, 4, 6]
    assert log.groupby("step").size().tolist() == [len(list(module.net.parameters()))] * 3
    optimizer = trainer.optimizers[0]
    expected = ostate.analyze(ostate.from_state_dict(optimizer.state_dict(), model=module), by="param")
    last = log[log["step"] == 6].set_index("key")
    expected = expected.set_index("name")
    assert sorted(last.index) == sorted(expected.index)
    for column in QUANTILES + ["update_to_weight_rms"]:
        assert last.loc[expected.index, column].tolist() == pytest.approx(expected[column].tolist(), rel=1e-12)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from tests.helpers import monitor_ranks

    directory = tmp_path_factory.mktemp("ranks")
    monitor_ranks.run(str(directory))
    return [pickle.loads((directory / f"rank{r}.pkl").read_bytes()) for r in (0, 1)], directory


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["ddp", "zero", "fsdp2"])
def test_two_gloo_ranks_log_the_whole_models_state_once(two_ranks, scenario):
    (rank0, rank1), directory = two_ranks
    assert rank1[scenario]["records"] == [None, None, None]  # rank 1 summarises its share, rank 0 logs
    table = rank0[scenario]["records"][-1]
    oracle = rank0[scenario]["oracle"]
    assert list(table["name"]) == list(oracle["name"])  # every parameter once, in the model's order
    assert list(table["numel"]) == list(oracle["numel"])
    assert [tuple(s) for s in table["shape"]] == [tuple(s) for s in oracle["shape"]]
    for column in QUANTILES + ["eff_lr_min", "eff_lr_max", "second_moment_zero_frac", "eps_dominated_frac"]:
        assert table[column].tolist() == oracle[column].tolist(), column  # quantiles of merged sketches: exact
    for column in ("eff_lr_mean", "exp_avg_sq_rms", "update_rms", "update_to_weight_rms"):
        assert table[column].tolist() == pytest.approx(oracle[column].tolist(), rel=1e-9), column  # sums' order
    logged = read_log(directory / f"{scenario}.csv")
    assert sorted(logged["step"].unique()) == [1, 2, 3]
    assert logged.groupby("step").size().tolist() == [len(table)] * 3  # once, not once per rank
    pd.testing.assert_series_equal(
        logged[logged["step"] == 3].set_index("key").loc[table["name"], "eff_lr_p50"],
        table.set_index("name")["eff_lr_p50"].rename_axis("key"),
        check_names=False,
    )
