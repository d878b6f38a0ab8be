import math

import torch

from mad.metrics import BatchScores, combine_batches, macro_accuracy, score_epoch, score_runs

IGN = -100


def test_macro_accuracy_matches_torchmetrics_hand_example():
    # docs/mad-protocol.md 2.4: classes 8, 9, 10 in targets, 1 and 11 only predicted -> (1 + 2/3 + 0 + 0 + 0) / 5
    targets = torch.tensor([8, 9, 9, 9, 10])
    preds = torch.tensor([8, 9, 9, 1, 11])
    assert math.isclose(macro_accuracy(preds, targets, num_classes=16), (1 + 2 / 3) / 5)


def test_macro_accuracy_skips_ignored_positions_and_differs_from_micro():
    targets = torch.tensor([[IGN, 3, 3, 3, IGN], [5, IGN, 5, IGN, IGN]])
    preds = torch.tensor([[7, 3, 3, 4, 0], [5, 1, 2, 9, 9]])
    # class 3: 2/3; class 5: 1/2; classes 4 and 2 predicted only: 0 -> (2/3 + 1/2) / 4
    assert math.isclose(macro_accuracy(preds, targets, num_classes=10), (2 / 3 + 1 / 2) / 4)
    logits = torch.nn.functional.one_hot(preds, 10).float()
    _, num_scored, num_correct, macro = score_runs(logits[None], targets[None])[0].tolist()
    assert (num_correct, num_scored) == (3, 5)  # micro 0.6
    assert math.isclose(macro, (2 / 3 + 1 / 2) / 4)


def test_macro_accuracy_of_a_batch_without_scored_positions_is_nan():
    assert math.isnan(macro_accuracy(torch.zeros(3, dtype=torch.long), torch.full((3,), IGN), num_classes=4))


def test_epoch_scores_weight_batches_by_size_and_perplexity_per_batch():
    a = BatchScores(loss_sum=2.0, num_scored=2, num_correct=2, macro_accuracy=1.0, num_sequences=3)
    b = BatchScores(loss_sum=4.0, num_scored=1, num_correct=0, macro_accuracy=0.0, num_sequences=1)
    epoch = combine_batches([a, b])
    assert math.isclose(epoch.accuracy, 0.75)
    assert math.isclose(epoch.token_accuracy, 2 / 3)
    assert math.isclose(epoch.loss, 2.0)
    assert math.isclose(epoch.perplexity, (3 * math.exp(1.0) + math.exp(4.0)) / 4)


def test_scoring_runs_at_once_matches_scoring_each_alone():
    """score_runs on N runs, each with its own targets, gives each run what the definitions give it alone: summed
    cross entropy, counts and macro_accuracy (the torchmetrics-equivalent definition above); NaN with nothing scored."""
    gen = torch.Generator().manual_seed(0)
    N, B, T, V = 3, 4, 6, 7
    logits = torch.randn(N, B, T, V, generator=gen)
    targets = torch.randint(0, V, (N, B, T), generator=gen)
    targets[:, :, :2] = IGN
    targets[1, 3] = IGN
    targets[2, 0, 4] = IGN
    rows = score_runs(logits, targets)
    for n in range(N):
        preds, scored = logits[n].argmax(-1), targets[n] != IGN
        loss = torch.nn.functional.cross_entropy(logits[n].flatten(0, 1), targets[n].flatten(), ignore_index=IGN,
                                                 reduction="sum")  # fmt: skip
        expected = [loss.item(), scored.sum().item(), ((preds == targets[n]) & scored).sum().item(),
                    macro_accuracy(preds, targets[n], V)]  # fmt: skip
        assert torch.allclose(rows[n], torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    nothing = score_runs(logits, torch.full((N, B, T), IGN))
    assert torch.isnan(nothing[:, 3]).all() and (nothing[:, :3] == 0).all()


def test_epoch_scores_from_rows_of_several_runs():
    """score_epoch weights each run's batches by their sizes, as combine_batches does for one run."""
    rows = [torch.tensor([[2.0, 2, 2, 1.0], [0.0, 2, 1, 0.5]]), torch.tensor([[4.0, 1, 0, 0.0], [1.0, 1, 1, 1.0]])]
    first, second = score_epoch(rows, sizes=[3, 1])
    assert math.isclose(first.accuracy, 0.75) and math.isclose(first.loss, 2.0)
    assert math.isclose(second.accuracy, (3 * 0.5 + 1.0) / 4) and math.isclose(second.token_accuracy, 2 / 3)
