"""Runs of a sweep trained together: plan every job, group the runs that can share a stack, train each group.

The `stacked` Hydra launcher (hydra_plugins/mad_stacked_launcher) drives this:

    python -m mad.run -m +sweep=mad attention=softmax optimizer=adamw hydra/launcher=stacked

1. `plan_job` runs inside Hydra's job machinery for every job (so each job directory gets its `.hydra/` config as
   with any launcher): it validates the config and skips finished runs exactly as `mad.run` does alone.
2. `group_plans` puts together runs that differ only in the optimizer's lr and weight decay (the MAD grid of one task
   setting) and in their seed (the optimizer study's seeds): same architecture, task setting, schedule, everything
   else.
3. `run_group` trains one group with mad/stacked_train.py and writes each run's record and weights to its own
   directory as soon as the run leaves the stack, in the same format as an alone run (plus `stacked_runs`: how many
   runs shared the stack); a sweep stopped mid-stack (a deadline) so keeps every run that had finished, and the
   stack's other runs resume from their checkpoints (mad/stack_checkpoint.py) at the next launch. With `stop_by`
   the stack itself checkpoints and stops at that time (GroupStopped). A record's `wall_time_s` is the time from the
   (resumed) stack's start until that run left it.

Mixers whose layers cannot be vmapped (the fla baselines' Triton kernels have no batching rule) train alone, one
run after another, through `mad.run.run`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from omegaconf import DictConfig
from rich.console import Console

from mad.results import RECORD_NAME
from mad.resume import run_identity
from mad.run import (
    fail_record, finish_record, initial_model, load_splits, loop_config, print_summary, record_header, run, validate,
)  # fmt: skip
from mad.stack_checkpoint import CHECKPOINT_NAME, StackCheckpoints, StackStopped, checkpoint_epoch
from mad.stacked_train import (
    StackedOutcome, StackedRun, StepOptions, full_steps, shared_optimizer_settings, train_stacked,
)  # fmt: skip

# Layers whose forward torch.vmap can batch over stacked weights (SDPA, our Parallax kernels and reference).
STACKABLE_MIXERS = (
    "models.attention.softmax.SoftmaxAttention",
    "models.attention.parallax.ParallaxAttention",
    "models.attention.sliding_window.SlidingWindowAttention",
)


@dataclass
class RunPlan:
    """A validated run still to train."""

    cfg: DictConfig
    resolved: dict
    run_dir: Path
    attention: str  # the preset name (Hydra's choice), for the record
    repo: Path  # where the sweep was launched (the git revision is read there)


def plan_job(cfg: DictConfig) -> RunPlan | dict | None:
    """Hydra task function of the planning pass: a RunPlan, or the finished record (skipped), or None (dry run)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved, previous = validate(cfg, run_dir)
    console = Console(soft_wrap=True)
    if cfg.dry_run:
        console.print(f"{'done' if previous else 'to run'}: {run_dir}")
        return previous
    if previous:
        console.print(f"already finished ({previous['status']}), skipped: {run_dir / RECORD_NAME}")
        (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)  # left if a stop came between its record and its cleanup
        return previous
    attention = HydraConfig.get().runtime.choices.get("attention")
    return RunPlan(cfg, resolved, run_dir, attention, Path(get_original_cwd()))


def stackable(plan: RunPlan) -> bool:
    return plan.resolved["attention"]["_target_"] in STACKABLE_MIXERS


def group_key(plan: RunPlan) -> str:
    """Runs with equal keys can share a stack: everything but the optimizer's lr and weight decay and the seed is
    equal (a stack gives each run its own data and order, mad/stacked_train.py)."""
    identity = run_identity(plan.resolved)
    identity["optimizer"] = shared_optimizer_settings(identity["optimizer"])
    identity.pop("seed")
    return json.dumps(identity, sort_keys=True, default=str)


def group_plans(plans: list[RunPlan], max_group: int = 0, max_group_tokens: int = 0) -> list[list[RunPlan]]:
    """Stackable runs grouped by `group_key` and by the epoch of their checkpoint (none, or the epoch a stopped stack
    saved it after: runs at one epoch resume together, mad/stack_checkpoint.py), in first-seen order, split into
    stacks of `stack_size`; every other run is a group of its own."""
    groups: dict[tuple, list[RunPlan]] = {}
    singles = []
    for plan in plans:
        if stackable(plan):
            groups.setdefault((group_key(plan), checkpoint_epoch(plan.run_dir)), []).append(plan)
        else:
            singles.append([plan])
    chunked = []
    for members in groups.values():
        seq_len = members[0].resolved["task"]["seq_len"] if max_group_tokens > 0 else 0  # read only when capped
        size = stack_size(seq_len, len(members), max_group, max_group_tokens)
        chunked += [members[i : i + size] for i in range(0, len(members), size)]
    return chunked + singles


def stack_size(seq_len: int, runs: int, max_group: int = 0, max_group_tokens: int = 0) -> int:
    """How many of a group's `runs` (of sequence length `seq_len`) share one stack: all of them, at most `max_group`
    when > 0, and at most `max_group_tokens` // `seq_len` when > 0 (never fewer than one), evened out over the stacks
    the caps call for (6 runs at most 4 per stack: 3 and 3, not 4 and 2). A stack's step time and memory grow with its
    runs x sequence length, so the token cap keeps long-sequence stacks short enough to finish before a deadline
    (1536: one run at L=1024, three at 512, six at 256) while short ones stay whole."""
    cap = runs
    if max_group > 0:
        cap = min(cap, max_group)
    if max_group_tokens > 0:
        cap = min(cap, max(1, max_group_tokens // seq_len))
    stacks = -(-runs // cap)
    return -(-runs // stacks)


def launch_order(groups: list[list[RunPlan]]) -> list[list[RunPlan]]:
    """The order in which the launcher starts groups: those resuming from checkpoints first (a stopped stack finishes
    before another is started and stopped, so few checkpoints wait at a time), then the most work first."""
    return sorted(groups, key=lambda g: (checkpoint_epoch(g[0].run_dir) is not None, group_work(g)), reverse=True)


def group_work(group: list[RunPlan]) -> int:
    """A group's training, as runs x sequence length x the steps each has left (200 epochs of 100 steps for a MAD
    baseline; a checkpoint's epochs done off)."""
    plan = group[0]
    task, train = plan.resolved["task"], plan.resolved["train"]
    epochs_left = max(0, train["epochs"] - (checkpoint_epoch(plan.run_dir) or 0))
    steps_per_epoch = -(-task["num_train_examples"] // train["batch_size"])
    return len(group) * task["seq_len"] * epochs_left * steps_per_epoch


def run_group(plans: list[RunPlan], device: torch.device, options: StepOptions = StepOptions(),
              checkpoint_every_s: float = 0.0, stop_by: float | None = None) -> list[dict]:  # fmt: skip
    """Train one group (mad/stacked_train.py; a lone non-stackable run trains as `mad.run` would) and write every
    run's record and weights. Returns the records, in order. With `checkpoint_every_s` > 0 the stack saves
    checkpoints (mad/stack_checkpoint.py) that often; a stack whose runs all have one resumes from them. Past
    `stop_by` (a Unix time) a stack saves them at the end of its epoch and raises GroupStopped (its runs still training
    get no record); a lone run ignores it."""
    if len(plans) == 1 and not stackable(plans[0]):
        return [_run_alone(plans[0], device)]
    first = plans[0]
    models, records = [], []
    for plan in plans:
        models.append(initial_model(plan.cfg, plan.resolved))
        record = record_header(plan.cfg, plan.resolved, models[-1], device, attention=plan.attention, repo=plan.repo)
        records.append(record | {"stacked_runs": len(plans)})
    started = time.perf_counter()
    written: set[int] = set()
    console = Console(soft_wrap=True, markup=False)
    checkpoints = StackCheckpoints([p.run_dir for p in plans], [run_identity(p.resolved) for p in plans],
                                   checkpoint_every_s, log=console.print, stop_by=stop_by)  # fmt: skip

    def write(index: int, outcome: StackedOutcome) -> None:
        finish_record(records[index], outcome.result, outcome.state_dict, plans[index].run_dir,
                      time.perf_counter() - started)  # fmt: skip
        checkpoints.discard(index)
        written.add(index)
        print_summary(records[index], plans[index].run_dir)

    try:
        splits = {}  # one (train, test) pair per seed: runs of one seed share it without copies
        for plan in plans:
            if plan.cfg.seed not in splits:
                splits[plan.cfg.seed] = load_splits(plan.cfg, plan.resolved)
        runs = [StackedRun(model, plan.resolved["optimizer"], *splits[plan.cfg.seed], seed=plan.cfg.seed)
                for model, plan in zip(models, plans)]  # fmt: skip
        heartbeat = None if first.cfg.progress else Heartbeat(first.run_dir.parent, len(plans), first.cfg.train.epochs)
        loop = loop_config(first.cfg, device)
        asked, steps = options.for_device(device), full_steps(runs, loop)
        options = asked.for_steps(steps)
        if asked.compile and not options.compile:
            console.print(f"stack {first.run_dir.parent}: not compiled, {steps} training steps are fewer than "
                          f"hydra.launcher.compile_min_steps={asked.compile_min_steps}")
        train_stacked(runs, first.resolved["train"]["schedule"], loop, options=options, on_finish=write,
                      on_epoch=heartbeat, checkpoints=checkpoints)  # fmt: skip
    except StackStopped as e:
        raise GroupStopped(f"stack {first.run_dir.parent} {e}", {i: records[i] for i in written}, e) from e
    except Exception as e:
        for index, (plan, record) in enumerate(zip(plans, records)):
            if index not in written:
                fail_record(record, e, plan.run_dir, time.perf_counter() - started)
        raise GroupFailed(f"{type(e).__name__}: {e}", {i: records[i] for i in written}) from e
    return records


class Heartbeat:
    """A stack's progress as one log line at most every `every_s` seconds (and after its first epoch), for sweeps
    without progress bars (`progress=false`: logs, clusters, device calls with a deadline), so that a log shows how
    far a stack got and how long its epochs take:

        stack /home/me/mad/runs/sweeps/mad/in_context_recall__baseline/softmax-adamw: epoch 40/200, 6 of 6 runs
        training, 0.61 s per epoch
    """

    def __init__(self, label: Path, runs: int, epochs: int, every_s: float = 60.0) -> None:
        self.label, self.runs, self.epochs, self.every_s = label, runs, epochs, every_s
        self.last: float | None = None
        self.console = Console(soft_wrap=True)

    def __call__(self, epoch: int, runs_left: int, seconds: float) -> None:
        now = time.perf_counter()
        if self.last is not None and now - self.last < self.every_s:
            return
        self.last = now
        self.console.print(f"stack {self.label}: epoch {epoch}/{self.epochs}, {runs_left} of {self.runs} runs "
                           f"training, {seconds:.2f} s per epoch", highlight=False)  # fmt: skip


class GroupEnded(Exception):
    """A stack that ended early after `finished` ({index in the group: record}) had left it with their records
    written."""

    def __init__(self, message: str, finished: dict[int, dict]) -> None:
        super().__init__(message, finished)
        self.message, self.finished = message, finished

    def __str__(self) -> str:
        return self.message


class GroupFailed(GroupEnded):
    """A stack that failed: its runs still training got `failed` records."""


class GroupStopped(GroupEnded):
    """A stack stopped at its deadline (`stopped`): its runs still training wait in their checkpoints for the next
    launch, with no record (not a failure)."""

    def __init__(self, message: str, finished: dict[int, dict], stopped: StackStopped) -> None:
        super().__init__(message, finished)
        self.args = (message, finished, stopped)  # what pickling rebuilds it from (a worker process hands it back)
        self.stopped = stopped


def _run_alone(plan: RunPlan, device: torch.device) -> dict:
    record = run(plan.cfg, plan.resolved, plan.run_dir, device, attention=plan.attention, repo=plan.repo)
    print_summary(record, plan.run_dir)
    return record
