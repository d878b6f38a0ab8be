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
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_epoch import protocol_minutes, stack_epoch_seconds  # noqa: E402
from mad.archive import read_records  # noqa: E402
from mad.leaderboard import setting_label  # noqa: E402
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


def still_to_run(prices: list[dict], epochs: dict[tuple, int]) -> list[tuple[str, str, int, int, float]]:
    """(task, setting label, L, grid points without a record, GPU-seconds of one stack of them at 200 epochs) per
    setting with any such point, the costliest first: what is left to plan calls around."""
    rows = []
    for task, setting, run_epoch_s, done in grid_points(prices, epochs):
        missing = done.count(None)
        if missing:
            rows.append((task, setting_label(task, setting), setting["seq_len"], missing, missing * EPOCHS * run_epoch_s))
    return sorted(rows, key=lambda row: -row[4])


def _still_to_run_lines(rows: list[tuple[str, str, int, int, float]]) -> list[str]:
    if not rows:
        return ["## Settings still to run", "", "None: every grid point has a record.", ""]
    return [
        "## Settings still to run", "",
        "Each as one stack of its runs without a record, priced as above at 200 epochs on a GPU of its own; beside other "
        "stacks on the same GPU it takes longer, and a stack that stops early (every run done) takes less.", "",
        "| task | setting | L | grid points to run | one stack at 200 epochs, GPU-minutes |",
        "| --- | --- | ---: | ---: | ---: |",
        *[f"| {task} | {label} | {length} | {missing} | {seconds / 60:.1f} |" for task, label, length, missing, seconds in rows],
        ""]  # fmt: skip


def markdown(args: argparse.Namespace, argv: list[str], table: dict, prices: list[dict], n_records: int,
             remaining: list[tuple[str, str, int, int, float]]) -> str:
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
        "", *_still_to_run_lines(remaining)])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    for path in (args.records, args.epochs):
        if not path.is_file():
            sys.exit(f"protocol_cost: {path} is not a file")
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
