"""Selective copying (MAD protocol section 1.4).

Layout (``V = vocab_size``, ``c = num_tokens_to_copy``, ``L = seq_len``, ``b = L - 2c - 1`` blanks):

* content tokens ``[0, V - 2)``
* blank token    ``V - 2``
* copy token     ``V - 1``

One sequence: ``c`` content tokens drawn uniformly with replacement, with the ``b`` blanks spread over the ``c``
gaps *before* each content token (each blank independently picks one of the ``c`` gaps, the distribution of
the reference's insert-before at ``randint(0, c)``; so the last content token is directly followed by the copy
token), then the copy token, then ``c`` blanks.

Returned shapes: ``inputs, targets`` int64 ``[num_examples, seq_len]`` (no shift).

Scoring (identical for train and test): the last ``c`` positions (the trailing blanks) must output the ``c``
content tokens in order; the first ``L - c`` targets are ``IGNORE_INDEX`` (-100).
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_setting", "generate_selective_copying"]


def check_setting(vocab_size: int, seq_len: int, num_tokens_to_copy: int) -> None:
    """Raise ``ValueError`` if the setting does not admit the selective copying layout."""
    if vocab_size < 3:
        raise ValueError(
            f"vocab_size must be >= 3 for selective copying (content tokens, blank V-2, copy V-1), got {vocab_size}"
        )
    if num_tokens_to_copy < 1:
        raise ValueError(f"num_tokens_to_copy must be >= 1, got {num_tokens_to_copy}")
    if seq_len <= 2 * num_tokens_to_copy + 1:
        raise ValueError(
            f"seq_len must be > 2 * num_tokens_to_copy + 1 = {2 * num_tokens_to_copy + 1} "
            f"(at least one blank), got seq_len={seq_len}, num_tokens_to_copy={num_tokens_to_copy}"
        )


def generate_selective_copying(
    rng: np.random.Generator,
    num_examples: int,
    train: bool,
    ignore_index: int,
    vocab_size: int,
    seq_len: int,
    num_tokens_to_copy: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num_examples`` selective copying sequences; see the module docstring (``train`` is unused)."""
    del train  # same distribution and targets for both splits
    c = num_tokens_to_copy
    num_blanks = seq_len - 2 * c - 1
    blank, copy = vocab_size - 2, vocab_size - 1

    content = rng.integers(0, vocab_size - 2, (num_examples, c))
    blanks_per_gap = rng.multinomial(num_blanks, np.full(c, 1.0 / c), size=num_examples)
    positions = np.arange(c) + np.cumsum(blanks_per_gap, axis=1)

    inputs = np.full((num_examples, seq_len), blank, dtype=np.int64)
    np.put_along_axis(inputs, positions, content, axis=1)
    inputs[:, c + num_blanks] = copy
    targets = np.full((num_examples, seq_len), ignore_index, dtype=np.int64)
    targets[:, seq_len - c :] = content
    return inputs, targets
