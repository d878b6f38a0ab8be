"""End to end through `python -m mad.run`, on CPU, at smoke size."""

import json

import pytest

from mad.tasks import TASKS
from tests.conftest import records_under

TINY = ["profile=smoke", "progress=false", "task.num_train_examples=128", "task.num_test_examples=128", "train.epochs=1"]


@pytest.mark.parametrize("task", TASKS)
def test_smoke_run_of_each_task_writes_a_valid_record(cli, tmp_path, task):
    proc = cli([f"task={task}", *TINY, "hydra.run.dir=run"])
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "ok" and record["task"] == task
    assert record["profile"] == "smoke" and record["comparable_with_published_mad"] is False
    assert record["epochs_run"] == 1 and record["best_epoch"] == 1 and record["history"]["epoch"] == [1]
    assert 0.0 <= record["test_accuracy"] <= 1.0 and 0.0 <= record["test_token_accuracy"] <= 1.0
    assert record["test_perplexity"] >= 1.0
    assert record["num_params"] > 0 and record["tokens_per_s"] > 0 and record["wall_time_s"] > 0
    assert record["versions"]["torch"] and record["device"].startswith("cpu")
    assert record["config"]["task"]["name"] == task
    assert (tmp_path / "run" / "model.pt").exists()
    assert "test accuracy" in proc.stdout


def test_parallax_with_muon_runs_and_records_its_choices(cli, tmp_path):
    proc = cli(["attention=parallax", "optimizer=muon", *TINY, "hydra.run.dir=run"])
    assert proc.returncode == 0, proc.stderr
    (record,) = records_under(tmp_path)
    assert (record["attention"], record["optimizer"]) == ("parallax", "muon")
    assert record["config"]["optimizer"]["adjust_lr_fn"] == "match_rms_adamw"


def test_in_context_recall_smoke_run_learns(cli, tmp_path):
    # The smoke profile's 6 epochs, stopped once the test accuracy passes 0.3 (after epoch 1 when it learns, at 0.33;
    # a run that does not learn trains all 6). In a new interpreter: the one single run here that starts from scratch.
    proc = cli(["profile=smoke", "progress=false", "optimizer.lr=1e-3", "train.early_stop_accuracy=0.3",
                "hydra.run.dir=run"], fresh=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (record,) = records_under(tmp_path)
    # 8 value classes: a model that has not learned to recall in context scores about 1/8.
    assert record["test_accuracy"] > 0.25, record["history"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("attention=nope", "Could not find 'attention/nope'"),
        ("task=nope", "Could not find 'task/nope'"),
        ("optimizer=nope", "Could not find 'optimizer/nope'"),
        ("attention.num_heads=3", "not divisible by attention.num_heads=3"),
        ("optimizer.lr=-1e-3", "optimizer.lr must be positive"),
        ("train.early_stop_accuracy=1.5", "train.early_stop_accuracy must be a number in (0, 1]"),
        ("task.num_train_examples=0", "task.num_train_examples must be a positive integer"),
        ("task.seq_len=63", "seq_len"),
        ("task.backbone=language_model task=compression", "needs the autoencoder backbone"),
    ],
)
def test_bad_input_exits_non_zero_with_its_message_and_writes_no_record(cli, tmp_path, override, message):
    proc = cli([*TINY, *override.split(), "hydra.run.dir=run"])
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("result.json"))
