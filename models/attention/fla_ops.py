"""Shared plumbing of the fla-backed baselines: kernel-or-reference choice, lazy fla imports, short convolutions,
gated output norms and the Mamba-style gate parameters.

Every baseline runs fla-core's chunked Triton kernel on CUDA tensors and fla-core's pure-PyTorch reference
(`fla.ops.*.naive`) elsewhere. `backend` forces one side: `kernel` (CUDA tensors only) or `reference` (any device;
the GPU check script runs both on the same inputs).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "kernel", "reference")
GATE_ACTIVATIONS = ("silu", "sigmoid")


def check_choice(field: str, value: str, allowed: tuple[str, ...]) -> str:
    """Return `value` if it is one of `allowed`, else raise ValueError naming the field and the allowed values."""
    if value not in allowed:
        raise ValueError(f"unknown {field} {value!r}; allowed: {', '.join(allowed)}")
    return value


def use_kernel(x: torch.Tensor, backend: str) -> bool:
    """True if the fla Triton kernel should run on `x`: `auto` picks it on CUDA, `kernel` insists on it."""
    if backend == "auto":
        return x.is_cuda
    if backend == "kernel":
        if not x.is_cuda:
            raise ValueError(f"backend='kernel' runs fla's Triton kernels, which need CUDA tensors; got {x.device}. "
                             "Use backend=auto or backend=reference on this device")
        return True
    check_choice("backend", backend, BACKENDS)
    return False


def fla(module: str) -> ModuleType:
    """Import `fla.ops.<module>` on first use: importing fla.ops loads every kernel module (seconds), so layers that
    never run a baseline never pay for it. On a machine without a GPU fla warns that Triton falls back to CPU; the
    references are exactly what runs there, so that one warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
        return importlib.import_module(f"fla.ops.{module}")


def reference_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off: the references compute in float32 (fla's naive ops upcast), which bf16 autocast would undo."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def pad_time(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) of `[B, T, ...]` up to a multiple of `multiple`. Padding goes after the last token, so
    with zero keys/values/betas and zero log-decay it cannot reach any real position."""
    pad = -x.shape[1] % multiple
    if pad == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unit L2 norm over the last dim (the delta-rule layers' q and k), computed in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`[B, T, H * head_dim] -> [B, T, H, head_dim]`."""
    return x.unflatten(-1, (-1, head_dim))


class ShortConv(nn.Module):
    """Causal depthwise convolution over time, then an activation: `[B, T, C] -> [B, T, C]`.

    The weight is `[C, 1, kernel_size]` (3-D, so the optimizer split sends it to AdamW, never to Muon).
    PyTorch's Conv1d init. Position t sees positions t - kernel_size + 1 ... t.
    """

    def __init__(self, channels: int, kernel_size: int, *, bias: bool = False, activation: str | None = "silu") -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"conv_size must be >= 1, got {kernel_size}")
        if activation is not None:
            check_choice("conv activation", activation, ("silu",))
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        y = self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2)  # left padding only: causal
        return F.silu(y) if self.activation == "silu" else y


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm of the mixer output, then a multiplicative gate: `norm(o) * act(gate)`, `o, gate [B, T, H, D]`.

    `act` is `silu` (Gated DeltaNet, GLA) or `sigmoid` (KDA). With `gate=None` it is a plain RMSNorm.
    """

    def __init__(self, head_dim: int, *, eps: float, activation: str = "silu") -> None:
        super().__init__()
        self.norm = nn.RMSNorm(head_dim, eps=eps)
        self.activation = check_choice("gate activation", activation, GATE_ACTIVATIONS)

    def forward(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        o = self.norm(o)
        if gate is None:
            return o
        return o * (F.silu(gate) if self.activation == "silu" else torch.sigmoid(gate))


def log_uniform_dt_bias(n: int, *, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """Mamba's dt bias init: dt ~ log-uniform in [dt_min, dt_max] (at least `floor`), stored as softplus^-1(dt) so
    that `softplus(x + dt_bias)` starts near dt. Shape `[n]`."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def uniform_A_log(n: int, low: float = 1.0, high: float = 16.0) -> torch.Tensor:
    """Mamba-2 / GDN / KDA decay rates: A ~ U(low, high) per head, stored as log A (the decay is -exp(A_log))."""
    return torch.empty(n).uniform_(low, high).log()


__all__ = [
    "BACKENDS", "GatedRMSNorm", "ShortConv", "check_choice", "fla", "l2_normalize", "log_uniform_dt_bias",
    "pad_time", "reference_precision", "split_heads", "uniform_A_log", "use_kernel",
]  # fmt: skip
