"""The Parallax family as config axes of ParallaxAttention: probes (zero, learned, solved, cg), amplification,
temperature and gate, checked against softmax attention and an independent weighted least-squares oracle."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kernels.parallax.lla import conjugate_gradient, local_linear_attention
from models.attention.parallax import ParallaxAttention
from models.attention.softmax import SoftmaxAttention
from models.backbone import LanguageModel
from models.mlp import SwiGLU

NEW_PRESETS = ("parallax_gated", "lla", "lla_cg")
CONF = Path(__file__).resolve().parents[1] / "conf" / "attention"


def lstsq_intercepts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> np.ndarray:
    """`[B, T, H, D_v]` float64: per row with >= D + 1 keys, the intercept of the p-weighted fit of v_j on
    [1, k_j - q_i] by numpy lstsq; NaN on shorter rows."""
    q, k, v = (x.detach().double().numpy() for x in (q, k, v))
    B, T, H, D = q.shape
    out = np.full(v.shape, np.nan)
    for b in range(B):
        for h in range(H):
            for i in range(D, T):
                keys = k[b, : i + 1, h]
                logits = scale * keys @ q[b, i, h]
                p = np.exp(logits - logits.max())
                sqrt_p = np.sqrt(p / p.sum())[:, None]
                design = np.concatenate((np.ones((i + 1, 1)), keys - q[b, i, h]), axis=1)
                coef = np.linalg.lstsq(sqrt_p * design, sqrt_p * v[b, : i + 1, h], rcond=None)[0]
                out[b, i, h] = coef[0]
    return out


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def copy_of(softmax: SoftmaxAttention, **fields) -> ParallaxAttention:
    """A ParallaxAttention with `softmax`'s q/k/v/out weights (its own weights elsewhere)."""
    layer = ParallaxAttention(softmax.q_proj.in_features, num_heads=softmax.num_heads, **fields)
    layer.load_state_dict(softmax.state_dict(), strict=False)
    return layer


def test_solved_probe_with_amplification_is_the_weighted_least_squares_intercept():
    # these draws keep every amplification factor below 400, clear of the 1e4 cap (rows with D + 1 keys extrapolate)
    q, k, v = rand(1, 12, 2, 3, seed=0), rand(1, 12, 2, 3, seed=1), rand(1, 12, 2, 3, seed=2)
    out = local_linear_attention(q, k, v, scale=0.6, probe="solved", ridge=0.0, amplification=True)
    expected = lstsq_intercepts(q, k, v, 0.6)
    fits = ~np.isnan(expected)
    np.testing.assert_allclose(out.numpy()[fits], expected[fits], rtol=1e-8, atol=1e-8)
    heads = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    softmax = torch.nn.functional.scaled_dot_product_attention(*heads, is_causal=True, scale=0.6).transpose(1, 2)
    torch.testing.assert_close(out[:, :3], softmax[:, :3])  # rows with < D + 1 keys: r = 0


def test_solved_layer_in_float64_is_the_intercept_of_its_rotated_queries_and_keys():
    torch.manual_seed(0)
    layer = ParallaxAttention(8, num_heads=2, probe="solved", amplification=True, ridge=0.0).double()
    x = rand(1, 10, 8, seed=3)
    q, k, v = layer.project(x)
    expected = torch.from_numpy(lstsq_intercepts(q, k, v, 4**-0.5))[:, 4:]  # head_dim 4: rows 4.. fit
    torch.testing.assert_close(layer(x)[:, 4:], layer.out_proj(expected.flatten(-2)), rtol=1e-8, atol=1e-8)


def test_conjugate_gradient_converges_to_the_solve_within_d_steps():
    d = 5
    x = rand(3, 4, d, 2 * d, seed=4)
    a = x @ x.transpose(-1, -2) / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64)  # SPD
    b = rand(3, 4, d, seed=5)
    exact = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
    errors = [(conjugate_gradient(a, b, steps=s) - exact).norm(dim=-1).max().item() for s in range(1, d + 1)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] <= 1e-6


def test_cg_probe_layer_matches_the_solved_one_at_head_dim_steps():
    torch.manual_seed(0)
    solved = ParallaxAttention(16, num_heads=4, probe="solved", amplification=True).double()
    cg = copy_of(solved, probe="cg", amplification=True, cg_steps=4).double()
    x = rand(2, 9, 16, seed=6)
    torch.testing.assert_close(cg(x), solved(x), rtol=1e-6, atol=1e-8)


def test_zero_probe_is_softmax_attention_with_the_same_state_dict():
    torch.manual_seed(0)
    softmax = SoftmaxAttention(32, num_heads=4)
    zero = ParallaxAttention(32, num_heads=4, probe="zero")
    zero.load_state_dict(softmax.state_dict())  # strict: no extra parameters
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(zero(x), softmax(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate", ["none", "scalar", "input"])
def test_learned_probe_with_zero_weights_is_softmax(gate):
    torch.manual_seed(0)
    softmax = SoftmaxAttention(32, num_heads=4)
    layer = copy_of(softmax, probe_init="zero", gate=gate, temperature="learned")
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(layer(x), softmax(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate,probe", [("scalar", "learned"), ("input", "learned"), ("scalar", "solved")])
def test_closed_gate_is_softmax(gate, probe):
    torch.manual_seed(0)
    softmax = SoftmaxAttention(32, num_heads=4)
    layer = copy_of(softmax, gate=gate, probe=probe, amplification=True)
    logit = layer.gate_logit.weight if gate == "scalar" else layer.gate_proj.bias
    with torch.no_grad():
        logit.fill_(-1e4)  # sigmoid -> 0
    x = torch.randn(2, 11, 32)
    torch.testing.assert_close(layer(x), softmax(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logit.zero_()
    assert not torch.allclose(layer(x), softmax(x), atol=1e-3)  # the correction is live once opened


def test_checkpoints_with_bare_head_parameters_still_load():
    """Weights written when the gate logit and log-temperature were bare parameters (`...gate_logit`) load into
    their HeadVectors (`...gate_logit.weight`)."""
    layer = ParallaxAttention(32, num_heads=4, gate="scalar", temperature="learned")
    old = {k.removesuffix(".weight") if k.endswith(("gate_logit.weight", "log_temperature.weight")) else k: v
           for k, v in layer.state_dict().items()}  # fmt: skip
    old["gate_logit"] = torch.full((4,), 2.0)
    assert "gate_logit" in old and "log_temperature" in old
    fresh = ParallaxAttention(32, num_heads=4, gate="scalar", temperature="learned")
    fresh.load_state_dict(old)  # strict
    assert torch.equal(fresh.gate_logit.weight, torch.full((4,), 2.0))


def test_learned_temperature_starts_at_the_fixed_scale_and_sharpens_when_lowered():
    torch.manual_seed(0)
    fixed = ParallaxAttention(32, num_heads=4)
    learned = copy_of(fixed, temperature="learned")
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(learned(x), fixed(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        learned.log_temperature.weight.fill_(-1.0)
    assert not torch.allclose(learned(x), fixed(x), atol=1e-3)


@pytest.mark.parametrize("probe", ["solved", "cg"])
@pytest.mark.parametrize("seq_len,sharpness", [(5, 1.0), (20, 1.0), (20, 300.0)])
def test_lla_probes_stay_finite_in_float32_without_ridge(probe, seq_len, sharpness):
    """T < head_dim + 1 (every row falls back), and a near one-hot softmax (M numerically singular)."""
    torch.manual_seed(0)
    layer = ParallaxAttention(32, num_heads=4, probe=probe, amplification=True, ridge=0.0, cg_steps=3)
    with torch.no_grad():
        layer.q_proj.weight.mul_(sharpness)
    x = torch.randn(2, seq_len, 32, requires_grad=True)
    out = layer(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def language_model(preset: str) -> LanguageModel:
    mixer = instantiate(OmegaConf.load(CONF / f"{preset}.yaml"))
    return LanguageModel(16, dim=128, num_layers=4, mixer=mixer, mlp=SwiGLU)


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_new_preset_trains_and_is_causal(preset):
    torch.manual_seed(0)
    model = language_model(preset)
    x = torch.randint(0, 16, (2, 16))
    logits = model(x)
    logits.logsumexp(-1).mean().backward()
    assert torch.isfinite(logits).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    y = x.clone()
    y[:, 11] = (y[:, 11] + 1) % 16  # row 11 sees 12 > head_dim + 1 keys: the LLA probes are active there
    with torch.no_grad():
        torch.testing.assert_close(model(y)[:, :11], logits[:, :11])
        assert not torch.allclose(model(y)[:, 11:], logits[:, 11:])


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("probe", "exact", "zero, learned, solved, cg"),
        ("probe_init", "xavier", "default, zero"),
        ("temperature", "annealed", "fixed, learned"),
        ("gate", "vector", "none, scalar, input"),
        ("amplification", "yes", "true, false"),
        ("ridge", -1.0, "0.0"),
        ("ridge", float("nan"), "0.0"),
        ("cg_steps", 0, "1, 2"),
        ("cg_steps", 2.5, "1, 2"),
    ],
)
def test_bad_field_values_are_rejected_with_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=allowed):
        ParallaxAttention(32, num_heads=4, **{field: value})


@pytest.mark.parametrize(
    "fields",
    [
        {"probe": "zero", "gate": "scalar"},
        {"probe": "zero", "amplification": True},
        {"probe": "solved", "probe_init": "zero"},
    ],
)
def test_fields_that_would_be_ignored_are_rejected(fields):
    with pytest.raises(ValueError, match="allowed|use probe_init"):
        ParallaxAttention(32, num_heads=4, **fields)
