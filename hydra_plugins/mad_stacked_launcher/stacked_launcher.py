"""`hydra/launcher=stacked`: plan every job of a sweep, then train the runs in stacks (mad/stacked_run.py), spread
over the host's devices.

    python -m mad.run -m +sweep=mad attention=softmax optimizer=adamw hydra/launcher=stacked
    python -m mad.run -m +sweep=mad ... hydra/launcher=stacked hydra.launcher.workers_per_device=4

Every job's directory, `.hydra/` config and record are those of the basic launcher; finished runs are skipped and
bad configs are reported before anything trains. Groups go to worker processes, `workers_per_device` per device,
the most training first (runs x sequence length x steps left: the long stacks start while there is time for them);
with a single worker everything runs in this process. `max_group` and `max_group_tokens` (runs x sequence length)
cap a stack's size.

`stop_at` and `start_until` are for machines lent with a deadline, in seconds counted from `deadline_origin` (a Unix
time; by default the start of the sweep's process, `python -m mad.run -m ...`, as `timeout` counts). Past `stop_at` every stack still training saves its runs'
checkpoints at the end of its epoch and stops (mad/stack_checkpoint.py), and no further group starts; past
`start_until` no further group starts. Runs stopped or not started get no record, the sweep says how many, and the
next launch trains them, the stopped stacks first, from their checkpoints, when their run directories are still there
(on another machine: carried with them, mad/checkpoint_archive.py). A sweep killed instead resumes from the
checkpoints saved every `checkpoint_every_s` seconds.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def resolve_devices(devices: Any, cuda_count: int) -> list[str]:
    """`auto` -> every CUDA device (`cuda:i`), or `["cpu"]` without one; a list or comma-separated string as given."""
    if devices == "auto":
        return [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
    names = devices.split(",") if isinstance(devices, str) else list(devices)
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise ValueError(f"hydra.launcher.devices lists no device: {devices!r}; use auto, or e.g. [cuda:0, cuda:1]")
    return names


def check_devices(devices: list[str], cuda_count: int) -> None:
    """ValueError naming the bad entry unless every device is `cpu` or an existing `cuda:i`."""
    for name in devices:
        try:
            device = torch_device(name)
        except RuntimeError as e:
            raise ValueError(f"hydra.launcher.devices: {name!r} is not a device ({e}); use cpu or cuda:i") from e
        if device.type == "cuda" and (device.index or 0) >= cuda_count:
            raise ValueError(f"hydra.launcher.devices: {name!r}, but this host has {cuda_count} CUDA device(s)")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"hydra.launcher.devices: {name!r}; allowed: cpu, cuda:i")


def torch_device(name: str):
    import torch

    return torch.device(name)


def worker_slots(devices: list[str], workers_per_device: int) -> list[str]:
    """One entry per worker, device-major round robin (every device's first worker before any second one)."""
    if workers_per_device < 1:
        raise ValueError(f"hydra.launcher.workers_per_device must be >= 1, got {workers_per_device}")
    return [d for _ in range(workers_per_device) for d in devices]


_WORKER_DEVICE: str | None = None


def _pin_worker(slots) -> None:
    global _WORKER_DEVICE
    _WORKER_DEVICE = slots.get()


def process_age_s() -> float:
    """Seconds since this process started (Linux's /proc; 0 where it cannot be read)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Deadlines:
    """`start_until` and `stop_at` as Unix times (None: no limit). A plain class: Hydra's plugin scan imports this
    module in a way that breaks dataclasses here (config.py)."""

    def __init__(self, start_by: float | None, stop_by: float | None) -> None:
        self.start_by, self.stop_by = start_by, stop_by

    @classmethod
    def after(cls, started: float, start_until: float, stop_at: float) -> "Deadlines":
        """From seconds after `started` (a Unix time); 0: no limit. A group starts by either deadline at the latest."""
        stop_by = started + stop_at if stop_at > 0 else None
        start_by = started + start_until if start_until > 0 else None
        if stop_by is not None:
            start_by = stop_by if start_by is None else min(start_by, stop_by)
        return cls(start_by, stop_by)

    def check_start(self) -> None:
        """NotStarted when the wall clock is past `start_by`."""
        if self.start_by is not None and time.time() > self.start_by:
            raise NotStarted("not started: hydra.launcher.start_until or stop_at had passed")


class NotStarted(Exception):
    """A group left untrained because `start_until` or `stop_at` had passed when its turn came."""


def _train_group_in_worker(plans, options, checkpoint_every_s: float, deadlines: Deadlines) -> list[dict]:
    deadlines.check_start()
    import torch

    from mad.stacked_run import run_group

    device = torch.device(_WORKER_DEVICE)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return run_group(plans, device, options, checkpoint_every_s, deadlines.stop_by)


def _or_error(call):
    from mad.stacked_run import GroupStopped

    try:
        return call()
    except (NotStarted, GroupStopped) as e:
        return e
    except Exception as e:  # noqa: BLE001 - reported per job, like a failing job of the basic launcher
        log.error(f"a stacked group failed: {type(e).__name__}: {e}")
        return e


def _outcome(records: list[dict] | Exception, index: int) -> dict | Exception | None:
    """Run `index`'s record in its group's outcome; a run that finished before its group ended keeps its record; a
    run not started or stopped with its stack has none (None: not an error, the next launch trains it)."""
    from mad.stacked_run import GroupEnded, GroupStopped

    if isinstance(records, GroupEnded) and index in records.finished:
        return records.finished[index]
    if isinstance(records, (NotStarted, GroupStopped)):
        return None
    return records if isinstance(records, Exception) else records[index]


class StackedLauncher(Launcher):
    def __init__(self, devices: Any = "auto", workers_per_device: int = 1, max_group: int = 0,
                 max_group_tokens: int = 0, cuda_graph: bool = True, compile: bool = False,
                 compile_min_steps: int = 5000, start_until: float = 0.0, stop_at: float = 0.0,
                 deadline_origin: float = 0.0, checkpoint_every_s: float = 60.0) -> None:  # fmt: skip
        from mad.stacked_train import StepOptions

        super().__init__()
        self.devices, self.workers_per_device = devices, workers_per_device
        self.max_group, self.max_group_tokens = max_group, max_group_tokens
        self.options = StepOptions(cuda_graph=cuda_graph, compile=compile, compile_min_steps=compile_min_steps)
        self.start_until, self.stop_at, self.deadline_origin = start_until, stop_at, deadline_origin
        self.checkpoint_every_s = checkpoint_every_s
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from mad.stacked_run import RunPlan, group_plans, launch_order, plan_job

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        slots = self._worker_slots()
        deadlines = self._deadlines()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        returns = [self._plan(overrides, initial_job_idx + i, plan_job) for i, overrides in enumerate(job_overrides)]
        failed = [r for r in returns if r.status == JobStatus.FAILED]
        if failed:  # bad configs stop the sweep before anything trains
            from rich.console import Console

            for r in failed:
                Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {' '.join(r.overrides)}: {r._return_value}")
            sys.exit(2)
        plans = [r.return_value for r in returns if isinstance(r.return_value, RunPlan)]
        groups = launch_order(group_plans(plans, self.max_group, self.max_group_tokens))
        log.info(f"{len(plans)} runs to train in {len(groups)} groups ({len(returns) - len(plans)} done or listed)")
        records = self._train(groups, slots, deadlines)
        self._report_left(groups, records)
        by_dir = {plan.run_dir: _outcome(recs, i) for group, recs in zip(groups, records) for i, plan in enumerate(group)}
        for r in returns:
            if isinstance(r.return_value, RunPlan):
                outcome = by_dir[r.return_value.run_dir]
                r.status = JobStatus.FAILED if isinstance(outcome, Exception) else JobStatus.COMPLETED
                r.return_value = outcome
        return returns

    def _deadlines(self) -> Deadlines:
        """start_until and stop_at as Unix times, said in the log with the origin they count from."""
        age = process_age_s()
        origin = self.deadline_origin or time.time() - age
        deadlines = Deadlines.after(origin, self.start_until, self.stop_at)
        if deadlines.start_by is not None:
            counted = ("hydra.launcher.deadline_origin" if self.deadline_origin else
                       f"the sweep's process start, {age:.1f} s ago" if age else "now (this process's start unknown)")
            stop = f"stops at {deadlines.stop_by - time.time():.0f} s from now, " if deadlines.stop_by else ""
            log.info(f"deadlines, counted from {counted}: {stop}no stack starts after "
                     f"{deadlines.start_by - time.time():.0f} s from now")  # fmt: skip
        return deadlines

    def _report_left(self, groups: list[list], records: list) -> None:
        """Say how many runs the deadlines left for the next launch: stopped (with checkpoints), not started."""
        from rich.console import Console

        from mad.stacked_run import GroupStopped

        console = Console(soft_wrap=True)
        stopped = [(group, recs) for group, recs in zip(groups, records) if isinstance(recs, GroupStopped)]
        if stopped:
            runs = sum(len(group) - len(recs.finished) for group, recs in stopped)
            unsaved = sum(not recs.stopped.saved for _, recs in stopped)
            console.print(f"{runs} runs in {len(stopped)} stacks stopped at hydra.launcher.stop_at={self.stop_at:g} s "
                          f"after epochs {sorted({recs.stopped.epoch for _, recs in stopped})}, "
                          + (f"{unsaved} stacks WITHOUT their checkpoints" if unsaved else "with their checkpoints")
                          + " (the next launch resumes them)")  # fmt: skip
        left = [group for group, recs in zip(groups, records) if isinstance(recs, NotStarted)]
        if left:
            limits = " or ".join(f"hydra.launcher.{name}={value:g} s" for name, value in
                                 (("start_until", self.start_until), ("stop_at", self.stop_at)) if value > 0)
            console.print(f"{sum(map(len, left))} runs in {len(left)} groups not started: {limits} had passed (the "
                          "next launch trains them)")  # fmt: skip

    def _plan(self, overrides: Sequence[str], idx: int, plan_job: TaskFunction) -> JobReturn:
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        return run_job(hydra_context=self.hydra_context, task_function=plan_job, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")  # fmt: skip

    def _worker_slots(self) -> list[str]:
        """The workers' devices; a bad launcher setting ends the sweep here, before any job is planned."""
        import torch

        try:
            devices = resolve_devices(self.devices, torch.cuda.device_count())
            check_devices(devices, torch.cuda.device_count())
            if self.max_group < 0:
                raise ValueError(f"hydra.launcher.max_group must be >= 0 (0: no limit), got {self.max_group}")
            if self.max_group_tokens < 0:
                raise ValueError("hydra.launcher.max_group_tokens must be >= 0 (runs x sequence length per stack; "
                                 f"0: no limit), got {self.max_group_tokens}")
            if self.options.compile_min_steps < 0:
                raise ValueError("hydra.launcher.compile_min_steps must be >= 0 (0: compile every stack), got "
                                 f"{self.options.compile_min_steps}")
            if not self.start_until >= 0:
                raise ValueError(f"hydra.launcher.start_until must be >= 0 seconds (0: no limit), got {self.start_until}")
            if not self.stop_at >= 0:
                raise ValueError(f"hydra.launcher.stop_at must be >= 0 seconds (0: no limit), got {self.stop_at}")
            if not self.deadline_origin >= 0:
                raise ValueError("hydra.launcher.deadline_origin must be a Unix time in seconds (0: the sweep's "
                                 f"process start), got {self.deadline_origin}")
            if not self.checkpoint_every_s >= 0:
                raise ValueError("hydra.launcher.checkpoint_every_s must be >= 0 seconds (0: no checkpoints), got "
                                 f"{self.checkpoint_every_s}")
            return worker_slots(devices, self.workers_per_device)
        except ValueError as e:
            from rich.console import Console

            Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {e}")
            sys.exit(2)

    def _train(self, groups: list[list], slots: list[str], deadlines: Deadlines) -> list[list[dict] | Exception]:
        """Each group's records, or the exception that ended it (GroupFailed: its runs' records say `failed`;
        NotStarted, GroupStopped: the runs it names have none): one group failing, as one job of the basic launcher,
        does not stop the others."""
        import torch

        if len(slots) == 1 or len(groups) <= 1:
            from mad.stacked_run import run_group

            device = torch.device(slots[0])

            def train(group: list) -> list[dict]:
                deadlines.check_start()
                return run_group(group, device, self.options, self.checkpoint_every_s, deadlines.stop_by)

            return [_or_error(lambda g=group: train(g)) for group in groups]
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        for slot in slots:
            queue.put(slot)
        with ProcessPoolExecutor(len(slots), mp_context=context, initializer=_pin_worker, initargs=(queue,)) as pool:
            futures = [pool.submit(_train_group_in_worker, group, self.options, self.checkpoint_every_s, deadlines)
                       for group in groups]  # fmt: skip
            return [_or_error(f.result) for f in futures]
