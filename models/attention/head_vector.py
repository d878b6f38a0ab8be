"""A learned value per attention head (a gate logit, a log-temperature), broadcast over activations `[B, T, H, D]`."""

from __future__ import annotations

import torch
from torch import nn


class HeadVector(nn.Module):
    """`weight [H]`, initialised to 0; `forward(x)` returns it as `[H, 1]`, which broadcasts against `[B, T, H, D]`.

    A layer rather than a bare parameter so that a stack of runs folded into the batch can give each run's rows its
    own vector (mad/folded_layers.py, `FoldedHeadVector`: `[N * B, 1, H, 1]`).
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x`: the layer's input `[B, T, dim]`; only a folded stack reads it (which rows are which run's)."""
        return self.weight[:, None]


def rename_bare_parameters(names: tuple[str, ...]):
    """A load_state_dict pre-hook that maps checkpoints written when `names` were bare parameters (`<prefix>name`)
    to their HeadVector (`<prefix>name.weight`), so earlier runs' weights still load."""

    def hook(module, state_dict, prefix, *args) -> None:
        for name in names:
            if prefix + name in state_dict:
                state_dict[f"{prefix}{name}.weight"] = state_dict.pop(prefix + name)

    return hook
