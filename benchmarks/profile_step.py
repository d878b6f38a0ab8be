"""Where one training step's device time goes: torch.profiler over the eager step of one run and of a stack of N.

    PYTHONPATH=. python benchmarks/profile_step.py --out analysis/throughput/

For each attention (the MAD model, batch 128, AdamW, bf16 autocast on GPU) it profiles 5 steps after warm-up of
(a) one run, the loop of mad/train.py, (b) N runs as one stack (mad/stacked_train.py, eager: the profiler sees
each kernel) and, on GPU, (c) that stack with its forward under torch.compile, and writes the kernels with the most
device time per step. Reuses the step builders of benchmarks/bench_throughput.py. On the CPU (no GPU) it profiles
CPU time at batch 16, to test the script.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_throughput import SMOKE_BATCH, SMOKE_OVERRIDES, compose_cfg, eager_step_fn, stacked_step_fn  # noqa: E402

STEPS = 5


def profile_steps(step, device: torch.device):
    """key_averages of STEPS steps (after 5 warm-up steps) and the number of kernels launched per step."""
    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(STEPS):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages()


def table(events, device: torch.device, top: int) -> tuple[list[str], float, float]:
    """Markdown rows of the `top` kernels by device time per step; total device ms and kernel count per step."""
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        time_of = lambda e: e.self_device_time_total  # noqa: E731 - µs over all steps
    else:
        kernels = [e for e in events if e.key.startswith("aten::")]
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    kernels.sort(key=time_of, reverse=True)
    total = sum(time_of(e) for e in kernels) / STEPS / 1e3
    count = sum(e.count for e in kernels) / STEPS
    rows = [f"| {e.key[:90].replace('|', '/')} | {e.count / STEPS:.0f} | {time_of(e) / STEPS / 1e3:.3f} | "
            f"{100 * time_of(e) / STEPS / 1e3 / max(total, 1e-9):.1f} |" for e in kernels[:top]]  # fmt: skip
    return rows, total, count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "analysis" / "throughput")
    p.add_argument("--attentions", default="softmax,parallax")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    unit = "device" if device.type == "cuda" else "CPU (no GPU: a script test, not a measurement)"
    overrides = () if device.type == "cuda" else SMOKE_OVERRIDES
    lines = ["# Where a training step's time goes", "",
             f"- device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}, "
             f"Python {platform.python_version()}; date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `PYTHONPATH=. python benchmarks/profile_step.py {' '.join(argv or sys.argv[1:])}`",
             f"- {unit} time per step, from torch.profiler over {STEPS} eager steps after warm-up; MAD model, "
             f"batch {128 if device.type == 'cuda' else SMOKE_BATCH}, L={args.seq_len}, AdamW", ""]  # fmt: skip
    for attention in args.attentions.split(","):
        cfg = compose_cfg(attention, args.seq_len, *overrides)
        variants = [("one run", eager_step_fn(cfg, device, False)),
                    (f"stack of {args.runs}", stacked_step_fn(cfg, device, args.runs, graph=False)[0])]  # fmt: skip
        if device.type == "cuda":  # inductor's fused kernels, which the launcher's compile switch replays in a graph
            step = stacked_step_fn(cfg, device, args.runs, graph=False, compiled=True)[0]
            variants.append((f"stack of {args.runs}, compiled", step))
        for name, step in variants:
            rows, total, count = table(profile_steps(step, device), device, args.top)
            lines += [f"## {attention}, {name}: {total:.3f} ms in {count:.0f} kernels per step", "",
                      "| kernel | calls per step | ms per step | % |", "| --- | ---: | ---: | ---: |", *rows, ""]  # fmt: skip
            print("\n".join(lines[-len(rows) - 5:]), flush=True)
    (args.out / f"step_profile_L{args.seq_len}.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
