"""Every yaml in conf/ composes, and the task yamls state exactly the MAD baselines of the generators."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mad.config_checks import check_config, task_setting
from mad.tasks import TASKS
from mad.tasks.grid import BASELINES, LEARNING_RATES, NUM_TEST_EXAMPLES, WEIGHT_DECAYS

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_run(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return cfg


@pytest.mark.parametrize("task", TASKS)
def test_task_yaml_is_the_mad_baseline(task):
    cfg = OmegaConf.to_container(compose_run(f"task={task}"), resolve=True)
    assert cfg["task"]["name"] == task
    baseline = BASELINES[task]
    assert task_setting(cfg["task"]) == {k: v for k, v in baseline.items() if k != "num_train_examples"}
    assert cfg["task"]["num_train_examples"] == baseline["num_train_examples"]
    assert cfg["task"]["num_test_examples"] == NUM_TEST_EXAMPLES
    check_config(cfg)


def test_protocol_sweep_trains_the_lr_weight_decay_grid_the_leaderboard_expects():
    params = OmegaConf.load(CONF / "sweep" / "mad.yaml").hydra.sweeper.params
    assert tuple(float(v) for v in str(params["optimizer.lr"]).split(",")) == LEARNING_RATES
    assert tuple(float(v) for v in str(params["optimizer.weight_decay"]).split(",")) == WEIGHT_DECAYS


def test_yaml_for_every_task():
    assert {p.stem for p in (CONF / "task").glob("*.yaml")} == set(TASKS)


@pytest.mark.parametrize("attention", sorted(p.stem for p in (CONF / "attention").glob("*.yaml")))
def test_every_attention_yaml_builds_a_causal_mixer(attention):
    cfg = compose_run(f"attention={attention}")
    layer = instantiate(cfg.attention)(cfg.model.dim)
    x = torch.randn(2, 6, cfg.model.dim)
    assert layer(x).shape == x.shape


def test_default_run_is_the_faithful_mad_baseline():
    cfg = OmegaConf.to_container(compose_run(), resolve=True)
    assert cfg["task"]["name"] == "in_context_recall" and cfg["profile"]["comparable"] is True
    assert {k: cfg["train"][k] for k in ("epochs", "batch_size", "min_lr", "early_stop_accuracy", "precision")} == {
        "epochs": 200, "batch_size": 128, "min_lr": 1e-6, "early_stop_accuracy": 0.999, "precision": "auto"}  # fmt: skip
    assert cfg["seed"] == 12345 and cfg["model"]["dim"] == 128 and cfg["model"]["num_layers"] == 4
