"""Multi-head causal softmax attention with rotary positions (MAD's `mh-attention`: 16 heads of dim 8)."""

from __future__ import annotations

import torch
from kernels.softmax import check_kernel, softmax_attention
from torch import nn

from models.rotary import Rotary


class SoftmaxAttention(nn.Module):
    """Causal multi-head attention, through `scaled_dot_product_attention` or fla-core's Triton kernel.

    Args:
        dim (int): model width; must be divisible by `num_heads`.
        num_heads (int): heads of dim `dim // num_heads`. Default: 16.
        bias (bool): biases on the q/k/v/out projections, as MAD's flash-attn MHA. Default: True.
        qk_norm (bool): per-head RMSNorm on q and k before rotary. Default: False.
        rotary_base (float): rotary base. Default: 10000.
        kernel (str): `sdpa` or `fla` (kernels/softmax.py says when each runs). Default: `sdpa`.
    """

    def __init__(
        self, dim: int, *, num_heads: int = 16, bias: bool = True, qk_norm: bool = False, rotary_base: float = 10_000.0,
        kernel: str = "sdpa",
    ) -> None:
        super().__init__()
        check_kernel(kernel)
        self.kernel = kernel
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}; pick a divisor of {dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if qk_norm else nn.Identity()
        self.rotary = Rotary(self.head_dim, base=rotary_base)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, dim] -> [B, T, H, D]`."""
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`x [B, T, dim]` -> q, k (normed, rotated) and v, each `[B, T, H, D]`."""
        q = self.q_norm(self.split_heads(self.q_proj(x)))
        k = self.k_norm(self.split_heads(self.k_proj(x)))
        q, k = self.rotary(q, k)
        return q, k, self.split_heads(self.v_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        # The explicit scale is the float the Parallax reference passes too, so both compute identical bits.
        out = softmax_attention(q, k, v, scale=self.head_dim**-0.5, kernel=self.kernel)
        return self.out_proj(out.flatten(-2))  # [B, T, H, D] -> [B, T, dim]
