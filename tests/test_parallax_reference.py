import pytest
import torch
import torch.nn.functional as F

from kernels.parallax import parallax_attention


def definition(q, r, k, v, scale):
    """Loop over rows, straight from o_i = sum_j p_ij (1 + u_bar_i - u_ij) v_j, in float64 (causal, GQA)."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    out = torch.empty(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, :, h // group].double(), v[b, :, h // group].double()
            for i in range(T):
                p = torch.softmax(scale * kh[: i + 1] @ q[b, i, h].double(), dim=0)
                u = kh[: i + 1] @ r[b, i, h].double()
                w = p * (1 + (p * u).sum() - u)
                out[b, i, h] = w @ vh[: i + 1]
    return out


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (2, 1)])
def test_matches_the_definition_in_float64(heads, kv_heads):
    q, r = rand(2, 7, heads, 8), rand(2, 7, heads, 8)
    k, v = rand(2, 7, kv_heads, 8), rand(2, 7, kv_heads, 8)
    out = parallax_attention(q, r, k, v, scale=0.3)
    torch.testing.assert_close(out, definition(q, r, k, v, 0.3), rtol=1e-10, atol=1e-10)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, r, k, v = (rand(1, 5, 2, 16) for _ in range(4))
    torch.testing.assert_close(parallax_attention(q, r, k, v), definition(q, r, k, v, 16**-0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_probe_is_softmax_attention(dtype):
    q, k, v = (rand(2, 9, 4, 8, dtype=dtype) for _ in range(3))
    out = parallax_attention(q, torch.zeros_like(q), k, v)
    sdpa = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v)), is_causal=True)
    assert out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), sdpa.transpose(1, 2), rtol=tol, atol=tol)


def test_effective_weights_sum_to_one_so_constant_values_pass_through():
    q, r, k = (rand(1, 6, 2, 4) for _ in range(3))
    v = torch.full((1, 6, 2, 4), 3.5, dtype=torch.float64)
    torch.testing.assert_close(parallax_attention(q, 10 * r, k, v), v)


def test_decode_query_sees_the_whole_cache():
    q, r, k, v = rand(2, 6, 2, 8), rand(2, 6, 2, 8), rand(2, 6, 2, 8), rand(2, 6, 2, 8)
    full = parallax_attention(q, r, k, v)
    last = parallax_attention(q[:, -1:], r[:, -1:], k, v)
    torch.testing.assert_close(last, full[:, -1:])


def test_gradcheck_float64():
    inputs = [rand(1, 5, 2, 4).requires_grad_() for _ in range(4)]
    assert torch.autograd.gradcheck(lambda q, r, k, v: parallax_attention(q, r, k, v), inputs)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (rand(2, 5, 4), rand(2, 5, 4), rand(2, 5, 4), rand(2, 5, 4)), "4-D"),
        (lambda: (rand(1, 5, 2, 4), rand(1, 5, 2, 4), rand(1, 5, 2, 4), rand(1, 5, 2, 4, dtype=torch.float32)), "one dtype"),
        (lambda: (rand(1, 5, 2, 4), rand(1, 5, 2, 8), rand(1, 5, 2, 4), rand(1, 5, 2, 4)), "shape of q"),
        (lambda: (rand(1, 5, 3, 4), rand(1, 5, 3, 4), rand(1, 5, 2, 4), rand(1, 5, 2, 4)), "multiple"),
        (lambda: (rand(1, 5, 2, 4), rand(1, 5, 2, 4), rand(1, 4, 2, 4), rand(1, 4, 2, 4)), "at least as many keys"),
        (lambda: tuple(torch.ones(1, 2, 1, 2, dtype=torch.long) for _ in range(4)), "dtype"),
    ],
)
def test_bad_inputs_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        parallax_attention(*make())
