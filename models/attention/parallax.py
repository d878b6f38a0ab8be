"""Parallax attention and its family: softmax attention plus a probe-driven correction (docs/parallax.md sections 1-3).

The config axes span the family: the probe (zero = softmax, learned = Parallax, solved/cg = Local Linear Attention),
LLA's boundary amplification, the temperature (bandwidth) and a gate on the correction.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.parallax import parallax_attention
from kernels.parallax.lla import amplification_factor, local_linear_attention, softmax_average
from models.attention.head_vector import HeadVector, rename_bare_parameters
from models.attention.softmax import SoftmaxAttention

PROBES = ("zero", "learned", "solved", "cg")
PROBE_INITS = ("default", "zero")
TEMPERATURES = ("fixed", "learned")
GATES = ("none", "scalar", "input")


class ParallaxAttention(SoftmaxAttention):
    """Softmax attention whose output v_bar is corrected by the p-weighted key-value covariance C applied to a probe r:
    `o = v_bar + g * a * (-C r)`, with g the gate (1 without one) and a LLA's amplification (1 without it).

    Args:
        dim, num_heads, bias, qk_norm, rotary_base: as `SoftmaxAttention`; `qk_norm` also normalises a learned r.
        probe_init (str): for `probe="learned"` only: `default` (PyTorch's Linear init, like W_Q) or `zero` (W_R = 0:
            a fresh layer computes exactly what softmax attention computes). Default: `default`.
        probe (str): how r is built per head. Default: `learned`.
            `zero`: r = 0, exactly softmax attention; no r_proj, so the state dict is `SoftmaxAttention`'s.
            `learned`: Parallax, r = W_R x, rotated with the query's position (it plays the query's role).
            `solved`: LLA, r_i = (M_i + ridge I)^-1 (mu_i - q_i) by an exact batched solve, with mu_i the softmax-
                weighted mean of the visible keys and M_i the weighted second moment of k_j - q_i (q, k rotated and
                normed as the logits see them; kernels/parallax/lla.py). Rows that see fewer than head_dim + 1 keys
                cannot fit a local linear model and use r = 0 (softmax) for every ridge. Computed in float32
                (float64 for float64 inputs) with autocast off.
            `cg`: the same r from `cg_steps` batched conjugate-gradient iterations started at r = 0, as LLA does.
        amplification (bool): multiply the correction by LLA's boundary amplification 1 / (1 - (mu_i - q_i) . r_i);
            with `solved` this makes the output the exact local-linear-regression intercept. The denominator is
            floored at 1e-4 (the factor capped at 1e4), since inexact probes can drive it to zero or below. Not for
            `probe="zero"`. Default: False (Parallax drops the factor).
        temperature (str): `fixed` (logit scale head_dim^-1/2) or `learned` (scale head_dim^-1/2 exp(-t_h) with a
            per-head log-temperature t_h initialised at 0, so weight decay pulls it back to the fixed scale).
            Default: `fixed`.
        gate (str): g on the correction. `none` (g = 1), `scalar` (g = sigmoid of a learned per-head logit) or
            `input` (g = sigmoid(Linear(dim, num_heads)(x)) per token and head). Both start at g = 1/2 for every
            token (logit 0; the input gate's weight and bias are zero and kept out of the backbone's re-init):
            sigmoid's steepest point, and where weight decay pulls the logits back to. Not for `probe="zero"`.
            Default: `none`.
        ridge (float): lambda >= 0 for `solved`/`cg`, on the scale of the normalised weights (squared key-query
            distances). The default 1e-2 is about 10 % of the per-direction variance of k - q under the backbone's
            default `linear_init=normal` (1-2 % under `pytorch`, components of variance ~2/3), so it mostly damps
            directions the visible keys barely span, and it bounds the amplification by 1 + |mu_i - q_i|^2 / lambda.
            Default: 1e-2.
        cg_steps (int): CG iterations >= 1 for `cg`; head_dim steps solve the system exactly. Default: 8.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 16,
        bias: bool = True,
        qk_norm: bool = False,
        rotary_base: float = 10_000.0,
        probe_init: str = "default",
        probe: str = "learned",
        amplification: bool = False,
        temperature: str = "fixed",
        gate: str = "none",
        ridge: float = 1e-2,
        cg_steps: int = 8,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, bias=bias, qk_norm=qk_norm, rotary_base=rotary_base)
        _check_fields(probe, probe_init, amplification, temperature, gate, ridge, cg_steps)
        self.probe, self.probe_init, self.amplification = probe, probe_init, amplification
        self.temperature, self.gate, self.ridge, self.cg_steps = temperature, gate, float(ridge), cg_steps
        if probe == "learned":
            self.r_proj = nn.Linear(dim, dim, bias=False)
            self.r_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if qk_norm else nn.Identity()
            if probe_init == "zero":
                nn.init.zeros_(self.r_proj.weight)
                self.r_proj.keep_init = True  # the backbone's weight init must not overwrite the zeros
        if temperature == "learned":
            self.log_temperature = HeadVector(num_heads)
        if gate == "scalar":
            self.gate_logit = HeadVector(num_heads)
        elif gate == "input":
            self.gate_proj = nn.Linear(dim, num_heads)
            nn.init.zeros_(self.gate_proj.weight)
            nn.init.zeros_(self.gate_proj.bias)
            self.gate_proj.keep_init = True
        self.register_load_state_dict_pre_hook(rename_bare_parameters(("log_temperature", "gate_logit")))

    def logit_scale(self, x: torch.Tensor) -> float | torch.Tensor:
        """The scale of q.k for input `x [B, T, dim]`: a float, or per head `[H, 1]` (broadcasts against
        `[B, T, H, D]`; `[B, 1, H, 1]` in a folded stack) when learned."""
        if self.temperature == "fixed":
            return self.head_dim**-0.5
        return self.head_dim**-0.5 * torch.exp(-self.log_temperature(x))

    def gate_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """g: None without a gate, else `[H, 1]` (scalar; `[B, 1, H, 1]` in a folded stack) or `[B, T, H, 1]` (input)
        from `x [B, T, dim]`."""
        if self.gate == "scalar":
            return torch.sigmoid(self.gate_logit(x))
        if self.gate == "input":
            return torch.sigmoid(self.gate_proj(x))[..., None]
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        if self.probe == "zero":
            out = softmax_average(q, k, v, scale=self.logit_scale(x))
        elif self.probe == "learned":
            out = self._parallax(x, q, k, v)
        else:
            out = self._local_linear(x, q, k, v)
        return self.out_proj(out.flatten(-2))  # [B, T, H, D] -> [B, T, dim]

    def _parallax(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Learned probe: `[B, T, H, D]` q, k, v -> `[B, T, H, D]`, through the Parallax kernel."""
        (r,) = self.rotary(self.r_norm(self.split_heads(self.r_proj(x))))
        scale = self.logit_scale(x)
        # The kernel takes a float scale, so a learned per-head scale is folded into q.
        logit_q, kernel_scale = (q, scale) if isinstance(scale, float) else (q * scale.to(q.dtype), 1.0)
        out = parallax_attention(logit_q, r, k, v, scale=kernel_scale)
        gate = self.gate_weight(x)
        if gate is None and not self.amplification:
            return out
        v_bar, mu = softmax_average(logit_q, k, torch.cat((v, k), dim=-1), scale=kernel_scale).split(
            (v.shape[-1], k.shape[-1]), dim=-1
        )
        weight = 1.0 if gate is None else gate
        if self.amplification:
            # 1 - delta . r cancels when the factor is large: evaluate it in float32 even under bf16 autocast.
            weight = weight * amplification_factor(mu.float() - q.float(), r.float())
        return v_bar + weight * (out - v_bar)

    def _local_linear(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Solved/CG probe: `[B, T, H, D]` q, k, v -> `[B, T, H, D]` (kernels/parallax/lla.py)."""
        gate = self.gate_weight(x)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        # Second moments and the solve lose too much in bf16, so autocast is off here.
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = local_linear_attention(
                *(t.to(compute) for t in (q, k, v)),
                scale=self.logit_scale(x),
                probe=self.probe,
                ridge=self.ridge,
                cg_steps=self.cg_steps,
                amplification=self.amplification,
                gate=None if gate is None else gate.to(compute),
            )
        return out.to(v.dtype)


def _check_fields(
    probe: str, probe_init: str, amplification: bool, temperature: str, gate: str, ridge: float, cg_steps: int
) -> None:
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; allowed: {', '.join(PROBES)}")
    if probe_init not in PROBE_INITS:
        raise ValueError(f"unknown probe_init {probe_init!r}; allowed: {', '.join(PROBE_INITS)}")
    if probe_init != "default" and probe != "learned":
        raise ValueError(
            f"probe_init={probe_init!r} needs probe='learned' (got probe={probe!r}); use probe_init='default'"
        )
    if not isinstance(amplification, bool):
        raise ValueError(f"amplification must be a bool (allowed: true, false), got {amplification!r}")
    if temperature not in TEMPERATURES:
        raise ValueError(f"unknown temperature {temperature!r}; allowed: {', '.join(TEMPERATURES)}")
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; allowed: {', '.join(GATES)}")
    if probe == "zero" and (gate != "none" or amplification):
        raise ValueError(
            f"probe='zero' leaves no correction to gate or amplify (got gate={gate!r}, amplification={amplification}); "
            "allowed with it: gate='none', amplification=false"
        )
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite float >= 0 (allowed: e.g. 0.0, 1e-2), got {ridge!r}")
    if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
        raise ValueError(f"cg_steps must be an int >= 1 (allowed: 1, 2, ...), got {cg_steps!r}")
