"""mad.leaderboard on synthetic run records: MAD aggregation, reporting of gaps, invalid files, profiles, outputs."""

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from mad.leaderboard import LeaderboardError, make_leaderboard, setting_label
from mad.records import load_records
from mad.results import RECORD_NAME
from mad.tasks import TASKS
from mad.tasks.grid import BASELINES, NUM_TEST_EXAMPLES, mad_settings
from tests.forked_python import run_cli

LRS = (1e-4, 5e-4, 1e-3)
WDS = (0.0, 0.1)


def make_record(task="in_context_recall", change=None, attention="softmax", optimizer="adamw", lr=1e-3,
                weight_decay=0.0, accuracy=0.5, status="ok", profile="full", model=None, epochs=3) -> dict:  # fmt: skip
    """A complete record as mad.run writes it; ``change`` ({key: value}) alters the task's MAD baseline."""
    setting = {**BASELINES[task], "num_test_examples": NUM_TEST_EXAMPLES, **(change or {})}
    optimizer_cfg = {"name": optimizer, "lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8}
    history = {k: [accuracy] * epochs for k in ("epoch", "lr", "train_loss", "test_loss", "test_perplexity",
                                                "test_accuracy", "test_token_accuracy", "seconds")}  # fmt: skip
    return {
        "schema": 1, "status": status, "error": "RuntimeError: boom" if status == "failed" else None,
        "task": task, "setting": setting, "attention": attention, "optimizer": optimizer, "lr": lr,
        "weight_decay": weight_decay, "seed": 12345, "profile": profile,
        "comparable_with_published_mad": profile == "full",
        "config": {
            "task": {"name": task, **setting},
            "attention": {"_target_": f"models.attention.{attention}", "num_heads": 16},
            "optimizer": optimizer_cfg, "model": model or {"dim": 128, "num_layers": 4},
            "train": {"epochs": 200, "batch_size": 128}, "profile": {"name": profile}, "seed": 12345,
            "data_cache": None, "progress": False,
        },
        "test_accuracy": accuracy if status == "ok" else None, "test_token_accuracy": accuracy,
        "test_perplexity": 1.5, "test_loss": 0.4, "best_epoch": epochs, "epochs_run": epochs,
        "diverged_at_step": 17 if status == "diverged" else None, "history": history, "wall_time_s": 1.0,
        "tokens_per_s": 1e5, "num_params": 407184, "device": "cpu", "versions": {"python": "3.11"}, "git": None,
        "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:01:00+00:00",
    }  # fmt: skip


class Runs:
    """A runs directory; ``add`` writes one record in its own run folder."""

    def __init__(self, root: Path):
        self.root = root
        self.count = 0

    def add(self, **kw) -> Path:
        return self.write_text(json.dumps(make_record(**kw), indent=2))

    def write_text(self, text: str) -> Path:
        self.count += 1
        path = self.root / "multirun" / f"{self.count}_job" / RECORD_NAME
        path.parent.mkdir(parents=True)
        path.write_text(text)
        return path

    def full_grid(self, accuracy=lambda task, i: 0.5, skip=(), **kw) -> None:
        """All 66 MAD settings x the 6 lr/wd points; ``skip`` lists (task, index-within-task) to leave out."""
        index = {task: -1 for task in TASKS}
        for task, setting in mad_settings():
            index[task] += 1
            if (task, index[task]) in skip:
                continue
            change = {k: v for k, v in setting.items() if BASELINES[task].get(k) != v and k != "num_test_examples"}
            for lr in LRS:
                for wd in WDS:
                    self.add(task=task, change=change, lr=lr, weight_decay=wd, accuracy=accuracy(task, index[task]),
                             **kw)  # fmt: skip


@pytest.fixture
def runs(tmp_path) -> Runs:
    return Runs(tmp_path / "runs")


def leaderboard(runs: Runs, tmp_path: Path, **kw) -> tuple[pd.DataFrame, str]:
    out = io.StringIO()
    board = make_leaderboard(runs.root, tmp_path / "out", console=Console(file=out, width=250), **kw)
    return board, out.getvalue()


def row(board: pd.DataFrame, attention: str, optimizer: str = "adamw") -> pd.Series:
    match = board[(board["attention"] == attention) & (board["optimizer"] == optimizer)]
    assert len(match) == 1, board[["attention", "optimizer"]]
    return match.iloc[0]


def test_best_of_grid_then_mean_over_settings_then_over_tasks(runs, tmp_path):
    # One task, two settings, the lr x wd grid of 2 points; best of grid 0.9 and 0.5 -> task 0.7.
    for lr, acc_base, acc_v32 in [(1e-3, 0.9, 0.2), (1e-4, 0.3, 0.5)]:
        runs.add(task="in_context_recall", lr=lr, accuracy=acc_base, profile="smoke")
        runs.add(task="in_context_recall", change={"vocab_size": 32}, lr=lr, accuracy=acc_v32, profile="smoke")
    board, _ = leaderboard(runs, tmp_path)
    assert row(board, "softmax")["in_context_recall"] == pytest.approx(0.7)
    assert math.isnan(row(board, "softmax")["average"])  # five tasks have no score
    settings = pd.read_csv(tmp_path / "out" / "settings.csv")
    base = settings[settings["setting_label"] == "baseline"].iloc[0]
    assert (base["best_accuracy"], base["best_lr"], base["runs_ok"]) == (0.9, 1e-3, 2)
    assert settings.loc[settings["setting_label"] == "vocab_size=32", "best_lr"].item() == 1e-4


def test_full_grid_average_is_the_mean_of_task_means(runs, tmp_path):
    # Accuracy depends on task and setting index; best over lr/wd equals it, so hand-computable.
    def accuracy(task, i):
        return round(0.1 * (TASKS.index(task) + 1) + 0.01 * i, 4)

    runs.full_grid(accuracy)
    board, printed = leaderboard(runs, tmp_path)
    counts = {t: sum(1 for task, _ in mad_settings() if task == t) for t in TASKS}
    expected = {t: sum(accuracy(t, i) for i in range(counts[t])) / counts[t] for t in TASKS}
    got = row(board, "softmax")
    for task in TASKS:
        assert got[task] == pytest.approx(expected[task])
    assert got["average"] == pytest.approx(sum(expected.values()) / 6)
    assert got["notes"] == "" and got["settings_scored"] == got["settings_expected"] == 66
    assert "softmax" in printed and "Comparable with published MAD scores: yes" in printed


def test_missing_and_diverged_settings_are_reported(runs, tmp_path):
    runs.full_grid(skip={("memorization", 5), ("compression", 0)})
    # Selective copying baseline: one extra diverged run at a new grid point does not lower the score.
    runs.add(task="selective_copying", status="diverged", lr=1e-2)
    # Memorization vocab_size=8192: every run diverged, so the setting drops out (MAD drops NaN rows), not 0.
    for lr in LRS:
        for wd in WDS:
            runs.add(task="memorization", change={"vocab_size": 8192}, lr=lr, weight_decay=wd, status="diverged")
    board, printed = leaderboard(runs, tmp_path)
    got = row(board, "softmax")
    assert got["memorization"] == pytest.approx(0.5) and got["selective_copying"] == pytest.approx(0.5)
    assert got["settings_scored"] == 64 and got["runs_diverged"] == 7
    notes = got["notes"]
    assert "2 setting(s) missing: compression/baseline, memorization/vocab_size=8192" in notes
    assert "2 setting(s) with diverged runs: selective_copying/baseline, memorization/vocab_size=8192" in notes
    # The lr=1e-2 run is off the protocol's 6 lr x wd points (66 * 6 = 396): compression's baseline misses all 6 (the
    # diverged memorization runs count as run), and the off-grid run is counted apart.
    assert "6 of 396 grid points (setting x lr x wd) not run" in notes
    assert "1 run(s) at an lr x wd point off the protocol's grid, not scored" in notes
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert r"| **0.500**\* |" in md and "compression/baseline" in md and "memorization/vocab_size=8192" in printed


def test_settings_outside_the_mad_grid_are_listed_not_scored(runs, tmp_path):
    runs.add(accuracy=0.3)
    runs.add(change={"vocab_size": 20}, accuracy=0.9)
    board, _ = leaderboard(runs, tmp_path)
    assert row(board, "softmax")["in_context_recall"] == pytest.approx(0.3)
    notes = row(board, "softmax")["notes"]
    assert "1 setting(s) outside the MAD grid, not scored: in_context_recall/vocab_size=20" in notes
    settings = pd.read_csv(tmp_path / "out" / "settings.csv")
    assert len(settings) == 67 and settings.loc[~settings["in_grid"], "best_accuracy"].item() == 0.9


def test_task_without_score_blanks_the_average(runs, tmp_path):
    runs.full_grid(skip={("memorization", i) for i in range(6)})
    board, _ = leaderboard(runs, tmp_path)
    got = row(board, "softmax")
    assert math.isnan(got["memorization"]) and math.isnan(got["average"])
    assert "no average: no score for memorization" in got["notes"]
    assert "| — |" in (tmp_path / "out" / "leaderboard.md").read_text()


def test_invalid_files_are_ignored_and_counted_with_reasons(runs, tmp_path):
    runs.add(accuracy=0.8)
    runs.write_text("{ this is not json")
    runs.write_text(json.dumps(make_record())[:200])  # truncated
    runs.write_text(json.dumps(make_record(), indent=2)[:-3])  # truncated after the history
    runs.write_text(json.dumps({"schema": 7, "whatever": 1}))
    runs.write_text(json.dumps({k: v for k, v in make_record().items() if k != "config"}))
    runs.write_text(json.dumps(make_record() | {"status": "running"}))
    records, ignored = load_records(runs.root)
    assert len(records) == 1 and len(ignored) == 6
    reasons = ignored["reason"].value_counts().to_dict()
    assert reasons["not valid JSON (corrupt or truncated file)"] == 3
    assert reasons["not a run record of schema 1"] == 1
    assert reasons["missing field(s): config"] == 1
    assert reasons["status 'running' is not one of ok, diverged, failed"] == 1
    board, printed = leaderboard(runs, tmp_path)
    assert row(board, "softmax")["in_context_recall"] == pytest.approx(0.8)
    assert "6 ignored as invalid" in printed and "3 x not valid JSON" in printed
    assert "2_job/result.json" in (tmp_path / "out" / "leaderboard.md").read_text()


def test_failed_records_are_counted_not_scored(runs, tmp_path):
    runs.add(accuracy=0.4)
    failed = make_record(status="failed", lr=5e-4)
    for key in ("test_accuracy", "history", "best_epoch", "finished_at"):  # a failed run never writes these
        del failed[key]
    runs.write_text(json.dumps(failed))
    board, _ = leaderboard(runs, tmp_path)
    got = row(board, "softmax")
    assert got["in_context_recall"] == pytest.approx(0.4) and got["runs_failed"] == 1
    assert "1 failed run(s), not scored" in got["notes"]


def test_mixed_profiles_raise_unless_one_is_picked(runs, tmp_path):
    runs.add(profile="full", accuracy=0.9)
    runs.add(profile="smoke", accuracy=0.2)
    runs.add(profile="smoke", accuracy=0.3, lr=1e-4)
    assert issubclass(LeaderboardError, ValueError)
    with pytest.raises(LeaderboardError, match=r"several profiles: smoke \(2 records\), full \(1 records\).*--profile"):
        leaderboard(runs, tmp_path)
    board, printed = leaderboard(runs, tmp_path, profile="smoke")
    assert row(board, "softmax")["in_context_recall"] == pytest.approx(0.3)
    assert "1 of profile full skipped" in printed and "yes" not in printed.split("Comparable")[1].split("\n")[0]
    with pytest.raises(ValueError, match="no record of profile 'nope'"):
        leaderboard(runs, tmp_path, profile="nope")


def test_empty_or_missing_dir_raises(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no valid run record"):
        make_leaderboard(tmp_path / "empty", tmp_path / "out", console=Console(file=io.StringIO()))
    runs.write_text("[1, 2")
    with pytest.raises(ValueError, match=r"no valid run record .*ignored 1 x not valid JSON .*1_job/result.json"):
        make_leaderboard(runs.root, tmp_path / "out", console=Console(file=io.StringIO()))
    with pytest.raises(ValueError, match="does not exist"):
        make_leaderboard(tmp_path / "absent", tmp_path / "out", console=Console(file=io.StringIO()))


def test_architecture_variants_get_separate_labels(runs, tmp_path):
    runs.add(attention="parallax", accuracy=0.6)
    runs.add(attention="parallax", accuracy=0.9, model={"dim": 256, "num_layers": 4})
    runs.add(attention="softmax", accuracy=0.5)
    board, _ = leaderboard(runs, tmp_path)
    labels = sorted(board["attention"])
    assert len(labels) == 3 and "softmax" in labels
    variants = [label for label in labels if label.startswith("parallax[")]
    assert len(variants) == 2 and all(len(v) == len("parallax[abcd]") for v in variants)
    scores = {row["notes"].split("; ")[-1]: row["in_context_recall"] for _, row in board.iterrows()
              if row["attention"] in variants}  # fmt: skip
    assert scores == {"config variant: model.dim=256": 0.9, "config variant: model.dim=128": 0.6}
    assert "config variant" not in row(board, "softmax")["notes"]
    again, _ = leaderboard(runs, tmp_path)  # labels are stable
    assert sorted(again["attention"]) == labels


def test_two_sweeps_of_config_variants_are_set_side_by_side_per_setting(tmp_path):
    """Two folders (one sweep per init) make one board: a row per variant, and a table of every setting both scored,
    with the difference; a setting only one variant has is left out of that table, and a file is read once even when
    the folders nest."""
    normal, pytorch = Runs(tmp_path / "sweeps" / "normal"), Runs(tmp_path / "sweeps" / "pytorch")
    model = {"dim": 128, "num_layers": 4}
    for change, acc_normal, acc_pytorch in [({"vocab_size": 64}, 0.999, 0.111), ({"vocab_size": 32}, 0.5, 0.625)]:
        normal.add(change=change, accuracy=acc_normal, model={**model, "linear_init": "normal"})
        pytorch.add(change=change, accuracy=acc_pytorch, model={**model, "linear_init": "pytorch"})
    pytorch.add(change={"vocab_size": 128}, accuracy=0.075, model={**model, "linear_init": "pytorch"})
    out = io.StringIO()
    board = make_leaderboard([normal.root, pytorch.root, tmp_path / "sweeps"], tmp_path / "out",
                             console=Console(file=out, width=250))  # fmt: skip
    assert int(board[["runs_ok"]].sum().iloc[0]) == 5  # the parent folder adds no second copy
    labels = {note.split("; ")[-1]: label for label, note in zip(board["attention"], board["notes"])}
    a, b = sorted(labels.values())
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    side = md.split("## Config variants side by side")[1].split("\n## ")[0]
    first_is_normal = labels["config variant: model.linear_init=normal"] == a
    sign = 1 if first_is_normal else -1  # the difference is the second label minus the first
    assert f"| in_context_recall | vocab_size=64 | {'0.999' if first_is_normal else '0.111'} |" in side
    assert f"{sign * (0.111 - 0.999):+.3f} |" in side and f"{sign * (0.625 - 0.5):+.3f} |" in side
    assert "vocab_size=128" not in side and "2 settings scored by at least two variants" in side
    assert f"- `{a}`: config variant: model.linear_init=" in side
    assert "# MAD leaderboard: normal+pytorch+sweeps" in md
    with pytest.raises(LeaderboardError, match="does not exist"):
        make_leaderboard([normal.root, tmp_path / "absent"], tmp_path / "out", console=Console(file=io.StringIO()))


def test_a_board_without_variants_has_no_side_by_side_table(runs, tmp_path):
    runs.add(attention="parallax", accuracy=0.6)
    runs.add(attention="softmax", accuracy=0.5)
    leaderboard(runs, tmp_path)
    assert "side by side" not in (tmp_path / "out" / "leaderboard.md").read_text()


def test_outputs_and_muon_gap(runs, tmp_path):
    for optimizer, acc in [("adamw", 0.5), ("muon", 0.75)]:
        runs.add(attention="parallax", optimizer=optimizer, accuracy=acc)
    runs.add(attention="softmax", accuracy=0.4)
    board, printed = leaderboard(runs, tmp_path)
    out = tmp_path / "out"
    for name in ("leaderboard.md", "leaderboard.csv", "settings.csv", "heatmap.png", "muon_gap.png"):
        assert (out / name).stat().st_size > 0, name
    csv = pd.read_csv(out / "leaderboard.csv")
    assert list(csv.columns[2:9]) == [*TASKS, "average"] and csv["in_context_recall"].max() == 0.75
    md = (out / "leaderboard.md").read_text()
    assert "**0.750**" in md and str(runs.root) in md and "profile: `full`" in md
    assert str(out / "muon_gap.png") in printed.replace("\n", "")


def test_muon_gap_skipped_without_pairs(runs, tmp_path):
    runs.add(attention="parallax", optimizer="muon")
    _, printed = leaderboard(runs, tmp_path)
    assert not (tmp_path / "out" / "muon_gap.png").exists()
    assert "muon_gap.png skipped" in printed


def test_setting_label():
    assert setting_label("compression", {**BASELINES["compression"], "num_test_examples": 256}) == "baseline"
    assert setting_label("compression", {**BASELINES["compression"], "seq_len": 64}) == "seq_len=64"


def test_history_is_skipped_only_where_that_is_safe(runs):
    record = make_record(accuracy=0.25)
    record["history"]["note"] = ["a } brace"]  # not the layout the fast path expects: parsed whole
    indented = runs.write_text(json.dumps(record, indent=2))
    compact = runs.write_text(json.dumps(make_record(accuracy=0.75)))  # no indentation: parsed whole
    standard = runs.add(accuracy=0.5)
    records, ignored = load_records(runs.root)
    assert ignored.empty
    accuracy = dict(zip(records["path"], records["test_accuracy"]))
    assert accuracy == {str(indented): 0.25, str(compact): 0.75, str(standard): 0.5}
    assert records["body"].nunique() == records["opt_config"].nunique() == 1


def test_process_pool_loads_the_same_rows(runs):
    for i in range(210):
        runs.add(lr=1e-4 * (i + 1), epochs=1)
    runs.write_text("garbage")
    pooled, pooled_ignored = load_records(runs.root, workers=2)
    serial, serial_ignored = load_records(runs.root, workers=1)
    pd.testing.assert_frame_equal(pooled, serial)
    assert len(pooled) == 210 and len(pooled_ignored) == len(serial_ignored) == 1


def test_cli(runs, tmp_path):
    runs.add(accuracy=0.7)
    ok = run_cli([str(runs.root), "--out", str(tmp_path / "cli")], cwd=tmp_path, module="mad.leaderboard", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "cli" / "leaderboard.md").exists() and "0.700" in ok.stdout
    (tmp_path / "empty").mkdir()
    bad = run_cli([str(tmp_path / "empty")], cwd=tmp_path, module="mad.leaderboard", timeout=120)
    assert bad.returncode != 0 and "no valid run record" in bad.stderr
    default = run_cli([str(runs.root)], cwd=tmp_path, module="mad.leaderboard", timeout=120)
    assert default.returncode == 0 and (tmp_path / "analysis" / "runs" / "leaderboard.csv").exists()


def test_softmax_rows_are_set_beside_the_published_transformer(runs, tmp_path):
    # Every setting at 0.5 except one memorization setting left out: memorization and the average are partial, so
    # they are starred and never differenced; every other task is compared with both published rows.
    runs.full_grid(skip={("memorization", 2)})
    runs.add(task="in_context_recall", attention="parallax", accuracy=0.9)  # not softmax: not in the comparison
    leaderboard(runs, tmp_path)
    text = (tmp_path / "out" / "leaderboard.md").read_text()
    section = text.split("## Against the published Transformer")[1].split("## ")[0]
    assert "| ours: softmax + adamw | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500\\* | 0.500\\* |" in section
    board = next(line for line in text.splitlines() if line.startswith("| softmax | adamw |"))
    assert board.endswith("| **0.500**\\* | **0.500**\\* |")  # the leaderboard stars the partial average too
    assert "| MAD paper (Poli et al. 2024) | 0.941 | 0.868 | 0.298 | 0.996 | 0.516 | 0.852 | 0.745 |" in section
    assert "parallax" not in section
    paper = next(line for line in section.splitlines() if "minus the MAD paper" in line)
    assert "in_context_recall -0.441" in paper and "fuzzy_in_context_recall +0.202" in paper
    assert "memorization" not in paper and "average" not in paper
    rerun = next(line for line in section.splitlines() if "minus the independent re-run" in line)
    assert "compression +0.068" in rerun
    setups = [line for line in section.splitlines() if line.startswith(("- MAD paper", "- independent re-run"))]
    assert len(setups) == 2 and "2 heads of dim 64" in setups[1] and "N(0, 0.02)" in setups[0]


def test_a_task_whose_grid_misses_one_run_is_starred(runs, tmp_path):
    # Every setting present, but one compression setting has 5 of its 6 lr x wd runs: its best may be an underestimate,
    # so compression and the average are provisional; the other tasks are not.
    # A run off the protocol's grid (lr 1e-2) is no missing point and is not scored: it neither stars nor lifts a task.
    runs.full_grid()
    runs.add(task="in_context_recall", lr=1e-2, accuracy=1.0)
    dropped = next(p for p in sorted(runs.root.rglob(RECORD_NAME)) if json.loads(p.read_text())["task"] == "compression")
    dropped.unlink()
    leaderboard(runs, tmp_path)
    text = (tmp_path / "out" / "leaderboard.md").read_text()
    board = next(line for line in text.splitlines() if line.startswith("| softmax | adamw |"))
    assert board == ("| softmax | adamw | **0.500** | **0.500** | **0.500** | **0.500** | **0.500**\\* | **0.500** "
                     "| **0.500**\\* |")
    assert "1 setting(s) scored over part of the lr x wd grid: compression/baseline" in text
    assert "1 of 396 grid points (setting x lr x wd) not run" in text
    assert "1 run(s) at an lr x wd point off the protocol's grid, not scored" in text


def test_no_published_comparison_outside_the_full_protocol(runs, tmp_path):
    runs.add(task="in_context_recall", profile="smoke")
    leaderboard(runs, tmp_path)
    assert "published Transformer" not in (tmp_path / "out" / "leaderboard.md").read_text()
