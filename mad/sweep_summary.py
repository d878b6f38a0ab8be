"""A Hydra callback that ends every multirun with what happened to its runs (and, for presets, the leaderboard).

Jobs of this launch are the job directories whose Hydra config (`.hydra/config.yaml`, written by Hydra as each job
starts) was written or rewritten since the launch started; a job ran now if its record was written since then (a
record is written by replacing the file, so a new record is a new file), else its record was finished before the
launch (the job was skipped, or in a dry run: is done). Files are told apart by inode and modification time in
nanoseconds, never by comparing times with the clock, so a relaunch right after a sweep is counted right.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from mad.resume import FINISHED
from mad.results import RECORD_NAME, read_record
from mad.stack_checkpoint import CHECKPOINT_NAME

JOB_CONFIG = ".hydra/config.yaml"


def file_states(sweep_dir: Path) -> dict[Path, tuple[int, int]]:
    """(inode, modification time in ns) of every job config and record under `sweep_dir`."""
    states = {}
    for path in [*Path(sweep_dir).rglob(JOB_CONFIG), *Path(sweep_dir).rglob(RECORD_NAME)]:
        stat = path.stat()
        states[path] = (stat.st_ino, stat.st_mtime_ns)
    return states


def written_since(before: dict[Path, tuple[int, int]], sweep_dir: Path) -> set[Path]:
    """The job configs and records under `sweep_dir` that are new or rewritten since `before` (file_states)."""
    return {p for p, state in file_states(sweep_dir).items() if before.get(p) != state}


def job_dirs(written: set[Path]) -> list[Path]:
    """The job directories whose Hydra config is among `written`."""
    return sorted(p.parent.parent for p in written if p.match(JOB_CONFIG))


def classify(job_dir: Path, written: set[Path], dry_run: bool) -> str:
    path = job_dir / RECORD_NAME
    try:
        record = read_record(path)
    except ValueError:
        if dry_run:
            return "to run"
        if (job_dir / CHECKPOINT_NAME).exists():
            return "no record yet, a checkpoint to resume from"
        return "no record (not started, killed or crashed)"
    if path in written:
        return f"ran now: {record['status']}"
    return "already finished" if record["status"] in FINISHED else ("to run" if dry_run else "stale record")


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.before = file_states(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        dry_run = bool(OmegaConf.select(config, "dry_run", default=False))
        written = written_since(self.before, sweep_dir)
        counts = Counter(classify(d, written, dry_run) for d in job_dirs(written))
        parts = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
        console = Console(soft_wrap=True)
        console.print(f"[bold]sweep {sweep_dir}[/bold]: {sum(counts.values())} runs: {parts or 'none'}")
        if not dry_run and OmegaConf.select(config, "sweep.leaderboard", default=False):
            from mad.leaderboard import make_leaderboard  # pandas and matplotlib only when a leaderboard is asked for

            make_leaderboard(sweep_dir, console=console)
