"""The two MAD backbones: a pre-norm residual language model, and the AutoEncoder used for compression."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

LayerFactory = Callable[[int], nn.Module]  # width -> module mapping [B, T, width] -> [B, T, width]
LINEAR_INITS = ("pytorch", "normal")


class Residual(nn.Module):
    """Pre-norm residual block: `x + layer(norm(x))`."""

    def __init__(self, dim: int, layer: nn.Module, *, norm_eps: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(self.norm(x))


class ResidualStack(nn.Module):
    """Token embedding then `num_layers` residual blocks alternating mixer and MLP (mixer first).

    `tokens [B, T]` int64 -> hidden states `[B, T, dim]`. No absolute positions: mixers bring their own.
    """

    def __init__(
        self, vocab_size: int, *, dim: int, num_layers: int, mixer: LayerFactory, mlp: LayerFactory, norm_eps: float
    ) -> None:
        super().__init__()
        if num_layers < 2 or num_layers % 2:
            raise ValueError(f"num_layers must be a positive even number (mixer/MLP pairs), got {num_layers}")
        self.embedding = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            Residual(dim, (mixer if i % 2 == 0 else mlp)(dim), norm_eps=norm_eps) for i in range(num_layers)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x)
        return x


class LanguageModel(nn.Module):
    """MAD's language model: `tokens [B, T] -> logits [B, T, vocab_size]`.

    Args:
        vocab_size (int): number of token ids and of output classes.
        dim (int): width. num_layers (int): residual blocks (mixer, MLP, mixer, MLP, ...).
        mixer, mlp (Callable[[int], Module]): build a layer of the given width.
        norm_eps (float): RMSNorm epsilon. Default: 1e-5.
        linear_init (str): `normal` re-draws every Linear weight from N(0, 0.02), as the code behind the MAD paper's
            numbers; `pytorch` keeps PyTorch's Linear init, as mad-lab's code since Dec 2024. Biases are zeroed and
            embeddings drawn from N(0, 0.02) in both cases. Default: `normal`.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        dim: int,
        num_layers: int,
        mixer: LayerFactory,
        mlp: LayerFactory,
        norm_eps: float = 1e-5,
        linear_init: str = "normal",
    ) -> None:
        super().__init__()
        self.stack = ResidualStack(vocab_size, dim=dim, num_layers=num_layers, mixer=mixer, mlp=mlp, norm_eps=norm_eps)
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, vocab_size)
        init_weights(self, linear_init)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stack(tokens)))


class AutoEncoder(nn.Module):
    """MAD's compression backbone: `tokens [B, T] -> logits [B, seq_len, vocab_size]`.

    The encoder (a `ResidualStack`) reads the sequence; its last position (the compression token) is the code.
    The decoder adds a fixed sin-cos embedding of each output position to the code and maps it through
    norm -> Linear -> GELU -> norm -> Linear -> GELU -> norm -> Linear to logits. All Linear weights N(0, 0.02).
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        seq_len: int,
        dim: int,
        num_layers: int,
        mixer: LayerFactory,
        mlp: LayerFactory,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.stack = ResidualStack(vocab_size, dim=dim, num_layers=num_layers, mixer=mixer, mlp=mlp, norm_eps=norm_eps)
        self.register_buffer("positions", sincos_positions(seq_len, dim), persistent=False)
        self.decoder = nn.Sequential(
            nn.RMSNorm(dim, eps=norm_eps), nn.Linear(dim, dim), nn.GELU(),
            nn.RMSNorm(dim, eps=norm_eps), nn.Linear(dim, dim), nn.GELU(),
            nn.RMSNorm(dim, eps=norm_eps),
        )  # fmt: skip
        self.head = nn.Linear(dim, vocab_size)
        init_weights(self, "normal")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        code = self.stack(tokens)[:, -1]  # [B, dim]
        return self.head(self.decoder(code[:, None, :] + self.positions))  # [B, seq_len, V]


def sincos_positions(seq_len: int, dim: int) -> torch.Tensor:
    """`[seq_len, dim]`: first half sin, second half cos, frequencies exp(-ln(10000) i / (dim/2 - 1))."""
    half = dim // 2
    omega = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
    angles = torch.arange(seq_len, dtype=torch.float32)[:, None] * omega  # [seq_len, dim/2]
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def init_weights(model: nn.Module, linear_init: str) -> None:
    """Zero Linear biases, draw embeddings from N(0, 0.02); with `normal`, draw Linear weights from N(0, 0.02).

    Linear layers flagged `keep_init` (a zero-initialised Parallax probe) keep what their layer set.
    """
    if linear_init not in LINEAR_INITS:
        raise ValueError(f"unknown linear_init {linear_init!r}; allowed: {', '.join(LINEAR_INITS)}")
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Linear) and not getattr(module, "keep_init", False):
            if linear_init == "normal":
                nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["AutoEncoder", "LanguageModel", "count_parameters"]
