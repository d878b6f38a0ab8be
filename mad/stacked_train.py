"""The training loop of several MAD runs at once (mad/train.py's loop, for N runs sharing every kernel launch).

The runs of a group differ only in their optimizer's learning rate and weight decay (the MAD grid of one task
setting): they share the architecture, the data (same task setting and seed, so the same batches in the same order)
and every other setting. Each run keeps its own optimizer state, schedule, early stopping, divergence check,
best-epoch selection and final weights, so its `TrainResult` is the one `mad.train.train` gives for it alone (up to
floating-point reordering; tests/test_stacked_training.py). A run that stops (early stop, divergence, last epoch) is
dropped from the stack, so the others go on without carrying it.

On CUDA the whole training step (forward, backward, optimizer) can be captured in a CUDA graph, and the stack's
forward (and so its backward) compiled by `torch.compile` (`StepOptions`): a step is then one graph replay of fused
kernels instead of hundreds of kernel launches from Python.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mad.data import Split, test_batches, train_batches
from mad.diagnostics import model_diagnostics
from mad.metrics import score_epoch, score_runs
from mad.optim import split_parameters
from mad.schedules import build_schedules
from mad.stacked_model import StackedModel
from mad.stacked_optim import StackedAdamW, StackedMuon, StackedOptimizer
from mad.tasks import IGNORE_INDEX
from mad.train import EpochRecord, LoopConfig, TrainResult, autocast, progress_bar


@dataclass
class StackedRun:
    """One run of a group: its freshly initialised model and its optimizer config (mad/optim.py's dict)."""

    model: nn.Module
    optimizer: dict


@dataclass(frozen=True)
class StepOptions:
    """How a stack's training step runs: captured as a CUDA graph, with the forward under `torch.compile`.

    Both need CUDA (`for_device` turns them off elsewhere). Compiling costs tens of seconds per stack size; the
    measured gain is in analysis/throughput/throughput.md.
    """

    cuda_graph: bool = False
    compile: bool = False

    def for_device(self, device: torch.device) -> StepOptions:
        return self if device.type == "cuda" else StepOptions()


@dataclass
class StackedOutcome:
    result: TrainResult
    state_dict: dict[str, torch.Tensor]  # final weights, on the CPU


class ScheduleShadow:
    """One run's lr and weight decay per epoch, from the very schedules (mad/schedules.py) its alone run would step.

    The schedules drive stand-in torch optimizers (one parameter each) that carry the run's base lr and weight decay;
    their param groups are read after every step.
    """

    def __init__(self, lr: float, weight_decay: float, num_optimizers: int, schedule: dict, epochs: int) -> None:
        self.optimizers = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, weight_decay=weight_decay)
                           for _ in range(num_optimizers)]  # fmt: skip
        self.schedules = build_schedules(self.optimizers, schedule, epochs=epochs)

    def values(self, index: int) -> tuple[float, float]:
        group = self.optimizers[index].param_groups[0]
        return group["lr"], group["weight_decay"]

    def step(self) -> None:
        for opt, schedule in zip(self.optimizers, self.schedules):
            opt.step()  # a no-op (no gradients); keeps the schedulers' "step the optimizer first" check quiet
            schedule.step()


PER_RUN_OPTIMIZER_KEYS = ("lr", "weight_decay")  # what may differ between the runs of one stack


def shared_optimizer_settings(optimizer: dict) -> dict:
    """The optimizer config without its per-run keys: what every run of a stack must have in common."""
    return {k: v for k, v in optimizer.items() if k not in PER_RUN_OPTIMIZER_KEYS}


def check_group(runs: list[StackedRun]) -> None:
    """ValueError unless the runs can share one stack: same optimizer except lr and weight decay."""
    if not runs:
        raise ValueError("a stacked group needs at least one run")
    shared = shared_optimizer_settings(runs[0].optimizer)
    if any(shared_optimizer_settings(r.optimizer) != shared for r in runs[1:]):
        raise ValueError("stacked runs must share every optimizer setting except lr and weight_decay")


def build_optimizers(stacked: StackedModel, template: nn.Module, runs: list[StackedRun]) -> list[StackedOptimizer]:
    """The stacked counterpart of mad.optim.build_optimizers: [AdamW] or [Muon (hidden matrices), AdamW (rest)]."""
    cfg = runs[0].optimizer
    lr = torch.tensor([r.optimizer["lr"] for r in runs], dtype=torch.float32)
    wd = torch.tensor([r.optimizer["weight_decay"] for r in runs], dtype=torch.float32)
    params = stacked.named_stacked()
    adamw = dict(betas=tuple(cfg["betas"]), eps=cfg["eps"])
    if cfg["name"] == "adamw":
        return [StackedAdamW(list(params.values()), lr, wd, **adamw)]
    if cfg["name"] == "muon":
        hidden, rest = split_parameters(template)
        name_of = {id(p): name for name, p in template.named_parameters()}
        muon = StackedMuon([params[name_of[id(p)]] for p in hidden], lr, wd, momentum=cfg["momentum"],
                           nesterov=cfg["nesterov"], ns_steps=cfg["ns_steps"], adjust_lr_fn=cfg["adjust_lr_fn"])  # fmt: skip
        return [muon, StackedAdamW([params[name_of[id(p)]] for p in rest], lr, wd, **adamw)]
    raise ValueError(f"unknown optimizer {cfg['name']!r}; allowed: adamw, muon")


class StepFunction:
    """One training step of the stack on a batch: `(inputs [b, T], targets [b, T]) -> losses [N]` (detached).

    Eager by default; with `options.cuda_graph` the step is captured once per stack size and replayed, the batch
    copied into static buffers first (the last, partial batch of an epoch runs eagerly); with `options.compile` the
    stack's forward runs through `torch.compile` (recompiled when the stack shrinks).
    """

    def __init__(self, stacked: StackedModel, optimizers: list[StackedOptimizer], cfg: LoopConfig,
                 options: StepOptions = StepOptions()) -> None:  # fmt: skip
        if options != options.for_device(cfg.device):
            raise ValueError(f"{options} needs a CUDA device; on {cfg.device} the step runs eagerly")
        self.stacked, self.optimizers, self.cfg, self.cuda_graph = stacked, optimizers, cfg, options.cuda_graph
        self.forward = torch.compile(stacked) if options.compile else stacked
        self.graph: torch.cuda.CUDAGraph | None = None

    def eager(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = self.stacked.num_runs
        with autocast(self.cfg, cache=False):
            logits = self.forward(inputs.expand(n, *inputs.shape))
        losses = per_run_loss(logits, targets)
        for opt in self.optimizers:
            opt.zero_grad()
        losses.sum().backward()  # runs are independent: each slice gets exactly its own gradient
        for opt in self.optimizers:
            opt.step()
        return losses.detach()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graph or inputs.shape[0] != self.cfg.batch_size:
            return self.eager(inputs, targets)
        if self.graph is None:
            self._capture(inputs, targets)
        self.static_inputs.copy_(inputs)
        self.static_targets.copy_(targets)
        self.graph.replay()
        return self.static_losses.clone()

    def reset(self) -> None:
        """Forget the captured graph (after the stack changed size)."""
        self.graph = None

    def _capture(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.static_inputs, self.static_targets = inputs.clone(), targets.clone()
        # Warm-up on a side stream, as torch.cuda.graphs requires, with the state saved and restored so that the
        # warm-up steps leave no trace: the captured graph then replays exactly the eager step.
        saved = self._state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.eager(self.static_inputs, self.static_targets)
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the step; runs nothing until replayed
            self.static_losses = self.eager(self.static_inputs, self.static_targets)

    def _tensors(self) -> list[torch.Tensor]:
        """Everything a step changes: the stacked parameters, the optimizers' states and step counts."""
        tensors = list(self.stacked.stacked) + [t for opt in self.optimizers for t in opt.state_tensors()]
        return tensors + [opt.step_count for opt in self.optimizers]

    def _state(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self._tensors()]

    def _restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, s in zip(self._tensors(), saved):
                t.copy_(s)


def per_run_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the scored positions, per run: `logits [N, b, T, V]`, `targets [b, T]` -> `[N]`."""
    n = logits.shape[0]
    flat_targets = targets.flatten().repeat(n)
    losses = F.cross_entropy(logits.float().flatten(0, 2), flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(n, -1).sum(1) / (targets != IGNORE_INDEX).sum()


def train_stacked(runs: list[StackedRun], schedule: dict, train_split: Split, test_split: Split, cfg: LoopConfig,
                  *, options: StepOptions = StepOptions()) -> list[StackedOutcome]:  # fmt: skip
    """Train every run of the group; returns, per run in order, what `mad.train.train` would return for it alone,
    with its final weights. `cfg.seed` orders the data of all runs (they share it, as they share the data)."""
    check_group(runs)
    device = cfg.device
    train_split = Split(train_split.inputs.to(device), train_split.targets.to(device))
    test_split = Split(test_split.inputs.to(device), test_split.targets.to(device))
    scratch = copy.deepcopy(runs[0].model).to(device)  # run n's weights are loaded into it for diagnostics and saving
    results = [TrainResult(status="ok") for _ in runs]
    probe = test_split.inputs[: cfg.diagnostics_batch] if cfg.diagnostics_batch > 0 else None
    if probe is not None:
        for run, result in zip(runs, results):
            result.diagnostics = []
            result.initial_diagnostics = model_diagnostics(run.model.to(device), probe)
    stacked = StackedModel([r.model for r in runs]).to(device)
    optimizers = build_optimizers(stacked, scratch, runs)
    shadows = [ScheduleShadow(r.optimizer["lr"], r.optimizer["weight_decay"], len(optimizers), schedule, cfg.epochs)
               for r in runs]  # fmt: skip
    step = StepFunction(stacked, optimizers, cfg, options)
    active = list(range(len(runs)))  # the run index at each stack position
    outcomes: dict[int, StackedOutcome] = {}
    order = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(train_split.inputs.shape[0] / cfg.batch_size)
    with progress_bar(cfg.progress) as bar:
        task = bar.add_task("training", total=cfg.epochs * steps_per_epoch, stats="")
        for epoch in range(1, cfg.epochs + 1):
            started = time.perf_counter()
            lrs = _apply_schedules(optimizers, [shadows[i] for i in active])
            stacked.train()
            losses = []
            for inputs, targets in train_batches(train_split, cfg.batch_size, order):
                losses.append(step(inputs, targets))
                bar.advance(task)
            losses = torch.stack(losses).float().cpu()  # [steps, N]
            train_seconds = time.perf_counter() - started
            scores = evaluate_stacked(stacked, test_split, cfg)
            finished = []
            for pos, run in enumerate(active):
                result = results[run]
                result.train_seconds += train_seconds
                result.train_tokens += train_split.inputs.numel()
                record = _close_epoch(result, epoch, lrs[pos], losses[:, pos], scores[pos], started, cfg)
                if record is not None and probe is not None:
                    result.diagnostics.append(model_diagnostics(stacked.load_into(pos, scratch), probe))
                if result.status != "ok" or result.early_stopped or epoch == cfg.epochs:
                    finished.append(pos)
            for run in active:
                shadows[run].step()
            bar.update(task, description=f"epoch {epoch}/{cfg.epochs}", stats=f"{len(active)} runs")
            for pos in finished:
                outcomes[active[pos]] = StackedOutcome(results[active[pos]], _weights(stacked, pos, scratch))
            if finished:
                active = [run for pos, run in enumerate(active) if pos not in finished]
                if not active:
                    break
                keep = torch.tensor([pos for pos in range(stacked.num_runs) if pos not in finished], device=device)
                stacked.select(keep)
                for opt in optimizers:
                    opt.select(keep)
                step.reset()
    return [outcomes[i] for i in range(len(runs))]


def _apply_schedules(optimizers: list[StackedOptimizer], shadows: list[ScheduleShadow]) -> list[float]:
    """Set this epoch's lr and weight decay of every active run (in place: a captured graph reads them); returns
    the lr of the first optimizer per run, the one a record reports."""
    for index, opt in enumerate(optimizers):
        values = torch.tensor([shadow.values(index) for shadow in shadows], dtype=torch.float32)
        opt.lr.copy_(values[:, 0])
        opt.weight_decay.copy_(values[:, 1])
    return [shadow.values(0)[0] for shadow in shadows]


def _close_epoch(result: TrainResult, epoch: int, lr: float, losses: torch.Tensor, scores, started: float,
                 cfg: LoopConfig) -> EpochRecord | None:
    """mad.train.train's end-of-epoch bookkeeping for one run; returns the epoch's record (None if it diverged)."""
    bad = (~torch.isfinite(losses)).nonzero()
    if bad.numel():
        result.status, result.diverged_at_step = "diverged", result.steps + int(bad[0]) + 1
        result.steps += int(bad[0]) + 1
        return None
    result.steps += losses.numel()
    record = EpochRecord(epoch=epoch, lr=lr, train_loss=losses.mean().item(), test_loss=scores.loss,
                         test_perplexity=scores.perplexity, test_accuracy=scores.accuracy,
                         test_token_accuracy=scores.token_accuracy, seconds=time.perf_counter() - started)  # fmt: skip
    result.epochs.append(record)
    result.early_stopped = record.test_accuracy > cfg.early_stop_accuracy
    return record


def _weights(stacked: StackedModel, pos: int, scratch: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in stacked.load_into(pos, scratch).state_dict().items()}


@torch.no_grad()
def evaluate_stacked(stacked: StackedModel, split: Split, cfg: LoopConfig) -> list:
    """mad.train.evaluate for every run of the stack: one `Scores` per stack position."""
    stacked.eval()
    n = stacked.num_runs
    batches, sizes = [], []
    for inputs, targets in test_batches(split, cfg.batch_size):
        with autocast(cfg):
            logits = stacked(inputs.expand(n, *inputs.shape))
        batches.append(score_runs(logits, targets))
        sizes.append(targets.shape[0])
    return score_epoch(batches, sizes)
