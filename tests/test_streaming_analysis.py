"""The streaming analysis on real optimizer state: views, weights, trouble fractions, workers, heads."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

import ostate
import ostate.analysis.params as params_module
from ostate.analysis import HeadLayout, summarize
from ostate.analysis.compress import SharedSecondMoment
from ostate.analysis.quantize import BlockwiseError
from tests.helpers.common import Net, run_cli, saved, train

# Every test here runs with the compiled loops and with the torch ops (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("arithmetic")


class TinyAttention(nn.Module):
    """Embedding, one attention block with q/k/v projections, a LayerNorm and a head."""

    def __init__(self, vocab: int = 50, width: int = 32, heads: int = 4):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab)
        self.heads = heads

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        b, t, d = h.shape
        split = lambda x: x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        att = nn.functional.scaled_dot_product_attention(
            split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)), is_causal=True
        )
        return self.lm_head(self.norm(h + att.transpose(1, 2).reshape(b, t, d)))


def train_attention(steps: int = 3, seed: int = 0, **opt_kwargs):
    torch.manual_seed(seed)
    model = TinyAttention()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **opt_kwargs)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 10, (4, 6), generator=g)  # tokens 10..49 never appear: zero rows in v
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def test_kind_view_groups_parameters_by_their_kind_in_a_fixed_order(tmp_path):
    model, opt = train_attention()
    table = ostate.analyze(ostate.load(saved(tmp_path, model, opt)), by="kind")
    assert list(table["param_kind"]) == ["embedding", "weight", "norm", "bias"]
    assert table.set_index("param_kind").loc["weight", "params"] == 4  # q, k, v, lm_head
    assert table["numel"].sum() == sum(p.numel() for p in model.parameters())


def test_weight_rms_and_update_to_weight_ratio_use_the_checkpoint_weights(tmp_path):
    model, opt = train_attention()
    checkpoint = ostate.load(saved(tmp_path, model, opt))
    params = ostate.analyze(checkpoint).set_index("name")
    for name, p in model.named_parameters():
        assert params.loc[name, "weight_rms"] == pytest.approx(float(p.detach().square().mean().sqrt()), rel=1e-5)
        update = params.loc[name, "update_rms"]
        assert params.loc[name, "update_to_weight_rms"] == pytest.approx(
            update / params.loc[name, "weight_rms"], rel=1e-5
        )
    # A merged row is the ratio of the merged RMS values, not the mean of the members' ratios.
    layer = ostate.analyze(checkpoint, by="kind").set_index("param_kind").loc["weight"]
    members = [n for n in params.index if params.loc[n, "param_kind"] == "weight"]
    updates = sum(params.loc[n, "update_rms"] ** 2 * params.loc[n, "numel"] for n in members)
    weights = sum(params.loc[n, "weight_rms"] ** 2 * params.loc[n, "numel"] for n in members)
    assert layer["update_to_weight_rms"] == pytest.approx(math.sqrt(updates / weights), rel=1e-6)
    assert layer["update_to_weight_rms"] != pytest.approx(params.loc[members, "update_to_weight_rms"].mean(), rel=1e-3)


def test_a_bare_optimizer_state_has_no_weight_columns(tmp_path):
    model, opt = train_attention()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    table = ostate.analyze(ostate.load(path))
    assert "weight_rms" not in table.columns and "update_to_weight_rms" not in table.columns


def test_second_moment_zero_fraction_counts_embedding_rows_that_never_had_a_gradient(tmp_path):
    model, opt = train_attention()
    table = ostate.analyze(ostate.load(saved(tmp_path, model, opt))).set_index("name")
    v = opt.state[model.embed_tokens.weight]["exp_avg_sq"]
    expected = float((v == 0).double().mean())
    assert expected >= 0.75  # 40 of 50 tokens never appear
    assert table.loc["embed_tokens.weight", "second_moment_zero_frac"] == pytest.approx(expected, abs=0)


def test_eps_dominated_fraction_is_the_share_of_coordinates_with_sqrt_vhat_at_most_eps(tmp_path):
    model, opt = train_attention(eps=1e-3)
    table = ostate.analyze(ostate.load(saved(tmp_path, model, opt))).set_index("name")
    for name, p in model.named_parameters():
        state = opt.state[p]
        vhat = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
        expected = float((vhat.sqrt() <= 1e-3).double().mean())
        assert table.loc[name, "eps_dominated_frac"] == pytest.approx(expected, abs=1e-6)
    assert 0 < table["eps_dominated_frac"].max() <= 1


def test_nonfinite_fraction_counts_coordinates_with_nan_or_inf_in_any_state_tensor(tmp_path):
    model, opt = train_attention()
    state = opt.state[model.q_proj.weight]
    state["exp_avg"].view(-1)[:7] = float("nan")
    state["exp_avg_sq"].view(-1)[5:10] = float("inf")  # overlaps two of the NaN coordinates
    table = ostate.analyze(ostate.load(saved(tmp_path, model, opt))).set_index("name")
    assert table.loc["q_proj.weight", "nonfinite_frac"] == pytest.approx(10 / model.q_proj.weight.numel())
    assert table.loc["k_proj.weight", "nonfinite_frac"] == 0
    assert table.loc["q_proj.weight", "exp_avg_sq_nonfinite"] == 5


def test_step_spread_shows_parameters_of_one_group_at_different_steps(tmp_path):
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, opt, steps=2)
    model.head.weight.requires_grad_(False)  # frozen for the next steps: its step stays at 2
    train(model, opt, steps=3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    group = ostate.analyze(ostate.load(path), by="group").iloc[0]
    assert (group["step_min"], group["step_max"], group["step_spread"]) == (2.0, 5.0, 3.0)


def test_quantization_error_columns_equal_the_blockwise_round_trip_of_each_moment(tmp_path):
    model, opt = train_attention()
    table = ostate.analyze(ostate.load(saved(tmp_path, model, opt))).set_index("name")
    state = opt.state[model.lm_head.weight]
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        acc = BlockwiseError(signed)
        acc.add(state[key].reshape(-1))
        assert table.loc["lm_head.weight", f"{key}_q8_relerr"] == pytest.approx(acc.relative_error, rel=1e-9)
        assert 0 < acc.relative_error < 0.1


def test_vmean_columns_match_a_direct_float64_computation(tmp_path):
    model, opt = train_attention()
    checkpoint = ostate.load(saved(tmp_path, model, opt))
    table = summarize(checkpoint, heads=HeadLayout(head_dim=8)).table().set_index("name")
    state = opt.state[model.q_proj.weight]
    step = float(state["step"])
    m = state["exp_avg"].double()
    vhat = state["exp_avg_sq"].double() / (1 - 0.999**step)
    a = 1 / (vhat.sqrt() + 1e-8)

    def change(block_rows: int) -> float:
        blocks = vhat.view(-1, block_rows * vhat.shape[1]).mean(1)
        shared = (1 / (blocks.sqrt() + 1e-8)).repeat_interleave(block_rows * vhat.shape[1]).view_as(m)
        return float((m * (a - shared)).norm() / (m * a).norm())

    row = table.loc["q_proj.weight"]
    assert row["vmean_tensor_relchange"] == pytest.approx(change(32), rel=1e-6)
    assert row["vmean_row_relchange"] == pytest.approx(change(1), rel=1e-6)
    assert row["vmean_head_relchange"] == pytest.approx(change(8), rel=1e-6)
    assert math.isnan(table.loc["lm_head.weight", "vmean_head_relchange"])  # not an attention projection


def test_a_small_relative_change_keeps_its_precision():
    # v nearly constant within each row: replacing it by the row mean changes the update by ~1e-5.
    torch.manual_seed(0)
    rows, cols = 64, 1000
    m = torch.randn(rows, cols)
    v = torch.rand(rows, 1) * 1e-4 * (1 + 1e-5 * torch.randn(rows, cols))
    acc = SharedSecondMoment.for_shape((rows, cols))
    from ostate.optimizers.family import Preconditioned

    flat_m, flat_v = m.reshape(-1), v.reshape(-1)
    for start in range(0, rows * cols, 4096):  # chunks that cut rows in two
        piece = flat_v[start : start + 4096]
        acc.add(start, Preconditioned(flat_m[start : start + 4096], piece, 1 / (piece.sqrt() + 1e-8), 1e-8))
    sums = acc.sums(None)
    a = 1 / (v.double().sqrt() + 1e-8)
    shared = 1 / (v.double().mean(1, keepdim=True).sqrt() + 1e-8)
    exact = float((m.double() * (a - shared)).norm() / (m.double() * a).norm())
    assert exact < 1e-4
    assert math.sqrt(sums["vmean_row_err_sq"] / sums["vmean_update_sq"]) == pytest.approx(exact, rel=1e-3)


def test_results_do_not_depend_on_the_number_of_workers_or_the_chunk_size(tmp_path, monkeypatch):
    model, opt = train_attention()
    checkpoint = ostate.load(saved(tmp_path, model, opt))
    base = {by: summarize(checkpoint, workers=1).table(by) for by in ("param", "layer", "model")}
    for by in base:
        pd.testing.assert_frame_equal(summarize(checkpoint, workers=3).table(by), base[by])
    monkeypatch.setattr(params_module, "READ_CHUNK", 512)  # several chunks per tensor, rows cut in two
    monkeypatch.setattr(params_module, "RELEASE_EVERY", 1024)
    chunked = summarize(checkpoint, workers=2).table()
    pd.testing.assert_frame_equal(chunked, summarize(checkpoint, workers=1).table())
    for column in ("eff_lr_p50", "exp_avg_sq_q8_relerr", "vmean_row_relchange", "update_to_weight_rms"):
        assert chunked[column].to_numpy() == pytest.approx(base["param"][column].to_numpy(), rel=1e-5)


def test_merged_sketches_of_a_view_are_available_for_plots(tmp_path):
    model, opt = train_attention()
    analysis = summarize(ostate.load(saved(tmp_path, model, opt)))
    (model_row,) = analysis.rows("model")
    values, counts = model_row.sketches["eff_lr"].histogram()
    assert int(counts.sum()) == sum(p.numel() for p in model.parameters())
    assert sorted(model_row.members) == sorted(n for n, _ in model.named_parameters())
    kinds = {r.key: r for r in analysis.rows("kind")}
    assert kinds["norm"].sketches["exp_avg_sq"].count == 2 * 32


def test_head_size_comes_from_a_config_json_beside_the_checkpoint(tmp_path):
    model, opt = train_attention()
    path = saved(tmp_path, model, opt)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 4}))
    result = run_cli("inspect", str(path), "--format", "json", "--compressibility")
    data = json.loads(result.stdout)
    rows = {r["name"]: r for r in data["optimizers"][0]["params"]}
    assert rows["q_proj.weight"]["vmean_head_relchange"] is not None
    assert rows["lm_head.weight"]["vmean_head_relchange"] is None
    assert any("head_dim=8 (config)" in note for note in data["notes"])


def test_without_a_head_size_the_report_says_how_to_give_one(tmp_path):
    model, opt = train_attention()
    path = saved(tmp_path, model, opt)
    out = run_cli("inspect", str(path), "--by", "layer", "--columns", "layer,vmean_head_relchange").stdout
    assert "note: vmean_head_relchange needs the attention head size" in out and "--heads N" in out
    data = json.loads(
        run_cli("inspect", str(path), "--format", "json", "--heads", "4", "--by", "kind", "--columns", "all").stdout
    )
    weight = {r["param_kind"]: r for r in data["optimizers"][0]["rows"]}["weight"]
    assert weight["vmean_head_relchange"] is not None


def test_cli_workers_and_kind_view(tmp_path):
    model, opt = train_attention()
    path = saved(tmp_path, model, opt)
    one = json.loads(run_cli("inspect", str(path), "--format", "json", "--workers", "1").stdout)
    two = json.loads(run_cli("inspect", str(path), "--format", "json", "--workers", "2").stdout)
    assert one["optimizers"][0]["params"] == two["optimizers"][0]["params"]
    text = run_cli("inspect", str(path), "--by", "kind").stdout
    assert "param_kind" in text and "embedding" in text and "update_to_weight_rms" in text
    bad = run_cli("inspect", str(path), "--workers", "0")
    assert bad.returncode == 2


def test_a_state_saved_at_step_zero_gives_empty_figures_not_a_crash(tmp_path):
    model, opt = train_attention()
    for state in opt.state.values():
        state["step"].zero_()
    table = ostate.analyze(ostate.load(saved(tmp_path, model, opt))).set_index("name")
    assert len(table) == len(list(model.parameters()))
    assert math.isnan(table.loc["q_proj.weight", "snr_p50"]) and table["exp_avg_abs_mean"].notna().all()


def test_default_inspect_computes_only_the_core_and_says_so(tmp_path):
    # Compressibility and the 8-bit error are computed only when asked for; the core numbers
    # are the same either way, and the JSON names the statistic families it holds.
    model, opt = train_attention()
    path = str(saved(tmp_path, model, opt))
    default = json.loads(run_cli("inspect", path, "--format", "json", "--heads", "4").stdout)
    assert default["statistics"] == ["core"]
    row = default["optimizers"][0]["params"][0]
    assert not [c for c in row if c.startswith("vmean_") or c.endswith("_q8_relerr")]
    assert "eps_dominated_frac" in row and "eff_lr_p50" in row
    full = json.loads(run_cli("inspect", path, "--format", "json", "--heads", "4", "--compressibility").stdout)
    assert full["statistics"] == ["core", "compressibility", "q8"]
    assert json.loads(run_cli("inspect", path, "--format", "json", "--heads", "4", "--columns", "all").stdout) == full
    for small, large in zip(default["optimizers"][0]["params"], full["optimizers"][0]["params"]):
        assert {k: large[k] for k in small} == small
        assert large["exp_avg_sq_q8_relerr"] is not None and "vmean_row_relchange" in large
    named = json.loads(run_cli("inspect", path, "--format", "json", "--columns", "name,exp_avg_q8_relerr").stdout)
    assert named["statistics"] == ["core", "q8"]
    assert "exp_avg_q8_relerr" in named["optimizers"][0]["params"][0]
    assert "vmean_row_relchange" not in named["optimizers"][0]["params"][0]
    by_sort = json.loads(run_cli("inspect", path, "--format", "json", "--sort", "vmean_row_relchange").stdout)
    assert by_sort["statistics"] == ["core", "compressibility"]


def test_summarize_core_only_matches_the_full_analysis_where_both_have_columns(tmp_path):
    model, opt = train_attention()
    checkpoint = ostate.load(saved(tmp_path, model, opt))
    core = summarize(checkpoint, statistics=())
    full = summarize(checkpoint)
    assert core.statistics == ("core",) and full.statistics == ("core", "compressibility", "q8")
    for by in ("param", "model"):
        small, large = core.table(by), full.table(by)
        assert "exp_avg_q8_relerr" in large.columns and "exp_avg_q8_relerr" not in small.columns
        pd.testing.assert_frame_equal(small, large[list(small.columns)])
    with pytest.raises(ostate.OstateError, match="unknown statistics"):
        summarize(checkpoint, statistics=["q4"])
