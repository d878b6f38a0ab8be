"""Mid-stack checkpoints (mad/stack_checkpoint.py): a stack stopped mid-training resumes where it stopped and gives
the records of an uninterrupted stack."""

import dataclasses
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from mad.config_checks import task_setting
from mad.data import load_split
from mad.run import build_model
from mad.stack_checkpoint import CHECKPOINT_NAME, StackCheckpoints, StackStopped, checkpoint_epoch
from mad.stacked_train import StackedRun, train_stacked
from mad.train import LoopConfig
from tests.conftest import REPO, records_under
from tests.test_stacked_training import GRID, SMALL_MODEL, compose_cfg


class Interrupted(Exception):
    pass


def _group(optimizer: str, epochs: int = 4):
    """A factory of fresh runs (the lr x wd grid, each on its own seed: its own weights, data and order), and what
    train_stacked needs beside them."""
    # Half the smoke width at L=32 (Muon's bf16 orthogonalisation of the smoke width's matrices is slow on the CPU).
    cfg = compose_cfg("attention=softmax", f"optimizer={optimizer}", "task.num_train_examples=128",
                      "task.num_test_examples=64", *SMALL_MODEL, "task.seq_len=32")  # fmt: skip
    resolved = OmegaConf.to_container(cfg, resolve=True)
    seeds = [cfg.seed + i for i in range(len(GRID))]
    splits = {seed: [load_split(cfg.task.name, s, n, seed, task_setting(resolved["task"]), None)
                     for s, n in (("train", 128), ("test", 64))] for seed in seeds}  # fmt: skip
    # Early stopping between the learners' accuracies, so that runs leave the stack (and its checkpoints) on the way.
    loop = LoopConfig(epochs=epochs, batch_size=32, early_stop_accuracy=0.2, seed=cfg.seed, device=torch.device("cpu"),
                      autocast_dtype=None, progress=False, diagnostics_batch=8 if optimizer == "adamw" else None)  # fmt: skip

    def runs():
        made = []
        for (lr, wd), seed in zip(GRID, seeds):
            torch.manual_seed(seed)
            made.append(StackedRun(build_model(cfg), dict(resolved["optimizer"], lr=lr, weight_decay=wd),
                                   *splits[seed], seed=seed))  # fmt: skip
        return made

    return runs, resolved["train"]["schedule"], loop, resolved


def _stopped_after_epoch_1(tmp_path, epochs: int):
    """A stack (no early stops) stopped during epoch 2, its runs' checkpoints from epoch 1 in `tmp_path/run<i>`."""
    runs, schedule, loop, resolved = _group("adamw", epochs=epochs)
    loop = dataclasses.replace(loop, early_stop_accuracy=2.0)
    dirs = [tmp_path / f"run{i}" for i in range(len(GRID))]
    for d in dirs:
        d.mkdir()
    identities = [resolved | {"lr": lr} for lr, _ in GRID]

    def stop_in_epoch_2(epoch, runs_left, seconds):
        if epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_stacked(runs(), schedule, loop, on_epoch=stop_in_epoch_2,
                      checkpoints=StackCheckpoints(dirs, identities, 1e-9, log=lambda _: None))  # fmt: skip
    assert all((d / CHECKPOINT_NAME).exists() for d in dirs)
    return runs, schedule, loop, dirs, identities


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_resumed_stack_gives_the_records_of_an_uninterrupted_one(tmp_path, optimizer):
    runs, schedule, loop, resolved = _group(optimizer)
    whole = [o.result for o in train_stacked(runs(), schedule, loop)]

    dirs = [tmp_path / f"run{i}" for i in range(len(GRID))]
    for d in dirs:
        d.mkdir()
    identities = [resolved | {"lr": lr} for lr, _ in GRID]
    saved = StackCheckpoints(dirs, identities, every_s=1e-9, log=lambda _: None)
    finished = {}

    def stop_in_epoch_3(epoch, runs_left, seconds):
        if epoch == 3:
            raise Interrupted

    def keep(index, outcome):  # what run_group does as a run leaves the stack: record it, drop its checkpoint
        finished[index] = outcome.result
        saved.discard(index)

    with pytest.raises(Interrupted):
        train_stacked(runs(), schedule, loop, on_finish=keep, on_epoch=stop_in_epoch_3, checkpoints=saved)
    # Epoch 3's checkpoint would be written after on_epoch: the stack resumes after epoch 2, with the runs that had
    # not left it by then (their stack positions no longer their run indices).
    left = [i for i in range(len(GRID)) if i not in finished]
    assert left and finished, "a run should leave the stack in epochs 1-2 (test setup)"
    assert all((dirs[i] / CHECKPOINT_NAME).exists() for i in left)
    assert not any((dirs[i] / CHECKPOINT_NAME).exists() for i in finished)
    messages = []
    again = StackCheckpoints([dirs[i] for i in left], [identities[i] for i in left], every_s=0, log=messages.append)
    resumed = train_stacked([runs()[i] for i in left], schedule, loop, checkpoints=again)
    assert any("resumes after epoch 2" in m for m in messages), messages
    for i, outcome in zip(left, resumed):
        finished[i] = outcome.result
    for i, (a, b) in enumerate(zip(whole, (finished[i] for i in range(len(GRID))))):
        assert (a.status, a.steps, a.early_stopped, len(a.epochs), a.train_tokens) == (
            b.status, b.steps, b.early_stopped, len(b.epochs), b.train_tokens), i
        for ea, eb in zip(a.epochs, b.epochs):
            assert ea.lr == eb.lr
            assert math.isclose(ea.train_loss, eb.train_loss, rel_tol=1e-5), (i, ea.epoch)
            assert math.isclose(ea.test_loss, eb.test_loss, rel_tol=1e-5), (i, ea.epoch)
        if loop.diagnostics_batch:  # restored with the result (off for Muon: slow on the CPU; AdamW checks them)
            assert len(a.diagnostics) == len(b.diagnostics) and a.initial_diagnostics == b.initial_diagnostics


def test_a_stack_past_its_deadline_saves_its_checkpoints_stops_and_resumes_to_the_same_records(tmp_path):
    runs, schedule, loop, resolved = _group("adamw", epochs=3)
    loop = dataclasses.replace(loop, early_stop_accuracy=2.0)
    whole = [o.result for o in train_stacked(runs(), schedule, loop)]
    dirs = [tmp_path / f"run{i}" for i in range(len(GRID))]
    for d in dirs:
        d.mkdir()
    identities = [resolved | {"lr": lr} for lr, _ in GRID]
    # A deadline already passed: the stack stops after its first epoch, with every run's checkpoint saved, though
    # periodic saving is off.
    deadline = StackCheckpoints(dirs, identities, 0, log=lambda _: None, stop_by=time.time())
    with pytest.raises(StackStopped) as stopped:
        train_stacked(runs(), schedule, loop, checkpoints=deadline)
    assert (stopped.value.epoch, stopped.value.runs, stopped.value.saved) == (1, len(GRID), True)
    assert "after epoch 1, 3 runs training, checkpointed" in str(stopped.value)
    assert [checkpoint_epoch(d) for d in dirs] == [1] * len(GRID)
    messages = []
    resumed = train_stacked(runs(), schedule, loop, checkpoints=StackCheckpoints(dirs, identities, 0, messages.append))
    assert any("resumes after epoch 1" in m for m in messages), messages
    for a, b in zip(whole, (o.result for o in resumed)):
        assert (a.steps, len(a.epochs)) == (b.steps, len(b.epochs))
        for ea, eb in zip(a.epochs, b.epochs):
            assert math.isclose(ea.test_loss, eb.test_loss, rel_tol=1e-5), ea.epoch


def test_a_stopped_group_comes_back_whole_from_a_worker_process():
    """The launcher's workers hand a group's outcome back pickled: a stopped group keeps its finished records and
    where it stopped."""
    from mad.stacked_run import GroupStopped

    sent = GroupStopped("stack x stopped", {1: {"status": "ok"}}, StackStopped(epoch=7, runs=2, saved=True))
    back = pickle.loads(pickle.dumps(sent))
    assert (str(back), back.finished, back.stopped.epoch, back.stopped.runs, back.stopped.saved) == (
        "stack x stopped", {1: {"status": "ok"}}, 7, 2, True)


def test_a_stack_starts_over_unless_every_run_has_a_checkpoint_of_its_config_at_one_epoch(tmp_path):
    runs, schedule, loop, dirs, identities = _stopped_after_epoch_1(tmp_path, epochs=3)

    def load(identities, dirs=dirs):
        messages = []
        states = StackCheckpoints(dirs, identities, 0, log=messages.append).load()
        return states, " ".join(messages)

    states, said = load(identities)
    assert states is not None and [s.epoch for s in states] == [1, 1, 1] and said == ""
    changed = [identities[0] | {"seed": 99}, *identities[1:]]
    states, said = load(changed)
    assert states is None and "different config (differs in seed)" in said and "starts over" in said
    (dirs[1] / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    states, said = load(identities)
    assert states is None and "unreadable" in said
    (dirs[1] / CHECKPOINT_NAME).unlink()
    states, said = load(identities)
    assert states is None and "2 have a usable checkpoint" in said
    assert load(identities, [tmp_path / "none"] * 3) == (None, "")


def test_the_launcher_resumes_a_stack_killed_mid_training_from_its_checkpoints(cli, tmp_path):
    # Checkpoints after every epoch: the sweep is killed once epoch 1's are written, 9 epochs before it would end.
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["-m", "profile=smoke", "progress=false", "task.num_train_examples=64", "task.num_test_examples=64",
            "task.seq_len=16", "train.epochs=10", "train.early_stop_accuracy=1", "attention=softmax",
            "optimizer.lr=1e-3,5e-3", "hydra/launcher=stacked", "hydra.sweep.dir=sweep",
            "hydra.launcher.checkpoint_every_s=1e-9"]  # fmt: skip
    sweep = subprocess.Popen([sys.executable, "-m", "mad.run", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while len(list((tmp_path / "sweep").rglob(CHECKPOINT_NAME))) < 2 and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.05)
    assert sweep.poll() is None, "the sweep ended before it was killed: the test needs it mid-training"
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    assert not records_under(tmp_path / "sweep")
    again = cli(args)
    assert again.returncode == 0, again.stderr
    assert "stack of 2 runs resumes after epoch" in again.stdout, again.stdout
    records = records_under(tmp_path / "sweep")
    assert len(records) == 2 and all(r["epochs_run"] == 10 and r["status"] == "ok" for r in records)
    assert not list((tmp_path / "sweep").rglob(CHECKPOINT_NAME)), "finished runs keep no checkpoint"
    bad = cli([*args[:-1], "hydra.launcher.checkpoint_every_s=-1", "hydra.sweep.dir=sweep2"])
    assert bad.returncode == 2 and "checkpoint_every_s must be >= 0 seconds" in bad.stderr


def test_runs_group_by_the_epoch_of_their_checkpoints(tmp_path):
    """Relaunched with other group sizes (or more runs), the runs a stopped stack left resume together: runs stack
    only with runs whose checkpoints hold the same epoch (or that have none)."""
    import dataclasses as dc

    from mad.stacked_run import group_plans, launch_order
    from tests.test_stacked_training import _plan

    plans = []
    for i, epoch in enumerate([None, 150, 150, None, 7, 150]):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        if epoch is not None:
            torch.save({"epoch": epoch}, run_dir / CHECKPOINT_NAME)
        plans.append(dc.replace(_plan(optimizer__lr=10.0**-i), run_dir=run_dir))
    (tmp_path / "run3" / CHECKPOINT_NAME).write_bytes(b"unreadable: grouped as no checkpoint")
    groups = group_plans(plans, max_group=2)
    assert [[p.run_dir.name for p in g] for g in groups] == [["run0", "run3"], ["run1", "run2"], ["run5"], ["run4"]]
    # The launcher starts the stacks that resume first, the most training left first (1 run x 193 epochs before
    # 2 x 50 before 1 x 50), then the rest: a stopped stack finishes before another is started and stopped.
    ordered = [[p.run_dir.name for p in g] for g in launch_order(groups)]
    assert ordered == [["run4"], ["run1", "run2"], ["run5"], ["run0", "run3"]]


def test_a_checkpoint_that_does_not_fit_the_model_starts_the_stack_over(tmp_path):
    runs, schedule, loop, dirs, identities = _stopped_after_epoch_1(tmp_path, epochs=2)
    payload = torch.load(dirs[1] / CHECKPOINT_NAME, weights_only=True)
    name = next(iter(payload["weights"]))
    payload["weights"][name + "_renamed"] = payload["weights"].pop(name)  # as a code change renaming a parameter
    torch.save(payload, dirs[1] / CHECKPOINT_NAME)
    messages = []
    outcomes = train_stacked(runs(), schedule, loop,
                             checkpoints=StackCheckpoints(dirs, identities, 0, log=messages.append))  # fmt: skip
    assert any("do not fit this model" in m and "starts over" in m for m in messages), messages
    assert not any("resumes" in m for m in messages) and [len(o.result.epochs) for o in outcomes] == [2, 2, 2]


def test_a_failed_save_keeps_the_previous_checkpoints_and_training_goes_on(tmp_path, monkeypatch):
    import mad.stack_checkpoint as stack_checkpoint
    from mad.stack_checkpoint import RunState
    from mad.train import TrainResult

    dirs = [tmp_path / f"run{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    messages = []
    saved = StackCheckpoints(dirs, [{"lr": i} for i in range(3)], 1e-9, log=messages.append)

    def state(epoch):
        return RunState(epoch=epoch, weights={"w": torch.zeros(2)}, optimizer_state=[[torch.zeros(2)]],
                        step_counts=[float(epoch)], data_order=torch.Generator().get_state(),
                        result=TrainResult(status="ok"))  # fmt: skip

    saved.save({i: state(1) for i in range(3)})
    real_save, calls = torch.save, []

    def disk_full_at_the_second_file(obj, f):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(stack_checkpoint.torch, "save", disk_full_at_the_second_file)
    saved.save({i: state(2) for i in range(3)})  # no exception: the stack trains on
    assert [checkpoint_epoch(d) for d in dirs] == [1, 1, 1]  # the previous set, whole
    assert not list(tmp_path.rglob("*.tmp")) and any("checkpoint not saved" in m for m in messages)
    saved.discard(0)
    assert not (dirs[0] / CHECKPOINT_NAME).exists()
