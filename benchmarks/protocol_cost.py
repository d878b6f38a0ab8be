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

For what is left it plans device calls (benchmarks/call_plan.py): calls of `--call-seconds` on `--gpus` GPUs, each
stopping its stacks at its deadline with their checkpoints, which the next call resumes.
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
from benchmarks.call_plan import (  # noqa: E402
    MAX_RUNS_PER_STACK, OUTSIDE_SECONDS, Slice, plan_calls, runs_per_stack, split_stacks,
)  # fmt: skip
from mad.archive import read_records  # noqa: E402
from mad.leaderboard import setting_label  # noqa: E402
from mad.setting_configs import setting_id  # noqa: E402
from mad.stacked_run import stack_size  # noqa: E402
from mad.tasks.grid import LEARNING_RATES, WEIGHT_DECAYS, mad_settings  # noqa: E402

EPOCHS = 200
TARGET_GPU_MINUTES = 60  # issue #8's target for softmax attention
_PRICE_COLUMNS = {"attention", "L", "runs", "ms_per_step", "ms_per_test_batch"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=Path, required=True, help="records archive (python -m mad.archive pack)")
    p.add_argument("--epochs", type=Path, required=True, help="the CSV of benchmarks/bench_epoch.py")
    p.add_argument("--attention", required=True)
    p.add_argument("--optimizer", required=True)
    p.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    p.add_argument("--call-seconds", type=float, default=570,
                   help="a device call's length, install and packing included, to plan calls around (default: "
                        "%(default)s; a call may take at most 600)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of the machine the calls run on (default: %(default)s)")
    p.add_argument("--checkpoint-mib", type=float, default=5.0,
                   help="one run's checkpoint (default: %(default)s; 4.7 for a MAD softmax run with AdamW)")
    p.add_argument("--carry-mib", type=float, default=36.0,
                   help="checkpoints a call can carry in and hand back (default: %(default)s, device_sweep.sh's "
                        "CHECKPOINT_MIB)")
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


def _setting_row(row: Remaining, max_group: int) -> str:
    size = stack_size(row.seq_len, row.runs, max_group)
    return (f"| {row.task} | {setting_label(row.task, row.setting)} | `{setting_id(row.task, row.setting)}` | "
            f"{row.seq_len} | {row.runs} | {row.seconds / 60:.1f} | {-(-row.runs // size)} x {size} |")


def _call_row(number: int, slices: list[Slice]) -> str:
    """One call's stacks by setting: `in_context_recall__seq_len_1024: 4 x 0% -> 100%, 2 x 0% -> 92%`."""
    spans: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in slices:
        spans[s.setting][f"{s.before:.0%} -> {s.after:.0%}"] += 1
    trained = "; ".join(f"{setting}: " + ", ".join(f"{n} x {span}" if n > 1 else span for span, n in counts.items())
                        for setting, counts in spans.items())  # fmt: skip
    return f"| {number} | {trained} |"


def _still_to_run_lines(args: argparse.Namespace, rows: list[Remaining]) -> list[str]:
    if not rows:
        return ["## Settings still to run", "", "None: every grid point has a record.", ""]
    max_group = runs_per_stack(args.gpus, args.checkpoint_mib, args.carry_mib)
    settings = [(setting_id(r.task, r.setting), r.seq_len, r.runs, EPOCHS * r.run_epoch_s) for r in rows]
    calls = plan_calls(split_stacks(settings, max_group), args.gpus, args.call_seconds)
    seconds = args.call_seconds - OUTSIDE_SECONDS
    group = f" hydra.launcher.max_group={max_group}" if max_group < MAX_RUNS_PER_STACK else ""
    return [
        "## Settings still to run", "",
        "Priced as above at 200 epochs; a stack that stops early (every run done) takes less.", "",
        "| task | setting | mad_setting | L | grid points to run | GPU-minutes | stacks x runs |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        *(_setting_row(row, max_group) for row in rows), "",
        f"## {len(calls)} device calls for them", "",
        f"Calls of {args.call_seconds:.0f} s on {args.gpus} GPU(s) (benchmarks/call_plan.py): each stops its stacks "
        "at its deadline with their checkpoints and hands them back, and the next resumes them, so no training is "
        f"lost. Stacks of at most {max_group} run{'s' if max_group > 1 else ''}, so that one per GPU has checkpoints of "
        f"{args.checkpoint_mib:g} MiB a run within the {args.carry_mib:g} MiB a call carries. "
        f"{len(calls)} calls: {len(calls) * args.call_seconds / 60:.0f} device-minutes, each machine's start-up "
        "aside. Each row: per setting, its stacks' share of their 200 epochs trained before and after the call "
        "(times how many stacks):", "",
        "| call | trains |", "| ---: | --- |",
        *(_call_row(number, slices) for number, slices in enumerate(calls, start=1)), "",
        "Every call is the same command, CARRY being the folder that holds what the previous call handed back "
        "(none for the first):", "",
        f"    bash benchmarks/device_sweep.sh CARRY {seconds:.0f} runs/sweeps/mad +sweep=mad attention={args.attention} "
        f"optimizer={args.optimizer} {_settings_override(settings)}hydra.launcher.compile=true{group}", ""]  # fmt: skip


def _settings_override(settings: list[tuple]) -> str:
    """`mad_setting=ID,...` for the settings left (their jobs alone are planned), none when every setting is."""
    ids = list(dict.fromkeys(s[0] for s in settings))
    return "" if len(ids) == len(mad_settings()) else f"mad_setting={','.join(ids)} "


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
    if not (OUTSIDE_SECONDS < args.call_seconds < math.inf and args.gpus >= 1 and args.checkpoint_mib > 0
            and args.carry_mib > 0):  # fmt: skip
        sys.exit(f"protocol_cost: need {OUTSIDE_SECONDS} < --call-seconds < inf, --gpus >= 1, --checkpoint-mib > 0 "
                 f"and --carry-mib > 0; got {args.call_seconds:g}, {args.gpus}, {args.checkpoint_mib:g} and "
                 f"{args.carry_mib:g}")
    try:
        prices = epoch_prices(args.epochs, args.attention)
        records = read_records(args.records)
        epochs = recorded_epochs(records, args.attention, args.optimizer)
        text = markdown(args, argv, cost_by_length(prices, epochs), prices, len(records), still_to_run(prices, epochs))
    except ValueError as e:
        sys.exit(f"protocol_cost: {e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
