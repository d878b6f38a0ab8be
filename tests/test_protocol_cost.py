"""benchmarks/protocol_cost.py: the protocol's GPU time from a records archive and bench_epoch.py's prices."""

import csv
import json
import random
from pathlib import Path

import pytest

from benchmarks import call_plan, protocol_cost
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
    left = text[text.index("## Settings still to run"):text.index("device calls for them")].splitlines()
    rows = [line.split(" | ") for line in left if line.startswith("| ") and not line.startswith(("| task", "| ---"))]
    assert len(rows) == len(mad_settings()) and rows[0][3] == "1024"  # every setting; the longest cost the most
    baseline = next(row for row in rows if row[0] == f"| {task}" and row[1] == "baseline")
    assert baseline[2] == "`in_context_recall__baseline`"  # what a call's mad_setting takes
    assert baseline[4] == "5" and baseline[5] == f"{5 * 200 * run_epoch_s / 60:.1f}"  # one of its six has a record
    assert baseline[6] == "1 x 5 |"  # one stack on one GPU


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


def test_calls_lose_no_training_and_resume_the_stopped_stacks_first():
    """One GPU, calls of 570 s: 40 s outside the sweep and stop_at 40 s before its end leave 490 s from the sweep's
    start; the first stack starts after 30 s of launch and 20 s of compiling, so a call trains at most 440 s."""
    stacks = [call_plan.Stack("long", 1000.0, 1000.0), call_plan.Stack("short", 400.0, 400.0),
              call_plan.Stack("tiny", 50.0, 50.0)]  # fmt: skip
    calls = call_plan.plan_calls(stacks, gpus=1, call_seconds=570)
    assert [[(s.setting, round(s.before, 2), round(s.after, 2)) for s in call] for call in calls] == [
        [("long", 0.0, 0.44)],
        [("long", 0.44, 0.88)],
        [("long", 0.88, 1.0), ("short", 0.0, 0.75)],  # 120 s of long, then 20 s to compile short: 300 s of it
        [("short", 0.75, 1.0), ("tiny", 0.0, 1.0)],  # the stopped stack first
    ]  # fmt: skip
    two = call_plan.plan_calls([call_plan.Stack(n, 200.0, 200.0) for n in "abc"], gpus=2, call_seconds=570)
    assert [[s.setting for s in call] for call in two] == [["a", "b", "c"]]  # a and b at once, c after the first
    two = call_plan.plan_calls([call_plan.Stack(n, 400.0, 400.0) for n in "abc"], gpus=2, call_seconds=570)
    spans = [[(s.setting, round(s.after, 3)) for s in call] for call in two]
    assert spans == [[("a", 1), ("b", 1), ("c", 0.05)], [("c", 1)]]  # c starts at 470 s (450 + compiling), stops at 490
    with pytest.raises(ValueError, match="a 120-s call trains nothing"):
        call_plan.plan_calls([call_plan.Stack("a", 10.0, 10.0)], gpus=1, call_seconds=120)


def test_the_runs_per_stack_keep_the_stopped_checkpoints_within_what_a_call_carries():
    assert call_plan.runs_per_stack(1, 5.0, 36) == 6  # 7 would fit; a setting's grid has 6
    assert call_plan.runs_per_stack(2, 5.0, 36) == 3
    assert call_plan.runs_per_stack(4, 5.0, 36) == 1
    with pytest.raises(ValueError, match="8 GPUs x one 5-MiB checkpoint do not fit the 36 MiB"):
        call_plan.runs_per_stack(8, 5.0, 36)
    stacks = call_plan.split_stacks([("a", 1024, 6, 200.0), ("b", 256, 5, 100.0)], max_group=3)
    assert [(s.setting, s.seconds) for s in stacks] == [("a", 600.0), ("a", 600.0), ("b", 300.0), ("b", 200.0)]


def test_the_plan_names_every_call_and_the_one_command_they_share(tmp_path):
    _one_record_and_prices(tmp_path)
    args = _cli(tmp_path)
    protocol_cost.main([*args, "--gpus", "2"])
    text = (tmp_path / "cost.md").read_text()
    plan = text[text.index("device calls for them"):].splitlines()
    calls = [line for line in plan if line.startswith("| ") and line.split(" | ")[0][2:].isdigit()]
    assert text.count("device calls for them") == 1 and calls[0].startswith("| 1 | ")
    assert f"## {len(calls)} device calls for them" in text and "Stacks of at most 3 runs" in text
    assert "hydra.launcher.compile=true hydra.launcher.max_group=3" in text  # 2 GPUs x 3 runs x 5 MiB <= 36 MiB
    assert "optimizer=adamw hydra.launcher.compile=true" in text  # every setting is left: the preset's whole sweep
    assert protocol_cost._settings_override([("a", 1024, 6, 1.0), ("b", 32, 6, 0.1)]) == "mad_setting=a,b "
    for bad in (["--call-seconds", "40"], ["--call-seconds", "inf"], ["--gpus", "0"], ["--carry-mib", "0"]):
        with pytest.raises(SystemExit, match="need 40 < --call-seconds < inf, --gpus >= 1"):
            protocol_cost.main([*args, *bad])
    with pytest.raises(SystemExit, match="do not fit the 36 MiB a call carries"):
        protocol_cost.main([*args, "--gpus", "8"])


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
