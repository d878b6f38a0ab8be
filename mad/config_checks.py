"""Checks on a resolved run config, made before any data is generated or any file is written.

Each failure raises `ConfigError` naming the bad value, what is allowed, and the override that fixes it.
"""

from __future__ import annotations

import torch

from kernels.softmax import check_kernel
from mad.optim import OPTIMIZERS
from mad.tasks import TASKS, check_setting

BACKBONES = ("language_model", "autoencoder")
PRECISIONS = ("auto", "bf16", "fp32")
TASK_BOOKKEEPING = ("name", "backbone", "num_train_examples", "num_test_examples")


class ConfigError(ValueError):
    """A run config that cannot be trained."""


def task_setting(task_cfg: dict) -> dict:
    """The generator keywords of a task config (everything but its bookkeeping fields)."""
    return {k: v for k, v in task_cfg.items() if k not in TASK_BOOKKEEPING}


def check_config(cfg: dict) -> None:
    _check_task(cfg["task"])
    _check_model(cfg["model"], cfg["attention"])
    _check_optimizer(cfg["optimizer"])
    _check_train(cfg["train"])
    _check_launch(cfg["launch"])
    _check_softmax_kernel(cfg["launch"], cfg["attention"])


def _check_task(task: dict) -> None:
    if task["name"] not in TASKS:
        raise ConfigError(f"unknown task {task['name']!r}; valid tasks: {', '.join(TASKS)}")
    needed = "autoencoder" if task["name"] == "compression" else "language_model"
    if task["backbone"] != needed:
        raise ConfigError(
            f"task {task['name']} needs the {needed} backbone, got {task['backbone']!r}; use task.backbone={needed}"
        )
    for key in ("num_train_examples", "num_test_examples"):
        _positive_int(f"task.{key}", task[key])
    try:
        check_setting(task["name"], **task_setting(task))
    except ValueError as e:
        raise ConfigError(f"task {task['name']}: {e}") from e


def _check_model(model: dict, attention: dict) -> None:
    _positive_int("model.dim", model["dim"])
    heads = attention.get("num_heads")
    if heads is not None and (heads < 1 or model["dim"] % heads):
        raise ConfigError(
            f"model.dim={model['dim']} is not divisible by attention.num_heads={heads}; "
            f"pick num_heads among the divisors of {model['dim']}"
        )
    if model["num_layers"] < 2 or model["num_layers"] % 2:
        raise ConfigError(f"model.num_layers must be a positive even number (mixer/MLP pairs), got {model['num_layers']}")


def _check_optimizer(opt: dict) -> None:
    if opt["name"] not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {opt['name']!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    if not opt["lr"] > 0:
        raise ConfigError(f"optimizer.lr must be positive, got {opt['lr']}")
    if opt["weight_decay"] < 0:
        raise ConfigError(f"optimizer.weight_decay must be >= 0, got {opt['weight_decay']}")


def _check_train(train: dict) -> None:
    _positive_int("train.epochs", train["epochs"])
    _positive_int("train.batch_size", train["batch_size"])
    if train["precision"] not in PRECISIONS:
        raise ConfigError(f"unknown train.precision {train['precision']!r}; allowed: {', '.join(PRECISIONS)}")
    stop = train["early_stop_accuracy"]
    if isinstance(stop, bool) or not isinstance(stop, (int, float)) or not 0 < stop <= 1:
        raise ConfigError(f"train.early_stop_accuracy must be a number in (0, 1] (a run stops after the first epoch "
                          f"whose test accuracy exceeds it; 1: never), got {stop!r}")


def _check_launch(launch: dict) -> None:
    _positive_int("launch.runs_per_gpu", launch["runs_per_gpu"])
    device = str(launch["device"])
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"launch.device={device} but CUDA is not available here; use launch.device=auto or cpu")
    if device != "auto":
        try:
            torch.device(device)
        except RuntimeError as e:
            raise ConfigError(f"launch.device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from e


def _check_softmax_kernel(launch: dict, attention: dict) -> None:
    kernel = launch.get("softmax_kernel", "sdpa")
    if kernel != "sdpa" and not str(attention.get("_target_", "")).endswith(".SoftmaxAttention"):
        raise ConfigError(f"launch.softmax_kernel={kernel} applies to attention=softmax only; use the default sdpa")
    on_cuda = str(launch["device"]) != "cpu" and torch.cuda.is_available()
    try:
        check_kernel(kernel, "cuda" if on_cuda else "cpu")
    except ValueError as e:
        raise ConfigError(f"launch.softmax_kernel={kernel}: {e}") from e


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
