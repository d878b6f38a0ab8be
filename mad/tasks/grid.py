"""The 66 MAD task settings (MAD protocol section 1.7) as data.

For every task: a baseline setting (generator keywords + ``num_train_examples`` + ``num_test_examples``) and
the list of one-at-a-time changes ``(keyword, value)``; each change gives one setting equal to the baseline
except that keyword. Tasks come in the reference's registry order CR, NR, FR, M, C, SC; within a task the
baseline comes first, then the changes in the order of the task yml files.
"""

from __future__ import annotations

from typing import Any

from mad.tasks import task_settings

__all__ = ["BASELINES", "CHANGES", "GRID_ORDER", "LEARNING_RATES", "NUM_TEST_EXAMPLES", "WEIGHT_DECAYS",
           "generator_kwargs", "mad_settings"]

NUM_TEST_EXAMPLES: int = 1280
# Every setting is trained at each lr x weight decay of this grid (MAD protocol section 2; conf/sweep/mad.yaml).
LEARNING_RATES: tuple[float, ...] = (1e-4, 5e-4, 1e-3)
WEIGHT_DECAYS: tuple[float, ...] = (0.0, 0.1)
_N_SWEEP: list[int] = [6400, 3200, 1600, 800]

GRID_ORDER: tuple[str, ...] = (
    "in_context_recall",
    "noisy_in_context_recall",
    "fuzzy_in_context_recall",
    "memorization",
    "compression",
    "selective_copying",
)

_NUM_TRAIN_EXAMPLES: dict[str, int] = {task: 12800 for task in GRID_ORDER} | {"memorization": 256}

# Generator keywords at the baseline come from the generators' own defaults (one place), plus the train-set size.
BASELINES: dict[str, dict[str, Any]] = {
    task: task_settings(task) | {"num_train_examples": _NUM_TRAIN_EXAMPLES[task]} for task in GRID_ORDER
}


def _sweep(key: str, values: list[Any]) -> list[tuple[str, Any]]:
    return [(key, value) for value in values]


_RECALL_CHANGES = (
    _sweep("vocab_size", [32, 64, 128]) + _sweep("seq_len", [256, 512, 1024]) + _sweep("num_train_examples", _N_SWEEP)
)

CHANGES: dict[str, list[tuple[str, Any]]] = {
    "in_context_recall": list(_RECALL_CHANGES),
    "noisy_in_context_recall": _sweep("vocab_size", [48, 80, 144])
    + _sweep("seq_len", [256, 512, 1024])
    + _sweep("num_train_examples", _N_SWEEP)
    + _sweep("frac_noise", [0.4, 0.6, 0.8]),
    "fuzzy_in_context_recall": list(_RECALL_CHANGES),
    "memorization": _sweep("vocab_size", [512, 1024, 2048, 4096, 8192]),
    "compression": _sweep("vocab_size", [32, 64, 128])
    + _sweep("seq_len", [64, 128, 256])
    + _sweep("num_train_examples", _N_SWEEP),
    "selective_copying": _sweep("vocab_size", [32, 64, 128])
    + _sweep("seq_len", [512, 1024])
    + _sweep("num_train_examples", _N_SWEEP)
    + _sweep("num_tokens_to_copy", [32, 64, 96]),
}


def mad_settings() -> list[tuple[str, dict[str, Any]]]:
    """All 66 ``(task, setting)`` pairs in registry order; ``setting`` includes the example counts."""
    settings: list[tuple[str, dict[str, Any]]] = []
    for task in GRID_ORDER:
        baseline = {**BASELINES[task], "num_test_examples": NUM_TEST_EXAMPLES}
        settings.append((task, dict(baseline)))
        for key, value in CHANGES[task]:
            settings.append((task, {**baseline, key: value}))
    return settings


def generator_kwargs(setting: dict[str, Any]) -> dict[str, Any]:
    """The generator keywords of a grid setting (drops ``num_train_examples`` / ``num_test_examples``)."""
    return {k: v for k, v in setting.items() if k not in ("num_train_examples", "num_test_examples")}
