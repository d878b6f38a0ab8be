"""The training loop of several MAD runs at once (mad/train.py's loop, for N runs sharing every kernel launch).

The runs of a group share the architecture, the task setting and every other setting; they may differ in their
optimizer's learning rate and weight decay (the MAD grid of one task setting) and in their seed (which draws their
initial weights, their data and its order: the seeds of the optimizer study). Each run keeps its own optimizer
state, schedule, early stopping, divergence check, best-epoch selection and final weights, so its `TrainResult` is
the one `mad.train.train` gives for it alone (up to floating-point reordering; tests/test_stacked_training.py). A run
that stops (early stop, divergence, last epoch) is dropped from the stack, so the others go on without carrying it.

On CUDA the whole training step (forward, backward, optimizer) and the evaluation forward can each be captured in a
CUDA graph, and the step's forward (and so its backward) compiled by `torch.compile` (`StepOptions`): a step is then
one graph replay of fused kernels, and a test batch one replay, instead of hundreds of kernel launches from Python.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.sdpa import preferred_backends
from mad.data import Split
from mad.diagnostics import model_diagnostics
from mad.metrics import score_epoch, score_runs
from mad.optim import split_parameters
from mad.schedules import build_schedules
from mad.stack_checkpoint import RunState, StackCheckpoints, StackStopped
from mad.stacked_model import StackedModel
from mad.stacked_optim import StackedAdamW, StackedMuon, StackedOptimizer
from mad.tasks import IGNORE_INDEX
from mad.train import EpochRecord, LoopConfig, TrainResult, autocast, progress_bar


@dataclass
class StackedRun:
    """One run of a group: its freshly initialised model, its optimizer config (mad/optim.py's dict), its data and
    the seed that orders its batches (as `LoopConfig.seed` does for a run alone)."""

    model: nn.Module
    optimizer: dict
    train_split: Split
    test_split: Split
    seed: int


class StackedData:
    """Every distinct train and test split of a stack's runs on the device, `[S, n, T]` (runs of one seed share one
    split object, so S is the number of seeds), served in batches `[N_active, b, T]` for the runs still in the stack,
    each in its own order."""

    def __init__(self, runs: list[StackedRun], device: torch.device) -> None:
        def key(run: StackedRun) -> tuple[int, int]:
            return id(run.train_split), id(run.test_split)

        distinct = {}  # (train, test) pair -> the first run that has it, in order
        for run in runs:
            distinct.setdefault(key(run), run)
        index = {k: i for i, k in enumerate(distinct)}
        self.split_of = torch.tensor([index[key(r)] for r in runs], device=device)  # run -> row of its splits
        self.train = _stack_splits([r.train_split for r in distinct.values()], device)
        self.test = _stack_splits([r.test_split for r in distinct.values()], device)
        self.orders = [torch.Generator().manual_seed(r.seed) for r in runs]
        self.device = device

    def train_batches(self, active: list[int], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch: each active run's examples in its own shuffled order (mad.data.train_batches' order for it)."""
        n = self.train.inputs.shape[1]
        rows = self.split_of[active][:, None]
        order = torch.stack([torch.randperm(n, generator=self.orders[run]) for run in active]).to(self.device)
        for start in range(0, n, batch_size):
            idx = order[:, start : start + batch_size]
            yield self.train.inputs[rows, idx], self.train.targets[rows, idx]

    def test_batches(self, active: list[int], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The test sets in order (mad.data.test_batches for each active run)."""
        rows = self.split_of[active]
        for start in range(0, self.test.inputs.shape[1], batch_size):
            yield self.test.inputs[rows, start : start + batch_size], self.test.targets[rows, start : start + batch_size]

    def test_inputs(self, run: int) -> torch.Tensor:
        """Run `run`'s test inputs `[n, T]`."""
        return self.test.inputs[self.split_of[run]]


def _stack_splits(splits: list[Split], device: torch.device) -> Split:
    """`[S, n, T]` inputs and targets of S splits `[n, T]`, on the device."""
    return Split(*(torch.stack([getattr(s, f) for s in splits]).to(device) for f in ("inputs", "targets")))


@dataclass(frozen=True)
class StepOptions:
    """How a stack's training step and evaluation forward run: captured as CUDA graphs, the step's forward under
    `torch.compile`.

    Both need CUDA (`for_device` turns them off elsewhere). Compiling costs tens of seconds per stack size; the
    measured gain is in analysis/throughput/throughput.md.
    """

    cuda_graph: bool = False
    compile: bool = False
    eval_graph: bool = True  # with cuda_graph, the evaluation forward is captured too
    compile_min_steps: int = 0  # with compile, stacks of fewer training steps than this skip it (`for_steps`)

    def for_device(self, device: torch.device) -> StepOptions:
        """These options on `device`: off the GPU, without the CUDA-only graphs and compile."""
        return self if device.type == "cuda" else dataclasses.replace(self, cuda_graph=False, compile=False)

    def for_steps(self, steps: int) -> StepOptions:
        """These options for a stack of at most `steps` training steps: compiling only where it can pay back."""
        return dataclasses.replace(self, compile=False) if self.compile and steps < self.compile_min_steps else self


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
    """ValueError unless the runs can share one stack: same optimizer except lr and weight decay, same data shapes."""
    if not runs:
        raise ValueError("a stacked group needs at least one run")
    shared = shared_optimizer_settings(runs[0].optimizer)
    if any(shared_optimizer_settings(r.optimizer) != shared for r in runs[1:]):
        raise ValueError("stacked runs must share every optimizer setting except lr and weight_decay")
    shapes = {(r.train_split.inputs.shape, r.test_split.inputs.shape) for r in runs}
    if len(shapes) > 1:
        raise ValueError(f"stacked runs must have data of one shape (train, test), got {sorted(shapes)}")


def build_optimizers(stacked: StackedModel, template: nn.Module, configs: list[dict]) -> list[StackedOptimizer]:
    """The stacked counterpart of mad.optim.build_optimizers, from each run's optimizer config (they differ only in
    lr and weight decay): [AdamW] or [Muon (hidden matrices), AdamW (rest)]."""
    cfg = configs[0]
    lr = torch.tensor([c["lr"] for c in configs], dtype=torch.float32)
    wd = torch.tensor([c["weight_decay"] for c in configs], dtype=torch.float32)
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
    """One training step of the stack on a batch: `(inputs [N, b, T], targets [N, b, T]) -> losses [N]` (detached).

    Eager by default; with `options.cuda_graph` the step is captured once per stack size and replayed, the batch
    copied into static buffers first (the last, partial batch of an epoch runs eagerly); with `options.compile` the
    stack's forward runs through `torch.compile` (`compile_stack`: recompiled when the stack shrinks).
    """

    def __init__(self, stacked: StackedModel, optimizers: list[StackedOptimizer], cfg: LoopConfig,
                 options: StepOptions = StepOptions()) -> None:  # fmt: skip
        if options != options.for_device(cfg.device):
            raise ValueError(f"{options} needs a CUDA device; on {cfg.device} the step runs eagerly")
        self.stacked, self.optimizers, self.cfg, self.cuda_graph = stacked, optimizers, cfg, options.cuda_graph
        self.forward = compile_stack(stacked) if options.compile else stacked
        self.graph: torch.cuda.CUDAGraph | None = None

    def eager(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast(self.cfg, cache=False):
            logits = self.forward(inputs)
        losses = per_run_loss(logits, targets)
        for opt in self.optimizers:
            opt.zero_grad()
        losses.sum().backward()  # runs are independent: each slice gets exactly its own gradient
        for opt in self.optimizers:
            opt.step()
        return losses.detach()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graph or inputs.shape[1] != self.cfg.batch_size:
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


class EvalFunction:
    """The stack's forward on a test batch, without gradients: `inputs [N, b, T] -> logits [N, b, T, V]`.

    Eager by default; with `cuda_graph` captured once per stack size and replayed (the last, partial batch runs
    eagerly). `forward` is the stack itself, not the step's compiled forward: a test batch is a few percent of an
    epoch, too little to pay a compile per stack size for. A replay returns the graph's own output buffer, which the
    next replay overwrites: score it before the next call.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], cfg: LoopConfig,
                 cuda_graph: bool = False) -> None:  # fmt: skip
        if cuda_graph and cfg.device.type != "cuda":
            raise ValueError(f"a captured evaluation needs a CUDA device; on {cfg.device} it runs eagerly")
        self.forward, self.cfg, self.cuda_graph = forward, cfg, cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def eager(self, inputs: torch.Tensor) -> torch.Tensor:
        with autocast(self.cfg, cache=False):
            return self.forward(inputs)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graph or inputs.shape[1] != self.cfg.batch_size:
            return self.eager(inputs)
        if self.graph is None or inputs.shape != self.static_inputs.shape:
            self._capture(inputs)
        self.static_inputs.copy_(inputs)
        self.graph.replay()
        return self.static_logits

    def reset(self) -> None:
        """Forget the captured graph (after the stack changed size: its weights are new tensors)."""
        self.graph = None

    def _capture(self, inputs: torch.Tensor) -> None:
        if getattr(self.forward, "training", False):
            raise RuntimeError("the test forward is captured in eval mode; call .eval() on the stack first")
        self.static_inputs = inputs.clone()
        # Warm-up on a side stream, as torch.cuda.graphs requires; an evaluation forward changes no state.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.eager(self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits = self.eager(self.static_inputs)


def compile_stack(stacked: StackedModel, backend: str | Callable = "inductor") -> Callable[[torch.Tensor], torch.Tensor]:
    """`torch.compile(stacked)` for one stack's training, compiling afresh for every stack size it will have.

    Dynamo compiles once per stack size (parameter shapes are static) and, by default, stops after 8 compiles of a
    function in a process, running it eagerly from then on with only a warning. A sweep worker trains stack after
    stack (settings of other shapes, stacks shrinking as runs stop), so its later stacks lost compilation silently.
    Here the compile caches are cleared for each new stack, and the limit raised to the N sizes the stack can take
    (N, N - 1, ..., 1) plus one compile to spare. Both are process-wide: only stacks compile in a sweep worker.
    """
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, stacked.num_runs + 1)
    return torch.compile(stacked, backend=backend)


def per_run_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the scored positions, per run: `logits [N, b, T, V]`, `targets [N, b, T]` -> `[N]`."""
    n = logits.shape[0]
    losses = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(n, -1).sum(1) / (targets != IGNORE_INDEX).flatten(1).sum(1)


@preferred_backends()
def train_stacked(runs: list[StackedRun], schedule: dict, cfg: LoopConfig, *, options: StepOptions = StepOptions(),
                  on_finish: Callable[[int, StackedOutcome], None] | None = None,
                  on_epoch: Callable[[int, int, float], None] | None = None,
                  checkpoints: StackCheckpoints | None = None) -> list[StackedOutcome]:  # fmt: skip
    """Train every run of the group; returns, per run in order, what `mad.train.train` would return for it alone,
    with its final weights. `cfg.seed` is not used: each run's own seed orders its data. `on_finish(index, outcome)`
    is called as each run leaves the stack (its result is final then), so that it can be recorded at once: a stack
    stopped later still keeps the runs that finished before. `on_epoch(epoch, runs_left, seconds)` follows every
    epoch: the runs still training after it and the epoch's seconds, training, evaluation and diagnostics.
    `checkpoints` (mad/stack_checkpoint.py): the stack resumes from them if they all hold one epoch, and saves them
    when due, at the end of an epoch; past their deadline it saves them and raises StackStopped."""
    check_group(runs)
    device = cfg.device
    data = StackedData(runs, device)
    scratch = copy.deepcopy(runs[0].model).to(device)  # run n's weights are loaded into it for diagnostics and saving
    stacked = StackedModel([r.model for r in runs]).to(device)
    optimizers = build_optimizers(stacked, scratch, [r.optimizer for r in runs])
    shadows = [ScheduleShadow(r.optimizer["lr"], r.optimizer["weight_decay"], len(optimizers), schedule, cfg.epochs)
               for r in runs]  # fmt: skip
    resumed = checkpoints.load() if checkpoints is not None else None
    if resumed is not None and not checkpoints.fits(resumed, [r.model for r in runs], optimizers):
        resumed = None
    results = [state.result for state in resumed] if resumed else [TrainResult(status="ok") for _ in runs]
    probes = [data.test_inputs(n)[: cfg.diagnostics_batch] for n in range(len(runs))] if cfg.diagnostics_batch else None
    if probes is not None and resumed is None:
        for run, result, probe in zip(runs, results, probes):
            result.diagnostics = []
            result.initial_diagnostics = model_diagnostics(run.model.to(device), probe)
    first_epoch = 1 if resumed is None else _restore(resumed, stacked, optimizers, shadows, data) + 1
    step = StepFunction(stacked, optimizers, cfg, options)
    evaluate = EvalFunction(stacked, cfg, step.cuda_graph and options.eval_graph)
    active = list(range(len(runs)))  # the run index at each stack position
    outcomes: dict[int, StackedOutcome] = {}
    with progress_bar(cfg.progress) as bar:
        total = full_steps(runs, cfg)
        task = bar.add_task("training", total=total, stats="")
        bar.advance(task, total * (first_epoch - 1) // cfg.epochs)
        for epoch in range(first_epoch, cfg.epochs + 1):
            started = time.perf_counter()
            lrs = _apply_schedules(optimizers, [shadows[i] for i in active])
            stacked.train()
            losses = []
            for inputs, targets in data.train_batches(active, cfg.batch_size):
                losses.append(step(inputs, targets))
                bar.advance(task)
            losses = torch.stack(losses).float().cpu()  # [steps, N]
            train_seconds = time.perf_counter() - started
            scores = evaluate_stacked(stacked, evaluate, data, active, cfg)
            finished = []
            for pos, run in enumerate(active):
                result = results[run]
                result.train_seconds += train_seconds
                result.train_tokens += data.train.inputs[0].numel()  # every run's split has one shape
                record = _close_epoch(result, epoch, lrs[pos], losses[:, pos], scores[pos], started, cfg)
                if record is not None and probes is not None:
                    result.diagnostics.append(model_diagnostics(stacked.load_into(pos, scratch), probes[run]))
                if result.status != "ok" or result.early_stopped or epoch == cfg.epochs:
                    finished.append(pos)
            for run in active:
                shadows[run].step()
            bar.update(task, description=f"epoch {epoch}/{cfg.epochs}", stats=f"{len(active)} runs")
            for pos in finished:
                outcomes[active[pos]] = StackedOutcome(results[active[pos]], _weights(stacked, pos, scratch))
                if on_finish is not None:
                    on_finish(active[pos], outcomes[active[pos]])
            if on_epoch is not None:
                on_epoch(epoch, len(active) - len(finished), time.perf_counter() - started)
            if finished:
                active = [run for pos, run in enumerate(active) if pos not in finished]
                if not active:
                    break
                keep = torch.tensor([pos for pos in range(stacked.num_runs) if pos not in finished], device=device)
                stacked.select(keep)
                for opt in optimizers:
                    opt.select(keep)
                step.reset()
                evaluate.reset()
            if checkpoints is not None and checkpoints.due():
                saved = checkpoints.save({run: _run_state(epoch, pos, run, stacked, optimizers, data, results[run],
                                                          scratch) for pos, run in enumerate(active)})  # fmt: skip
                if checkpoints.stopping():
                    raise StackStopped(epoch, len(active), saved)
    return [outcomes[i] for i in range(len(runs))]


def _run_state(epoch: int, pos: int, run: int, stacked: StackedModel, optimizers: list[StackedOptimizer],
               data: StackedData, result: TrainResult, scratch: nn.Module) -> RunState:  # fmt: skip
    """Run `run` (at stack position `pos`) after `epoch` epochs, on the CPU."""
    return RunState(
        epoch=epoch,
        weights=_weights(stacked, pos, scratch),
        optimizer_state=[[t[pos].detach().cpu().clone() for t in opt.state_tensors()] for opt in optimizers],
        step_counts=[opt.step_count.item() for opt in optimizers],
        data_order=data.orders[run].get_state(),
        result=copy.deepcopy(result),
    )


def _restore(states: list[RunState], stacked: StackedModel, optimizers: list[StackedOptimizer],
             shadows: list[ScheduleShadow], data: StackedData) -> int:  # fmt: skip
    """Put every run's saved weights, optimizer state, schedule and data order back (run i at stack position i);
    returns the epoch the states were saved after."""
    for pos, state in enumerate(states):
        stacked.load_run(pos, state.weights)
        for opt, saved in zip(optimizers, state.optimizer_state, strict=True):
            for tensor, value in zip(opt.state_tensors(), saved, strict=True):
                tensor[pos].copy_(value)
        data.orders[pos].set_state(state.data_order)
        for _ in range(state.epoch):
            shadows[pos].step()
    for index, opt in enumerate(optimizers):
        opt.step_count.fill_(states[0].step_counts[index])
    return states[0].epoch


def full_steps(runs: list[StackedRun], cfg: LoopConfig) -> int:
    """Training steps of each of the runs when none stops early: `cfg.epochs` x batches per epoch."""
    return cfg.epochs * math.ceil(len(runs[0].train_split.inputs) / cfg.batch_size)


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
def evaluate_stacked(stacked: StackedModel, forward: EvalFunction, data: StackedData, active: list[int],
                     cfg: LoopConfig) -> list:  # fmt: skip
    """mad.train.evaluate for every run of the stack, each on its own test set, through `forward` (the stack's, eager
    or captured): one `EpochScores` per position."""
    stacked.eval()
    batches, sizes = [], []
    for inputs, targets in data.test_batches(active, cfg.batch_size):
        batches.append(score_runs(forward(inputs), targets))
        sizes.append(targets.shape[1])
    return score_epoch(batches, sizes)
