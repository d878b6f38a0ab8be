"""What one call of the mechanism diagnostics costs, and where its time goes: wall time, then torch.profiler.

    PYTHONPATH=. python benchmarks/profile_diagnostics.py --out analysis/throughput/

With `diagnostics=true` (the optimizer study) `mad.diagnostics.model_diagnostics` runs once per run and epoch. On the
H200 it took ~38 % of a 9-run stack's wall time (in-context recall, softmax + AdamW: 317 s wall, 197 s of epochs;
analysis/optimizer_study/records.tar.gz) while stable ranks were float64 SVDs on the GPU; the committed table
(analysis/throughput/diagnostics_profile.md) notes that profile beside the one after they moved to the host. For each
attention this times the call on the MAD model (L=128, its fixed
batch of 64 test sequences, fresh weights) and lists the operators with the most host time (syncs show up there)
and, on a GPU, the kernels with the most device time. Reuses the profiling of benchmarks/profile_step.py.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from bench_throughput import compose_cfg, make_batch, synchronize  # noqa: E402
from mad.diagnostics import model_diagnostics  # noqa: E402
from mad.run import build_model  # noqa: E402
from profile_step import STEPS, profile_steps, table  # noqa: E402

WALL_CALLS = 10


def median_ms(fn, device: torch.device) -> float:
    """Median wall milliseconds of WALL_CALLS calls, each synchronised (after profile_steps' warm-up)."""
    times = []
    for _ in range(WALL_CALLS):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "analysis" / "throughput")
    p.add_argument("--attentions", default="softmax,parallax,parallax_gated")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=64, help="diagnostics batch (conf/config.yaml: diagnostics_batch)")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (no GPU: a script test, not a measurement)"
    lines = ["# Where a call of the mechanism diagnostics spends its time", "",
             f"- device: {name}; torch {torch.__version__}, Python {platform.python_version()}; "
             f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `PYTHONPATH=. python benchmarks/profile_diagnostics.py {' '.join(argv or sys.argv[1:])}`",
             f"- `model_diagnostics` on the MAD model (L={args.seq_len}, {args.batch} sequences, fresh weights): wall "
             f"time as the median of {WALL_CALLS} synchronised calls after warm-up; operators from torch.profiler over "
             f"{STEPS} calls, per call", ""]  # fmt: skip
    for attention in args.attentions.split(","):
        cfg = compose_cfg(attention, args.seq_len)
        model = build_model(cfg).to(device)
        inputs = make_batch(cfg, device)[0][: args.batch]

        def call():
            model_diagnostics(model, inputs)

        events = profile_steps(call, device)
        lines += [f"## {attention}: {median_ms(call, device):.1f} ms per call", ""]
        views = [("host", torch.device("cpu"))] + ([("device", device)] if device.type == "cuda" else [])
        for view, where in views:
            rows, total, count = table(events, where, args.top)
            lines += [f"{view} time: {total:.1f} ms in {count:.0f} operators per call", "",
                      "| operator | calls per call | ms per call | % |", "| --- | ---: | ---: | ---: |", *rows, ""]  # fmt: skip
        print("\n".join(lines), flush=True)
    (args.out / "diagnostics_profile.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
