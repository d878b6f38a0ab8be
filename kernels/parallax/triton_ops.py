"""The Triton Parallax forward and backward as PyTorch custom operators, so that torch.compile treats them as opaque.

Traced directly, the kernels' launch code (autotuner, config pruning) breaks TorchDynamo; as `torch.library`
operators with fake (shape-only) implementations they sit in a compiled graph as single nodes, and the stacked
training can compile a Parallax model (mad/stacked_model.py, benchmarks/bench_throughput.py). The operators look
up `kernels.parallax.triton` when called, so a test that re-imports it under Triton's interpreter is served by
the interpreted kernels; they are registered once, here.
"""

from __future__ import annotations

import importlib

import torch


def _kernels():
    return importlib.import_module("kernels.parallax.triton")


@torch.library.custom_op("mad_parallax::triton_fwd", mutates_args=())
def triton_fwd(q: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """`(o, lse2, u_bar, o_stat, v_bar_stat)` of `kernels.parallax.triton.parallax_fwd`, autotuned."""
    return _kernels().parallax_fwd(q, r, k, v, scale)


@triton_fwd.register_fake
def _(q, r, k, v, scale):
    B, T_q, H, _ = q.shape
    stats = _kernels().stat_dtype(q.dtype)
    shape = q.shape if stats else (0,)
    copies = (q.new_empty(shape, dtype=stats or q.dtype), q.new_empty(shape, dtype=stats or q.dtype))
    row = (B, H, T_q)
    return torch.empty_like(q), q.new_empty(row, dtype=torch.float32), q.new_empty(row, dtype=torch.float32), *copies


@torch.library.custom_op("mad_parallax::triton_bwd", mutates_args=())
def triton_bwd(q: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse2: torch.Tensor,
               u_bar: torch.Tensor, o_stat: torch.Tensor, v_bar_stat: torch.Tensor, grad_o: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """`(dq, dr, dk, dv)` of `kernels.parallax.triton.parallax_bwd`, autotuned."""
    return _kernels().parallax_bwd(q, r, k, v, lse2, u_bar, o_stat, v_bar_stat, grad_o, scale)


@triton_bwd.register_fake
def _(q, r, k, v, lse2, u_bar, o_stat, v_bar_stat, grad_o, scale):
    return torch.empty_like(q), torch.empty_like(r), torch.empty_like(k), torch.empty_like(v)
