"""Mechanism diagnostics of a trained model, from one extra evaluation forward on a fixed batch of test sequences.

For every attention layer of the softmax/Parallax family (docs/parallax.md sections 1-3), per head and query row i
over the visible keys j <= i, with p the base softmax weights and u_ij = r_i . k_j the probe scores:

    effective weights   w_ij = p_ij (1 + s_i (u_bar_i - u_ij)),   u_bar_i = sum_j p_ij u_ij
    layer output        o_i = sum_j w_ij v_j = v_bar_i + s_i (u_bar_i v_bar_i - sum_j p_ij u_ij v_j)

s_i is what scales the correction in the layer: the gate g (1 without one) times LLA's boundary amplification a
(1 without it); so w is the weight the layer really gives each value, and `s = 1` gives the paper's p(1 + u_bar - u).
Softmax attention (and probe `zero`) has u = 0, so w = p. Recorded per layer:

* `correction_ratio_mean`, `correction_ratio_p90`: |o_i - v_bar_i| / |v_bar_i| per token and head (v_bar the
  softmax output), mean and 90th percentile over tokens and heads. Exactly 0 when r = 0 (W_R = 0).
* `negative_fraction`, `above_one_fraction`, `max_abs_weight`: the fraction of visible weights w_ij < 0, the
  fraction with |w_ij| > 1, and the largest |w_ij|.
* `sink_mass`: the mean weight w_i0 on the first position; `sink_mass_base`: the same for p.
* `entropy`: the mean entropy -sum_j p_ij log p_ij (nats) of the base softmax rows.
* `gate_mean` / `gate_min` / `gate_max` (gated layers), `amplification_mean` (LLA's factor, where used).

All of these are over query rows i >= 1 (row 0 sees only itself: w_00 = 1 and no correction whatever r is).
Every 2-D weight matrix gets its stable rank |W|_F^2 / |W|_2^2 (0 for a zero matrix): per residual block under its
parameter name (`q_proj`, `k_proj`, `v_proj`, `out_proj`, `r_proj` are W_Q, W_K, W_V, W_O, W_R), and the
embedding, head and decoder matrices under `stable_rank` at the top. Other mixers (fla baselines, sliding window)
get stable ranks only.

How the numbers are made, so that they never change training: the inputs of the attention layers are captured by
forward pre-hooks during one forward of the fixed batch (eval mode, `torch.no_grad`, autocast off: float32), the
hooks are removed again, and the attention internals are recomputed from those inputs with the layers' own
`project()`, `r_proj`/`r_norm`/`rotary`, `logit_scale()` and `gate_weight()` (and kernels/parallax/lla.py for solved
and CG probes). No random numbers are drawn (the RNG state is restored anyway), no parameter or buffer changes,
and the model's train/eval mode is restored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
from torch import nn

from kernels.parallax.lla import amplification_factor, cg_probe, softmax_moments, solve_probe
from models.attention.parallax import ParallaxAttention
from models.attention.softmax import SoftmaxAttention

# Elements of one [chunk, H, T, T] float32 tensor: the batch is processed in chunks so that the few such temporaries
# stay near 64 MB each even at T = 1024.
_CHUNK_ELEMENTS = 1 << 24
_FORWARD_ELEMENTS = 1 << 22  # sequences x T^2 per chunk of the capturing forward (times heads in the layers)
P90 = 0.9


def stable_rank(weight: torch.Tensor) -> float:
    """|W|_F^2 / |W|_2^2 of a 2-D matrix, in float64: n for an orthogonal n x n matrix, 1 at rank one, 0 for W = 0,
    NaN if W holds a NaN or an infinity."""
    return stable_ranks({"weight": weight})["weight"]


def stable_ranks(weights: dict[Hashable, torch.Tensor]) -> dict[Hashable, float]:
    """`stable_rank` of each 2-D matrix, all after one copy to the host, on one CPU thread, in float64.

    |W|_2^2 is the largest eigenvalue of the smaller Gram matrix G (W W^T or W^T W) and |W|_F^2 its trace. On the
    H200 the float64 SVD of one 128 x 128 matrix is ~50 cusolver launches; the SVDs were 58 % of the device time of
    a diagnostics call (analysis/throughput/diagnostics_profile.md). LAPACK's symmetric eigensolver on the host takes
    a fraction of that, on one thread: these matrices are too small to share, and a process per GPU on a many-core
    host would otherwise start a thread per core for each.
    """
    for name, w in weights.items():
        if w.dim() != 2:
            raise ValueError(f"stable_rank needs a 2-D matrix, got shape {tuple(w.shape)} for {name!r}")
    if not weights:
        return {}
    flat = torch.cat([w.detach().reshape(-1) for w in weights.values()]).cpu().double()  # cat promotes dtypes
    ranks, start = {}, 0
    with _one_cpu_thread():
        for name, w in weights.items():
            m = flat[start : start + w.numel()].view(w.shape)
            start += w.numel()
            ranks[name] = _gram_stable_rank(m)
    return ranks


def _gram_stable_rank(m: torch.Tensor) -> float:
    if not bool(torch.isfinite(m).all()):
        return math.nan  # a diverged weight must not read as W = 0
    if m.numel() == 0:
        return 0.0
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    spectral = float(torch.linalg.eigvalsh(gram)[-1])
    return float(gram.trace()) / spectral if spectral > 0 else 0.0


@contextlib.contextmanager
def _one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def effective_weights(
    p: torch.Tensor, u: torch.Tensor | None = None, scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """w_ij = p_ij (1 + s_i (u_bar_i - u_ij)) with u_bar_i = sum_j p_ij u_ij; `w = p` without u (softmax).

    Args:
        p (Tensor): softmax weights `[..., T_q, T_k]`, rows summing to 1, zero where masked.
        u (Tensor, Optional): probe scores, same shape (any finite value where p is zero).
        scale (float or Tensor): s, broadcastable to `[..., T_q, 1]` (gate times amplification). Default: 1.

    Returns:
        Tensor like p; its rows sum to 1 (up to rounding).
    """
    if u is None:
        return p
    u_bar = (p * u).sum(-1, keepdim=True)
    return p * (1.0 + scale * (u_bar - u))


def correction_ratio(correction: torch.Tensor, v_bar: torch.Tensor) -> torch.Tensor:
    """|o - v_bar| / |v_bar| over the last (feature) dim, with `correction = o - v_bar`; 0 where the correction is 0.

    Args:
        correction, v_bar (Tensor): `[..., D_v]`.

    Returns:
        Tensor `[...]`.
    """
    num = torch.linalg.vector_norm(correction, dim=-1)
    den = torch.linalg.vector_norm(v_bar, dim=-1)
    return torch.where(num == 0, torch.zeros_like(num), num / den)


def weight_statistics(p: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """The weight, sink and entropy statistics of the module docstring, for causal `[..., T, T]` p and w.

    Rows i >= 1 only; visible entries are j <= i. Returns NaN statistics when T < 2 (no such rows).
    """
    return _finish_weights(_weight_sums(p, w))


def _weight_sums(p: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """Additive totals behind `weight_statistics` (so chunks of a batch can be combined)."""
    t = p.shape[-1]
    visible = torch.ones(t, t, dtype=torch.bool, device=p.device).tril()[1:]  # [T-1, T], rows i >= 1
    p_rows, w_rows = p[..., 1:, :], w[..., 1:, :]
    rows = p_rows[..., 0].numel()
    entries = rows // max(t - 1, 1) * int(visible.sum())
    magnitude = w_rows.abs()
    return {
        "rows": rows,
        "entries": entries,
        "negative": int(((w_rows < 0) & visible).sum()),
        "above_one": int(((magnitude > 1) & visible).sum()),
        "max_abs": float(magnitude.max()) if rows else math.nan,  # masked entries are 0: they never win
        "sink": float(w_rows[..., 0].double().sum()),
        "sink_base": float(p_rows[..., 0].double().sum()),
        "entropy": float(-torch.special.xlogy(p_rows, p_rows).double().sum()),
    }


def _finish_weights(s: dict[str, float]) -> dict[str, float]:
    rows, entries = s["rows"], s["entries"]
    return {
        "negative_fraction": s["negative"] / entries if entries else math.nan,
        "above_one_fraction": s["above_one"] / entries if entries else math.nan,
        "max_abs_weight": s["max_abs"],
        "sink_mass": s["sink"] / rows if rows else math.nan,
        "sink_mass_base": s["sink_base"] / rows if rows else math.nan,
        "entropy": s["entropy"] / rows if rows else math.nan,
    }


def _combine(a: dict[str, float] | None, b: dict[str, float]) -> dict[str, float]:
    if a is None:
        return b
    return {k: (max(a[k], b[k]) if k == "max_abs" else a[k] + b[k]) for k in a}


def is_attention(layer: nn.Module) -> bool:
    """Softmax attention or a Parallax-family layer (whose internals this module recomputes)."""
    return type(layer) is SoftmaxAttention or isinstance(layer, ParallaxAttention)


@torch.no_grad()
def attention_internals(layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Recompute one attention layer's internals from its input `x [B, T, dim]`, in float32 (float64 stays).

    Returns a dict of `[B, H, ...]` tensors: p `[B, H, T, T]`, u (None for softmax / probe zero), scale s
    (`[B, H, T, 1]` or a float), v_bar and correction `[B, H, T, D]`, gate and amplification (or None).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(compute)
        q, k, v = (t.to(compute) for t in layer.project(x))  # [B, T, H, D]
        parallax = isinstance(layer, ParallaxAttention)
        scale = layer.logit_scale(x) if parallax else layer.head_dim**-0.5
        logit_q = q * (scale.to(compute) if isinstance(scale, torch.Tensor) else scale)
        t = x.shape[1]
        logits = torch.einsum("bihd,bjhd->bhij", logit_q, k)  # [B, H, T, T]
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        p = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        vh = v.transpose(1, 2)  # [B, H, T, D]
        v_bar = p @ vh
        r = _probe(layer, x, q, k, v) if parallax else None
        out = {"p": p, "u": None, "scale": 1.0, "v_bar": v_bar, "correction": torch.zeros_like(v_bar),
               "gate": None, "amplification": None}  # fmt: skip
        if r is None:
            return out
        u = torch.einsum("bihd,bjhd->bhij", r, k)  # unscaled probe scores
        gate = layer.gate_weight(x)  # None, [H, 1] or [B, T, H, 1]
        s = torch.ones(x.shape[0], t, layer.num_heads, 1, dtype=compute, device=x.device)  # [B, T, H, 1]
        if gate is not None:
            s = s * gate.to(compute)
        amplification = None
        if layer.amplification:
            mu = (p @ k.transpose(1, 2)).transpose(1, 2)  # [B, T, H, D], softmax-weighted mean key
            amplification = amplification_factor(mu - q, r)
            s = s * amplification
        s = s.transpose(1, 2)  # [B, H, T, 1]
        pu = p * u
        correction = s * (pu.sum(-1, keepdim=True) * v_bar - pu @ vh)
        gate = None if gate is None else gate.to(compute).expand(x.shape[0], t, layer.num_heads, 1)
        return out | {"u": u, "scale": s, "correction": correction, "gate": gate, "amplification": amplification}


def _probe(layer: ParallaxAttention, x, q, k, v) -> torch.Tensor | None:
    """The layer's probe r `[B, T, H, D]` (None for probe `zero`), as its forward computes it."""
    if layer.probe == "zero":
        return None
    if layer.probe == "learned":
        (r,) = layer.rotary(layer.r_norm(layer.split_heads(layer.r_proj(x))))
        return r.to(q.dtype)
    moments = softmax_moments(q, k, v, scale=layer.logit_scale(x))
    if layer.probe == "solved":
        return solve_probe(moments.second, moments.delta, ridge=layer.ridge)
    return cg_probe(moments.second, moments.delta, ridge=layer.ridge, steps=layer.cg_steps)


@torch.no_grad()
def attention_statistics(layer: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """The recorded statistics (module docstring) of one attention layer on its input `x [B, T, dim]`.

    The batch is processed in chunks of sequences (`_CHUNK_ELEMENTS`), so long sequences fit in memory.
    """
    b, t = x.shape[0], x.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, layer.num_heads * t * t))
    sums, ratios, gates, amplifications = None, [], [], []
    for start in range(0, b, chunk):
        internals = attention_internals(layer, x[start : start + chunk])
        w = effective_weights(internals["p"], internals["u"], internals["scale"])
        sums = _combine(sums, _weight_sums(internals["p"], w))
        ratios.append(correction_ratio(internals["correction"], internals["v_bar"])[:, :, 1:].flatten().cpu())
        if internals["gate"] is not None:
            gates.append(internals["gate"].flatten().cpu())
        if internals["amplification"] is not None:
            amplifications.append(internals["amplification"][:, 1:].flatten().cpu())
    ratio = torch.cat(ratios).double().numpy()
    stats: dict[str, Any] = {
        "correction_ratio_mean": float(ratio.mean()) if ratio.size else math.nan,
        "correction_ratio_p90": float(np.quantile(ratio, P90)) if ratio.size else math.nan,
        **_finish_weights(sums),
    }
    if gates:
        g = torch.cat(gates).double()
        stats |= {"gate_mean": float(g.mean()), "gate_min": float(g.min()), "gate_max": float(g.max())}
    if amplifications:
        stats["amplification_mean"] = float(torch.cat(amplifications).double().mean())
    return stats


def _describe(layer: nn.Module) -> dict[str, Any]:
    info: dict[str, Any] = {"type": type(layer).__name__}
    if isinstance(layer, ParallaxAttention):
        info |= {"probe": layer.probe, "gate": layer.gate, "amplification": layer.amplification}
    return info


def _stable_ranks_by_block(model: nn.Module, blocks: list[nn.Module]) -> dict[int | None, dict[str, float]]:
    """Stable ranks of every 2-D parameter, in one `stable_ranks` call: per block index (its layer's parameter names
    without a trailing `.weight`) and under None for those outside the blocks (embedding, head, decoder)."""
    weights, in_blocks = {}, set()
    for index, block in enumerate(blocks):
        layer = getattr(block, "layer", block)
        in_blocks |= {id(p) for p in block.parameters()}
        weights |= {(index, name): p for name, p in layer.named_parameters() if p.dim() == 2}
    weights |= {(None, name): p for name, p in model.named_parameters() if p.dim() == 2 and id(p) not in in_blocks}
    ranks: dict[int | None, dict[str, float]] = {index: {} for index in range(len(blocks))} | {None: {}}
    for (index, name), value in stable_ranks(weights).items():
        ranks[index][name.removesuffix(".weight")] = value
    return ranks


@torch.no_grad()
def model_diagnostics(model: nn.Module, inputs: torch.Tensor) -> dict[str, Any]:
    """JSON-able diagnostics of `model` on the fixed batch `inputs [N, T]` (int64, on the model's device).

    Returns `{"layers": [per residual block: block, type, stable_rank, and for attention layers the statistics of
    the module docstring], "stable_rank": {2-D weights outside the blocks: embedding, head, decoder}}`.
    Changes nothing in the model and draws no random numbers (module docstring).
    """
    blocks = list(getattr(getattr(model, "stack", None), "layers", None) or [])
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for index, block in enumerate(blocks):
        layer = getattr(block, "layer", None)
        if layer is not None and is_attention(layer):
            hooks.append(layer.register_forward_pre_hook(_capture(captured, index)))
    was_training = model.training
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()
            if hooks:
                # In chunks of sequences, as the layers' own forward may materialise [chunk, H, T, T] weights too.
                t = inputs.shape[1]
                chunk = max(1, _FORWARD_ELEMENTS // (t * t))
                with torch.autocast(device_type=inputs.device.type, enabled=False):
                    for start in range(0, inputs.shape[0], chunk):
                        model(inputs[start : start + chunk])
            for hook in hooks:
                hook.remove()
            hooks = []
            ranks = _stable_ranks_by_block(model, blocks)
            layers = []
            for index, block in enumerate(blocks):
                layer = getattr(block, "layer", block)
                entry = {"block": index, **_describe(layer), "stable_rank": ranks[index]}
                if index in captured:
                    entry |= attention_statistics(layer, captured[index])
                layers.append(entry)
            return {"layers": layers, "stable_rank": ranks[None]}
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)


def _capture(store: dict[int, torch.Tensor], index: int):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        store[index] = torch.cat((store[index], x)) if index in store else x

    return hook
