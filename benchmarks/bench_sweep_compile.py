"""Does `torch.compile` pay for itself in a real sweep? One setting's lr x wd grid trained by the stacked launcher
(CUDA graphs on), with `hydra.launcher.compile` off and on, timed end to end.

    PYTHONPATH=. python benchmarks/bench_sweep_compile.py --out analysis/throughput/ --epochs 30

For each attention and each compile switch it runs `python -m mad.run -m +sweep=mad mad_setting=SETTING ...
train.epochs=EPOCHS hydra/launcher=stacked hydra.launcher.compile=... hydra.launcher.compile_min_steps=0` (so that
a short sweep compiles) into a fresh directory and reads the records
back: the process's wall time, the first epoch's seconds (compile and graph capture happen there), the median of the
later epochs' seconds, and the projection to the protocol's 200 epochs (first + 199 x median) for a stack that
does not stop early. Accuracy after the last epoch is listed per run, to show that compiling does not change what
is learned beyond floating-point reordering. Writes <out>/sweep_compile.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "analysis" / "throughput")
    p.add_argument("--attentions", default="softmax,parallax")
    p.add_argument("--setting", default="in_context_recall__baseline", help="a conf/mad_setting name")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--optimizer", default="adamw")
    return p.parse_args(argv)


def run_sweep(args, attention: str, compile_on: bool, sweep_dir: Path) -> float:
    """Wall seconds of one sweep process (its output goes to sweep_dir/log.txt)."""
    cmd = [sys.executable, "-m", "mad.run", "-m", "+sweep=mad", f"mad_setting={args.setting}",
           f"attention={attention}", f"optimizer={args.optimizer}", f"train.epochs={args.epochs}",
           "hydra/launcher=stacked", f"hydra.launcher.compile={str(compile_on).lower()}",
           "hydra.launcher.compile_min_steps=0", "progress=false",  # compile even a short timing sweep
           f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    sweep_dir.mkdir(parents=True)
    started = time.perf_counter()
    with open(sweep_dir / "log.txt", "w") as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def summarise(sweep_dir: Path) -> dict:
    records = [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("result.json"))]
    if not records or any(r["status"] != "ok" for r in records):
        raise RuntimeError(f"{sweep_dir}: missing or failed records; see {sweep_dir / 'log.txt'}")
    longest = max(records, key=lambda r: len(r["history"]["seconds"]))["history"]["seconds"]
    first, later = longest[0], statistics.median(longest[1:])
    return {"runs": len(records), "first_epoch_s": first, "epoch_s": later, "projected_200_s": first + 199 * later,
            "accuracies": [round(r["history"]["test_accuracy"][-1], 4) for r in records]}  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for attention in args.attentions.split(","):
            for compile_on in (False, True):
                sweep_dir = Path(tmp) / f"{attention}-{compile_on}"
                try:
                    wall = run_sweep(args, attention, compile_on, sweep_dir)
                    rows.append({"attention": attention, "compile": compile_on, "wall_s": wall, **summarise(sweep_dir)})
                except (subprocess.CalledProcessError, RuntimeError) as e:  # reported in the table, with its log
                    tail = (sweep_dir / "log.txt").read_text().strip().splitlines()[-3:]
                    rows.append({"attention": attention, "compile": compile_on, "error": f"{e}; log: {' / '.join(tail)}"})
                print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = ["# torch.compile in a real sweep: one setting's grid, stacked, CUDA graphs", "",
             f"- device: {device}; torch {torch.__version__}, Python {platform.python_version()}; "
             f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `PYTHONPATH=. python benchmarks/bench_sweep_compile.py {' '.join(argv or sys.argv[1:])}`",
             f"- setting {args.setting}, {args.optimizer}, {args.epochs} epochs (no early stop within them unless "
             "listed); epoch seconds from the records (training and evaluation)", "",
             "| attention | compile | runs | process wall s | first epoch s | later epochs s (median) | "
             "projected 200 epochs s | accuracy after the last epoch |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['attention']} | {r['compile']} | failed: {r['error'][:400]} | | | | | |")
            continue
        lines.append(f"| {r['attention']} | {r['compile']} | {r['runs']} | {r['wall_s']:.1f} | {r['first_epoch_s']:.2f} | "
                     f"{r['epoch_s']:.3f} | {r['projected_200_s']:.0f} | {', '.join(map(str, r['accuracies']))} |")  # fmt: skip
    (args.out / "sweep_compile.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
