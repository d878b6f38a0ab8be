"""`scaled_dot_product_attention` that `torch.vmap` batches by folding the vmapped dimension into the batch.

Under vmap, PyTorch has no batching rule for the fused SDPA kernels: it falls back to a loop over the vmapped
dimension, and on CUDA the memory-efficient kernel's backward then fails ("LSE is not correctly aligned"). The
stacked training of mad/stacked_model.py vmaps every attention layer over N runs, so every SDPA call of our models
goes through `sdpa` here: outside vmap it is `F.scaled_dot_product_attention` itself; under vmap a
`torch.autograd.Function` whose vmap rule folds the runs into the batch, so one fused kernel does N runs' work.
That function's backward recomputes the attention forward (SDPA's saved statistics are backend-specific), which
costs one extra attention forward per training step of a stack.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.batching import fold_vmapped

# The order in which the training loops let SDPA pick its kernel: cuDNN's fused attention first, where PyTorch's
# default tries flash first. A 6-run MAD stack's training step (16 heads of dim 8, the runs folded into a batch of
# 768, bf16, causal, CUDA graph + torch.compile) measured 2.59 / 5.69 / 11.53 / 25.73 / 63.47 ms at L = 32 / 128 /
# 256 / 512 / 1024 this way against 3.26 / 6.12 / 12.90 / 30.18 / 75.04 ms in the default order on the H200
# (analysis/throughput/epoch_softmax*.md). One kernel call at batch 128 (analysis/kernels/parallax_train_bench.md,
# MAD rows) is 1.4-1.5x faster at L >= 256, but at L = 128 runs have disagreed (cuDNN 0.18-0.25 ms, flash 0.20).
# Its bf16 error is a little larger: 1.46e-2 against flash's 1.16e-2 (max-norm, output and gradients vs fp32, at
# B=32 H=16 L=512 D=8). Benchmarks set this to PyTorch's order to measure the difference.
PREFERRED_BACKENDS = (
    SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
)
_ENABLED = {  # what the user has switched on (torch.backends.cuda.enable_*_sdp), which the order must not undo
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
    SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
}


@contextlib.contextmanager
def preferred_backends():
    """Context (or, as `@preferred_backends()`, decorator) in which SDPA tries the enabled backends of
    `PREFERRED_BACKENDS` in that order (a backend that cannot take a call, such as cuDNN on the CPU, passes it to
    the next); around a whole training loop, so that `torch.compile` traces and CUDA graphs capture its picks."""
    order = [b for b in PREFERRED_BACKENDS if _ENABLED[b]()]
    with sdpa_kernel(order, set_priority=True):
        yield


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, ...)` on `[B, H, T, D]`; under vmap, folded into the batch.

    Under vmap `attn_mask` must be one `[T_q, T_k]` mask for every slice and batch row; autocast is applied to q, k, v
    before the fold (as SDPA's own autocast rule would), so the backward's recomputation sees the same dtypes.
    """
    if not _is_vmapped(q, k, v, attn_mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    if attn_mask is not None and (_is_vmapped(attn_mask) or attn_mask.dim() > 2):
        raise ValueError("sdpa under vmap takes one [T_q, T_k] attn_mask for all slices and batch rows, got "
                         + ("a vmapped mask" if _is_vmapped(attn_mask) else f"shape {tuple(attn_mask.shape)}"))
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        q, k, v = (x.to(dtype) for x in (q, k, v))
    return FoldedSDPA.apply(q, k, v, attn_mask, is_causal, scale)


def _is_vmapped(*tensors: torch.Tensor | None) -> bool:
    # functorch has no public "inside vmap" query; a vmapped tensor is a BatchedTensor wrapper.
    return any(x is not None and torch._C._functorch.is_batchedtensor(x) for x in tensors)


class FoldedSDPA(torch.autograd.Function):
    """SDPA with a vmap rule (vmapped dim folded into the batch); backward by recomputing the forward."""

    @staticmethod
    def forward(q, k, v, attn_mask, is_causal, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, is_causal, scale = inputs
        ctx.save_for_backward(q, k, v)
        ctx.attn_mask, ctx.is_causal, ctx.scale = attn_mask, is_causal, scale

    @staticmethod
    def backward(ctx, grad_out):
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in ctx.saved_tensors]
            out = F.scaled_dot_product_attention(*leaves, attn_mask=ctx.attn_mask, is_causal=ctx.is_causal,
                                                 scale=ctx.scale)  # fmt: skip
        return (*torch.autograd.grad(out, leaves, grad_out), None, None, None)

    @staticmethod
    def vmap(info, in_dims, q, k, v, attn_mask, is_causal, scale):
        q, k, v = (fold_vmapped(x, d, info.batch_size) for x, d in zip((q, k, v), in_dims[:3]))  # [N * B, H, T, D]
        out = FoldedSDPA.apply(q, k, v, attn_mask, is_causal, scale)
        return out.unflatten(0, (info.batch_size, -1)), 0
