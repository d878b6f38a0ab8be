"""The Parallax paper's baselines (conf/attention/<preset>.yaml): whole-model CPU runs, causality, the optimizer split,
and each layer's CPU path against an independent fla reference (or, for Mamba-2's SSD, a sequential recurrence)."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mad.optim import build_optimizers, split_parameters
from models.attention.fla_ops import fla, pad_time, use_kernel
from models.attention.gated_deltanet import GatedDeltaNet
from models.attention.gla import GatedLinearAttention
from models.attention.kda import KimiDeltaAttention
from models.attention.linear_attention import FEATURE_MAPS, LinearAttention
from models.attention.mamba2 import Mamba2, mamba2_ssd, ssd
from models.attention.mesanet import MesaNet, mesa
from models.attention.sliding_window import SlidingWindowAttention
from models.attention.softmax import SoftmaxAttention
from models.backbone import LanguageModel, count_parameters
from models.mlp import SwiGLU

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "attention"
PRESETS = ("mamba2", "gated_deltanet", "mesanet", "kda", "gla", "linear_attention", "sliding_window")
FIXED_STATE = ("mamba2", "gated_deltanet", "mesanet", "kda", "gla", "linear_attention")
FLA_LAYERS = (GatedDeltaNet, KimiDeltaAttention, GatedLinearAttention, MesaNet, LinearAttention, Mamba2)
ISO_STATE = 2048  # state scalars per layer of every fixed-state preset (see the yaml comments)
DIM = 128


def mixer(preset: str):
    """The preset's partial (width -> layer), as mad.run builds it."""
    return instantiate(OmegaConf.load(CONF / f"{preset}.yaml"))


def language_model(preset: str) -> LanguageModel:
    return LanguageModel(16, dim=DIM, num_layers=4, mixer=mixer(preset), mlp=SwiGLU)


def _with_params(preset: str):
    torch.manual_seed(0)
    return pytest.param(preset, id=f"{preset}-{count_parameters(mixer(preset)(DIM))}params")


def test_every_preset_has_a_yaml():
    assert set(PRESETS) <= {p.stem for p in CONF.glob("*.yaml")}


@pytest.mark.parametrize("preset", [_with_params(p) for p in PRESETS])
def test_preset_trains_and_is_causal(preset):
    torch.manual_seed(0)
    model = language_model(preset)
    per_layer = count_parameters(model.stack.layers[0].layer)
    assert 30_000 <= per_layer <= 110_000  # softmax attention: 66,048
    x = torch.randint(0, 16, (2, 12))
    logits = model(x)
    assert logits.shape == (2, 12, 16)
    F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        y = x.clone()
        y[:, 7] = (y[:, 7] + 1) % 16
        out_x, out_y = model(x), model(y)
    torch.testing.assert_close(out_x[:, :7], out_y[:, :7])
    assert not torch.allclose(out_x[:, 7:], out_y[:, 7:])


@pytest.mark.parametrize("preset", FIXED_STATE)
def test_fixed_state_presets_are_iso_state(preset):
    assert mixer(preset)(DIM).state_size == ISO_STATE


@pytest.mark.parametrize("preset", PRESETS)
def test_muon_gets_the_linear_weights_and_adamw_the_ssm_and_conv_parameters(preset):
    model = language_model(preset)
    hidden, rest = split_parameters(model)
    linear_weights = {
        id(m.weight) for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.startswith("head")
    }  # fmt: skip
    assert {id(p) for p in hidden} == linear_weights
    in_adamw = {id(p) for p in rest}
    special = ("A_log", "dt_bias", "D", "lambda_params", "conv.weight", "conv.bias")
    checked = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in special or n.endswith(special[4:])]
    assert bool(checked) == (preset not in ("sliding_window", "gla", "linear_attention"))
    params = dict(model.named_parameters())
    assert all(id(params[n]) in in_adamw and params[n].ndim != 2 for n in checked)
    muon, _ = build_optimizers(model, {
        "name": "muon", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8,
        "momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr_fn": "match_rms_adamw"})  # fmt: skip
    assert isinstance(muon, torch.optim.Muon)


def check_layer_against(layer, reference_core, x, **tol):
    """The layer's CPU output equals its own output stage applied to `reference_core(**projected inputs)`."""
    with torch.no_grad():
        inputs = layer.inputs(x)
        expected = layer.output(reference_core(**inputs), x)
        torch.testing.assert_close(layer(x), expected, **tol)


def test_gated_deltanet_matches_fla_chunk_reference():
    torch.manual_seed(0)
    layer = GatedDeltaNet(DIM)
    naive = fla("gated_delta_rule.naive").naive_chunk_gated_delta_rule
    check_layer_against(
        layer, lambda q, k, v, g, beta: naive(q=q, k=k, v=v, g=g, beta=beta, chunk_size=16)[0], torch.randn(2, 37, DIM)
    )


def test_kda_matches_fla_chunk_reference():
    torch.manual_seed(0)
    layer = KimiDeltaAttention(DIM)
    naive = fla("kda.naive").naive_chunk_kda
    T = 37

    def chunked(q, k, v, g, beta):
        q, k, v, g, beta = (pad_time(t, 16) for t in (q, k, v, g, beta))
        return naive(q=q, k=k, v=v, g=g, beta=beta, chunk_size=16)[0][:, :T]

    check_layer_against(layer, chunked, torch.randn(2, T, DIM), rtol=1e-4, atol=1e-5)


def test_gla_matches_the_dense_formula_in_float64():
    """o_t = sum_{s<=t} sum_d q_td k_sd exp(G_td - G_sd) v_s / sqrt(K), G the running sum of the log decays."""
    torch.manual_seed(0)
    layer = GatedLinearAttention(DIM)

    def dense(q, k, v, gk):
        q, k, v, gk = (t.double() for t in (q, k, v, gk))
        G = gk.cumsum(1)  # [B, T, H, K]
        T = q.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None, None]
        decay = (G[:, :, None] - G[:, None, :]).masked_fill(~causal, -torch.inf).exp()  # [B, T, S, H, K]
        scores = torch.einsum("bthk,bshk,btshk->bhts", q, k, decay) * q.shape[-1] ** -0.5
        return torch.einsum("bhts,bshv->bthv", scores, v).float()

    check_layer_against(layer, dense, torch.randn(2, 29, DIM), rtol=1e-4, atol=1e-5)


def test_mesanet_matches_a_sequential_exact_solve_in_float64():
    """H_t = a_t H_{t-1} + beta_t k_t k_t^T, G_t = a_t G_{t-1} + beta_t k_t v_t^T,
    o_t = G_t^T (H_t + Diag lamb)^-1 q_t."""
    torch.manual_seed(0)
    layer = MesaNet(DIM)

    def sequential(q, k, v, g, beta, lamb):
        q, k, v, g, beta, lamb = (t.double() for t in (q, k, v, g, beta, lamb))
        B, T, H, K = q.shape
        Hkk, Gkv, outs = q.new_zeros(B, H, K, K), q.new_zeros(B, H, K, K), []
        for t in range(T):
            a, b = g[:, t].exp()[..., None, None], beta[:, t][..., None, None]
            Hkk = a * Hkk + b * k[:, t, :, :, None] * k[:, t, :, None, :]
            Gkv = a * Gkv + b * k[:, t, :, :, None] * v[:, t, :, None, :]
            q_star = torch.linalg.solve(Hkk + torch.diag_embed(lamb), q[:, t])
            outs.append(torch.einsum("bhk,bhkv->bhv", q_star, Gkv))
        return torch.stack(outs, dim=1).float()

    check_layer_against(layer, sequential, torch.randn(2, 21, DIM), rtol=1e-4, atol=1e-5)


def test_mesanet_exact_reference_matches_fla_conjugate_gradient_reference():
    """fla's CUDA kernel solves by conjugate gradient; its chunked CG reference agrees with the exact solve we run."""
    torch.manual_seed(0)
    layer = MesaNet(DIM)
    with torch.no_grad():
        inputs = layer.inputs(torch.randn(2, 32, DIM))
        exact = mesa(**inputs, backend="reference")
        cg, _, _ = fla("mesa_net.naive").naive_mesa_net_CG(**inputs, chunk_size=16, max_CG_iteration=30)
    torch.testing.assert_close(exact, cg, rtol=0, atol=1e-3 * exact.abs().max().item())


@pytest.mark.parametrize("feature_map", ["elementwise_product", "elu", "hedgehog", "dpfp"])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_attention_matches_fla_recurrent_reference(feature_map, normalize):
    torch.manual_seed(0)
    layer = LinearAttention(DIM, feature_map=feature_map, normalize=normalize)
    naive = fla("linear_attn.naive").naive_recurrent_linear_attn

    def recurrent(q, k, v):
        return naive(q=q, k=k, v=v, scale=q.shape[-1] ** -0.5, normalize=normalize)[0]

    check_layer_against(layer, recurrent, torch.randn(2, 23, DIM), rtol=1e-4, atol=1e-5)


def sequential_ssd(x, dt, A, B, C):
    """S_t = exp(dt_t A) S_{t-1} + dt_t B_t x_t^T; y_t = S_t^T C_t; one step at a time."""
    b, T, H, P = x.shape
    S = x.new_zeros(b, H, B.shape[-1], P)
    ys = []
    for t in range(T):
        write = dt[:, t, :, None, None] * B[:, t, None, :, None] * x[:, t, :, None, :]  # [b, H, N, P]
        S = torch.exp(dt[:, t] * A)[..., None, None] * S + write
        ys.append(torch.einsum("bhnp,bn->bhp", S, C[:, t]))
    return torch.stack(ys, dim=1)


def ssd_inputs(b=2, T=37, H=3, P=4, N=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, T, H, P, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(b, T, H, generator=g, dtype=dtype))
    A = -torch.rand(H, generator=g, dtype=dtype) * 4 - 0.1
    B, C = (torch.randn(b, T, N, generator=g, dtype=dtype) for _ in range(2))
    return x, dt, A, B, C


@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_ssd_matches_the_sequential_recurrence_in_float64(chunk_size):
    inputs = [t.requires_grad_() for t in ssd_inputs()]
    y = ssd(*inputs, chunk_size=chunk_size)
    y_ref = sequential_ssd(*inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), inputs)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_ssd_is_fla_simple_gla_the_op_the_cuda_path_runs():
    x, dt, A, B, C = ssd_inputs(dtype=torch.float32)
    H = x.shape[2]
    q, k = (t[:, :, None].expand(-1, -1, H, -1) for t in (C, B))
    y_fla, _ = fla("simple_gla.naive").naive_chunk_simple_gla(q=q, k=k, v=x * dt[..., None], g=dt * A, scale=1.0)
    torch.testing.assert_close(mamba2_ssd(x, dt, A, B, C, backend="reference"), y_fla, rtol=1e-4, atol=1e-4)


def test_mamba2_layer_runs_the_ssd_on_cpu():
    torch.manual_seed(0)
    layer = Mamba2(DIM)
    x = torch.randn(2, 19, DIM)
    with torch.no_grad():
        inputs = layer.inputs(x)
        z = inputs.pop("z")
        y = sequential_ssd(*(t.double() for t in (inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])))
        torch.testing.assert_close(layer(x), layer.output(y.float(), inputs["x"], z), rtol=1e-4, atol=1e-5)


def test_sliding_window_sees_exactly_the_window():
    torch.manual_seed(0)
    window = 4
    layer = SlidingWindowAttention(DIM, window=window)
    x = torch.randn(1, 12, DIM)
    y = x.clone()
    y[:, 2] += 1.0
    with torch.no_grad():
        out_x, out_y = layer(x), layer(y)
    torch.testing.assert_close(out_x[:, :2], out_y[:, :2])
    assert not torch.allclose(out_x[:, 2 : 3 + window], out_y[:, 2 : 3 + window])
    torch.testing.assert_close(out_x[:, 3 + window :], out_y[:, 3 + window :])  # key 2 is out of every later window


def test_sliding_window_wider_than_the_sequence_is_softmax_attention():
    torch.manual_seed(0)
    softmax = SoftmaxAttention(DIM)
    sliding = SlidingWindowAttention(DIM, window=64)
    sliding.load_state_dict(softmax.state_dict())
    x = torch.randn(2, 20, DIM)
    torch.testing.assert_close(sliding(x), softmax(x), rtol=1e-5, atol=1e-6)


def test_unknown_feature_map_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown feature_map 'nope'; allowed: " + ", ".join(FEATURE_MAPS)):
        LinearAttention(DIM, feature_map="nope")


@pytest.mark.parametrize("cls", FLA_LAYERS, ids=lambda c: c.__name__)
def test_unknown_backend_lists_the_allowed_ones(cls):
    with pytest.raises(ValueError, match="unknown backend 'triton'; allowed: auto, kernel, reference"):
        cls(DIM, backend="triton")


def test_kernel_backend_on_cpu_says_what_to_use():
    assert use_kernel(torch.zeros(1), "auto") is False and use_kernel(torch.zeros(1), "reference") is False
    with pytest.raises(ValueError, match="need CUDA tensors"):
        use_kernel(torch.zeros(1), "kernel")


def test_gpu_check_script_runs_its_reference_half_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("check_fla_baselines", REPO / "benchmarks" / "check_fla_baselines.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    out = tmp_path / "baselines.md"
    check.main(["--cpu-dry-run", "--out", str(out), "--batch", "1", "--seq-len", "20"])
    text = out.read_text()
    for cls in FLA_LAYERS:
        assert cls.__name__ in text
    assert "torch" in text and "--cpu-dry-run" in text
