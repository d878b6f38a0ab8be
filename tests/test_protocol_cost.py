"""benchmarks/protocol_cost.py: the protocol's GPU time from a records archive and bench_epoch.py's prices."""

import csv
import json
import random
from pathlib import Path

import pytest

from benchmarks import protocol_cost
from benchmarks.bench_epoch import protocol_minutes
from benchmarks.bench_leaderboard import synthetic_record
from mad.archive import pack
from mad.results import RECORD_NAME
from mad.tasks.grid import LEARNING_RATES, WEIGHT_DECAYS, mad_settings


def _record(task, setting, lr, wd, epochs, attention="softmax", profile="full"):
    record = synthetic_record(attention, "adamw", task, setting, lr, wd, random.Random(0))
    record.update(status="ok", epochs_run=epochs, profile=profile)
    return record


def _cli(tmp_path: Path, attention: str = "softmax", epochs: str = "epochs.csv") -> list[str]:
    """protocol_cost.py's arguments for tmp_path's records.tar.gz and `epochs`, writing tmp_path/cost.md."""
    return ["--records", str(tmp_path / "records.tar.gz"), "--epochs", str(tmp_path / epochs), "--attention", attention,
            "--optimizer", "adamw", "--out", str(tmp_path / "cost.md")]  # fmt: skip


def _prices(path: Path) -> list[dict]:
    """A bench_epoch.py CSV: a 6-run stack's training step costs 100 x L/128 ms, a test batch 0.5 ms."""
    rows = [{"attention": "softmax", "L": n, "runs": 6, "steps_per_epoch": 20, "first_epoch_s": 20.0,
             "ms_per_step": 100 * n / 128, "ms_per_test_batch": 0.5} for n in (32, 128, 256, 512, 1024)]  # fmt: skip
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_the_cost_counts_recorded_epochs_and_the_most_for_the_rest(tmp_path):
    task, setting = mad_settings()[0]  # in-context recall's baseline: L=128, 100 steps and 10 test batches an epoch
    sweep = tmp_path / "sweep"
    for name, record in {"counted": _record(task, setting, 1e-3, 0.0, 50),
                         "other_attention": _record(task, setting, 1e-3, 0.1, 7, attention="parallax"),
                         "smoke": _record(task, setting, 5e-4, 0.0, 7, profile="smoke")}.items():  # fmt: skip
        (sweep / name).mkdir(parents=True)
        (sweep / name / RECORD_NAME).write_text(json.dumps(record))
    assert pack(sweep, tmp_path / "records.tar.gz") == 3
    prices = _prices(tmp_path / "epochs.csv")
    out = tmp_path / "cost.md"
    assert protocol_cost.main(_cli(tmp_path)) == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 128 |")).split(" | ")
    assert row[1:5] == ["28", "168", "1", "50"]  # settings, grid points, with a record, their epochs
    run_epoch_s = (100 * 100.0 + 10 * 0.5) / 1e3 / 6  # a sixth of the baseline stack's epoch
    minutes = protocol_minutes(prices) - 150 * run_epoch_s / 60  # the recorded run stopped 150 epochs early
    assert round(minutes) != round(protocol_minutes(prices))
    assert f"**{minutes:.0f} GPU-minutes** with the early stopping" in text
    assert f"{protocol_minutes(prices):.0f} without early stopping" in text
    assert "the runs with a record trained 25% of their 200 epochs" in text
    left = text[text.index("## Settings still to run"):].splitlines()
    rows = [line.split(" | ") for line in left if line.startswith("| ") and not line.startswith(("| task", "| ---"))]
    assert len(rows) == len(mad_settings()) and rows[0][3] == "1024"  # every setting; the longest cost the most
    baseline = next(row for row in rows if row[0] == f"| {task}" and row[1] == "baseline")
    assert baseline[2] == "`in_context_recall__baseline`"  # what a call's mad_setting takes
    assert baseline[4] == "5" and baseline[5] == f"{5 * 200 * run_epoch_s / 60:.1f}"  # one of its six has a record
    assert baseline[6] == "1 x 5"  # one stack: 5 runs x L=128 is within the default 1536 tokens


def test_nothing_is_left_to_run_once_every_grid_point_has_a_record(tmp_path):
    sweep = tmp_path / "sweep"
    for i, (task, setting) in enumerate(mad_settings()):
        for j, (lr, wd) in enumerate((lr, wd) for lr in LEARNING_RATES for wd in WEIGHT_DECAYS):
            (sweep / f"{i}_{j}").mkdir(parents=True)
            (sweep / f"{i}_{j}" / RECORD_NAME).write_text(json.dumps(_record(task, setting, lr, wd, 10)))
    pack(sweep, tmp_path / "records.tar.gz")
    _prices(tmp_path / "epochs.csv")
    out = tmp_path / "cost.md"
    protocol_cost.main(_cli(tmp_path))
    assert "## Settings still to run\n\nNone: every grid point has a record." in out.read_text()


def _one_record_and_prices(tmp_path: Path) -> None:
    """records.tar.gz with one record (in-context recall's baseline) and epochs.csv, in `tmp_path`."""
    sweep = tmp_path / "sweep"
    (sweep / "run").mkdir(parents=True)
    task, setting = mad_settings()[0]
    (sweep / "run" / RECORD_NAME).write_text(json.dumps(_record(task, setting, 1e-3, 0.0, 50)))
    pack(sweep, tmp_path / "records.tar.gz")
    _prices(tmp_path / "epochs.csv")


def test_prices_of_another_attention_or_another_file_are_refused(tmp_path):
    _one_record_and_prices(tmp_path)
    with pytest.raises(SystemExit, match="no row for attention 'parallax'; it prices: softmax"):
        protocol_cost.main(_cli(tmp_path, attention="parallax"))
    (tmp_path / "throughput.csv").write_text("attention,L,variant,run_steps_per_s\nsoftmax,128,graph,1000\n")
    for epochs, message in [("throughput.csv", "no column.*ms_per_step.*expected bench_epoch.py's CSV"),
                            ("records.tar.gz", "records.tar.gz: not a CSV file")]:  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            protocol_cost.main(_cli(tmp_path, epochs=epochs))
    assert not (tmp_path / "cost.md").exists()


def _remaining(seq_len: int, runs: int, run_epoch_s: float):
    task, setting = next((t, s) for t, s in mad_settings() if s["seq_len"] == seq_len)
    return protocol_cost.Remaining(task, setting, runs, run_epoch_s)


def test_a_call_plan_starts_only_stacks_that_finish_before_the_deadline():
    """Stacks sharing the GPU each take their price times how many share it: at L=1024, 1536 tokens make one-run
    stacks of 200 s (240 s with the margin); a 540-s call with 60 s outside the launcher and 20 s of compiling
    leaves 460 s, too little for two sharing the GPU once the launcher has started (30 s): one at a time, and none
    started after 220 s."""
    margin, compile_s, launch_s = (protocol_cost.SHARED_GPU_MARGIN, protocol_cost.COMPILE_SECONDS,
                                   protocol_cost.LAUNCH_SECONDS)  # fmt: skip
    plan = protocol_cost.plan_calls(_remaining(1024, 6, 1.0), 540, 60, 1536, 6)
    assert (plan.stacks, plan.runs_per_stack, plan.stack_seconds) == (6, 1, 200.0)
    assert (plan.workers, plan.start_until, plan.calls) == (1, int(460 - 200 * margin), 6)
    longer = protocol_cost.plan_calls(_remaining(1024, 6, 1.0), 1650, 60, 1536, 6)  # three chained calls
    assert longer.workers == 6 and longer.calls == 1 and longer.start_until >= launch_s
    capped = protocol_cost.plan_calls(_remaining(1024, 6, 1.0), 1650, 60, 1536, 4)
    assert capped.workers == 4 and capped.calls == 2
    cases = [(540, 6, 0.2, 1536), (300, 5, 0.05, 0), (900, 6, 0.3, 512), (540, 6, 0.01, 0)]
    for call_s, runs, epoch_s, tokens in cases:  # (call seconds, runs, seconds per run-epoch, max_group_tokens)
        plan = protocol_cost.plan_calls(_remaining(256, runs, epoch_s), call_s, 60, tokens, 6)
        assert plan.stacks * plan.runs_per_stack >= runs and 1 <= plan.workers <= min(plan.stacks, 6)
        assert plan.start_until >= launch_s  # 0 would mean no limit to the launcher, and less starts nothing
        # a stack started at start_until ends inside the call
        assert 60 + plan.start_until + compile_s + plan.workers * plan.stack_seconds * margin <= call_s
    too_long = protocol_cost.plan_calls(_remaining(1024, 6, 3.0), 540, 60, 1536, 6)  # 600 s alone
    assert too_long.workers == 0 and too_long.calls == 0


def test_a_stack_longer_than_a_call_is_said_not_to_fit(tmp_path):
    _one_record_and_prices(tmp_path)
    args = _cli(tmp_path)
    protocol_cost.main([*args, "--call-seconds", "120", "--startup-seconds", "30"])
    lines = (tmp_path / "cost.md").read_text().splitlines()
    longest = next(line for line in lines if "__seq_len_1024` | 1024 |" in line)
    assert longest.endswith("| does not fit | - | - |")
    for bad in (["--call-seconds", "60", "--startup-seconds", "60"], ["--max-group-tokens", "-1"],
                ["--call-seconds", "inf"], ["--max-workers", "0"]):  # fmt: skip
        with pytest.raises(SystemExit, match="need 0 <= --startup-seconds < --call-seconds < inf"):
            protocol_cost.main([*args, *bad])


def test_prices_that_are_not_positive_are_refused(tmp_path):
    _one_record_and_prices(tmp_path)
    with open(tmp_path / "epochs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[1]["ms_per_step"] = "0"  # L=128
    with open(tmp_path / "epochs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(SystemExit, match="L=128 needs positive numbers for runs, ms_per_step and ms_per_test_batch"):
        protocol_cost.main(_cli(tmp_path))
    assert not (tmp_path / "cost.md").exists()
