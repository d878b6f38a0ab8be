"""MAD's accuracy metric (torchmetrics' macro MulticlassAccuracy on scored positions) and its companions.

Reference behaviour (docs/mad-protocol.md section 2.4): per test batch, for every class c that occurs among the
scored targets or predictions, recall_c = TP_c / (TP_c + FN_c) (0 for a class that was only predicted); the batch
score is the mean recall over those classes; the epoch score is the batch-size-weighted mean over batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mad.tasks import IGNORE_INDEX


def macro_accuracy(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Macro accuracy of one batch. `preds`, `targets` int64 of one shape; positions with target -100 are skipped.

    Returns NaN when the batch has no scored position.
    """
    scored = targets != IGNORE_INDEX
    t, p = targets[scored], preds[scored]
    if t.numel() == 0:
        return float("nan")
    support = torch.bincount(t, minlength=num_classes)
    predicted = torch.bincount(p, minlength=num_classes)
    true_pos = torch.bincount(t[p == t], minlength=num_classes)
    present = (support + predicted) > 0
    recall = true_pos.double() / support.clamp(min=1)
    return recall[present].mean().item()


@dataclass
class BatchScores:
    """Sums over one batch, so an epoch can weight batches as Lightning does."""

    loss_sum: float  # summed cross entropy over scored positions
    num_scored: int
    num_correct: int
    macro_accuracy: float  # this batch's macro accuracy (NaN if no scored position)
    num_sequences: int


def score_batch(logits: torch.Tensor, targets: torch.Tensor) -> BatchScores:
    """`logits [B, T, V]` (any float dtype), `targets [B, T]` -> the batch's scores (computed in float32)."""
    logits = logits.float()
    loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    preds = logits.argmax(dim=-1)
    scored = targets != IGNORE_INDEX
    return BatchScores(
        loss_sum=loss_sum.item(),
        num_scored=int(scored.sum()),
        num_correct=int((preds == targets)[scored].sum()),
        macro_accuracy=macro_accuracy(preds, targets, logits.shape[-1]),
        num_sequences=targets.shape[0],
    )


@dataclass
class EpochScores:
    loss: float  # mean cross entropy per scored token
    perplexity: float  # batch-size-weighted mean of per-batch perplexities (torchmetrics' Perplexity, logged per batch)
    accuracy: float  # MAD's metric: batch-size-weighted mean of per-batch macro accuracy
    token_accuracy: float  # plain (micro) accuracy over all scored positions


def combine_batches(batches: list[BatchScores]) -> EpochScores:
    """Aggregate per-batch scores the way Lightning's epoch logging does (weights = sequences per batch)."""
    scored = [b for b in batches if b.num_scored > 0]
    weights = torch.tensor([b.num_sequences for b in scored], dtype=torch.float64)
    batch_ppl = torch.tensor([b.loss_sum / b.num_scored for b in scored], dtype=torch.float64).exp()
    batch_acc = torch.tensor([b.macro_accuracy for b in scored], dtype=torch.float64)
    total_scored = sum(b.num_scored for b in scored)
    return EpochScores(
        loss=sum(b.loss_sum for b in scored) / total_scored,
        perplexity=float((weights * batch_ppl).sum() / weights.sum()),
        accuracy=float((weights * batch_acc).sum() / weights.sum()),
        token_accuracy=sum(b.num_correct for b in scored) / total_scored,
    )
