"""Recognition: every family is told apart from real checkpoints by its state keys and group keys."""

from __future__ import annotations

import pytest
import torch

import ostate
from ostate.formats.deepspeed.common import add_frozen
from ostate.formats.naming.torch_optim import read_optimizer
from ostate.optimizers import detect
from ostate.optimizers.identify import identify
from tests.helpers.common import run_cli
from tests.helpers.families import FAMILIES, save, trained

pytest.importorskip("transformers")
pytest.importorskip("lion_pytorch")
pytest.importorskip("schedulefree")
pytest.importorskip("bitsandbytes")

# Lion8bit and SGD8bit keep the same keys and eps = 0; the choice between them is reported as assumed.
ASSUMED = {"bitsandbytes.Lion8bit"}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_is_recognised_from_a_real_checkpoint(tmp_path, name):
    kind = FAMILIES[name][0]
    model, opt = trained(name)
    path = tmp_path / "ckpt.pt"
    save(path, model, opt)
    loaded = ostate.load(path).optimizers[0]
    assert loaded.kind == kind
    assert loaded.kind_source == ("assumed" if name in ASSUMED else "detected")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_group_of_frozen_parameters_added_by_a_reader_does_not_change_the_family(name):
    """DeepSpeed's readers add a group for frozen parameters (no hyperparameters); detection ignores it."""
    kind = FAMILIES[name][0]
    model, opt = trained(name)
    read = read_optimizer(opt.state_dict(), "optimizer")
    add_frozen(read, ["frozen.weight"], {"frozen.weight": (3, 2)})
    identify(read)
    assert read.kind == kind and read.is_frozen_group(len(read.groups) - 1)
    assert read.kind_source == ("assumed" if name in ASSUMED else "detected")
    assert not read.warnings or name in ASSUMED


TORCH_FRESH = {
    "Adam": ("adam", lambda ps: torch.optim.Adam(ps)),
    "AdamW": ("adamw", lambda ps: torch.optim.AdamW(ps)),
    "NAdam": ("nadam", lambda ps: torch.optim.NAdam(ps)),
    "RAdam": ("radam", lambda ps: torch.optim.RAdam(ps)),
    "Adamax": ("adamax", lambda ps: torch.optim.Adamax(ps)),
    "SparseAdam": ("sparse_adam", lambda ps: torch.optim.SparseAdam(ps)),
    "RMSprop": ("rmsprop", lambda ps: torch.optim.RMSprop(ps)),
    "Adadelta": ("adadelta", lambda ps: torch.optim.Adadelta(ps)),
    "ASGD": ("asgd", lambda ps: torch.optim.ASGD(ps)),
    "Rprop": ("rprop", lambda ps: torch.optim.Rprop(ps)),
    "Adafactor": ("adafactor", lambda ps: torch.optim.Adafactor(ps)),
    "SGD": ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "Muon": ("muon", lambda ps: torch.optim.Muon(ps)),
    "LBFGS": ("lbfgs", lambda ps: torch.optim.LBFGS(ps)),
}


@pytest.mark.parametrize("name", sorted(TORCH_FRESH))
def test_an_optimizer_that_never_stepped_is_recognised_by_its_group_keys(name):
    kind, make = TORCH_FRESH[name]
    opt = make([torch.nn.Parameter(torch.zeros(3, 3))])
    sd = opt.state_dict()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    state_keys = frozenset(k for entry in sd["state"].values() for k in entry)
    assert detect(state_keys, groups)[:2] == (kind, "detected")


def test_adam_radam_nadam_and_sparse_adam_share_state_keys_but_not_group_keys():
    keys = frozenset({"step", "exp_avg", "exp_avg_sq"})
    p = [torch.nn.Parameter(torch.zeros(2))]
    for make, kind in [
        (torch.optim.Adam, "adam"),
        (torch.optim.RAdam, "radam"),
        (torch.optim.SparseAdam, "sparse_adam"),
    ]:
        group = {k: v for k, v in make(p).state_dict()["param_groups"][0].items() if k != "params"}
        assert detect(keys, [group])[:2] == (kind, "detected")


def test_optimizer_option_overrides_detection(tmp_path):
    model, opt = trained("RAdam")
    path = tmp_path / "ckpt.pt"
    save(path, model, opt)
    loaded = ostate.load(path, optimizer="adam").optimizers[0]
    assert (loaded.kind, loaded.kind_source) == ("adam", "user")


def test_bnb_lion_reading_suggests_the_alternative(tmp_path):
    model, opt = trained("bitsandbytes.Lion8bit")
    path = tmp_path / "ckpt.pt"
    save(path, model, opt)
    loaded = ostate.load(path).optimizers[0]
    assert any("--optimizer bnb_momentum" in w for w in loaded.warnings)


def test_math_of_the_wrong_family_is_one_clear_error_not_a_key_error(tmp_path):
    model, opt = trained("SGD")
    path = tmp_path / "ckpt.pt"
    save(path, model, opt)
    loaded = ostate.load(path, optimizer="adam").optimizers[0]
    with pytest.raises(ostate.OstateError, match="needs 'betas'.*momentum_buffer"):
        ostate.effective_lr(loaded.params[0], loaded.groups[0], kind="adam")


def test_forcing_a_family_the_state_does_not_fit_warns_then_fails_clearly(tmp_path):
    model, opt = trained("SGD")
    path = tmp_path / "ckpt.pt"
    save(path, model, opt)
    loaded = ostate.load(path, optimizer="radam").optimizers[0]
    assert any("do not look like 'radam'" in w and "'sgd'" in w for w in loaded.warnings)
    result = run_cli("inspect", str(path), "--optimizer", "radam")
    assert result.returncode == 2
    assert "needs 'betas'" in result.stderr and "internal error" not in result.stderr
