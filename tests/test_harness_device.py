"""Where trials train: the GPU when there is one (``--device auto``), else the CPU.

This machine has no GPU: the tests here check the choice of the device, what a trial's
id takes from it, the refusals, and the message a task gets when its own tensors are
on another device than the model. The test marked ``cuda`` runs a trial of a built-in
task on a GPU and compares it with the same trial on the CPU; it runs wherever torch
sees a CUDA GPU (and is skipped where it does not).
"""

from __future__ import annotations

import math

import pytest
import torch

from ostate.errors import OstateError
from ostate.harness import Task, TrialConfig, builtin_task, run_trial
from ostate.harness.device import resolve_device
from ostate.harness.executors import Job, run_job
from ostate.harness.pretrain import pretrain
from ostate.harness.trial import trial_context
from tests.helpers import harness_tasks as ht
from tests.helpers.common import run_cli


def _gpu(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_is_the_gpu_when_torch_sees_one_and_the_cpu_otherwise(monkeypatch):
    _gpu(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)
    _gpu(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(OstateError, match=r"device 'cuda:2' asked for, but torch sees 2 GPU\(s\)"):
        resolve_device("cuda:2")


def test_a_gpu_asked_for_on_a_machine_without_one_is_refused_with_what_to_do(monkeypatch):
    _gpu(monkeypatch, 0)
    with pytest.raises(OstateError, match="torch sees no CUDA GPU") as e:
        resolve_device("cuda")
    assert "--device cpu" in str(e.value)
    with pytest.raises(OstateError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_the_cli_refuses_a_missing_gpu_in_one_line_before_any_pretraining(monkeypatch, tmp_path):
    _gpu(monkeypatch, 0)
    cache = tmp_path / "cache"
    result = run_cli("ablate", "--task", "sans-to-serif", "--device", "cuda", "--cache-dir", str(cache))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "torch sees no CUDA GPU" in result.stderr
    assert not cache.exists()


def test_a_cpu_trial_keeps_the_ids_of_earlier_runs_and_a_gpu_trial_gets_its_own():
    task = Task("t", model=ht.make_model, train_batches=None, loss=None, evaluate=None)
    before = trial_context(task, None, 2)  # as every run before the device existed
    assert trial_context(task, None, 2, torch.device("cpu")) == before
    on_gpu = trial_context(task, None, 2, torch.device("cuda", 0))
    assert on_gpu == {**before, "device": "cuda"}
    config = TrialConfig("reload", 0, 1e-3)
    assert config.trial_id("t", "f", on_gpu) != config.trial_id("t", "f", before)


def test_a_trial_on_the_cpu_records_its_device(tmp_path):
    source = ht.make_source(tmp_path / "source.pt")
    task = Task("tiny", model=ht.make_model, train_batches=ht.target_batches, loss=ht.mse, evaluate=ht.evaluate)
    result = run_trial(task, source, TrialConfig("reload", 0, 1e-3, steps=2, eval_every=2), threads=1, device="cpu")
    assert result.info["device"] == "cpu" and "device" not in trial_context(task, None, 1)


def _loss_with_tensors_elsewhere(model, batch):
    # torch's own words when a task's tensor stayed on the CPU and the model is on a GPU
    raise RuntimeError(
        "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
        "(when checking argument for argument mat1 in method wrapper_CUDA_addmm)"
    )


def test_a_task_whose_tensors_are_on_another_device_is_told_how_to_fix_it(tmp_path):
    source = ht.make_source(tmp_path / "source.pt")
    task = Task(
        "tiny",
        model=ht.make_model,
        train_batches=ht.target_batches,
        loss=_loss_with_tensors_elsewhere,
        evaluate=ht.evaluate,
    )
    outcome = run_job(Job(task, source, TrialConfig("reload", 0, 1e-3, steps=1), threads=1, device="cpu"))
    assert outcome.result is None and outcome.error is not None
    assert "next(model.parameters()).device" in outcome.error and "--device cpu" in outcome.error


def test_pretraining_returns_a_checkpoint_on_the_cpu_whatever_it_trained_on():
    model = torch.nn.Linear(3, 1)
    data = iter(lambda: (torch.randn(4, 3), torch.randn(4, 1)), None)
    ckpt = pretrain(model, data, lambda m, b: (m(b[0]) - b[1]).square().mean(), steps=2, progress=False, device="cpu")
    tensors = list(ckpt["model"].values()) + [t for s in ckpt["optimizer"]["state"].values() for t in s.values()]
    assert all(t.device.type == "cpu" for t in tensors)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")
def test_a_builtin_trial_on_the_gpu_follows_the_same_trial_on_the_cpu(tmp_path):
    task = builtin_task("sans-to-serif", pretrain_steps=20, progress=False, device="cpu")
    source = str(tmp_path / "source.pt")
    task.pretrain(source)
    config = TrialConfig("reset-v", 0, 1e-3, steps=10, eval_every=5)
    on_cpu = run_trial(task, source, config, threads=1, device="cpu")
    on_gpu = run_trial(task, source, config, threads=1, device="auto")
    assert on_gpu.info["device"].startswith("cuda") and on_gpu.trial_id != on_cpu.trial_id

    def losses(result):
        return [v for step, name, _, v in result.records if name == "eval_loss"]

    # cuDNN convolutions may use TF32 and other algorithms: close, not equal
    assert all(math.isfinite(v) for v in losses(on_gpu))
    assert losses(on_gpu) == pytest.approx(losses(on_cpu), rel=2e-2)
    eff = [v for _, name, _, v in on_gpu.records if name == "eff_lr_p50"]
    assert eff and all(v > 0 for v in eff)  # ostate's analysis of the optimizer's state on the GPU


def test_a_spec_says_its_device_and_a_builtin_source_pretrained_on_a_gpu_is_cached_apart(monkeypatch, tmp_path):
    from ostate.harness import load_spec

    spec_file = tmp_path / "a.toml"
    spec_file.write_text('[task]\nbuiltin = "sans-to-serif"\n[run]\ndevice = "cpu"\n')
    on_cpu = load_spec(spec_file)
    assert on_cpu.device == "cpu" and on_cpu.task.pretrain.keywords["device"] == "cpu"
    _gpu(monkeypatch, 1)
    on_gpu = load_spec(spec_file, device="cuda")  # --device replaces the file's
    assert on_gpu.device == "cuda" and on_gpu.task.pretrain.keywords["device"] == "cuda"
    assert on_gpu.task.fingerprint == on_cpu.task.fingerprint.replace("-s600-", "-s600-cuda-")
