"""Check Parallax decode kernels against a float64 reference on random shapes (GPU), or smoke-test on CPU.

    python benchmarks/check_parallax_decode.py [--out analysis/kernels] [--shapes 200] [--impls triton,cute]
    python benchmarks/check_parallax_decode.py --cpu-smoke --out /tmp/x   # Triton under the interpreter, fp32

For every impl that can run here, each shape draws batch, cache length (not a multiple of any tile), ragged
cache_seqlens, GQA group, head_dim in {64, 128} and a forced split count (or the automatic one); inputs are
RMS-scale bf16, the cache past each valid prefix is NaN, and every allocation in the call returns NaN-filled
memory (so an unwritten output or a read past the prefix shows up). Each call is issued twice back to back, with
no sync between. Pass: max-norm relative error < 1e-2, no NaN, and the second call's output equal to the first's.
A few rows use an adversarially large probe (|r| x 8) and are reported apart, outside the pass criterion.
Impls: those of parallax_decode, plus "triton_1launch" and "triton_2launch", the Triton kernel with each of its
split merges forced (`triton_decode(merge="atomic" | "kernel")`, called directly with the default scale).
Writes `<out>/parallax_decode_check.md`; exits 1 if any checked row fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-2
TRITON_MERGE_IMPLS = {"triton_1launch": "atomic", "triton_2launch": "kernel"}  # impl -> triton_decode(merge=)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "analysis" / "kernels"), help="folder for parallax_decode_check.md")
    p.add_argument("--shapes", type=int, default=200, help="random shapes per impl (>= 200 for the record)")
    p.add_argument("--adversarial", type=int, default=8, help="extra shapes with |r| x 8 (reported apart)")
    p.add_argument("--impls", default="triton,triton_1launch,triton_2launch,cute",
                   help="comma-separated impls to check when available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-smoke", action="store_true", help="run the Triton impl under TRITON_INTERPRET=1 at 2 tiny fp32 shapes")
    return p.parse_args(argv)


def draw_shape(rng: random.Random, impl: str, max_splits: int, cpu: bool) -> dict:
    D = rng.choice([64, 128])
    group = rng.choice([1, 2, 4, 8])
    H_kv = rng.choice([1, 2, 4, 8]) if not cpu else rng.choice([1, 2])
    B = rng.choice([1, 2, 3, 5, 8, 16, 33]) if not cpu else 2
    L = rng.choice([1, 7, 31, 33, 63, 65, 97, 129, 200, 257, 511, 777, 1000, 2049, 4097, 6001]) if not cpu else rng.choice([37, 70])
    splits = rng.choice([None, None, 1, 2, 3, 5, 8, 16, max_splits])
    return dict(B=B, H=group * H_kv, H_kv=H_kv, L=L, D=D, splits=splits, ragged=rng.random() < 0.75, r_scale=1.0)


def make_case(torch, shape: dict, dtype, device, gen):
    B, H, H_kv, L, D = (shape[k] for k in ("B", "H", "H_kv", "L", "D"))
    q, r = (torch.randn(B, 1, H, D, generator=gen, device=device) for _ in range(2))
    k, v = (torch.randn(B, L, H_kv, D, generator=gen, device=device) for _ in range(2))
    r = r * (0.3 * shape["r_scale"])
    lens = None
    if shape["ragged"]:
        lens = torch.randint(1, L + 1, (B,), generator=gen, device=device, dtype=torch.int32)
        lens[0] = L
        for b, n in enumerate(lens.tolist()):
            k[b, n:] = float("nan")
            v[b, n:] = float("nan")
    return q.to(dtype), r.to(dtype), k.to(dtype), v.to(dtype), lens


def reference(torch, q, r, k, v, lens):
    from kernels.parallax.reference import parallax_attention

    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(q.shape[0]):
        n = k.shape[1] if lens is None else int(lens[b])
        out[b : b + 1] = parallax_attention(q[b : b + 1].double(), r[b : b + 1].double(),
                                            k[b : b + 1, :n].double(), v[b : b + 1, :n].double())
    return out


def available_impls(torch, wanted: list[str], cpu: bool) -> dict[str, str]:
    """impl -> '' if it can run here, else the reason it is skipped."""
    from kernels.parallax.decode import cute_available

    status = {}
    for impl in wanted:
        if impl == "triton" or impl in TRITON_MERGE_IMPLS:
            status[impl] = "" if (torch.cuda.is_available() or cpu) else "no CUDA device"
        elif impl == "cute":
            ok, why = (False, "CPU smoke runs Triton only") if cpu else cute_available()
            status[impl] = "" if ok else why
        else:
            status[impl] = f"unknown impl {impl!r}"
    return status


def call_impl(impl: str, q, r, k, v, lens, splits):
    """One decode call: parallax_decode, or triton_decode with a forced merge for the TRITON_MERGE_IMPLS."""
    from kernels.parallax.decode import parallax_decode, triton_decode

    if impl in TRITON_MERGE_IMPLS:
        return triton_decode(q, r, k, v, cache_seqlens=lens, scale=q.shape[-1] ** -0.5, num_splits=splits,
                             merge=TRITON_MERGE_IMPLS[impl])
    return parallax_decode(q, r, k, v, cache_seqlens=lens, impl=impl, num_splits=splits)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, str(REPO))
    import torch

    from kernels.parallax.decode import MAX_SPLITS
    from kernels.testing import nan_filled_empty

    cpu = args.cpu_smoke
    if not cpu and not torch.cuda.is_available():
        print("no CUDA device: run on the GPU machine, or use --cpu-smoke")
        return 2
    device = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else torch.bfloat16  # the interpreter gets bf16 wrong
    n_shapes, n_adv = (2, 0) if cpu else (args.shapes, args.adversarial)
    status = available_impls(torch, [s.strip() for s in args.impls.split(",") if s.strip()], cpu)
    for impl, why in status.items():
        print(f"{impl}: {'checking' if not why else 'skipped: ' + why}", flush=True)

    rows = []
    t0 = time.time()
    for impl, why in status.items():
        if why:
            continue
        rng = random.Random(f"{args.seed}/{impl}")
        gen = torch.Generator(device=device).manual_seed(args.seed)
        shapes = [draw_shape(rng, impl, MAX_SPLITS, cpu) for _ in range(n_shapes)]
        for _ in range(n_adv):
            shapes.append(draw_shape(rng, impl, MAX_SPLITS, cpu) | {"r_scale": 8.0})
        for i, shape in enumerate(shapes):
            row = dict(impl=impl, **shape, err=float("nan"), nan=False, repeat_ok=False, ok=False, error="")
            try:
                q, r, k, v, lens = make_case(torch, shape, dtype, device, gen)
                ref = reference(torch, q, r, k, v, lens)
                with nan_filled_empty():
                    out, again = (call_impl(impl, q, r, k, v, lens, shape["splits"]) for _ in range(2))
                if not cpu:
                    torch.cuda.synchronize()
                row["nan"] = bool(out.isnan().any())
                row["err"] = float((out.double() - ref).abs().max() / ref.abs().max())
                row["repeat_ok"] = bool(torch.equal(out, again))
                row["ok"] = (not row["nan"] and row["err"] < TOL and row["repeat_ok"] and out.shape == q.shape
                             and out.dtype == q.dtype)
            except Exception as err:  # noqa: BLE001 - record the failure and go on with the other shapes
                row["error"] = f"{type(err).__name__}: {err}"[:300]
                traceback.print_exc()
            rows.append(row)
            if i % 40 == 0 or not row["ok"]:
                print(f"[{impl} {i + 1}/{len(shapes)}] {shape} err={row['err']:.2e} nan={row['nan']} "
                      f"repeat_ok={row['repeat_ok']} ok={row['ok']} "
                      f"{row['error']}", flush=True)
    write_report(args, torch, status, rows, time.time() - t0, cpu)
    failed = [r for r in rows if not r["ok"] and r["r_scale"] <= 1.0]
    print(f"{len(rows)} rows, {len(failed)} failed (checked rows), report in {args.out}")
    return 1 if failed else 0


def versions(torch) -> str:
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for dist in ("triton", "nvidia-cutlass-dsl", "cuda-bindings"):
        try:
            parts.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            parts.append(f"{dist} absent")
    return ", ".join(parts)


def write_report(args, torch, status, rows, seconds, cpu) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not cpu else "CPU (Triton interpreter)"
    lines = [
        "# Parallax decode: kernels vs float64 reference",
        "",
        f"* date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device: {device}",
        f"* versions: {versions(torch)}",
        f"* command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"* dtype {'fp32 (interpreter)' if cpu else 'bf16'}; pass: max-norm relative error < {TOL:g}, no NaN, a second "
        "back-to-back call equal to the first; "
        f"outputs and workspaces NaN-poisoned, cache NaN past each prefix; {seconds:.0f} s",
        "",
        "| impl | status | shapes | pass | max err | median err | NaN | repeat differs | errors | adversarial r (x8): max err |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for impl, why in status.items():
        mine = [r for r in rows if r["impl"] == impl and r["r_scale"] <= 1.0]
        adv = [r for r in rows if r["impl"] == impl and r["r_scale"] > 1.0]
        if why:
            lines.append(f"| {impl} | skipped: {why} | 0 | | | | | | | |")
            continue
        errs = sorted(r["err"] for r in mine if r["err"] == r["err"])
        adv_errs = [r["err"] for r in adv if r["err"] == r["err"]]
        lines.append(
            f"| {impl} | {'PASS' if mine and all(r['ok'] for r in mine) else 'FAIL'} | {len(mine)} | "
            f"{sum(r['ok'] for r in mine)} | {max(errs, default=float('nan')):.2e} | "
            f"{errs[len(errs) // 2] if errs else float('nan'):.2e} | {sum(r['nan'] for r in mine)} | "
            f"{sum(not r['repeat_ok'] and not r['error'] for r in mine)} | "
            f"{sum(bool(r['error']) for r in mine)} | {max(adv_errs, default=float('nan')):.2e} |"
        )
    bad = [r for r in rows if not r["ok"]]
    if bad:
        lines += ["", "## Failing rows (first 40)", "",
                  "| impl | B | H | H_kv | L | D | splits | ragged | r x | err | NaN | repeat equal | error |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | --- | --- | --- |"]
        for r in bad[:40]:
            lines.append(f"| {r['impl']} | {r['B']} | {r['H']} | {r['H_kv']} | {r['L']} | {r['D']} | {r['splits']} | "
                         f"{r['ragged']} | {r['r_scale']:g} | {r['err']:.2e} | {r['nan']} | {r['repeat_ok']} | "
                         f"{r['error'].replace('|', '/')} |")
    (out / "parallax_decode_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
