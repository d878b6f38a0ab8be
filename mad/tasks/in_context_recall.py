"""In-context recall and noisy in-context recall (MAD protocol sections 1.1 and 1.2).

Layout (``V = vocab_size``, ``N = noise_vocab_size`` (0 for plain recall), ``n = V - N``):

* key tokens   ``[0, n // 2)``
* value tokens ``[n // 2, n)``
* noise tokens ``[n, V)`` (noisy variant only); no other special token (multi-query layout).

One sequence has ``P = seq_len / 2`` key-value slots. Slots ``0 .. P-2`` hold a key drawn uniformly (with
replacement) and the value bound to that key in this sequence (each key gets a value drawn uniformly from the
value tokens when first used; several keys may share a value). In the noisy variant each of these slots is
instead, with probability ``frac_noise``, a pair of uniform noise tokens, except slot ``not_noise_idx`` (drawn
uniformly in ``[0, P)``), which is always a real pair. The last slot is the probe: a key drawn uniformly among
the distinct keys presented so far, followed by its value.

Returned shapes: ``inputs, targets`` int64 ``[num_examples, seq_len - 1]`` (autoregressive shift of the
``seq_len``-token sequence: ``inputs = seq[:-1]``).

Scoring:

* train split: ``targets = seq[1:]`` (plain next-token prediction everywhere, noise included);
* test split: only the values of repeated keys (the key occurred in an earlier real slot) and the final probe
  value are scored; every other target is ``IGNORE_INDEX`` (-100).

The whole batch is generated with array operations: a per-sequence value table is drawn up front, and
repeated keys are detected by sorting ``(key, slot)`` codes row-wise.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_setting", "first_occurrence_slot", "generate_recall"]


def check_setting(vocab_size: int, seq_len: int, noise_vocab_size: int = 0, frac_noise: float = 0.0) -> None:
    """Raise ``ValueError`` if the setting does not admit the recall layout."""
    if seq_len % 2 != 0:
        raise ValueError(f"seq_len must be even for (noisy) in-context recall (key-value pairs), got {seq_len}")
    if seq_len < 4:
        raise ValueError(f"seq_len must be >= 4 (one key-value pair plus the probe pair), got {seq_len}")
    if not 0.0 <= frac_noise < 1.0:
        raise ValueError(f"frac_noise must be in [0, 1), got {frac_noise}")
    if frac_noise > 0 and noise_vocab_size < 1:
        raise ValueError(f"noise_vocab_size must be >= 1 when frac_noise > 0, got {noise_vocab_size}")
    clean = vocab_size - noise_vocab_size
    if clean < 4:
        raise ValueError(
            f"vocab_size - noise_vocab_size must be >= 4 (at least 2 keys and 2 values), got "
            f"vocab_size={vocab_size}, noise_vocab_size={noise_vocab_size}"
        )


def first_occurrence_slot(codes: np.ndarray) -> np.ndarray:
    """For every slot, the index of the first slot of the same row holding the same code.

    ``codes``: non-negative integer array ``[B, M]``. Returns int64 ``[B, M]``; a slot is a first occurrence iff
    ``result[b, j] == j``. Implemented with one row-wise sort of ``code * M + slot``.
    """
    num_rows, num_slots = codes.shape
    composite = codes.astype(np.int64) * num_slots + np.arange(num_slots, dtype=np.int64)
    composite.sort(axis=1)
    sorted_codes = composite // num_slots
    sorted_slots = composite - sorted_codes * num_slots
    starts = np.ones((num_rows, num_slots), dtype=bool)
    starts[:, 1:] = sorted_codes[:, 1:] != sorted_codes[:, :-1]
    # position (in sorted order) of the start of each group, carried forward along the row
    group_start = np.maximum.accumulate(np.where(starts, np.arange(num_slots), 0), axis=1)
    first_sorted = np.take_along_axis(sorted_slots, group_start, axis=1)
    result = np.empty_like(first_sorted)
    np.put_along_axis(result, sorted_slots, first_sorted, axis=1)
    return result


def _draw_noise_mask(
    rng: np.random.Generator, num_examples: int, num_pairs: int, frac_noise: float
) -> np.ndarray:
    """Boolean ``[B, P-1]``: which regular slots are noise pairs."""
    not_noise_idx = rng.integers(0, num_pairs, num_examples)
    if frac_noise <= 0:
        return np.zeros((num_examples, num_pairs - 1), dtype=bool)
    slots = np.arange(num_pairs - 1)
    noise = (rng.random((num_examples, num_pairs - 1)) < frac_noise) & (slots != not_noise_idx[:, None])
    # If not_noise_idx fell on the probe slot and every regular slot is noise (probability < 1e-7 on the MAD
    # grid) there is no key to probe: make the first slot a real pair in those rows.
    noise[~(~noise).any(axis=1), 0] = False
    return noise


def _draw_probe_keys(rng: np.random.Generator, keys: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Pick, per row, one of the distinct presented keys uniformly (``first`` marks first occurrences)."""
    num_distinct = first.sum(axis=1)
    pick = rng.integers(0, num_distinct)
    rank = np.cumsum(first, axis=1) - 1
    slot = np.argmax(first & (rank == pick[:, None]), axis=1)
    return np.take_along_axis(keys, slot[:, None], axis=1)[:, 0]


def generate_recall(
    rng: np.random.Generator,
    num_examples: int,
    train: bool,
    ignore_index: int,
    vocab_size: int,
    seq_len: int,
    noise_vocab_size: int = 0,
    frac_noise: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num_examples`` (noisy) in-context recall sequences; see the module docstring."""
    num_pairs = seq_len // 2
    clean = vocab_size - noise_vocab_size
    num_keys = clean // 2

    noise = _draw_noise_mask(rng, num_examples, num_pairs, frac_noise)
    keys = rng.integers(0, num_keys, (num_examples, num_pairs - 1))
    value_table = rng.integers(num_keys, clean, (num_examples, num_keys))
    values = np.take_along_axis(value_table, keys, axis=1)

    codes = np.where(noise, num_keys, keys)  # all noise slots share the sentinel code num_keys
    first = (first_occurrence_slot(codes) == np.arange(num_pairs - 1)) & ~noise
    repeat = ~first & ~noise
    probe_key = _draw_probe_keys(rng, keys, first)
    probe_value = np.take_along_axis(value_table, probe_key[:, None], axis=1)[:, 0]

    seq = np.empty((num_examples, seq_len), dtype=np.int64)
    if frac_noise > 0:
        noise_tokens = rng.integers(clean, vocab_size, (num_examples, num_pairs - 1, 2))
        seq[:, 0:-2:2] = np.where(noise, noise_tokens[..., 0], keys)
        seq[:, 1:-2:2] = np.where(noise, noise_tokens[..., 1], values)
    else:
        seq[:, 0:-2:2] = keys
        seq[:, 1:-2:2] = values
    seq[:, -2] = probe_key
    seq[:, -1] = probe_value
    if train:
        return seq[:, :-1], seq[:, 1:]

    targets = np.full((num_examples, seq_len), ignore_index, dtype=np.int64)
    targets[:, 1:-2:2] = np.where(repeat, values, ignore_index)
    targets[:, -1] = probe_value
    return seq[:, :-1], targets[:, 1:]
