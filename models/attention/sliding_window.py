"""Sliding-window softmax attention (MAD's `mh-sliding-attention`): causal attention over the last `window` keys."""

from __future__ import annotations

import torch
from kernels.sdpa import sdpa

from models.attention.softmax import SoftmaxAttention


def sliding_window_mask(seq_len: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """`[T, T]` bool, True where query i may see key j: i - window <= j <= i (flash-attn's window_size=(window, 0))."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j >= i - window)


class SlidingWindowAttention(SoftmaxAttention):
    """Causal multi-head softmax attention restricted to a window, with rotary positions as `SoftmaxAttention`.

    Args:
        dim, num_heads, bias, qk_norm, rotary_base: as `SoftmaxAttention`.
        window (int): query i sees keys i - window ... i, i.e. itself and the `window` keys before it, as MAD's
            flash-attn `window_size=(32, 32)` with `causal=True`. Default: 32.

    The mask is our own boolean mask through `scaled_dot_product_attention`; KV memory per layer is bounded by
    (window + 1) keys and values.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 16,
        bias: bool = True,
        qk_norm: bool = False,
        rotary_base: float = 10_000.0,
        window: int = 32,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, bias=bias, qk_norm=qk_norm, rotary_base=rotary_base)
        if window < 0:
            raise ValueError(f"window must be >= 0 (keys before the query), got {window}")
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)  # [B, T, H, D]
        mask = sliding_window_mask(x.shape[1], self.window, device=x.device)
        out = sdpa(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=self.head_dim**-0.5
        )
        return self.out_proj(out.transpose(1, 2).flatten(-2))  # [B, H, T, D] -> [B, T, dim]
