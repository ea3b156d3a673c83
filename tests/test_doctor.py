"""ostate doctor on real checkpoints: each check is triggered by a checkpoint that has the problem,
and stays quiet on one that does not. Exit codes and output formats as CI pipelines use them."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import ostate
from ostate.doctor.checks import AMSGRAD_RATIO, EXIT_ERROR, EXIT_OK, EXIT_WARNING, diagnose, exit_code
from ostate.formats.naming.weights import read_model
from tests.helpers.common import REPO, run_cli, saved


class Normed(nn.Module):
    """A linear layer, a LayerNorm and a head, as a transformer block names them."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.norm(self.inp(x)))


class Mlp(nn.Module):
    """Dense layers only (no BatchNorm, which hides its input's bias from the loss)."""

    def __init__(self, out: int = 3):
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, out)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def trained(model=None, opt=None, steps=5, scale=1.0, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = model or Mlp()
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, **kwargs)
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = (torch.randn(32, 4, generator=g) * scale).to(dtype)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


def codes(diagnosis):
    return {f.code: f for f in diagnosis.findings}


def doctor(path, **kwargs):
    return diagnose(ostate.load(path), **kwargs)


def test_a_healthy_checkpoint_has_no_findings_and_exits_0(tmp_path):
    model, opt = trained()
    d = doctor(saved(tmp_path, model, opt))
    assert d.findings == [] and exit_code(d) == EXIT_OK
    result = run_cli("doctor", str(saved(tmp_path, model, opt)))
    assert result.returncode == 0 and "no findings; exit code 0" in result.stdout


def test_nan_in_a_real_adamw_state_is_an_error_with_the_coordinates_counted(tmp_path):
    model, opt = trained()
    state = opt.state_dict()
    state["state"][4]["exp_avg_sq"][0, :5] = float("nan")  # head.weight
    state["state"][1]["exp_avg"][3] = float("inf")  # inp.bias
    path = tmp_path / "nan.pt"
    torch.save({"model": model.state_dict(), "optimizer": state}, path)
    finding = codes(doctor(path))["nonfinite-state"]
    assert finding.severity == "error"
    assert {(e.subject, e.coordinates, e.of) for e in finding.evidence} == {("head.weight", 5, 48), ("inp.bias", 1, 16)}
    result = run_cli("doctor", str(path), "--format", "json")
    assert result.returncode == EXIT_ERROR
    data = json.loads(result.stdout)
    assert data["exit_code"] == 4 and data["findings"][0]["code"] == "nonfinite-state"
    assert run_cli("doctor", str(path), "--ignore", "nonfinite-state").returncode == EXIT_OK


def test_frozen_and_never_stepped_parameters_are_listed(tmp_path):
    model = Mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.hidden.weight.requires_grad_(False)  # frozen after the optimizer was built
    model, opt = trained(model, opt)
    finding = codes(doctor(saved(tmp_path, model, opt)))["params-without-state"]
    assert finding.severity == "warning" and [e.subject for e in finding.evidence] == ["hidden.weight"]
    never = torch.optim.AdamW(Mlp().parameters(), weight_decay=0.0)
    d = doctor(saved(tmp_path, Mlp(), never, "never.pt"))
    assert set(codes(d)) == {"empty-state"}


def test_a_parameter_marked_frozen_is_reported_as_frozen_whatever_the_format(tmp_path):
    model = Mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.hidden.weight.requires_grad_(False)
    model, opt = trained(model, opt)
    ckpt = ostate.load(saved(tmp_path, model, opt))
    ckpt.optimizers[0].param("hidden.weight").frozen = True  # as a reader marks a parameter kept outside the optimizer
    found = codes(diagnose(ckpt))
    assert "params-without-state" not in found
    assert found["frozen-params"].severity == "info"
    assert [e.subject for e in found["frozen-params"].evidence] == ["hidden.weight"]


def test_unused_embedding_rows_have_a_zero_second_moment(tmp_path):
    class Lm(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.head = nn.Linear(8, 50)

        def forward(self, ids):
            return self.head(self.embed(ids))

    torch.manual_seed(0)
    model = Lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        ids = torch.randint(0, 10, (4, 6))  # tokens 10..49 never appear
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
    finding = codes(doctor(saved(tmp_path, model, opt)))["second-moment-zero"]
    assert finding.severity == "warning"
    assert [(e.subject, e.coordinates) for e in finding.evidence] == [("embed.weight", 40 * 8)]


def test_a_large_eps_dominates_and_the_default_does_not(tmp_path):
    model, opt = trained(eps=1e-1)
    finding = codes(doctor(saved(tmp_path, model, opt)))["eps-dominated"]
    assert {e.subject for e in finding.evidence} == {n for n, _ in model.named_parameters()}
    model, opt = trained(eps=1e-8)
    assert "eps-dominated" not in codes(doctor(saved(tmp_path, model, opt, "small.pt")))


def test_a_finished_cosine_schedule_leaves_lr_at_zero(tmp_path):
    model = Mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.0)
    for _ in range(4):
        trained(model, opt, steps=1)
        schedule.step()
    found = codes(doctor(saved(tmp_path, model, opt, scheduler=schedule.state_dict())))
    assert found["lr-zero"].severity == "warning" and found["schedule-finished"].severity == "warning"
    assert "T_max 4" in found["schedule-finished"].evidence[0].detail
    # halfway through the same schedule: nothing to say
    model, opt = Mlp(), None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    for _ in range(4):
        trained(model, opt, steps=1)
        schedule.step()
    assert codes(doctor(saved(tmp_path, model, opt, "half.pt", scheduler=schedule.state_dict()))) == {}


@pytest.mark.slow
def test_a_trainer_run_saved_at_its_last_step_has_a_finished_linear_schedule(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from tests.helpers.builders import RandomTokens, tiny_gpt2, trainer_arguments

    torch.manual_seed(0)
    args = trainer_arguments(tmp_path, 2, save_strategy="steps", save_steps=2, warmup_steps=0)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=RandomTokens(64)).train()
    found = codes(doctor(tmp_path / "checkpoint-2"))
    assert "lr-zero" in found and "global_step 2 of max_steps 2" in found["schedule-finished"].evidence[0].detail
    # The Trainer's grouping keeps norms and biases out of weight decay; its embeddings are decayed.
    assert "weight-decay-on-norms-or-biases" not in found
    assert {e.subject for e in found["weight-decay-on-embeddings"].evidence} == {
        "transformer.wte.weight",
        "transformer.wpe.weight",
    }


def test_steps_that_differ_within_a_group_are_flagged(tmp_path):
    model = Mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.head.requires_grad_(False)
    trained(model, opt, steps=2)  # the head gets no gradient: Adam skips it
    model.head.requires_grad_(True)
    trained(model, opt, steps=3)
    finding = codes(doctor(saved(tmp_path, model, opt)))["step-mismatch"]
    assert {e.subject for e in finding.evidence} == {"head.weight", "head.bias"}
    assert "step 3, most of group 0 at 5" in finding.evidence[0].detail


def test_nadam_step_reset_without_mu_product_is_inconsistent(tmp_path):
    model = Mlp()
    opt = torch.optim.NAdam(model.parameters(), lr=1e-3)
    trained(model, opt, steps=5)
    state = copy.deepcopy(opt.state_dict())
    for entry in state["state"].values():
        entry["step"] = torch.tensor(0.0)  # what a naive reset does: mu_product left as it was
    path = tmp_path / "nadam.pt"
    torch.save({"model": model.state_dict(), "optimizer": state}, path)
    assert codes(doctor(path))["nadam-mu-product"].severity == "warning"
    assert "nadam-mu-product" not in codes(doctor(saved(tmp_path, model, opt, "ok.pt")))


def test_weight_decay_on_layernorm_and_biases_in_a_single_group(tmp_path):
    model = Normed()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    trained(model, opt)
    finding = codes(doctor(saved(tmp_path, model, opt)))["weight-decay-on-norms-or-biases"]
    assert {e.subject for e in finding.evidence} == {"inp.bias", "norm.weight", "norm.bias", "head.bias"}
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
    grouped = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}])
    trained(model, grouped)
    assert "weight-decay-on-norms-or-biases" not in codes(doctor(saved(tmp_path, model, grouped, "grouped.pt")))


def test_amsgrad_max_far_above_the_current_v_after_an_early_spike(tmp_path):
    model = Mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True, betas=(0.9, 0.9))
    trained(model, opt, steps=2, scale=300.0)  # huge gradients first ...
    trained(model, opt, steps=60, scale=0.01, seed=1)  # ... then small ones: v decays, v_max stays
    finding = codes(doctor(saved(tmp_path, model, opt)))["amsgrad-stale-max"]
    assert finding.severity == "warning" and finding.coordinates > 0
    table = ostate.analyze(ostate.load(tmp_path / "ckpt.pt")).set_index("name")
    assert (table["amsgrad_ratio_p50"] >= AMSGRAD_RATIO).any()
    steady_model = Mlp()
    steady = torch.optim.Adam(steady_model.parameters(), lr=1e-4, amsgrad=True)
    trained(steady_model, steady, steps=10)
    assert "amsgrad-stale-max" not in codes(doctor(saved(tmp_path, steady_model, steady, "steady.pt")))


def test_bf16_moments_and_a_model_of_another_dtype_are_flagged(tmp_path):
    model = Mlp().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    trained(model, opt)
    found = codes(doctor(saved(tmp_path, model, opt)))
    assert found["low-precision-moments"].severity == "warning" and len(found["low-precision-moments"].evidence) == 6
    assert "state-dtype-differs" not in found  # bf16 state for bf16 weights
    fp32_model, fp32_opt = trained()
    path = saved(tmp_path, fp32_model, fp32_opt, "fp32.pt")
    torch.save(fp32_model.to(torch.bfloat16).state_dict(), tmp_path / "bf16-model.pt")
    model_weights = read_model(str(tmp_path / "bf16-model.pt"))
    found = codes(doctor(path, model=model_weights.tensors, model_location="bf16-model.pt"))
    assert set(found) == {"state-dtype-differs"}
    assert found["state-dtype-differs"].evidence[0].detail == "state float32, weights bfloat16"


def test_a_model_that_changed_shape_or_lost_a_parameter_disagrees_with_the_optimizer(tmp_path):
    model, opt = trained()
    path = saved(tmp_path, model, opt)
    torch.save(Mlp(out=5).state_dict(), tmp_path / "wider-head.pt")
    result = run_cli("doctor", str(path), "--model", str(tmp_path / "wider-head.pt"), "--format", "json")
    assert result.returncode == EXIT_ERROR
    data = json.loads(result.stdout)
    mismatch = next(f for f in data["findings"] if f["code"] == "shape-mismatch")
    assert {e["subject"] for e in mismatch["evidence"]} == {"head.weight", "head.bias"}
    assert mismatch["evidence"][0]["detail"] == "optimizer 3x16, model 5x16"

    renamed = {k.replace("head.", "out."): v for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    save_file(renamed, tmp_path / "renamed.safetensors")
    d = doctor(path, model=read_model(str(tmp_path / "renamed.safetensors")).tensors)
    gone = codes(d)["state-without-param"]
    assert gone.severity == "error" and {e.subject for e in gone.evidence} == {"head.weight", "head.bias"}
    assert codes(d)["model-params-without-optimizer"].severity == "info"
    same = doctor(path, model=read_model(str(path)).tensors)
    assert same.findings == []


def test_fail_on_chooses_which_findings_fail_the_pipeline(tmp_path):
    model = Normed()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    trained(model, opt)
    path = saved(tmp_path, model, opt)
    assert run_cli("doctor", str(path)).returncode == EXIT_WARNING
    assert run_cli("doctor", str(path), "--fail-on", "error").returncode == EXIT_OK
    assert run_cli("doctor", str(path), "--fail-on", "never").returncode == EXIT_OK
    markdown = run_cli("doctor", str(path), "--format", "markdown")
    assert "### WARNING `weight-decay-on-norms-or-biases`" in markdown.stdout
    missing = run_cli("doctor", str(tmp_path / "nope.pt"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_every_code_is_documented_and_unknown_codes_to_ignore_are_refused(tmp_path):
    import re

    from ostate.doctor.checks import CODES

    source = (REPO / "ostate" / "doctor" / "checks.py").read_text()
    used = set(re.findall(r'"(?:error|warning|info)",\s*"([a-z0-9-]+)"', source)) - {"warning", "error"}
    documented = re.findall(
        r"^\| `([a-z0-9-]+)` \| (?:error|warning|info)", (REPO / "docs" / "doctor.md").read_text(), re.M
    )
    assert used == set(CODES) and tuple(documented) == CODES
    path = tmp_path / "x.pt"
    torch.save({"optimizer": torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()).state_dict()}, path)
    typo = run_cli("doctor", str(path), "--ignore", "secnd-moment-zero,lr-zero")
    assert typo.returncode == 2 and "unknown finding code to ignore: secnd-moment-zero" in typo.stderr


def test_a_bare_optimizer_file_is_named_by_the_model_given_with_model(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.1)  # decays the biases too
    model(torch.randn(2, 3)).square().sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")  # no names, no model
    torch.save(model.state_dict(), tmp_path / "model.pt")
    alone = run_cli("doctor", str(tmp_path / "optimizer.pt"), "--format", "json")
    named = run_cli("doctor", str(tmp_path / "optimizer.pt"), "--model", str(tmp_path / "model.pt"), "--format", "json")
    codes = {f["code"]: f for f in json.loads(named.stdout)["findings"]}
    assert "weight-decay-on-norms-or-biases" not in {f["code"] for f in json.loads(alone.stdout)["findings"]}
    subjects = {e["subject"] for e in codes["weight-decay-on-norms-or-biases"]["evidence"]}
    assert {"0.bias", "1.bias"} <= subjects  # "1.weight" has no norm in its name: kind "other"
