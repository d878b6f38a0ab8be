"""Device calls for what is left of a protocol: how many, and what each trains (benchmarks/protocol_cost.py prints
the plan).

A call runs `bash benchmarks/device_sweep.sh CARRY SECONDS ...`, SECONDS being the call's length less OUTSIDE_SECONDS
(installing the wheels, unpacking what the last call handed back, packing what this one hands back). Its sweep starts
LAUNCH_SECONDS after its process (imports, planning the jobs), then trains one stack per GPU at a time in the
launcher's order (stopped stacks first, then the most work: mad.stacked_run.launch_order; here the most GPU-seconds),
each paying COMPILE_SECONDS when it starts, none in the last START_MARGIN seconds before stop_at = SECONDS -
STOP_MARGIN. Then every stack checkpoints at the end of its epoch and stops, and the next call resumes it: no
training is lost, and every call is used to its end. The checkpoints of the stacks training at the stop come back
and travel in again, so GPUs x runs per stack x a checkpoint's size must fit what a call carries (device_sweep.sh's
CHECKPOINT_MIB): that caps the runs per stack (`hydra.launcher.max_group`).

Each stack is priced at its runs x 200 epochs x the run-epoch price (a sixth of a 6-run stack's epoch), so a stack
that stops early takes less, and a stack of fewer runs is priced as its share of a full one (true where the GPU is
the bound, L >= 256).
"""

from __future__ import annotations

from dataclasses import dataclass

from mad.stacked_run import stack_size

OUTSIDE_SECONDS = 40
LAUNCH_SECONDS = 30
COMPILE_SECONDS = 20  # a stack's compiles and captures before its first epoch (bench_epoch.py's first epoch: 17-21 s)
STOP_MARGIN = 40  # benchmarks/device_sweep.sh's defaults: the last epoch, the checkpoints, the exit,
START_MARGIN = 30  # and no stack starting to compile just before stop_at
MAX_RUNS_PER_STACK = 6  # the lr x wd grid of a setting


@dataclass
class Stack:
    setting: str  # its mad_setting id
    seconds: float  # GPU-seconds at 200 epochs
    left: float  # of those, still to train

    def done(self) -> float:
        return 1 - self.left / self.seconds


@dataclass
class Slice:
    """What one call trains of one stack: the share of its 200 epochs done before and after."""

    setting: str
    before: float
    after: float


def runs_per_stack(gpus: int, checkpoint_mib: float, carry_mib: float) -> int:
    """The most runs per stack such that the checkpoints of one stack per GPU fit `carry_mib`; ValueError if not one."""
    per_gpu = int(carry_mib // checkpoint_mib) // gpus
    if per_gpu < 1:
        raise ValueError(f"{gpus} GPUs x one {checkpoint_mib:g}-MiB checkpoint do not fit the {carry_mib:g} MiB a call "
                         "carries")  # fmt: skip
    return min(MAX_RUNS_PER_STACK, per_gpu)


def split_stacks(settings: list[tuple[str, int, int, float]], max_group: int) -> list[Stack]:
    """Every setting (its id, L, runs to train, GPU-seconds of one run at 200 epochs) as the stacks the launcher
    makes of it with `max_group`."""
    stacks = []
    for setting, seq_len, runs, run_s in settings:
        size = stack_size(seq_len, runs, max_group)
        for first in range(0, runs, size):
            seconds = min(size, runs - first) * run_s
            stacks.append(Stack(setting, seconds, seconds))
    return stacks


def plan_calls(stacks: list[Stack], gpus: int, call_seconds: float) -> list[list[Slice]]:
    """What each call trains, call after call, until every stack is done; ValueError when a call trains nothing."""
    window = call_seconds - OUTSIDE_SECONDS - STOP_MARGIN  # from the sweep's start to stop_at
    queue = sorted(stacks, key=lambda s: -s.left)
    calls = []
    while queue:
        clocks = [float(LAUNCH_SECONDS)] * gpus  # each GPU's, from the sweep's start
        stopped, slices = [], []
        while queue and min(clocks) < window - START_MARGIN:
            gpu = clocks.index(min(clocks))
            stack = queue.pop(0)
            start = clocks[gpu] + COMPILE_SECONDS
            before, trained = stack.done(), min(stack.left, window - start)
            stack.left -= trained
            clocks[gpu] = start + trained
            slices.append(Slice(stack.setting, before, stack.done()))
            if stack.left > 1e-9:
                stopped.append(stack)
        if not slices:
            raise ValueError(f"a {call_seconds:g}-s call trains nothing: its sweep starts no stack before "
                             f"start_until (stop_at - {START_MARGIN} s)")  # fmt: skip
        calls.append(slices)
        queue = sorted(stopped, key=lambda s: -s.left) + queue  # the next launch resumes the stopped stacks first
    return calls
