import math

import torch

from mad.metrics import BatchScores, combine_batches, macro_accuracy, score_batch

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
    scores = score_batch(logits, targets)
    assert (scores.num_correct, scores.num_scored) == (3, 5)  # micro 0.6


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
