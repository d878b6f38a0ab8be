"""Gated Linear Attention (GLA, Yang et al. 2023), as MAD's `mh-gated-linear-attention`.

Per head, with channel decays a_t = exp(gk_t) in (0, 1]^K:

    S_t = Diag(a_t) S_{t-1} + k_t v_t^T      (state [K, V]);      o_t = S_t^T q_t / sqrt(K)

The layer: q/k/v projections (no short convolution, as MAD and fla), a low-rank gate
gk = logsigmoid(W2 W1 x + b) / gate_logit_normalizer, then a per-head RMSNorm times SiLU(g_proj(x)) and the output
projection. The core op is fla-core's `chunk_gla` on CUDA and `naive_recurrent_gla` elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.fla_ops import (
    BACKENDS, GatedRMSNorm, check_choice, fla, reference_precision, split_heads, use_kernel,
)  # fmt: skip


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """q, k `[B, T, H, K]`, v `[B, T, H, V]`, gk `[B, T, H, K]` (log decay, float32) -> o `[B, T, H, V]` in v's
    dtype. Scale 1/sqrt(K)."""
    if use_kernel(q, backend):
        o, _ = fla("gla").chunk_gla(q=q, k=k, v=v, g=gk)
        return o
    with reference_precision(q):
        o, _ = fla("gla.naive").naive_recurrent_gla(q=q, k=k, v=v, gk=gk)
    return o.to(v.dtype)


class GatedLinearAttention(nn.Module):
    """GLA mixer, `[B, T, dim] -> [B, T, dim]`, causal.

    Args:
        dim (int): model width.
        num_heads (int): heads. Default: 8.
        head_dim (int): key/query dim per head (fla's kernels want at least 16). Default: 16.
        expand_v (float): value head dim = expand_v * head_dim. Default: 1.0.
        gate_low_rank_dim (int): rank of the forget-gate projection. Default: 16.
        gate_logit_normalizer (float): divides logsigmoid of the gate logits (slower decay). Default: 16.
        norm_eps (float): epsilon of the output RMSNorm. Default: 1e-5.
        backend (str): `auto`, `kernel` or `reference`. Default: `auto`.

    Init (MAD's and fla's GLA): every projection Xavier-uniform with gain 2^-2.5; the gate bias is zeroed by the
    backbone, so a fresh gate decays by exp(logsigmoid(~0) / 16) ~ 0.96 per step. State per layer: H * K * V.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        head_dim: int = 16,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
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
        self.gate_logit_normalizer = gate_logit_normalizer
        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(dim, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, key_dim)
        )
        self.g_proj = nn.Linear(dim, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation="silu")
        self.o_proj = nn.Linear(value_dim, dim, bias=False)
        for linear in (self.q_proj, self.k_proj, self.v_proj, *self.gk_proj, self.g_proj, self.o_proj):
            nn.init.xavier_uniform_(linear.weight, gain=2**-2.5)

    @property
    def state_size(self) -> int:
        """Recurrent state per layer: H * K * V."""
        return self.num_heads * self.head_k_dim * self.head_v_dim

    def inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`x [B, T, dim]` -> q, k, v `[B, T, H, *]` and gk `[B, T, H, K]` (float32)."""
        q = split_heads(self.q_proj(x), self.head_k_dim)
        k = split_heads(self.k_proj(x), self.head_k_dim)
        v = split_heads(self.v_proj(x), self.head_v_dim)
        gk = F.logsigmoid(split_heads(self.gk_proj(x), self.head_k_dim).float()) / self.gate_logit_normalizer
        return dict(q=q, k=k, v=v, gk=gk)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Core output `o [B, T, H, V]` -> RMSNorm * SiLU(g_proj x) -> `[B, T, dim]`."""
        return self.o_proj(self.o_norm(o, split_heads(self.g_proj(x), self.head_v_dim)).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(gla(**self.inputs(x), backend=self.backend), x)
