"""Loading run records fast: every `result.json` under a folder as one flat row, invalid files with their reason.

Used by the leaderboard, which must aggregate 10 000 records in seconds: the per-epoch history (most of a record)
is cut out before parsing, and many files are parsed by a process pool.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from mad.results import RECORD_NAME, record_problem
from mad.tasks import TASKS

GRID = ["lr", "weight_decay"]
_FIELD_TYPES: dict[str, Any] = {  # the fields every record needs (ok and diverged ones also test_accuracy)
    "task": str, "setting": dict, "attention": str, "optimizer": str, "lr": numbers.Real, "weight_decay": numbers.Real,
    "profile": str, "comparable_with_published_mad": bool, "config": dict,
}  # fmt: skip
_CONFIG_PARTS = ("attention", "model", "optimizer", "train")  # what defines an architecture, besides lr and wd
_ROW_COLUMNS = ["path", "status", "task", "setting", "attention", "optimizer", *GRID, "profile", "comparable",
                "test_accuracy", "body", "opt_config"]  # fmt: skip
_HISTORY_KEY = '\n  "history": {'  # the top-level history as write_json_atomically lays it out (indent 2)
_TOP_LEVEL_CLOSE = "\n  }"  # a dict that is the value of a top-level key ends here (indent 2)
_POOL_MIN_FILES = 200  # below this, starting worker processes costs more than it saves


def load_records(runs_dir: Path, workers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every run record under ``runs_dir`` (recursive) as one flat row, and the files that are not valid records.

    Returns ``(records, ignored)``. ``records`` has the columns of ``_ROW_COLUMNS``; ``setting``, ``body`` (the
    attention, model and train config) and ``opt_config`` (optimizer config without lr and weight decay) are
    canonical JSON strings, ``test_accuracy`` is NaN where absent. ``ignored`` has columns path, reason.
    Many files are parsed by ``workers`` processes (default: one per CPU core).
    """
    paths = sorted(str(path) for path in Path(runs_dir).rglob(RECORD_NAME))
    loaded = _map(_load_one, paths, workers or os.cpu_count() or 1)
    rows = [row for row, _ in loaded if row is not None]
    ignored = [{"path": p, "reason": reason} for p, (_, reason) in zip(paths, loaded) if reason is not None]
    return pd.DataFrame(rows, columns=_ROW_COLUMNS), pd.DataFrame(ignored, columns=["path", "reason"])


def _map(fn: Callable, items: list, workers: int) -> list:
    if workers < 2 or len(items) < _POOL_MIN_FILES:
        return [fn(item) for item in items]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items, chunksize=max(1, len(items) // (4 * workers))))


def _load_one(path: str) -> tuple[dict | None, str | None]:
    """``(row, None)`` for a valid record, ``(None, reason)`` for anything else (reasons group: no paths in them)."""
    try:
        record = _parse_without_history(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable file ({type(e).__name__})"
    except json.JSONDecodeError:
        return None, "not valid JSON (corrupt or truncated file)"
    problem = record_problem(record) or _field_problem(record)
    return (None, problem) if problem else (_flatten(record, path), None)


def _parse_without_history(text: str) -> Any:
    """``json.loads(text)`` with the top-level ``history`` replaced by null before parsing.

    The per-epoch history (metrics and diagnostics) is most of a record and unused here; skipping it makes loading
    ~8x faster. As `write_json_atomically` lays records out (indent 2), the history dict is closed by the first
    ``}`` at the top-level indent after its key. Text of any other layout, where the cut does not leave valid JSON,
    is parsed whole.
    """
    start = text.find(_HISTORY_KEY)
    end = text.find(_TOP_LEVEL_CLOSE, start)
    if start >= 0 and end >= 0:
        try:
            return json.loads(f'{text[:start]}{_HISTORY_KEY[:-1]}null{text[end + len(_TOP_LEVEL_CLOSE):]}')
        except json.JSONDecodeError:
            pass
    return json.loads(text)


def _field_problem(record: dict) -> str | None:
    """Why a record of the right schema and status still cannot be used, or None."""
    required = [*_FIELD_TYPES, *(["test_accuracy"] if record["status"] != "failed" else [])]
    missing = [key for key in required if key not in record]
    config = record.get("config")
    if isinstance(config, dict):
        missing += [f"config.{part}" for part in _CONFIG_PARTS if part not in config]
    if missing:
        return f"missing field(s): {', '.join(missing)}"
    wrong = [key for key, kind in _FIELD_TYPES.items() if not isinstance(record[key], kind)]
    if isinstance(config, dict):
        wrong += [f"config.{part}" for part in _CONFIG_PARTS if not isinstance(config[part], dict)]
    if wrong:
        return f"field(s) of the wrong type: {', '.join(wrong)}"
    if record["task"] not in TASKS:
        return f"unknown task {record['task']!r} (valid: {', '.join(TASKS)})"
    accuracy = record.get("test_accuracy")
    if record["status"] == "ok" and not (_is_number(accuracy) and 0.0 <= accuracy <= 1.0):
        return "status ok without a finite test_accuracy in [0, 1]"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _flatten(record: dict, path: str) -> dict:
    """The few fields the leaderboard needs; history and the rest of the record are dropped here."""
    config = record["config"]
    accuracy = record.get("test_accuracy")
    return {
        "path": path,
        "status": record["status"],
        "task": record["task"],
        "setting": canonical(record["setting"]),
        "attention": record["attention"],
        "optimizer": record["optimizer"],
        "lr": float(record["lr"]),
        "weight_decay": float(record["weight_decay"]),
        "profile": record["profile"],
        "comparable": record["comparable_with_published_mad"],
        "test_accuracy": float(accuracy) if _is_number(accuracy) else math.nan,
        "body": canonical({part: config[part] for part in ("attention", "model", "train")}),
        "opt_config": canonical({k: v for k, v in config["optimizer"].items() if k not in GRID}),
    }


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
