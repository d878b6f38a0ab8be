"""Channel mixers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_dim(dim: int, multiple_of: int = 16) -> int:
    """MAD's SwiGLU inner width: int(2 * 4 * dim / 3) rounded up to a multiple of 16 (352 for dim 128)."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * -(-hidden // multiple_of)


class SwiGLU(nn.Module):
    """`w3(silu(w1 x) * w2 x)`, no biases. `[B, T, dim] -> [B, T, dim]`."""

    def __init__(self, dim: int, *, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = swiglu_hidden_dim(dim) if hidden_dim is None else hidden_dim
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))
