"""Parallax decode: one query and its probe per sequence, against a KV cache (docs/parallax.md §6).

For each sequence b, query head h (KV head h // group) and its valid prefix of `cache_seqlens[b]` keys, the
output equals `reference.parallax_attention(q, r, k[:, :len], v[:, :len])`: a single query sees the whole prefix.

Kernels stream the prefix in tiles with one fp32 state per row (docs/parallax.md §4), in the log2 domain:

    s = c·log2(e)·q·k     u = r·k (unscaled)     m' = max(m, max s)     α = 2^(m − m')     p = 2^(s − m')
    l = α·l + Σp          R = α·R + Σ p·u          O = α·O + p·V          OR = α·OR + (p∘u)·V

Shifted probe scores (bf16/fp16 accuracy): u is unscaled and can be large (|u| ~ 10 with RMS-scale r and k at
D = 128), and P∘U is rounded to 16 bits before its MMA, so an unshifted OR carries an error ~|u|·2^-8·|v| that
o = v̄(1 + ū) − ōr does not cancel (at one key, o = v exactly). o is invariant to adding a constant to every
u of a row (docs/parallax.md §1), so the kernels keep the running ū = R/l (this tile included) as the shift
instead of R and accumulate OR' = Σ p·(u − ū)·v, rebasing it in fp32 when ū moves (OR' += (ū_old − ū_new)·O):

    ū' = (α·l·ū + Σ p·u) / l'      OR' = α·(OR' + (ū − ū')·O) + (p∘(u − ū'))·V      (R = ū·l, OR = OR' + ū·O)

The 16-bit rounding error then scales with |u − ū|, like that of p itself. One split finalises o = (O − OR')/l;
split partials are unshifted in fp32 before they are written (R = ū·l, OR = OR' + ū·O), so the merge is
unchanged.

Split-KV: each split writes its RAW partials (m, l, R, O, OR); the merge rescales them to the shared max
M = max_s m_s, sums, and only then finalises o = v̄(1 + ū) − ōr with v̄ = O/l, ū = R/l, ōr = OR/l. Finished
outputs must never be merged with LSE weights: o is not linear in the split (the ū·v̄ term).

Triton merge (`triton_decode(merge=...)`): "kernel" merges in a second launch, one program per (b, head).
"atomic" merges in the split launch itself: each split program stores its partials, CTA-barriers, and one thread
adds 1 to the int32 counter of its (b, kv head) with acq_rel semantics at gpu scope; the program that reads
num_splits − 1 back is the last, merges the GROUP rows of that KV head (loads with `.cg`, from L2) and stores 0
back, so that the counter is zero again when the launch ends. Ordering: every thread's partial stores precede the
barrier, which precedes the releasing increment; the last increment reads every earlier one in the counter's
modification order, so its acquire makes all splits' partials visible, and the barrier after it (Triton's
broadcast of a scalar atomic's result) orders the merging threads' loads after the acquire.
The counters are one zeroed buffer per device (`_MERGE_COUNTERS`), grown outside CUDA-graph capture and never
freed (a captured graph keeps its address); calls that use it must not overlap: back-to-back calls on one stream
are safe, concurrent calls on two streams of one device (or concurrent replays of graphs holding it) are not. Under
capture, a buffer too small for B*H_kv (e.g. no eager call beforehand) makes the call use merge="kernel".

Backends (`impl`): "reference" (PyTorch, any device), "triton" (any CUDA GPU; CPU under TRITON_INTERPRET=1),
"cute" (CuTeDSL, Hopper, see cute_decode.py), "auto" (on sm_90 with the DSL importable: triton for B*H <= 256,
except where its automatic split leaves two key tiles per split, and cute above, as measured, see `hopper_kernel`;
triton on other GPUs; reference on CPU).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl

from kernels.parallax.reference import parallax_attention

IMPLS = ("auto", "reference", "triton", "cute")
MAX_SPLITS = 64  # the most KV splits per sequence any kernel here launches (forced or automatic)
KERNEL_HEAD_DIMS = (64, 128)
_REFERENCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUTE_DTYPES = (torch.float16, torch.bfloat16)
_DEFAULT_NUM_SMS = 132  # H200; used when no GPU is there to ask (the interpreter)
_LOG2E = 1.4426950408889634
_CUTE_MAX_GROUP = 8  # query heads per KV head in the CuTeDSL tile (rows 0..7 queries, 8..15 probes)
_TRITON_MAX_ROWS = 256  # impl="auto" on Hopper: B * H up to this runs the Triton kernel (see hopper_kernel)
_TRITON_PROGRAMS_PER_SM = 2  # 4 warps, 3 pipelined stages of a 64-key K/V tile: about two programs fit an SM
_TRITON_BLOCK_N = 64  # keys per K/V tile of the Triton split kernel on GPU (32 under the interpreter)
TRITON_MERGES = ("atomic", "kernel")  # split partials merged by the last split program, or by a second launch
TRITON_MERGE = "atomic"  # the default of triton_decode (and so of impl="triton" / "auto" when Triton runs)
_MIN_COUNTERS = 1024  # int32 merge counters first allocated per device (B * H_kv needed; doubled when short)
_MERGE_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}  # device -> every counter buffer made, newest last


def parallax_decode(
    q: torch.Tensor,
    r: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
    num_splits: int | None = None,
) -> torch.Tensor:
    """Single-step Parallax decode against a KV cache (forward only).

    Args:
        q (Tensor): queries `[B, 1, H, D]`.
        r (Tensor): probes, one per query `[B, 1, H, D]` (unscaled: `scale` multiplies q.k only).
        k_cache (Tensor): keys `[B, max_len, H_kv, D]`, `H` a multiple of `H_kv`; last dim contiguous.
        v_cache (Tensor): values `[B, max_len, H_kv, D]`; last dim contiguous.
        cache_seqlens (Tensor, Optional): int32 `[B]`, valid keys per sequence, in `[1, max_len]`; sequence b
            reads only `k_cache[b, :cache_seqlens[b]]`. Default: `max_len` for every sequence. The range check
            syncs with the device; it is skipped while a CUDA graph is being captured.
        scale (float, Optional): multiplies q.k. Default: `D ** -0.5`.
        impl (str): "auto", "reference", "triton" or "cute". Default: "auto".
        num_splits (int, Optional): KV splits per sequence for the kernels, in `[1, MAX_SPLITS]`. Default:
            chosen from `B * H_kv` against the SM count and from the cache length.

    Returns:
        Tensor `[B, 1, H, D]` in the dtype of `q`.
    """
    requested = impl
    impl = _resolve_impl(impl, q)
    if impl == "cute" and requested == "auto":
        impl = hopper_kernel(q.shape[0], q.shape[2], _group(q, k_cache), k_cache.shape[1], num_sms(q.device),
                             num_splits)  # fmt: skip
    _check_inputs(q, r, k_cache, v_cache, cache_seqlens, scale, impl, num_splits)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if impl == "reference":
        return _reference_decode(q, r, k_cache, v_cache, cache_seqlens, scale)
    if impl == "triton":
        return triton_decode(q, r, k_cache, v_cache, cache_seqlens=cache_seqlens, scale=scale, num_splits=num_splits)
    try:
        from kernels.parallax import cute_decode
    except Exception as err:  # noqa: BLE001 - any import failure (no DSL, no driver) means "not available"
        raise ValueError(f"CuTeDSL decode is not available: {type(err).__name__}: {err}") from err
    try:
        return cute_decode.cute_decode(q, r, k_cache, v_cache, cache_seqlens=cache_seqlens, scale=scale, num_splits=num_splits)
    except Exception as err:  # noqa: BLE001 - a CuTeDSL-only limit (ValueError) or a compile or launch failure
        if requested != "auto":
            raise
        if not isinstance(err, ValueError):
            warnings.warn(
                f"CuTeDSL decode failed ({type(err).__name__}: {err}); impl='auto' falls back to Triton", stacklevel=2)
        return triton_decode(q, r, k_cache, v_cache, cache_seqlens=cache_seqlens, scale=scale, num_splits=num_splits)


def hopper_kernel(batch: int, heads: int, group: int, max_len: int, sms: int = _DEFAULT_NUM_SMS,
                  num_splits: int | None = None) -> str:  # fmt: skip
    """The kernel `impl="auto"` runs on Hopper: "triton" or "cute".

    From the H200 tables (analysis/kernels/parallax_decode_bench.md): with B*H <= 256 query rows the Triton
    split-KV kernel (merging in its own launch) was faster than the CuTeDSL one at 24 of 26 points (5.1 vs 6.5 us at
    B=1, H=8, L=128); the two others are exactly the points where Triton's automatic split leaves each of several
    split programs two key tiles (B=1, H=16, L=2048: 12.3 vs 11.3 us; B=8, H=8, L=512: 11.1 vs 10.4 us; the runs
    of 2026-11-29 and 2026-11-30, the latter timing the peers interleaved, ordered them the same way), so those go
    to CuTeDSL. Above 256 rows CuTeDSL wins where it matters (short contexts at large batch: 252 vs 297 us at
    B=2048, H=8, L=128) and ties elsewhere. The CuTeDSL tile holds at most 8 query heads (and their probes) per KV
    head.

    The rule reads the cache capacity `max_len` (what the Triton kernel's automatic split is sized by), and a forced
    `num_splits` where given; the tables measured full caches and MHA only, so for ragged `cache_seqlens` and for
    GQA it is the same rule applied unmeasured.
    """
    if group > _CUTE_MAX_GROUP:
        return "triton"
    if batch * heads > _TRITON_MAX_ROWS:
        return "cute"
    tiles = -(-max_len // _TRITON_BLOCK_N)
    splits = num_splits or auto_num_splits(batch, heads // group, max_len, _TRITON_BLOCK_N, _TRITON_PROGRAMS_PER_SM * sms)
    return "cute" if splits > 1 and -(-tiles // splits) == 2 else "triton"


def cute_available() -> tuple[bool, str]:
    """Whether `impl="cute"` can run here: (True, "") or (False, the reason)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if torch.cuda.get_device_capability() != (9, 0):
        return False, f"needs sm_90 (Hopper), device is sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    try:
        from kernels.parallax import cute_decode  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return False, f"{type(err).__name__}: {err}"
    return True, ""


def _group(q, k) -> int:
    return q.shape[2] // k.shape[2] if isinstance(k, torch.Tensor) and k.dim() == 4 and k.shape[2] else 0


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _resolve_impl(impl: str, q: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    if not isinstance(q, torch.Tensor) or not q.is_cuda:
        return "reference"
    if torch.cuda.get_device_capability(q.device) == (9, 0) and cute_available()[0]:
        return "cute"
    return "triton"


def _check_inputs(q, r, k, v, cache_seqlens, scale, impl, num_splits) -> None:
    named = {"q": q, "r": r, "k_cache": k, "v_cache": v}
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(x.shape)}; layout: q, r [batch, 1, heads, head_dim], "
                             "caches [batch, max_len, kv_heads, head_dim]")
    if q.shape[1] != 1:
        raise ValueError(f"decode takes one query per sequence: q must be [batch, 1, heads, head_dim], got {tuple(q.shape)}; "
                         "use parallax_attention for longer queries")
    if r.shape != q.shape:
        raise ValueError(f"r must have the shape of q {tuple(q.shape)}, got {tuple(r.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k_cache {tuple(k.shape)} and v_cache {tuple(v.shape)} must have one shape [batch, max_len, kv_heads, head_dim]")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"batch of the caches ({k.shape[0]}) differs from the batch of q ({q.shape[0]})")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"head_dim of the caches ({k.shape[3]}) differs from that of q ({q.shape[3]})")
    if min(q.shape[0], q.shape[2], k.shape[1], k.shape[2], q.shape[3]) == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k_cache {tuple(k.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]}); "
                         "caches are [batch, max_len, kv_heads, head_dim]")
    dtypes = {x.dtype for x in named.values()}
    if len(dtypes) > 1:
        raise ValueError("q, r, k_cache, v_cache must share one dtype, got " + ", ".join(f"{n}={x.dtype}" for n, x in named.items()))
    allowed = {"reference": _REFERENCE_DTYPES, "triton": _TRITON_DTYPES, "cute": _CUTE_DTYPES}[impl]
    if q.dtype not in allowed:
        raise ValueError(f"impl={impl!r} takes dtypes {', '.join(map(str, allowed))}; got {q.dtype}")
    devices = {x.device for x in named.values()}
    if cache_seqlens is not None and isinstance(cache_seqlens, torch.Tensor):
        devices.add(cache_seqlens.device)
    if len(devices) > 1:
        raise ValueError("q, r, k_cache, v_cache and cache_seqlens must be on one device, got "
                         + ", ".join(map(str, sorted(devices, key=str))))
    if impl in ("triton", "cute"):
        if q.shape[3] not in KERNEL_HEAD_DIMS:
            raise ValueError(f"impl={impl!r} supports head_dim in {KERNEL_HEAD_DIMS}, got {q.shape[3]}; use impl='reference'")
        for name, x in named.items():
            if x.stride(-1) != 1:
                raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {x.stride()}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}] or None, got {num_splits!r}")
    if cache_seqlens is not None:
        _check_seqlens(cache_seqlens, q.shape[0], k.shape[1])
    # Last: whether the backend can run here at all (so that a bad shape is reported as such on any machine).
    if impl == "triton" and not q.is_cuda and not _interpreting():
        raise ValueError(f"impl='triton' needs CUDA tensors (got {q.device}), or TRITON_INTERPRET=1 set before "
                         "triton is imported to run on CPU; use impl='reference' on CPU")
    if impl == "triton" and not q.is_cuda and q.dtype == torch.bfloat16:
        raise ValueError("impl='triton' on CPU runs under the Triton interpreter, which computes bfloat16 wrongly; "
                         "use float16 or float32 there, or impl='reference'")
    if impl == "cute":
        if not q.is_cuda:
            raise ValueError(f"impl='cute' needs CUDA tensors on an sm_90 GPU, got {q.device}")
        cap = torch.cuda.get_device_capability(q.device)
        if cap != (9, 0):
            raise ValueError(f"impl='cute' needs an sm_90 (Hopper) GPU, got sm_{cap[0]}{cap[1]}; use impl='triton'")
    if impl == "cute" and q.shape[2] // k.shape[2] > _CUTE_MAX_GROUP:
        raise ValueError(f"impl='cute' takes at most {_CUTE_MAX_GROUP} query heads per KV head, got "
                         f"{q.shape[2] // k.shape[2]}; use impl='triton'")


def _check_seqlens(cache_seqlens, batch: int, max_len: int) -> None:
    if not isinstance(cache_seqlens, torch.Tensor):
        raise ValueError(f"cache_seqlens must be an int32 tensor [batch] or None, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise ValueError(f"cache_seqlens must have dtype torch.int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must have shape [batch] = ({batch},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # a value check would sync the device, which graph capture forbids
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 1 or hi > max_len:
        raise ValueError(f"cache_seqlens must lie in [1, max_len={max_len}], got values in [{lo}, {hi}]")


def _reference_decode(q, r, k, v, cache_seqlens, scale: float) -> torch.Tensor:
    """The PyTorch reference on each sequence's valid prefix (a loop over the batch when lengths differ)."""
    if cache_seqlens is None:
        return parallax_attention(q, r, k, v, scale=scale)
    out = torch.empty_like(q)
    for b, length in enumerate(cache_seqlens.tolist()):
        out[b : b + 1] = parallax_attention(q[b : b + 1], r[b : b + 1], k[b : b + 1, :length], v[b : b + 1, :length], scale=scale)
    return out


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


def auto_num_splits(batch: int, kv_heads: int, max_len: int, block_n: int, resident: int) -> int:
    """Splits per sequence: as many as fit `batch * kv_heads * splits` programs in one wave of `resident` programs
    (so the grid does not end on a nearly empty wave), at most one per key tile and MAX_SPLITS."""
    tiles = -(-max_len // block_n)
    return max(1, min(resident // (batch * kv_heads), tiles, MAX_SPLITS))


# ---- Triton ----------------------------------------------------------------------------------------------


@triton.jit
def _split_kernel(
    Q, R, K, V, SEQLENS, OUT, PM, PL, PR, PO, POR, COUNTERS,
    scale_log2, max_len, num_splits,
    stride_qb, stride_qh, stride_rb, stride_rh,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_ob, stride_oh,
    H_KV: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, ONE_SPLIT: tl.constexpr, IEEE: tl.constexpr, MERGE_SPLITS: tl.constexpr,
):
    """One program: sequence b, KV head hk, split s. Its GROUP query heads (rows padded to ROWS >= 16 for tl.dot)
    share each K/V tile; S = c·Q·Kᵀ and U = R·Kᵀ are two [ROWS, BLOCK_N] products, O and OR two [ROWS, D].
    MERGE_SPLITS: 0, or the merge tile height (a power of 2 >= num_splits) when the last split program of each
    (b, hk) merges in this launch (merge="atomic"; COUNTERS: int32 [>= B * H_KV], zero on entry and on exit)."""
    pid_bh = tl.program_id(0)  # batch x kv_heads on axis 0 (up to 2^31 - 1 programs), splits on axis 1
    pid_s = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hk = pid_bh % H_KV
    if HAS_SEQLENS:
        seqlen = tl.load(SEQLENS + b)
    else:
        seqlen = max_len
    # Each sequence's own prefix is cut into num_splits runs of whole tiles; trailing splits may be empty.
    tiles_per_split = tl.cdiv(tl.cdiv(seqlen, BLOCK_N), num_splits)
    start = pid_s * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seqlen)

    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP
    heads = hk * GROUP + rows  # [ROWS] query heads of this KV head
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    r = tl.load(R + b * stride_rb + heads[:, None] * stride_rh + d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    u_bar = tl.zeros([ROWS], tl.float32)  # running ū = R / l: the shift c of the probe scores (R ≡ ū·l)
    acc_o = tl.zeros([ROWS, D], tl.float32)
    acc_or = tl.zeros([ROWS, D], tl.float32)  # shifted: Σ p·(u − ū)·v, rebased whenever ū moves
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        k = tl.load(k_base + keys[:, None] * stride_kl + d[None, :], mask=key_ok[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_base + keys[:, None] * stride_vl + d[None, :], mask=key_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            u = tl.dot(r, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            u = tl.dot(r, tl.trans(k))
        s = tl.where(key_ok[None, :], s * scale_log2, float("-inf"))  # [ROWS, BLOCK_N]
        u = tl.where(key_ok[None, :], u, 0.0)  # zero U too, so that p·u cannot carry garbage
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile in [start, end) holds a valid key
        alpha = tl.math.exp2(m - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        # Shift u by the running ū (this tile included) before P∘U is rounded for the MMA: the output is
        # invariant to a per-row constant in u, and the rounding error then scales with |u − ū|, not |u|.
        l_old = l * alpha
        l = l_old + tl.sum(p, axis=1)
        u_new = (l_old * u_bar + tl.sum(p * u, axis=1)) / l
        pu = p * (u - u_new[:, None])
        acc_or = (acc_or + (u_bar - u_new)[:, None] * acc_o) * alpha[:, None]  # rebase OR to the new shift
        acc_o = acc_o * alpha[:, None]
        if IEEE:
            acc_o += tl.dot(p, v, input_precision="ieee")
            acc_or += tl.dot(pu, v, input_precision="ieee")
        else:
            acc_o += tl.dot(p.to(v.dtype), v)
            acc_or += tl.dot(pu.to(v.dtype), v)
        u_bar = u_new
        m = m_new

    if ONE_SPLIT:
        # o = v̄(1 + ū) − ōr = v̄ − Σ p·(u − ū)·v / l: the shifted OR finalises without the ū·v̄ cancellation.
        inv_l = 1.0 / l
        out = (acc_o - acc_or) * inv_l[:, None]
        tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None])
    else:
        # Raw partials, row (b, head) and split s, unshifted in fp32 (R = ū·l, OR = OR' + ū·O) so that splits
        # with different shifts merge directly; an empty split leaves the neutral m = -inf, l = R = O = OR = 0.
        part = (b * (H_KV * GROUP) + heads) * num_splits + pid_s  # [ROWS]
        tl.store(PM + part, m, mask=row_ok)
        tl.store(PL + part, l, mask=row_ok)
        tl.store(PR + part, u_bar * l, mask=row_ok)
        tl.store(PO + part[:, None] * D + d[None, :], acc_o, mask=row_ok[:, None])
        tl.store(POR + part[:, None] * D + d[None, :], acc_or + u_bar[:, None] * acc_o, mask=row_ok[:, None])
        if MERGE_SPLITS > 0:
            _merge_if_last(COUNTERS + pid_bh, PM, PL, PR, PO, POR, OUT + b * stride_ob, b * (H_KV * GROUP) + hk * GROUP,
                           hk * GROUP, num_splits, stride_oh, GROUP, D, MERGE_SPLITS)


@triton.jit
def _merge_if_last(
    COUNTER, PM, PL, PR, PO, POR, OUT_B, row0, head0, num_splits, stride_oh,
    GROUP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
):
    """Count this split program in on the (b, kv head) COUNTER; the last of the num_splits to arrive merges rows
    row0 .. row0 + GROUP - 1 of the partials into query heads head0 .. of OUT_B (sequence b's output) and zeroes
    COUNTER for the next launch."""
    tl.debug_barrier()  # every thread's partial stores, then one thread's releasing increment
    arrived = tl.atomic_add(COUNTER, 1, sem="acq_rel", scope="gpu")  # the result's broadcast barriers the CTA
    if arrived == num_splits - 1:
        for g in range(GROUP):
            _merge_row(PM, PL, PR, PO, POR, OUT_B + (head0 + g) * stride_oh, row0 + g, num_splits, D, SPLITS)
        tl.store(COUNTER, 0)  # every split has arrived: nothing else touches COUNTER in this launch


@triton.jit
def _merge_row(PM, PL, PR, PO, POR, OUT_ROW, row, num_splits, D: tl.constexpr, SPLITS: tl.constexpr):
    """Merge the num_splits raw partials of one (b, head) row (PM/PL/PR `[rows * num_splits]`, PO/POR
    `[rows * num_splits, D]`): rescale to their shared max, sum, finalise, store D outputs at OUT_ROW. Loads are
    `.cg` (L2, not L1), as the in-launch merge reads partials that other programs wrote."""
    s = tl.arange(0, SPLITS)
    s_ok = s < num_splits
    part = row * num_splits + s
    m = tl.load(PM + part, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
    m_max = tl.max(m, axis=0)  # finite: cache_seqlens >= 1, so some split saw a key
    w = tl.where(m > float("-inf"), tl.math.exp2(m - m_max), 0.0)  # empty splits weigh 0, never NaN
    l = tl.sum(w * tl.load(PL + part, mask=s_ok, other=0.0, cache_modifier=".cg"), axis=0)
    acc_r = tl.sum(w * tl.load(PR + part, mask=s_ok, other=0.0, cache_modifier=".cg"), axis=0)
    d = tl.arange(0, D)
    tile = part[:, None] * D + d[None, :]  # [SPLITS, D]
    acc_o = tl.sum(w[:, None] * tl.load(PO + tile, mask=s_ok[:, None], other=0.0, cache_modifier=".cg"), axis=0)
    acc_or = tl.sum(w[:, None] * tl.load(POR + tile, mask=s_ok[:, None], other=0.0, cache_modifier=".cg"), axis=0)
    inv_l = 1.0 / l
    out = acc_o * (inv_l * (1.0 + acc_r * inv_l)) - acc_or * inv_l
    tl.store(OUT_ROW + d, out.to(OUT_ROW.dtype.element_ty))


@triton.jit
def _merge_kernel(
    PM, PL, PR, PO, POR, OUT, num_splits, stride_ob, stride_oh,
    H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
):
    """One program per (b, head): the second launch of merge="kernel"."""
    pid = tl.program_id(0).to(tl.int64)
    _merge_row(PM, PL, PR, PO, POR, OUT + (pid // H) * stride_ob + (pid % H) * stride_oh, pid, num_splits, D, SPLITS)


def triton_decode(q, r, k_cache, v_cache, *, cache_seqlens=None, scale: float, num_splits: int | None = None,
                  block_n: int | None = None, merge: str | None = None) -> torch.Tensor:
    """Launch the split kernel and, when splits > 1, merge the partials: in the split launch (merge="atomic") or
    in a second launch (merge="kernel"). Default: TRITON_MERGE. Inputs are assumed checked."""
    merge = merge or TRITON_MERGE
    if merge not in TRITON_MERGES:
        raise ValueError(f"merge={merge!r} is not one of {TRITON_MERGES}")
    B, _, H, D = q.shape
    max_len, H_kv = k_cache.shape[1], k_cache.shape[2]
    group = H // H_kv
    block_n = block_n or (32 if _interpreting() else _TRITON_BLOCK_N)
    splits = num_splits or auto_num_splits(B, H_kv, max_len, block_n, _TRITON_PROGRAMS_PER_SM * num_sms(q.device))
    out = torch.empty_like(q)
    f32 = dict(device=q.device, dtype=torch.float32)
    if splits > 1:
        pm, pl, pr = (torch.empty(B * H * splits, **f32) for _ in range(3))
        po, por = (torch.empty(B * H * splits, D, **f32) for _ in range(2))
    else:
        pm = pl = pr = po = por = out  # unused
    counters = _merge_counters(q.device, B * H_kv) if splits > 1 and merge == "atomic" else None
    merge_tile = max(2, triton.next_power_of_2(splits))
    seqlens = cache_seqlens if cache_seqlens is not None else out  # unused when HAS_SEQLENS is False
    _split_kernel[(B * H_kv, splits)](
        q, r, k_cache, v_cache, seqlens, out, pm, pl, pr, po, por, out if counters is None else counters,
        scale * _LOG2E, max_len, splits,
        q.stride(0), q.stride(2), r.stride(0), r.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(2),
        H_KV=H_kv, GROUP=group, ROWS=max(16, triton.next_power_of_2(group)), D=D, BLOCK_N=block_n,
        HAS_SEQLENS=cache_seqlens is not None, ONE_SPLIT=splits == 1, IEEE=q.dtype == torch.float32,
        MERGE_SPLITS=0 if counters is None else merge_tile, num_warps=4,
    )
    if splits > 1 and counters is None:
        _merge_kernel[(B * H,)](
            pm, pl, pr, po, por, out, splits, out.stride(0), out.stride(2), H=H, D=D, SPLITS=merge_tile, num_warps=4,
        )
    return out


def _merge_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """The device's zeroed int32 merge counters, at least `n` of them; None while a CUDA graph is being captured
    and the buffer is too small (an allocation then would belong to the graph; the caller merges in a second
    launch instead). Growing keeps the old buffers alive: a captured graph may still hold one."""
    made = _MERGE_COUNTERS.setdefault(device, [])
    if made and made[-1].numel() >= n:
        return made[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    size = max(n, 2 * made[-1].numel() if made else _MIN_COUNTERS)
    made.append(torch.zeros(size, dtype=torch.int32, device=device))
    return made[-1]
