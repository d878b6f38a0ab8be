"""`python -m mad.run [overrides]`: train one model on one MAD task setting and write its `result.json`.

    python -m mad.run attention=parallax optimizer=muon
    python -m mad.run task=selective_copying task.num_tokens_to_copy=32 optimizer.lr=1e-3
    python -m mad.run profile=smoke          # CPU-sized; not comparable with published MAD scores
"""

from __future__ import annotations

import functools
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd, instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from mad.config_checks import ConfigError, check_config, task_setting
from mad.convert import check_fit, load_converted, load_source
from mad.data import load_split
from mad.devices import choose_device
from mad.optim import build_optimizers
from mad.results import (
    RECORD_NAME, SCHEMA_VERSION, WEIGHTS_NAME, describe_device, git_revision, package_versions, write_json_atomically,
)  # fmt: skip
from mad.resume import finished_record
from mad.schedules import build_schedules, check_schedule
from mad.train import LoopConfig, TrainResult, train
from models.backbone import AutoEncoder, LanguageModel, count_parameters
from models.mlp import SwiGLU


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """The task's backbone around the configured mixer (the attention yaml's `_target_`) and SwiGLU."""
    task, m = cfg.task, cfg.model
    mixer = instantiate(cfg.attention)  # a partial: width -> module
    kernel = OmegaConf.select(cfg, "launch.softmax_kernel", default="sdpa")
    if kernel != "sdpa":  # check_config has made sure that the attention is softmax
        mixer = functools.partial(mixer, kernel=kernel)

    def mlp(dim: int) -> SwiGLU:
        return SwiGLU(dim, hidden_dim=m.mlp_hidden_dim)

    common = dict(dim=m.dim, num_layers=m.num_layers, mixer=mixer, mlp=mlp, norm_eps=m.norm_eps)
    if task.backbone == "autoencoder":
        return AutoEncoder(task.vocab_size, seq_len=task.seq_len, **common)
    return LanguageModel(task.vocab_size, linear_init=m.linear_init, **common)


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU and float32 on CPU for `auto`; None means no autocast (float32)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def launch(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Validate; then skip (already finished), list (dry run) or train the run. Returns its record, if any."""
    resolved, previous = validate(cfg, run_dir)
    if cfg.dry_run:
        Console(soft_wrap=True).print(f"{'done' if previous else 'to run'}: {run_dir}")
        return previous
    if previous:
        Console(soft_wrap=True).print(f"already finished ({previous['status']}), skipped: {run_dir / RECORD_NAME}")
        return previous
    device, lease = choose_device(cfg.launch.device, runs_per_gpu=cfg.launch.runs_per_gpu,
                                  lock_dir=Path(cfg.launch.gpu_lock_dir))  # fmt: skip
    try:
        record = run(cfg, resolved, run_dir, device, attention=HydraConfig.get().runtime.choices.get("attention"),
                     repo=Path(get_original_cwd()))  # fmt: skip
    finally:
        if lease is not None:
            lease.release()
    print_summary(record, run_dir)
    return record


def validate(cfg: DictConfig, run_dir: Path) -> tuple[dict, dict | None]:
    """(the resolved config, the finished record of this config in `run_dir` or None); ConfigError if bad."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    check_config(resolved)
    _check_schedule_and_diagnostics(resolved)
    return resolved, finished_record(run_dir, resolved, force=cfg.force)


def run(cfg: DictConfig, resolved: dict, run_dir: Path, device: torch.device, *, attention: str, repo: Path) -> dict:
    """Build, train and record one validated run; returns the record written to `run_dir / result.json`.

    `attention` is the preset's name (Hydra's choice) and `repo` the launch directory, both for the record.
    """
    model = initial_model(cfg, resolved)  # raises ValueError on impossible layer settings, before any data work
    optimizers = build_optimizers(model, resolved["optimizer"])
    schedules = build_schedules(optimizers, resolved["train"]["schedule"], epochs=cfg.train.epochs)
    record = record_header(cfg, resolved, model, device, attention=attention, repo=repo)
    started = time.perf_counter()
    try:
        train_split, test_split = load_splits(cfg, resolved)
        result = train(model, optimizers, schedules, train_split, test_split, loop_config(cfg, device))
    except Exception as e:
        fail_record(record, e, run_dir, time.perf_counter() - started)
        raise
    finish_record(record, result, model.state_dict(), run_dir, time.perf_counter() - started)
    return record


def initial_model(cfg: DictConfig, resolved: dict) -> torch.nn.Module:
    """The run's model as it starts training: seeded initialisation, or the converted `init_from` weights."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    if cfg.init_from:
        source, weights = load_source(Path(to_absolute_path(cfg.init_from)))
        check_fit(source, resolved)
        load_converted(model, weights)
    return model


def load_splits(cfg: DictConfig, resolved: dict):
    """(train, test) of the run's task setting and seed, through the dataset cache."""
    cache = Path(to_absolute_path(cfg.data_cache)) if cfg.data_cache else None
    setting = task_setting(resolved["task"])
    task = cfg.task
    return tuple(load_split(task.name, split, n, cfg.seed, setting, cache)
                 for split, n in (("train", task.num_train_examples), ("test", task.num_test_examples)))  # fmt: skip


def loop_config(cfg: DictConfig, device: torch.device) -> LoopConfig:
    return LoopConfig(
        epochs=cfg.train.epochs,
        batch_size=cfg.train.batch_size,
        early_stop_accuracy=cfg.train.early_stop_accuracy,
        seed=cfg.seed,
        device=device,
        autocast_dtype=autocast_dtype_for(cfg.train.precision, device),
        progress=cfg.progress,
        diagnostics_batch=cfg.diagnostics_batch if cfg.diagnostics else 0,
    )


def fail_record(record: dict, error: Exception, run_dir: Path, wall_time_s: float) -> None:
    """Write `record` as `failed` with the error that ended the run (atomically)."""
    record.update(status="failed", error=f"{type(error).__name__}: {error}", wall_time_s=wall_time_s)
    write_json_atomically(run_dir / RECORD_NAME, record)


def finish_record(record: dict, result: TrainResult, weights: dict, run_dir: Path, wall_time_s: float) -> None:
    """Complete `record` with the training result; write the final weights, then the record (atomically)."""
    record.update(_summary(result), wall_time_s=wall_time_s)
    torch.save(weights, run_dir / WEIGHTS_NAME)
    write_json_atomically(run_dir / RECORD_NAME, record)


def _check_schedule_and_diagnostics(cfg: dict) -> None:
    """The schedule and diagnostics settings (mad/schedules.py, mad/diagnostics.py); ConfigError names the fix."""
    try:
        check_schedule(cfg["train"]["schedule"], cfg["train"]["epochs"])
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if not isinstance(cfg["diagnostics"], bool):
        raise ConfigError(f"diagnostics must be true or false, got {cfg['diagnostics']!r}")
    batch = cfg["diagnostics_batch"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"diagnostics_batch must be a positive integer (test sequences), got {batch!r}")


def record_header(cfg: DictConfig, resolved: dict, model: torch.nn.Module, device: torch.device, *, attention: str,
                  repo: Path) -> dict:  # fmt: skip
    """The record of a run about to train (status `running`); `attention` is the preset's name (Hydra's choice)."""
    return {
        "schema": SCHEMA_VERSION,
        "status": "running",
        "error": None,
        "task": cfg.task.name,
        "setting": task_setting(resolved["task"]) | {
            "num_train_examples": cfg.task.num_train_examples, "num_test_examples": cfg.task.num_test_examples},
        "attention": attention,
        "optimizer": cfg.optimizer.name,
        "lr": cfg.optimizer.lr,
        "weight_decay": cfg.optimizer.weight_decay,
        "seed": cfg.seed,
        "profile": cfg.profile.name,
        "comparable_with_published_mad": cfg.profile.comparable,
        "config": resolved,
        "num_params": count_parameters(model),
        "device": describe_device(device),
        "versions": package_versions(),
        "git": git_revision(repo),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def _summary(result: TrainResult) -> dict:
    best = result.best_epoch()
    return {
        "status": result.status,
        "diverged_at_step": result.diverged_at_step,
        "best_epoch": best.epoch if best else None,
        "test_accuracy": best.test_accuracy if best else None,  # MAD's macro accuracy at the lowest-perplexity epoch
        "test_token_accuracy": best.test_token_accuracy if best else None,
        "test_perplexity": best.test_perplexity if best else None,
        "test_loss": best.test_loss if best else None,
        "epochs_run": len(result.epochs),
        "early_stopped": result.early_stopped,
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "tokens_per_s": result.train_tokens / result.train_seconds if result.train_seconds else None,
        "history": result.history(),
        **({} if result.initial_diagnostics is None else {"diagnostics_at_init": result.initial_diagnostics}),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def print_summary(record: dict, run_dir: Path) -> None:
    console = Console(soft_wrap=True)
    note = "" if record["comparable_with_published_mad"] else (
        "  [yellow](profile " + record["profile"] + ": not comparable with published MAD scores)[/yellow]")
    acc = record["test_accuracy"]
    console.print(
        f"[bold]{record['task']}[/bold] {record['attention']} + {record['optimizer']} (lr {record['lr']:g}, "
        f"wd {record['weight_decay']:g}): status [bold]{record['status']}[/bold], "
        f"test accuracy {acc if acc is None else f'{acc:.4f}'} at epoch {record['best_epoch']}"
        f" of {record['epochs_run']}{note}\n  record: {run_dir / RECORD_NAME}"
    )  # fmt: skip


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return launch(cfg, run_dir)
    except ConfigError as e:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
