"""`init_from=<run dir>`: start a run from another run's final weights, e.g. a softmax model converted to Parallax.

Parameters the source lacks are allowed only if they belong to the Parallax correction branch (the probe W_R,
a gate, a learned temperature). The probe is then set to zero, so the converted model computes exactly what the
source computed (W_R = 0 is softmax attention) and fine-tuning starts from there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mad.config_checks import ConfigError
from mad.results import RECORD_NAME, WEIGHTS_NAME, read_record

# Parameter-name suffixes of the correction branch, which a softmax checkpoint does not have.
CORRECTION_PARAMS = ("r_proj.weight", "r_norm.weight", "gate_logit.weight", "gate_proj.weight", "gate_proj.bias",
                     "log_temperature.weight")  # fmt: skip


def load_source(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The source run's record and weights; ConfigError when either is missing or unusable."""
    run_dir = Path(run_dir)
    record_path, weights_path = run_dir / RECORD_NAME, run_dir / WEIGHTS_NAME
    if not record_path.exists() or not weights_path.exists():
        raise ConfigError(f"init_from={run_dir}: expected a finished run directory holding {RECORD_NAME} and "
                          f"{WEIGHTS_NAME}; missing {record_path if not record_path.exists() else weights_path}")  # fmt: skip
    try:
        record = read_record(record_path)
    except ValueError as e:
        raise ConfigError(f"init_from={run_dir}: {e}") from e
    return record, torch.load(weights_path, map_location="cpu", weights_only=True)


def check_fit(source: dict, config: dict) -> None:
    """The source's task vocabulary, backbone and model shape must be this run's."""
    src = source["config"]
    checks = {
        "task.vocab_size": (src["task"]["vocab_size"], config["task"]["vocab_size"]),
        "task.backbone": (src["task"]["backbone"], config["task"]["backbone"]),
        "model": (src["model"], config["model"]),
        "attention.num_heads": (src["attention"].get("num_heads"), config["attention"].get("num_heads")),
    }
    if config["task"]["backbone"] == "autoencoder":
        checks["task.seq_len"] = (src["task"]["seq_len"], config["task"]["seq_len"])
    bad = [f"{key} is {theirs!r} there, {ours!r} here" for key, (theirs, ours) in checks.items() if theirs != ours]
    if bad:
        raise ConfigError(f"init_from: the checkpoint's architecture does not fit this run: {'; '.join(bad)}")


def load_converted(model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Load `weights` into `model`; zero every probe the checkpoint lacks. Returns the parameters added."""
    target = model.state_dict()
    unexpected = sorted(set(weights) - set(target))
    added = sorted(set(target) - set(weights))
    foreign = [k for k in added if not k.endswith(CORRECTION_PARAMS)]
    mismatched = [f"{k} {tuple(weights[k].shape)} vs {tuple(target[k].shape)}"
                  for k in set(weights) & set(target) if weights[k].shape != target[k].shape]  # fmt: skip
    if unexpected or foreign or mismatched:
        raise ConfigError(
            "init_from: the checkpoint's architecture does not fit this run: "
            f"parameters only in the checkpoint {unexpected[:4]}, only in this model {foreign[:4]}, "
            f"shape mismatches {mismatched[:4]}"
        )
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in added and name.endswith("r_proj.weight"):
                param.zero_()
    return added
