"""Mamba-2 (Dao & Gu 2024): a selective state-space layer computed by state-space duality (SSD).

Per head h, with step dt_t = softplus(dt_proj + dt_bias) > 0 and A = -exp(A_log) < 0, input x_t `[P]` and the
shared (one group) B_t, C_t `[N]`:

    S_t = exp(dt_t A) S_{t-1} + dt_t B_t x_t^T      (state [N, P]);      y_t = S_t^T C_t + D x_t

The layer: one input projection to [z, x, B, C, dt], a causal depthwise convolution (SiLU) over [x, B, C], the
SSD, the D skip, RMSNorm(y * SiLU(z)) over the whole inner width (mamba-ssm's gate-then-norm), and the output
projection. SSD is scalar-decay linear attention (q = C, k = B, v = dt x, log decay dt A, no scale), so on CUDA it
runs fla-core's `chunk_simple_gla` kernel (needs neither mamba-ssm nor causal-conv1d). fla-core has no CPU reference
for Mamba-2, so elsewhere `ssd` below, a chunked SSD in plain PyTorch, runs instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.fla_ops import (
    BACKENDS, ShortConv, check_choice, fla, log_uniform_dt_bias, pad_time, reference_precision, uniform_A_log,
    use_kernel,
)  # fmt: skip


def ssd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *, chunk_size: int = 64
) -> torch.Tensor:
    """Chunked SSD in PyTorch: x `[b, T, H, P]`, dt `[b, T, H]` (> 0), A `[H]` (< 0), B, C `[b, T, N]`
    -> y `[b, T, H, P]` (without the D skip), in x's dtype; computed in float32 (float64 if x is float64).

    Within a chunk of L steps the output is a masked, decay-weighted attention (C_l . B_s) exp(a_l - a_s) dt_s x_s
    with a the running sum of dt A; across chunks a state [N, P] per head carries the rest.
    """
    out_dtype, dtype = x.dtype, torch.promote_types(x.dtype, torch.float32)
    T = x.shape[1]
    L = min(chunk_size, T)
    x, dt, B, C = (pad_time(t.to(dtype), L) for t in (x, dt, B, C))  # dt = 0 on padding: no decay, no write
    b, Tp, H, P = x.shape
    n = Tp // L
    a = (dt * A.to(dtype)).reshape(b, n, L, H).permute(0, 3, 1, 2)  # [b, H, n, L] log decay per step
    xdt = (x * dt[..., None]).reshape(b, n, L, H, P)
    B, C = B.reshape(b, n, L, -1), C.reshape(b, n, L, -1)  # [b, n, L, N]
    acum = a.cumsum(-1)  # [b, H, n, L]

    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    decay = (acum[..., :, None] - acum[..., None, :]).masked_fill(~causal, -torch.inf).exp()  # [b, H, n, L, S]
    scores = torch.einsum("bcln,bcsn->bcls", C, B)  # [b, n, L, S]
    y_diag = torch.einsum("bcls,bhcls,bcshp->bclhp", scores, decay, xdt)

    to_end = (acum[..., -1:] - acum).exp()  # [b, H, n, L]: decay from each step to its chunk's end
    chunk_states = torch.einsum("bcsn,bhcs,bcshp->bchnp", B, to_end, xdt)  # [b, n, H, N, P]
    chunk_decay = acum[..., -1].exp()  # [b, H, n]
    state = torch.zeros_like(chunk_states[:, 0])
    entering = []
    for c in range(n):  # n = T / L chunks: a short loop
        entering.append(state)
        state = state * chunk_decay[:, :, c, None, None] + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # [b, n, H, N, P]: the state before each chunk
    y_off = torch.einsum("bcln,bchnp,bhcl->bclhp", C, entering, acum.exp())

    return (y_diag + y_off).reshape(b, Tp, H, P)[:, :T].to(out_dtype)


def mamba2_ssd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """As `ssd`; on CUDA through fla's `chunk_simple_gla` (q = C, k = B, v = dt x, g = dt A, scale 1)."""
    if use_kernel(x, backend):
        H = x.shape[2]
        q = C[:, :, None, :].expand(-1, -1, H, -1).to(x.dtype).contiguous()
        k = B[:, :, None, :].expand(-1, -1, H, -1).to(x.dtype).contiguous()
        v = (x * dt[..., None].to(x.dtype)).contiguous()
        y, _ = fla("simple_gla").chunk_simple_gla(q=q, k=k, v=v, g=(dt.float() * A.float()).contiguous(), scale=1.0)
        return y
    with reference_precision(x):
        return ssd(x, dt, A, B, C)


class Mamba2(nn.Module):
    """Mamba-2 mixer (one B/C group), `[B, T, dim] -> [B, T, dim]`, causal.

    Args:
        dim (int): model width.
        expand (int): inner width = expand * dim. Default: 2.
        head_dim (int): channels per SSM head (P); heads = inner / head_dim. Default: 16.
        d_state (int): N, the state per channel. Default: 8.
        conv_size (int): causal convolution width over [x, B, C]. Default: 4.
        norm_eps (float): epsilon of the gated RMSNorm. Default: 1e-5.
        backend (str): `auto`, `kernel` or `reference`. Default: `auto`.

    Init (mamba-ssm's): A = U(1, 16) stored as log; dt_bias = softplus^-1 of a log-uniform dt in [1e-3, 0.1];
    D = 1; the convolution has a bias and PyTorch's init; projections keep PyTorch's Linear init.
    A_log, dt_bias and D are 1-D and the conv weight is [C, 1, K], so all of them go to AdamW.
    State per layer: inner * N (plus the (conv_size - 1)-step convolution window).
    """

    def __init__(
        self,
        dim: int,
        *,
        expand: int = 2,
        head_dim: int = 16,
        d_state: int = 8,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.backend = check_choice("backend", backend, BACKENDS)
        inner = expand * dim
        if inner % head_dim:
            raise ValueError(
                f"inner width {inner} (expand={expand} x dim={dim}) is not divisible by head_dim={head_dim}; "
                f"pick a divisor of {inner}"
            )
        self.inner, self.head_dim, self.d_state = inner, head_dim, d_state
        self.num_heads = inner // head_dim
        self.in_proj = nn.Linear(dim, 2 * inner + 2 * d_state + self.num_heads, bias=False)  # z, x, B, C, dt
        self.conv = ShortConv(inner + 2 * d_state, conv_size, bias=True)
        self.A_log = nn.Parameter(uniform_A_log(self.num_heads, 1.0, 16.0))
        self.dt_bias = nn.Parameter(log_uniform_dt_bias(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = nn.RMSNorm(inner, eps=norm_eps)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    @property
    def state_size(self) -> int:
        """Recurrent state per layer: inner * N (the convolution window aside)."""
        return self.inner * self.d_state

    def inputs(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """`u [b, T, dim]` -> the gate z `[b, T, inner]` and the SSD inputs x `[b, T, H, P]`, dt `[b, T, H]`
        (float32), A `[H]`, B, C `[b, T, N]`."""
        z, xbc, dt = self.in_proj(u).split([self.inner, self.inner + 2 * self.d_state, self.num_heads], dim=-1)
        x, B, C = self.conv(xbc).split([self.inner, self.d_state, self.d_state], dim=-1)
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return dict(z=z, x=x, dt=dt, A=-self.A_log.float().exp(), B=B, C=C)

    def output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """SSD output `y [b, T, H, P]` -> + D x -> RMSNorm(y * SiLU(z)) -> `[b, T, dim]`."""
        y = (y + self.D[:, None].to(y.dtype) * x).flatten(-2)
        return self.out_proj(self.norm(y * F.silu(z)))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        inp = self.inputs(u)
        z = inp.pop("z")
        return self.output(mamba2_ssd(**inp, backend=self.backend), inp["x"], z)
