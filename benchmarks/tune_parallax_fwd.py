"""Our Triton Parallax forward per tile config and P.V mode, beside the official kernel's autotuned forward.

    python3 benchmarks/tune_parallax_fwd.py --out analysis/kernels/ --budget-s 400

Where does our forward lose to the official one at long sequences? (analysis/kernels/parallax_train_bench.md: 5.90
against 4.24 ms at B=1, H=16, L=16384, D=128, while the backward times match.) Both take four dots per key tile. For
a few long bf16 shapes this times our forward with each config of a wider grid than the autotuner's (query tiles 64
and 128, key tiles 32, 64 and 128, 4 and 8 warps, 2 and 3 stages) in the two P.V modes of long bf16 inputs: one fp16
dot (`PV_FP16`, what a program takes when its values fit) and the per-program choice (`PV_CHOOSE`, what long bf16
inputs run: two sweeps compiled in one kernel, one range kernel first). The official forward (parallax-kernel,
autotuned over its 36 configs) is timed on the same inputs, with the config it picked. A config that does not build
(shared memory, registers) is listed with its error. Forward only, under `torch.no_grad()`; medians of
`triton.testing.do_bench`. Configs are compiled lazily, one at a time, so `--budget-s` bounds the run: the shape
with the largest gap comes first, and the table says what was left out. Speed only: a config that wins here joins
`GPU_CONFIGS` in kernels/parallax/triton.py, and benchmarks/check_parallax_triton.py checks every config there.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPES = [(1, 16384, 16, 128), (1, 16384, 16, 64), (4, 4096, 8, 128)]  # (B, L, H, D), bf16
SMOKE_SHAPES = [(1, 40, 2, 16)]  # fp16 under the interpreter
BLOCK_M = (64, 128)
BLOCK_N = (32, 64, 128)
WARPS = (4, 8)
STAGES = (2, 3)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "analysis" / "kernels")
    p.add_argument("--budget-s", type=float, default=400.0, help="stop starting new configs after this many seconds")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="one tiny fp16 shape and one config under TRITON_INTERPRET=1, to test this script without a GPU")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are built (at import)
    sys.path.insert(0, str(REPO))
    import torch
    import torch.nn.functional as F
    import triton

    from kernels.parallax import triton as ours

    start = time.time()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float16 if args.cpu_smoke else torch.bfloat16
    official = None if args.cpu_smoke else _official()

    def bench(fn) -> float:
        if args.cpu_smoke:
            fn()
            return float("nan")
        return float(triton.testing.do_bench(fn, warmup=10, rep=50))

    grid = [ours._cfg(m, n, w, s) for m in BLOCK_M for n in BLOCK_N for w in WARPS for s in STAGES]
    if args.cpu_smoke:
        grid = grid[:1]
    modes = {"fp16": ours.PV_FP16.value, "choose": ours.PV_CHOOSE.value}
    rows, skipped = [], []
    for B, L, H, D in SMOKE_SHAPES if args.cpu_smoke else SHAPES:
        gen = torch.Generator(device=device).manual_seed(0)
        q, r, k = (F.rms_norm(torch.randn(B, L, H, D, device=device, generator=gen), (D,)).to(dtype) for _ in range(3))
        v = torch.randn(B, L, H, D, device=device, generator=gen).to(dtype)
        shape = f"B={B} L={L} H={H} D={D}"
        if official is not None:
            bhtd = [x.transpose(1, 2).contiguous() for x in (q, r, k, v)]  # its layout, converted before timing
            with torch.no_grad():
                ms = bench(lambda: official[0](*bhtd))
            rows.append((shape, "official", _describe(official[1]._fwd_kernel.best_config), ms))
        for cfg in grid:
            for mode_name, mode in modes.items():
                if time.time() - start > args.budget_s:
                    skipped.append(f"{shape} {_describe(cfg)} {mode_name}")
                    continue
                try:
                    with torch.no_grad():
                        ms = bench(lambda: ours.parallax_fwd(q, r, k, v, D**-0.5, configs={"fwd": cfg}, pv=mode))
                    rows.append((shape, f"ours {mode_name}", _describe(cfg), ms))
                except Exception as err:  # a config that does not build on this GPU: recorded, not fatal
                    rows.append((shape, f"ours {mode_name}", _describe(cfg), f"{type(err).__name__}: {str(err)[:80]}"))
                print(rows[-1], flush=True)
    _write(args, rows, skipped, time.time() - start)
    return 0


def _official():
    """(parallax_func, its module) of the parallax-kernel wheel, or None where it is not installed."""
    try:
        from parallax import parallax_func
        import parallax.triton.parallax_train as module
    except ImportError as err:
        print(f"official kernel unavailable: {err}", flush=True)
        return None
    return parallax_func, module


def _describe(cfg) -> str:
    if cfg is None:
        return "-"
    tiles = "x".join(str(v) for v in cfg.kwargs.values())
    return f"{tiles}, {cfg.num_warps} warps, {cfg.num_stages} stages"


def _write(args, rows, skipped, seconds: float) -> None:
    import torch  # imported in main, after TRITON_INTERPRET was set for --cpu-smoke
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    device = "CPU under TRITON_INTERPRET=1 (a script test, not a measurement)" if args.cpu_smoke else (
        torch.cuda.get_device_name())  # fmt: skip
    lines = ["# Parallax forward per tile config and P.V mode (bf16, causal, forward only)", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device: {device}",
             f"- versions: torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
             f"- command: `python3 benchmarks/tune_parallax_fwd.py {' '.join(sys.argv[1:])}` ({seconds:.0f} s)",
             "- method: median ms of `triton.testing.do_bench(warmup=10, rep=50)`; ours with the config forced; tiles "
             "are BLOCK_M x BLOCK_N (ours) or ROW x COL (official)", "",
             "| shape | kernel | config | ms |", "| --- | --- | --- | ---: |"]  # fmt: skip
    for shape, kernel, config, ms in sorted(rows, key=lambda row: (row[0], isinstance(row[3], str), row[3])):
        lines.append(f"| {shape} | {kernel} | {config} | {ms if isinstance(ms, str) else f'{ms:.3f}'} |")
    if skipped:
        lines += ["", f"Not run (budget): {len(skipped)} config and mode pairs, from {skipped[0]}."]
    (args.out / "parallax_fwd_tune.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
