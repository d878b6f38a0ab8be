"""Check the Triton Parallax kernels (output and all four gradients) against a float64 reference.

GPU (default): >= 200 random shapes -- batch 1-8, lengths 1-8192 (ragged ones included), 1-16 heads with GQA groups,
head_dim 8/16/32/64/128, bf16 / fp32 (tf32 off) / fp16 -- fresh random inputs each (q, r, k RMS-normalised as the
official Parallax bench does; a few with large r), every kernel output allocation NaN-poisoned. Tile configs are
forced in turn so that every autotune candidate is checked; a few shapes go through the autotuner instead.
Pass: max-norm relative error max|x - ref| / max|ref| < 1e-2 (bf16, fp16) or < 1e-4 (fp32), and no NaN/inf.

Beside the pass/fail check, a study of inputs whose values and keys share a large offset (v = c + N(0, 1), keys
normalised after adding a common direction), where the backward's row statistics are most fragile: each case runs
twice, with the dq kernel taking them from the forward's saved copies where it does (kernels/parallax/triton.py) and
with them recomputed everywhere, and the report sets the two errors side by side (not part of pass/fail: at large
offsets the recomputed statistics exceed the tolerance too).

    PYTHONPATH=. python benchmarks/check_parallax_triton.py --out analysis/kernels/
    PYTHONPATH=. python benchmarks/check_parallax_triton.py --cpu-smoke --out /tmp/x   # CPU, Triton interpreter

Writes <out>/parallax_triton_check.md (summary) and <out>/parallax_triton_check.csv (one row per shape). Exit
status 0 when every shape passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import platform
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOL = {"bf16": 1e-2, "fp16": 1e-2, "fp32": 1e-4}
HEAD_DIMS = (8, 16, 32, 64, 128)
TENSORS = ("o", "dq", "dr", "dk", "dv")
KERNEL_KINDS = ("fwd", "dq", "dkv")
REF_CAP = 1 << 28  # B * H * T^2 cap for the float64 reference (each [B, H, T, T] float64 tensor is 2 GiB at the cap)
SPECIAL_T = (1, 2, 3, 15, 16, 17, 31, 33, 63, 64, 65, 100, 127, 129, 255, 257, 1000, 1025, 2047, 4097, 8191, 8192)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="analysis/kernels/", help="directory for the Markdown and CSV (default: %(default)s)")
    p.add_argument("--n-shapes", type=int, default=220, help="random shapes to check on GPU (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shape list and inputs (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="stop starting new shapes after this many seconds of checking, counted after the precompile; "
                        "the report says how many ran (default: %(default)s)")
    p.add_argument("--no-precompile", action="store_true", help="compile lazily instead of in parallel up front")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="3 tiny shapes on CPU under TRITON_INTERPRET=1 (fp32/fp16), to test this script without a GPU")
    return p.parse_args(argv)


@dataclass
class Spec:
    idx: int
    B: int
    T: int
    H: int
    H_kv: int
    D: int
    dtype: str  # "bf16" | "fp16" | "fp32"
    scale: float | None  # None: the default D ** -0.5
    r_scale: float  # probes are RMS-normalised, then multiplied by this
    configs: str  # "auto" (autotuner / interpreter default) or "i,j,k": candidate indices for fwd, dq, dkv
    v_offset: float = 0.0  # added to every value
    k_offset: float = 0.0  # times a random unit-RMS direction shared by the keys, added before they are normalised
    recompute: bool = False  # the dq kernel recomputes the row statistics everywhere (STATS_MIN_KEYS out of reach)
    inputs_of: int | None = None  # draw the inputs of this spec index instead of its own (the offset study's pairs)

    def label(self) -> str:
        extra = "" if self.scale is None else f" scale={self.scale:.3g}"
        extra += "" if self.r_scale == 1 else f" r*{self.r_scale:g}"
        extra += "" if not (self.v_offset or self.k_offset) else f" v+{self.v_offset:g} k+{self.k_offset:g}"
        extra += " recomputed" if self.recompute else ""
        return f"B={self.B} T={self.T} H={self.H}/{self.H_kv} D={self.D} {self.dtype} cfg={self.configs}{extra}"


def cap_heads(B: int, T: int, H: int, H_kv: int) -> tuple[int, int, int]:
    """Shrink batch, then heads (keeping H % H_kv == 0), until B * H * T^2 fits the float64 reference cap."""
    while B > 1 and B * H * T * T > REF_CAP:
        B //= 2
    group = H // H_kv
    while B * H_kv * group * T * T > REF_CAP and H_kv > 1:
        H_kv //= 2
    while B * H_kv * group * T * T > REF_CAP and group > 1:
        group //= 2
    return B, H_kv * group, H_kv


def most_candidates(tri, head_dim: int, dtype) -> int:
    """The longest candidate list of the three kernels at this head dim and dtype: forced config indices run to it."""
    return max(len(tri.candidate_configs(kind, head_dim, dtype)) for kind in KERNEL_KINDS)


def forced_config(candidates: list, index: int):
    """A spec's config index for one kernel: indices run up to the longest kernel's candidate list, so a kernel with
    fewer candidates wraps around."""
    return candidates[index % len(candidates)]


def make_specs(n: int, seed: int, n_configs) -> list[Spec]:
    """Coverage first (every head_dim x dtype x tile config, ragged lengths), then random shapes up to n.
    `n_configs(D, dtype)`: the most candidates any of the three kernels has there."""
    rng = random.Random(seed)
    specs: list[Spec] = []

    def add(B, T, H, H_kv, D, dtype, scale=None, r_scale=1.0, configs="auto"):
        B, H, H_kv = cap_heads(B, T, H, H_kv)
        specs.append(Spec(len(specs), B, T, H, H_kv, D, dtype, scale, r_scale, configs))

    def heads():
        H = rng.choice((1, 2, 3, 4, 6, 8, 12, 16))
        return H, rng.choice([d for d in range(1, H + 1) if H % d == 0])

    for D in HEAD_DIMS:
        for dtype in ("bf16", "fp32", "fp16"):
            n_cfg = n_configs(D, dtype)
            for i in range(n_cfg if dtype != "fp16" else 1):
                for rep in range(2 if dtype != "fp16" else 1):
                    cfg = f"{i},{(i + rep) % n_cfg},{(i + 2 * rep) % n_cfg}"
                    add(rng.randint(1, 4), rng.choice(SPECIAL_T[:17]), *heads(), D, dtype, configs=cfg)
    autotuned = 0
    while len(specs) < n:
        D = rng.choice(HEAD_DIMS)
        dtype = rng.choices(("bf16", "fp32", "fp16"), weights=(0.55, 0.3, 0.15))[0]
        T = rng.choice(SPECIAL_T) if rng.random() < 0.3 else int(math.exp(rng.uniform(0.0, math.log(8192))))
        if rng.random() < 0.04:
            T = rng.randint(4096, 8192)  # keep some long ones in the mix
        n_cfg = n_configs(D, dtype)
        if dtype != "fp32" and autotuned < 6 and rng.random() < 0.05:
            configs, autotuned = "auto", autotuned + 1
        else:
            i = len(specs)
            configs = f"{i % n_cfg},{(i + 1) % n_cfg},{(i + 2) % n_cfg}"
        scale = rng.uniform(0.05, 1.0) if rng.random() < 0.2 else None
        # Large r only from 4 keys on: with one key the exact dq, dr, dk are 0, and the error floor (not the
        # kernel) would decide on fp32 rounding amplified by |r|.
        r_scale = rng.choice((4.0, 8.0)) if rng.random() < 0.08 and T >= 4 else 1.0
        add(rng.randint(1, 8), T, *heads(), D, dtype, scale, r_scale, configs)
    return specs


def offset_specs(first_idx: int, smoke: bool) -> list[Spec]:
    """The offset study's cases, each twice: row statistics from the saved copies, then recomputed."""
    offsets = ((0.0, 0.0), (10.0, 5.0)) if smoke else ((0.0, 0.0), (10.0, 0.0), (0.0, 3.0), (10.0, 5.0))
    shapes = [(1, 80, 2, 1, 16, "fp16")] if smoke else [(2, T, 4, 2, D, "bf16") for T in (256, 2048) for D in (64, 128)]
    specs = []
    for B, T, H, H_kv, D, dtype in shapes:
        for v_offset, k_offset in offsets:
            pair = first_idx + len(specs)
            for recompute in (False, True):
                specs.append(Spec(first_idx + len(specs), B, T, H, H_kv, D, dtype, None, 1.0, "auto",
                                  v_offset, k_offset, recompute, inputs_of=pair))  # fmt: skip
    return specs


def smoke_specs() -> list[Spec]:
    return [
        Spec(0, 2, 7, 4, 2, 8, "fp32", None, 1.0, "auto"),
        Spec(1, 1, 33, 2, 1, 16, "fp16", None, 1.0, "auto"),
        Spec(2, 1, 20, 2, 2, 32, "fp32", 0.3, 4.0, "auto"),
    ]


def run(args: argparse.Namespace) -> int:
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are built (at import)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import torch
    import torch.nn.functional as F
    import triton

    from kernels.parallax import parallax_attention
    from kernels.parallax import triton as tri
    from kernels.parallax.reference import parallax_attention as reference
    from kernels.testing import nan_filled_empty

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if args.cpu_smoke:
        device, specs = torch.device("cpu"), smoke_specs()
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on the GPU, or use --cpu-smoke", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        device = torch.device("cuda")
        specs = make_specs(args.n_shapes, args.seed, lambda D, dt: most_candidates(tri, D, dtypes[dt]))

    def check(spec: Spec) -> dict:
        dtype = dtypes[spec.dtype]
        gen = torch.Generator(device=device).manual_seed(args.seed * 100_003 + (spec.idx if spec.inputs_of is None else spec.inputs_of))

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

        D = spec.D
        q = F.rms_norm(randn(spec.B, spec.T, spec.H, D), (D,))
        r = spec.r_scale * F.rms_norm(randn(spec.B, spec.T, spec.H, D), (D,))
        k = randn(spec.B, spec.T, spec.H_kv, D)
        if spec.k_offset:
            k = k + spec.k_offset * F.rms_norm(randn(1, 1, spec.H_kv, D), (D,))
        k = F.rms_norm(k, (D,))
        v = randn(spec.B, spec.T, spec.H_kv, D) + spec.v_offset
        g = randn(spec.B, spec.T, spec.H, D)
        inputs = [x.to(dtype) for x in (q, r, k, v)]
        g = g.to(dtype)
        leaves = [x.clone().requires_grad_() for x in inputs]
        stats_min_keys = tri.STATS_MIN_KEYS
        with nan_filled_empty(), contextlib.ExitStack() as undo:
            if spec.recompute:
                tri.STATS_MIN_KEYS = 1 << 30
                undo.callback(setattr, tri, "STATS_MIN_KEYS", stats_min_keys)
            if spec.configs == "auto":
                out = parallax_attention(*leaves, scale=spec.scale, impl="triton")
            else:
                idx = [int(i) for i in spec.configs.split(",")]
                configs = {kind: forced_config(tri.candidate_configs(kind, D, dtype), i)
                           for kind, i in zip(KERNEL_KINDS, idx)}
                out = tri.parallax_attention_triton(*leaves, scale=spec.scale, configs=configs)
            grads = torch.autograd.grad(out, leaves, g)
        ref_leaves = [x.double().requires_grad_() for x in inputs]
        ref = reference(*ref_leaves, scale=spec.scale)
        ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
        got, want = (out, *grads), (ref, *ref_grads)
        # Relative to max|ref|, floored at 1e-2 of the largest reference gradient. A gradient that is 0 in exact
        # arithmetic (dq, dr, dk with a single key, T_k = 1; the float64 reference gives ~1e-17) has no relative
        # error: it is judged in absolute terms, against the largest reference gradient.
        largest = max(x.abs().max().item() for x in ref_grads)
        row = {"finite": all(bool(torch.isfinite(x).all()) for x in got)}
        for name, x, y in zip(TENSORS, got, want):
            size = y.abs().max().item()
            if name == "o":
                denom = max(size, 1e-30)
            else:
                denom = largest if size <= 1e-12 * largest else max(size, 1e-2 * largest)
            row[name] = ((x.double() - y).abs().max().item()) / denom
        return row

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if device.type == "cuda" and not args.no_precompile:
        # Build every (kernel, head_dim, dtype, tile config) binary in parallel threads first (see the benchmark).
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        try:
            from bench_parallax_train import precompile

            calls = []
            for D in HEAD_DIMS:
                for name, dtype in dtypes.items():
                    cands = {kind: tri.candidate_configs(kind, D, dtype) for kind in KERNEL_KINDS}
                    for i in range(most_candidates(tri, D, dtype)):
                        configs = {kind: forced_config(c, i) for kind, c in cands.items()}

                        def call(D=D, dtype=dtype, configs=configs):
                            q, r, k, v = (torch.randn(1, 64, h, D, device=device, dtype=dtype).requires_grad_()
                                          for h in (2, 2, 1, 1))
                            out = tri.parallax_attention_triton(q, r, k, v, configs=configs)
                            torch.autograd.grad(out, (q, r, k, v), torch.randn_like(out))

                        calls.append((f"D={D} {name} config {i}", call))
            tuners = [tri._fwd_kernel, tri._bwd_dq_kernel, tri._bwd_dkv_kernel]
            print("precompile:", precompile(calls, tuners), f"({time.time() - start:.1f}s)", flush=True)
        except Exception as err:
            print(f"precompile failed ({type(err).__name__}: {err}); kernels compile lazily", flush=True)

    def run_spec(spec: Spec) -> dict:
        t0 = time.time()
        row = {"idx": spec.idx, **asdict(spec), "label": spec.label()}
        try:
            row.update(check(spec))
            worst = max(row[n] for n in TENSORS)
            row["passed"] = bool(row["finite"] and worst < TOL[spec.dtype])
            row["error"] = "" if row["finite"] else "NaN/inf in output or gradients"
        except Exception as err:  # one failing shape must not stop the others
            row.update({n: float("nan") for n in TENSORS}, finite=False, passed=False)
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            traceback.print_exc()
        row["seconds"] = time.time() - t0
        errs = " ".join(f"{n}={row[n]:.1e}" for n in TENSORS)
        print(f"[{spec.idx + 1:3d}] {'ok  ' if row['passed'] else 'FAIL'} {spec.label()}  {errs}  "
              f"{row['seconds']:.2f}s {row['error']}", flush=True)
        if device.type == "cuda" and spec.B * spec.H * spec.T * spec.T > REF_CAP // 8:
            torch.cuda.empty_cache()
        return row

    def context_lost(row: dict) -> bool:
        return "CUDA error" in row["error"] or "illegal memory access" in row["error"]

    rows: list[dict] = []
    aborted = ""
    checking = time.time()  # the budget is for checking: a precompile that ran long must not leave no shape checked
    for spec in specs:
        if time.time() - checking > args.budget_s:
            aborted = f"time budget of {args.budget_s:.0f} s reached after {len(rows)} of {len(specs)} shapes"
            print(aborted, flush=True)
            break
        rows.append(run_spec(spec))
        if context_lost(rows[-1]):
            aborted = f"CUDA context lost at shape {spec.idx} ({spec.label()}): the remaining shapes were not run"
            print(aborted, flush=True)
            break
        if len(rows) % 10 == 0:  # a killed run still leaves its rows behind
            write_csv(out_dir / "parallax_triton_check.csv", rows)
    offset_rows = []
    if not aborted.startswith("CUDA context lost"):
        for spec in offset_specs(len(specs), args.cpu_smoke):
            offset_rows.append(run_spec(spec))
            if context_lost(offset_rows[-1]):
                break

    write_csv(out_dir / "parallax_triton_check.csv", rows + offset_rows)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'}), Triton interpreter"
    md = report(rows, len(specs), aborted, time.time() - start, device_name,
                {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()})
    md += offset_report(offset_rows)
    (out_dir / "parallax_triton_check.md").write_text(md)
    print(md)
    return 0 if rows and all(r["passed"] for r in rows) and not aborted else 1


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = ["idx", "B", "T", "H", "H_kv", "D", "dtype", "scale", "r_scale", "configs", "v_offset", "k_offset",
              "recompute", *TENSORS, "finite", "passed", "seconds", "error"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def report(rows: list[dict], n_planned: int, aborted: str, seconds: float, device: str, versions: dict) -> str:
    passed = sum(r["passed"] for r in rows)
    lines = [
        "# Parallax Triton kernels vs float64 reference",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- device: {device}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- command: `{' '.join(sys.argv)}`",
        "- error: max-norm relative, max|x - ref| / max|ref| (gradients floored at 1e-2 of the largest reference "
        "gradient; gradients that are 0 in exact arithmetic, dq/dr/dk at T_k = 1, measured against the largest "
        "reference gradient); pass: < 1e-2 (bf16, fp16), < 1e-4 (fp32), and no NaN/inf; outputs NaN-poisoned before each launch",
        f"- shapes run: {len(rows)} of {n_planned} planned, in {seconds:.0f} s" + (f" -- **{aborted}**" if aborted else ""),
        "",
        "| dtype | shapes | passed | failed | worst o | worst dq | worst dr | worst dk | worst dv | max T | tolerance |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dtype in ("bf16", "fp16", "fp32", "all"):
        sel = [r for r in rows if dtype in ("all", r["dtype"])]
        if not sel:
            continue
        worst = [max((r[n] for r in sel if math.isfinite(r[n])), default=float("nan")) for n in TENSORS]
        tol = "-" if dtype == "all" else f"{TOL[dtype]:.0e}"
        n_pass = sum(r["passed"] for r in sel)
        lines.append(f"| {dtype} | {len(sel)} | {n_pass} | {len(sel) - n_pass} | "
                     + " | ".join(f"{w:.2e}" for w in worst) + f" | {max(r['T'] for r in sel)} | {tol} |")
    lines += ["", f"**{'ALL PASSED' if passed == len(rows) and rows and not aborted else 'FAILURES'}**: "
              f"{passed}/{len(rows)} shapes passed.", ""]
    by_dim = {}
    for r in rows:
        by_dim.setdefault((r["dtype"], r["D"]), []).append(r)
    lines += ["| dtype | head_dim | shapes | worst error (any tensor) | worst shape |", "| --- | ---: | ---: | ---: | --- |"]
    for (dtype, D), sel in sorted(by_dim.items()):
        worst_row = max(sel, key=lambda r: max((r[n] for n in TENSORS if math.isfinite(r[n])), default=-1))
        w = max((worst_row[n] for n in TENSORS if math.isfinite(worst_row[n])), default=float("nan"))
        lines.append(f"| {dtype} | {D} | {len(sel)} | {w:.2e} | {worst_row['label']} |")
    failures = [r for r in rows if not r["passed"]]
    lines += ["", "## Failures", ""]
    if not failures:
        lines.append("None.")
    for r in failures:
        errs = ", ".join(f"{n}={r[n]:.2e}" for n in TENSORS)
        lines.append(f"- FAIL shape {r['idx']}: {r['label']}: {errs}" + (f"; {r['error']}" if r["error"] else ""))
    return "\n".join(lines) + "\n"


def offset_report(rows: list[dict]) -> str:
    """The offset study: per case, the worst dq/dr/dk error with saved row statistics and with recomputed ones."""
    lines = ["", "## Offset inputs: row statistics from the saved copies vs recomputed (not part of pass/fail)", ""]
    if not rows:
        return "\n".join(lines + ["Not run (the check stopped early).", ""])
    lines += ["| T | D | dtype | v offset | k offset | saved: dq / dr / dk | recomputed: dq / dr / dk | worst, saved / recomputed |",
              "| ---: | ---: | --- | ---: | ---: | --- | --- | ---: |"]  # fmt: skip
    key = lambda r: (r["T"], r["D"], r["dtype"], r["v_offset"], r["k_offset"])  # noqa: E731
    pairs = {}
    for r in rows:
        pairs.setdefault(key(r), {})[r["recompute"]] = r
    for (T, D, dtype, v_off, k_off), pair in pairs.items():
        if len(pair) < 2:
            continue
        cells = [" / ".join(f"{pair[rec][n]:.1e}" for n in ("dq", "dr", "dk")) for rec in (False, True)]
        worst = [max(pair[rec][n] for n in ("dq", "dr", "dk")) for rec in (False, True)]
        lines.append(f"| {T} | {D} | {dtype} | {v_off:g} | {k_off:g} | {cells[0]} | {cells[1]} | "
                     f"{worst[0] / worst[1]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
