"""Resuming sweeps: a run directory that already holds a finished record of the same config is not trained again.

Finished means status `ok` or `diverged` (both are final results of the protocol; a diverged run diverges again).
A `failed` record, an unreadable file or no record at all means the run is (re)done. A finished record of a
*different* config is never overwritten silently: that is an error unless `force=true`.
"""

from __future__ import annotations

from pathlib import Path

from mad.config_checks import ConfigError
from mad.results import RECORD_NAME, read_record

FINISHED = ("ok", "diverged")
# Config keys that change how a run is launched, stored or displayed, never what it computes (`sweep`: a preset's
# folder name and whether it prints a leaderboard).
LAUNCH_ONLY_KEYS = ("launch", "progress", "dry_run", "force", "data_cache", "sweep")


def run_identity(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in LAUNCH_ONLY_KEYS}


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            diffs.append(f"{prefix}{key}")
    return diffs


def finished_record(run_dir: Path, config: dict, *, force: bool) -> dict | None:
    """The finished record of this very config in `run_dir`, if any (None when the run must be trained)."""
    path = Path(run_dir) / RECORD_NAME
    if force or not path.exists():
        return None
    try:
        record = read_record(path)
    except ValueError:
        return None
    if record["status"] not in FINISHED:
        return None
    diffs = config_differences(run_identity(record["config"]), run_identity(config))
    if diffs:
        raise ConfigError(
            f"{path} already holds a finished run of a different config (differs in {', '.join(diffs[:5])}); "
            "choose another hydra.run.dir / hydra.sweep.dir, or pass force=true to replace it"
        )
    return record
