"""Kimi Delta Attention (KDA, Kimi Linear 2025): Gated DeltaNet with a decay per key channel instead of per head.

Per head, with unit-norm q_t, k_t, channel decays a_t = exp(g_t) in (0, 1]^K and write strength beta_t:

    S_t = (I - beta_t k_t k_t^T) Diag(a_t) S_{t-1} + beta_t k_t v_t^T      (state [K, V])
    o_t = S_t^T q_t / sqrt(K)

The layer: q/k/v projections with causal short convolutions (SiLU), L2-normalised q and k, a low-rank forget-gate
projection f (dim -> head_v_dim -> H*K) with g = -exp(A_log) * softplus(f + dt_bias), beta = sigmoid(b_proj(x)),
and a per-head RMSNorm gated by sigmoid of a low-rank output-gate projection. The core op is fla-core's
`chunk_kda` on CUDA and `naive_recurrent_kda` elsewhere (the recurrent reference is the faster one on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.fla_ops import (
    BACKENDS, GatedRMSNorm, ShortConv, check_choice, fla, l2_normalize, reference_precision, split_heads,
    uniform_A_log, use_kernel,
)  # fmt: skip


def kda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """q, k `[B, T, H, K]` (unit norm), v `[B, T, H, V]`, g `[B, T, H, K]` (log decay, float32), beta `[B, T, H]`
    -> o `[B, T, H, V]` in v's dtype. Scale 1/sqrt(K)."""
    if use_kernel(q, backend):
        o, _ = fla("kda").chunk_kda(q=q, k=k, v=v, g=g, beta=beta)
        return o
    with reference_precision(q):
        o, _ = fla("kda.naive").naive_recurrent_kda(q=q, k=k, v=v, g=g, beta=beta)
    return o.to(v.dtype)


class KimiDeltaAttention(nn.Module):
    """KDA mixer, `[B, T, dim] -> [B, T, dim]`, causal.

    Args:
        dim (int): model width.
        num_heads (int): heads. Default: 8.
        head_dim (int): key/query dim per head (fla's kernels want at least 16). Default: 16.
        expand_v (float): value head dim = expand_v * head_dim. Default: 1.0.
        conv_size (int): short convolution width. Default: 4.
        gate_rank (int | None): rank of the forget-gate and output-gate projections; None = value head dim (as
            fla's layer). Default: None.
        norm_eps (float): epsilon of the output RMSNorm. Default: 1e-5.
        backend (str): `auto`, `kernel` or `reference`. Default: `auto`.

    Init: PyTorch's Linear init; A = U(1, 16) per head stored as log; dt_bias [H*K] zeros (as fla's layer).
    A_log and dt_bias are 1-D (AdamW). The output-gate bias is zeroed by the backbone: the gate starts at 0.5.
    State per layer: H * K * V.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        head_dim: int = 16,
        expand_v: float = 1.0,
        conv_size: int = 4,
        gate_rank: int | None = None,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.backend = check_choice("backend", backend, BACKENDS)
        self.num_heads, self.head_k_dim = num_heads, head_dim
        self.head_v_dim = int(head_dim * expand_v)
        if self.head_v_dim != head_dim * expand_v:
            raise ValueError(f"expand_v={expand_v} times head_dim={head_dim} is not an integer value head dim")
        key_dim, value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim
        rank = gate_rank or self.head_v_dim
        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.q_conv = ShortConv(key_dim, conv_size)
        self.k_conv = ShortConv(key_dim, conv_size)
        self.v_conv = ShortConv(value_dim, conv_size)
        self.f_proj = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, key_dim, bias=False))
        self.b_proj = nn.Linear(dim, num_heads, bias=False)
        self.A_log = nn.Parameter(uniform_A_log(num_heads, 1.0, 16.0))
        self.dt_bias = nn.Parameter(torch.zeros(key_dim))
        self.g_proj = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, value_dim, bias=True))
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation="sigmoid")
        self.o_proj = nn.Linear(value_dim, dim, bias=False)

    @property
    def state_size(self) -> int:
        """Recurrent state per layer: H * K * V."""
        return self.num_heads * self.head_k_dim * self.head_v_dim

    def inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`x [B, T, dim]` -> q, k, v `[B, T, H, *]`, g `[B, T, H, K]` (float32) and beta `[B, T, H]`."""
        q = l2_normalize(split_heads(self.q_conv(self.q_proj(x)), self.head_k_dim))
        k = l2_normalize(split_heads(self.k_conv(self.k_proj(x)), self.head_k_dim))
        v = split_heads(self.v_conv(self.v_proj(x)), self.head_v_dim)
        f = split_heads(self.f_proj(x).float() + self.dt_bias.float(), self.head_k_dim)  # [B, T, H, K]
        g = -self.A_log.float().exp()[:, None] * F.softplus(f)
        beta = torch.sigmoid(self.b_proj(x))
        return dict(q=q, k=k, v=v, g=g, beta=beta)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Core output `o [B, T, H, V]` -> sigmoid-gated norm -> `[B, T, dim]`."""
        return self.o_proj(self.o_norm(o, split_heads(self.g_proj(x), self.head_v_dim)).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(kda(**self.inputs(x), backend=self.backend), x)
