"""Causal softmax attention in our models' layout `[B, T, H, D]`, through one of two kernels (`kernel`):

- `sdpa`: PyTorch's `scaled_dot_product_attention` in the backend order of the training loops (kernels/sdpa.py:
  cuDNN first); any device. The default.
- `fla`: fla-core's Triton `parallel_attn` (FlashAttention-2 style, head dims padded to 16 lanes, no autotuning);
  CUDA, or the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, slow: for tests). At MAD's 16 heads of dim 8,
  cuDNN's kernel works on tiles 64 wide in the head dim, and fla's 16-lane tiles were expected to train faster at
  L >= 512; measured in a real 6-run stack on the H200, they do not: a training step is 1.45-1.49x slower at L = 128,
  512 and 1024 (analysis/throughput/epoch_softmax_fla.md against epoch_softmax.md). Kept as a launch option, for
  other GPUs and head dims.

Folded stacks (mad/stacked_model.py) pass the runs as a larger batch, which both kernels take as it is.
"""

from __future__ import annotations

import os

import torch

from kernels.sdpa import sdpa

KERNELS = ("sdpa", "fla")


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is switched on (it must be before triton is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def check_kernel(kernel: str, device: torch.device | str | None = None) -> None:
    """ValueError when `kernel` is unknown, or cannot run on `device` (None: not known yet)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown softmax attention kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    if kernel == "fla" and device is not None and torch.device(device).type != "cuda" and not interpreting():
        raise ValueError(
            f"attention kernel fla is fla-core's Triton kernel: it needs CUDA, not {torch.device(device).type} "
            "(or TRITON_INTERPRET=1 on the CPU, for tests); use kernel sdpa there"
        )


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                      kernel: str = "sdpa") -> torch.Tensor:  # fmt: skip
    """Causal softmax attention. q, k, v: `[B, T, H, D]` -> `[B, T, H, D]`; `scale` multiplies q.k."""
    check_kernel(kernel, q.device)
    if kernel == "fla":
        from fla.ops.attn import parallel_attn

        return parallel_attn(q, k, v, scale=scale)
    return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale).transpose(1, 2)
