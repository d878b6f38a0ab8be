"""Mid-stack checkpoints: a stack stopped before its runs finished (a deadline, a preempted job) resumes from its last
checkpoint instead of starting over.

At the end of an epoch, at most every `every_s` seconds, each run still training writes `checkpoint.pt` into its run
directory: its weights, its slices of the optimizer state, its data order's generator, its training result so far and
the epoch, with its config's identity (`mad.resume.run_identity`) and the format version. All the runs' files are
written (and synced) before any replaces its predecessor, so a stop mid-save leaves the previous set; a save that
fails (a full disk) is reported and training goes on. A run's checkpoint is deleted once its record is written (not a
`failed` record: a relaunch resumes it). The runs of a stack train in lockstep, so the launcher groups runs by their
checkpoints' epoch (`checkpoint_epoch`), and a group resumes only when every run in it has a checkpoint of its own
config at one epoch, whose tensors fit the model and optimizers; otherwise it starts over and says why. Resuming gives
the records an uninterrupted stack gives, up to floating-point reordering (tests/test_stack_checkpoint.py).

With a deadline (`stop_by`, a Unix time), a stack still training then saves every run's checkpoint at the end of its
epoch and raises StackStopped: a call to a machine lent for minutes loses none of the training it paid for, when the
checkpoints travel with the records (mad/checkpoint_archive.py).

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
FORMAT = 1  # bumped when RunState's meaning changes: checkpoints of another format are not resumed


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
    return payload | {"format": FORMAT, "identity": identity, "result": dataclasses.asdict(state.result)}


def from_payload(payload: dict) -> RunState:
    result = dict(payload["result"])
    result["epochs"] = [EpochRecord(**e) for e in result["epochs"]]
    fields = {f.name: payload[f.name] for f in dataclasses.fields(RunState)}
    return RunState(**(fields | {"result": TrainResult(**result)}))


def checkpoint_epoch(run_dir: Path) -> int | None:
    """The epoch of `run_dir`'s checkpoint (None: none, or unreadable), read without loading its tensors."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # noqa: BLE001 - the group's load says why it is not resumed
        return None


class StackStopped(Exception):
    """A stack that reached its deadline (`StackCheckpoints.stop_by`) after `epoch` epochs, with `runs` runs still
    training; `saved`: whether their checkpoints were written (the next launch resumes them)."""

    def __init__(self, epoch: int, runs: int, saved: bool) -> None:
        super().__init__(epoch, runs, saved)
        self.epoch, self.runs, self.saved = epoch, runs, saved

    def __str__(self) -> str:
        kept = "checkpointed" if self.saved else "its checkpoints NOT saved"
        return f"stopped at its deadline after epoch {self.epoch}, {self.runs} runs training, {kept}"


class StackCheckpoints:
    """The checkpoints of one group's runs: `load` at the start, `due` and `save` after each epoch, `discard` once a
    run's record is written. `every_s` <= 0 turns periodic saving off (loading still resumes what a previous launch
    saved); past `stop_by` (a Unix time; None: no deadline) a save is due at once, and then `stopping` says stop."""

    def __init__(self, run_dirs: list[Path], identities: list[dict], every_s: float, log=print,
                 stop_by: float | None = None) -> None:  # fmt: skip
        self.paths = [Path(d) / CHECKPOINT_NAME for d in run_dirs]
        self.identities = identities
        self.every_s = every_s
        self.stop_by = stop_by
        self.log = log
        self._last = time.monotonic()

    def load(self) -> list[RunState] | None:
        """One state per run when every run has a usable checkpoint at one epoch, else None (and why, if any had one).
        `fits` then checks them against the model and optimizers, and announces the resume."""
        found = [self._read(path, identity) for path, identity in zip(self.paths, self.identities)]
        if all(state is None for state in found):
            return None
        epochs = {state.epoch for state in found if state is not None}
        if any(state is None for state in found) or len(epochs) > 1:
            have = sum(state is not None for state in found)
            self.log(f"stack of {len(found)} runs starts over: {have} have a usable checkpoint, at epochs "
                     f"{sorted(epochs)} (resuming needs all of them at one epoch)")  # fmt: skip
            return None
        return found

    def fits(self, states: list[RunState], models: list, optimizers: list) -> bool:
        """Whether every state's weights fit its run's model and its optimizer slices the stacked optimizers (run i
        at stack position i); else says why (e.g. a code change renamed parameters) and the stack starts over."""
        slices = [[tuple(t.shape[1:]) for t in opt.state_tensors()] for opt in optimizers]
        for path, state, model in zip(self.paths, states, models):
            want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            have = {k: tuple(v.shape) for k, v in state.weights.items()}
            saved = [[tuple(t.shape) for t in opt] for opt in state.optimizer_state]
            if have != want or saved != slices or len(state.step_counts) != len(optimizers):
                self.log(f"{path}: its tensors do not fit this model and optimizer; the stack of {len(states)} runs "
                         "starts over")  # fmt: skip
                return False
        self.log(f"stack of {len(states)} runs resumes after epoch {states[0].epoch} ({self.paths[0].parent.parent})")
        return True

    def stopping(self) -> bool:
        return self.stop_by is not None and time.time() >= self.stop_by

    def due(self) -> bool:
        return self.stopping() or (self.every_s > 0 and time.monotonic() - self._last >= self.every_s)

    def save(self, states: dict[int, RunState]) -> bool:
        """Write run i's state for every i in `states` (indices into the group): all to temporary files first, then
        each over its predecessor. A failure is reported, not raised: it costs only the checkpoint. Returns whether
        they were written."""
        self._last = time.monotonic()
        temps = {index: self._temp(index) for index in states}
        try:
            for index, state in states.items():
                with open(temps[index], "wb") as f:
                    torch.save(to_payload(state, self.identities[index]), f)
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            self.log(f"checkpoint not saved ({type(e).__name__}: {e}); training goes on")
            for temp in temps.values():
                temp.unlink(missing_ok=True)
            return False
        for index, temp in temps.items():
            os.replace(temp, self.paths[index])
        return True

    def discard(self, index: int) -> None:
        self.paths[index].unlink(missing_ok=True)
        self._temp(index).unlink(missing_ok=True)

    def _temp(self, index: int) -> Path:
        return self.paths[index].with_name(CHECKPOINT_NAME + ".tmp")

    def _read(self, path: Path, identity: dict) -> RunState | None:
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("format") != FORMAT:
                self.log(f"{path}: ignored, format {payload.get('format')} (this version reads {FORMAT})")
                return None
            diffs = config_differences(payload["identity"], identity)
            if diffs:
                self.log(f"{path}: ignored, saved under a different config (differs in {', '.join(diffs[:5])})")
                return None
            return from_payload(payload)
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint only costs the training it held
            self.log(f"{path}: ignored, unreadable ({type(e).__name__}: {e})")
            return None
