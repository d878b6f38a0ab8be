"""Time causal Parallax attention for training (forward, forward+backward) on the GPU, against its peers.

Peers (each optional; skipped with the reason if it does not import or fails):
  ours      kernels.parallax.triton (Triton, [B, T, H, D])
  official  parallax-kernel 0.1.1: `from parallax import parallax_func` (Triton, [B, H, T, D])
  fla       fla-core 0.6.0: `fla.ops.parallax.parallel_parallax` (Triton, [B, T, H, D], bf16 only)
  cudnn     softmax attention, torch SDPA with the cuDNN backend forced ([B, H, T, D], no probe r)
  flash     softmax attention, torch SDPA with the flash backend forced
  reference kernels.parallax.reference (PyTorch, materialises [T, T]; small shapes only)

bf16; grid batch {1,2,4,8} x seq {1k..16k} with batch*seq <= 32k, heads 8 and 16, head_dim 64 and 128; the MAD
shapes (16 heads of dim 8, batch 128, seq 128..1024); peak memory of forward+backward at batch 2, 16 heads and seq
4k, 8k and 16k (its growth with seq says whether anything grows as seq^2).
Times are medians of `triton.testing.do_bench` (L2 flushed each call) after warm-up; every layout conversion
happens outside the timed call. Autotuned kernels (ours, official) are compiled up front in parallel threads.

    PYTHONPATH=. python benchmarks/bench_parallax_train.py --out analysis/kernels/

Writes <out>/parallax_train_bench.md and <out>/parallax_train_bench.csv; progress goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib.metadata
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
GRID_DIMS = (64, 128)
GRID_HEADS = (8, 16)
GRID_BATCHES = (1, 2, 4, 8)
GRID_LENS = (1024, 2048, 4096, 8192, 16384)
MAX_TOKENS = 32768
OUR_KERNELS = ("fwd", "dq", "dkv")  # our autotuned Triton kernels, in the order they run
MAD_SHAPES = [(128, L, 16, 8) for L in (128, 256, 512, 1024)]  # (B, L, H, D)
MEM_LENS = (4096, 8192, 16384)  # linear growth: peak(16k) / peak(4k) = 4; an L x L buffer would make it 16
MEM_SHAPES = [(MAX_TOKENS // 16384, L, 16, D) for D in GRID_DIMS for L in MEM_LENS]  # the last: the largest grid shapes
REF_MAIN_MAX_LEN = 2048
PRECHECK_SHAPE = (1, 512, 4)  # (B, L, H) of the correctness pre-check, at every head_dim
REF_MAX_SCORES = 1 << 30  # B * H * L^2 cap for the fp32 reference (each [B, H, L, L] tensor is 4 GiB at the cap)
TARGETS = {"speedup_vs_official": 1.2, "ratio_vs_cudnn_long": 2.0, "memory_vs_softmax_16k": 1.25,
           "memory_growth_4k_to_16k": 4.4}  # 4 when linear in L (less with parts that do not grow); 10 % slack


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="analysis/kernels/", help="directory for the Markdown and CSV (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="stop timing new grid rows after this many seconds since start; skipped rows are listed "
                        "(default: %(default)s)")
    p.add_argument("--peers", default="ours,official,fla,cudnn,flash,reference",
                   help="comma-separated peers to run (default: %(default)s)")
    p.add_argument("--no-precompile", action="store_true", help="compile lazily instead of in parallel up front")
    p.add_argument("--precompile-procs", type=int, default=min(16, os.cpu_count() or 1),
                   help="processes that fill Triton's on-disk cache first, each compiling a share of the autotune "
                        "candidates (Triton's compile holds the GIL, so threads alone serialise it; default: %(default)s)")
    p.add_argument("--precompile-shard", default=None, help=argparse.SUPPRESS)  # "i/n": internal, one such process
    p.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up per measurement (default: %(default)s)")
    p.add_argument("--rep-ms", type=float, default=60.0, help="do_bench repetition time per measurement (default: %(default)s)")
    return p.parse_args(argv)


@dataclass
class Peer:
    name: str
    layout: str  # "BTHD" or "BHTD"
    parallax: bool  # takes r (else softmax attention: q, k, v only)
    call: Callable | None = None  # call(q, r, k, v) -> o in the peer's layout
    backend: object = None  # SDPA backend to force
    reason: str = ""  # why it is unavailable
    precheck: str = ""

    @property
    def available(self) -> bool:
        return self.call is not None


@dataclass
class Result:
    section: str
    B: int
    L: int
    H: int
    D: int
    peer: str
    mode: str  # "fwd" | "fwd+bwd" | "peak_mem"
    value: float  # ms, or GiB for peak_mem
    note: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class TilePick:
    """The tile one of our autotuned kernels settled on for one autotuning key: HEAD_DIM, TUNE_KEY and the dtype of
    each tensor argument (the forward has two keys per length bucket, with and without the saved fp16 copies)."""
    kernel: str  # "fwd" | "dq" | "dkv"
    head_dim: int
    tune_key: int  # kernels.parallax.triton._tune_key: 2 * ceil(log2 T_q) (clamped to 7..14) + (B * H >= 64)
    dtype: str  # of the queries
    tile: str  # "BLOCK_MxBLOCK_N, warps, stages"


def autotune_picks(tuners: dict) -> list[TilePick]:
    """What each of `tuners` ({kernel name: triton Autotuner}) chose, from its cache of (key -> Config)."""
    picks = []
    for kernel, tuner in tuners.items():
        for key, cfg in getattr(tuner, "cache", {}).items():
            tile = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}, {cfg.num_warps}w, {cfg.num_stages}s"
            picks.append(TilePick(kernel, int(key[0]), int(key[1]), str(key[2]).replace("torch.", ""), tile))
    return sorted(picks, key=lambda p: (p.head_dim, p.tune_key, p.dtype, OUR_KERNELS.index(p.kernel)))


def picks_section(picks: Sequence[TilePick]) -> list[str]:
    """Markdown lines: one row per (head_dim, length bucket, B*H class, dtype), a column per kernel; a kernel that
    picked different tiles for keys that differ in other arguments' dtypes shows them all, joined by " / "."""
    if not picks:
        return []
    rows: dict[tuple, dict[str, list[str]]] = {}
    for p in picks:
        tiles = rows.setdefault((p.head_dim, p.tune_key // 2, p.tune_key % 2, p.dtype), {}).setdefault(p.kernel, [])
        if p.tile not in tiles:
            tiles.append(p.tile)
    lines = ["## Tiles our autotuners picked (BLOCK_M x BLOCK_N, warps, stages)", "",
             "Autotuning key: head dim, query length up to 2^k (k from 7 to 14), and whether B * H >= 64.", "",
             "| D | L <= | B * H >= 64 | dtype | fwd | dq | dkv |", "| ---: | ---: | --- | --- | --- | --- | --- |"]
    for (d, k, full, dtype), tiles in sorted(rows.items()):
        cells = " | ".join(" / ".join(tiles.get(kernel, ["-"])) for kernel in OUR_KERNELS)
        lines.append(f"| {d} | {2 ** k} | {'yes' if full else 'no'} | {dtype} | {cells} |")
    return lines + [""]


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import torch
    import torch.nn.functional as F
    import triton
    import triton.testing

    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs the GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    start = time.time()
    wanted = {p.strip() for p in args.peers.split(",") if p.strip()}
    device = torch.device("cuda")
    dtype = torch.bfloat16

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)

    # ---------------------------------------------------------------- peers
    peers: dict[str, Peer] = {}
    autotuners = []  # of ours and official: their tuning benchmark is shortened alike (see below)
    ours_tuners: dict = {}  # ours alone, by kernel: the report lists what they picked

    def add(peer: Peer) -> None:
        if peer.name not in wanted:
            peer.call, peer.reason = None, "not requested (--peers)"
        peers[peer.name] = peer

    try:
        from kernels.parallax import triton as ours_mod

        add(Peer("ours", "BTHD", True, call=lambda q, r, k, v: ours_mod.parallax_attention_triton(q, r, k, v)))
        jitted = dict(zip(OUR_KERNELS, (ours_mod._fwd_kernel, ours_mod._bwd_dq_kernel, ours_mod._bwd_dkv_kernel)))
        ours_tuners = {k: t for k, t in jitted.items() if isinstance(t, triton.runtime.Autotuner)}
        autotuners += list(ours_tuners.values())
    except Exception as err:
        add(Peer("ours", "BTHD", True, reason=f"import failed: {err!r}"))
    try:
        from parallax import parallax_func  # pip: parallax-kernel; (B, H, L, D) layout
        import parallax.triton.parallax_train as official_mod

        add(Peer("official", "BHTD", True, call=lambda q, r, k, v: parallax_func(q, r, k, v)))
        autotuners += [obj for obj in vars(official_mod).values() if isinstance(obj, triton.runtime.Autotuner)]
    except Exception as err:
        add(Peer("official", "BHTD", True, reason=f"import failed: {err!r}"))
    try:
        from fla.ops.parallax import parallel_parallax

        add(Peer("fla", "BTHD", True, call=lambda q, r, k, v: parallel_parallax(q, r, k, v)))
    except Exception as err:
        add(Peer("fla", "BTHD", True, reason=f"import failed: {err!r}"))
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, r, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        add(Peer("cudnn", "BHTD", False, call=sdpa, backend=SDPBackend.CUDNN_ATTENTION))
        add(Peer("flash", "BHTD", False, call=sdpa, backend=SDPBackend.FLASH_ATTENTION))
    except Exception as err:
        add(Peer("cudnn", "BHTD", False, reason=f"torch.nn.attention unavailable: {err!r}"))
        add(Peer("flash", "BHTD", False, reason=f"torch.nn.attention unavailable: {err!r}"))
        sdpa_kernel = None
    from kernels.parallax.reference import parallax_attention as reference

    add(Peer("reference", "BTHD", True, call=lambda q, r, k, v: reference(q, r, k, v)))

    # The official kernels autotune over 36 tile configs per kernel and per sequence length; with Triton's default
    # 25 + 100 ms per config that alone would take minutes. Both ours and theirs are tuned with a shorter benchmark.
    def short_bench(kernel_call, quantiles):
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

    for tuner in autotuners:
        tuner.__dict__["do_bench"] = short_bench

    # ---------------------------------------------------------------- helpers
    def make_inputs(B: int, L: int, H: int, D: int, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        rand = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=torch.float32)  # noqa: E731
        q, r, k = (F.rms_norm(rand(B, L, H, D), (D,)).to(dtype) for _ in range(3))  # as the official bench
        v, g = rand(B, L, H, D).to(dtype), rand(B, L, H, D).to(dtype)
        return q, r, k, v, g

    def to_layout(peer: Peer, tensors):
        return [x.transpose(1, 2).contiguous() if peer.layout == "BHTD" else x.contiguous() for x in tensors]

    def backend_ctx(peer: Peer):
        return sdpa_kernel(peer.backend) if peer.backend is not None else contextlib.nullcontext()

    def make_fns(peer: Peer, tensors):
        """(fwd, fwd+bwd) closures on the peer's own layout; inputs prepared here, outside the timed calls."""
        q, r, k, v, g = to_layout(peer, tensors)
        leaves = [x.detach().clone().requires_grad_() for x in (q, r, k, v)]

        def fwd():
            with torch.no_grad():
                return peer.call(q, r, k, v)

        def fwd_bwd():
            out = peer.call(*leaves)
            return torch.autograd.grad(out, leaves if peer.parallax else [leaves[0], *leaves[2:]], g)

        return fwd, fwd_bwd

    def bench_ms(fn) -> float:
        """Median ms of do_bench, with the repetition time stretched to at least ~8 timed calls."""
        fn()  # compile / autotune
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        estimate = (time.perf_counter() - t0) * 1e3
        return float(triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=max(args.rep_ms, 8 * estimate),
                                             return_mode="median"))

    def rel_err(x, ref) -> float:
        return ((x.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    cuda_broken = ""

    def guard(label: str, fn):
        """Run fn; on failure log it and return the error text (and notice a lost CUDA context)."""
        nonlocal cuda_broken
        try:
            return fn(), ""
        except Exception as err:
            text = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            log(f"  {label}: FAILED {text}")
            if "CUDA error" in str(err) or "illegal memory access" in str(err):
                cuda_broken = text
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            return None, text

    results: list[Result] = []
    skipped_rows: list[str] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write_csv() -> None:
        """Rewritten after every row, so that a killed run still leaves its measurements behind."""
        with (out_dir / "parallax_train_bench.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["section", "B", "L", "H", "D", "peer", "mode", "value", "unit", "note"])
            for r in results:
                writer.writerow([r.section, r.B, r.L, r.H, r.D, r.peer, r.mode, f"{r.value:.6g}",
                                 "GiB" if r.mode == "peak_mem" else "ms", r.note])

    log(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
        "peers: " + ", ".join(f"{p.name} ({'ok' if p.available else p.reason})" for p in peers.values()))

    # ---------------------------------------------------------------- parallel compile
    precompile_note = "skipped (--no-precompile)"
    if not args.no_precompile:
        calls = []
        for peer in peers.values():
            if peer.available and peer.name in ("ours", "official", "fla"):
                for D in ((*GRID_DIMS, 8) if peer.name == "ours" else GRID_DIMS):
                    shape = (2, 128, 16, 8) if D == 8 else (1, 1024, 2, D)  # same specialisations as the timed calls

                    def call(peer=peer, shape=shape):
                        make_fns(peer, make_inputs(*shape, seed=0))[1]()

                    calls.append((f"{peer.name} D={D}", call))
        t0 = time.time()
        if args.precompile_shard:  # a helper process: compile this share into the on-disk cache, then stop
            index, count = (int(x) for x in args.precompile_shard.split("/"))
            precompile(calls, autotuners, log, shard=(index, count))
            return 0
        if args.precompile_procs > 1:
            fill_cache_in_processes(args, log)
        precompile_note, fail = guard("precompile", lambda: precompile(calls, autotuners, log))
        precompile_note = precompile_note or f"failed ({fail}); kernels compile lazily"
        log(f"precompile: {precompile_note} ({time.time() - t0:.1f}s)")

    # ---------------------------------------------------------------- correctness pre-check (fp32 reference)
    for D in (*GRID_DIMS, 8):
        tensors = make_inputs(*PRECHECK_SHAPE, D, seed=7)
        q, r, k, v, g = tensors
        leaves = [x.float().requires_grad_() for x in (q, r, k, v)]
        ref_out = reference(*leaves)
        ref = [ref_out, *torch.autograd.grad(ref_out, leaves, g.float())]
        for peer in peers.values():
            if not (peer.available and peer.parallax and peer.name != "reference") or (peer.name != "ours" and D == 8):
                continue

            def check(peer=peer):
                qq, rr, kk, vv, gg = to_layout(peer, tensors)
                lv = [x.detach().clone().requires_grad_() for x in (qq, rr, kk, vv)]
                out = peer.call(*lv)
                got = [out, *torch.autograd.grad(out, lv, gg)]
                if peer.layout == "BHTD":
                    got = [x.transpose(1, 2) for x in got]
                return max(rel_err(x, y) for x, y in zip(got, ref))

            err, fail = guard(f"precheck {peer.name} D={D}", check)
            peer.precheck += f"D={D}: " + (f"{err:.1e}" if fail == "" else f"error ({fail})") + "; "
            log(f"precheck {peer.name:8s} D={D:3d}: max rel err of o, dq, dr, dk, dv vs fp32 reference = "
                + (f"{err:.2e}" if fail == "" else fail))

    # ---------------------------------------------------------------- one timed row
    def time_row(section: str, B: int, L: int, H: int, D: int, names: list[str]) -> None:
        tensors = make_inputs(B, L, H, D, seed=B * 100_003 + L * 31 + H * 7 + D)
        for name in names:
            peer = peers[name]
            if not peer.available or cuda_broken:
                continue
            if name == "fla" and dtype != torch.bfloat16:
                continue
            fns, fail = guard(f"{name} setup", lambda: make_fns(peer, tensors))
            if fns is None:
                results.append(Result(section, B, L, H, D, name, "fwd+bwd", float("nan"), fail))
                continue
            for mode, fn in zip(("fwd", "fwd+bwd"), fns):
                with backend_ctx(peer):
                    ms, fail = guard(f"{section} {name} {mode} B={B} L={L} H={H} D={D}", lambda fn=fn: bench_ms(fn))
                results.append(Result(section, B, L, H, D, name, mode, float("nan") if ms is None else ms, fail))
                if ms is not None:
                    log(f"{section:4s} B={B} L={L:5d} H={H:2d} D={D:3d} {name:9s} {mode:7s} {ms:9.3f} ms")
            del fns
        write_csv()

    # ---------------------------------------------------------------- MAD shapes
    for B, L, H, D in MAD_SHAPES:
        names = ["ours", "cudnn", "flash"] + (["reference"] if B * H * L * L <= REF_MAX_SCORES else [])
        if B * H * L * L > REF_MAX_SCORES:
            skipped_rows.append(f"MAD B={B} L={L}: reference skipped (B*H*L^2 above {REF_MAX_SCORES:.1e})")
        time_row("mad", B, L, H, D, names)
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- peak memory at the largest shapes
    for B, L, H, D in MEM_SHAPES:
        tensors = make_inputs(B, L, H, D, seed=11)
        for name in ("ours", "official", "fla", "cudnn", "flash"):
            peer = peers[name]
            if not peer.available or cuda_broken:
                continue

            def measure(peer=peer):
                _, fwd_bwd = make_fns(peer, tensors)
                with backend_ctx(peer):
                    fwd_bwd()  # warm-up (and autotune) outside the measurement
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    grads = fwd_bwd()
                    torch.cuda.synchronize()
                    peak = torch.cuda.max_memory_allocated() - base
                del grads
                return peak / 2**30

            gib, fail = guard(f"memory {name} B={B} L={L} H={H} D={D}", measure)
            results.append(Result("mem", B, L, H, D, name, "peak_mem", float("nan") if gib is None else gib, fail))
            if gib is not None:
                log(f"mem  B={B} L={L:5d} H={H:2d} D={D:3d} {name:9s} peak {gib:.3f} GiB above the inputs")
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- main grid
    # Longest sequences first: if the time budget runs out, the short (least telling) rows are the ones skipped.
    grid = [(B, L, H, D) for L in sorted(GRID_LENS, reverse=True) for D in GRID_DIMS for H in GRID_HEADS
            for B in GRID_BATCHES if B * L <= MAX_TOKENS]
    for i, (B, L, H, D) in enumerate(grid):
        if time.time() - start > args.budget_s or cuda_broken:
            why = cuda_broken or f"time budget {args.budget_s:.0f} s"
            skipped_rows += [f"grid B={b} L={l} H={h} D={d}: not timed ({why})" for b, l, h, d in grid[i:]]
            log(f"stopping the grid at row {i} of {len(grid)}: {why}")
            break
        names = ["ours", "official", "fla", "cudnn", "flash"]
        if L <= REF_MAIN_MAX_LEN and B * H * L * L <= REF_MAX_SCORES:
            names.append("reference")
        time_row("grid", B, L, H, D, names)
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- report
    write_csv()
    versions = {
        "torch": torch.__version__, "triton": triton.__version__, "fla-core": version_of("fla-core"),
        "parallax-kernel": version_of("parallax-kernel"), "python": platform.python_version(),
    }
    md = report(results, peers, versions, torch.cuda.get_device_name(), precompile_note, skipped_rows,
                time.time() - start, cuda_broken, autotune_picks(ours_tuners))
    (out_dir / "parallax_train_bench.md").write_text(md)
    print(md, flush=True)
    return 0


def fill_cache_in_processes(args: argparse.Namespace, log) -> None:
    """Run `--precompile-procs` copies of this script in `--precompile-shard` mode at once; each compiles every
    n-th autotune candidate into Triton's on-disk cache, where this process's own precompile then finds them."""
    import subprocess

    n = args.precompile_procs
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    base = [sys.executable, __file__, "--peers", args.peers, "--out", args.out]
    procs = [subprocess.Popen([*base, "--precompile-shard", f"{i}/{n}"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]  # fmt: skip
    failed = [i for i, proc in enumerate(procs) if proc.wait() != 0]
    log(f"precompile: {n} helper processes filled the cache" + (f"; helpers {failed} failed" if failed else ""))


def precompile(calls, autotuners, log=print, shard: tuple[int, int] | None = None) -> str:
    """Compile every Triton kernel (and autotune candidate) that `calls` launch, in parallel threads, running none.

    Each call (a (label, zero-argument function) pair, typically one forward+backward) runs with every Triton
    launch turned into a compile-only warm-up inside `triton.AsyncCompileMode`, and with the autotuners' benchmark
    replaced by "compile this config". Afterwards the autotuners forget their fake choices, so the real calls tune
    on real timings and find every binary compiled. A failure here only means that kernels compile lazily later.
    Also used by check_parallax_triton.py. With `shard=(i, n)` only the autotune candidates whose config hashes to
    i modulo n are compiled (the chosen first config of every autotuner is compiled in every shard).
    """
    import zlib
    import triton
    from concurrent.futures import ThreadPoolExecutor
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if not hasattr(triton, "AsyncCompileMode"):
        return "not available in this Triton (no AsyncCompileMode); kernels compile lazily"
    from triton.runtime._async_compile import FutureKernel

    orig_run, orig_bench = JITFunction.run, Autotuner._bench
    touched_jit, touched_tuners = set(), set()

    def compile_only_run(self, *args, grid, warmup, **kwargs):
        touched_jit.add(self)
        return orig_run(self, *args, grid=grid, warmup=True, **kwargs)

    def compile_only_bench(self, *args, config, **meta):
        touched_tuners.add(self)
        if shard is None or zlib.crc32(repr(sorted(config.all_kwargs().items())).encode()) % shard[1] == shard[0]:
            self.fn.run(*args, **dict(meta, **config.all_kwargs()))
        return [1.0, 1.0, 1.0]

    n_threads = max(2, min(32, os.cpu_count() or 2)) if shard is None else 2
    failures = []
    JITFunction.run, Autotuner._bench = compile_only_run, compile_only_bench
    try:
        with ThreadPoolExecutor(n_threads) as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
            for label, call in calls:
                try:
                    call()
                except Exception as err:  # the real run will compile (and report) it
                    failures.append(f"{label}: {type(err).__name__}")
    except Exception as err:
        failures.append(f"{type(err).__name__}: {err}")
    finally:
        JITFunction.run, Autotuner._bench = orig_run, orig_bench
        for tuner in list(touched_tuners) + list(autotuners):
            getattr(tuner, "cache", {}).clear()  # forget the fake tuning choices
        for jit_fn in touched_jit:  # drop failed compiles so that the real call compiles and reports them
            for entry in jit_fn.device_caches.values():
                cache = entry[0] if isinstance(entry, tuple) else None
                if isinstance(cache, dict):
                    for key in [k for k, v in cache.items() if isinstance(v, FutureKernel)]:
                        del cache[key]
    n_kernels = sum(len(e[0]) for j in touched_jit for e in j.device_caches.values() if isinstance(e, tuple))
    log(f"precompile: {n_kernels} kernel binaries ready from {len(calls)} calls on {n_threads} threads")
    return f"{n_kernels} binaries compiled in {n_threads} threads" + (f"; failures: {failures}" if failures else "")


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def report(results: list[Result], peers: dict, versions: dict, device: str, precompile_note: str,
           skipped_rows: list[str], seconds: float, cuda_broken: str, picks: Sequence[TilePick] = ()) -> str:
    def get(section, B, L, H, D, peer, mode):
        for r in results:
            if (r.section, r.B, r.L, r.H, r.D, r.peer, r.mode) == (section, B, L, H, D, peer, mode):
                return r
        return None

    def fmt(r, digits=3):
        if r is None:
            return "-"
        return f"{r.value:.{digits}f}" if math.isfinite(r.value) else "err"

    lines = [
        "# Parallax attention training benchmark (causal, bf16)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- device: {device}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- command: `{' '.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}`",
        "- method: median of `triton.testing.do_bench` (L2 flushed before each call) after warm-up; inputs RMS-normalised "
        "q, r, k and normal v, fresh per shape; fwd under `torch.no_grad()`, fwd+bwd = forward + `torch.autograd.grad` "
        "of all inputs; each peer in its own layout (conversion not timed); SDPA backends forced with `sdpa_kernel`",
        "- autotuning (ours and official): tuning benchmark shortened to `do_bench(warmup=5, rep=25)` per config; "
        f"kernels precompiled: {precompile_note}",
        f"- total wall time: {seconds:.0f} s" + (f"; **CUDA context lost: {cuda_broken}**" if cuda_broken else ""),
        "",
        "## Peers",
        "",
        f"| peer | status | pre-check vs fp32 reference (max rel. err of o and all grads, (B, L, H) = {PRECHECK_SHAPE}) |",
        "| --- | --- | --- |",
    ]
    for p in peers.values():
        lines.append(f"| {p.name} | {'ok' if p.available else 'skipped: ' + p.reason} | {p.precheck or '-'} |")

    grid_rows = sorted({(r.B, r.L, r.H, r.D) for r in results if r.section == "grid"}, key=lambda s: (s[3], s[2], s[1], s[0]))
    names = [n for n in ("ours", "official", "fla", "cudnn", "flash", "reference") if n in peers]
    for mode in ("fwd+bwd", "fwd"):
        lines += ["", f"## Grid, {mode} (ms)", "",
                  "| B | L | H | D | " + " | ".join(names) + " | official / ours | ours / cudnn |",
                  "| ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " | ---: | ---: |"]
        for B, L, H, D in grid_rows:
            cells = [fmt(get("grid", B, L, H, D, n, mode)) for n in names]
            ours, off, cud = (get("grid", B, L, H, D, n, mode) for n in ("ours", "official", "cudnn"))
            speed = f"{off.value / ours.value:.2f}x" if ours and off and math.isfinite(ours.value * off.value) else "-"
            ratio = f"{ours.value / cud.value:.2f}" if ours and cud and math.isfinite(ours.value * cud.value) else "-"
            lines.append(f"| {B} | {L} | {H} | {D} | " + " | ".join(cells) + f" | {speed} | {ratio} |")

    lines += ["", "## MAD shapes (16 heads of dim 8), ms", "", "| B | L | peer | fwd | fwd+bwd |", "| ---: | ---: | --- | ---: | ---: |"]
    for B, L, H, D in sorted({(r.B, r.L, r.H, r.D) for r in results if r.section == "mad"}, key=lambda s: s[1]):
        for n in names:
            f_, fb = get("mad", B, L, H, D, n, "fwd"), get("mad", B, L, H, D, n, "fwd+bwd")
            if f_ or fb:
                lines.append(f"| {B} | {L} | {n} | {fmt(f_)} | {fmt(fb)} |")

    lines += ["", "## Peak memory of forward+backward (GiB allocated above the inputs and grad_out)", "",
              "| B | L | H | D | peer | GiB | vs cudnn | vs flash |", "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    mem_ratio = {}
    for B, L, H, D in sorted({(r.B, r.L, r.H, r.D) for r in results if r.section == "mem"}):
        base = {n: get("mem", B, L, H, D, n, "peak_mem") for n in ("cudnn", "flash")}
        for n in names:
            r = get("mem", B, L, H, D, n, "peak_mem")
            if r is None:
                continue
            rel = {b: (r.value / x.value if x and math.isfinite(x.value) and x.value > 0 else float("nan")) for b, x in base.items()}
            if n == "ours" and L == MEM_LENS[-1]:  # against the leaner of the two softmax backends that ran
                finite = [x for x in rel.values() if math.isfinite(x)]
                mem_ratio[(B, L, H, D)] = max(finite) if finite else float("nan")
            lines.append(f"| {B} | {L} | {H} | {D} | {n} | {fmt(r)} | {rel['cudnn']:.2f} | {rel['flash']:.2f} |")

    growth = {}  # (peer, D) -> peak at the longest / peak at the shortest length of MEM_LENS
    for (B, L, H, D) in sorted({(r.B, r.L, r.H, r.D) for r in results if r.section == "mem" and r.L == MEM_LENS[-1]}):
        for n in names:
            hi, lo = get("mem", B, L, H, D, n, "peak_mem"), get("mem", B, MEM_LENS[0], H, D, n, "peak_mem")
            if hi and lo and math.isfinite(hi.value) and math.isfinite(lo.value) and lo.value > 0:
                growth[(n, D)] = hi.value / lo.value
    if growth:
        dims = sorted({d for _, d in growth})
        lines += ["", f"Peak memory at L = {MEM_LENS[-1]} over peak memory at L = {MEM_LENS[0]} (same B, H, D): "
                  f"{MEM_LENS[-1] // MEM_LENS[0]} when it grows linearly in L, {(MEM_LENS[-1] // MEM_LENS[0]) ** 2} "
                  "when quadratically.", "", "| peer | " + " | ".join(f"D = {d}" for d in dims) + " |",
                  "| --- | " + " | ".join("---:" for _ in dims) + " |"]
        for n in names:
            if any((n, d) in growth for d in dims):
                lines.append(f"| {n} | " + " | ".join(f"{growth[(n, d)]:.2f}" if (n, d) in growth else "-" for d in dims) + " |")

    # Summary against the targets.
    def ratios(num, den, mode, cond=lambda s: True):
        out = []
        for s in grid_rows:
            a, b = get("grid", *s, num, mode), get("grid", *s, den, mode)
            if a and b and math.isfinite(a.value) and math.isfinite(b.value) and cond(s):
                out.append(a.value / b.value)
        return out

    lines += ["", "## Summary against the targets", ""]
    for mode in ("fwd+bwd", "fwd"):
        sp = ratios("official", "ours", mode)
        lines.append(f"- {mode}: ours vs official, geometric-mean speedup over {len(sp)} shared grid shapes: "
                     f"**{geomean(sp):.2f}x** (min {min(sp, default=float('nan')):.2f}x, max {max(sp, default=float('nan')):.2f}x)")
        cu = ratios("ours", "cudnn", mode, lambda s: s[1] >= 4096)
        lines.append(f"- {mode}: ours / cuDNN softmax at L >= 4096 over {len(cu)} shapes: geomean **{geomean(cu):.2f}**, "
                     f"worst {max(cu, default=float('nan')):.2f}")
        fl = ratios("fla", "ours", mode)
        lines.append(f"- {mode}: ours vs fla `parallel_parallax`, geomean speedup {geomean(fl):.2f}x over {len(fl)} shapes")
    sp, cu = ratios("official", "ours", "fwd+bwd"), ratios("ours", "cudnn", "fwd+bwd", lambda s: s[1] >= 4096)
    cu_worst = max(cu, default=float("nan"))
    mem_worst = max(mem_ratio.values(), default=float("nan"))
    lines += ["", "| target (fwd+bwd) | wanted | measured | met | shortfall |", "| --- | ---: | ---: | --- | --- |"]
    checks = [
        ("speed-up vs official, geomean over the grid", f">= {TARGETS['speedup_vs_official']}x", geomean(sp),
         lambda x: x >= TARGETS["speedup_vs_official"], lambda x: f"{TARGETS['speedup_vs_official'] / x:.2f}x too slow"),
        ("ours / cuDNN at L >= 4096, geomean", f"<= {TARGETS['ratio_vs_cudnn_long']}", geomean(cu),
         lambda x: x <= TARGETS["ratio_vs_cudnn_long"], lambda x: f"{x / TARGETS['ratio_vs_cudnn_long']:.2f}x too slow"),
        ("ours / cuDNN at L >= 4096, worst shape", f"<= {TARGETS['ratio_vs_cudnn_long']}", cu_worst,
         lambda x: x <= TARGETS["ratio_vs_cudnn_long"], lambda x: f"{x / TARGETS['ratio_vs_cudnn_long']:.2f}x too slow"),
        ("peak memory vs softmax (leaner of cuDNN, flash) at 16k, worst", f"<= {TARGETS['memory_vs_softmax_16k']}", mem_worst,
         lambda x: x <= TARGETS["memory_vs_softmax_16k"], lambda x: f"{x / TARGETS['memory_vs_softmax_16k']:.2f}x too much"),
        (f"peak memory growth from L = {MEM_LENS[0]} to {MEM_LENS[-1]}, ours, worst D", f"<= {TARGETS['memory_growth_4k_to_16k']}",
         max((g for (n, _), g in growth.items() if n == "ours"), default=float("nan")),
         lambda x: x <= TARGETS["memory_growth_4k_to_16k"], lambda x: f"{x / TARGETS['memory_growth_4k_to_16k']:.2f}x too much"),
    ]
    for label, want, got, ok, short in checks:
        if not math.isfinite(got):
            lines.append(f"| {label} | {want} | not measured | - | - |")
        else:
            lines.append(f"| {label} | {want} | {got:.2f} | {'yes' if ok(got) else 'NO'} | {'-' if ok(got) else short(got)} |")
    lines += ["", "Memory note: Parallax has one more input (r) and gradient (dr) than softmax attention, so part of "
              "the gap is inherent to the operation; beyond the inputs ours saves, for bf16 inputs, two fp16 [B, T, H, D] "
              "copies (o and v_bar, from which the backward takes its row statistics where rows see 64 keys or more).", ""]
    lines += picks_section(picks)
    failures = [r for r in results if r.note]
    lines += ["## Failures and skipped rows", ""]
    lines += [f"- {r.section} {r.peer} {r.mode} B={r.B} L={r.L} H={r.H} D={r.D}: {r.note}" for r in failures]
    lines += [f"- {s}" for s in skipped_rows]
    if not failures and not skipped_rows:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
