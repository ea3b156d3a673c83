"""The monitor on two real DeepSpeed ranks (CPU, gloo): ZeRO stages 1-3 and the BF16_Optimizer read live.

One module fixture runs tests/helpers/monitor_deepspeed.py once (two spawned ranks, every
case in turn, 10-25 s on a busy 2-core machine); each case's last record must equal what ``ostate inspect``
shows of the checkpoint the same engine saved at the same step, and what DeepSpeed's own
gather of the whole state (``safe_get_full_optimizer_state``) analyses to.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys

import pytest
import torch

from ostate.errors import OstateError
from ostate.monitor import Monitor, read_log
from tests.helpers.common import REPO
from tests.helpers.monitor_deepspeed import CASES

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install -c constraints.txt -e '.[dev]')",
)

TRAINED = ["embed.weight", "embed.bias", "head.weight", "head.bias"]  # the model's order; frozen.weight has no state
EXACT = ["numel", "step", "group", "param_kind", "eff_lr_p5", "eff_lr_p50", "eff_lr_p95", "eff_lr_min", "eff_lr_max"]
EXACT += ["exp_avg_sq_p50", "update_p50", "second_moment_zero_frac", "eps_dominated_frac"]
SUMS = ["eff_lr_mean", "exp_avg_sq_rms", "update_rms", "update_to_weight_rms"]


@pytest.fixture(scope="module")
def deepspeed_ranks(tmp_path_factory):
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "PYTHONWARNINGS": "ignore",
        "TORCH_EXTENSIONS_DIR": str(tmp_path_factory.mktemp("torch_extensions")),  # see tests/test_deepspeed.py
    }
    failures = []
    for _attempt in range(2):  # a port taken meanwhile on a shared machine: one retry
        out = tmp_path_factory.mktemp("monitor_deepspeed")
        cmd = [sys.executable, "-m", "tests.helpers.monitor_deepspeed", str(out)]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode == 0:
            return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in (0, 1)], out
        failures.append(done.stdout[-2000:] + done.stderr[-3000:])
    pytest.fail("tests/helpers/monitor_deepspeed.py failed twice:\n" + "\n---\n".join(failures))


def _same_rows(table, oracle, key, keys):
    table, oracle = table.set_index(key), oracle.set_index(key)
    assert list(table.index) == keys
    for column in EXACT:
        if column in table:
            assert table.loc[keys, column].tolist() == oracle.loc[keys, column].tolist(), (
                column
            )  # merged sketches: exact
    for column in SUMS:
        assert table.loc[keys, column].tolist() == pytest.approx(oracle.loc[keys, column].tolist(), rel=1e-9), column
    shapes = [tuple(s) for s in table.loc[keys, "shape"]] if "shape" in table else None
    if shapes is not None:
        assert shapes == [tuple(s) for s in oracle.loc[keys, "shape"]]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_deepspeed_ranks_log_what_inspect_shows_of_the_checkpoint(deepspeed_ranks, case):
    (rank0, rank1), directory = deepspeed_ranks
    assert all(r is None for records in rank1[case]["records"].values() for r in records)  # rank 0 logs alone
    result = rank0[case]
    param = result["records"]["param"][-1]
    _same_rows(param, result["oracle"]["param"], "name", TRAINED)
    _same_rows(param, result["gathered"], "name", TRAINED)  # DeepSpeed's own gather of the whole state
    if "layer" in result["records"]:
        layer = result["records"]["layer"][-1]
        _same_rows(layer, result["oracle"]["layer"], "layer", ["embed", "head"])
    log = read_log(directory / (f"{case}.csv" if case == "zero3" else f"{case}_param.csv"))
    assert log.groupby("step").size().tolist() == [len(TRAINED)] * 3  # every step, once, not once per rank


class DeepSpeedZeroOptimizer:  # recognised by its class name, as the monitor never imports deepspeed
    def __init__(self, model):
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)


class DeepSpeedOptimizerWrapper:  # accelerate's wrapper, what a Hugging Face Trainer under DeepSpeed holds
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_a_zero_optimizer_is_read_as_shards_and_named_from_the_model():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(OstateError, match="every rank holds a different partition"):
        Monitor(DeepSpeedZeroOptimizer(model), model, shards="replicated", writer=[])
    with pytest.raises(OstateError, match="needs the model"):
        Monitor(DeepSpeedOptimizerWrapper(DeepSpeedZeroOptimizer(model)), writer=[])
