"""The strategies on schedule-free AdamW, SGD and RAdam (schedulefree): what they learn into their param
groups, and their modes.

AdamWScheduleFree keeps ``z`` and ``exp_avg_sq`` per parameter (SGDScheduleFree only ``z``;
RAdamScheduleFree both, and no warmup: its counter sets the rectification) and learns, per param
group, its counter ``k``, the sum of its averaging weights ``weight_sum``, ``lr_max`` (and
``scheduled_lr``); ``train_mode`` says whether the weights are the averaged ``x`` (eval
mode, how the library says to save) or ``y``. The oracle is the real library: ``reload``
must continue exactly as the saved optimizer loaded into a new one continues (``train()``,
step, ``eval()``), ``fresh`` must take a new optimizer's first step, in a harness trial and
in what ``ostate reset`` writes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ostate.errors import OstateError
from ostate.harness import Task, TrialConfig, run_trial
from ostate.harness.source import load_source
from ostate.harness.transfer import optimizer_like_source, transfer_state
from ostate.reset.strategies import apply_strategy
from tests.helpers import harness_tasks as ht
from tests.helpers.common import run_cli

schedulefree = pytest.importorskip("schedulefree")

LR = 2e-3


def _groups(model: torch.nn.Module, lr: float = LR) -> list[dict]:
    """Weights and biases in two groups with their own lr: each group learns its own k, weight_sum, lr_max."""
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("weight")]},
        {"params": [p for n, p in named if n.endswith("bias")], "lr": lr / 4},
    ]


MAKERS = {
    "warmup": lambda model, **kw: schedulefree.AdamWScheduleFree(
        model.parameters(), lr=LR, warmup_steps=30, **kw
    ),  # still warming up at the source's end: k sets the next lr
    "decay-r": lambda model, **kw: schedulefree.AdamWScheduleFree(
        model.parameters(), lr=LR, warmup_steps=5, weight_decay=0.01, r=1.0, **kw
    ),
    "two-groups": lambda model, **kw: schedulefree.AdamWScheduleFree(_groups(model), lr=LR, warmup_steps=5, **kw),
    # SGD: z only, still warming up; RAdam: rectified by the source's 20 steps, silent at a fresh start.
    "sgd": lambda model, **kw: schedulefree.SGDScheduleFree(
        _groups(model, 0.05), lr=0.05, warmup_steps=30, weight_decay=0.01, **kw
    ),
    "radam": lambda model, **kw: schedulefree.RAdamScheduleFree(_groups(model), lr=LR, weight_decay=0.01, **kw),
}
CLASSES = {"two-groups": "AdamWScheduleFree", "sgd": "SGDScheduleFree", "radam": "RAdamScheduleFree"}
LEARNED = ("k", "weight_sum", "lr_max", "scheduled_lr")
SEED = 3


def make_source(path, case: str, steps: int = 20, eval_mode: bool = True) -> str:
    """The harness's tiny model trained on the source map by the real library; saved in eval mode
    (weights x, as the library says to save) unless ``eval_mode`` is False (weights y)."""
    torch.manual_seed(0)
    model = ht.make_model()
    opt = MAKERS[case](model)
    opt.train()
    stream = ht.batches(ht.W_SOURCE, 32, torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        ht.mse(model, next(stream)).backward()
        opt.step()
    if eval_mode:
        opt.eval()
    assert opt.param_groups[0]["k"] == steps
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return str(path)


def weights(model: torch.nn.Module) -> dict[str, float]:
    """Every weight as an eval metric (float32 to float64 is exact), so a trial's weights can be compared."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    return {"loss": 0.0, **{f"w{i}": v for i, v in enumerate(flat)}}


def trial_weights(source: str, strategy: str, optimizer=None) -> torch.Tensor:
    """The weights a harness trial evaluates after its first step (the optimizer in eval mode: x); each
    group at the source's lr (schedule ``continue``), as the library continues."""
    task = Task("tiny", ht.make_model, ht.target_batches, ht.mse, weights, source=source, optimizer=optimizer)
    result = run_trial(task, source, TrialConfig(strategy, SEED, LR, steps=1, schedule="continue"), threads=1)
    after = {name: value for step, name, _, value in result.records if step == 1 and name.startswith("eval_w")}
    return torch.tensor([after[f"eval_w{i}"] for i in range(len(after))], dtype=torch.float32)


def library_step(source: str, case: str, optimizer_state: dict | None, **options) -> torch.Tensor:
    """The source's weights stepped once on the trial's first batch by a new optimizer of the library,
    loaded with ``optimizer_state`` (None: a new optimizer's first step), as the library says:
    ``train()`` before stepping, ``eval()`` after (the weights then are x)."""
    saved = torch.load(source, weights_only=True)
    model = ht.make_model()
    model.load_state_dict(saved["model"])
    opt = MAKERS[case](model, **options)
    if optimizer_state is not None:
        opt.load_state_dict(copy.deepcopy(optimizer_state))
    opt.train()
    batch = next(ht.target_batches(32, torch.Generator().manual_seed(SEED)))
    opt.zero_grad()
    ht.mse(model, batch).backward()
    opt.step()
    opt.eval()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module", params=sorted(MAKERS))
def source(request, tmp_path_factory):
    return request.param, make_source(tmp_path_factory.mktemp("src") / "source.pt", request.param)


def test_reload_in_a_trial_continues_the_real_optimizer_with_its_group_counters(source):
    case, path = source
    saved = torch.load(path, weights_only=True)["optimizer"]
    expected = library_step(path, case, saved)
    assert torch.equal(trial_weights(path, "reload"), expected)
    # the same with the user's own optimizer factory (a new optimizer of the library: k 0 in its groups)
    own = trial_weights(path, "reload", optimizer=lambda model, lr: MAKERS[case](model))
    assert torch.equal(own, expected)
    # without the saved group values (a new optimizer's, the saved z and v) the step would be another
    groups_reset = {
        **saved,
        "param_groups": [
            {**g, "k": 0, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0} for g in saved["param_groups"]
        ],
    }
    assert not torch.allclose(library_step(path, case, groups_reset), expected, rtol=1e-4, atol=0)


def test_fresh_in_a_trial_is_a_new_optimizers_first_step(source):
    case, path = source
    assert torch.equal(trial_weights(path, "fresh"), library_step(path, case, None))
    own = trial_weights(path, "fresh", optimizer=lambda model, lr: MAKERS[case](model))
    assert torch.equal(own, library_step(path, case, None))


def test_a_source_saved_in_train_mode_continues_from_its_y(tmp_path):
    """Weights saved in train mode are y: the trial carries train_mode with them. Its first evaluation
    puts the optimizer in eval mode (x) and back (y): the round trip x = lerp(y, z, 1 - 1/beta1),
    y = lerp(x, z, 1 - beta1) rounds in float32, so the step agrees to float32 rounding, not bitwise."""
    path = make_source(tmp_path / "train-mode.pt", "warmup", eval_mode=False)
    saved = torch.load(path, weights_only=True)["optimizer"]
    assert saved["param_groups"][0]["train_mode"] is True
    expected = library_step(path, "warmup", saved)
    got = trial_weights(path, "reload")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # taken as x (train_mode of a new optimizer: False), train() would move y again: another step
    as_eval = {**saved, "param_groups": [{**g, "train_mode": False} for g in saved["param_groups"]]}
    assert not torch.allclose(library_step(path, "warmup", as_eval), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("case", sorted(CLASSES))
def test_the_trials_optimizer_is_the_library_with_each_groups_learned_values_and_its_own_hyperparameters(
    tmp_path, case
):
    path = make_source(tmp_path / "two.pt", case)
    src = load_source(path)
    model = ht.make_model()
    opt = optimizer_like_source(src)(model, 0.5)
    assert type(opt) is getattr(schedulefree, CLASSES[case])
    assert [(g["k"], g["lr_max"], g["train_mode"]) for g in opt.param_groups] == [(0, -1.0, False)] * 2
    moved = transfer_state(src, opt, model).state_dict["param_groups"]
    saved = src.optimizer_state["param_groups"]
    assert saved[0]["lr_max"] != saved[1]["lr_max"]  # each group learns from its own lr
    for new, old in zip(moved, saved):
        assert {k: new[k] for k in (*LEARNED, "train_mode")} == {k: old[k] for k in (*LEARNED, "train_mode")}
        assert new["lr"] == 0.5  # the trial's hyperparameters win


@pytest.mark.parametrize("strategy", ["reload", "fresh"])
def test_ostate_reset_writes_what_the_real_library_resumes_as_the_strategy_says(source, strategy, tmp_path):
    case, path = source
    out = tmp_path / f"{strategy}.pt"
    result = run_cli("reset", path, "--strategy", strategy, "-o", str(out))
    assert result.returncode == 0, result.stderr
    written = torch.load(out, weights_only=True)["optimizer"]
    saved = torch.load(path, weights_only=True)["optimizer"]
    expected = library_step(path, case, saved if strategy == "reload" else None)
    assert torch.equal(library_step(path, case, written), expected)
    for group, old in zip(written["param_groups"], saved["param_groups"]):
        assert group["train_mode"] == old["train_mode"]  # it says which weights were saved: no strategy changes it
        if strategy == "fresh":
            assert {k: group[k] for k in LEARNED} == {"k": 0, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0}
        else:
            assert {k: group[k] for k in LEARNED} == {k: old[k] for k in LEARNED}
    if strategy == "fresh":  # z is the weights at the first step: no entry to write, the library starts it
        assert written["state"] == {}


def test_reset_v_zeroes_v_and_keeps_z_and_the_groups_counters(source):
    case, path = source
    saved = torch.load(path, weights_only=True)["optimizer"]
    if case == "sgd":  # z only: nothing to zero
        with pytest.raises(OstateError, match="does not apply") as error:
            apply_strategy(saved, "reset-v")
        assert "no second moment" in str(error.value.hint)
        return
    new = apply_strategy(saved, "reset-v")
    assert new["param_groups"] == saved["param_groups"]
    by_hand = copy.deepcopy(saved)
    for state in by_hand["state"].values():
        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
    assert torch.equal(library_step(path, case, new), library_step(path, case, by_hand))
    assert not torch.equal(library_step(path, case, new), library_step(path, case, saved))


@pytest.mark.parametrize(
    "case, strategy, reason",
    [
        ("warmup", "reset-m", "keeps no first moment"),
        ("warmup", "reset-step", "counter k"),
        ("warmup", "keep-v", "counter k"),
        ("warmup", "reset-m-ac", "keeps no first moment"),
        ("warmup", "reset-v-ac", "no bias correction by age"),
        ("sgd", "reset-m", "y = (1-momentum) z + momentum x"),
        ("sgd", "reset-step", "counter k sets the warmup"),
        ("sgd", "keep-v", "no second moment"),
        ("sgd", "reset-v-ac", "no second moment"),
        ("radam", "reset-m", "keeps no first moment"),
        ("radam", "reset-step", "counter k sets the rectification"),
        ("radam", "keep-v", "counter k"),
    ],
)
def test_strategies_on_a_first_moment_the_step_or_ages_are_refused_with_the_reason(tmp_path, case, strategy, reason):
    saved = torch.load(make_source(tmp_path / "s.pt", case, steps=3), weights_only=True)["optimizer"]
    with pytest.raises(OstateError, match="does not apply") as error:
        apply_strategy(saved, strategy)
    assert reason in str(error.value)


@pytest.mark.parametrize(
    "case, names",
    [
        ("warmup", ["0.weight", "0.bias", "2.weight", "2.bias"]),
        ("sgd", ["0.weight", "2.weight", "0.bias", "2.bias"]),  # weights, then biases: two groups
        ("radam", ["0.weight", "2.weight", "0.bias", "2.bias"]),
    ],
)
def test_a_regex_strategy_that_keeps_some_state_keeps_the_groups_counters(tmp_path, case, names):
    saved = torch.load(make_source(tmp_path / "s.pt", case, steps=3), weights_only=True)["optimizer"]
    new = apply_strategy(saved, r"reload:^0\.", names=names)
    kept = [i for i, n in enumerate(names) if n.startswith("0.")]
    assert new["param_groups"] == saved["param_groups"] and sorted(new["state"]) == kept
    assert all(new["state"][i].keys() == saved["state"][i].keys() for i in kept)


def test_a_live_fresh_keeps_train_mode_and_takes_a_new_optimizers_step_from_the_weights_it_has():
    """The StrategyCallbacks' core, mid-training (train mode, weights y): z and the counters go, the mode stays."""
    from ostate.integrations.live import apply_to_optimizer

    torch.manual_seed(0)
    model = ht.make_model()
    opt = MAKERS["decay-r"](model)
    opt.train()
    stream = ht.batches(ht.W_SOURCE, 32, torch.Generator().manual_seed(0))
    for _ in range(5):
        opt.zero_grad()
        ht.mse(model, next(stream)).backward()
        opt.step()
    apply_to_optimizer(opt, model, "fresh")
    assert [(g["k"], g["train_mode"]) for g in opt.param_groups] == [(0, True)] and not opt.state
    twin = copy.deepcopy(model)
    new = MAKERS["decay-r"](twin)
    new.train()
    batch = next(stream)
    for m, o in ((model, opt), (twin, new)):
        o.zero_grad()
        ht.mse(m, batch).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_a_group_of_new_parameters_starts_its_counters_as_a_new_group_does(tmp_path):
    """A new head gets a group of its own in the default factory: under reload it carries no state, so its
    group's k, weight_sum and lr_max start as those of a group added to a running optimizer (k 0)."""
    src = load_source(make_source(tmp_path / "s.pt", "warmup"))
    model = torch.nn.Sequential(*ht.make_model(), torch.nn.Linear(1, 1))  # "3.weight", "3.bias": new
    opt = optimizer_like_source(src)(model, LR)
    moved = transfer_state(src, opt, model).state_dict["param_groups"]
    saved = src.optimizer_state["param_groups"][0]
    assert (saved["k"], saved["train_mode"]) == (20, False)
    assert [(g["k"], g["lr_max"], g["train_mode"]) for g in moved] == [(20, saved["lr_max"], False), (0, -1.0, False)]
    assert len(moved[1]["params"]) == 2
