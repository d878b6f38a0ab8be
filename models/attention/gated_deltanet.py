"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024): the delta rule with a Mamba-2 style scalar decay per head.

Per head, with unit-norm q_t, k_t, decay a_t = exp(g_t) and write strength beta_t:

    S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t k_t v_t^T        (state [K, V])
    o_t = S_t^T q_t / sqrt(K)

The layer: q/k/v projections, causal short convolutions with SiLU, L2-normalised q and k,
g_t = -exp(A_log) * softplus(a_proj(x) + dt_bias), beta_t = sigmoid(b_proj(x)), then a per-head RMSNorm gated by
SiLU(g_proj(x)) and the output projection. The core op is fla-core's `chunk_gated_delta_rule` on CUDA and
`naive_recurrent_gated_delta_rule` (note: beta before g) elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.fla_ops import (
    BACKENDS, GatedRMSNorm, ShortConv, check_choice, fla, l2_normalize, log_uniform_dt_bias, reference_precision,
    split_heads, uniform_A_log, use_kernel,
)  # fmt: skip


def gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """q, k `[B, T, H, K]` (unit norm), v `[B, T, H, V]`, g `[B, T, H]` (log decay, float32), beta `[B, T, H]`
    -> o `[B, T, H, V]` in v's dtype. Scale 1/sqrt(K)."""
    if use_kernel(q, backend):
        o, _ = fla("gated_delta_rule").chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta)
        return o
    with reference_precision(q):
        o, _ = fla("gated_delta_rule.naive").naive_recurrent_gated_delta_rule(q=q, k=k, v=v, beta=beta, g=g)
    return o.to(v.dtype)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet mixer, `[B, T, dim] -> [B, T, dim]`, causal.

    Args:
        dim (int): model width.
        num_heads (int): heads. Default: 8.
        head_dim (int): key (and query) dim per head; fla's kernels want at least 16. Default: 16.
        expand_v (float): value head dim = expand_v * head_dim. Default: 1.0.
        conv_size (int): short convolution width. Default: 4.
        use_output_gate (bool): gate the normalised output with SiLU(g_proj(x)). Default: True.
        norm_eps (float): epsilon of the output RMSNorm. Default: 1e-5.
        backend (str): `auto` (kernel on CUDA, reference elsewhere), `kernel` or `reference`. Default: `auto`.

    Init: projections keep PyTorch's Linear init; A = U(1, 16) stored as log; dt_bias = softplus^-1 of a
    log-uniform dt in [1e-3, 0.1] (Mamba's); both are 1-D parameters (AdamW). State per layer: H * K * V.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        head_dim: int = 16,
        expand_v: float = 1.0,
        conv_size: int = 4,
        use_output_gate: bool = True,
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
        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.q_conv = ShortConv(key_dim, conv_size)
        self.k_conv = ShortConv(key_dim, conv_size)
        self.v_conv = ShortConv(value_dim, conv_size)
        self.a_proj = nn.Linear(dim, num_heads, bias=False)
        self.b_proj = nn.Linear(dim, num_heads, bias=False)
        self.A_log = nn.Parameter(uniform_A_log(num_heads, 1.0, 16.0))
        self.dt_bias = nn.Parameter(log_uniform_dt_bias(num_heads))
        self.g_proj = nn.Linear(dim, value_dim, bias=False) if use_output_gate else None
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation="silu")
        self.o_proj = nn.Linear(value_dim, dim, bias=False)

    @property
    def state_size(self) -> int:
        """Recurrent state per layer: H * K * V."""
        return self.num_heads * self.head_k_dim * self.head_v_dim

    def inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`x [B, T, dim]` -> the core op's q, k, v `[B, T, H, *]`, g (float32) and beta `[B, T, H]`."""
        q = l2_normalize(split_heads(self.q_conv(self.q_proj(x)), self.head_k_dim))
        k = l2_normalize(split_heads(self.k_conv(self.k_proj(x)), self.head_k_dim))
        v = split_heads(self.v_conv(self.v_proj(x)), self.head_v_dim)
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        beta = torch.sigmoid(self.b_proj(x))
        return dict(q=q, k=k, v=v, g=g, beta=beta)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Core output `o [B, T, H, V]` -> gated norm -> `[B, T, dim]`."""
        gate = split_heads(self.g_proj(x), self.head_v_dim) if self.g_proj is not None else None
        return self.o_proj(self.o_norm(o, gate).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(gated_delta_rule(**self.inputs(x), backend=self.backend), x)
