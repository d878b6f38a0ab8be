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

    Returns NaN when the batch has no scored position. The readable definition: training scores through
    `score_runs`, which computes the same for N runs without host syncs, and tests/test_metrics.py holds the two equal.
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


def score_runs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One test batch scored for N runs at once, on the logits' device, without a host sync.

    `logits [N, B, T, V]` (any float dtype; computed in float32), `targets [N, B, T]` (each run's own) -> `[N, 4]`
    float64: per run the summed cross entropy over scored positions, the number of scored positions, the number
    predicted correctly, and the macro accuracy (`macro_accuracy`; NaN when no position is scored).
    """
    N, V = logits.shape[0], logits.shape[-1]
    logits = logits.float()
    per_token = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    loss_sum = per_token.view(N, -1).sum(1, dtype=torch.float64)
    preds = logits.argmax(dim=-1)  # [N, B, T]
    scored = targets != IGNORE_INDEX
    weight = scored.flatten().double()  # [N*B*T]
    correct = ((preds == targets) & scored).flatten().double()
    run = torch.arange(N, device=logits.device).repeat_interleave(scored[0].numel()) * V  # each position's run
    true_class = run + torch.where(scored, targets, 0).flatten()  # unscored positions weigh 0 wherever they land
    predicted_class = run + preds.flatten()

    def per_class(slots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(N * V, dtype=torch.float64, device=logits.device).index_add_(0, slots, values).view(N, V)

    support = per_class(true_class, weight)
    predicted = per_class(predicted_class, weight)
    true_pos = per_class(predicted_class, correct)
    present = (support + predicted) > 0
    recall = true_pos / support.clamp(min=1)
    macro = (recall * present).sum(1) / present.sum(1)  # 0 / 0 = NaN when nothing is scored
    counts = torch.stack([weight.view(N, -1).sum(1), correct.view(N, -1).sum(1)], dim=1)
    return torch.cat([loss_sum[:, None], counts, macro[:, None]], dim=1)


def batch_scores(row: list[float], num_sequences: int) -> BatchScores:
    """`BatchScores` of one run from its row of `score_runs` (on the host)."""
    loss_sum, num_scored, num_correct, macro = row
    return BatchScores(loss_sum=loss_sum, num_scored=int(num_scored), num_correct=int(num_correct),
                       macro_accuracy=macro, num_sequences=num_sequences)  # fmt: skip


def score_epoch(batches: list[torch.Tensor], sizes: list[int]) -> list[EpochScores]:
    """Per run, the epoch's scores from its `score_runs` rows of every test batch (`sizes`: sequences per batch).
    One host transfer for the whole epoch."""
    table = torch.stack(batches).cpu().tolist()  # [batches][N][4]
    runs = len(table[0])
    return [combine_batches([batch_scores(rows[n], size) for rows, size in zip(table, sizes)]) for n in range(runs)]
