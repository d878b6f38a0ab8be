"""kernels/sdpa.py: SDPA that torch.vmap folds into the batch gives each slice what its own call gives."""

import pytest
import torch
import torch.nn.functional as F

from kernels.sdpa import sdpa


def _inputs(n=3, b=2, h=4, t=9, d=8):
    torch.manual_seed(0)
    return [torch.randn(n, b, h, t, d, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("masked", [False, True])
def test_vmapped_sdpa_matches_each_slice_forward_and_backward(masked):
    q, k, v = _inputs()
    mask = torch.rand(9, 9) > 0.3 if masked else None
    if mask is not None:
        mask.fill_diagonal_(True)  # every row sees a key
    kwargs = dict(attn_mask=mask, is_causal=not masked, scale=0.3)
    got = torch.vmap(lambda q, k, v: sdpa(q, k, v, **kwargs))(q, k, v)
    want = torch.stack([F.scaled_dot_product_attention(q[i], k[i], v[i], **kwargs) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_vmapped_sdpa_takes_unbatched_operands_and_follows_autocast():
    q, k, v = _inputs()
    shared_k = k[0].detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.vmap(lambda q, v: sdpa(q, shared_k, v, is_causal=True))(q, v)
        want = torch.stack([F.scaled_dot_product_attention(q[i], shared_k, v[i], is_causal=True) for i in range(3)])
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_vmapped_sdpa_refuses_a_per_slice_mask():
    q, k, v = _inputs()
    masks = torch.ones(3, 9, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match="one \\[T_q, T_k\\] attn_mask"):
        torch.vmap(lambda q, k, v, m: sdpa(q, k, v, attn_mask=m))(q, k, v, masks)


def test_preferred_backends_put_cudnn_first_and_keep_what_the_user_switched_off():
    from torch.nn.attention import SDPBackend

    from kernels.sdpa import preferred_backends

    default = torch._C._get_sdp_priority_order()
    with preferred_backends():
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    assert torch._C._get_sdp_priority_order() == default
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        with preferred_backends():
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.FLASH_ATTENTION)
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
        torch._C._set_sdp_priority_order(default)  # sdpa_kernel's exit reorders the disabled backends
