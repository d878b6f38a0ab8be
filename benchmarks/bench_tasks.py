"""Time the generation of the train and test sets of all 66 MAD settings (seed 12345).

Usage (from the repository root): ``.venv/bin/python benchmarks/bench_tasks.py [--out analysis/tasks/generation.md]``

Prints a Markdown table (one row per setting: task, setting, train/test sizes, seconds) and writes it, with the
machine (CPU model, core count), date, Python/torch/numpy versions and the exact command, to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mad.tasks import generate, task_settings  # noqa: E402
from mad.tasks.grid import generator_kwargs, mad_settings  # noqa: E402

SEED = 12345


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(task: str, setting: dict) -> str:
    """The keys that differ from the task baseline (``baseline`` if none)."""
    base = {**task_settings(task), "num_train_examples": 256 if task == "memorization" else 12800}
    changed = [f"{k}={v}" for k, v in setting.items() if k in base and base[k] != v]
    return ", ".join(changed) or "baseline"


def time_setting(task: str, setting: dict) -> float:
    kwargs = generator_kwargs(setting)
    start = time.perf_counter()
    generate(task, "train", setting["num_train_examples"], SEED, **kwargs)
    generate(task, "test", setting["num_test_examples"], SEED, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "analysis" / "tasks" / "generation.md"))
    args = parser.parse_args()

    generate("in_context_recall", "train", 2, SEED)  # warm-up (imports, allocator)
    rows = []
    for index, (task, setting) in enumerate(mad_settings(), start=1):
        seconds = time_setting(task, setting)
        rows.append((index, task, describe(task, setting), setting["seq_len"], setting["num_train_examples"],
                     setting["num_test_examples"], seconds))
        print(f"{index:2d} {task:24s} {describe(task, setting):28s} {seconds:7.3f} s", flush=True)
    total = sum(r[-1] for r in rows)

    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, Path.cwd()), *sys.argv])
    lines = [
        "# MAD task generation time",
        "",
        "Train + test sets of all 66 MAD settings (`mad.tasks.generate`, seed 12345, sizes from `mad.tasks.grid`).",
        "",
        f"- device: {cpu_model()}, {os.cpu_count()} cores (CPU only)",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}",
        f"- command (from the repository root): `{command}`",
        f"- **total: {total:.2f} s**",
        "",
        "| # | task | setting | seq_len | train | test | seconds |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {i} | {t} | {d} | {sl} | {ntr} | {nte} | {s:.3f} |" for i, t, d, sl, ntr, nte, s in rows]
    lines += [f"| | **total** | | | | | **{total:.2f}** |", ""]
    text = "\n".join(lines)
    print()
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
