"""Parameter names from the model state dict: right when unique, refused (with a reason) otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ostate
from ostate.formats.naming.model_order import ModelEntry, match_model_order
from tests.helpers.common import Net, train


def names_and_sources(tmp_path, model, opt, state_dict=None):
    path = tmp_path / "c.pt"
    torch.save(
        {"model": state_dict if state_dict is not None else model.state_dict(), "optimizer": opt.state_dict()}, path
    )
    o = ostate.load(path).optimizers[0]
    return [p.name for p in o.params], {p.name_source for p in o.params}, o.warnings


def test_names_skip_batchnorm_buffers_in_the_model_state_dict(tmp_path):
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt, steps=1)
    names, sources, warnings = names_and_sources(tmp_path, model, opt)
    assert names == [n for n, _ in model.named_parameters()]
    assert sources == {"model-order"} and warnings == []


def frozen_run(tmp_path, module_name):
    model = Net()
    for p in getattr(model, module_name).parameters():
        p.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for _, p in trainable], lr=0.1, momentum=0.9)
    train(model, opt, steps=1)
    return trainable, *names_and_sources(tmp_path, model, opt)


def test_names_skip_frozen_parameters_left_out_of_the_optimizer(tmp_path):
    trainable, names, sources, _ = frozen_run(tmp_path, "head")
    assert names == [n for n, _ in trainable]
    assert sources == {"model-order"}


def test_frozen_parameters_among_same_shaped_ones_make_names_ambiguous(tmp_path):
    # norm.weight/bias are frozen among five other 8-element entries: shapes cannot tell which were left out.
    # What every reading agrees on is named; the rest are listed with how to name them.
    trainable, names, sources, warnings = frozen_run(tmp_path, "norm")
    assert sources == {"group-order", "none"}  # its own provenance: named where every reading agrees
    expected = [n for n, _ in trainable]
    certain = {"inp.weight", "hidden.weight", "hidden.bias", "head.weight", "head.bias"}
    assert [n if n in certain else None for n in expected] == [n if n in certain else None for n in names]
    assert [i for i, n in enumerate(names) if n.startswith("param.")] == [
        i for i, n in enumerate(expected) if n not in certain
    ]
    [warning] = [w for w in warnings if "more than one way" in w]
    assert "5 of 8 are the same in every reading" in warning and "index 1 (8)" in warning
    assert "param_names" in warning and "from_state_dict(state_dict, model=module)" in warning


def test_decay_and_no_decay_groups_that_interleave_are_named(tmp_path):
    model = Net()
    decay = [(n, p) for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n and "bn" not in n]
    rest = [(n, p) for n, p in model.named_parameters() if (n, p) not in decay]
    opt = torch.optim.AdamW(
        [{"params": [p for _, p in decay], "weight_decay": 0.1}, {"params": [p for _, p in rest], "weight_decay": 0.0}]
    )
    train(model, opt, steps=1)
    names, sources, _ = names_and_sources(tmp_path, model, opt)
    assert names == [n for n, _ in decay] + [n for n, _ in rest]
    assert sources == {"model-order"}


def test_tied_weights_count_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.mid = nn.Linear(6, 6)
            self.out = nn.Linear(6, 10, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, x):
            return self.out(self.mid(self.embed(x)))

    model = Tied()
    opt = torch.optim.Adam(model.parameters())
    model(torch.arange(10)).sum().backward()
    opt.step()
    names, sources, _ = names_and_sources(tmp_path, model, opt)
    assert names == ["embed.weight", "mid.weight", "mid.bias"]
    assert sources == {"model-order"}


def test_ambiguous_matches_are_refused_with_a_reason(tmp_path):
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5))
    # Only one of two same-shaped layers is optimized: either could be it.
    opt = torch.optim.AdamW(model[1].parameters())
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    names, sources, warnings = names_and_sources(tmp_path, model, opt)
    assert names == ["param.0", "param.1"] and sources == {"none"}
    assert any("more than one way" in w for w in warnings)


def test_shape_mismatch_with_the_model_is_reported_not_hidden(tmp_path):
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt, steps=1)
    other = Net(width=6).state_dict()
    names, sources, warnings = names_and_sources(tmp_path, model, opt, state_dict=other)
    assert sources == {"none"}
    assert any("do not follow the model state dict" in w and "shape" in w for w in warnings)


def test_wildcard_shapes_of_stateless_params_still_align():
    entries = [ModelEntry("a", (2, 2)), ModelEntry("b", (2,)), ModelEntry("c", (3,))]
    naming = match_model_order([None, (2,), (3,)], entries, "m")
    assert naming.names == ["a", "b", "c"] and naming.shapes[0] == (2, 2)


def test_more_optimizer_params_than_model_entries_is_refused():
    naming = match_model_order([(2,), (2,)], [ModelEntry("a", (2,))], "m")
    assert naming.source == "none" and "only 1" in naming.warnings[0]


def test_integer_entries_are_never_parameters():
    entries = [ModelEntry("w", (3,)), ModelEntry("count", (3,), floating=False), ModelEntry("b", (3,))]
    assert match_model_order([(3,), (3,)], entries, "m").names == ["w", "b"]


def test_many_groups_with_too_many_possibilities_give_up_cleanly(monkeypatch):
    import ostate.formats.naming.model_order as naming_module

    monkeypatch.setattr(naming_module, "_MAX_GROUP_STATES", 3)
    entries = [ModelEntry(f"e{i}", (4,)) for i in range(12)]
    naming = match_model_order([(4,)] * 6, entries, "m", group_sizes=[2, 2, 2])
    assert naming.source == "none" and "more than one way" in naming.warnings[0]


def test_the_keys_that_tell_state_layouts_apart_are_the_families_own():
    """The readers know these keys without importing the families; they must not drift apart."""
    from ostate.formats.naming import torch_optim
    from ostate.optimizers import adafactor, bnb8bit, hf_adafactor, lbfgs

    assert torch_optim.ADAFACTOR_KEYS <= adafactor._STATE_KEYS
    assert torch_optim.HF_ADAFACTOR_KEYS <= hf_adafactor._STATE_KEYS
    assert torch_optim.BNB_KEYS <= bnb8bit._ONE_STATE_KEYS
    assert torch_optim.LBFGS_KEYS <= lbfgs._STATE_KEYS


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4)])
def test_a_parameter_of_any_shape_keeps_it_under_torch_adafactor(shape):
    p = torch.nn.Parameter(torch.ones(shape))
    opt = torch.optim.Adafactor([p], lr=0.01)
    p.grad = torch.ones(shape)
    opt.step()
    assert ostate.from_state_dict(opt.state_dict()).optimizers[0].params[0].shape == shape


def test_the_models_module_types_decide_the_kind_when_the_model_is_at_hand():
    from ostate.demo import CharMLP

    model = CharMLP(45, 8)  # its LayerNorms are blocks.N.0: the name rule calls their weights 'other'
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 45, (4, 8))).sum().backward()
    opt.step()
    by_name = ostate.analyze(ostate.from_state_dict(opt.state_dict(), model=model)).set_index("name")["param_kind"]
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(by_name[f"{n}.weight"] == "norm" and by_name[f"{n}.bias"] == "norm" for n in norms)
    assert by_name["embed.weight"] == "embedding" and by_name["head.weight"] == "weight"
    # Without the model (a file), the name rule: a 1-D scale named blocks.0.0.weight stays 'other'.
    plain = ostate.analyze(ostate.from_state_dict(opt.state_dict(), model=model.state_dict())).set_index("name")
    assert plain.loc[f"{norms[0]}.weight", "param_kind"] == "other"


def test_group_structure_names_what_every_reading_of_each_group_agrees_on():
    # Two groups (decay: the matrices; no decay: the vectors); a frozen 4-vector sits among the vectors.
    entries = [
        ModelEntry("a.weight", (4, 3)),
        ModelEntry("a.bias", (4,)),
        ModelEntry("frozen.weight", (4,)),
        ModelEntry("b.weight", (2, 4)),
        ModelEntry("b.bias", (2,)),
    ]
    naming = match_model_order([(4, 3), (2, 4), (4,), (2,)], entries, "m", group_sizes=[2, 2])
    # a.bias or frozen.weight: the vector group cannot tell; everything else is certain in every reading.
    assert naming.names == ["a.weight", "b.weight", None, "b.bias"] and naming.source == "group-order"
    assert "index 2 (4)" in naming.warnings[0] and "3 of 4" in naming.warnings[0]
