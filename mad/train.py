"""The training loop of one MAD run (docs/mad-protocol.md section 2.3).

Per epoch: shuffled batches of the train set, cross entropy over scored positions, every optimizer stepped, the
schedules (mad/schedules.py) stepped once; then the whole test set is scored, and with `diagnostics_batch > 0` the
mechanism diagnostics (mad/diagnostics.py) are taken on the first that many test sequences (also once before
training). Training stops after the first epoch whose test accuracy exceeds `early_stop_accuracy`, or when the loss
stops being finite (the run is then `diverged`).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from kernels.sdpa import preferred_backends
from mad.data import Split, test_batches, train_batches
from mad.diagnostics import model_diagnostics
from mad.metrics import score_epoch, score_runs
from mad.tasks import IGNORE_INDEX


@dataclass
class LoopConfig:
    epochs: int
    batch_size: int
    early_stop_accuracy: float
    seed: int  # seeds the data order only; the caller seeds model initialisation
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 on GPU, None (float32) on CPU
    progress: bool = True
    diagnostics_batch: int = 0  # > 0: mechanism diagnostics on this many test sequences per epoch; 0: off


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    lr: float  # base learning rate used during this epoch
    train_loss: float
    test_loss: float
    test_perplexity: float
    test_accuracy: float  # MAD's macro accuracy
    test_token_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    status: str  # "ok" or "diverged"
    epochs: list[EpochRecord] = field(default_factory=list)
    diverged_at_step: int | None = None  # 1-based optimizer step whose loss was NaN or infinite
    steps: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0
    early_stopped: bool = False
    diagnostics: list[dict] | None = None  # one per epoch (aligned with `epochs`); None when diagnostics are off
    initial_diagnostics: dict | None = None  # before the first step

    def best_epoch(self) -> EpochRecord | None:
        """The epoch with the lowest test perplexity (MAD reports its numbers from that checkpoint)."""
        finite = [e for e in self.epochs if math.isfinite(e.test_perplexity)]
        return min(finite, key=lambda e: e.test_perplexity) if finite else None

    def history(self) -> dict[str, list]:
        """Per-epoch metrics, one list per field (compact in JSON, and a DataFrame in one call); with diagnostics on,
        also `diagnostics`: one dict per epoch (mad/diagnostics.py), kept apart so the metric columns stay flat."""
        fields = [f.name for f in dataclasses.fields(EpochRecord)]
        history: dict[str, list] = {name: [getattr(e, name) for e in self.epochs] for name in fields}
        if self.diagnostics is not None:
            history["diagnostics"] = list(self.diagnostics)
        return history


@preferred_backends()
def train(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    schedules: list,
    train_split: Split,
    test_split: Split,
    cfg: LoopConfig,
) -> TrainResult:
    """Train `model` in place and return its per-epoch history."""
    model.to(cfg.device)
    train_split = Split(train_split.inputs.to(cfg.device), train_split.targets.to(cfg.device))
    test_split = Split(test_split.inputs.to(cfg.device), test_split.targets.to(cfg.device))
    order = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(train_split.inputs.shape[0] / cfg.batch_size)
    result = TrainResult(status="ok")
    diagnostics_inputs = test_split.inputs[: cfg.diagnostics_batch] if cfg.diagnostics_batch > 0 else None
    if diagnostics_inputs is not None:
        result.diagnostics = []
        result.initial_diagnostics = model_diagnostics(model, diagnostics_inputs)
    with progress_bar(cfg.progress) as bar:
        task = bar.add_task("training", total=cfg.epochs * steps_per_epoch, stats="")
        for epoch in range(1, cfg.epochs + 1):
            started = time.perf_counter()
            lr = optimizers[0].param_groups[0]["lr"]
            losses = _train_epoch(model, optimizers, train_split, order, cfg, lambda: bar.advance(task))
            result.train_seconds += time.perf_counter() - started
            result.train_tokens += train_split.inputs.numel()
            bad = (~torch.isfinite(losses)).nonzero()
            if bad.numel():
                result.status, result.diverged_at_step = "diverged", result.steps + int(bad[0]) + 1
                result.steps += int(bad[0]) + 1
                break
            result.steps += losses.numel()
            for schedule in schedules:
                schedule.step()
            scores = evaluate(model, test_split, cfg)
            record = EpochRecord(
                epoch=epoch,
                lr=lr,
                train_loss=losses.mean().item(),
                test_loss=scores.loss,
                test_perplexity=scores.perplexity,
                test_accuracy=scores.accuracy,
                test_token_accuracy=scores.token_accuracy,
                seconds=time.perf_counter() - started,
            )
            result.epochs.append(record)
            if diagnostics_inputs is not None:  # outside `seconds`; draws no random numbers, changes no state
                result.diagnostics.append(model_diagnostics(model, diagnostics_inputs))
            tok_s = result.train_tokens / max(result.train_seconds, 1e-9)
            bar.update(task, description=f"epoch {epoch}/{cfg.epochs}", stats=_stats(record, tok_s))
            if record.test_accuracy > cfg.early_stop_accuracy:
                result.early_stopped = True
                break
    return result


def _train_epoch(model, optimizers, split: Split, order: torch.Generator, cfg: LoopConfig, advance) -> torch.Tensor:
    """Runs one epoch; returns the per-step losses `[steps]` (float32, on CPU). Syncs with the device once."""
    model.train()
    losses = []
    for inputs, targets in train_batches(split, cfg.batch_size, order):
        losses.append(train_step(model, optimizers, inputs, targets, cfg))
        advance()
    return torch.stack(losses).float().cpu()


def train_step(model: nn.Module, optimizers, inputs: torch.Tensor, targets: torch.Tensor, cfg: LoopConfig) -> torch.Tensor:
    """One optimizer step on a batch `([b, T], [b, T])`; returns the loss (detached, on the device)."""
    with autocast(cfg):
        logits = model(inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, cfg: LoopConfig):
    """MAD's test scores of `model` on `split` (batches of `cfg.batch_size` sequences)."""
    model.eval()
    batches, sizes = [], []
    for inputs, targets in test_batches(split, cfg.batch_size):
        with autocast(cfg):
            logits = model(inputs)
        batches.append(score_runs(logits[None], targets[None]))
        sizes.append(targets.shape[0])
    return score_epoch(batches, sizes)[0]


def autocast(cfg: LoopConfig, *, cache: bool = True):
    """The loop's autocast context (none in float32). `cache=False` drops autocast's weight-cast cache, which must
    not outlive a captured CUDA graph."""
    if cfg.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=cfg.device.type, dtype=cfg.autocast_dtype, cache_enabled=cache)


def _stats(record: EpochRecord, tokens_per_s: float) -> str:
    return (
        f"loss {record.train_loss:.3f}  test acc {record.test_accuracy:.3f}  ppl {record.test_perplexity:.2f}  "
        f"{tokens_per_s / 1e3:.1f}k tok/s"
    )


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
        console=Console(stderr=True),
        disable=not enabled,
    )
