"""mad/schedules.py: MAD's cosine unchanged, WSD's phases and weight-decay annealing by hand, config and CLI wiring."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mad.optim import build_optimizers
from mad.schedules import build_schedules, check_schedule, cosine_schedules, wsd_phases
from tests.test_configs import CONF

ADAMW = {"name": "adamw", "lr": 1.0, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8}
MUON = ADAMW | {"name": "muon", "momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr_fn": "match_rms_adamw"}
WSD = {"name": "wsd", "warmup_fraction": 0.2, "decay_fraction": 0.3, "min_lr": 0.1, "anneal_weight_decay": False}


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def _trace(optimizers, schedules, epochs: int) -> tuple[list, list]:
    """(lr, weight decay) of every param group during each epoch, stepping as the training loop does."""
    lrs, wds = [], []
    for _ in range(epochs):
        lrs.append([g["lr"] for o in optimizers for g in o.param_groups])
        wds.append([g["weight_decay"] for o in optimizers for g in o.param_groups])
        for s in schedules:
            s.step()
    return lrs, wds


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")  # no training here
def test_cosine_is_mads_cosine_annealing():
    epochs, min_lr = 7, 1e-6
    a, b = build_optimizers(_model(), ADAMW), build_optimizers(_model(), ADAMW)
    built = build_schedules(a, {"name": "cosine", "min_lr": min_lr}, epochs=epochs)
    reference = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs, eta_min=min_lr) for o in b]
    assert _trace(a, built, epochs) == _trace(b, reference, epochs)
    assert type(cosine_schedules(b, epochs, min_lr)[0]) is torch.optim.lr_scheduler.CosineAnnealingLR


def test_wsd_phases_by_hand():
    assert wsd_phases(10, 0.2, 0.3) == (2, 3)
    assert wsd_phases(200, 0.05, 0.2) == (10, 40)
    assert wsd_phases(6, 0.05, 0.2) == (0, 1)  # a positive decay fraction always decays for at least one epoch
    assert wsd_phases(5, 0.0, 0.0) == (0, 0)


@pytest.mark.parametrize("optimizer", [ADAMW, MUON])
def test_wsd_learning_rates_by_hand(optimizer):
    optimizers = build_optimizers(_model(), optimizer)
    lrs, wds = _trace(optimizers, build_schedules(optimizers, WSD, epochs=10), 10)
    # W = 2 warm-up epochs (lr = (e + 1) / 3), stable, then D = 3 decay epochs from 1 to min_lr 0.1.
    expected = [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1 - 0.9 / 3, 1 - 0.9 * 2 / 3, 0.1]
    assert [row[0] for row in lrs] == pytest.approx(expected)
    assert all(row == pytest.approx([row[0]] * len(row)) for row in lrs)  # every group of every optimizer
    assert all(row == [0.1] * len(row) for row in wds)  # no annealing: weight decay untouched


def test_weight_decay_annealing_follows_the_decay_phase():
    optimizers = build_optimizers(_model(), MUON)
    schedules = build_schedules(optimizers, WSD | {"anneal_weight_decay": True}, epochs=10)
    _, wds = _trace(optimizers, schedules, 10)
    assert [row[0] for row in wds] == pytest.approx([0.1] * 7 + [0.1 * 2 / 3, 0.1 / 3, 0.0])
    assert all(row == pytest.approx([row[0]] * len(row)) for row in wds)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"name": "linear"}, "unknown schedule 'linear'; allowed: cosine, wsd"),
        ({"warmup_fraction": 0.6, "decay_fraction": 0.5}, "warmup_fraction + decay_fraction must be <= 1"),
        ({"decay_fraction": -0.1}, "decay_fraction must be a number in [0, 1]"),
        ({"min_lr": -1.0}, "min_lr must be a number >= 0"),
        ({"anneal_weight_decay": "yes"}, "anneal_weight_decay must be true or false"),
    ],
)
def test_bad_schedules_name_the_field(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        check_schedule(WSD | change, 10)


def test_schedule_group_lands_in_train_with_cosine_by_default():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        default = OmegaConf.to_container(compose(config_name="config"), resolve=True)
        wsd = OmegaConf.to_container(compose(config_name="config", overrides=["schedule=wsd"]), resolve=True)
    assert default["train"]["schedule"] == {"name": "cosine", "min_lr": default["train"]["min_lr"]}
    assert wsd["train"]["schedule"] == {"name": "wsd", "warmup_fraction": 0.05, "decay_fraction": 0.2,
                                        "min_lr": 1e-6, "anneal_weight_decay": False}  # fmt: skip
    assert default["diagnostics"] is True and default["diagnostics_batch"] == 64


TINY = ["profile=smoke", "progress=false", "task.num_train_examples=64", "task.num_test_examples=64",
        "task.seq_len=16", "train.epochs=4", "diagnostics=false", "optimizer.lr=1e-3"]  # fmt: skip


def test_wsd_run_records_its_learning_rates_and_bad_fractions_exit(cli, tmp_path):
    proc = cli([*TINY, "schedule=wsd", "train.schedule.warmup_fraction=0.25", "train.schedule.decay_fraction=0.5",
                "train.schedule.min_lr=1e-4", "hydra.run.dir=run"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["history"]["lr"] == pytest.approx([5e-4, 1e-3, 1e-3 - 0.5 * 9e-4, 1e-4])
    assert record["config"]["train"]["schedule"]["name"] == "wsd"
    bad = cli([*TINY, "schedule=wsd", "train.schedule.decay_fraction=1.5", "hydra.run.dir=bad"])
    assert bad.returncode == 2 and "train.schedule.decay_fraction must be a number in [0, 1]" in bad.stderr
    assert not (tmp_path / "bad" / "result.json").exists()
