"""Time Parallax decode (ours and peers) under CUDA graphs on the GPU; or smoke-test the Triton impl on CPU.

    python benchmarks/bench_parallax_decode.py [--out analysis/kernels] [--budget 240]
    python benchmarks/bench_parallax_decode.py --cpu-smoke --out /tmp/x

Grid: batch {1, 8, 32, 128, 512, 2048} x context {128, 512, 2048, 8192, 32768} x heads {8, 16} (MHA: kv_heads =
heads), head_dim 128, bf16, plus the point B=32, H=8, L=16384; points whose K alone exceeds 4 GiB are dropped.
Each peer's median per-call time comes from replaying a CUDA graph of many calls, the peers' graphs replayed in
turn round after round (so that a drift during a point reaches every peer alike); when one input set is under
240 MB the calls rotate through enough distinct sets to cover >= 256 MB (at least 4), so the L2 cache (60 MB)
holds no useful data: the numbers are cold. Every peer is optional: a peer that fails to import or to run is
reported with the reason and the run goes on. TB/s = K+V bytes / time. Each peer is checked once against a
float64 reference (relative max-norm error) before it is timed at a point.

Peers: ours (`impl="cute"`, `impl="triton"`, and `impl="auto"`, which picks one of them by batch x heads; and
`ours_triton_1launch` / `ours_triton_2launch`, the Triton kernel with its split merge forced into the split launch
or into a second launch, `triton_decode(merge="atomic" | "kernel")`); the official parallax-kernel (`parallax.parallax_attn_with_kvcache`,
CuTeDSL; `parallax.triton.parallax_decode`); fla-core's `parallax_decode_one_step`; softmax decode through
`scaled_dot_product_attention` with the cuDNN and flash backends forced, at the same heads and with twice the
query heads over the same KV heads (GQA-2: the bytes and tensor work of Parallax decode); FlashAttention-3's
softmax decode (`flash_attn_with_kvcache` of the forward-only `fa3-fwd` wheel) where it imports; a 2 GiB device copy,
timed as docs/device.md times it (one CUDA event pair around each eager `dst.copy_(src)`, no graph, median of
20 after warm-up; read + written bytes), whose 4.23 TB/s the bandwidth target is also stated against.
Writes `<out>/parallax_decode_bench.md` and `.csv`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCHES = (1, 8, 32, 128, 512, 2048)
CONTEXTS = (128, 512, 2048, 8192, 32768)
HEADS = (8, 16)
EXTRA_POINTS = ((32, 8, 16384),)  # (B, H, L): the official README's headline point
K_LIMIT = 4 << 30
ROTATE_BELOW = 240e6
ROTATE_COVER = 256e6
OURS = ("ours_auto", "ours_cute", "ours_triton", "ours_triton_1launch", "ours_triton_2launch")
COPY_BYTES = 2 << 30
COPY_REPS, COPY_WARMUP = 20, 3
DOCS_COPY_TBS = 4.23  # docs/device.md: median of 20 eager 2 GiB device copies, read + written bytes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "analysis" / "kernels"))
    p.add_argument("--budget", type=float, default=240.0, help="seconds; points left when it runs out are listed as skipped")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--heads", default=",".join(map(str, HEADS)))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--peers", default="", help="comma-separated subset of peers (default: all)")
    p.add_argument("--replays", type=int, default=15, help="graph replays per measurement (median taken)")
    p.add_argument("--cpu-smoke", action="store_true", help="Triton impl under TRITON_INTERPRET=1 at 2 tiny fp32 shapes")
    return p.parse_args(argv)


# ---- peers -----------------------------------------------------------------------------------------------


def build_peers(torch, F):
    """name -> (make(inputs) -> zero-argument call, or the reason it is unavailable as a str)."""
    from kernels.parallax.decode import cute_available, parallax_decode, triton_decode

    peers = {}
    ok, why = cute_available()
    peers["ours_cute"] = (lambda s: lambda: parallax_decode(s["q"], s["r"], s["k"], s["v"], impl="cute")) if ok else why
    peers["ours_triton"] = lambda s: lambda: parallax_decode(s["q"], s["r"], s["k"], s["v"], impl="triton")
    peers["ours_auto"] = lambda s: lambda: parallax_decode(s["q"], s["r"], s["k"], s["v"], impl="auto")
    for name, merge in (("ours_triton_1launch", "atomic"), ("ours_triton_2launch", "kernel")):
        peers[name] = lambda s, merge=merge: lambda: triton_decode(s["q"], s["r"], s["k"], s["v"],
                                                                   scale=s["q"].shape[-1] ** -0.5, merge=merge)
    try:
        import parallax

        if getattr(parallax, "cute_decode_available", False):
            peers["official_cute"] = lambda s: lambda: parallax.parallax_attn_with_kvcache(s["q"], s["r"], s["k"], s["v"])
        else:
            peers["official_cute"] = "parallax.cute_decode_available is False (CuTeDSL stack missing)"
    except Exception as err:  # noqa: BLE001
        peers["official_cute"] = f"import parallax: {type(err).__name__}: {err}"
    try:
        from parallax.triton import parallax_decode as official_triton

        peers["official_triton"] = lambda s: lambda: official_triton(s["q"], s["r"], s["k"], s["v"])
    except Exception as err:  # noqa: BLE001
        peers["official_triton"] = f"import parallax.triton: {type(err).__name__}: {err}"
    try:
        from fla.ops.parallax.decode import parallax_decode_one_step

        peers["fla_one_step"] = lambda s: lambda: parallax_decode_one_step(s["q"], s["r"], s["k"], s["v"])
    except Exception as err:  # noqa: BLE001
        peers["fla_one_step"] = f"import fla.ops.parallax.decode: {type(err).__name__}: {err}"
    try:  # FlashAttention-3 softmax decode, from the third-party forward-only `fa3-fwd` wheel (a call of its own)
        from fa3_fwd_interface import flash_attn_with_kvcache

        for name, key in (("fa3", "q"), ("gqa2_fa3", "q2")):
            peers[name] = lambda s, key=key: lambda: flash_attn_with_kvcache(s[key], s["k"], s["v"])
    except Exception as err:  # noqa: BLE001 - e.g. built against another torch ABI
        peers["fa3"] = peers["gqa2_fa3"] = f"import fa3_fwd_interface: {type(err).__name__}: {err}"[:300]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(backend, gqa2):
            def make(s):
                q = s["q2"] if gqa2 else s["q"]
                qh, kh, vh = q.transpose(1, 2), s["k"].transpose(1, 2), s["v"].transpose(1, 2)  # [B, H, T, D] views

                def call():
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=gqa2)

                return call

            return make

        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            peers[f"sdpa_{name}"] = sdpa(backend, False)
            peers[f"gqa2_{name}"] = sdpa(backend, True)
    except Exception as err:  # noqa: BLE001
        for name in ("sdpa_cudnn", "sdpa_flash", "gqa2_cudnn", "gqa2_flash"):
            peers[name] = f"torch.nn.attention: {type(err).__name__}: {err}"
    return peers


# ---- timing ----------------------------------------------------------------------------------------------


def capture_graph(torch, calls):
    """(CUDA graph replaying `calls` in turn for >= ~3 ms of eager time, calls per replay); each call is run once
    eagerly first, on a side stream, as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(max(3, len(calls))):
        calls[i % len(calls)]()
    end.record()
    end.synchronize()
    eager_ms = start.elapsed_time(end) / max(3, len(calls))
    n = max(len(calls), min(2000, math.ceil(3.0 / max(eager_ms, 1e-3))))
    n = math.ceil(n / len(calls)) * len(calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    return graph, n


def interleaved_medians_us(torch, graphs: dict, replays: int) -> dict:
    """name -> median per-call µs, replaying every peer's graph once per round, `replays` rounds, the order rotated
    each round: a drift in clocks or memory state over the point's measurement then reaches every peer alike
    (timed one peer after another, two runs of the same kernel at B=32, H=8, L=32768 differed by up to 14 %)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    names = list(graphs)
    times = {n: [] for n in names}
    for i in range(replays):
        for name in names[i % len(names):] + names[: i % len(names)]:
            graph, n = graphs[name]
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) * 1e3 / n)
    return {n: statistics.median(t) for n, t in times.items()}


def copy_bandwidth(torch) -> tuple[float, float]:
    """(µs, TB/s counting bytes read + written) of a 2 GiB device-to-device copy, measured as docs/device.md
    measured its 4.23 TB/s: plain CUDA events around each eager `dst.copy_(src)`, no CUDA graph (replayed in a
    graph, the same copy measured only 2.76 TB/s), median of COPY_REPS after COPY_WARMUP."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(COPY_WARMUP):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(COPY_REPS):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    del src, dst
    us = statistics.median(times)
    return us, 2 * COPY_BYTES / (us * 1e-6) / 1e12


# ---- one point -------------------------------------------------------------------------------------------


def make_sets(torch, B, H, L, D, n_sets):
    sets = []
    for _ in range(n_sets):
        q, r = (torch.randn(B, 1, H, D, device="cuda") for _ in range(2))
        k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        q2 = torch.randn(B, 1, 2 * H, D, device="cuda")
        sets.append(dict(q=q.bfloat16(), r=(0.3 * r).bfloat16(), k=k, v=v, q2=q2.bfloat16()))
    return sets


def reference_error(torch, s, out, peer) -> float:
    """Relative max-norm error against float64 on the first 4 sequences (softmax peers: r = 0 reference)."""
    from kernels.parallax.reference import parallax_attention

    b = min(4, s["q"].shape[0])
    if peer.startswith(("sdpa", "gqa2", "fa3")):
        q = s["q2"] if peer.startswith("gqa2") else s["q"]
        ref = parallax_attention(q[:b].double(), torch.zeros_like(q[:b]).double(), s["k"][:b].double(), s["v"][:b].double())
        got = (out if peer.endswith("fa3") else out.transpose(1, 2))[:b]  # FA3 keeps [B, T, H, D]
    else:
        ref = parallax_attention(*(s[n][:b].double() for n in ("q", "r", "k", "v")))
        got = out[:b]
    return float((got.double() - ref).abs().max() / ref.abs().max())


def run_point(torch, peers, B, H, L, D, replays) -> dict:
    set_bytes = 2 * B * L * H * D * 2
    n_sets = 1 if set_bytes >= ROTATE_BELOW else max(4, math.ceil(ROTATE_COVER / set_bytes))
    sets = make_sets(torch, B, H, L, D, n_sets)
    row = dict(B=B, H=H, L=L, D=D, kv_bytes=set_bytes, sets=n_sets)
    graphs = {}
    for name, make in peers.items():
        if isinstance(make, str):
            row[name] = None
            continue
        try:
            calls = [make(s) for s in sets]
            out = calls[0]()
            err = reference_error(torch, sets[0], out, name) if L <= 8192 else float("nan")
            if not err < 2e-2 and err == err:
                raise RuntimeError(f"wrong result: relative error {err:.2e} against float64")
            graphs[name] = capture_graph(torch, calls)
            row[f"{name}_err"] = err
        except Exception as e:  # noqa: BLE001 - one peer failing must not stop the others
            row[name] = None
            row[f"{name}_why"] = f"{type(e).__name__}: {e}"[:200]
            print(f"  {name} failed at B={B} H={H} L={L}: {row[f'{name}_why']}", flush=True)
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
        torch.cuda.synchronize()
    row.update(interleaved_medians_us(torch, graphs, replays))
    del graphs, sets
    torch.cuda.empty_cache()
    return row


# ---- report ----------------------------------------------------------------------------------------------


def geomean(xs):
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def versions(torch) -> str:
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for dist in ("triton", "nvidia-cutlass-dsl", "cuda-bindings", "parallax-kernel", "fla-core", "fa3-fwd"):
        try:
            parts.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            parts.append(f"{dist} absent")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return ", ".join(parts + [f"cuDNN {cudnn}"])


def write_report(args, torch, peers, rows, skipped, copy, seconds) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(peers)
    with open(out / "parallax_decode_bench.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["B", "H", "L", "D", "kv_bytes", "sets", *[f"{n}_us" for n in names]])
        for r in rows:
            w.writerow([r["B"], r["H"], r["L"], r["D"], r["kv_bytes"], r["sets"], *[r.get(n) or "" for n in names]])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    copy_tbs = copy[1] if copy else float("nan")
    lines = [
        "# Parallax decode latency (CUDA graphs, cold L2)",
        "",
        f"* date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device: {device}",
        f"* versions: {versions(torch)}",
        f"* command: `{' '.join([Path(sys.executable).name, *sys.argv])}`; {seconds:.0f} s",
        "* bf16, MHA (kv_heads = heads), head_dim %d; median per-call µs over %d replays of a graph of many calls, "
        "every peer's graph replayed once per round, in rotated order; "
        "input sets rotated to cover >= 256 MB when one set is under 240 MB (cold L2); TB/s = K+V bytes / time" % (args.head_dim, args.replays),
        (f"* copy: 2 GiB device-to-device, eager, CUDA events, median of {COPY_REPS} after {COPY_WARMUP} warm-ups: "
         f"{copy[0]:.0f} µs, **{copy_tbs:.2f} TB/s** (read + write); docs/device.md measured {DOCS_COPY_TBS} TB/s "
         "the same way") if copy else f"* copy: not measured (docs/device.md: {DOCS_COPY_TBS} TB/s)",
        "",
        "## Peers",
        "",
    ]
    for n in names:
        lines.append(f"* `{n}`: " + (f"unavailable: {peers[n]}" if isinstance(peers[n], str) else "ran"))
    lines += ["", "## Latency, µs (TB/s)", "",
              "| B | H | L | K+V MB | sets | " + " | ".join(names) + " |",
              "| ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for r in rows:
        cells = []
        for n in names:
            t = r.get(n)
            cells.append(f"{t:.1f} ({r['kv_bytes'] / (t * 1e-6) / 1e12:.2f})" if t else ("fail" if r.get(f"{n}_why") else "—"))
        lines.append(f"| {r['B']} | {r['H']} | {r['L']} | {r['kv_bytes'] / 1e6:.1f} | {r['sets']} | " + " | ".join(cells) + " |")
    failures = [(r, n) for r in rows for n in names if r.get(f"{n}_why")]
    if failures:
        lines += ["", "## Peer failures (first 30)", ""]
        lines += [f"* B={r['B']} H={r['H']} L={r['L']} `{n}`: {r[f'{n}_why']}" for r, n in failures[:30]]
    if skipped:
        lines += ["", f"Skipped for the time budget ({args.budget:.0f} s): " + ", ".join(f"B={b} H={h} L={l}" for b, h, l in skipped)]
    lines += ["", "## Ours vs peers (geometric mean of time ratio ours / peer; < 1 means ours is faster)", "",
              "| ours | " + " | ".join(n for n in names if n not in OURS) + " |",
              "| --- | " + " | ".join("---:" for n in names if n not in OURS) + " |"]
    for o in OURS:
        cells = []
        for p in names:
            if p in OURS:
                continue
            ratios = [r[o] / r[p] for r in rows if r.get(o) and r.get(p)]
            cells.append(f"{geomean(ratios):.2f} (n={len(ratios)})" if ratios else "—")
        lines.append(f"| {o} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""] + targets(rows, copy_tbs)
    (out / "parallax_decode_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def targets(rows, copy_tbs) -> list[str]:
    lines = []
    for o in OURS:
        big = [r for r in rows if r["kv_bytes"] > 256e6 and r.get(o)]
        vs_cudnn = [(r, r[o] / r["sdpa_cudnn"]) for r in big if r.get("sdpa_cudnn")]
        if vs_cudnn:
            worst = max(vs_cudnn, key=lambda x: x[1])
            ok = all(x <= 1.10 for _, x in vs_cudnn)
            lines.append(f"* `{o}` <= 1.10x cuDNN softmax where K+V > 256 MB: {'MET' if ok else 'NOT MET'} "
                         f"(geomean {geomean([x for _, x in vs_cudnn]):.2f}x, worst {worst[1]:.2f}x at B={worst[0]['B']} "
                         f"H={worst[0]['H']} L={worst[0]['L']}, {sum(x > 1.10 for _, x in vs_cudnn)}/{len(vs_cudnn)} points over)")
        for label, ref in (("this run's copy", copy_tbs), ("the docs/device.md copy", DOCS_COPY_TBS)):
            if not big or not math.isfinite(ref):
                continue
            frac = [(r, r["kv_bytes"] / (r[o] * 1e-6) / 1e12 / ref) for r in big]
            worst = min(frac, key=lambda x: x[1])
            ok = all(f >= 0.85 for _, f in frac)
            lines.append(f"* `{o}` >= 85 % of {label} bandwidth ({ref:.2f} TB/s, so >= {0.85 * ref:.2f} TB/s) where "
                         f"K+V > 256 MB: {'MET' if ok else 'NOT MET'} (worst {100 * worst[1]:.0f} % at B={worst[0]['B']} "
                         f"H={worst[0]['H']} L={worst[0]['L']}, median {100 * statistics.median(f for _, f in frac):.0f} %)")
        head = [r for r in rows if (r["B"], r["H"], r["L"]) == (32, 8, 16384) and r.get(o) and r.get("official_cute")]
        if head:
            speedup = head[0]["official_cute"] / head[0][o]
            lines.append(f"* `{o}` >= 1.4x faster than official CuTeDSL at B=32 H=8 L=16384: "
                         f"{'MET' if speedup >= 1.4 else 'NOT MET'} ({speedup:.2f}x: {head[0][o]:.1f} vs {head[0]['official_cute']:.1f} µs)")
        b1 = [r for r in rows if r["B"] == 1 and r.get(o) and r.get("official_cute")]
        if b1:
            slower = [r for r in b1 if r[o] > r["official_cute"]]
            lines.append(f"* `{o}` no slower than official at B=1: {'MET' if not slower else 'NOT MET'} ("
                         + ", ".join(f"H={r['H']} L={r['L']}: {r[o]:.1f} vs {r['official_cute']:.1f} µs" for r in (slower or b1)[:10]) + ")")
    return lines or ["* no timings to compare"]


# ---- main ------------------------------------------------------------------------------------------------


def cpu_smoke(args, torch) -> int:
    """Triton impl under the interpreter at 2 tiny fp32 shapes (no graphs, wall time only): a plumbing check."""
    from kernels.parallax.decode import parallax_decode
    from kernels.parallax.reference import parallax_attention

    for B, H, L, D in ((1, 2, 40, 64), (2, 2, 70, 128)):
        q, r, k, v = (torch.randn(B, 1 if i < 2 else L, H, D) for i in range(4))
        t = time.perf_counter()
        out = parallax_decode(q, r, k, v, impl="triton")
        ms = (time.perf_counter() - t) * 1e3
        err = float((out.double() - parallax_attention(q, r, k, v).double()).abs().max())
        print(f"cpu-smoke B={B} H={H} L={L} D={D}: {ms:.0f} ms (interpreter), max abs err {err:.1e}")
        if not err < 1e-4:
            return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, str(REPO))
    import torch
    import torch.nn.functional as F

    if args.cpu_smoke:
        return cpu_smoke(args, torch)
    if not torch.cuda.is_available():
        print("no CUDA device: run on the GPU machine, or use --cpu-smoke")
        return 2
    t0 = time.time()
    peers = build_peers(torch, F)
    if args.peers:
        keep = {p.strip() for p in args.peers.split(",")}
        peers = {n: m for n, m in peers.items() if n in keep}
    for n, m in peers.items():
        print(f"{n}: {'ready' if not isinstance(m, str) else 'unavailable: ' + m}", flush=True)
    try:
        copy = copy_bandwidth(torch)
        print(f"copy 2 GiB (eager, CUDA events, median of {COPY_REPS}): {copy[0]:.0f} µs, {copy[1]:.2f} TB/s "
              f"(docs/device.md: {DOCS_COPY_TBS} TB/s)", flush=True)
    except Exception as e:  # noqa: BLE001
        copy = None
        print(f"copy bandwidth failed: {type(e).__name__}: {e}")
    torch.cuda.empty_cache()
    D = args.head_dim
    points = [(B, H, L) for H in map(int, args.heads.split(",")) for B in map(int, args.batches.split(","))
              for L in map(int, args.contexts.split(","))]
    points += [p for p in EXTRA_POINTS if p not in points and not args.peers]
    points = [p for p in points if p[0] * p[2] * p[1] * D * 2 <= K_LIMIT]
    # Headline points first (the extra point, then B=1), then the largest (the bandwidth targets), so that a
    # budget that runs out skips mid-size points.
    points.sort(key=lambda p: (p not in EXTRA_POINTS, p[0] != 1, -p[0] * p[1] * p[2]))
    rows, skipped = [], []
    for B, H, L in points:
        if time.time() - t0 > args.budget:
            skipped.append((B, H, L))
            continue
        tp = time.time()
        row = run_point(torch, peers, B, H, L, D, args.replays)
        rows.append(row)
        summary = ", ".join(f"{n} {row[n]:.1f}" for n in peers if row.get(n))
        print(f"B={B} H={H} L={L} ({row['kv_bytes'] / 1e6:.0f} MB, {row['sets']} sets, {time.time() - tp:.1f} s): {summary}", flush=True)
    rows.sort(key=lambda r: (r["H"], r["B"], r["L"]))
    write_report(args, torch, peers, rows, skipped, copy, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
