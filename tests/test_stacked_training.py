"""Several runs trained as one stack (mad/stacked_*.py, the `stacked` launcher) give the records of the same runs
trained alone, up to floating-point reordering."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend

from hydra_plugins.mad_stacked_launcher.stacked_launcher import (
    check_devices, process_age_s, resolve_devices, worker_slots,
)  # fmt: skip
from mad.config_checks import task_setting
from mad import data as mad_data
from mad.data import Split, load_split
from mad.optim import build_optimizers
from mad.run import build_model, loop_config
from mad.schedules import build_schedules
from mad.stacked_model import StackedModel
from mad.stacked_optim import StackedAdamW, StackedMuon
from mad.stacked_run import RunPlan, group_plans, group_work
from mad.stacked_train import (
    EvalFunction, StackedData, StackedRun, StepFunction, StepOptions, compile_stack, full_steps, train_stacked,
)  # fmt: skip
from mad.stacked_train import build_optimizers as stacked_optimizers
from mad.train import LoopConfig, train
from tests.conftest import REPO, records_under
from tests.forked_python import run_cli, run_script

GRID = [(1e-4, 0.0), (5e-3, 0.1), (2e-2, 0.0)]  # (lr, weight decay): slow, middling, fast learners
SMALL_MODEL = ["model.dim=64", "model.mlp_hidden_dim=176", "attention.num_heads=8"]  # MAD's head dim 8, half the width


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["profile=smoke", "progress=false", *overrides])


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_stacked_optimizers_step_each_run_as_torch_optim_does(name):
    torch.manual_seed(0)
    shapes = [(6, 4), (5, 7), (6, 4)] if name == "muon" else [(6, 4), (3,), (2, 3, 2)]
    lrs, wds = torch.tensor([1e-3, 3e-2, 1e-1]), torch.tensor([0.0, 0.1, 0.3])
    alone = [[torch.randn(s, requires_grad=True) for s in shapes] for _ in range(3)]
    stacked = [torch.stack([run[i].detach() for run in alone]).requires_grad_() for i in range(len(shapes))]
    if name == "adamw":
        torch_opts = [torch.optim.AdamW(p, lr=float(lr), weight_decay=float(wd), betas=(0.9, 0.98), eps=1e-8)
                      for p, lr, wd in zip(alone, lrs, wds)]  # fmt: skip
        ours = StackedAdamW(stacked, lrs, wds, betas=(0.9, 0.98), eps=1e-8)
    else:
        torch_opts = [torch.optim.Muon(p, lr=float(lr), weight_decay=float(wd), adjust_lr_fn="match_rms_adamw")
                      for p, lr, wd in zip(alone, lrs, wds)]  # fmt: skip
        ours = StackedMuon(stacked, lrs, wds, momentum=0.95, nesterov=True, ns_steps=5, adjust_lr_fn="match_rms_adamw")
    for _ in range(5):
        grads = [torch.randn(len(alone), *s) for s in shapes]
        for n, (run, opt) in enumerate(zip(alone, torch_opts)):
            for p, g in zip(run, grads):
                p.grad = g[n].clone()
            opt.step()
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        ours.step()
    tol = 1e-6 if name == "adamw" else 1e-3  # Muon orthogonalises in bf16
    for i in range(len(shapes)):
        want = torch.stack([run[i].detach() for run in alone])
        assert torch.allclose(stacked[i].detach(), want, rtol=0, atol=tol), (stacked[i] - want).abs().max()


@pytest.mark.parametrize("overrides", [("attention=parallax", "task=in_context_recall"),
                                       ("attention=softmax", "task=compression"),
                                       ("attention=parallax_gated", "task=in_context_recall"),
                                       ("attention=parallax_gated", "attention.temperature=learned")])  # fmt: skip
def test_stacked_model_forward_and_select_match_each_module(overrides):
    """Runs folded into the batch: per-run Linear, RMSNorm, Embedding and per-head HeadVector (gate logit,
    log-temperature) slices."""
    cfg = compose_cfg(*overrides)
    modules = []
    for seed in range(3):
        torch.manual_seed(seed)
        modules.append(build_model(cfg))
        for name, p in modules[-1].named_parameters():  # HeadVectors start at 0 in every run: make them differ
            if name.endswith(("gate_logit.weight", "log_temperature.weight")):
                torch.nn.init.normal_(p, std=0.5)
    stacked = StackedModel(modules)
    assert stacked.strategy == "folded"
    tokens = torch.randint(0, cfg.task.vocab_size, (3, 2, cfg.task.seq_len))
    want = torch.stack([m(tokens[i]) for i, m in enumerate(modules)])
    torch.testing.assert_close(stacked(tokens), want, rtol=1e-5, atol=1e-6)
    stacked.select(torch.tensor([2, 0]))
    torch.testing.assert_close(stacked(tokens[[2, 0]]), want[[2, 0]], rtol=1e-5, atol=1e-6)
    assert torch.equal(stacked.load_into(0, build_model(cfg))(tokens[2]), want[2])


@pytest.mark.parametrize("attention,optimizer", [("parallax", "adamw"), ("softmax", "muon"),
                                                 ("parallax_gated", "adamw")])  # fmt: skip
def test_stacked_runs_give_the_records_of_alone_runs(attention, optimizer):
    # Half the smoke width (heads of dim 8 as MAD's) at L=24: every layer kind of the model, a fifth of the cost.
    # The early-stopping threshold below splits this grid's runs under PyTorch's Linear init (the equivalence does
    # not depend on the init).
    cfg = compose_cfg(f"attention={attention}", f"optimizer={optimizer}", "task.num_train_examples=256",
                      "task.num_test_examples=128", *SMALL_MODEL, "task.seq_len=24",
                      "model.linear_init=pytorch")  # fmt: skip
    resolved = OmegaConf.to_container(cfg, resolve=True)
    setting = task_setting(resolved["task"])
    # The lr x wd grid on one seed, and (once: the data path is the same for every model) one more run on another
    # seed: its own weights, data and order in the stack.
    runs_spec = [(lr, wd, cfg.seed) for lr, wd in GRID]
    if attention == "parallax":
        runs_spec.append((GRID[1][0], GRID[1][1], cfg.seed + 1))
    splits = {seed: [load_split(cfg.task.name, s, n, seed, setting, None) for s, n in (("train", 256), ("test", 128))]
              for seed in (cfg.seed, cfg.seed + 1)}  # fmt: skip
    # Early stopping between the learners' accuracies after epoch 2, so that the stack shrinks mid-training (to two
    # or more runs in each case, so that the runs left must keep their own optimizer state and order).
    loop = LoopConfig(epochs=3, batch_size=64, early_stop_accuracy=0.2, seed=cfg.seed, device=torch.device("cpu"),
                      autocast_dtype=None, progress=False, diagnostics_batch=8)  # fmt: skip
    schedule = resolved["train"]["schedule"]

    def fresh_model(seed):
        torch.manual_seed(seed)
        return build_model(cfg)

    alone = []
    for lr, wd, seed in runs_spec:
        model = fresh_model(seed)
        optimizers = build_optimizers(model, dict(resolved["optimizer"], lr=lr, weight_decay=wd))
        schedules = build_schedules(optimizers, schedule, epochs=3)
        alone.append(train(model, optimizers, schedules, *splits[seed], dataclasses.replace(loop, seed=seed)))
    runs = [StackedRun(fresh_model(seed), dict(resolved["optimizer"], lr=lr, weight_decay=wd), *splits[seed], seed=seed)
            for lr, wd, seed in runs_spec]  # fmt: skip
    stacked = [outcome.result for outcome in train_stacked(runs, schedule, loop)]
    epochs = [len(r.epochs) for r in alone]
    shrinks_to_two = len(set(epochs)) > 1 and sum(e > min(epochs) for e in epochs) >= 2
    assert shrinks_to_two, f"test setup: the stack should shrink mid-training to 2 or more runs; epochs {epochs}"
    for a, b in zip(alone, stacked):
        assert (a.status, a.steps, a.early_stopped, len(a.epochs)) == (b.status, b.steps, b.early_stopped, len(b.epochs))
        assert a.best_epoch().epoch == b.best_epoch().epoch
        for ea, eb in zip(a.epochs, b.epochs):
            assert ea.lr == eb.lr
            assert math.isclose(ea.train_loss, eb.train_loss, rel_tol=2e-3)
            assert math.isclose(ea.test_loss, eb.test_loss, rel_tol=2e-3)
            assert abs(ea.test_accuracy - eb.test_accuracy) < 1e-2
        assert len(b.diagnostics) == len(b.epochs) and b.initial_diagnostics == a.initial_diagnostics


def _plan(**changes):
    resolved = {"task": {"name": "in_context_recall", "seq_len": 128, "num_train_examples": 12800}, "seed": 1,
                "train": {"epochs": 200, "batch_size": 128}, "launch": {"device": "auto"},
                "attention": {"_target_": "models.attention.softmax.SoftmaxAttention"},
                "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0}}  # fmt: skip
    for key, value in changes.items():
        section, _, field = key.partition("__")
        resolved[section] = dict(resolved[section], **{field: value}) if field else value
    return RunPlan(cfg=None, resolved=resolved, run_dir=REPO / "x", attention="softmax", repo=REPO)


def test_runs_group_by_everything_but_lr_weight_decay_and_seed():
    grid = [_plan(optimizer__lr=lr, optimizer__weight_decay=wd) for lr in (1e-4, 1e-3) for wd in (0.0, 0.1)]
    other_seed = _plan(seed=2)  # a stack gives each run its own data and order
    launch_only = _plan(launch={"device": "cuda:1"})  # where a run trains does not change what it computes
    other_task = _plan(task={"name": "selective_copying"})
    fla = _plan(attention={"_target_": "models.attention.gla.GatedLinearAttention"})
    groups = group_plans([*grid, other_seed, launch_only, other_task, fla])
    assert [len(g) for g in groups] == [6, 1, 1]
    assert groups[0] == [*grid, other_seed, launch_only] and groups[1] == [other_task] and groups[2] == [fla]
    assert [len(g) for g in group_plans(grid, max_group=3)] == [2, 2]  # evened out: 4 runs in two stacks


def test_long_sequences_stack_fewer_runs_and_start_first():
    def grid(seq_len, examples=12800):
        task = {"name": "in_context_recall", "seq_len": seq_len, "num_train_examples": examples}
        return [_plan(task=task, optimizer__lr=lr, optimizer__weight_decay=wd) for lr in (1e-4, 5e-4, 1e-3)
                for wd in (0.0, 0.1)]  # fmt: skip

    def sizes(groups):
        return sorted(len(g) for g in groups)

    long, mid, short, small = grid(1024), grid(512), grid(128), grid(128, examples=800)
    assert sizes(group_plans(long + mid + short, max_group_tokens=1536)) == [1] * 6 + [3, 3, 6]
    assert sizes(group_plans(long + mid, max_group=2, max_group_tokens=1536)) == [1] * 6 + [2] * 3  # both caps hold
    assert sizes(group_plans(long, max_group_tokens=100)) == [1] * 6  # never fewer than one run
    assert sizes(group_plans(short, max_group_tokens=0)) == [6]
    assert sizes(group_plans(mid, max_group_tokens=2048)) == [3, 3]  # at most 4 at L=512, evened out
    # Most training first: each run at L=1024 (1,024 x 20,000 steps) before the whole grid at L=128 (6 x 128 x 20,000),
    # that before the 800-example grid (6 x 128 x 1,400 steps), whatever order they were planned in.
    groups = sorted(group_plans(small + short + long, max_group_tokens=1536), key=group_work, reverse=True)
    assert [group_work(g) for g in groups] == [1024 * 20000] * 6 + [6 * 128 * 20000, 6 * 128 * 1400]
    assert groups[6] == short and groups[7] == small


def test_launcher_deadlines_count_from_the_process_start_and_nothing_starts_after_stop_at():
    # The module as it is now: Hydra's plugin scan (in any test that composes a config) runs it again, and the
    # classes imported at collection are then not the ones its functions raise.
    from hydra_plugins.mad_stacked_launcher.stacked_launcher import Deadlines, NotStarted

    if sys.platform == "linux":  # /proc: this test process started before this line ran, not at it
        assert process_age_s() > 0
    as_pairs = {limits: (d.start_by, d.stop_by) for limits in [(0, 0), (30, 0), (0, 50), (80, 50), (30, 50)]
                for d in [Deadlines.after(100.0, *limits)]}  # fmt: skip
    assert as_pairs == {(0, 0): (None, None), (30, 0): (130.0, None), (0, 50): (150.0, 150.0),
                        (80, 50): (150.0, 150.0), (30, 50): (130.0, 150.0)}  # fmt: skip
    Deadlines.after(time.time(), 3600, 0).check_start()
    with pytest.raises(NotStarted, match="start_until or stop_at had passed"):
        Deadlines.after(time.time() - 10, 0, 5).check_start()


def test_launcher_spreads_workers_over_the_devices():
    assert resolve_devices("auto", 0) == ["cpu"]
    assert resolve_devices("auto", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert resolve_devices("cuda:0, cuda:2", 4) == ["cuda:0", "cuda:2"]
    assert worker_slots(["cuda:0", "cuda:1"], 3) == ["cuda:0", "cuda:1"] * 3
    with pytest.raises(ValueError, match="workers_per_device"):
        worker_slots(["cpu"], 0)
    with pytest.raises(ValueError, match="lists no device"):
        resolve_devices([], 2)
    check_devices(["cpu", "cuda:0", "cuda:1"], 2)
    with pytest.raises(ValueError, match="has 2 CUDA device"):
        check_devices(["cuda:2"], 2)
    with pytest.raises(ValueError, match="not a device"):
        check_devices(["gpu0"], 2)


def test_stacked_launcher_sweep_writes_alone_format_records_and_resumes(cli, tmp_path):
    args = ["-m", "profile=smoke", "progress=false", "task.num_train_examples=64", "task.num_test_examples=64",
            "task.seq_len=16", "train.epochs=1", "attention=softmax", "optimizer.lr=1e-3,5e-3", "seed=1,2",
            "hydra/launcher=stacked", "hydra.sweep.dir=sweep"]  # fmt: skip
    proc = cli(args)
    assert proc.returncode == 0, proc.stderr
    records = records_under(tmp_path / "sweep")
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"} and {r["stacked_runs"] for r in records} == {4}
    assert sorted((r["lr"], r["seed"]) for r in records) == [(1e-3, 1), (1e-3, 2), (5e-3, 1), (5e-3, 2)]
    assert all((p.parent / ".hydra" / "config.yaml").exists() for p in (tmp_path / "sweep").rglob("result.json"))
    assert "epoch 1/1, 0 of 4 runs training" in proc.stdout  # the heartbeat of progress=false
    again = cli(args)
    assert again.returncode == 0 and "4 runs: 4 already finished" in again.stdout


def test_a_stack_stopped_midway_keeps_the_runs_that_had_finished(tmp_path):
    # lr 1e30 diverges at once and leaves the stack in epoch 1; the other run trains on until the sweep is killed.
    # The diverged run's record must be on disk by then (written as it left, not when the stack ends), and a relaunch
    # must skip it and redo only the killed run.
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "mad.run", "-m", "profile=smoke", "progress=false", "task.num_train_examples=64",
            "task.num_test_examples=64", "task.seq_len=16", "train.epochs=100000", "train.early_stop_accuracy=1",
            "attention=softmax",
            "optimizer.lr=1e-3,1e30", "hydra/launcher=stacked", "hydra.sweep.dir=sweep",
            "hydra.sweep.subdir=lr${optimizer.lr}"]  # fmt: skip
    sweep = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while not list((tmp_path / "sweep").rglob("result.json")) and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # the other run keeps training: the stack has not ended
    assert sweep.poll() is None, "the sweep ended: the test needs its stack still training"
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    (record,) = records_under(tmp_path / "sweep")
    assert (record["lr"], record["status"], record["stacked_runs"]) == (1e30, "diverged", 2)
    dry = run_cli([*args[3:], "dry_run=true"], tmp_path)
    assert dry.stdout.count("done: ") == dry.stdout.count("to run: ") == 1, dry.stdout + dry.stderr


def test_a_group_failing_after_a_run_left_keeps_that_runs_record(tmp_path, monkeypatch):
    import pickle

    import mad.stacked_run as stacked_run
    from hydra_plugins.mad_stacked_launcher.stacked_launcher import _outcome
    from mad.run import validate

    plans = []
    for lr in (1e-3, 5e-3):
        cfg = compose_cfg("profile=smoke", "progress=false", "task.num_train_examples=64", "task.num_test_examples=64",
                          "task.seq_len=16", "train.epochs=1", f"optimizer.lr={lr}")  # fmt: skip
        run_dir = tmp_path / f"lr{lr}"
        run_dir.mkdir()
        plans.append(RunPlan(cfg, validate(cfg, run_dir)[0], run_dir, "softmax", REPO))
    real = stacked_run.train_stacked

    def breaks_after_the_first_run_left(runs, schedule, cfg, *, on_finish, **kwargs):
        def first_then_fail(index, outcome):
            on_finish(index, outcome)
            raise RuntimeError("the stack broke")

        return real(runs, schedule, cfg, on_finish=first_then_fail, **kwargs)

    monkeypatch.setattr(stacked_run, "train_stacked", breaks_after_the_first_run_left)
    with pytest.raises(stacked_run.GroupFailed, match="RuntimeError: the stack broke") as failed:
        stacked_run.run_group(plans, torch.device("cpu"))
    first, second = (json.loads((plan.run_dir / "result.json").read_text()) for plan in plans)
    assert (first["status"], second["status"]) == ("ok", "failed") and "the stack broke" in second["error"]
    error = pickle.loads(pickle.dumps(failed.value))  # as it comes back from a worker process
    assert list(error.finished) == [0] and error.finished[0]["test_accuracy"] == first["test_accuracy"]
    assert _outcome(error, 0) == error.finished[0] and _outcome(error, 1) is error


def test_stacked_launcher_reports_bad_configs_before_training(cli, tmp_path):
    proc = cli(["-m", "profile=smoke", "progress=false", "optimizer.lr=1e-3,-1", "hydra/launcher=stacked",
                "hydra.sweep.dir=sweep"])  # fmt: skip
    assert proc.returncode == 2 and "lr" in proc.stderr
    assert not list(tmp_path.rglob("result.json"))
    proc = cli(["-m", "profile=smoke", "progress=false", "optimizer.lr=1e-3,5e-3", "hydra/launcher=stacked",
                "hydra.launcher.devices=[cuda:7]", "hydra.sweep.dir=sweep2"])  # fmt: skip
    assert proc.returncode == 2 and "cuda:7" in proc.stderr
    assert not list((tmp_path / "sweep2").rglob(".hydra"))  # stopped before any job was planned
    proc = cli(["-m", "profile=smoke", "progress=false", "optimizer.lr=1e-3,5e-3", "hydra/launcher=stacked",
                "hydra.launcher.start_until=-5", "hydra.sweep.dir=sweep3"])  # fmt: skip
    assert proc.returncode == 2 and "start_until must be >= 0 seconds" in proc.stderr
    proc = cli(["-m", "profile=smoke", "progress=false", "optimizer.lr=1e-3,5e-3", "hydra/launcher=stacked",
                "hydra.launcher.stop_at=-1", "hydra.sweep.dir=sweep3"])  # fmt: skip
    assert proc.returncode == 2 and "stop_at must be >= 0 seconds" in proc.stderr
    proc = cli(["-m", "profile=smoke", "progress=false", "optimizer.lr=1e-3,5e-3", "hydra/launcher=stacked",
                "hydra.launcher.deadline_origin=-1", "hydra.sweep.dir=sweep3"])  # fmt: skip
    assert proc.returncode == 2 and "deadline_origin must be a Unix time in seconds" in proc.stderr
    proc = cli(["-m", "profile=smoke", "progress=false", "optimizer.lr=1e-3,5e-3", "hydra/launcher=stacked",
                "hydra.launcher.compile_min_steps=-1", "hydra.sweep.dir=sweep4"])  # fmt: skip
    assert proc.returncode == 2 and "compile_min_steps must be >= 0" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; "
                    "benchmarks/bench_throughput.py checks graph == eager on the GPU before timing")
def test_graph_captured_step_matches_the_eager_step():
    cfg = compose_cfg("attention=softmax")
    device = torch.device("cuda")
    loop = LoopConfig(epochs=1, batch_size=8, early_stop_accuracy=1.0, seed=0, device=device, autocast_dtype=None,
                      progress=False)  # fmt: skip
    states = []
    for graph in (False, True):
        torch.manual_seed(0)
        stacked = StackedModel([build_model(cfg) for _ in range(2)]).to(device)
        opt = StackedAdamW(list(stacked.stacked), torch.tensor([1e-3, 1e-2]), torch.tensor([0.0, 0.1]),
                           betas=(0.9, 0.98), eps=1e-8)  # fmt: skip
        step = StepFunction(stacked, [opt], loop, StepOptions(cuda_graph=graph))
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            tokens = torch.randint(0, 16, (2, 8, 12), generator=gen).to(device)  # [runs, b, T]
            step(tokens, tokens)
        states.append([p.detach().clone() for p in stacked.stacked])
    for eager, graphed in zip(*states):
        assert torch.allclose(eager, graphed, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; "
                    "benchmarks/bench_epoch.py checks the captured test forward against the eager one on the GPU")
def test_captured_evaluation_matches_the_eager_one():
    """Under bf16 autocast, as the sweeps run: new inputs, weights changed in place (an optimizer step) and a stack
    that shrank (new weight tensors) all reach the replayed graph."""
    cfg = compose_cfg("attention=softmax")
    device = torch.device("cuda")
    loop = LoopConfig(epochs=1, batch_size=8, early_stop_accuracy=1.0, seed=0, device=device,
                      autocast_dtype=torch.bfloat16, progress=False)  # fmt: skip
    stacked = StackedModel([build_model(cfg) for _ in range(3)]).to(device).eval()
    tokens = torch.randint(0, 16, (3, 8, 12), device=device)  # [runs, b, T]
    captured, eager = EvalFunction(stacked, loop, cuda_graph=True), EvalFunction(stacked, loop)

    def check(x):
        torch.testing.assert_close(captured(x).float(), eager(x).float(), rtol=1e-2, atol=1e-2)  # bf16 logits

    check(tokens)
    check(tokens.flip(1))
    with torch.no_grad():
        for p in stacked.stacked:
            p.mul_(1.5)
    check(tokens)
    stacked.select(torch.tensor([2, 0], device=device))
    captured.reset()
    check(tokens[:2])
    with pytest.raises(RuntimeError, match="eval mode"):
        EvalFunction(stacked.train(), loop, cuda_graph=True)(tokens[:2])


def test_captured_evaluation_needs_cuda():
    loop = LoopConfig(epochs=1, batch_size=8, early_stop_accuracy=1.0, seed=0, device=torch.device("cpu"),
                      autocast_dtype=None, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="needs a CUDA device"):
        EvalFunction(lambda x: x, loop, cuda_graph=True)


def test_training_loops_let_sdpa_try_cudnn_first(monkeypatch):
    """Both loops (alone and stacked) run the model with cuDNN's attention first in SDPA's order, and restore
    PyTorch's order afterwards."""
    import kernels.sdpa

    sdpa = F.scaled_dot_product_attention
    default = torch._C._get_sdp_priority_order()
    seen = []

    def recording_sdpa(*args, **kwargs):
        seen[-1].append(torch._C._get_sdp_priority_order()[0])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(kernels.sdpa.F, "scaled_dot_product_attention", recording_sdpa)
    cfg = compose_cfg("attention=softmax", "train.epochs=1")
    tokens = torch.randint(0, cfg.task.vocab_size, (16, 12), generator=torch.Generator().manual_seed(0))
    split = Split(tokens[:, :-1], tokens[:, 1:])
    loop = dataclasses.replace(loop_config(cfg, torch.device("cpu")), batch_size=8)
    opt_cfg = {**cfg.optimizer, "betas": list(cfg.optimizer.betas)}
    seen.append([])
    train_stacked([StackedRun(build_model(cfg), opt_cfg, split, split, seed=0)],
                  OmegaConf.to_container(cfg.train.schedule, resolve=True), loop)  # fmt: skip
    seen.append([])
    model = build_model(cfg)
    train(model, build_optimizers(model, opt_cfg), [], split, split, loop)
    for calls in seen:  # stacked, then alone
        assert calls and set(calls) == {int(SDPBackend.CUDNN_ATTENTION)}
    assert torch._C._get_sdp_priority_order() == default


def test_records_archive_resumes_exactly_the_finished_runs(cli, tmp_path):
    from mad.archive import compare, comparison_markdown, pack, unpack
    from mad.archive import main as archive_main

    args = ["-m", "profile=smoke", "progress=false", "task.num_train_examples=64", "task.num_test_examples=64",
            "task.seq_len=16", "train.epochs=1", "attention=softmax", "optimizer.lr=1e-3,5e-3"]  # fmt: skip
    assert cli([*args, "hydra.sweep.dir=first", "hydra.sweep.subdir=lr${optimizer.lr}"]).returncode == 0
    failed = next((tmp_path / "first").rglob("result.json"))  # one run made unfinished: it must not travel
    record = json.loads(failed.read_text())
    failed.write_text(json.dumps(record | {"status": "failed"}))
    assert pack(tmp_path / "first", tmp_path / "records.tar.gz") == 1
    assert unpack(tmp_path / "records.tar.gz", tmp_path / "second") == {"added": 1, "identical": 0, "files": 4, "kept": []}
    assert unpack(tmp_path / "records.tar.gz", tmp_path / "second")["identical"] == 1  # idempotent
    dry = cli([*args, "hydra.sweep.dir=second", "hydra.sweep.subdir=lr${optimizer.lr}", "dry_run=true"])
    assert dry.stdout.count("done: ") == 1 and dry.stdout.count("to run: ") == 1
    # A different finished record is never replaced.
    moved = next((tmp_path / "second").rglob("result.json"))
    moved.write_text(json.dumps(json.loads(moved.read_text()) | {"test_accuracy": 0.5}))
    with pytest.raises(ValueError, match="different finished record"):
        unpack(tmp_path / "records.tar.gz", tmp_path / "second")
    assert json.loads(moved.read_text())["test_accuracy"] == 0.5
    # --keep-existing: the run made unfinished above is finished again, so the archive now brings it (added) and the
    # run that differs here (kept, with its config files untouched).
    failed.write_text(json.dumps(record))
    assert pack(tmp_path / "first", tmp_path / "both.tar.gz") == 2
    run = moved.parent.relative_to(tmp_path / "second").as_posix()
    config = moved.parent / ".hydra" / "config.yaml"
    config.write_text(config.read_text() + "# edited here\n")
    counts = unpack(tmp_path / "both.tar.gz", tmp_path / "second", keep_existing=True)
    assert counts == {"added": 1, "identical": 0, "files": 4, "kept": [run]}
    assert json.loads(moved.read_text())["test_accuracy"] == 0.5 and config.read_text().endswith("# edited here\n")
    assert json.loads((tmp_path / "second" / failed.relative_to(tmp_path / "first")).read_text()) == record
    # compare: only the edited run has a different outcome; the other differs only in how and when it trained.
    other = failed.parent.relative_to(tmp_path / "first").as_posix()
    circumstances = tmp_path / "second" / other / "result.json"
    changed = json.loads(circumstances.read_text())
    changed |= {"started_at": "2000-01-01T00:00:00+00:00", "stacked_runs": 3,
                "config": changed["config"] | {"progress": not changed["config"]["progress"]}}  # fmt: skip
    circumstances.write_text(json.dumps(changed))
    assert pack(tmp_path / "second", tmp_path / "second.tar.gz") == 2
    rows = compare(tmp_path / "both.tar.gz", tmp_path / "second.tar.gz")
    assert [(r["run"], r["same_outcome"]) for r in rows] == sorted([(run, False), (other, True)])
    edited = next(r for r in rows if r["run"] == run)
    first_accuracy = json.loads((tmp_path / "first" / run / "result.json").read_text())["test_accuracy"]
    assert edited["test_accuracy a"] == first_accuracy and edited["test_accuracy b"] == 0.5
    summary = comparison_markdown(rows)
    assert summary.startswith("2 runs in both archives: 1 with the same outcome, 1 different (only in a: 0, only in b: 0)")
    assert f"| {run} |" in summary and f"| {other} |" not in summary
    assert compare(tmp_path / "records.tar.gz", tmp_path / "second.tar.gz")[1:] == [{"run": other, "only_in": "b"}]
    # The command line: the default stops at the conflict, --keep-existing merges, compare prints the summary.
    assert archive_main(["unpack", str(tmp_path / "both.tar.gz"), "-C", str(tmp_path / "second")]) == 2
    keep = ["unpack", str(tmp_path / "both.tar.gz"), "-C", str(tmp_path / "second"), "--keep-existing"]
    assert archive_main(keep) == 0
    assert archive_main(["compare", str(tmp_path / "both.tar.gz"), str(tmp_path / "second.tar.gz")]) == 0


def test_stacked_launcher_spreads_groups_over_worker_processes(cli, tmp_path):
    # Two groups of one run (at most 16 tokens per stack, L=16) on two worker processes: plans travel to spawned
    # workers and back.
    proc = cli(["-m", "profile=smoke", "progress=false", "task.num_train_examples=64", "task.num_test_examples=64",
                "task.seq_len=16", "train.epochs=1", "attention=softmax", "optimizer.weight_decay=0.0,0.1",
                "hydra/launcher=stacked", "hydra.launcher.devices=[cpu,cpu]", "hydra.launcher.max_group_tokens=16",
                "hydra.sweep.dir=sweep"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = records_under(tmp_path / "sweep")
    assert sorted((r["weight_decay"], r["stacked_runs"], r["status"]) for r in records) == [(0.0, 1, "ok"), (0.1, 1, "ok")]
    assert "2 runs: 2 ran now: ok" in proc.stdout


@pytest.mark.parametrize("devices", ["[cpu]", "[cpu,cpu]"])  # in this process; in spawned worker processes
def test_no_group_starts_after_start_until(cli, tmp_path, devices):
    # A deadline already passed when training begins (planning alone takes longer than 1 ms): nothing trains, the
    # sweep says so, and a relaunch without the limit trains every run.
    args = ["-m", "profile=smoke", "progress=false", "task.num_train_examples=64", "task.num_test_examples=64",
            "task.seq_len=16", "train.epochs=1", "attention=softmax", "optimizer.weight_decay=0.0,0.1",
            "hydra/launcher=stacked", f"hydra.launcher.devices={devices}", "hydra.launcher.max_group=1",
            "hydra.sweep.dir=sweep"]  # fmt: skip
    late = cli([*args, "hydra.launcher.start_until=0.001"])
    assert late.returncode == 0, late.stderr
    assert "2 runs in 2 groups not started: hydra.launcher.start_until=0.001 s had passed" in late.stdout, late.stdout
    assert not records_under(tmp_path / "sweep") and "2 no record (not started, killed or crashed)" in late.stdout
    if devices == "[cpu]":  # a limit not yet reached holds nothing back
        again = cli([*args, "hydra.launcher.start_until=3600"])
        assert again.returncode == 0 and "2 runs: 2 ran now: ok" in again.stdout and "not started" not in again.stdout


def test_throughput_benchmark_cpu_smoke(tmp_path):
    proc = run_script("benchmarks/bench_throughput.py", ["--cpu-smoke", "--steps", "1", "--attentions", "softmax",
                                                         "--out", tmp_path], cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "throughput.md").read_text()
    assert "| softmax | 16 | stacked | 6 |" in table and "5,384,400" in table and "not a measurement" in table


def test_epoch_benchmark_cpu_smoke(tmp_path):
    both = ["--eval-eager", "--sdpa-default"]
    for switches, stem in (([], "epoch_softmax"), (both, "epoch_softmax_eval_eager_sdpa_default")):
        proc = run_script("benchmarks/bench_epoch.py", ["--cpu-smoke", *switches, "--out", tmp_path], cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        table = (tmp_path / f"{stem}.md").read_text()
        assert "| 16 |" in table and "GPU-minutes** for softmax" in table and "not a measurement" in table


def test_step_profile_script_runs_on_cpu(tmp_path):
    proc = run_script("benchmarks/profile_step.py", ["--seq-len", "16", "--runs", "2", "--top", "3", "--attentions",
                                                     "softmax", "--out", tmp_path], cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "step_profile_L16.md").read_text()
    assert "## softmax, one run:" in table and "## softmax, stack of 2:" in table and "not a measurement" in table


def test_stacked_model_moves_its_shared_buffers_with_it():
    stacked = StackedModel([build_model(compose_cfg("attention=softmax")) for _ in range(2)])
    assert stacked.buffers_of_all and all(b.dtype == torch.float32 for b in stacked.buffers_of_all.values())
    stacked.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in stacked.buffers_of_all.values())


class BareScale(torch.nn.Module):
    """A parameter outside the foldable layers (a bare nn.Parameter): a stack of these runs through torch.vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 6)
        self.scale = torch.nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


@pytest.mark.parametrize("autocast", [False, True])
def test_a_module_that_cannot_fold_runs_vmapped_as_each_module(autocast):
    """vmap is the fallback for any parameter outside Linear/RMSNorm/Embedding/HeadVector; under autocast it must
    cast linear biases as F.linear does (else q, k, v came out float32 beside a bf16 probe on the H200)."""
    torch.manual_seed(0)
    modules = [BareScale() for _ in range(3)]
    stacked = StackedModel(modules)
    assert stacked.strategy == "vmap"
    x = torch.randn(3, 2, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want = torch.stack([m(x[i]) for i, m in enumerate(modules)])
        got = stacked(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2 if autocast else 1e-6, atol=2e-2 if autocast else 1e-6)


@pytest.mark.parametrize("attention", ["softmax", "parallax", "parallax_gated", "sliding_window"])
def test_stacked_model_under_autocast_computes_what_each_module_does(attention):
    """Under bf16 autocast each run of a (folded) stack computes what its own module does, forward and backward."""
    cfg = compose_cfg(f"attention={attention}")
    modules = []
    for seed in range(3):
        torch.manual_seed(seed)
        modules.append(build_model(cfg))
    stacked = StackedModel(modules)
    tokens = torch.randint(0, cfg.task.vocab_size, (3, 2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.stack([m(tokens[i]) for i, m in enumerate(modules)])
        got = stacked(tokens)
        got.float().square().sum().backward()
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stacked.stacked)


def test_short_stacks_skip_compiling():
    """A compile (~20 s) pays back only over enough steps: `compile_min_steps` turns it off for stacks of fewer
    `full_steps` (what a run trains without stopping early, as train_stacked counts them)."""
    cfg = compose_cfg("attention=softmax", "model.dim=16", "model.num_layers=2", "attention.num_heads=2")
    tokens = torch.randint(0, cfg.task.vocab_size, (20, 8), generator=torch.Generator().manual_seed(0))
    split = Split(tokens[:, :-1], tokens[:, 1:])  # 20 sequences: batches of 8, 8 and 4
    loop = LoopConfig(epochs=2, batch_size=8, early_stop_accuracy=2.0, seed=0, device=torch.device("cpu"),
                      autocast_dtype=None, progress=False)  # fmt: skip
    runs = [StackedRun(build_model(cfg), {**cfg.optimizer, "betas": list(cfg.optimizer.betas)}, split, split, seed=0)]
    schedule = OmegaConf.to_container(cfg.train.schedule, resolve=True)
    assert full_steps(runs, loop) == 6 == train_stacked(runs, schedule, loop)[0].result.steps
    options = StepOptions(cuda_graph=True, compile=True, compile_min_steps=5000)
    assert options.for_steps(400) == StepOptions(cuda_graph=True, compile=False, compile_min_steps=5000)
    assert options.for_steps(5000) == options and options.for_steps(20_000) == options
    assert StepOptions(cuda_graph=True, compile=True).for_steps(1).compile  # 0: every stack compiles


@pytest.mark.parametrize("options", [StepOptions(cuda_graph=True), StepOptions(compile=True)])
def test_cuda_step_options_turn_off_on_cpu(options):
    """The launcher's CUDA-only switches fall back to the eager step on the CPU; asking the CPU step for them
    directly is an error that names the device."""
    cpu = torch.device("cpu")
    assert options.for_device(cpu) == StepOptions()
    assert options.for_device(torch.device("cuda")) == options
    cfg = compose_cfg("attention=softmax")
    loop = LoopConfig(epochs=1, batch_size=8, early_stop_accuracy=1.0, seed=0, device=cpu, autocast_dtype=None,
                      progress=False)  # fmt: skip
    stacked = StackedModel([build_model(cfg) for _ in range(2)])
    with pytest.raises(ValueError, match="needs a CUDA device"):
        StepFunction(stacked, [], loop, options)


def test_compiled_step_survives_the_stack_shrinking():
    """After finished runs leave the stack, a `torch.compile`d forward (traced by dynamo and AOTAutograd, as on the
    GPU; the aot_eager backend skips only inductor's code generation) gives the eager step's losses. Stale gradients
    of the old stack size once broke the retrace."""
    # A two-layer model of width 16 (heads of dim 8): AOTAutograd traces every layer, so its size sets the compile time.
    cfg = compose_cfg("attention=parallax", "task.seq_len=16", "train.batch_size=4", "model.dim=16",
                      "model.mlp_hidden_dim=48", "model.num_layers=2", "attention.num_heads=2")  # fmt: skip
    loop = loop_config(cfg, torch.device("cpu"))
    tokens = torch.randint(0, 16, (3, 4, 15), generator=torch.Generator().manual_seed(0))  # [runs, b, T]
    losses = []
    for compiled in (False, True):
        torch.manual_seed(0)
        models = [build_model(cfg) for _ in range(3)]
        stacked = StackedModel(models)
        opt_cfg = {**cfg.optimizer, "betas": list(cfg.optimizer.betas)}
        configs = [dict(opt_cfg, lr=1e-3 * (i + 1), weight_decay=0.1) for i in range(3)]
        optimizers = stacked_optimizers(stacked, models[0], configs)
        step = StepFunction(stacked, optimizers, loop)
        if compiled:
            step.forward = compile_stack(stacked, backend="aot_eager")
        seen = []
        for size in (3, 2):
            seen += [step(tokens[:size], tokens[:size]) for _ in range(2)]
            keep = torch.arange(size - 1)  # the last run leaves the stack
            stacked.select(keep)
            for opt in optimizers:
                opt.select(keep)
        seen += [step(tokens[:1], tokens[:1]) for _ in range(2)]  # one run left
        losses.append(torch.cat(seen))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


# The default limit, which compile_stack raises. Dynamo's own patch: monkeypatch's undo deletes a config key that is
# not in the module's __dict__, and every later compile in the process then fails.
@torch._dynamo.config.patch(recompile_limit=8)
def test_every_size_of_every_stack_compiles():
    """Dynamo compiles a stack once per size and, by default, runs a function eagerly after 8 compiles in a process:
    a 9-run stack shrinking to one run, then another stack in the same process, must still compile every size."""
    cfg = compose_cfg("attention=softmax", "model.dim=16", "model.num_layers=2", "attention.num_heads=2",
                      "task.seq_len=8")  # fmt: skip
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    tokens = torch.randint(0, cfg.task.vocab_size, (9, 2, 7), generator=torch.Generator().manual_seed(0))
    for runs in (9, 2):
        stacked = StackedModel([build_model(cfg) for _ in range(runs)])
        forward = compile_stack(stacked, backend=counting_backend)
        before = len(graphs)
        with torch.no_grad():
            for size in range(runs, 0, -1):
                torch.testing.assert_close(forward(tokens[:size]), stacked(tokens[:size]))
                stacked.select(torch.arange(size - 1))
        assert len(graphs) - before == runs  # one graph per size: none ran eagerly


def test_stacked_data_serves_each_run_its_own_batches():
    """Each active run gets the train batches mad.data.train_batches gives it alone (its split, its seed's order,
    the partial last batch) and its own test batches, while runs leave; runs of one seed share one stored split."""
    def split(seed, n):
        gen = torch.Generator().manual_seed(seed)
        return Split(torch.randint(0, 9, (n, 5), generator=gen), torch.randint(-1, 9, (n, 5), generator=gen))

    pairs = {seed: (split(seed, 23), split(seed + 100, 13)) for seed in (3, 7)}
    runs = [StackedRun(None, {}, *pairs[seed], seed=seed) for seed in (3, 3, 7, 7, 3)]
    data = StackedData(runs, torch.device("cpu"))
    assert data.train.inputs.shape[0] == 2  # two seeds, two stored splits
    alone = [torch.Generator().manual_seed(r.seed) for r in runs]
    active = list(range(len(runs)))
    for _ in range(3):
        want = {run: list(mad_data.train_batches(runs[run].train_split, 4, alone[run])) for run in active}
        got = list(data.train_batches(active, 4))
        assert len(got) == 6 and got[-1][0].shape == (len(active), 3, 5)
        for i, (x, y) in enumerate(got):
            for pos, run in enumerate(active):
                assert torch.equal(x[pos], want[run][i][0]) and torch.equal(y[pos], want[run][i][1])
        for i, (x, y) in enumerate(data.test_batches(active, 4)):
            for pos, run in enumerate(active):
                expected = list(mad_data.test_batches(runs[run].test_split, 4))[i]
                assert torch.equal(x[pos], expected[0]) and torch.equal(y[pos], expected[1])
        active = active[1:]  # a run leaves the stack; the others keep their own order
