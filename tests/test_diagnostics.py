"""mad/diagnostics.py: the pure statistics on hand-built inputs, the recomputed internals against each layer's own
forward, and that diagnostics never change training."""

import json
import math
from functools import partial

import pytest
import torch

from mad.diagnostics import (
    attention_internals, attention_statistics, correction_ratio, effective_weights, model_diagnostics, stable_rank,
    stable_ranks, weight_statistics,
)  # fmt: skip
from models.attention.parallax import ParallaxAttention
from models.attention.sliding_window import SlidingWindowAttention
from models.attention.softmax import SoftmaxAttention
from models.backbone import LanguageModel
from models.mlp import SwiGLU
from tests.conftest import REPO, records_under
from tests.forked_python import run_script

DIM, HEADS = 32, 4


def test_stable_rank_of_orthogonal_rank_one_and_zero_matrices():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 5, 16):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        assert stable_rank(q) == pytest.approx(n, rel=1e-12)
    rank_one = torch.randn(7, 1, generator=gen) @ torch.randn(1, 5, generator=gen)
    assert stable_rank(rank_one) == pytest.approx(1.0, rel=1e-6)
    assert stable_rank(torch.zeros(4, 4)) == 0.0
    assert stable_rank(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(5 / 4)


def test_stable_ranks_match_the_singular_values_on_one_thread(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    weights = {"wide": torch.randn(3, 7, generator=gen), "tall": torch.randn(9, 4, generator=gen),
               ("block", 0): torch.randn(5, 5, generator=gen, dtype=torch.float64)}  # fmt: skip
    threads_in_solver = []
    eigvalsh = torch.linalg.eigvalsh

    def counting_eigvalsh(a):
        threads_in_solver.append(torch.get_num_threads())
        return eigvalsh(a)

    monkeypatch.setattr(torch.linalg, "eigvalsh", counting_eigvalsh)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ranks = stable_ranks(weights)
        assert threads_in_solver == [1, 1, 1] and torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(threads)
    for name, w in weights.items():
        s = torch.linalg.svdvals(w.double())
        assert ranks[name] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-10)
    diverged = stable_ranks({"ok": torch.eye(3), "inf": torch.tensor([[math.inf, 1.0], [0.0, 1.0]])})
    assert diverged["ok"] == pytest.approx(3.0) and math.isnan(diverged["inf"])
    with pytest.raises(ValueError, match=r"2-D matrix, got shape \(4,\) for 'bias'"):
        stable_ranks({"bias": torch.ones(4)})


def _hand_built():
    """One head, T = 3: rows 1 and 2 get negative weights, row 1 a weight of 1.5 (hand-computed below)."""
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    u = torch.tensor([[0.0, 9.0, 9.0], [0.0, 4.0, 9.0], [1.0, 0.0, 4.0]], dtype=torch.float64)  # 9: masked, ignored
    return p, u


def test_weight_statistics_on_a_hand_built_pattern():
    p, u = _hand_built()
    w = effective_weights(p, u)
    # Row 1: u_bar = 2, w = 0.5 (1 + 2 - 0), 0.5 (1 + 2 - 4). Row 2: u_bar = 0.2 + 0 + 2 = 2.2.
    expected = torch.tensor([[1.0, 0, 0], [1.5, -0.5, 0], [0.2 * 2.2, 0.3 * 3.2, 0.5 * -0.8]], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    stats = weight_statistics(p, w)
    # Rows i >= 1: 5 visible weights 1.5, -0.5, 0.44, 0.96, -0.4.
    assert stats["negative_fraction"] == pytest.approx(2 / 5)
    assert stats["above_one_fraction"] == pytest.approx(1 / 5)
    assert stats["max_abs_weight"] == pytest.approx(1.5)
    assert stats["sink_mass"] == pytest.approx((1.5 + 0.44) / 2)
    assert stats["sink_mass_base"] == pytest.approx((0.5 + 0.2) / 2)
    entropy_2 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
    assert stats["entropy"] == pytest.approx((math.log(2) + entropy_2) / 2)


def test_scaled_effective_weights_and_correction_ratio_by_hand():
    p, u = _hand_built()
    w = effective_weights(p, u, scale=torch.tensor([[1.0], [0.5], [0.0]], dtype=torch.float64))
    assert w[1, :2].tolist() == pytest.approx([0.5 * 2, 0.5 * 0])  # s = 1/2: p (1 + (u_bar - u) / 2)
    torch.testing.assert_close(w[2], p[2])  # s = 0 gives softmax
    ratio = correction_ratio(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([[0.0, 5.0], [0.0, 0.0]]))
    assert ratio.tolist() == [1.0, 0.0]  # a zero correction has ratio 0 even where v_bar = 0


def test_softmax_attention_has_no_negative_weights_and_rows_summing_to_one():
    torch.manual_seed(0)
    layer = SoftmaxAttention(DIM, num_heads=HEADS)
    x = torch.randn(3, 17, DIM)
    internals = attention_internals(layer, x)
    w = effective_weights(internals["p"], internals["u"], internals["scale"])
    assert internals["u"] is None and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3, HEADS, 17), rtol=0, atol=1e-6)
    assert torch.triu(w, diagonal=1).abs().max() == 0  # causal
    stats = attention_statistics(layer, x)
    assert stats["negative_fraction"] == 0.0 and stats["above_one_fraction"] == 0.0
    assert stats["correction_ratio_mean"] == 0.0 and stats["sink_mass"] == stats["sink_mass_base"]


@pytest.mark.parametrize("gate", ["none", "scalar", "input"])
def test_correction_ratio_is_exactly_zero_with_a_zero_probe(gate):
    torch.manual_seed(0)
    layer = ParallaxAttention(DIM, num_heads=HEADS, probe_init="zero", gate=gate)
    stats = attention_statistics(layer, torch.randn(2, 12, DIM))
    assert stats["correction_ratio_mean"] == 0.0 and stats["correction_ratio_p90"] == 0.0
    assert stats["negative_fraction"] == 0.0 and stats["sink_mass"] == stats["sink_mass_base"]


LAYERS = {
    "softmax": partial(SoftmaxAttention, num_heads=HEADS),
    "parallax": partial(ParallaxAttention, num_heads=HEADS),
    "parallax_scalar_gate": partial(ParallaxAttention, num_heads=HEADS, gate="scalar"),
    "parallax_input_gate_temperature": partial(ParallaxAttention, num_heads=HEADS, gate="input", temperature="learned"),
    "parallax_amplified_qk_norm": partial(ParallaxAttention, num_heads=HEADS, amplification=True, qk_norm=True),
    "lla_solved": partial(ParallaxAttention, num_heads=HEADS, probe="solved", amplification=True),
    "lla_cg_gated": partial(ParallaxAttention, num_heads=HEADS, probe="cg", gate="scalar", cg_steps=3),
    "probe_zero": partial(ParallaxAttention, num_heads=HEADS, probe="zero"),
}


@pytest.mark.parametrize("name", LAYERS)
def test_recomputed_internals_reproduce_the_layer_output(name):
    # float64, so the comparison is exact up to rounding; except that the learned probe's amplification factor is
    # evaluated in float32 by the layer itself (and 1 - delta . r cancels), which bounds that case at ~1e-4 relative.
    torch.manual_seed(0)
    layer = LAYERS[name](DIM).double()
    with torch.no_grad():  # gates and temperatures away from their init, so they matter
        for param_name, param in layer.named_parameters():
            if "gate" in param_name or "temperature" in param_name:
                param.normal_(0.0, 0.5)
    x = torch.randn(2, 19, DIM, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        internals = attention_internals(layer, x)
        o = internals["v_bar"] + internals["correction"]  # [B, H, T, D]
        tol = 1e-3 * expected.abs().max().item() if name == "parallax_amplified_qk_norm" else 1e-9
        torch.testing.assert_close(layer.out_proj(o.transpose(1, 2).flatten(-2)), expected, rtol=tol, atol=tol)
        w = effective_weights(internals["p"], internals["u"], internals["scale"])
        v = layer.project(x)[2].transpose(1, 2)
        torch.testing.assert_close(w @ v, o, rtol=1e-9, atol=1e-9)  # o is the w-weighted sum of the values
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=0, atol=1e-9)


def _model(mixer, vocab: int = 11) -> LanguageModel:
    return LanguageModel(vocab, dim=DIM, num_layers=4, mixer=mixer, mlp=lambda d: SwiGLU(d, hidden_dim=48))


def test_model_diagnostics_are_json_and_leave_model_and_random_stream_untouched():
    torch.manual_seed(0)
    model = _model(partial(ParallaxAttention, num_heads=HEADS, gate="scalar")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = torch.randint(0, 11, (5, 21))
    rng = torch.get_rng_state()
    diagnostics = model_diagnostics(model, inputs)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    json.dumps(diagnostics, allow_nan=False)
    attention, mlp = diagnostics["layers"][0], diagnostics["layers"][1]
    assert attention["block"] == 0 and attention["type"] == "ParallaxAttention" and attention["gate"] == "scalar"
    assert set(attention["stable_rank"]) == {"q_proj", "k_proj", "v_proj", "out_proj", "r_proj"}
    assert attention["gate_mean"] == pytest.approx(0.5) and attention["correction_ratio_mean"] > 0
    assert mlp["type"] == "SwiGLU" and "entropy" not in mlp and len(mlp["stable_rank"]) == 3
    assert set(diagnostics["stable_rank"]) == {"stack.embedding", "head"}


def test_other_mixers_get_stable_ranks_only():
    torch.manual_seed(0)
    model = _model(partial(SlidingWindowAttention, num_heads=HEADS, window=4))
    diagnostics = model_diagnostics(model, torch.randint(0, 11, (2, 9)))
    layer = diagnostics["layers"][0]
    assert layer["type"] == "SlidingWindowAttention" and "correction_ratio_mean" not in layer
    assert layer["stable_rank"]["q_proj"] > 0


def test_long_sequences_are_processed_in_chunks(monkeypatch):
    torch.manual_seed(0)
    model = _model(partial(ParallaxAttention, num_heads=HEADS, gate="input"))
    inputs = torch.randint(0, 11, (5, 13))
    whole = model_diagnostics(model, inputs)
    monkeypatch.setattr("mad.diagnostics._CHUNK_ELEMENTS", 1)  # one sequence per chunk, in the forward and the stats
    monkeypatch.setattr("mad.diagnostics._FORWARD_ELEMENTS", 1)
    chunked = model_diagnostics(model, inputs)
    for a, b in zip(whole["layers"], chunked["layers"]):
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if isinstance(v, float)} == pytest.approx(
            {k: v for k, v in b.items() if isinstance(v, float)}, rel=1e-5, abs=1e-7)  # fmt: skip


TINY = ["profile=smoke", "progress=false", "task.num_train_examples=96", "task.num_test_examples=64",
        "task.seq_len=24", "train.epochs=2", "attention=parallax_gated", "optimizer=muon",
        "diagnostics_batch=16"]  # fmt: skip
_DIAGNOSTIC_FIELDS = ("diagnostics_at_init",)
_TIMING_FIELDS = ("wall_time_s", "tokens_per_s", "started_at", "finished_at", "config")


def test_diagnostics_on_and_off_train_bit_identically(cli, tmp_path):
    for flag in ("true", "false"):
        proc = cli([*TINY, f"diagnostics={flag}", f"hydra.run.dir=run_{flag}"])
        assert proc.returncode == 0, proc.stderr
    on, off = (json.loads((tmp_path / f"run_{f}" / "result.json").read_text()) for f in ("true", "false"))
    assert len(on["history"]["diagnostics"]) == on["epochs_run"] == 2 and "diagnostics_at_init" in on
    assert "diagnostics" not in off["history"] and "diagnostics_at_init" not in off
    on_history = {k: v for k, v in on["history"].items() if k not in ("diagnostics", "seconds")}
    assert on_history == {k: v for k, v in off["history"].items() if k != "seconds"}
    ignored = (*_DIAGNOSTIC_FIELDS, *_TIMING_FIELDS, "history")
    assert {k: v for k, v in on.items() if k not in ignored} == {k: v for k, v in off.items() if k not in ignored}
    assert {k: v for k, v in on["config"].items() if k != "diagnostics"} == {
        k: v for k, v in off["config"].items() if k != "diagnostics"}  # fmt: skip
    weights = [torch.load(tmp_path / f"run_{f}" / "model.pt") for f in ("true", "false")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert records_under(tmp_path / "run_true")[0]["history"]["diagnostics"][-1]["layers"][2]["gate_mean"] > 0


def test_diagnostics_profile_script_runs_on_cpu(tmp_path):
    """benchmarks/profile_diagnostics.py, which times the diagnostics on the GPU, runs end to end (CPU: a script test)."""
    proc = run_script("benchmarks/profile_diagnostics.py", ["--attentions", "parallax", "--seq-len", "16", "--batch",
                                                            "4", "--top", "3", "--out", tmp_path], cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "diagnostics_profile.md").read_text()
    assert "## parallax:" in report and "not a measurement" in report and "aten::" in report
