"""Memorization (MAD protocol section 1.6).

Layout (``V = vocab_size``, ``m = V - 1``):

* key tokens   ``[0, m // 2)``
* value tokens ``[m // 2, m)`` (with odd ``m`` one value token is never used)
* insert token ``V - 1``

A fixed key -> value bijection (``m // 2`` keys shuffled and paired positionally with shuffled value tokens) is
built from the seed alone by :func:`memorization_table`, so it is identical for the train and test splits and for
every sequence.

One sequence has ``seq_len / 2`` slots ``[key, INSERT]``, keys drawn uniformly with replacement; targets are
``[IGNORE_INDEX, table[key]]``. The value never appears in the input.

Returned shapes: ``inputs, targets`` int64 ``[num_examples, seq_len]`` (no shift).

Scoring (identical for train and test): the ``seq_len / 2`` insert positions (16 at ``seq_len=32``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_setting", "generate_memorization", "memorization_table"]


def check_setting(vocab_size: int, seq_len: int) -> None:
    """Raise ``ValueError`` if the setting does not admit the memorization layout."""
    if vocab_size < 3:
        raise ValueError(
            f"vocab_size must be >= 3 for memorization (>= 1 key, >= 1 value, insert token V-1), got {vocab_size}"
        )
    if seq_len < 2 or seq_len % 2 != 0:
        raise ValueError(f"seq_len must be even and >= 2 for memorization ([key, insert] slots), got {seq_len}")


def memorization_table(vocab_size: int, rng: np.random.Generator) -> np.ndarray:
    """Random bijection ``table[key] = value`` for keys ``[0, m // 2)``, values in ``[m // 2, m)``, ``m = V - 1``."""
    num_tokens = vocab_size - 1
    num_keys = num_tokens // 2
    keys = rng.permutation(num_keys)
    values = rng.permutation(num_tokens - num_keys) + num_keys
    table = np.empty(num_keys, dtype=np.int64)
    table[keys] = values[:num_keys]
    return table


def generate_memorization(
    rng: np.random.Generator,
    num_examples: int,
    train: bool,
    ignore_index: int,
    vocab_size: int,
    seq_len: int,
    table: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num_examples`` memorization sequences with the fixed ``table``; see the module docstring."""
    del train  # same distribution and targets for both splits
    keys = rng.integers(0, table.shape[0], (num_examples, seq_len // 2))
    inputs = np.empty((num_examples, seq_len), dtype=np.int64)
    inputs[:, 0::2] = keys
    inputs[:, 1::2] = vocab_size - 1
    targets = np.full((num_examples, seq_len), ignore_index, dtype=np.int64)
    targets[:, 1::2] = table[keys]
    return inputs, targets
