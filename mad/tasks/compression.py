"""Compression (MAD protocol section 1.5).

Layout (``V = vocab_size``): content tokens ``[0, V - 1)``, compression token ``V - 1``.

One sequence: ``seq_len - 1`` content tokens drawn uniformly with replacement, then the compression token.

Returned shapes: ``inputs, targets`` int64 ``[num_examples, seq_len]`` (no shift).

Scoring (identical for train and test): ``targets = inputs``; every position is scored, including the final
compression token (the model must reconstruct the sequence from the last position's state).
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_setting", "generate_compression"]


def check_setting(vocab_size: int, seq_len: int) -> None:
    """Raise ``ValueError`` if the setting does not admit the compression layout."""
    if vocab_size < 2:
        raise ValueError(
            f"vocab_size must be >= 2 for compression (content tokens + compression token), got {vocab_size}"
        )
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 for compression (content + compression token), got {seq_len}")


def generate_compression(
    rng: np.random.Generator,
    num_examples: int,
    train: bool,
    ignore_index: int,
    vocab_size: int,
    seq_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num_examples`` compression sequences; see the module docstring."""
    del train, ignore_index  # same distribution for both splits; nothing is ignored
    inputs = np.empty((num_examples, seq_len), dtype=np.int64)
    inputs[:, :-1] = rng.integers(0, vocab_size - 1, (num_examples, seq_len - 1))
    inputs[:, -1] = vocab_size - 1
    return inputs, inputs.copy()
