"""What the full MAD protocol costs in GPU time for one attention x optimizer, from the records its sweep wrote.

    python benchmarks/protocol_cost.py --records analysis/mad_linear_init_pytorch/records.tar.gz \
        --epochs analysis/throughput/epoch_softmax.csv --attention softmax --optimizer adamw \
        --out analysis/throughput/protocol_cost_softmax_adamw.md

benchmarks/bench_epoch.py prices an epoch of a 6-run stack (training and test) at every MAD length and adds 200
of them per setting: the protocol without early stopping. This counts the epochs the protocol's runs really took
(each record's `epochs_run`, early stopping included) and, for every grid point (setting x lr x wd) without a
record, the 200 epochs such a run may take at most, each run-epoch at a sixth of its setting's stack epoch
(bench_epoch.stack_epoch_seconds). Like bench_epoch's estimate it leaves out compiles and captures (~20 s per
stack and per size a stack shrinks to) and assumes a stack's epoch shrinks with its runs, which holds where the
GPU is the bound (L >= 256) and flatters short lengths. Only records of the full profile on the protocol's
lr x wd grid count, as on the leaderboard.

For what is left it plans device calls (`plan_calls`): per setting, its stacks under the launcher's token cap, how
many can share the GPU within `--call-seconds`, and the `start_until` that lets every stack a call starts finish.
The model (start-up, COMPILE_SECONDS per stack, stacks sharing the GPU at SHARED_GPU_MARGIN x their summed price)
gives 544, 474 and 487 s for three H200 calls priced at 387, 328 and 339 s that took 525, 429 and 446 s, install
and packing included (analysis/throughput/protocol_cost_softmax_adamw.md).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_epoch import protocol_minutes, stack_epoch_seconds  # noqa: E402
from mad.archive import read_records  # noqa: E402
from mad.leaderboard import setting_label  # noqa: E402
from mad.setting_configs import setting_id  # noqa: E402
from mad.stacked_run import stack_size  # noqa: E402
from mad.tasks.grid import LEARNING_RATES, WEIGHT_DECAYS, mad_settings  # noqa: E402

EPOCHS = 200
TARGET_GPU_MINUTES = 60  # issue #8's target for softmax attention
# Stacks sharing one GPU take about as long as their priced work together: six 6-run stacks at L = 256 on the H200
# (session 17) ran epochs of 6.8-8.3 s, against 6 x 1.19 s priced (0.95-1.16x). Calls are planned above the worst.
SHARED_GPU_MARGIN = 1.2
COMPILE_SECONDS = 20  # a stack's compiles and captures before its first epoch (bench_epoch.py's first epoch: 17-21 s)
# The launcher's clock (start_until) starts before it plans the sweep's jobs and spawns its workers: a start_until
# shorter than that starts nothing, and 0 means no limit.
LAUNCH_SECONDS = 30
_PRICE_COLUMNS = {"attention", "L", "runs", "ms_per_step", "ms_per_test_batch"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=Path, required=True, help="records archive (python -m mad.archive pack)")
    p.add_argument("--epochs", type=Path, required=True, help="the CSV of benchmarks/bench_epoch.py")
    p.add_argument("--attention", required=True)
    p.add_argument("--optimizer", required=True)
    p.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    p.add_argument("--call-seconds", type=float, default=540,
                   help="a device call's deadline, to plan calls around (default: %(default)s)")
    p.add_argument("--startup-seconds", type=float, default=60,
                   help="of a call, outside the launcher: installing, unpacking, starting Python, torch and Hydra, "
                        "packing the records (default: %(default)s)")
    p.add_argument("--max-group-tokens", type=int, default=1536,
                   help="the launcher's cap on runs x sequence length per stack (default: %(default)s)")
    p.add_argument("--max-workers", type=int, default=6,
                   help="the most stacks a call trains at once; each compiles on the host's cores (default: "
                        "%(default)s)")
    return p.parse_args(argv)


def epoch_prices(epochs_csv: Path, attention: str) -> list[dict]:
    """bench_epoch.py's rows of `attention`; ValueError when the file is not such a CSV or lacks the attention."""
    try:
        with open(epochs_csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{epochs_csv}: not a CSV file ({e})") from e
    missing = _PRICE_COLUMNS - set(rows[0] if rows else ())
    if missing:
        raise ValueError(f"{epochs_csv}: no column(s) {', '.join(sorted(missing))}; expected bench_epoch.py's CSV")
    mine = [row for row in rows if row["attention"] == attention]
    if not mine:
        found = ", ".join(sorted({row["attention"] for row in rows}))
        raise ValueError(f"{epochs_csv} has no row for attention {attention!r}; it prices: {found}")
    for row in mine:
        try:
            ok = all(float(row[key]) > 0 for key in ("ms_per_step", "ms_per_test_batch", "runs"))
        except ValueError:
            ok = False
        if not ok:
            got = ", ".join(repr(row[key]) for key in ("runs", "ms_per_step", "ms_per_test_batch"))
            raise ValueError(f"{epochs_csv}: L={row['L']} needs positive numbers for runs, ms_per_step and "
                             f"ms_per_test_batch, got {got}")
    return mine


def recorded_epochs(records: dict, attention: str, optimizer: str) -> dict[tuple, int]:
    """Epochs of each finished full-profile run of `attention` x `optimizer`, by (task, setting, lr, wd)."""
    epochs: dict[tuple, int] = {}
    for record in records.values():
        if (record.get("attention"), record.get("optimizer"), record.get("profile")) != (attention, optimizer, "full"):
            continue
        key = (record["task"], _setting_key(record["setting"]), float(record["lr"]), float(record["weight_decay"]))
        epochs[key] = int(record["epochs_run"])
    return epochs


def _setting_key(setting: dict) -> tuple:
    return tuple(sorted(setting.items()))


def grid_points(prices: list[dict], epochs: dict[tuple, int]):
    """Per MAD setting: (task, setting, GPU-seconds of one run-epoch, the recorded epochs of each lr x wd point or
    None where it has no record)."""
    for task, setting in mad_settings():
        run_epoch_s = stack_epoch_seconds(prices, setting) / int(prices[0]["runs"])
        done = [epochs.get((task, _setting_key(setting), float(lr), float(wd)))
                for lr in LEARNING_RATES for wd in WEIGHT_DECAYS]  # fmt: skip
        yield task, setting, run_epoch_s, done


def cost_by_length(prices: list[dict], epochs: dict[tuple, int]) -> dict[int, dict[str, float]]:
    """Per sequence length: settings, grid points, those with a record, their run-epochs, and the GPU-seconds of
    those and of the grid points still to run (at 200 epochs)."""
    table: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for _task, setting, run_epoch_s, done in grid_points(prices, epochs):
        row = table[setting["seq_len"]]
        row["settings"] += 1
        for point_epochs in done:
            row["points"] += 1
            if point_epochs is None:
                row["to_run_s"] += EPOCHS * run_epoch_s
            else:
                row["recorded"] += 1
                row["recorded_epochs"] += point_epochs
                row["recorded_s"] += point_epochs * run_epoch_s
    return {length: dict(table[length]) for length in sorted(table)}


@dataclass
class Remaining:
    """A setting with grid points still to run."""

    task: str
    setting: dict
    runs: int  # grid points without a record
    run_epoch_s: float  # GPU-seconds of one run-epoch

    @property
    def seq_len(self) -> int:
        return self.setting["seq_len"]

    @property
    def seconds(self) -> float:
        """GPU-seconds of its runs at 200 epochs."""
        return self.runs * EPOCHS * self.run_epoch_s


def still_to_run(prices: list[dict], epochs: dict[tuple, int]) -> list[Remaining]:
    """Every setting with grid points without a record, the costliest first: what is left to plan calls around."""
    rows = [Remaining(task, setting, done.count(None), run_epoch_s)
            for task, setting, run_epoch_s, done in grid_points(prices, epochs) if None in done]  # fmt: skip
    return sorted(rows, key=lambda row: -row.seconds)


@dataclass
class CallPlan:
    """How a setting's stacks fit device calls of `call_seconds`: `workers` stacks train at once, sharing the GPU, so
    each takes COMPILE_SECONDS plus `workers` x its price (x SHARED_GPU_MARGIN); none starts after `start_until`
    (counted from the launcher's start, as `hydra.launcher.start_until`; at least LAUNCH_SECONDS), so every stack
    that starts finishes; `workers` == 0 when one stack alone outlasts a call."""

    stacks: int
    runs_per_stack: int
    stack_seconds: float  # one stack on a GPU of its own, at 200 epochs
    workers: int
    start_until: int
    calls: int


def plan_calls(row: Remaining, call_seconds: float, startup_seconds: float, max_group_tokens: int,
               max_workers: int) -> CallPlan:  # fmt: skip
    size = stack_size(row.seq_len, row.runs, 0, max_group_tokens)
    stacks = math.ceil(row.runs / size)
    stack_s = size * EPOCHS * row.run_epoch_s
    budget = call_seconds - startup_seconds - COMPILE_SECONDS  # from the launcher's start to the deadline
    shared_s = stack_s * SHARED_GPU_MARGIN
    workers = min(stacks, max_workers, max(0, int((budget - LAUNCH_SECONDS) // shared_s)))
    if workers == 0:
        return CallPlan(stacks, size, stack_s, 0, 0, 0)
    return CallPlan(stacks, size, stack_s, workers, int(budget - workers * shared_s), math.ceil(stacks / workers))


def _plan_row(args: argparse.Namespace, row: Remaining) -> str:
    plan = plan_calls(row, args.call_seconds, args.startup_seconds, args.max_group_tokens, args.max_workers)
    fit = f"{plan.workers} | {plan.start_until} | {plan.calls}" if plan.workers else "does not fit | - | -"
    return (f"| {row.task} | {setting_label(row.task, row.setting)} | `{setting_id(row.task, row.setting)}` | "
            f"{row.seq_len} | {row.runs} | {row.seconds / 60:.1f} | {plan.stacks} x {plan.runs_per_stack} | "
            f"{plan.stack_seconds / 60:.1f} | {fit} |")


def _still_to_run_lines(args: argparse.Namespace, rows: list[Remaining]) -> list[str]:
    if not rows:
        return ["## Settings still to run", "", "None: every grid point has a record.", ""]
    return [
        "## Settings still to run", "",
        "Priced as above at 200 epochs on a GPU of its own; a stack that stops early (every run done) takes less. "
        f"Planned for calls of {args.call_seconds:.0f} s, {args.startup_seconds:.0f} s of them outside the launcher, "
        f"with `hydra.launcher.max_group_tokens={args.max_group_tokens}` and at most {args.max_workers} workers: "
        f"stacks that share the GPU each take their price times how many share it (times {SHARED_GPU_MARGIN}, above "
        f"the measured worst), plus {COMPILE_SECONDS} s of compiling. With a row's workers and start_until, every "
        "stack a call starts finishes in it, and those it does not start wait for the next call.", "",
        "| task | setting | mad_setting | L | grid points to run | GPU-minutes | stacks x runs | "
        "one stack, GPU-minutes | workers per call | start_until, s | calls |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(_plan_row(args, row) for row in rows), "",
        "A call, for one row, or for rows with the same workers and the smallest of their start_until: "
        "`bash benchmarks/device_sweep.sh "
        f"ARCHIVE {args.call_seconds:.0f} runs/sweeps/mad +sweep=mad attention={args.attention} "
        f"optimizer={args.optimizer} mad_setting=ID,... hydra.launcher.max_group_tokens={args.max_group_tokens} "
        "hydra.launcher.workers_per_device=W hydra.launcher.compile=true hydra.launcher.start_until=S`.",
        ""]  # fmt: skip


def markdown(args: argparse.Namespace, argv: list[str], table: dict, prices: list[dict], n_records: int,
             remaining: list[Remaining]) -> str:
    totals: dict[str, float] = defaultdict(float)
    rows = []
    for length, row in table.items():
        for key, value in row.items():
            totals[key] += value
        done_s, rest_s = row.get("recorded_s", 0), row.get("to_run_s", 0)
        rows.append(f"| {length} | {row['settings']:.0f} | {row['points']:.0f} | {row.get('recorded', 0):.0f} | "
                    f"{row.get('recorded_epochs', 0):,.0f} | {done_s / 60:.1f} | {rest_s / 60:.1f} | "
                    f"{(done_s + rest_s) / 60:.1f} |")
    minutes = (totals["recorded_s"] + totals["to_run_s"]) / 60
    stopped = totals["recorded_epochs"] / (EPOCHS * totals["recorded"]) if totals["recorded"] else float("nan")
    return "\n".join([
        f"# The full MAD protocol in GPU time: {args.attention} + {args.optimizer}", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- command: `python benchmarks/protocol_cost.py {' '.join(argv)}`",
        f"- records: {args.records} ({n_records} finished runs in the archive, every attention and optimizer)",
        f"- prices: {args.epochs}, a 6-run stack's epoch at each length, a sixth of it per run-epoch (its .md beside "
        "it has the device, date and versions); no compiles or captures", "",
        "| L | settings | grid points | with a record | their epochs | their GPU-minutes | "
        "the rest at 200 epochs, GPU-minutes | GPU-minutes |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        f"| all | {totals['settings']:.0f} | {totals['points']:.0f} | {totals['recorded']:.0f} | "
        f"{totals['recorded_epochs']:,.0f} | {totals['recorded_s'] / 60:.1f} | {totals['to_run_s'] / 60:.1f} | "
        f"**{minutes:.0f}** |", "",
        f"- the protocol: **{minutes:.0f} GPU-minutes** with the early stopping recorded so far, "
        f"{protocol_minutes(prices):.0f} without early stopping (bench_epoch.py's estimate); the target is "
        f"{TARGET_GPU_MINUTES}",
        f"- the runs with a record trained {stopped:.0%} of their 200 epochs",
        "- grid points still to run count their 200 epochs, so the total is an upper bound while any remain",
        "", *_still_to_run_lines(args, remaining)])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    for path in (args.records, args.epochs):
        if not path.is_file():
            sys.exit(f"protocol_cost: {path} is not a file")
    if not (0 <= args.startup_seconds < args.call_seconds < math.inf and args.max_group_tokens >= 0
            and args.max_workers >= 1):  # fmt: skip
        sys.exit(f"protocol_cost: need 0 <= --startup-seconds < --call-seconds < inf, --max-group-tokens >= 0 "
                 f"(0: no cap) and --max-workers >= 1; got {args.startup_seconds:g}, {args.call_seconds:g}, "
                 f"{args.max_group_tokens} and {args.max_workers}")
    try:
        prices = epoch_prices(args.epochs, args.attention)
        records = read_records(args.records)
    except ValueError as e:
        sys.exit(f"protocol_cost: {e}")
    epochs = recorded_epochs(records, args.attention, args.optimizer)
    text = markdown(args, argv, cost_by_length(prices, epochs), prices, len(records), still_to_run(prices, epochs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
