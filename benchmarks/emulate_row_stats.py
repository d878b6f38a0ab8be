"""Where the backward's row statistics b = g.v_bar and t = g.o come from, and what it does to dq, dr and dk: a
float64 emulation of the Triton backward's arithmetic on the CPU (no GPU, no Triton).

    PYTHONPATH=. python benchmarks/emulate_row_stats.py [--out analysis/kernels/] [--seeds 4]

dS = p [a - t + (u_bar - u)(a - b)] and dU = -p (a - b) sum to zero over each row's keys, so dq, dr and dk are sums of
terms that cancel, and any mismatch between b, t and the p, u, a that the backward recomputes is amplified. The Triton
kernel used to compute b and t in a first pass over the keys from those very p, u, a (three extra dots per key tile of
the dq kernel). The alternative, which the official Parallax kernel takes, saves o and v_bar from the forward and
computes b and t elementwise, dropping that pass; `kernels/parallax/triton.py` now does so for bf16 inputs with fp16
copies (less the first key's value) where a query tile's rows all see 64 keys or more, as this table suggested. This
script measures what each source of (b, t) costs in accuracy, with the error measure and the 1e-2 bf16 tolerance of
benchmarks/check_parallax_triton.py.

Emulated arithmetic, per variant: bf16 inputs (RMS-normalised q, r, k; r scaled by 1, 4 or 8; normal v and g);
p, u, a and u_bar in fp32 (exact products, then rounded); dS and dU rounded to bf16 before the fp32-accumulated dots
with k, q and r, as the kernel's `ds.to(k.dtype)`. The reference is the same formulas in float64 without roundings.
Variants of (b, t): `recomputed` (the kernel's pass), and g.v_bar, g.o from saved copies of v_bar and o in bf16
(the official kernel), and in fp16 scaled per row by the row's largest |value| (so that nothing overflows), alone
or with the first query tile's rows (which see the fewest keys) recomputed, and (the kernel's choice for bf16 inputs)
fp16 copies of o - v_0 and v_bar - v_0 (v_0: the first key's value, g.v_0 added back) with the first tile
recomputed. `--offset V K` adds V to every value and K times a common unit-RMS direction to the keys before they
are normalised: inputs that share offsets, where copies without the shift round at the offset's scale.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VARIANTS = ("recomputed", "saved bf16", "saved fp16", "saved fp16, first tile recomputed",
            "saved fp16 less v_0, first tile recomputed")
FIRST_TILE = 64  # rows 0..63: the query tile whose rows see the fewest keys
TOLERANCE = 1e-2  # check_parallax_triton.py's bf16 tolerance
LENGTHS = (2, 3, 4, 5, 6, 8, 12, 16, 32, 64, 128, 256)
HEAD_DIMS = (8, 16, 32, 64, 128)
PROBE_SCALES = (1.0, 4.0, 8.0)
LOGIT_SCALES = (1.0, 4.0)  # q multiplied by this: 4 gives peaked attention (logits of standard deviation ~4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="analysis/kernels/", help="directory for the Markdown table (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=4,
                   help="random draws per (length, head dim, probe scale, q scale) (default: %(default)s)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="sequence lengths (>= 2: at length 1 "
                   "dq, dr and dk are 0 in exact arithmetic)")
    p.add_argument("--offset", type=float, nargs=2, default=(0.0, 0.0), metavar=("V", "K"),
                   help="value offset and key offset (see the docstring; default: none)")
    return p.parse_args(argv)


def _saved_fp16(x: torch.Tensor) -> torch.Tensor:
    """x `[..., D]` saved in fp16 scaled by its row's largest |value|, back in float64."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    return (x / scale).to(torch.float16).double() * scale


def row_stats(variant: str, p, u, a, u_bar, g, o, v_bar, v_0) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, t) `[B, H, T, 1]` as `variant` computes them (fp32 values in float64 tensors); v_0 `[B, H, 1, D]`."""
    f32 = lambda x: x.float().double()  # noqa: E731
    pa = f32(f32(p) * f32(a))
    recomputed = f32(pa.sum(-1, keepdim=True)), f32((pa * (1 + f32(u_bar) - f32(u))).sum(-1, keepdim=True))
    if variant == "recomputed":
        return recomputed
    save = (lambda x: x.to(torch.bfloat16).double()) if variant == "saved bf16" else _saved_fp16
    shift = v_0 if "less v_0" in variant else torch.zeros_like(v_0)
    g_shift = f32((g * shift).sum(-1, keepdim=True))
    saved = tuple(f32(f32((g * save(x - shift)).sum(-1, keepdim=True)) + g_shift) for x in (v_bar, o))
    if "first tile recomputed" in variant:
        first = torch.arange(p.shape[-2])[:, None] < FIRST_TILE
        return tuple(torch.where(first, r, s) for r, s in zip(recomputed, saved))
    return saved


def case_errors(T: int, D: int, r_scale: float, q_scale: float, seed: int, offset: tuple[float, float] = (0.0, 0.0),
                H: int = 2) -> dict[str, float]:
    """Worst max-norm relative error of dq, dr, dk per variant for one random draw `[1, T, H, D]`."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(1, H, T, D, generator=gen, dtype=torch.float64)  # noqa: E731
    bf16 = lambda x: x.to(torch.bfloat16).double()  # noqa: E731
    q, k = bf16(q_scale * F.rms_norm(rnd(), (D,))), rnd()
    r = bf16(r_scale * F.rms_norm(rnd(), (D,)))
    v, g = bf16(rnd() + offset[0]), bf16(rnd())
    if offset[1]:
        k = k + offset[1] * F.rms_norm(torch.randn(1, H, 1, D, generator=gen, dtype=torch.float64), (D,))
    k = bf16(F.rms_norm(k, (D,)))
    c = D**-0.5
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    p = torch.softmax((c * q @ k.mT).masked_fill(~visible, -math.inf), -1)
    u = (r @ k.mT).masked_fill(~visible, 0.0)
    u_bar = (p * u).sum(-1, keepdim=True)
    v_bar = p @ v
    o = v_bar * (1 + u_bar) - (p * u) @ v
    a = g @ v.mT

    def grads(p, u, a, u_bar, b, t, rounded: bool):
        ds = p * (a - t + (u_bar - u) * (a - b))
        du = -p * (a - b)
        if rounded:  # fp32 elementwise, bf16 dot operands, fp32 accumulation
            ds, du = (bf16(x.float().double()) for x in (ds, du))
        return c * ds @ k, du @ k, c * ds.mT @ q + du.mT @ r

    exact = grads(p, u, a, u_bar, (g * v_bar).sum(-1, keepdim=True), (g * o).sum(-1, keepdim=True), False)
    f32 = lambda x: x.float().double()  # noqa: E731
    p32, u32, a32, ub32 = f32(p), f32(u), f32(a), f32(u_bar)
    errors = {}
    for variant in VARIANTS:
        b, t = row_stats(variant, p, u, a, u_bar, g, o, v_bar, v[:, :, :1])
        got = grads(p32, u32, a32, ub32, b, t, True)
        errors[variant] = max(((x - ref).abs().max() / ref.abs().max()).item() for x, ref in zip(got, exact))
    return errors


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for T in args.lengths:
        for D in HEAD_DIMS:
            for r_scale in PROBE_SCALES:
                for q_scale in LOGIT_SCALES:
                    for seed in range(args.seeds):
                        rows.append({"T": T, "D": D, "r_scale": r_scale, "q_scale": q_scale,
                                     **case_errors(T, D, r_scale, q_scale, seed, tuple(args.offset))})
    return rows


def report(rows: list[dict], args: argparse.Namespace, argv: list[str]) -> str:
    def worst(variant: str, keep) -> str:
        errs = [row[variant] for row in rows if keep(row)]
        return f"{max(errs):.2e}" if errs else "-"

    short = lambda row: row["T"] <= 4  # noqa: E731
    peaked = lambda row: row["T"] >= 64 and row["q_scale"] > 1  # noqa: E731
    long_ = lambda row: row["T"] >= 64  # noqa: E731
    command = " ".join(["PYTHONPATH=. python benchmarks/emulate_row_stats.py", *argv])
    scales = lambda values: ", ".join(f"{v:g}" for v in values)  # noqa: E731
    lines = [
        "# The backward's row statistics b and t: recomputed against saved o and v_bar (float64 emulation)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU only; "
        f"torch {torch.__version__}",
        f"- command: `{command}`",
        f"- cases: {len(rows)} (lengths {scales(args.lengths)}; head dims {scales(HEAD_DIMS)}; probes at "
        f"{scales(PROBE_SCALES)}x RMS; q at {scales(LOGIT_SCALES)}x RMS (peaked attention); {args.seeds} draws each; "
        f"B=1, H=2; value offset {args.offset[0]:g}, key offset {args.offset[1]:g})",
        "- error: max-norm relative error of dq, dr and dk against float64 (the worst of the three), as "
        "benchmarks/check_parallax_triton.py measures it; the emulated arithmetic is in the script's docstring",
        "",
        "| (b, t) from | worst, all | worst, T <= 4 | worst, T >= 64 | worst, T >= 64, peaked | "
        f"cases over {TOLERANCE:g} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant in VARIANTS:
        over = sum(row[variant] > TOLERANCE for row in rows)
        lines.append(f"| {variant} | {worst(variant, lambda row: True)} | {worst(variant, short)} | "
                     f"{worst(variant, long_)} | {worst(variant, peaked)} | {over} of {len(rows)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if min(args.lengths) < 2:
        raise SystemExit("--lengths must be >= 2: at length 1 dq, dr and dk are 0 in exact arithmetic")
    text = report(run(args), args, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if not any(args.offset) else "_offset_v{:g}_k{:g}".format(*args.offset)
    (out / f"parallax_row_stats_emulation{suffix}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
