"""Parallax attention: one public entry point with a backend switch (``impl``).

`parallax_attention` (training, prefill) and `parallax_decode` (one query against a KV cache, kernels/parallax/decode.py).
``impl="reference"`` is the PyTorch spec (`kernels/parallax/reference.py`, any device, any float dtype);
``impl="triton"`` the fused causal kernels (`kernels/parallax/triton.py`, CUDA; CPU only under
``TRITON_INTERPRET=1``); ``impl="auto"`` (the default) takes the Triton kernels for CUDA inputs they support and
the reference otherwise (CPU tensors, float64, other head dims, non-causal).
"""

from __future__ import annotations

import torch

from kernels.parallax import reference as _reference

IMPLS = ("auto", "reference", "triton")


def parallax_attention(
    q: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """Parallax attention `o_i = sum_j p_ij (1 + u_bar_i - u_ij) v_j` (see `kernels/parallax/reference.py`).

    Args:
        q (Tensor): queries `[B, T_q, H, D]`.
        r (Tensor): probes `[B, T_q, H, D]`.
        k (Tensor): keys `[B, T_k, H_kv, D]`, `H % H_kv == 0`.
        v (Tensor): values `[B, T_k, H_kv, D_v]` (the Triton kernels need `D_v == D`).
        scale (float, Optional): multiplies q.k only. Default: `D ** -0.5`.
        causal (bool): end-aligned causal mask. The Triton kernels are causal only. Default: True.
        impl (str): "auto", "reference" or "triton". Default: "auto".

    Returns:
        Tensor `[B, T_q, H, D_v]` in the dtype of q.

    Raises:
        ValueError: bad inputs, an unknown impl, or inputs that impl="triton" cannot take (the message says why).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference" or (impl == "auto" and not (isinstance(q, torch.Tensor) and q.is_cuda)):
        return _reference.parallax_attention(q, r, k, v, scale=scale, causal=causal)
    _reference._check_inputs(q, r, k, v, causal)
    try:
        from kernels.parallax import triton as _triton
    except ImportError as err:
        if impl == "auto":
            return _reference.parallax_attention(q, r, k, v, scale=scale, causal=causal)
        raise ValueError(f"impl='triton' needs the triton package, which failed to import: {err}") from err
    reason = _triton.unsupported_reason(q, r, k, v, causal)
    if reason is not None:
        if impl == "auto":
            return _reference.parallax_attention(q, r, k, v, scale=scale, causal=causal)
        raise ValueError(reason)
    return _triton.parallax_attention_triton(q, r, k, v, scale=scale)


__all__ = ["IMPLS", "parallax_attention", "parallax_decode"]


def __getattr__(name: str):
    """`parallax_decode`, imported on first use: importing the package must not define Triton kernels, so that
    `TRITON_INTERPRET=1` set after `import kernels.parallax` (as the CPU tests do) still applies to them."""
    if name == "parallax_decode":
        from kernels.parallax.decode import parallax_decode

        return parallax_decode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
