"""MesaNet (von Oswald et al. 2025): each token's output is a ridge-regression readout of the (decayed) past.

Per head, with unit-norm q_t, k_t, decay a_t = exp(g_t) and weight beta_t, two states are kept:

    H_t = a_t H_{t-1} + beta_t k_t k_t^T      [K, K]
    G_t = a_t G_{t-1} + beta_t k_t v_t^T      [K, V]
    o_t = G_t^T (H_t + Diag(lambda))^{-1} q_t

The layer (as fla's): q/k projections with causal short convolutions (SiLU), a plain v projection, L2-normalised
q and k, g = logsigmoid(a_proj(x)), beta = sigmoid(b_proj(x)), lambda = softplus(lambda_params) + lambda_lower_bound
per key channel, then a per-head RMSNorm (optionally gated) and the output projection. The core op is fla-core's
`chunk_mesa_net` (conjugate gradient, `max_cg_steps` iterations) on CUDA and `naive_mesa_net_exact` (an exact
solve per token; note its argument order q, k, v, g, lamb, beta) elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.fla_ops import (
    BACKENDS, GatedRMSNorm, ShortConv, check_choice, fla, l2_normalize, reference_precision, split_heads, use_kernel,
)  # fmt: skip


def mesa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    lamb: torch.Tensor,
    *,
    max_cg_steps: int = 30,
    backend: str = "auto",
) -> torch.Tensor:
    """q, k, v `[B, T, H, K]` (q, k unit norm; MesaNet needs V = K), g `[B, T, H]` (log decay), beta `[B, T, H]`
    (both float32), lamb `[H, K]` (> 0) -> o `[B, T, H, K]` in v's dtype. No 1/sqrt(K) scale."""
    if use_kernel(q, backend):
        o, _, _ = fla("mesa_net").chunk_mesa_net(
            q=q, k=k, v=v, g=g, beta=beta, lamb=lamb, max_CG_iteration=max_cg_steps
        )
        return o
    with reference_precision(q):
        o, _, _ = fla("mesa_net.naive").naive_mesa_net_exact(q=q, k=k, v=v, g=g, lamb=lamb, beta=beta)
    return o.to(v.dtype)


class MesaNet(nn.Module):
    """MesaNet mixer, `[B, T, dim] -> [B, T, dim]`, causal.

    Args:
        dim (int): model width.
        num_heads (int): heads. Default: 4.
        head_dim (int): key = value dim per head (fla's kernel requires them equal; at least 16). Default: 16.
        conv_size (int): short convolution width (q and k). Default: 4.
        use_output_gate (bool): gate the normalised output with SiLU(g_proj(x)). Default: False (fla's default).
        lambda_lower_bound (float): lambda = softplus(lambda_params) + this; keeps the solve well-conditioned.
            Default: 0.25.
        max_cg_steps (int): conjugate-gradient iterations of the CUDA kernel. Default: 30.
        norm_eps (float): epsilon of the output RMSNorm. Default: 1e-5.
        backend (str): `auto`, `kernel` or `reference`. Default: `auto`.

    Init (fla's): PyTorch's Linear init; lambda_params set so that lambda starts at 1.0 (1-D, AdamW); the a/b
    projection biases are zeroed by the backbone, so a fresh layer decays by sigmoid(~0) ~ 0.5 per step and
    writes with beta ~ 0.5. State per layer: 2 * H * K * K (both H_t and G_t).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 4,
        head_dim: int = 16,
        conv_size: int = 4,
        use_output_gate: bool = False,
        lambda_lower_bound: float = 0.25,
        max_cg_steps: int = 30,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if lambda_lower_bound <= 0:
            raise ValueError(f"lambda_lower_bound must be > 0 (it bounds the ridge term), got {lambda_lower_bound}")
        self.backend = check_choice("backend", backend, BACKENDS)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.lambda_lower_bound, self.max_cg_steps = lambda_lower_bound, max_cg_steps
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.q_conv = ShortConv(inner, conv_size)
        self.k_conv = ShortConv(inner, conv_size)
        self.a_proj = nn.Linear(dim, num_heads)
        self.b_proj = nn.Linear(dim, num_heads)
        lambda_init = torch.log(torch.expm1(torch.tensor(1.0 - lambda_lower_bound)))  # softplus^-1: lambda = 1
        self.lambda_params = nn.Parameter(torch.full((inner,), lambda_init.item()))
        self.g_proj = nn.Linear(dim, inner, bias=False) if use_output_gate else None
        self.o_norm = GatedRMSNorm(head_dim, eps=norm_eps, activation="silu")
        self.o_proj = nn.Linear(inner, dim, bias=False)

    @property
    def state_size(self) -> int:
        """Recurrent state per layer: 2 * H * K * K (H_t and G_t)."""
        return 2 * self.num_heads * self.head_dim**2

    def inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`x [B, T, dim]` -> q, k, v `[B, T, H, K]`, g, beta `[B, T, H]` (float32) and lamb `[H, K]`."""
        q = l2_normalize(split_heads(self.q_conv(self.q_proj(x)), self.head_dim))
        k = l2_normalize(split_heads(self.k_conv(self.k_proj(x)), self.head_dim))
        v = split_heads(self.v_proj(x), self.head_dim)
        g = F.logsigmoid(self.a_proj(x).float())
        beta = torch.sigmoid(self.b_proj(x).float())
        lamb = (F.softplus(self.lambda_params.float()) + self.lambda_lower_bound).view(self.num_heads, self.head_dim)
        return dict(q=q, k=k, v=v, g=g, beta=beta, lamb=lamb)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Core output `o [B, T, H, K]` -> (gated) RMSNorm -> `[B, T, dim]`."""
        gate = split_heads(self.g_proj(x), self.head_dim) if self.g_proj is not None else None
        return self.o_proj(self.o_norm(o, gate).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(mesa(**self.inputs(x), max_cg_steps=self.max_cg_steps, backend=self.backend), x)
