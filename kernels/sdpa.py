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

# The order in which the training loops let SDPA pick its kernel: cuDNN's fused attention first. PyTorch's default
# tries flash first; at the MAD shapes (16 heads of dim 8, batch 128, L = 128 to 1024, bf16, causal) cuDNN's forward +
# backward measured 0.17 / 0.36 / 0.97 / 2.92 ms against flash's 0.20 / 0.50 / 1.42 / 4.12 ms on the H200
# (analysis/kernels/parallax_train_bench.md, MAD rows). A backend that cannot take a call (cuDNN on the CPU, or a
# shape it refuses) passes it to the next, as in the default order.
PREFERRED_BACKENDS = (
    SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
)


@contextlib.contextmanager
def preferred_backends():
    """Context (or, as `@preferred_backends()`, decorator) in which SDPA tries `PREFERRED_BACKENDS` in that order;
    around a whole training loop, so that `torch.compile` traces and CUDA graphs capture the kernels it picks."""
    with sdpa_kernel(list(PREFERRED_BACKENDS), set_priority=True):
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
