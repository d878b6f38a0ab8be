"""CuTeDSL Parallax decode for Hopper (nvidia-cutlass-dsl 4.1.0), written for memory-bound single-token decode.

Design (docs/parallax.md §6):

* One warp per CTA; grid (splits, kv_heads, batch). Each CTA streams its run of whole `BLOCK_N`-key tiles of one
  sequence's valid prefix through a `STAGES`-deep cp.async ring in shared memory (rows past the prefix are
  zero-filled, never read from global memory).
* **q and r share one tensor-core tile.** The warp-level `mma.sync` m16n8k16 tile has 16 rows: rows 0..g-1 hold
  the g query heads of the KV head, rows 8..8+g-1 their probes (g <= 8), the rest zeros. In the accumulator
  layout, row i and row i+8 sit in the same thread, so one product gives S (row h) and U (row h+8) side by side,
  and the softmax of head h and the product P∘U need no data exchange beyond quad reductions (max and sums).
* The A operand of the value product is [P; P∘(U − ū)] (fp32, cast to bf16/fp16 in registers), so O (row h)
  and OR' (row h+8) come out of one MMA chain. One running max per head (from S only) rescales l, O and OR'.
* Shifted probe scores: the running ū = R/l (this tile included, quad-reduced) is subtracted from U in fp32
  before P∘U is rounded, and OR' = Σ p·(u − ū)·v is rebased in fp32 when ū moves (see decode.py); without
  the shift, a large |u| made the 16-bit rounding of P∘U cost ~|u|·2^-8·|v| at short contexts.
* Split-KV: every CTA writes RAW fp32 partials (m, l, R, O, OR) — m in the log2 domain — and a merge kernel (the
  Triton one in decode.py, same partial layout) rescales them to the shared max, sums, then finalises. With one
  split the CTA finalises o = (O − OR')/l itself; partials are unshifted in fp32 (R = ū·l, OR = OR' + ū·O).

Compiled kernels are cached per (dtype, head_dim, group, has_seqlens, one_split); shapes and strides are dynamic,
so a decode loop compiles once.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda_driver
import cutlass
import cutlass.cute as cute
import cutlass.utils
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync, warp
from cutlass.cute.runtime import from_dlpack

BLOCK_N = 32  # keys per tile (two k16 steps of the value product)
STAGES = 3  # cp.async ring depth
MAX_GROUP = 8  # query heads per KV head: rows 0..7 queries, rows 8..15 probes
_LOG2E = 1.4426950408889634
_THREADS = 32


class ParallaxDecodeKernel:
    """One compiled configuration: element type, head_dim, GQA group, cache_seqlens or not, one split or many."""

    def __init__(self, dtype, head_dim: int, group: int, *, has_seqlens: bool, one_split: bool):
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
        if not 1 <= group <= MAX_GROUP:
            raise ValueError(f"query heads per KV head must be in [1, {MAX_GROUP}], got {group}")
        self.dtype = dtype
        self.head_dim = head_dim
        self.group = group
        self.has_seqlens = has_seqlens
        self.one_split = one_split

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # [B, H, D]
        mR: cute.Tensor,  # [B, H, D]
        mK: cute.Tensor,  # [B, max_len, H_kv, D]
        mV: cute.Tensor,  # [B, max_len, H_kv, D]
        mSeq: cute.Tensor,  # [B] int32 (a placeholder when has_seqlens is False)
        mO: cute.Tensor,  # [B, H, D]
        mPM: cute.Tensor,  # [B*H*splits] fp32 partials (placeholders when one_split)
        mPL: cute.Tensor,
        mPR: cute.Tensor,
        mPO: cute.Tensor,  # [B*H*splits, D]
        mPOR: cute.Tensor,
        scale_log2: Float32,
        num_splits: Int32,
        stream: cuda_driver.CUstream,
    ):
        D = self.head_dim
        # View every tensor as global memory (tensors built from host arrays arrive as generic memory, which
        # cp.async rejects; this also lets the kernel compile without a GPU).
        mQ, mR, mO, mPO, mPOR = (self._gmem(t, 16) for t in (mQ, mR, mO, mPO, mPOR))
        mK, mV = (self._gmem(t, 16, stride_divby=8) for t in (mK, mV))  # 16-byte rows for cp.async
        mSeq, mPM, mPL, mPR = (self._gmem(t, 4) for t in (mSeq, mPM, mPL, mPR))
        # Shared memory: 8x64-element swizzled atoms (conflict-free cp.async stores and ldmatrix loads).
        atom = cute.make_composed_layout(cute.make_swizzle(3, 3, 3), 0, cute.make_layout((8, 64), stride=(64, 1)))
        sQR_layout = cute.tile_to_shape(atom, (16, D), (0, 1))
        sKV_layout = cute.tile_to_shape(atom, (BLOCK_N, D, STAGES), (0, 1, 2))

        @cute.struct
        class SharedStorage:
            sQR: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sQR_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sKV_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sKV_layout)], 1024]

        # Global -> shared: 16-byte cp.async, 8 threads across a 64-element atom row, 4 rows per pass.
        elems = 128 // self.dtype.width
        copy_atom = cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), self.dtype, num_bits_per_copy=128
        )
        threads_d = 64 // elems
        gmem_copy = cute.make_tiled_copy_tv(
            copy_atom,
            cute.make_layout((_THREADS // threads_d, threads_d), stride=(threads_d, 1)),
            cute.make_layout((1, elems)),
        )
        # One warp, m16n8k16 atoms; N permuted to 16 so that ldmatrix.x4 feeds two n8 atoms.
        tiled_mma = cute.make_tiled_mma(
            warp.MmaF16BF16Op(self.dtype, Float32, (16, 8, 16)), (1, 1, 1), permutation_mnk=(16, 16, 16)
        )
        self.kernel(
            mQ, mR, mK, mV, mSeq, mO, mPM, mPL, mPR, mPO, mPOR, scale_log2, num_splits,
            sQR_layout, sKV_layout, gmem_copy, tiled_mma, SharedStorage,
        ).launch(
            grid=[num_splits, cute.size(mK.shape[2]), cute.size(mK.shape[0])],
            block=[_THREADS, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
        )

    @staticmethod
    def _gmem(t: cute.Tensor, align: int, stride_divby: int | None = None) -> cute.Tensor:
        """`t` as a global-memory tensor; with `stride_divby`, its outer strides are declared multiples of it
        (checked on the host), which proves every row start 16-byte aligned."""
        ptr = cute.make_ptr(t.element_type, t.iterator.toint(), cute.AddressSpace.gmem, assumed_align=align)
        layout = t.layout
        if const_expr(stride_divby is not None):
            rank = cute.rank(t.layout)
            strides = [cute.assume(t.layout.stride[i], divby=stride_divby) for i in range(rank - 1)]
            layout = cute.make_layout(t.layout.shape, stride=(*strides, t.layout.stride[rank - 1]))
        return cute.make_tensor(ptr, layout)

    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor,
        mR: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mSeq: cute.Tensor,
        mO: cute.Tensor,
        mPM: cute.Tensor,
        mPL: cute.Tensor,
        mPR: cute.Tensor,
        mPO: cute.Tensor,
        mPOR: cute.Tensor,
        scale_log2: Float32,
        num_splits: Int32,
        sQR_layout: cute.ComposedLayout,
        sKV_layout: cute.ComposedLayout,
        gmem_copy: cute.TiledCopy,
        tiled_mma: cute.TiledMma,
        SharedStorage: cutlass.Constexpr,
    ):
        D = self.head_dim
        G = self.group
        lane, _, _ = cute.arch.thread_idx()
        split, hk, b = cute.arch.block_idx()

        # This split's run of whole tiles within the sequence's own valid prefix [0, seqlen).
        seqlen = mK.shape[1]
        if const_expr(self.has_seqlens):
            seqlen = mSeq[b]
        n_tiles = (seqlen + BLOCK_N - 1) // BLOCK_N
        tiles_per_split = (n_tiles + num_splits - 1) // num_splits
        tile_lo = split * tiles_per_split
        tile_hi = cutlass.min(tile_lo + tiles_per_split, n_tiles)
        n_iter = tile_hi - tile_lo  # may be <= 0: an empty split writes neutral partials

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sQR = storage.sQR.get_tensor(sQR_layout)  # (16, D)
        sK = storage.sK.get_tensor(sKV_layout)  # (BLOCK_N, D, STAGES)
        sV = storage.sV.get_tensor(sKV_layout)
        # V viewed as (D, BLOCK_N, STAGES): the B operand of O += P·V.
        sVt = cute.composition(
            sV, cute.make_layout((D, BLOCK_N, STAGES), stride=(BLOCK_N, 1, BLOCK_N * D))
        )

        # Stack [q; r] into the 16-row tile: rows 0..G-1 queries, rows 8..8+G-1 probes, zeros elsewhere.
        for row in cutlass.range_constexpr(16):
            for j in cutlass.range_constexpr(D // _THREADS):
                d = lane + j * _THREADS
                if const_expr(row < G):
                    sQR[row, d] = mQ[b, hk * G + row, d]
                elif const_expr(8 <= row and row < 8 + G):
                    sQR[row, d] = mR[b, hk * G + row - 8, d]
                else:
                    sQR[row, d] = self.dtype(0.0)

        # Global tiles of this (b, hk) and their coordinates, for the row predicate.
        gK = cute.local_tile(mK[b, None, hk, None], (BLOCK_N, D), (None, 0))  # (BLOCK_N, D, n)
        gV = cute.local_tile(mV[b, None, hk, None], (BLOCK_N, D), (None, 0))
        cKV = cute.local_tile(cute.make_identity_tensor(mK.layout.shape)[b, None, hk, None], (BLOCK_N, D), (None, 0))
        thr_copy = gmem_copy.get_slice(lane)
        tKgK = thr_copy.partition_S(gK)  # (CPY, CPY_N, CPY_K, n)
        tVgV = thr_copy.partition_S(gV)
        tKsK = thr_copy.partition_D(sK)  # (CPY, CPY_N, CPY_K, STAGES)
        tVsV = thr_copy.partition_D(sV)
        tKVcKV = thr_copy.partition_S(cKV)

        # MMA partitions and register fragments.
        thr_mma = tiled_mma.get_slice(lane)
        tSrQR = thr_mma.make_fragment_A(thr_mma.partition_A(sQR))
        tSrK = thr_mma.make_fragment_B(thr_mma.partition_B(sK[None, None, 0]))
        tOrVt = thr_mma.make_fragment_B(thr_mma.partition_B(sVt[None, None, 0]))
        acc_O = cute.make_fragment(thr_mma.partition_shape_C((16, D)), Float32)
        acc_O.fill(0.0)

        ldsm_a = cute.make_tiled_copy_A(cute.make_copy_atom(warp.LdMatrix8x8x16bOp(False, 4), self.dtype), tiled_mma)
        ldsm_b = cute.make_tiled_copy_B(cute.make_copy_atom(warp.LdMatrix8x8x16bOp(False, 4), self.dtype), tiled_mma)
        ldsm_bt = cute.make_tiled_copy_B(cute.make_copy_atom(warp.LdMatrix8x8x16bOp(True, 4), self.dtype), tiled_mma)
        thr_ldsm_a = ldsm_a.get_slice(lane)
        thr_ldsm_b = ldsm_b.get_slice(lane)
        thr_ldsm_bt = ldsm_bt.get_slice(lane)
        tSsQR = thr_ldsm_a.partition_S(sQR)
        tSrQR_view = thr_ldsm_a.retile(tSrQR)
        tSsK = thr_ldsm_b.partition_S(sK)  # (CPY, CPY_N, CPY_K, STAGES)
        tSrK_view = thr_ldsm_b.retile(tSrK)
        tOsVt = thr_ldsm_bt.partition_S(sVt)
        tOrVt_view = thr_ldsm_bt.retile(tOrVt)

        # Coordinates of this thread's accumulator entries, as (row, col) views: row index 0 is head row h,
        # row index 1 is row h + 8 (its probe) — the m16n8 accumulator puts both in the same thread.
        tScS = self._mn_view(thr_mma.partition_C(cute.make_identity_tensor((16, BLOCK_N))))
        tOcO = self._mn_view(thr_mma.partition_C(cute.make_identity_tensor((16, D))))
        acc_O_mn = self._mn_view(acc_O)
        h = tOcO[0, 0][0]  # this thread's head row within the group (rows >= G are padding)

        # Prologue: fill STAGES - 1 stages.
        for i in cutlass.range_constexpr(STAGES - 1):
            if i < n_iter:
                self._load_tile(gmem_copy, tKgK, tVgV, tKsK, tVsV, tKVcKV, tile_lo + i, i, seqlen)
            cute.arch.cp_async_commit_group()

        cute.arch.barrier()  # sQR written by every lane
        for k in cutlass.range_constexpr(D // 16):
            cute.copy(ldsm_a, tSsQR[None, None, k], tSrQR_view[None, None, k])

        m_run = Float32(-Float32.inf)  # running max of c·log2(e)·q·k for head h (quad-uniform)
        l_run = Float32(0.0)  # l = Σ p over the whole row (quad-uniform)
        u_bar = Float32(0.0)  # running ū = R / l (quad-uniform): the shift of the probe scores; R ≡ ū·l
        for i in range(n_iter):
            cute.arch.cp_async_wait_group(STAGES - 2)
            cute.arch.barrier()  # tile i visible to all lanes; every lane is done with the stage reloaded next
            nxt = i + STAGES - 1
            if nxt < n_iter:
                self._load_tile(gmem_copy, tKgK, tVgV, tKsK, tVsV, tKVcKV, tile_lo + nxt, nxt % STAGES, seqlen)
            cute.arch.cp_async_commit_group()
            stage = i % STAGES
            key0 = (tile_lo + i) * BLOCK_N

            # [S; U] = [q; r]·Kᵀ in one tile.
            acc_S = cute.make_fragment(thr_mma.partition_shape_C((16, BLOCK_N)), Float32)
            acc_S.fill(0.0)
            for k in cutlass.range_constexpr(D // 16):
                cute.copy(ldsm_b, tSsK[None, None, k, stage], tSrK_view[None, None, k])
                cute.gemm(tiled_mma, acc_S, tSrQR[None, None, k], tSrK[None, None, k], acc_S)

            # Online softmax on row h; P∘(U − ū) on row h + 8. Keys at or past seqlen get p = 0 and u = 0.
            acc_S_mn = self._mn_view(acc_S)
            n_cols = cute.size(acc_S_mn, mode=[1])
            tile_max = -Float32.inf
            for c in cutlass.range_constexpr(n_cols):
                valid = key0 + tScS[0, c][1] < seqlen
                s = acc_S_mn[0, c] * scale_log2
                acc_S_mn[0, c] = s if valid else -Float32.inf
                acc_S_mn[1, c] = acc_S_mn[1, c] if valid else Float32(0.0)
                tile_max = cute.arch.fmax(tile_max, acc_S_mn[0, c])
            tile_max = self._quad_max(tile_max)
            m_new = cute.arch.fmax(m_run, tile_max)
            m_use = Float32(0.0) if m_new == -Float32.inf else m_new  # a lane whose keys are all masked
            alpha = cute.arch.exp2(m_run - m_use)
            p_sum = Float32(0.0)  # this thread's share of the tile's Σ p and Σ p·u
            pu_sum = Float32(0.0)
            for c in cutlass.range_constexpr(n_cols):
                p = cute.arch.exp2(acc_S_mn[0, c] - m_use)
                p_sum = p_sum + p
                pu_sum = pu_sum + p * acc_S_mn[1, c]
                acc_S_mn[0, c] = p
            # Shift the probe scores by the running ū (this tile included) before P∘U is rounded to 16 bits:
            # o is invariant to a per-row constant in u, and the rounding error then scales with |u − ū|, not
            # |u| (decode.py). The shift must be quad-uniform, hence the quad sums.
            p_sum = self._quad_sum(p_sum)
            pu_sum = self._quad_sum(pu_sum)
            l_old = l_run * alpha
            l_run = l_old + p_sum
            u_new = (l_old * u_bar + pu_sum) / l_run
            for c in cutlass.range_constexpr(n_cols):
                acc_S_mn[1, c] = acc_S_mn[0, c] * (acc_S_mn[1, c] - u_new)
            # Rescale [O; OR'] and rebase OR' = Σ p·(u − ū)·v from the old shift to the new one, in fp32.
            shift = u_bar - u_new
            for c in cutlass.range_constexpr(cute.size(acc_O_mn, mode=[1])):
                acc_O_mn[1, c] = (acc_O_mn[1, c] + shift * acc_O_mn[0, c]) * alpha
                acc_O_mn[0, c] = acc_O_mn[0, c] * alpha
            u_bar = u_new
            m_run = m_new

            # [O; OR] += [P; P∘U]·V, with the fp32 accumulator reused as the A operand in registers.
            rP = cute.make_fragment_like(acc_S, self.dtype)
            rP.store(acc_S.load().to(self.dtype))
            tOrP = self._acc_as_a(rP)
            for k in cutlass.range_constexpr(BLOCK_N // 16):
                cute.copy(ldsm_bt, tOsVt[None, None, k, stage], tOrVt_view[None, None, k])
                cute.gemm(tiled_mma, acc_O, tOrP[None, None, k], tOrVt[None, None, k], acc_O)

        cute.arch.cp_async_wait_group(0)
        H = mQ.shape[1]
        head = hk * G + h
        if h < G:
            if const_expr(self.one_split):
                # o = v̄(1 + ū) − ōr = (O − OR') / l with the shifted OR'.
                inv_l = Float32(1.0) / l_run
                for c in cutlass.range_constexpr(cute.size(acc_O_mn, mode=[1])):
                    o = (acc_O_mn[0, c] - acc_O_mn[1, c]) * inv_l
                    mO[b, head, tOcO[0, c][1]] = o.to(self.dtype)
            else:
                # Unshifted raw partials in fp32 (R = ū·l, OR = OR' + ū·O), so that the merge needs no shift.
                part = (b * H + head) * num_splits + split
                if lane % 4 == 0:
                    mPM[part] = m_run
                    mPL[part] = l_run
                    mPR[part] = u_bar * l_run
                for c in cutlass.range_constexpr(cute.size(acc_O_mn, mode=[1])):
                    mPO[part, tOcO[0, c][1]] = acc_O_mn[0, c]
                    mPOR[part, tOcO[0, c][1]] = acc_O_mn[1, c] + u_bar * acc_O_mn[0, c]

    @cute.jit
    def _load_tile(self, gmem_copy, tKgK, tVgV, tKsK, tVsV, tKVcKV, tile, stage, seqlen):
        """cp.async tile `tile` of K and V into `stage`; rows at or past seqlen are zero-filled instead."""
        for n in cutlass.range_constexpr(cute.size(tKsK, mode=[1])):
            if tKVcKV[0, n, 0, tile][1] < seqlen:
                cute.copy(gmem_copy, tKgK[None, n, None, tile], tKsK[None, n, None, stage])
                cute.copy(gmem_copy, tVgV[None, n, None, tile], tVsV[None, n, None, stage])
            else:
                tKsK[None, n, None, stage].fill(0.0)
                tVsV[None, n, None, stage].fill(0.0)

    def _mn_view(self, acc: cute.Tensor) -> cute.Tensor:
        """Accumulator ((2 cols, 2 rows), M, N) viewed as (rows, cols): index 0/1 along rows = row h / h + 8."""
        lay = cute.make_layout(acc.layout.shape)
        mn = cute.make_layout(
            ((lay.shape[0][1], lay.shape[1]), (lay.shape[0][0], lay.shape[2])),
            stride=((lay.stride[0][1], lay.stride[1]), (lay.stride[0][0], lay.stride[2])),
        )
        return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))

    def _acc_as_a(self, acc: cute.Tensor) -> cute.Tensor:
        """m16n8 accumulator (4, M, N) regrouped as m16n8k16 A operand ((4, 2), M, N / 2)."""
        div = cute.logical_divide(acc.layout, (None, None, 2))
        lay = cute.make_layout(
            ((div.shape[0], div.shape[2][0]), div.shape[1], div.shape[2][1]),
            stride=((div.stride[0], div.stride[2][0]), div.stride[1], div.stride[2][1]),
        )
        return cute.make_tensor(acc.iterator, lay)

    @cute.jit
    def _quad_max(self, x: Float32) -> Float32:
        x = cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=2, mask=-1, mask_and_clamp=31))
        return cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=1, mask=-1, mask_and_clamp=31))

    @cute.jit
    def _quad_sum(self, x: Float32) -> Float32:
        x = x + cute.arch.shuffle_sync_bfly(x, offset=2, mask=-1, mask_and_clamp=31)
        return x + cute.arch.shuffle_sync_bfly(x, offset=1, mask=-1, mask_and_clamp=31)


# ---- host side -------------------------------------------------------------------------------------------

_compiled: dict[tuple, object] = {}
_SMEM_PER_SM = 227 * 1024  # Hopper, usable by CTAs


def ctas_per_sm(head_dim: int) -> int:
    """Resident one-warp CTAs per SM, as limited by shared memory (the [q; r] tile and the K/V ring)."""
    smem = 2 * (16 * head_dim + 2 * STAGES * BLOCK_N * head_dim) + 2048  # bf16, plus alignment slack
    return max(1, min(32, _SMEM_PER_SM // smem))


def _cute_dtype(torch_dtype):
    import torch

    return {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}[torch_dtype]


def _as_cute(x, *, leading_dim: int, align: int = 16):
    return from_dlpack(x, assumed_align=align).mark_layout_dynamic(leading_dim=leading_dim)


def _compile_key(dtype, head_dim: int, group: int, has_seqlens: bool, one_split: bool) -> tuple:
    return (dtype, head_dim, group, has_seqlens, one_split)


def compile_decode(args: tuple, *, dtype, head_dim: int, group: int, has_seqlens: bool, one_split: bool):
    """Compile (once per key) the kernel for cute arguments `args` (the order of ParallaxDecodeKernel.__call__)."""
    key = _compile_key(dtype, head_dim, group, has_seqlens, one_split)
    if key not in _compiled:
        kernel = ParallaxDecodeKernel(dtype, head_dim, group, has_seqlens=has_seqlens, one_split=one_split)
        _compiled[key] = cute.compile(kernel, *args)
    return _compiled[key]


def cute_decode(q, r, k_cache, v_cache, *, cache_seqlens=None, scale: float, num_splits: int | None = None):
    """Launch the CuTeDSL decode (and the Triton merge when splits > 1). Inputs are checked by decode.py."""
    import torch

    from kernels.parallax import decode as _decode

    B, _, H, D = q.shape
    max_len, H_kv = k_cache.shape[1], k_cache.shape[2]
    group = H // H_kv
    if group > MAX_GROUP:
        raise ValueError(f"impl='cute' supports at most {MAX_GROUP} query heads per KV head, got {group}; use impl='triton'")
    for name, x in (("q", q), ("r", r), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.data_ptr() % 16 or any(st % 8 for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n > 1):
            raise ValueError(f"impl='cute' needs {name} 16-byte aligned with strides multiple of 8 elements, "
                             f"got strides {x.stride()}")
    if B > 65535:
        raise ValueError(f"impl='cute' launches one grid row per sequence: batch must be <= 65535, got {B}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        span = sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
        if span >= 2**31:
            raise ValueError(f"impl='cute' indexes {name} with 32-bit offsets; its span is {span} elements, "
                             "at most 2^31 - 1 allowed; use impl='triton' or split the batch")
    splits = num_splits or _decode.auto_num_splits(B, H_kv, max_len, 2 * BLOCK_N, ctas_per_sm(D) * _decode.num_sms(q.device))
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    one_split = splits == 1
    rows = B * H * splits if not one_split else 1
    pm, pl, pr = (torch.empty(rows, **f32) for _ in range(3))
    po, por = (torch.empty(rows, D, **f32) for _ in range(2))
    seq = cache_seqlens if cache_seqlens is not None else torch.empty(1, device=q.device, dtype=torch.int32)
    args = (
        _as_cute(q[:, 0], leading_dim=2), _as_cute(r[:, 0], leading_dim=2),
        _as_cute(k_cache, leading_dim=3), _as_cute(v_cache, leading_dim=3),
        from_dlpack(seq, assumed_align=4).mark_layout_dynamic(leading_dim=0),
        _as_cute(out, leading_dim=2),
        *(from_dlpack(t, assumed_align=4).mark_layout_dynamic(leading_dim=0) for t in (pm, pl, pr)),
        *(from_dlpack(t, assumed_align=16).mark_layout_dynamic(leading_dim=1) for t in (po, por)),
        Float32(scale * _LOG2E), Int32(splits),
        cuda_driver.CUstream(torch.cuda.current_stream(q.device).cuda_stream),
    )
    kernel = compile_decode(args, dtype=_cute_dtype(q.dtype), head_dim=D, group=group,
                            has_seqlens=cache_seqlens is not None, one_split=one_split)
    kernel(*args)
    out = out.unsqueeze(1)
    if not one_split:
        _decode._merge_kernel[(B * H,)](
            pm, pl, pr, po, por, out, splits, out.stride(0), out.stride(2),
            H=H, D=D, SPLITS=max(2, _next_pow2(splits)), num_warps=4,
        )
    return out


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
