"""Local Linear Attention (LLA) probes: the r with which Parallax computes a local linear regression.

For one head and query row i over its visible keys j <= i (causal), with softmax weights p_ij (sum_j p_ij = 1):

    v_bar_i = sum_j p_ij v_j            mu_i = sum_j p_ij k_j             delta_i = mu_i - q_i
    M_i = sum_j p_ij (k_j - q_i)(k_j - q_i)^T = Sigma_i + delta_i delta_i^T     (second moment about the query)
    C_i = sum_j p_ij (v_j - v_bar_i)(k_j - mu_i)^T                              (key-value covariance, D_v x D)

with Sigma_i the centred key covariance. LLA's output is the intercept b_i of the weighted ridge fit
min_{b, W} sum_j p_ij |v_j - b - W (k_j - q_i)|^2 + lambda |W|_F^2, which is b_i = v_bar_i - C_i (Sigma_i + lambda I)^-1
delta_i. Take the probe

    r_i = (M_i + lambda I)^-1 delta_i.

Sherman-Morrison gives (Sigma_i + lambda I)^-1 delta_i = r_i / (1 - delta_i . r_i), so

    b_i = v_bar_i - a_i C_i r_i,        a_i = 1 / (1 - delta_i . r_i) = 1 + delta_i^T (Sigma_i + lambda I)^-1 delta_i

(a_i >= 1 is the boundary amplification factor), while Parallax with the same probe computes v_bar_i - C_i r_i
(kernels/parallax/reference.py): the intercept without a_i. lambda acts on the normalised weights p, so it is on the
scale of the squared key-query distances. docs/parallax.md section 2 has the derivation.

A row that sees fewer than D + 1 keys cannot determine a D-dimensional fit plus intercept (Sigma_i is singular), so
its probe is r_i = 0 whatever lambda is: such rows fall back to the local-constant fit, softmax attention, and the
output stays continuous as lambda -> 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from kernels.sdpa import sdpa

PROBES = ("solved", "cg")
# Relative jitter added to the ridge: well below any ridge worth setting, but it keeps M + lambda I invertible in
# floating point when the softmax weights concentrate on fewer than D + 1 keys (lambda = 0 with a peaked softmax).
JITTER_EPS = 10.0
# 1 - delta . r lies in (0, 1] for the exact probe; it is floored here, which caps the amplification factor at 1e4,
# because an inexact probe (CG, learned) can push it to or below zero.
MIN_AMPLIFICATION_DENOMINATOR = 1e-4


class Moments(NamedTuple):
    """Softmax-weighted statistics of one attention layer, per query row (see the module docstring)."""

    v_bar: torch.Tensor  # [B, T, H, D_v], the softmax attention output
    delta: torch.Tensor  # [B, T, H, D], mu - q
    second: torch.Tensor  # [B, T, H, D, D], M: second moment of k - q
    cross: torch.Tensor  # [B, T, H, D_v, D], C: key-value covariance


def softmax_average(
    q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, *, scale: float | torch.Tensor
) -> torch.Tensor:
    """Causal softmax attention `sum_j p_ij values_j` with logits `(scale * q_i) . k_j`.

    Args:
        q, k (Tensor): `[B, T, H, D]`.
        values (Tensor): `[B, T, H, E]`; E may differ from D.
        scale (float or Tensor): a float, or a tensor broadcastable to q such as a per-head `[H, 1]`.

    Returns:
        Tensor `[B, T, H, E]`.
    """
    logit_q = q * (scale.to(q.dtype) if isinstance(scale, torch.Tensor) else scale)
    out = sdpa(
        logit_q.transpose(1, 2), k.transpose(1, 2), values.transpose(1, 2), is_causal=True, scale=1.0
    )  # [B, H, T, E]
    return out.transpose(1, 2)


def softmax_moments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | torch.Tensor) -> Moments:
    """v_bar, delta, M and C of every query row, from one softmax average of [v, k, k k^T, v k^T].

    Args:
        q, k (Tensor): rotated per-head queries and keys `[B, T, H, D]`; q enters both the logits and M.
        v (Tensor): values `[B, T, H, D_v]`.
        scale (float or Tensor): the logit scale, as in `softmax_average`.

    Returns:
        `Moments`, in the dtype of the inputs. Never materialises the `[T, T]` weights when SDPA has a fused kernel.
    """
    d, d_v = q.shape[-1], v.shape[-1]
    kk = (k[..., :, None] * k[..., None, :]).flatten(-2)  # [B, T, H, D*D]
    vk = (v[..., :, None] * k[..., None, :]).flatten(-2)  # [B, T, H, D_v*D]
    averages = softmax_average(q, k, torch.cat((v, k, kk, vk), dim=-1), scale=scale)
    v_bar, mu, kk_bar, vk_bar = averages.split((d_v, d, d * d, d_v * d), dim=-1)
    delta = mu - q
    sigma = kk_bar.unflatten(-1, (d, d)) - mu[..., :, None] * mu[..., None, :]  # [B, T, H, D, D]
    second = sigma + delta[..., :, None] * delta[..., None, :]
    cross = vk_bar.unflatten(-1, (d_v, d)) - v_bar[..., :, None] * mu[..., None, :]  # [B, T, H, D_v, D]
    return Moments(v_bar=v_bar, delta=delta, second=second, cross=cross)


def enough_keys(seq_len: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """`[T]` bool: True where causal row i sees at least head_dim + 1 keys (i >= head_dim)."""
    return torch.arange(seq_len, device=device) >= head_dim


def probe_system(second: torch.Tensor, delta: torch.Tensor, *, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The SPD system `A r = b` of the LLA probe: `A = M + (lambda + jitter) I`, `b = delta`.

    jitter = 10 eps (1 + tr M / D), eps of the dtype. Rows with fewer than D + 1 keys get `A = I, b = 0` (so r = 0
    with clean gradients: nothing singular is ever solved and then masked).

    Args:
        second (Tensor): M `[B, T, H, D, D]`. delta (Tensor): `[B, T, H, D]`. ridge (float): lambda >= 0.

    Returns:
        A `[B, T, H, D, D]` and b `[B, T, H, D]`.
    """
    d = delta.shape[-1]
    eye = torch.eye(d, dtype=second.dtype, device=second.device)
    trace = second.diagonal(dim1=-2, dim2=-1).sum(-1)  # [B, T, H]
    jitter = JITTER_EPS * torch.finfo(second.dtype).eps * (1 + trace / d)
    a = second + (ridge + jitter)[..., None, None] * eye
    fits = enough_keys(delta.shape[1], d, delta.device)[:, None, None]  # [T, 1, 1]
    return torch.where(fits[..., None], a, eye), torch.where(fits, delta, 0.0)


def solve_probe(second: torch.Tensor, delta: torch.Tensor, *, ridge: float) -> torch.Tensor:
    """Exact LLA probe `r = (M + lambda I)^-1 delta` by a batched LU solve (`probe_system` for the details).

    Returns:
        r `[B, T, H, D]`; zero on rows with fewer than D + 1 keys.
    """
    a, b = probe_system(second, delta, ridge=ridge)
    return torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)


def cg_probe(second: torch.Tensor, delta: torch.Tensor, *, ridge: float, steps: int) -> torch.Tensor:
    """The LLA probe from `steps` conjugate-gradient iterations on the system of `solve_probe`, starting at r = 0.

    Returns:
        r `[B, T, H, D]`; exact (up to rounding) once steps >= D; zero on rows with fewer than D + 1 keys.
    """
    a, b = probe_system(second, delta, ridge=ridge)
    return conjugate_gradient(a, b, steps=steps)


def conjugate_gradient(a: torch.Tensor, b: torch.Tensor, *, steps: int) -> torch.Tensor:
    """Batched conjugate gradient for SPD `a x = b`, from x = 0.

    A system stops updating once its residual is below eps |b| (or b = 0); the divisions that would then be 0/0 are
    replaced by zero steps before dividing, so neither the forward nor the backward pass can produce NaN.

    Args:
        a (Tensor): `[..., D, D]`, symmetric positive definite. b (Tensor): `[..., D]`. steps (int): iterations >= 1.

    Returns:
        x `[..., D]`.
    """
    x = torch.zeros_like(b)
    residual, direction = b, b
    rr = (residual * residual).sum(-1, keepdim=True)  # [..., 1]
    tol = torch.finfo(b.dtype).eps ** 2 * rr
    for _ in range(steps):
        a_dir = (a @ direction.unsqueeze(-1)).squeeze(-1)
        curvature = (direction * a_dir).sum(-1, keepdim=True)
        live = (rr > tol) & (curvature > 0)
        alpha = torch.where(live, rr / torch.where(live, curvature, 1.0), 0.0)
        x = x + alpha * direction
        residual = residual - alpha * a_dir
        rr_next = (residual * residual).sum(-1, keepdim=True)
        beta = torch.where(live, rr_next / torch.where(live, rr, 1.0), 0.0)
        direction = residual + beta * direction
        rr = rr_next
    return x


def amplification_factor(delta: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """LLA's boundary amplification `1 / max(1 - delta . r, MIN_AMPLIFICATION_DENOMINATOR)`, `[B, T, H, 1]`.

    For the exact probe the denominator is 1 / (1 + delta^T (Sigma + lambda I)^-1 delta), in (0, 1]; the floor (a cap
    of 1e4 on the factor, with zero gradient beyond it) only binds for inexact probes or a query far outside a
    nearly flat key cloud.
    """
    return 1.0 / (1.0 - (delta * r).sum(-1, keepdim=True)).clamp(min=MIN_AMPLIFICATION_DENOMINATOR)


def local_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | torch.Tensor,
    probe: str,
    ridge: float,
    amplification: bool,
    cg_steps: int | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Parallax attention with the LLA probe: `o_i = v_bar_i - g_i a_i C_i r_i` (module docstring).

    Args:
        q, k (Tensor): rotated per-head queries and keys `[B, T, H, D]`. v (Tensor): values `[B, T, H, D_v]`.
        scale (float or Tensor): logit scale, a float or broadcastable to q (per-head `[H, 1]`).
        probe (str): `solved` (exact solve) or `cg` (`cg_steps` conjugate-gradient iterations).
        ridge (float): lambda >= 0; 0 is the exact local linear fit.
        amplification (bool): multiply the correction by a_i (LLA); without it, Parallax's form.
        cg_steps (int, Optional): CG iterations >= 1; required by `probe="cg"`.
        gate (Tensor, Optional): g, broadcastable to `[B, T, H, 1]`; multiplies the correction. Default: 1.

    Returns:
        Tensor `[B, T, H, D_v]` in the dtype of q (compute in float64 or float32 for a well-conditioned solve).
    """
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; allowed: {', '.join(PROBES)}")
    if probe == "cg" and cg_steps is None:
        raise ValueError("probe='cg' needs cg_steps (allowed: 1, 2, ...), got None")
    moments = softmax_moments(q, k, v, scale=scale)
    if probe == "solved":
        r = solve_probe(moments.second, moments.delta, ridge=ridge)
    else:
        r = cg_probe(moments.second, moments.delta, ridge=ridge, steps=cg_steps)
    correction = -(moments.cross @ r.unsqueeze(-1)).squeeze(-1)  # [B, T, H, D_v]
    if amplification:
        correction = amplification_factor(moments.delta, r) * correction
    if gate is not None:
        correction = gate * correction
    return moments.v_bar + correction
