"""ostate.Monitor on a plain training loop: inspect's rows, unchanged training, its writers, checks and timeline."""

from __future__ import annotations

import gc
import math
import os
import struct
import time
import warnings

import pandas as pd
import pytest
import torch

import ostate
from ostate.errors import OstateError
from ostate.monitor import CSVWriter, Monitor, MonitorWarning, TensorBoardWriter, WandbWriter, read_log
from tests.helpers.common import Net, run_cli

FAMILIES = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
}


def _step(model, optimizer, x):
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


class Plain(torch.nn.Module):
    """Three linear layers: nothing for the checks to find while it trains (Net's LayerNorm feeds a BatchNorm,
    which leaves the LayerNorm's bias almost no gradient: eps dominates it)."""

    def __init__(self):
        super().__init__()
        self.inp, self.hidden, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(torch.relu(self.inp(x)))))


def _trained(family="adamw", steps=3, model_class=Net):
    torch.manual_seed(0)
    model = model_class()
    optimizer = FAMILIES[family](model.parameters())
    for _ in range(steps):
        _step(model, optimizer, torch.randn(16, 4))
    return model, optimizer


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("by", ["param", "layer", "kind"])
def test_rows_are_inspects_rows_of_the_same_state(family, by, tmp_path):
    model, optimizer = _trained(family)
    record = Monitor(optimizer, model, by=by, writer=tmp_path / "log.csv").summarize(3)
    expected = ostate.analyze(ostate.from_state_dict(optimizer.state_dict(), model=model), by=by)
    assert record is not None and record.view == by
    got = record.table.drop(columns="optimizer")
    pd.testing.assert_frame_equal(got, expected.drop(columns="optimizer"))
    assert "update_to_weight_rms" in got or "update_rms" not in got  # the weights are read where they are


def test_the_state_is_read_where_it_is_and_names_come_from_the_model():
    from ostate.monitor.live import live_checkpoint, parameter_names

    model, optimizer = _trained()
    o = live_checkpoint(optimizer, parameter_names(model)).optimizers[0]
    assert [p.name for p in o.params] == [n for n, _ in model.named_parameters()]
    assert o.params[0].state["exp_avg"].read() is optimizer.state[model.inp.weight]["exp_avg"]  # no copy
    unnamed = live_checkpoint(optimizer, {}).optimizers[0]
    assert [p.name for p in unnamed.params][:2] == ["param.0", "param.1"]


def _run(monitored: bool, tmp_path, steps=12):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    monitor = Monitor(optimizer, model, every=1, checks=True, writer=tmp_path / "log.csv") if monitored else None
    for _ in range(steps):
        _step(model, optimizer, torch.randn(16, 4))  # the global generator: a monitor that drew from it shows
        if monitor is not None:
            monitor.step()
    if monitor is not None:
        monitor.close()
    return model, optimizer


def test_training_is_bit_identical_with_the_monitor_and_the_process_is_untouched(tmp_path):
    process = (torch.get_num_threads(), torch.get_num_interop_threads(), gc.isenabled(), gc.get_threshold())
    environment = dict(os.environ)
    plain_model, plain_opt = _run(False, tmp_path)
    with warnings.catch_warnings():  # Net's LayerNorm feeds a BatchNorm: eps dominates its bias (checks=True)
        warnings.simplefilter("ignore", MonitorWarning)
        model, opt = _run(True, tmp_path)
    for a, b in zip(plain_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(plain_model.parameters(), model.parameters()):
        for key in plain_opt.state[p]:
            assert torch.equal(plain_opt.state[p][key], opt.state[q][key])
    assert (torch.get_num_threads(), torch.get_num_interop_threads(), gc.isenabled(), gc.get_threshold()) == process
    assert dict(os.environ) == environment
    assert sorted(read_log(tmp_path / "log.csv")["step"].unique()) == list(range(1, 13))


def test_the_csv_log_holds_every_numeric_column_at_every_interval_and_continues_on_resume(tmp_path):
    model, optimizer = _trained(steps=0)
    log = tmp_path / "run"  # a folder: the log is ostate_monitor.csv inside
    os.makedirs(log)
    monitor = Monitor(optimizer, model, every=2, by="layer", writer=str(log))
    records = []
    for step in range(1, 7):
        _step(model, optimizer, torch.randn(16, 4))
        records.append(monitor.step(step))
        assert monitor.step(step) is None  # the same step twice (gradient accumulation): logged once
    monitor.close()
    assert [r.step for r in records if r is not None] == [2, 4, 6]
    table = read_log(log)
    last = table[table["step"] == 6].set_index("key")
    expected = records[-1].table.set_index("layer")
    for column in ("eff_lr_p50", "update_to_weight_rms", "exp_avg_sq_p99", "numel"):
        assert last.loc[expected.index, column].tolist() == pytest.approx(expected[column].tolist(), rel=1e-15)
    Monitor(optimizer, model, every=1, writer=str(log)).step(7)  # a resumed run appends to the same log
    assert read_log(log)["step"].max() == 7
    other = tmp_path / "notes.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(OstateError, match="not an ostate monitor log"):
        Monitor(optimizer, model, every=1, writer=str(other)).step(1)


def test_a_log_that_cannot_be_written_is_one_clear_error(tmp_path):
    model, optimizer = _trained()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OstateError, match="cannot write"):
        Monitor(optimizer, model, every=1, writer=str(blocker / "log.csv")).step(1)


def test_a_tensorboard_folder_that_cannot_be_written_is_one_clear_error(tmp_path):
    pytest.importorskip("tensorboard")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OstateError, match="cannot write: a part of the path is a file") as refused:
        TensorBoardWriter(str(blocker / "tb"))
    assert str(blocker / "tb") in str(refused.value) and "\n" not in str(refused.value)


def test_tensorboard_files_read_back_with_tensorboards_own_reader(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model, optimizer = _trained()
    monitor = Monitor(optimizer, model, every=1, by="layer", writer=TensorBoardWriter(str(tmp_path)))
    records = [monitor.step(s) for s in (1, 2)]
    _step(model, optimizer, torch.randn(16, 4))
    records.append(monitor.step(3))
    monitor.close()
    events = accumulator.EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for layer, row in records[-1].table.set_index("layer").iterrows():
        for column in ("eff_lr_p50", "eff_lr_p95", "update_to_weight_rms"):
            scalars = events.Scalars(f"ostate/{column}/{layer}")
            assert [s.step for s in scalars] == [1, 2, 3]
            assert scalars[-1].value == pytest.approx(row[column], rel=1e-6)  # TensorBoard keeps float32
    assert not any("/exp_avg_abs_p1/" in t for t in tags["scalars"])  # only SCALARS by default
    kinds = {
        r.key: r.sketches["eff_lr"]
        for r in ostate.analysis.summarize(ostate.from_state_dict(optimizer.state_dict(), model=model)).rows("kind")
    }
    assert sorted(t for t in tags["histograms"]) == sorted(f"ostate/eff_lr/{k}" for k in kinds)
    histogram = events.Histograms("ostate/eff_lr/weight")[-1].histogram_value
    assert histogram.num == kinds["weight"].count and histogram.min == pytest.approx(kinds["weight"].min)
    assert sum(histogram.bucket) == kinds["weight"].count


def _wandb_records(path: str) -> list:
    """The records of an offline run's ``.wandb`` file: a 7-byte ``:W&B`` header, then LevelDB's log format
    (32 KiB blocks; each piece a 7-byte header: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4)
    holding ``wandb_internal_pb2.Record`` protobufs. wandb 0.31 ships no reader of its own for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


@pytest.mark.slow
def test_weights_and_biases_offline_run_holds_the_scalars_and_histograms(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    import glob
    import json

    monkeypatch.setenv("WANDB_SILENT", "true")
    model, optimizer = _trained()
    run = wandb.init(mode="offline", dir=str(tmp_path), project="ostate-test")
    try:
        monitor = Monitor(optimizer, model, every=1, by="kind", writer=WandbWriter(run))
        record = monitor.step(5)
        run.log({"loss": 1.0}, step=5)  # the training loop's own log commits the step
    finally:
        run.finish()
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    for _ in range(300):  # wandb's service process may still be writing the file when finish() returns
        records = _wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    logged = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            logged.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    assert logged["_step"] == 5
    for kind, row in record.table.set_index("param_kind").iterrows():
        assert logged[f"ostate/eff_lr_p50/{kind}"] == pytest.approx(row["eff_lr_p50"], rel=1e-12)
        assert logged[f"ostate/eff_lr/{kind}/_type"] == "histogram"
        assert sum(logged[f"ostate/eff_lr/{kind}/values"]) == record.eff_lr[kind].count


def test_checks_warn_of_nan_state_eps_domination_and_a_reset(tmp_path):
    model, optimizer = _trained(steps=5, model_class=Plain)
    monitor = Monitor(optimizer, model, every=1, by="layer", checks=True, writer=tmp_path / "log.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.step(5)
    for p in model.hidden.parameters():
        optimizer.state[p]["exp_avg_sq"].fill_(1e-30)  # sqrt(v_hat) far below eps everywhere
    with pytest.warns(MonitorWarning) as caught:
        monitor.step(6)
    lines = [str(w.message) for w in caught]
    assert any("eps-dominated: eps dominates 100% of hidden's" in line for line in lines)
    assert any("eps-dominated-jump" in line and "hidden" in line for line in lines)
    for s in optimizer.state.values():  # a reset: step counts back to 0, moments cleared
        s["step"].zero_()
        s["exp_avg_sq"].zero_()
    _step(model, optimizer, torch.randn(16, 4))
    with pytest.warns(MonitorWarning) as caught:
        monitor.step(7)
    lines = [str(w.message) for w in caught]
    assert {line.split(":")[2].split("'")[0].strip() for line in lines} == {"inp", "hidden", "head"}
    assert "step 7: second-moment-collapse: inp's step count went back from 5 to 1 (a reset or reload?)" in lines
    state = optimizer.state[model.head.weight]
    state["exp_avg"][0, 0] = math.nan
    with pytest.warns(MonitorWarning, match=r"step 8: nonfinite-state: .* of head's coordinates hold NaN"):
        monitor.step(8)
    monitor.close()


def test_wrong_arguments_are_one_clear_error(tmp_path):
    model, optimizer = _trained()
    with pytest.raises(OstateError, match="cannot monitor a Net"):
        Monitor(model)
    with pytest.raises(OstateError, match="every must be at least 1"):
        Monitor(optimizer, every=0)
    with pytest.raises(OstateError, match="unknown view 'layers'"):
        Monitor(optimizer, by="layers")
    with pytest.raises(OstateError, match="unknown shards"):
        Monitor(optimizer, shards="zero")


def _logged_run(tmp_path, by="layer"):
    model, optimizer = _trained(steps=0)
    log = tmp_path / "run" / "ostate_monitor.csv"
    with Monitor(optimizer, model, every=2, by=by, writer=CSVWriter(log)) as monitor:
        for step in range(1, 9):
            _step(model, optimizer, torch.randn(16, 4))
            monitor.step(step)
    return log


def test_timeline_plot_of_the_monitor_log_draws_the_logged_numbers(tmp_path):
    from ostate.figures import plot

    log = _logged_run(tmp_path)
    figure = plot("timeline", str(log))
    table = read_log(log)
    lines = {line.get_gid(): line for ax in figure.axes for line in ax.lines}
    for layer in ("inp", "hidden", "head"):
        rows = table[table["key"] == layer]
        assert list(lines[f"median|{layer}"].get_xdata()) == rows["step"].tolist() == [2, 4, 6, 8]
        assert list(lines[f"median|{layer}"].get_ydata()) == pytest.approx(rows["eff_lr_p50"].tolist())
        assert list(lines[f"ratio|{layer}"].get_ydata()) == pytest.approx(rows["update_to_weight_rms"].tolist())
        assert list(lines[f"eps|{layer}"].get_ydata()) == pytest.approx(rows["eps_dominated_frac"].tolist())
    result = run_cli("plot", str(tmp_path / "run"), "--kind", "timeline", "-o", str(tmp_path / "t.png"))
    assert result.returncode == 0 and (tmp_path / "t.png").stat().st_size > 0
    wrong = run_cli("plot", str(log), "--kind", "timeline", "--by", "kind", "-o", str(tmp_path / "k.png"))
    assert wrong.returncode == 2 and "holds the layer view, not kind" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1 and not (tmp_path / "k.png").exists()


def test_timeline_plot_of_checkpoints_places_each_at_its_global_step(tmp_path):
    from ostate.figures import plot

    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    paths, expected = [], {}
    for step in range(1, 7):
        _step(model, optimizer, torch.randn(16, 4))
        if step % 2 == 0:
            path = tmp_path / f"checkpoint-{step}.pt"
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "global_step": step}, path)
            paths.append(str(path))
            expected[step] = ostate.analyze(ostate.load(path), by="kind").set_index("param_kind")
    result = run_cli("plot", *reversed(paths), "--kind", "timeline", "-o", str(tmp_path / "t.svg"))
    assert result.returncode == 0
    figure = plot("timeline", list(reversed(paths)))
    lines = {line.get_gid(): line for ax in figure.axes for line in ax.lines}
    for kind in ("weight", "bias", "norm"):
        assert list(lines[f"median|{kind}"].get_xdata()) == [2, 4, 6]
        assert list(lines[f"median|{kind}"].get_ydata()) == [expected[s].loc[kind, "eff_lr_p50"] for s in (2, 4, 6)]
        ratios = [expected[s].loc[kind, "update_to_weight_rms"] for s in (2, 4, 6)]
        assert list(lines[f"ratio|{kind}"].get_ydata()) == pytest.approx(ratios)


@pytest.mark.parametrize("family", ["adamw", "sgd", "adagrad"])
def test_the_accelerator_path_gives_the_hosts_numbers(family, monkeypatch, tmp_path):
    # No GPU here: the path a CUDA tensor takes (torch ops on its device, only the sketches' counts and sums
    # brought back; no compiled loops, no numpy on the tensors, no batching of tiny parameters) is forced for
    # host tensors by declaring them off the host. Counts and quantiles agree exactly, sums to rounding.
    from ostate.analysis.native import kernels

    model, optimizer = _trained(family)
    host = Monitor(optimizer, model, by="param", writer=[]).summarize(3)
    monkeypatch.setattr(kernels, "on_host", lambda x: False)
    device = Monitor(optimizer, model, by="param", writer=[]).summarize(3)
    assert host is not None and device is not None
    a, b = host.table, device.table
    assert list(a.columns) == list(b.columns)
    for column in a.columns:
        if a[column].dtype.kind in "fc" and not column.endswith(("_p1", "_p5", "_p25", "_p50", "_p75", "_p95", "_p99")):
            assert b[column].tolist() == pytest.approx(a[column].tolist(), rel=1e-5, nan_ok=True), column
        else:
            assert b[column].tolist() == a[column].tolist() or a[column].equals(b[column]), column
    for kind, sketch in host.eff_lr.items():
        assert device.eff_lr[kind].count == sketch.count
        assert device.eff_lr[kind].buckets.tolist() == sketch.buckets.tolist()
        assert device.eff_lr[kind].counts.tolist() == sketch.counts.tolist()


def test_a_sketch_filled_on_the_device_path_equals_the_hosts(monkeypatch):
    from ostate.analysis import Sketch
    from ostate.analysis.native import kernels

    values = torch.cat([torch.randn(5000) * 1e-3, torch.zeros(7), torch.tensor([math.nan, math.inf, -math.inf, -0.0])])
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        host = Sketch()
        host.add(values.to(dtype))
        monkeypatch.setattr(kernels, "on_host", lambda x: False)
        device = Sketch()
        device.add(values.to(dtype))
        device.add(values[:3].to(dtype))
        monkeypatch.undo()
        host.add(values[:3].to(dtype))
        fields = ("count", "zeros", "nan", "posinf", "neginf", "min", "max")
        assert [getattr(device, f) for f in fields] == [getattr(host, f) for f in fields], dtype
        assert device.total == pytest.approx(host.total, rel=1e-12) and device.sumsq == pytest.approx(host.sumsq)
        assert device.buckets.tolist() == host.buckets.tolist() and device.counts.tolist() == host.counts.tolist()
