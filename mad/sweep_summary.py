"""A Hydra callback that ends every multirun with what happened to its runs (and, for presets, the leaderboard).

Jobs of this launch are the job directories whose Hydra config was written after the launch started; a record
older than the launch was finished before it (the job was skipped, or in a dry run: is done).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from mad.resume import FINISHED
from mad.results import RECORD_NAME, read_record


def job_dirs(sweep_dir: Path, since: float) -> list[Path]:
    """Job directories (those holding `.hydra/config.yaml`) written at or after `since` (epoch seconds)."""
    configs = Path(sweep_dir).rglob(".hydra/config.yaml")
    return sorted(p.parent.parent for p in configs if p.stat().st_mtime >= since)


def classify(job_dir: Path, since: float, dry_run: bool) -> str:
    path = job_dir / RECORD_NAME
    try:
        record = read_record(path)
    except ValueError:
        return "to run" if dry_run else "no record (not started, killed or crashed)"
    if path.stat().st_mtime < since:
        return "already finished" if record["status"] in FINISHED else ("to run" if dry_run else "stale record")
    return f"ran now: {record['status']}"


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time() - 1.0  # file mtimes can lag the clock by less than a second

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        dry_run = bool(OmegaConf.select(config, "dry_run", default=False))
        counts = Counter(classify(d, self.started, dry_run) for d in job_dirs(sweep_dir, self.started))
        parts = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
        console = Console(soft_wrap=True)
        console.print(f"[bold]sweep {sweep_dir}[/bold]: {sum(counts.values())} runs: {parts or 'none'}")
        if not dry_run and OmegaConf.select(config, "sweep.leaderboard", default=False):
            from mad.leaderboard import make_leaderboard  # pandas and matplotlib only when a leaderboard is asked for

            make_leaderboard(sweep_dir, console=console)
