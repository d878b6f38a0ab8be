"""Mid-stack checkpoints: a stack stopped before its runs finished (a deadline, a preempted job) resumes from its last
checkpoint instead of starting over.

At the end of an epoch, at most every `every_s` seconds, each run still training writes `checkpoint.pt` into its run
directory (atomically: a stop mid-write leaves the previous one): its weights, its slices of the optimizer state, its
data order's generator, its training result so far and the epoch, with its config's identity
(`mad.resume.run_identity`). A run's checkpoint is deleted once its record is written. A group resumes only when every
run in it has a checkpoint of its own config at one epoch (the runs of a stack train in lockstep); otherwise it starts
over and says why. Resuming gives the records an uninterrupted stack gives, up to floating-point reordering
(tests/test_stack_checkpoint.py).

A checkpoint holds only tensors and plain values (`torch.load(..., weights_only=True)` reads it); a MAD run's is
~5 MB with AdamW (weights and two moments in fp32).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mad.resume import config_differences
from mad.train import EpochRecord, TrainResult

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class RunState:
    """One run of a stack at the end of an epoch: what `train_stacked` needs to continue it."""

    epoch: int  # epochs completed
    weights: dict[str, torch.Tensor]  # the run's state_dict, on the CPU
    optimizer_state: list[list[torch.Tensor]]  # per stacked optimizer, the run's slice of each `state_tensors()`
    step_counts: list[float]  # per stacked optimizer
    data_order: torch.Tensor  # the run's data-order generator state
    result: TrainResult  # the result so far (epochs, steps, tokens, seconds)


def to_payload(state: RunState, identity: dict) -> dict:
    """`state` as plain values and tensors, with the config identity it belongs to."""
    payload = {f.name: getattr(state, f.name) for f in dataclasses.fields(RunState)}
    return payload | {"identity": identity, "result": dataclasses.asdict(state.result)}


def from_payload(payload: dict) -> RunState:
    result = dict(payload["result"])
    result["epochs"] = [EpochRecord(**e) for e in result["epochs"]]
    fields = {f.name: payload[f.name] for f in dataclasses.fields(RunState)}
    return RunState(**(fields | {"result": TrainResult(**result)}))


class StackCheckpoints:
    """The checkpoints of one group's runs: `load` at the start, `due` and `save` after each epoch, `discard` once a
    run's record is written. `every_s` <= 0 turns saving off (loading still resumes what a previous launch saved)."""

    def __init__(self, run_dirs: list[Path], identities: list[dict], every_s: float, log=print) -> None:
        self.paths = [Path(d) / CHECKPOINT_NAME for d in run_dirs]
        self.identities = identities
        self.every_s = every_s
        self.log = log
        self._last = time.monotonic()

    def load(self) -> list[RunState] | None:
        """One state per run when every run has a usable checkpoint at one epoch, else None (and why, if any had one)."""
        found = [self._read(path, identity) for path, identity in zip(self.paths, self.identities)]
        if all(state is None for state in found):
            return None
        epochs = {state.epoch for state in found if state is not None}
        if any(state is None for state in found) or len(epochs) > 1:
            have = sum(state is not None for state in found)
            self.log(f"stack of {len(found)} runs starts over: {have} have a usable checkpoint, at epochs "
                     f"{sorted(epochs)} (resuming needs all of them at one epoch)")  # fmt: skip
            return None
        self.log(f"stack of {len(found)} runs resumes after epoch {epochs.pop()} ({self.paths[0].parent.parent})")
        return found

    def due(self) -> bool:
        return self.every_s > 0 and time.monotonic() - self._last >= self.every_s

    def save(self, states: dict[int, RunState]) -> None:
        """Write run i's state for every i in `states` (indices into the group)."""
        for index, state in states.items():
            path = self.paths[index]
            tmp = path.with_name(path.name + ".tmp")
            torch.save(to_payload(state, self.identities[index]), tmp)
            os.replace(tmp, path)
        self._last = time.monotonic()

    def discard(self, index: int) -> None:
        self.paths[index].unlink(missing_ok=True)

    def _read(self, path: Path, identity: dict) -> RunState | None:
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            diffs = config_differences(payload["identity"], identity)
            if diffs:
                self.log(f"{path}: ignored, saved under a different config (differs in {', '.join(diffs[:5])})")
                return None
            return from_payload(payload)
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint only costs the training it held
            self.log(f"{path}: ignored, unreadable ({type(e).__name__}: {e})")
            return None
