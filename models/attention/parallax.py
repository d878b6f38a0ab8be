"""Parallax attention: softmax attention plus a learned probe r = W_R x per head (docs: kernels/parallax/reference.py)."""

from __future__ import annotations

import torch
from torch import nn

from kernels.parallax import parallax_attention
from models.attention.softmax import SoftmaxAttention

PROBE_INITS = ("default", "zero")


class ParallaxAttention(SoftmaxAttention):
    """Softmax attention whose output is corrected by the p-weighted key-value covariance applied to a probe.

    Args:
        dim, num_heads, bias, qk_norm, rotary_base: as `SoftmaxAttention`; `qk_norm` also normalises r.
        probe_init (str): `default` (PyTorch's Linear init, like W_Q) or `zero` (W_R = 0: a fresh layer computes
            exactly what softmax attention computes). Default: `default`.

    The probe takes the query's role against the keys, so it is rotated with the query's position.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 16,
        bias: bool = True,
        qk_norm: bool = False,
        rotary_base: float = 10_000.0,
        probe_init: str = "default",
    ) -> None:
        super().__init__(dim, num_heads=num_heads, bias=bias, qk_norm=qk_norm, rotary_base=rotary_base)
        if probe_init not in PROBE_INITS:
            raise ValueError(f"unknown probe_init {probe_init!r}; allowed: {', '.join(PROBE_INITS)}")
        self.r_proj = nn.Linear(dim, dim, bias=False)
        self.r_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if qk_norm else nn.Identity()
        self.probe_init = probe_init
        if probe_init == "zero":
            nn.init.zeros_(self.r_proj.weight)
            self.r_proj.keep_init = True  # the backbone's weight init must not overwrite the zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        (r,) = self.rotary(self.r_norm(self.split_heads(self.r_proj(x))))
        out = parallax_attention(q, r, k, v)  # [B, T, H, D]
        return self.out_proj(out.flatten(-2))
