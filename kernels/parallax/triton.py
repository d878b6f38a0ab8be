"""Triton kernels for causal Parallax attention, forward and backward, in the FlashAttention-2 style.

The math is in `kernels/parallax/reference.py` and docs/parallax.md (sections 4, 5, 7). Per query tile the forward
streams over the K/V tiles once, keeping fp32 state (m, l, R, O, OR) with ONE running max taken from S only:

    S = c*log2(e) * Q K^T        U = Rp K^T (unscaled)          masked positions: S = -inf, P = 0, U = 0
    m' = max(m, rowmax S)  alpha = 2^(m - m')  P = 2^(S - m')
    l = alpha l + rowsum P   R = alpha R + rowsum(P*U)   O = alpha O + P V   OR = alpha OR + (P*U) V
    v_bar = O / l   u_bar = R / l   o = v_bar (1 + u_bar) - OR / l

and saves lse2 = m + log2 l and u_bar (fp32, `[B, H, T_q]`) and, for bf16 inputs, o - v_0 and v_bar - v_0 (v_0: the
value at the sequence's first key) in fp16 (`stat_dtype`) beside its inputs. The backward runs two
kernels: dq/dr per query tile, then dk/dv per key tile, which loops over the query heads of its KV head (GQA sums
inside the kernel, no buffer):

    a = g.v_j   dS = p [a - t + (u_bar - u)(a - b)]   dU = -p (a - b)
    dq = c sum_j dS k_j   dr = sum_j dU k_j   dk = sum_i (c dS q_i + dU r_i)   dv = sum_i p (1 + u_bar - u) g_i

The row statistics b = g.v_bar = sum_j p a and t = g.o = sum_j p a (1 + u_bar - u) are what keep dq, dr and dk
accurate: dq and dr are sums of terms that cancel (sum_j dS = sum_j dU = 0), so any mismatch between t, b and the
backward's own p, u, a shows up as an error t * mu_k in dq. Rows that see few keys are where it bites: a float64
emulation (analysis/kernels/parallax_row_stats_emulation.md) put b and t from bf16 copies of o and v_bar at errors up
to 0.66 at 2-4 keys, from fp16 copies up to 0.17, and from fp16 copies at 64 keys or more within 5.7e-3, as accurate
as recomputing. The copies hold o and v_bar minus v_0, and the dq kernel adds g.v_0 back: where values share a large
offset (v = 10 + N(0, 1)), plain copies round at the offset's scale, which offset keys then multiply into dr (worst
2.3x the recomputed error at 64+ keys: analysis/kernels/parallax_row_stats_emulation_offset_v10_k5.md); shifted copies
round at the scale of the values' spread (v_0, one [D] vector per program, rather than each row's own value: loading
that in the forward's epilogue made the D = 128 tiles spill). On the H200 the check's offset study (values + 10, keys
+ 3 to 5, bf16) found the copies as accurate as recomputing (worst error ratio 1.06 in one call, 1.00 in the next),
and they made forward+backward 17 % faster at L >= 8k (analysis/kernels/parallax_triton_check.md,
parallax_train_bench.md). So the dq kernel takes b and t from the saved copies (a row-wise product each) in query tiles
whose rows all see at least STATS_MIN_KEYS keys, and elsewhere recomputes them in a first pass over the keys from the
same p, u and a it then uses (three extra dots per key tile); so it does too where a saved copy left fp16's range
(inf) or where all of a tile's saved values lie below fp16's smallest normal number, where fp16 keeps too few bits. It
stores b and t for the dk/dv kernel.

For 16-bit inputs the forward's P V and (P*U) V dots need more than bf16's 8 bits of P and P*U: v_bar (1 + u_bar) - OR
cancels when the probe scores are large, and one bf16 rounding of P*U put max-norm errors of ~1e-2 into o
(analysis/kernels/parallax_triton_check.md). fp16 inputs take each as ONE fp16 dot (11 bits of P). bf16 inputs of
FP16_CHECK_MIN_LEN tokens or more do the same where V and the probe scores lie inside fp16's range (`fp16_pv_ok`: per
sequence and KV head, from maxima one small kernel gathers before the forward; V's bf16 values convert exactly), and
elsewhere, as shorter bf16 inputs always (where the forward is bound by launches, not dots), split P and P*U into a
bf16 pair hi + lo, two dots each. A float64 emulation of both put their worst error at the same 3e-3 (the final 16-bit
rounding of o) over random shapes with probes up to 8x RMS scale.

Layout `[B, T, H, D]` (contiguous; the wrapper copies other strides). Causal masks are end-aligned: query i sees
key j iff j <= i + (T_k - T_q). Only tiles that cross the diagonal or a ragged edge apply a mask. Head dims 8..128
(powers of two); 8 is padded to 16 lanes, the minimum `tl.dot` K. fp32 inputs use IEEE dots (no tf32).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels.batching import fold_vmapped
from kernels.parallax.decode import num_sms
from kernels.parallax import triton_ops

# Whether the kernels below were built for Triton's CPU interpreter: read once, when this module is imported,
# because `triton.jit` decides the same way at decoration time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
HEAD_DIMS = (8, 16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.0 / math.log(2.0)


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Candidate tiles per kernel and head-dim class (small: D <= 32, mid: D = 64, large: D = 128) for 16-bit inputs,
# picked from sm_90 builds (ptxas -v) for few or no register spills (analysis/kernels/parallax_train_registers.md,
# from benchmarks/kernel_registers.py): the two fp32 [BLOCK, D] accumulators are what limit the tiles. 64 rows of the
# tile per 4 warps keep each warpgroup on its own rows. Kept short so that compile and autotune stay a few seconds per
# head dim.
GPU_CONFIGS: dict[str, dict[str, list[triton.Config]]] = {
    "fwd": {
        "small": [_cfg(64, 64, 4, 2), _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2)],
        "mid": [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 32, 8, 3)],
        # 64x16: the one D = 128 tile of those built that spills nothing; 128x64 spilled ~1 KB per thread
        "large": [_cfg(128, 32, 8, 3), _cfg(64, 16, 4, 2), _cfg(64, 32, 4, 2)],
    },
    "dq": {
        # 128x128: the widest key tile at head_dim <= 32 that spills nothing (MAD's 16 heads of dim 8)
        "small": [_cfg(64, 64, 4, 2), _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2), _cfg(128, 128, 8, 2)],
        "mid": [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 3)],
        "large": [_cfg(128, 32, 8, 3), _cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)],
    },
    "dkv": {  # deeper pipelines spill less here: loads land in shared memory, not registers
        # 32x128: the one 128-key tile at head_dim <= 32 that spills nothing (64x64 and 64x128 spill ~90 B)
        "small": [_cfg(64, 64, 4, 2), _cfg(64, 128, 8, 2), _cfg(32, 64, 4, 2), _cfg(32, 128, 8, 2)],
        "mid": [_cfg(32, 128, 8, 3), _cfg(32, 64, 4, 3), _cfg(64, 128, 8, 3)],
        "large": [_cfg(32, 128, 8, 3), _cfg(16, 128, 8, 3), _cfg(32, 64, 4, 3)],
    },
}
# fp32 inputs use IEEE (FMA) dots, which unroll into large code: small tiles keep each build to seconds. fp32 is for
# checking, not speed, so one config each.
FP32_CONFIGS: dict[str, triton.Config] = {
    "small": _cfg(32, 32, 4, 1), "mid": _cfg(16, 16, 4, 1), "large": _cfg(16, 16, 4, 1),
}
# One fixed config under the interpreter (the autotuner needs a GPU); BLOCK_M != BLOCK_N exercises more edges.
INTERPRET_CONFIG = _cfg(32, 16, 4, 1)


def _dim_class(head_dim: int) -> str:
    return "small" if head_dim <= 32 else ("mid" if head_dim == 64 else "large")


def candidate_configs(kind: str, head_dim: int, dtype: torch.dtype) -> list[triton.Config]:
    """The configs the autotuner chooses among for kernel `kind` ("fwd", "dq", "dkv") on GPU."""
    if dtype == torch.float32:
        return [FP32_CONFIGS[_dim_class(head_dim)]]
    return GPU_CONFIGS[kind][_dim_class(head_dim)]


def _config_key(c: triton.Config) -> tuple:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _all_configs(kind: str) -> list[triton.Config]:
    every = [c for configs in GPU_CONFIGS[kind].values() for c in configs] + list(FP32_CONFIGS.values())
    return list({_config_key(c): c for c in every}.values())


def _prune(kind: str):
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        wanted = {_config_key(c) for c in candidate_configs(kind, head_dim, named_args["Q"].dtype)}
        return [c for c in configs if _config_key(c) in wanted]

    return prune


def _tuned(kind: str):
    """Autotune over the head-dim class's configs on GPU; a plain kernel under the interpreter."""
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(
        configs=_all_configs(kind),
        key=["HEAD_DIM", "TUNE_KEY"],
        prune_configs_by={"early_config_prune": _prune(kind)},
    )


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_kv_tile(k_base, v_base, kv_tile, d_ok, PADDED_D: tl.constexpr):
    """A K and a V tile that lie wholly inside the sequence; only padded head-dim lanes are masked."""
    if PADDED_D:
        k = tl.load(k_base + kv_tile, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + kv_tile, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_base + kv_tile)
        v = tl.load(v_base + kv_tile)
    return k, v


@triton.jit
def _first_value(V, kv_start, offs_d, d_ok):
    """v_0 `[BLOCK_D]` fp32: V at the sequence's first key, the shift of the row statistics' copies; the forward
    subtracts it and the dq kernel adds g.v_0 back, so both take it from here."""
    return tl.load(V + kv_start + offs_d, mask=d_ok, other=0.0).to(tl.float32)


@triton.jit
def _load_kv_edge_tile(k_base, v_base, kv_tile, offs_n, T_k, d_ok):
    """A K and a V tile that may run past the last key: rows beyond T_k (and padded lanes) load as 0."""
    kv_mask = (offs_n[:, None] < T_k) & d_ok[None, :]
    return tl.load(k_base + kv_tile, mask=kv_mask, other=0.0), tl.load(v_base + kv_tile, mask=kv_mask, other=0.0)


# How the forward takes its P V and (P*U) V dots (module docstring, `pv_mode`): in the input precision (fp32), as one
# fp16 dot each, with P and P*U split into a 16-bit pair hi + lo (two dots each), or CHOOSE: per program, FP16 where
# `_fp16_fits` says the KV head's values and probe scores fit fp16, else SPLIT.
PV_PLAIN: tl.constexpr = tl.constexpr(0)
PV_FP16: tl.constexpr = tl.constexpr(1)
PV_SPLIT: tl.constexpr = tl.constexpr(2)
PV_CHOOSE: tl.constexpr = tl.constexpr(3)
FP16_CHECK_MIN_LEN = 2048  # bf16 inputs this long (queries or keys) take PV_CHOOSE, shorter ones PV_SPLIT


@triton.jit
def _pv_dot(x, v, acc, PREC: tl.constexpr, PV: tl.constexpr):
    """acc + x @ v for fp32 x `[BM, BN]` and a V tile `[BN, BD]`, in the way PV says."""
    if PV == PV_PLAIN:
        acc = tl.dot(x.to(v.dtype), v, acc, input_precision=PREC)
    elif PV == PV_FP16:  # fp16 keeps 3 more mantissa bits of P than bf16; V's bf16 values convert exactly
        acc = tl.dot(x.to(tl.float16), v.to(tl.float16), acc)
    else:
        x_hi = x.to(v.dtype)
        acc = tl.dot(x_hi, v, acc, input_precision=PREC)
        acc = tl.dot((x - x_hi.to(tl.float32)).to(v.dtype), v, acc, input_precision=PREC)
    return acc


@triton.jit
def _fwd_step(q, r, k, v, m_i, l_i, r_i, acc_o, acc_or, u_shift, offs_m, offs_n, causal_off, T_k, qk_scale2,
              MASK: tl.constexpr, PREC: tl.constexpr, PV: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale2  # [BM, BN] logits in base 2
    u = tl.dot(r, tl.trans(k), input_precision=PREC) - u_shift[:, None]  # [BM, BN] probe scores, unscaled
    if MASK:
        visible = (offs_n[None, :] <= offs_m[:, None] + causal_off) & (offs_n[None, :] < T_k)
        s = tl.where(visible, s, float("-inf"))
        u = tl.where(visible, u, 0.0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    pu = p * u
    l_i = l_i * alpha + tl.sum(p, 1)
    r_i = r_i * alpha + tl.sum(pu, 1)
    acc_o = _pv_dot(p, v, acc_o * alpha[:, None], PREC, PV)
    acc_or = _pv_dot(pu, v, acc_or * alpha[:, None], PREC, PV)
    return m_new, l_i, r_i, acc_o, acc_or


@triton.jit
def _fwd_sweep(q, r, k_base, v_base, kv_tile, d_ok, u_shift, offs_m, m0, causal_off, T_k, qk_scale2, KV_ROW,
               m_i, l_i, r_i, acc_o, acc_or, active,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
               PREC: tl.constexpr, PV: tl.constexpr):
    """One query tile's pass over its visible K/V tiles, continuing the fp32 state (m, l, R, O, OR); a sweep that is
    not `active` has empty loops and returns the state as it came."""
    arange_n = tl.arange(0, BLOCK_N)
    n_full = ((m0 + causal_off + 1) // BLOCK_N) * BLOCK_N  # key tiles below it are visible to every row of the tile
    n_end = tl.minimum(T_k, m0 + BLOCK_M + causal_off)
    n_full = tl.where(active, n_full, 0)
    n_end = tl.where(active, n_end, 0)
    # The tiles crossing the diagonal or the end of the keys come first: with the full tiles first, ptxas
    # serialized every wgmma of the kernel (C7515, accumulators defined between the two loops' stages).
    edge_start = n_full.to(tl.int64) * KV_ROW  # int64: n_full * KV_ROW passes 2^31 at a million keys of 2048 lanes
    k_edge = k_base + edge_start
    v_edge = v_base + edge_start
    for start_n in range(n_full, n_end, BLOCK_N):
        offs_n = start_n + arange_n
        k, v = _load_kv_edge_tile(k_edge, v_edge, kv_tile, offs_n, T_k, d_ok)
        m_i, l_i, r_i, acc_o, acc_or = _fwd_step(q, r, k, v, m_i, l_i, r_i, acc_o, acc_or, u_shift, offs_m, offs_n,
                                                 causal_off, T_k, qk_scale2, True, PREC, PV)
        k_edge += BLOCK_N * KV_ROW
        v_edge += BLOCK_N * KV_ROW
    for start_n in range(0, n_full, BLOCK_N):
        k, v = _load_kv_tile(k_base, v_base, kv_tile, d_ok, BLOCK_D != HEAD_DIM)
        m_i, l_i, r_i, acc_o, acc_or = _fwd_step(q, r, k, v, m_i, l_i, r_i, acc_o, acc_or, u_shift, offs_m,
                                                 start_n + arange_n, causal_off, T_k, qk_scale2, False, PREC, PV)
        k_base += BLOCK_N * KV_ROW
        v_base += BLOCK_N * KV_ROW
    return m_i, l_i, r_i, acc_o, acc_or


# fp16 dots in the forward need V (whose bf16 values convert exactly inside fp16's normal range) and P*U (|u - u_diag|
# <= 2 |r| max_j |k_j|) well inside fp16's range, V not so small that fp16's subnormals round it: a margin of 2x
# below fp16's largest value (65504) and 2^-6 (absolute rounding 2^-25 relative to it) at the bottom.
FP16_V_MIN: tl.constexpr = tl.constexpr(2.0**-6)
FP16_V_MAX: tl.constexpr = tl.constexpr(2.0**15)
FP16_PU_MAX: tl.constexpr = tl.constexpr(2.0**15)
RANGE_PARTS_MAX: tl.constexpr = tl.constexpr(64)  # partial maxima per (sequence, KV head), as many as the GPU needs to stream r, k, v at speed


@triton.jit
def _range_kernel(R, K, V, PARTS, T_q, T_k, H, GROUP, rows_per_part,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program (b * H_kv + hk, part): over its `rows_per_part` token rows, max |v|, max |k|^2 and max |r|^2 over the
    GROUP query heads of KV head hk; stored at PARTS[b * H_kv + hk, part, 0:3] (fp32). Rows past the end read 0."""
    H_KV = H // GROUP
    pid, part = tl.program_id(0), tl.program_id(1)
    b, hk = pid // H_KV, pid % H_KV
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    v_max = tl.zeros([BLOCK_T], dtype=tl.float32)
    k_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    r_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    first = part * rows_per_part
    for t0 in range(first, first + rows_per_part, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        kv_ok = (t < T_k)[:, None] & d_ok[None, :]
        kv_off = (b.to(tl.int64) * T_k + t[:, None]) * (H_KV * HEAD_DIM) + hk * HEAD_DIM + offs_d[None, :]
        k = tl.load(K + kv_off, mask=kv_ok, other=0.0).to(tl.float32)
        v = tl.load(V + kv_off, mask=kv_ok, other=0.0).to(tl.float32)
        v_max = tl.maximum(v_max, tl.max(tl.abs(v), 1))
        k_sq = tl.maximum(k_sq, tl.sum(k * k, 1))
        r_ok = (t < T_q)[:, None] & d_ok[None, :]
        for g in range(GROUP):
            r_off = (b.to(tl.int64) * T_q + t[:, None]) * (H * HEAD_DIM) + (hk * GROUP + g) * HEAD_DIM + offs_d[None, :]
            r = tl.load(R + r_off, mask=r_ok, other=0.0).to(tl.float32)
            r_sq = tl.maximum(r_sq, tl.sum(r * r, 1))
    out = PARTS + (pid.to(tl.int64) * tl.num_programs(1) + part) * 3
    tl.store(out, tl.max(v_max, 0))
    tl.store(out + 1, tl.max(k_sq, 0))
    tl.store(out + 2, tl.max(r_sq, 0))


@triton.jit
def _fp16_fits(PARTS, pid_kv, n_parts):
    """Whether the forward may take P V and (P*U) V as single fp16 dots for KV head row pid_kv of PARTS."""
    offs = tl.arange(0, RANGE_PARTS_MAX)
    ok = offs < n_parts
    base = PARTS + (pid_kv.to(tl.int64) * n_parts + offs) * 3
    v_max = tl.max(tl.load(base, mask=ok, other=0.0), 0)
    k_sq = tl.max(tl.load(base + 1, mask=ok, other=0.0), 0)
    r_sq = tl.max(tl.load(base + 2, mask=ok, other=0.0), 0)
    return (v_max >= FP16_V_MIN) & (v_max <= FP16_V_MAX) & (4.0 * r_sq * k_sq <= FP16_PU_MAX * FP16_PU_MAX)


@_tuned("fwd")
@triton.jit(do_not_specialize=["T_q", "T_k", "TUNE_KEY", "H", "GROUP"])
def _fwd_kernel(Q, R, K, V, V16, RANGE_PARTS, n_parts, O, O_STAT, VBAR_STAT, LSE2, UBAR, qk_scale2, T_q, T_k, TUNE_KEY,
                H, GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, PV: tl.constexpr,
                SAVE_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """V16: V in fp16, what the fp16 sweep of PV_CHOOSE reads (the others read V). RANGE_PARTS, n_parts:
    `range_parts`' output and its parts per row, read only when PV is PV_CHOOSE. O_STAT, VBAR_STAT: o - v_0 and
    v_bar - v_0 (v_0: V at the sequence's first key) in the statistics' dtype, for the backward's row statistics;
    written only when SAVE_STATS (a forward without a backward skips them)."""
    H_KV = H // GROUP
    Q_ROW = H * HEAD_DIM  # elements between consecutive tokens of q, r, o, v_bar
    KV_ROW = H_KV * HEAD_DIM
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest (last) query tiles launch first
    b = pid_bh // H
    h = pid_bh % H
    causal_off = T_k - T_q
    m0 = pid_m * BLOCK_M

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < T_q
    q_off = (b.to(tl.int64) * T_q + m0) * Q_ROW + h * HEAD_DIM + tl.arange(0, BLOCK_M)[:, None] * Q_ROW + offs_d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    r = tl.load(R + q_off, mask=q_mask, other=0.0)

    # Scalar base pointers advanced per tile plus one int32 tile of offsets: cheaper in registers than
    # loop-carried [BLOCK_N, BLOCK_D] pointer tensors.
    kv_tile = tl.arange(0, BLOCK_N)[:, None] * KV_ROW + offs_d[None, :]
    kv_start = b.to(tl.int64) * T_k * KV_ROW + (h // GROUP) * HEAD_DIM
    k_base = K + kv_start
    v_base = V + kv_start

    # o is invariant to a per-row shift of u. Shifting by u at the row's own (diagonal) key stops
    # v_bar (1 + u_bar) - OR from cancelling badly when a row's u are large but alike (few keys, large r).
    diag = (offs_m + causal_off).to(tl.int64)
    k_diag = tl.load(K + kv_start + diag[:, None] * KV_ROW + offs_d[None, :], mask=q_mask, other=0.0)
    u_shift = tl.sum(r.to(tl.float32) * k_diag.to(tl.float32), 1)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked row gives alpha = P = 0, never NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_or = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # PV_CHOOSE compiles both sweeps, one after the other, and gives the one this program does not take empty loops
    # (`active`): with the sweeps in the two arms of a branch, ptxas serialized every wgmma of the kernel (its note
    # C7515; benchmarks/kernel_registers.py). Its fp16 sweep streams V16, converted once before the launch: a V tile
    # converted inside the loop is no longer a dot operand straight from shared memory.
    if PV == PV_CHOOSE:
        fits = _fp16_fits(RANGE_PARTS, b * H_KV + h // GROUP, n_parts)
        m_i, l_i, r_i, acc_o, acc_or = _fwd_sweep(q, r, k_base, V16 + kv_start, kv_tile, d_ok, u_shift, offs_m, m0,
                                                  causal_off, T_k, qk_scale2, KV_ROW, m_i, l_i, r_i, acc_o, acc_or,
                                                  fits, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, PREC, PV_FP16)
        m_i, l_i, r_i, acc_o, acc_or = _fwd_sweep(q, r, k_base, v_base, kv_tile, d_ok, u_shift, offs_m, m0,
                                                  causal_off, T_k, qk_scale2, KV_ROW, m_i, l_i, r_i, acc_o, acc_or,
                                                  not fits, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, PREC, PV_SPLIT)
    else:
        m_i, l_i, r_i, acc_o, acc_or = _fwd_sweep(q, r, k_base, v_base, kv_tile, d_ok, u_shift, offs_m, m0,
                                                  causal_off, T_k, qk_scale2, KV_ROW, m_i, l_i, r_i, acc_o, acc_or,
                                                  True, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, PREC, PV)

    inv_l = 1.0 / l_i
    v_bar = acc_o * inv_l[:, None]
    u_bar = r_i * inv_l  # shifted
    o = v_bar * (1.0 + u_bar[:, None]) - acc_or * inv_l[:, None]
    tl.store(O + q_off, o.to(O.dtype.element_ty), mask=q_mask)
    if SAVE_STATS:
        v_0 = _first_value(V, kv_start, offs_d, d_ok)[None, :]
        tl.store(O_STAT + q_off, (o - v_0).to(O_STAT.dtype.element_ty), mask=q_mask)
        tl.store(VBAR_STAT + q_off, (v_bar - v_0).to(VBAR_STAT.dtype.element_ty), mask=q_mask)
    row_off = pid_bh.to(tl.int64) * T_q + offs_m
    tl.store(LSE2 + row_off, m_i + tl.math.log2(l_i), mask=row_ok)
    tl.store(UBAR + row_off, u_bar + u_shift, mask=row_ok)  # unshifted: the backward recomputes plain u


# --------------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _scores(q, r, g, k, v, lse2, offs_m, offs_n, causal_off, T_k, qk_scale2, MASK: tl.constexpr, PREC: tl.constexpr):
    """p, u and a = g.v of a [BM, BN] tile, recomputed; masked positions give p = u = 0."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale2
    u = tl.dot(r, tl.trans(k), input_precision=PREC)
    if MASK:
        visible = (offs_n[None, :] <= offs_m[:, None] + causal_off) & (offs_n[None, :] < T_k)
        s = tl.where(visible, s, float("-inf"))
        u = tl.where(visible, u, 0.0)
    p = tl.math.exp2(s - lse2[:, None])
    a = tl.dot(g, tl.trans(v), input_precision=PREC)  # a_ij = g_i . v_j
    return p, u, a


@triton.jit
def _row_stats_step(q, r, g, k, v, b_row, t, lse2, u_bar, offs_m, offs_n, causal_off, T_k, qk_scale2,
                    MASK: tl.constexpr, PREC: tl.constexpr):
    """Accumulate b = sum_j p a and t = sum_j p a (1 + u_bar - u) over one key tile, in fp32."""
    p, u, a = _scores(q, r, g, k, v, lse2, offs_m, offs_n, causal_off, T_k, qk_scale2, MASK, PREC)
    pa = p * a
    return b_row + tl.sum(pa, 1), t + tl.sum(pa * (1.0 + u_bar[:, None] - u), 1)


@triton.jit
def _dq_step(q, r, g, k, v, acc_dq, acc_dr, lse2, u_bar, t, b_row, offs_m, offs_n, causal_off, T_k, qk_scale2,
             MASK: tl.constexpr, PREC: tl.constexpr):
    p, u, a = _scores(q, r, g, k, v, lse2, offs_m, offs_n, causal_off, T_k, qk_scale2, MASK, PREC)
    a_minus_b = a - b_row[:, None]
    ds = p * (a - t[:, None] + (u_bar[:, None] - u) * a_minus_b)
    du = -(p * a_minus_b)
    acc_dq = tl.dot(ds.to(k.dtype), k, acc_dq, input_precision=PREC)
    acc_dr = tl.dot(du.to(k.dtype), k, acc_dr, input_precision=PREC)
    return acc_dq, acc_dr


@_tuned("dq")
@triton.jit(do_not_specialize=["T_q", "T_k", "TUNE_KEY", "H", "GROUP"])
def _bwd_dq_kernel(Q, R, K, V, GO, O_STAT, VBAR_STAT, LSE2, UBAR, TT, BB, DQ, DR, qk_scale, qk_scale2, T_q, T_k, TUNE_KEY,
                   H, GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                   USE_STATS: tl.constexpr, STATS_MIN_KEYS: tl.constexpr, STAT_MIN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    H_KV = H // GROUP
    Q_ROW = H * HEAD_DIM
    KV_ROW = H_KV * HEAD_DIM
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    causal_off = T_k - T_q
    m0 = pid_m * BLOCK_M

    offs_m = m0 + tl.arange(0, BLOCK_M)
    arange_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < T_q
    q_off = (b.to(tl.int64) * T_q + m0) * Q_ROW + h * HEAD_DIM + tl.arange(0, BLOCK_M)[:, None] * Q_ROW + offs_d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    r = tl.load(R + q_off, mask=q_mask, other=0.0)
    g = tl.load(GO + q_off, mask=q_mask, other=0.0)
    row_off = pid_bh.to(tl.int64) * T_q + offs_m
    lse2 = tl.load(LSE2 + row_off, mask=row_ok, other=0.0)
    u_bar = tl.load(UBAR + row_off, mask=row_ok, other=0.0)

    # Scalar base pointers advanced per tile plus one int32 tile of offsets: cheaper in registers than
    # loop-carried [BLOCK_N, BLOCK_D] pointer tensors.
    kv_tile = arange_n[:, None] * KV_ROW + offs_d[None, :]
    kv_start = b.to(tl.int64) * T_k * KV_ROW + (h // GROUP) * HEAD_DIM
    n_full = ((m0 + causal_off + 1) // BLOCK_N) * BLOCK_N
    n_end = tl.minimum(T_k, m0 + BLOCK_M + causal_off)

    # The row statistics b and t (module docstring), stored for the dk/dv kernel: from the forward's saved o and
    # v_bar, unless this tile's first row sees fewer than STATS_MIN_KEYS keys or a saved value is unusable; then
    # recomputed over the keys. Loop bounds of zero skip that pass rather than a branch around it: Triton's pipeliner
    # gave up on every loop of the kernel (every wgmma waiting on the one before) when the loops sat inside an `if`.
    if USE_STATS:
        o_saved = tl.load(O_STAT + q_off, mask=q_mask, other=0.0).to(tl.float32)  # o - v_0
        v_bar_saved = tl.load(VBAR_STAT + q_off, mask=q_mask, other=0.0).to(tl.float32)  # v_bar - v_0
        v_0 = _first_value(V, kv_start, offs_d, d_ok)
        g_v_0 = tl.sum(g.to(tl.float32) * v_0[None, :], 1)
        t_saved = tl.sum(g.to(tl.float32) * o_saved, 1) + g_v_0
        b_saved = tl.sum(g.to(tl.float32) * v_bar_saved, 1) + g_v_0
        o_largest = tl.max(tl.max(tl.abs(o_saved), 1), 0)
        v_bar_largest = tl.max(tl.max(tl.abs(v_bar_saved), 1), 0)
        recompute = ((m0 + causal_off + 1 < STATS_MIN_KEYS) | (o_largest == float("inf")) | (o_largest < STAT_MIN)
                     | (v_bar_largest == float("inf")) | (v_bar_largest < STAT_MIN))
        stats_full = tl.where(recompute, n_full, 0)
        stats_end = tl.where(recompute, n_end, 0)
    else:
        stats_full, stats_end = n_full, n_end
    b_row = tl.zeros([BLOCK_M], dtype=tl.float32)
    t = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base = K + kv_start
    v_base = V + kv_start
    for start_n in range(0, stats_full, BLOCK_N):
        k, v = _load_kv_tile(k_base, v_base, kv_tile, d_ok, BLOCK_D != HEAD_DIM)
        b_row, t = _row_stats_step(q, r, g, k, v, b_row, t, lse2, u_bar, offs_m, start_n + arange_n, causal_off, T_k,
                                   qk_scale2, False, PREC)
        k_base += BLOCK_N * KV_ROW
        v_base += BLOCK_N * KV_ROW
    for start_n in range(stats_full, stats_end, BLOCK_N):
        offs_n = start_n + arange_n
        k, v = _load_kv_edge_tile(k_base, v_base, kv_tile, offs_n, T_k, d_ok)
        b_row, t = _row_stats_step(q, r, g, k, v, b_row, t, lse2, u_bar, offs_m, offs_n, causal_off, T_k, qk_scale2,
                                   True, PREC)
        k_base += BLOCK_N * KV_ROW
        v_base += BLOCK_N * KV_ROW
    if USE_STATS:
        b_row = tl.where(recompute, b_row, b_saved)
        t = tl.where(recompute, t, t_saved)
    tl.store(TT + row_off, t, mask=row_ok)
    tl.store(BB + row_off, b_row, mask=row_ok)

    # Pass 2: dq and dr.
    k_base = K + kv_start
    v_base = V + kv_start
    acc_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_dr = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_full, BLOCK_N):
        k, v = _load_kv_tile(k_base, v_base, kv_tile, d_ok, BLOCK_D != HEAD_DIM)
        acc_dq, acc_dr = _dq_step(q, r, g, k, v, acc_dq, acc_dr, lse2, u_bar, t, b_row, offs_m, start_n + arange_n,
                                  causal_off, T_k, qk_scale2, False, PREC)
        k_base += BLOCK_N * KV_ROW
        v_base += BLOCK_N * KV_ROW
    for start_n in range(n_full, n_end, BLOCK_N):
        offs_n = start_n + arange_n
        k, v = _load_kv_edge_tile(k_base, v_base, kv_tile, offs_n, T_k, d_ok)
        acc_dq, acc_dr = _dq_step(q, r, g, k, v, acc_dq, acc_dr, lse2, u_bar, t, b_row, offs_m, offs_n,
                                  causal_off, T_k, qk_scale2, True, PREC)
        k_base += BLOCK_N * KV_ROW
        v_base += BLOCK_N * KV_ROW

    tl.store(DQ + q_off, (acc_dq * qk_scale).to(DQ.dtype.element_ty), mask=q_mask)
    tl.store(DR + q_off, acc_dr.to(DR.dtype.element_ty), mask=q_mask)


@triton.jit
def _dkv_step(q_base, r_base, g_base, q_tile, LSE2, UBAR, TT, BB, row_base, k, v, acc_dk, acc_dv, offs_m, offs_n, d_ok,
              causal_off, T_q, T_k, qk_scale, qk_scale2,
              MASK: tl.constexpr, PADDED_D: tl.constexpr, PREC: tl.constexpr):
    if MASK:
        row_ok = offs_m < T_q
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + q_tile, mask=q_mask, other=0.0)
        r = tl.load(r_base + q_tile, mask=q_mask, other=0.0)
        g = tl.load(g_base + q_tile, mask=q_mask, other=0.0)
        lse2 = tl.load(LSE2 + row_base + offs_m, mask=row_ok, other=0.0)
        u_bar = tl.load(UBAR + row_base + offs_m, mask=row_ok, other=0.0)
        t = tl.load(TT + row_base + offs_m, mask=row_ok, other=0.0)
        b_row = tl.load(BB + row_base + offs_m, mask=row_ok, other=0.0)
    else:
        if PADDED_D:
            q = tl.load(q_base + q_tile, mask=d_ok[None, :], other=0.0)
            r = tl.load(r_base + q_tile, mask=d_ok[None, :], other=0.0)
            g = tl.load(g_base + q_tile, mask=d_ok[None, :], other=0.0)
        else:
            q = tl.load(q_base + q_tile)
            r = tl.load(r_base + q_tile)
            g = tl.load(g_base + q_tile)
        lse2 = tl.load(LSE2 + row_base + offs_m)
        u_bar = tl.load(UBAR + row_base + offs_m)
        t = tl.load(TT + row_base + offs_m)
        b_row = tl.load(BB + row_base + offs_m)
    # Transposed tiles [BN, BM]: rows are keys, columns are queries. Ordered to keep few tiles live at once.
    u_t = tl.dot(k, tl.trans(r), input_precision=PREC)
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale2
    if MASK:
        visible = (offs_n[:, None] <= offs_m[None, :] + causal_off) & (offs_m[None, :] < T_q) & (offs_n[:, None] < T_k)
        s_t = tl.where(visible, s_t, float("-inf"))
        u_t = tl.where(visible, u_t, 0.0)
    centred = u_bar[None, :] - u_t
    p_t = tl.math.exp2(s_t - lse2[None, :])
    acc_dv = tl.dot((p_t * (1.0 + centred)).to(g.dtype), g, acc_dv, input_precision=PREC)
    a_minus_b = tl.dot(v, tl.trans(g), input_precision=PREC) - b_row[None, :]
    # a - t = (a - b) + (b - t)
    ds_t = (p_t * (a_minus_b * (1.0 + centred) + (b_row - t)[None, :])) * qk_scale
    du_t = -(p_t * a_minus_b)
    acc_dk = tl.dot(ds_t.to(q.dtype), q, acc_dk, input_precision=PREC)
    acc_dk = tl.dot(du_t.to(r.dtype), r, acc_dk, input_precision=PREC)
    return acc_dk, acc_dv


@_tuned("dkv")
@triton.jit(do_not_specialize=["T_q", "T_k", "TUNE_KEY", "H", "GROUP"])
def _bwd_dkv_kernel(Q, R, K, V, GO, LSE2, UBAR, TT, BB, DK, DV, qk_scale, qk_scale2, T_q, T_k, TUNE_KEY,
                    H, GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    H_KV = H // GROUP
    Q_ROW = H * HEAD_DIM
    KV_ROW = H_KV * HEAD_DIM
    PADDED_D: tl.constexpr = BLOCK_D != HEAD_DIM
    pid_bkv = tl.program_id(0)
    pid_n = tl.program_id(1)  # the first key tiles see the most queries: they launch first
    b = pid_bkv // H_KV
    h_kv = pid_bkv % H_KV
    causal_off = T_k - T_q
    n0 = pid_n * BLOCK_N

    offs_n = n0 + tl.arange(0, BLOCK_N)
    arange_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_off = (b.to(tl.int64) * T_k + n0) * KV_ROW + h_kv * HEAD_DIM + tl.arange(0, BLOCK_N)[:, None] * KV_ROW + offs_d[None, :]
    kv_mask = (offs_n[:, None] < T_k) & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    acc_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_tile = arange_m[:, None] * Q_ROW + offs_d[None, :]

    # Query tiles [m_lo, m_end) see this key tile. Tiles in [m_a, m_b) need no mask: every row is a valid query
    # that sees every key of the tile (and the key tile is not ragged); the others cross the diagonal or an edge.
    m_lo = (tl.maximum(n0 - causal_off, 0) // BLOCK_M) * BLOCK_M
    m_end = tl.cdiv(T_q, BLOCK_M) * BLOCK_M
    m_a = tl.minimum(tl.maximum(m_lo, tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M), m_end)
    m_b = tl.where(n0 + BLOCK_N <= T_k, tl.maximum(m_a, (T_q // BLOCK_M) * BLOCK_M), m_a)

    for head_in_group in range(GROUP):  # GQA: sum over the query heads sharing this KV head
        h = h_kv * GROUP + head_in_group
        q_start = (b.to(tl.int64) * T_q + m_lo) * Q_ROW + h * HEAD_DIM
        q_base = Q + q_start
        r_base = R + q_start
        g_base = GO + q_start
        row_base = (b * H + h).to(tl.int64) * T_q  # rows of the [B, H, T_q] statistics
        for start_m in range(m_lo, m_a, BLOCK_M):
            acc_dk, acc_dv = _dkv_step(q_base, r_base, g_base, q_tile, LSE2, UBAR, TT, BB, row_base, k, v, acc_dk, acc_dv,
                                       start_m + arange_m, offs_n, d_ok, causal_off, T_q, T_k, qk_scale, qk_scale2,
                                       True, PADDED_D, PREC)
            q_base += BLOCK_M * Q_ROW
            r_base += BLOCK_M * Q_ROW
            g_base += BLOCK_M * Q_ROW
        for start_m in range(m_a, m_b, BLOCK_M):
            acc_dk, acc_dv = _dkv_step(q_base, r_base, g_base, q_tile, LSE2, UBAR, TT, BB, row_base, k, v, acc_dk, acc_dv,
                                       start_m + arange_m, offs_n, d_ok, causal_off, T_q, T_k, qk_scale, qk_scale2,
                                       False, PADDED_D, PREC)
            q_base += BLOCK_M * Q_ROW
            r_base += BLOCK_M * Q_ROW
            g_base += BLOCK_M * Q_ROW
        for start_m in range(m_b, m_end, BLOCK_M):
            acc_dk, acc_dv = _dkv_step(q_base, r_base, g_base, q_tile, LSE2, UBAR, TT, BB, row_base, k, v, acc_dk, acc_dv,
                                       start_m + arange_m, offs_n, d_ok, causal_off, T_q, T_k, qk_scale, qk_scale2,
                                       True, PADDED_D, PREC)
            q_base += BLOCK_M * Q_ROW
            r_base += BLOCK_M * Q_ROW
            g_base += BLOCK_M * Q_ROW

    tl.store(DK + kv_off, acc_dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, acc_dv.to(DV.dtype.element_ty), mask=kv_mask)


# --------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------

KernelConfigs = dict  # {"fwd" | "dq" | "dkv": triton.Config}; missing kinds are autotuned (or fixed, interpreted)


def _tune_key(t_q: int, n_heads_total: int) -> int:
    """Autotune bucket: log2 of the query length (128 .. 16384) and whether B*H alone fills the GPU."""
    t_bucket = min(max(math.ceil(math.log2(max(t_q, 1))), 7), 14)
    return 2 * t_bucket + int(n_heads_total >= 64)


def _launch(kernel, grid, args: tuple, meta: dict, config: triton.Config | None) -> None:
    if INTERPRET:
        config = config or INTERPRET_CONFIG
        kernel[grid(config.kwargs)](*args, **meta, **config.kwargs)
    elif config is not None:
        jit_fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        jit_fn[grid(config.kwargs)](*args, **meta, **config.all_kwargs())
    else:
        kernel[grid](*args, **meta)


def _meta(q: torch.Tensor, k: torch.Tensor) -> dict:
    head_dim = q.shape[3]
    return dict(
        H=q.shape[2],
        GROUP=q.shape[2] // k.shape[2],
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, head_dim),
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )


def range_parts(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Partial maxima that decide the forward's fp16 path: `[B * H_kv, parts, 3]` fp32 holding max |v|, max |k|^2
    and max |r|^2 (over the KV head's query heads) per slice of the tokens; one launch, no host sync.

    r `[B, T_q, H, D]`; k, v `[B, T_k, H_kv, D]`, contiguous.
    """
    B, T_q, H, D = r.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    block_t = 32
    wanted = triton.cdiv(4 * num_sms(r.device), B * H_kv)  # enough programs to stream r, k, v at bandwidth
    parts = max(1, min(RANGE_PARTS_MAX.value, wanted, triton.cdiv(max(T_q, T_k), block_t)))
    rows_per_part = triton.cdiv(triton.cdiv(max(T_q, T_k), parts), block_t) * block_t
    out = torch.empty(B * H_kv, parts, 3, device=r.device, dtype=torch.float32)
    _range_kernel[(B * H_kv, parts)](r, k, v, out, T_q, T_k, H, H // H_kv, rows_per_part,
                                     HEAD_DIM=D, BLOCK_D=max(16, D), BLOCK_T=block_t, num_warps=4)  # fmt: skip
    return out


def fp16_pv_ok(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`[B, H_kv]` bool: where the forward takes P V and (P*U) V as single fp16 dots (else hi + lo splits), as
    `_fp16_fits` decides in the kernel from `range_parts`. For tests and for users asking which path an input takes."""
    parts = range_parts(*(x.contiguous() for x in (r, k, v))).amax(1)  # [B * H_kv, 3]
    v_max, k_sq, r_sq = parts.unbind(1)
    ok = (v_max >= FP16_V_MIN.value) & (v_max <= FP16_V_MAX.value) & (4 * r_sq * k_sq <= FP16_PU_MAX.value**2)
    return ok.view(r.shape[0], k.shape[2])


def fp16_copy(v: torch.Tensor) -> torch.Tensor:
    """V in fp16 for PV_CHOOSE's fp16 sweep. Values beyond fp16's range only reach programs that `_fp16_fits` sends
    to the split sweep, which reads V itself."""
    return v.to(torch.float16)


def pv_mode(dtype: torch.dtype, T_q: int, T_k: int) -> int:
    """How the forward takes its P V and (P*U) V dots for inputs of `dtype` (the PV_* constants above)."""
    if dtype == torch.float32:
        return PV_PLAIN.value
    if dtype == torch.float16:
        return PV_FP16.value
    return PV_CHOOSE.value if max(T_q, T_k) >= FP16_CHECK_MIN_LEN else PV_SPLIT.value


def stat_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of the copies of o and v_bar (less v_0) that the forward saves for the backward's row statistics, or
    None where it saves none and the backward recomputes them everywhere. fp16 for bf16 inputs, whose backward rounds
    dS to bf16 before its dots. None for fp16 and fp32 inputs: their backward rounds dS far less, and the mismatch
    between saved statistics and its own p, u, a shows. fp16 inputs whose values and keys share offsets (v + 10, keys
    + 5 times a common direction before normalising; T = 80, D = 16, 3 draws, under the interpreter) gave dq / dr
    errors of 6.4e-3 / 6.7e-3 from fp16 copies, 6.9e-3 / 4.8e-3 from fp32 copies, 1.4e-3 / 1.4e-3 recomputed: the
    forward's own fp16 P V dots, not the copies' rounding, set it. bf16 inputs do not pay it: on the H200 the check's
    offset study put their dq, dr, dk errors from the copies within 1.06x of the recomputed ones.
    """
    return torch.float16 if dtype == torch.bfloat16 else None


def parallax_fwd(q, r, k, v, scale: float, configs: KernelConfigs | None = None, pv: int | None = None,
                 stats: torch.dtype | None = None, save_stats: bool = True):
    """Forward. Inputs contiguous `[B, T, H, D]` (k, v: `[B, T_k, H_kv, D]`); `pv` overrides `pv_mode` (tests:
    the interpreter cannot run bf16, so PV_CHOOSE is tested with fp16 inputs), `stats` overrides `stat_dtype` (tests:
    copies of fp32 inputs); `save_stats=False` (no backward to follow) saves no copies. Without copies o_stat and
    v_bar_stat are empty placeholders, and `parallax_bwd` recomputes the row statistics everywhere.

    Returns `(o, lse2, u_bar, o_stat, v_bar_stat)`: o `[B, T_q, H, D]` in the input dtype; lse2 (= m + log2 l, in
    base-2 units of the logits c*log2(e)*q.k) and u_bar `[B, H, T_q]` fp32; o_stat and v_bar_stat `[B, T_q, H, D]` in
    the statistics' dtype: o and the softmax-weighted mean of v, each minus v_0 (V at the sequence's first key), for
    `parallax_bwd`.
    """
    B, T_q, H, D = q.shape
    T_k = k.shape[1]
    if stats not in (None, torch.float16, torch.float32):
        raise ValueError(f"stats must be torch.float16 or torch.float32 (the dq kernel guards fp16's range), got {stats}")
    o = torch.empty_like(q)
    stats = stat_dtype(q.dtype) if stats is None else stats
    copies = save_stats and stats is not None
    if copies:
        o_stat = torch.empty_like(q, dtype=stats)
        v_bar_stat = torch.empty_like(o_stat)
    else:
        o_stat, v_bar_stat = q.new_empty(0), q.new_empty(0)  # two: a custom operator's outputs must not alias
    lse2 = torch.empty(B, H, T_q, device=q.device, dtype=torch.float32)
    u_bar = torch.empty(B, H, T_q, device=q.device, dtype=torch.float32)
    grid = lambda meta: (B * H, triton.cdiv(T_q, meta["BLOCK_M"]))  # noqa: E731
    pv = pv_mode(q.dtype, T_q, T_k) if pv is None else pv
    if pv == PV_CHOOSE.value:
        parts = range_parts(r, k, v)
        n_parts = parts.shape[1]
        v16 = fp16_copy(v)
    else:
        parts, n_parts, v16 = lse2, 0, v  # lse2: a pointer the kernel then never reads
    stat_ptrs = (o_stat, v_bar_stat) if copies else (o, o)  # pointers the kernel then never writes
    args = (q, r, k, v, v16, parts, n_parts, o, *stat_ptrs, lse2, u_bar, scale * _LOG2E, T_q, T_k, _tune_key(T_q, B * H))
    _launch(_fwd_kernel, grid, args, _meta(q, k) | {"PV": pv, "SAVE_STATS": copies}, (configs or {}).get("fwd"))
    return o, lse2, u_bar, o_stat, v_bar_stat


# Query tiles whose rows all see at least this many keys take the backward's row statistics from the forward's saved
# copies (module docstring); a module attribute so that tests can move it.
STATS_MIN_KEYS = 64
_FP16_SMALLEST_NORMAL = 2.0**-14


def parallax_bwd(q, r, k, v, lse2, u_bar, o_stat, v_bar_stat, grad_o, scale: float, configs: KernelConfigs | None = None):
    """Backward: `(dq, dr, dk, dv)` in the input dtypes, from the tensors `parallax_fwd` returned."""
    B, T_q, H, D = q.shape
    T_k, H_kv = k.shape[1], k.shape[2]
    configs = configs or {}
    use_stats = o_stat.numel() > 0  # else no copies were saved (`parallax_fwd`)
    stat_min = _FP16_SMALLEST_NORMAL if o_stat.dtype == torch.float16 else 0.0
    meta = _meta(q, k)
    key = _tune_key(T_q, B * H)
    dq, dr = torch.empty_like(q), torch.empty_like(r)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    t = torch.empty(B, H, T_q, device=q.device, dtype=torch.float32)
    b = torch.empty(B, H, T_q, device=q.device, dtype=torch.float32)
    grid_q = lambda meta: (B * H, triton.cdiv(T_q, meta["BLOCK_M"]))  # noqa: E731
    args = (q, r, k, v, grad_o, o_stat, v_bar_stat, lse2, u_bar, t, b, dq, dr, scale, scale * _LOG2E, T_q, T_k, key)
    stats_meta = {"USE_STATS": use_stats, "STATS_MIN_KEYS": STATS_MIN_KEYS, "STAT_MIN": stat_min}
    _launch(_bwd_dq_kernel, grid_q, args, meta | stats_meta, configs.get("dq"))
    grid_kv = lambda meta: (B * H_kv, triton.cdiv(T_k, meta["BLOCK_N"]))  # noqa: E731
    args = (q, r, k, v, grad_o, lse2, u_bar, t, b, dk, dv, scale, scale * _LOG2E, T_q, T_k, key)
    _launch(_bwd_dkv_kernel, grid_kv, args, meta, configs.get("dkv"))
    return dq, dr, dk, dv


def _direct(configs: KernelConfigs | None) -> bool:
    """Launch the kernels directly rather than through the custom operators of `triton_ops`: always outside
    torch.compile, where the operators' dispatch only adds host time (a quarter of the wrapper's host time per
    forward+backward, launches aside: 344 -> 260 us on our 2-core CPU; host time is what bounds short sequences), and
    for forced tile configs (the checks) inside it too."""
    return bool(configs) or not torch.compiler.is_compiling()


class ParallaxTritonFunction(torch.autograd.Function):
    """`(o, lse2, u_bar, o_stat, v_bar_stat)` of `parallax_fwd`; differentiable in q, r, k, v through o (the others are
    saved state).

    Supports `torch.vmap` (the stacked training of mad/stacked_model.py): the vmapped dimension is folded into the
    batch, so N runs take one launch per kernel.
    """

    @staticmethod
    def forward(q, r, k, v, scale: float, configs: KernelConfigs | None):
        if _direct(configs):
            return parallax_fwd(q, r, k, v, scale, configs)
        return triton_ops.triton_fwd(q, r, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, r, k, v, scale, configs = inputs
        _, *state = output
        ctx.mark_non_differentiable(*state)
        # Autograd would otherwise hand backward zero-filled gradients of the state, two [B, T, H, D] among them:
        # 128 MiB of zeros at B = 2, T = 16384, H = 16, D = 64 (analysis/kernels/parallax_train_bench.md).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, r, k, v, *state)
        ctx.scale, ctx.configs = scale, configs

    @staticmethod
    def backward(ctx, grad_o, *_grad_state):
        q, r, k, v, lse2, u_bar, o_stat, v_bar_stat = ctx.saved_tensors
        grad_o = grad_o.contiguous()
        if _direct(ctx.configs):
            grads = parallax_bwd(q, r, k, v, lse2, u_bar, o_stat, v_bar_stat, grad_o, ctx.scale, ctx.configs)
        else:
            grads = triton_ops.triton_bwd(q, r, k, v, lse2, u_bar, o_stat, v_bar_stat, grad_o, ctx.scale)
        return (*grads, None, None)

    @staticmethod
    def vmap(info, in_dims, q, r, k, v, scale, configs):
        q, r, k, v = (fold_vmapped(x, d, info.batch_size).contiguous() for x, d in zip((q, r, k, v), in_dims[:4]))
        outputs = ParallaxTritonFunction.apply(q, r, k, v, scale, configs)
        return tuple(x.unflatten(0, (info.batch_size, -1)) for x in outputs), (0,) * len(outputs)


MAX_SEQ_LEN = 1 << 20  # launch grids put query tiles on grid axis 1 (at most 65535 tiles of 16)


def unsupported_reason(q: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str | None:
    """Why the kernel cannot take these (already reference-validated) inputs, or None if it can."""
    if not causal:
        return "the Triton kernel is causal only (causal=True); use impl='reference' for non-causal attention"
    if q.device.type == "cpu" and not INTERPRET:
        return ("the Triton kernel needs CUDA tensors; CPU tensors run only under Triton's interpreter "
                "(set TRITON_INTERPRET=1 before kernels.parallax.triton is imported), or use impl='reference'")
    if q.device.type not in ("cpu", "cuda"):
        return f"the Triton kernel runs on CUDA tensors, got device {q.device}"
    if q.dtype not in DTYPES:
        return f"the Triton kernel takes dtypes {', '.join(map(str, DTYPES))}, got {q.dtype}; use impl='reference'"
    if INTERPRET and q.dtype == torch.bfloat16:
        return "bfloat16 is not supported under TRITON_INTERPRET=1 (the interpreter computes it wrongly); use float16/float32"
    if q.shape[3] not in HEAD_DIMS:
        return f"the Triton kernel takes head_dim in {HEAD_DIMS}, got {q.shape[3]}"
    if v.shape[3] != q.shape[3]:
        return f"the Triton kernel needs the value head_dim ({v.shape[3]}) equal to the q/k head_dim ({q.shape[3]})"
    if max(q.shape[1], k.shape[1]) > MAX_SEQ_LEN:
        return f"the Triton kernel takes sequences up to {MAX_SEQ_LEN} tokens, got q {q.shape[1]}, k {k.shape[1]}"
    return None


def parallax_attention_triton(q, r, k, v, *, scale: float | None = None, configs: KernelConfigs | None = None):
    """Causal Parallax attention with the Triton kernels (inputs validated by `kernels.parallax.parallax_attention`).

    Args:
        q, r (Tensor): `[B, T_q, H, D]`.  k, v (Tensor): `[B, T_k, H_kv, D]`, `H % H_kv == 0`, `T_q <= T_k`.
        scale (float, Optional): multiplies q.k only. Default: `D ** -0.5`.
        configs (dict, Optional): force `triton.Config`s per kernel ("fwd", "dq", "dkv") instead of autotuning.

    Returns:
        Tensor `[B, T_q, H, D]` in the dtype of q; differentiable in q, r, k, v.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # Non-contiguous views (e.g. split from a fused projection) are copied once; the kernels assume [B, T, H, D].
    q, r, k, v = (x.contiguous() for x in (q, r, k, v))
    if _forward_only(q, r, k, v, configs=configs):
        return parallax_fwd(q, r, k, v, scale, configs, save_stats=False)[0]
    return ParallaxTritonFunction.apply(q, r, k, v, scale, configs)[0]


def _forward_only(*inputs: torch.Tensor, configs: KernelConfigs | None) -> bool:
    """No backward can follow (grad off or no input needing one), so the forward need not save the row statistics'
    copies; only for a direct launch of plain tensors (torch.compile and vmap go through the autograd Function)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return False
    return _direct(configs) and not any(torch._C._functorch.is_batchedtensor(x) for x in inputs)
