"""What the vmap rules of our autograd functions share: folding the vmapped dimension into the batch."""

from __future__ import annotations

import torch


def fold_vmapped(x: torch.Tensor, in_dim: int | None, size: int) -> torch.Tensor:
    """A vmap rule's operand -> `[size * B, ...]`: the vmapped dim (at `in_dim`, or None when x is not vmapped and
    every slice shares it) moved to the front and merged with the batch dim after it."""
    x = x.unsqueeze(0).expand(size, *x.shape) if in_dim is None else x.movedim(in_dim, 0)
    return x.flatten(0, 1)
