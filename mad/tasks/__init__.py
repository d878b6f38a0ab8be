"""MAD synthetic task generators: public API, validation and dispatch.

    from mad.tasks import generate, TASKS, task_settings
    inputs, targets = generate(task, split, num_examples, seed, **setting)

``inputs`` and ``targets`` are int64 tensors ``[num_examples, length]``; unscored targets are ``IGNORE_INDEX``.
Network input length: ``seq_len - 1`` for (noisy) in-context recall, ``seq_len`` for every other task.

Randomness: each call uses its own ``numpy.random.default_rng`` stream seeded with
``SeedSequence([seed, split_id, task_id])`` (train 0, test 1; ``task_id`` = index in ``TASKS``), so identical
arguments give identical data and the two splits never share a stream. The memorization fact table uses a third
stream ``SeedSequence([seed, 2, task_id])`` that depends on the seed (and vocabulary size) only.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import numpy as np
import torch

IGNORE_INDEX: int = -100

from mad.tasks import compression as _compression  # noqa: E402
from mad.tasks import fuzzy_in_context_recall as _fuzzy  # noqa: E402
from mad.tasks import in_context_recall as _recall  # noqa: E402
from mad.tasks import memorization as _memorization  # noqa: E402
from mad.tasks import selective_copying as _copying  # noqa: E402

__all__ = ["IGNORE_INDEX", "SPLITS", "TASKS", "check_setting", "generate", "memorization_table", "task_settings"]

TASKS: tuple[str, ...] = (
    "in_context_recall",
    "noisy_in_context_recall",
    "fuzzy_in_context_recall",
    "selective_copying",
    "compression",
    "memorization",
)
SPLITS: tuple[str, ...] = ("train", "test")
_TABLE_STREAM = 2  # split id of the memorization table stream

_DEFAULTS: dict[str, dict[str, Any]] = {
    "in_context_recall": {"vocab_size": 16, "seq_len": 128},
    "noisy_in_context_recall": {"vocab_size": 32, "seq_len": 128, "noise_vocab_size": 16, "frac_noise": 0.2},
    "fuzzy_in_context_recall": {"vocab_size": 16, "seq_len": 128, "k_motif_size": 3, "v_motif_size": 3},
    "selective_copying": {"vocab_size": 16, "seq_len": 256, "num_tokens_to_copy": 16},
    "compression": {"vocab_size": 16, "seq_len": 32},
    "memorization": {"vocab_size": 256, "seq_len": 32},
}
_FLOAT_KEYS = frozenset({"frac_noise"})

_CHECKS: dict[str, Callable[..., None]] = {
    "in_context_recall": _recall.check_setting,
    "noisy_in_context_recall": _recall.check_setting,
    "fuzzy_in_context_recall": _fuzzy.check_setting,
    "selective_copying": _copying.check_setting,
    "compression": _compression.check_setting,
    "memorization": _memorization.check_setting,
}


def task_settings(task: str) -> dict[str, Any]:
    """The MAD baseline setting (generator keywords and their defaults) of ``task``, as a new dict."""
    _check_task(task)
    return dict(_DEFAULTS[task])


def check_setting(task: str, **setting: Any) -> dict[str, Any]:
    """Validate ``setting`` for ``task`` without generating anything; returns it with baseline defaults filled in.

    Raises ``ValueError`` naming the problem and the allowed values, exactly as :func:`generate` would.
    """
    _check_task(task)
    return _resolve_setting(task, setting)


def _check_task(task: str) -> None:
    if not isinstance(task, str) or task not in _DEFAULTS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number in [0, 1), got {value!r} ({type(value).__name__})")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _resolve_setting(task: str, setting: dict[str, Any]) -> dict[str, Any]:
    """Defaults overridden by ``setting``, type-checked, then checked against the task's layout."""
    allowed = _DEFAULTS[task]
    unknown = sorted(set(setting) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown setting keyword(s) {', '.join(unknown)} for task {task!r}; "
            f"allowed keywords: {', '.join(allowed)}"
        )
    resolved = {**allowed, **setting}
    for name, value in resolved.items():
        if name in _FLOAT_KEYS:
            resolved[name] = _check_fraction(name, value)
        else:
            resolved[name] = _check_int(name, value, 0)
    _CHECKS[task](**resolved)
    return resolved


def _rng(seed: int, stream: int, task: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, TASKS.index(task)]))


def memorization_table(seed: int, vocab_size: int = 256) -> torch.Tensor:
    """The fixed memorization fact table for ``seed``: ``table[key] = value`` (int64, ``(vocab_size-1)//2`` keys)."""
    seed = _check_int("seed", seed, 0)
    _resolve_setting("memorization", {"vocab_size": vocab_size})
    return torch.from_numpy(_memorization_table(seed, vocab_size))


def _memorization_table(seed: int, vocab_size: int) -> np.ndarray:
    return _memorization.memorization_table(vocab_size, _rng(seed, _TABLE_STREAM, "memorization"))


def _dispatch(
    task: str, rng: np.random.Generator, num_examples: int, train: bool, seed: int, setting: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    common = (rng, num_examples, train, IGNORE_INDEX)
    if task == "in_context_recall":
        return _recall.generate_recall(*common, **setting)
    if task == "noisy_in_context_recall":
        return _recall.generate_recall(*common, **setting)
    if task == "fuzzy_in_context_recall":
        return _fuzzy.generate_fuzzy_recall(*common, **setting)
    if task == "selective_copying":
        return _copying.generate_selective_copying(*common, **setting)
    if task == "compression":
        return _compression.generate_compression(*common, **setting)
    table = _memorization_table(seed, setting["vocab_size"])
    return _memorization.generate_memorization(*common, **setting, table=table)


def generate(task: str, split: str, num_examples: int, seed: int, **setting: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``num_examples`` sequences of ``task`` for ``split`` ("train" or "test").

    ``setting`` holds the task's generator keywords (see :func:`task_settings`); missing ones take the MAD
    baseline value. Raises ``ValueError`` for any invalid argument before generating anything. Returns
    ``(inputs, targets)``, int64 tensors ``[num_examples, length]`` with unscored targets ``IGNORE_INDEX``.
    """
    _check_task(task)
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    num_examples = _check_int("num_examples", num_examples, 1)
    seed = _check_int("seed", seed, 0)
    resolved = _resolve_setting(task, setting)
    rng = _rng(seed, SPLITS.index(split), task)
    inputs, targets = _dispatch(task, rng, num_examples, split == "train", seed, resolved)
    return (
        torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64)),
    )
