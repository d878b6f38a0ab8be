"""PyTorch reference of Parallax attention: the specification every kernel is checked against.

For one head and query row i over the keys j it may see (causal), with c the softmax scale:

    s_ij = c * q_i . k_j           p_ij = softmax_j(s_ij)
    u_ij = r_i . k_j               (the probe score, *unscaled*: c multiplies q.k only)
    u_bar_i = sum_j p_ij u_ij      v_bar_i = sum_j p_ij v_j       (v_bar: the softmax output)
    o_i = sum_j p_ij (1 + u_bar_i - u_ij) v_j = v_bar_i (1 + u_bar_i) - sum_j p_ij u_ij v_j

Equivalently o_i = v_bar_i - C_i r_i with C_i the p-weighted key-value covariance, so r = 0 gives softmax
attention exactly. The effective weights p_ij (1 + u_bar_i - u_ij) sum to one per row and may be negative.
"""

from __future__ import annotations

import torch
from kernels.sdpa import sdpa

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def parallax_attention(
    q: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Parallax attention, computed from the definition (materialises the [T_q, T_k] weights).

    Args:
        q (Tensor): queries `[B, T_q, H, D]`.
        r (Tensor): probes, one per query `[B, T_q, H, D]`.
        k (Tensor): keys `[B, T_k, H_kv, D]`; `H` must be a multiple of `H_kv` (grouped-query attention).
        v (Tensor): values `[B, T_k, H_kv, D_v]`.
        scale (float, Optional): multiplies q.k only. Default: `D ** -0.5`.
        causal (bool): query i sees keys j <= i + (T_k - T_q) (aligned to the end of the keys, so a single
            decode query sees the whole cache). Default: True.

    Returns:
        Tensor `[B, T_q, H, D_v]` in the dtype of `q`. Computed in float64 for float64 inputs, else float32.
    """
    _check_inputs(q, r, k, v, causal)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[2] // k.shape[2]
    # [B, H, T, D] in the compute dtype; K/V heads repeated over their query group.
    qh, rh = (x.transpose(1, 2).to(compute_dtype) for x in (q, r))
    kh, vh = (_repeat_heads(x.transpose(1, 2).to(compute_dtype), group) for x in (k, v))

    logits = scale * qh @ kh.transpose(-1, -2)  # [B, H, T_q, T_k]
    mask = _future_mask(q.shape[1], k.shape[1], q.device) if causal else None
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    p = torch.softmax(logits, dim=-1)  # [B, H, T_q, T_k]; masked entries are exactly 0
    pu = p * (rh @ kh.transpose(-1, -2))  # p_ij u_ij, u unscaled
    u_bar = pu.sum(dim=-1, keepdim=True)  # [B, H, T_q, 1]
    # v_bar from SDPA, the call softmax attention makes: with r = 0 the correction is exactly zero, so a Parallax
    # layer whose probe is zero reproduces a softmax layer bit for bit (softmax -> Parallax conversion).
    square = q.shape[1] == k.shape[1]
    sdpa_mask = None if mask is None or square else ~mask
    v_bar = sdpa(qh, kh, vh, attn_mask=sdpa_mask, is_causal=causal and square, scale=scale)
    out = v_bar + (u_bar * v_bar - pu @ vh)  # [B, H, T_q, D_v]
    return out.transpose(1, 2).to(q.dtype)


def _repeat_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """`[B, H_kv, T, D] -> [B, H_kv * group, T, D]`, each K/V head repeated for its query heads."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _future_mask(t_q: int, t_k: int, device: torch.device) -> torch.Tensor:
    """`[T_q, T_k]` bool, True where key j lies in the future of query i (end-aligned)."""
    rows = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)
    return torch.arange(t_k, device=device)[None, :] > rows


def _check_inputs(q: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    named = {"q": q, "r": r, "k": k, "v": v}
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; allowed: {', '.join(map(str, _FLOAT_DTYPES))}")
    if len({x.dtype for x in named.values()}) > 1:
        raise ValueError("q, r, k, v must share one dtype, got " + ", ".join(f"{n}={x.dtype}" for n, x in named.items()))
    if len({x.device for x in named.values()}) > 1:
        raise ValueError("q, r, k, v must be on one device, got " + ", ".join(f"{n}={x.device}" for n, x in named.items()))
    if r.shape != q.shape:
        raise ValueError(f"r must have the shape of q {tuple(q.shape)}, got {tuple(r.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, seq and heads")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head_dim")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError(f"causal attention needs at least as many keys ({k.shape[1]}) as queries ({q.shape[1]})")
    if min(q.shape[1], k.shape[1]) == 0:
        raise ValueError(f"empty sequence: q {tuple(q.shape)}, k {tuple(k.shape)}")
