"""Rotary position embedding, non-interleaved (GPT-NeoX layout: the first half of each head rotates with the second)."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Rotates `[B, T, H, D]` tensors by their position; `D` must be even. Rotates the whole head, as MAD does."""

    def __init__(self, head_dim: int, *, base: float = 10_000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [D/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each x `[B, T, H, D]` -> rotated x, same shape and dtype."""
        seq_len = xs[0].shape[1]
        angles = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)[:, None] * self.inv_freq
        cos = angles.cos()[None, :, None, :]  # [1, T, 1, D/2]
        sin = angles.sin()[None, :, None, :]
        return tuple(_rotate(x, cos, sin) for x in xs)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
