"""Multiruns through `python -m mad.run -m`: presets, resume after kill -9, parallel launchers, GPU slots."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mad.devices import try_lease
from mad.setting_configs import CONF_DIR, expected_files
from tests.conftest import REPO, records_under
from tests.forked_python import run_cli

TINY = ["profile=smoke", "progress=false", "task.num_train_examples=64", "task.num_test_examples=64",
        "task.seq_len=16", "train.epochs=1"]  # fmt: skip
GRID_2x2 = ["attention=softmax,parallax", "optimizer=adamw,muon"]


def test_mad_setting_configs_are_up_to_date():
    assert {p.name: p.read_text() for p in CONF_DIR.glob("*.yaml")} == expected_files()
    assert len(expected_files()) == 66


def test_mad_preset_dry_run_lists_the_grid_of_every_setting(cli, tmp_path):
    # The preset sweeps glob(*) over the 66 settings (checked above); one task's 3 vocabulary sizes keep the test
    # quick (a dry run composes every job's config: ~0.35 s each).
    proc = cli(["-m", "+sweep=mad", "attention=softmax", "optimizer=adamw",
                "mad_setting=glob(in_context_recall__vocab_size_*)", "dry_run=true", "hydra.sweep.dir=sweep"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("to run: ") == 3 * 6
    assert "18 runs: 18 to run" in proc.stdout
    assert not list(tmp_path.rglob("result.json"))  # a dry run trains nothing


def test_unknown_sweep_preset_names_the_choices(cli):
    proc = cli(["-m", "+sweep=nope", *TINY])
    assert proc.returncode != 0 and "Could not find 'sweep/nope'" in proc.stderr
    assert "mad" in proc.stderr and "smoke" in proc.stderr


def test_multirun_2x2_then_leaderboard(cli, tmp_path):
    proc = cli(["-m", *GRID_2x2, *TINY, "hydra.sweep.dir=sweep"])
    assert proc.returncode == 0, proc.stderr
    records = records_under(tmp_path / "sweep")
    assert sorted((r["attention"], r["optimizer"], r["status"]) for r in records) == [
        ("parallax", "adamw", "ok"), ("parallax", "muon", "ok"), ("softmax", "adamw", "ok"), ("softmax", "muon", "ok")]
    assert "4 runs: 4 ran now: ok" in proc.stdout
    board = cli(["sweep", "--out", "board"], module="mad.leaderboard")
    assert board.returncode == 0, board.stderr
    assert (tmp_path / "board" / "leaderboard.md").exists()


def test_relaunch_skips_finished_runs_and_force_redoes_them(cli, tmp_path):
    args = ["-m", "attention=softmax", "optimizer=adamw,muon", *TINY, "hydra.sweep.dir=sweep", "hydra.sweep.subdir=${optimizer.name}"]
    assert cli(args).returncode == 0
    first = {r["optimizer"]: r["started_at"] + r["finished_at"] for r in records_under(tmp_path / "sweep")}
    again = cli(args)
    assert again.stdout.count("already finished (ok), skipped") == 2 and "2 runs: 2 already finished" in again.stdout
    assert {r["optimizer"]: r["started_at"] + r["finished_at"] for r in records_under(tmp_path / "sweep")} == first
    dry = cli([*args, "dry_run=true"])
    assert dry.stdout.count("done: ") == 2
    time.sleep(1.1)  # timestamps in records have one-second resolution
    forced = cli([*args, "force=true"])
    assert "2 ran now: ok" in forced.stdout
    assert all(r["started_at"] + r["finished_at"] != first[r["optimizer"]] for r in records_under(tmp_path / "sweep"))


def test_the_sweep_summary_tells_runs_of_this_launch_from_records_finished_just_before(tmp_path, capsys):
    """A relaunch at once after a sweep (its records written less than a second before): Hydra rewrites every
    job's config, one job trains again and rewrites its record, the other is skipped."""
    from omegaconf import OmegaConf

    from mad.results import SCHEMA_VERSION, write_json_atomically
    from mad.sweep_summary import SweepSummary

    sweep = tmp_path / "sweep"
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "dry_run": False})
    for job in ("skipped", "rerun"):  # the first sweep: a job's config is written as it starts, its record at the end
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "config.yaml").write_text("seed: 1\n")
        os.utime(sweep / job / ".hydra" / "config.yaml", (time.time() - 60,) * 2)
        write_json_atomically(sweep / job / "result.json", {"schema": SCHEMA_VERSION, "status": "ok"})
    summary = SweepSummary()
    summary.on_multirun_start(config)
    for job in ("skipped", "rerun"):
        (sweep / job / ".hydra" / "config.yaml").write_text("seed: 1\n")
    write_json_atomically(sweep / "rerun" / "result.json", {"schema": SCHEMA_VERSION, "status": "diverged"})
    summary.on_multirun_end(config)
    assert "2 runs: 1 already finished, 1 ran now: diverged" in capsys.readouterr().out


def test_a_finished_record_of_another_config_is_never_overwritten(cli, tmp_path):
    assert cli([*TINY, "hydra.run.dir=run"]).returncode == 0
    before = (tmp_path / "run" / "result.json").read_text()
    proc = cli([*TINY, "attention=parallax", "hydra.run.dir=run"])
    assert proc.returncode != 0 and "already holds a finished run of a different config" in proc.stderr
    assert (tmp_path / "run" / "result.json").read_text() == before


def test_a_finished_record_resumes_under_another_sweep_name_but_not_another_model(tmp_path):
    """A preset's folder name (`sweep.name`) and launch settings change nothing a run computes: its finished record
    is found from a sweep of another name, so records carried between folders are never retrained."""
    from mad.config_checks import ConfigError
    from mad.resume import finished_record

    proc = run_cli([*TINY, "+sweep.name=first", "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (record,) = records_under(tmp_path / "run")
    config = json.loads(json.dumps(record["config"]))
    config["sweep"] = {"name": "second", "leaderboard": True}
    config["launch"] = {**config.get("launch", {}), "softmax_kernel": "fla"}
    assert finished_record(tmp_path / "run", config, force=False)["finished_at"] == record["finished_at"]
    config["model"]["linear_init"] = "pytorch" if config["model"]["linear_init"] == "normal" else "normal"
    with pytest.raises(ConfigError, match="differs in model.linear_init"):
        finished_record(tmp_path / "run", config, force=False)


def test_resume_after_kill_9_redoes_only_unfinished_runs(tmp_path):
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "mad.run", "-m", "optimizer.lr=1e-4,2e-4,3e-4,4e-4", *TINY, "hydra.sweep.dir=sweep",
            "hydra.sweep.subdir=${optimizer.lr}"]  # fmt: skip
    sweep = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while len(list((tmp_path / "sweep").rglob("result.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    survivors = {p.parent.name: p.read_text() for p in (tmp_path / "sweep").rglob("result.json")}
    assert 2 <= len(survivors) < 4
    for text in survivors.values():
        assert json.loads(text)["status"] == "ok"  # a kill never leaves a partial record
    resumed = run_cli(args[3:], tmp_path)  # the relaunch: python -m mad.run, as the killed sweep
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("already finished (ok), skipped") == len(survivors)
    final = {p.parent.name: p.read_text() for p in (tmp_path / "sweep").rglob("result.json")}
    assert len(final) == 4 and all(final[name] == text for name, text in survivors.items())


def test_two_concurrent_joblib_workers(cli, tmp_path):
    proc = cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer=adamw,muon", *TINY,
                "hydra.sweep.dir=sweep"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = records_under(tmp_path / "sweep")
    assert sorted(r["optimizer"] for r in records) == ["adamw", "muon"] and {r["status"] for r in records} == {"ok"}


def test_submitit_local_launcher(cli, tmp_path):
    proc = cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "optimizer=adamw,muon", *TINY,
                "hydra.sweep.dir=sweep"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["optimizer"] for r in records_under(tmp_path / "sweep")) == ["adamw", "muon"]


def test_slurm_launcher_config_composes(cli):
    proc = cli(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", *TINY, "--cfg", "hydra", "-p", "hydra.launcher"])
    assert proc.returncode == 0, proc.stderr
    assert "submitit_launcher.SlurmLauncher" in proc.stdout
    assert "partition: gpu" in proc.stdout and "gpus_per_node: 1" in proc.stdout


def test_gpu_slots_spread_runs_over_gpus_first(tmp_path):
    leases = [try_lease(num_devices=2, slots_per_device=2, lock_dir=tmp_path) for _ in range(4)]
    assert [(lease.device_index, lease.slot) for lease in leases] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert try_lease(num_devices=2, slots_per_device=2, lock_dir=tmp_path) is None
    leases[1].release()
    again = try_lease(num_devices=2, slots_per_device=2, lock_dir=tmp_path)
    assert (again.device_index, again.slot) == (1, 0)


def test_gpu_slot_is_released_when_its_process_dies(tmp_path):
    code = ("import sys, time; from pathlib import Path; from mad.devices import try_lease; "
            "l = try_lease(1, 1, Path(sys.argv[1])); print(l.device_index, flush=True); time.sleep(60)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": str(REPO)})  # fmt: skip
    assert holder.stdout.readline().strip() == "0"
    assert try_lease(1, 1, tmp_path) is None
    holder.kill()
    holder.wait()
    assert try_lease(1, 1, tmp_path) is not None
