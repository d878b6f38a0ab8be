"""Fuzzy in-context recall (MAD protocol section 1.3): keys and values are multi-token motifs.

Layout (``V = vocab_size``, ``n = V - 1``, no noise tokens):

* key tokens   ``[0, n // 2)``
* value tokens ``[n // 2, n)``
* pad token    ``V - 1`` (left padding)

A motif of size ``s`` is ``s`` distinct tokens of its vocabulary in uniformly random order (drawn directly, never
by enumerating permutations). Key sizes are uniform over ``1 .. k_motif_size`` in the train split and always
``k_motif_size`` in the test split; value sizes are uniform over ``1 .. v_motif_size`` in both splits.

One sequence (``L = seq_len``, ``k = k_motif_size``, ``v = v_motif_size``):

1. a probe pair (key motif, value motif) with ``kvp`` tokens and an insertion point ``probe_idx`` uniform in
   ``[0, L - 2 * kvp)``;
2. key-value pairs are appended while the current length is ``< L - kvp - (k + v)``; the first time the current
   length reaches ``probe_idx`` the probe pair is appended instead (unless a drawn key already equalled the
   probe key). A key motif equal to the probe key takes the probe value; a key seen before in the sequence
   reuses its stored value; a new key gets a fresh value motif;
3. the probe pair is appended again at the end;
4. the sequence is left-padded with the pad token to ``L + 1`` tokens and shifted.

Returned shapes: ``inputs, targets`` int64 ``[num_examples, seq_len]``.

Scoring:

* train split: ``targets = seq[1:]`` (next-token prediction everywhere, pads included);
* test split: the value tokens of pairs whose key motif occurred earlier in the sequence (including the in-loop
  probe) and the value tokens of the final probe are scored, everything else is ``IGNORE_INDEX`` (-100).

Vectorisation: the regular pairs are i.i.d., so all candidate pairs of a row are drawn up front; repeats are
found by sorting integer motif codes, pair lengths and positions follow from cumulative sums, and the probe
insertion point and the loop's stopping rule are applied in closed form. Rows are processed in fixed-size chunks
to bound memory.
"""

from __future__ import annotations

import numpy as np

from mad.tasks.in_context_recall import first_occurrence_slot

__all__ = ["check_setting", "draw_distinct", "generate_fuzzy_recall"]

_CHUNK_SLOTS = 2_000_000  # rows per chunk = _CHUNK_SLOTS // slots per row


def _key_vocab(vocab_size: int) -> tuple[int, int]:
    """(number of key tokens, number of value tokens)."""
    clean = vocab_size - 1
    return clean // 2, clean - clean // 2


def check_setting(vocab_size: int, seq_len: int, k_motif_size: int, v_motif_size: int) -> None:
    """Raise ``ValueError`` if the setting does not admit the fuzzy recall layout."""
    if k_motif_size < 1 or v_motif_size < 1:
        raise ValueError(
            f"k_motif_size and v_motif_size must be >= 1, got k_motif_size={k_motif_size}, "
            f"v_motif_size={v_motif_size}"
        )
    num_keys, num_values = _key_vocab(vocab_size)
    if num_keys < k_motif_size or num_values < v_motif_size:
        raise ValueError(
            f"vocab_size={vocab_size} too small: fuzzy recall has {num_keys} key tokens and {num_values} value "
            f"tokens (vocab_size - 1 split in halves, pad = vocab_size - 1) but needs at least "
            f"k_motif_size={k_motif_size} distinct key tokens and v_motif_size={v_motif_size} distinct value tokens"
        )
    if seq_len <= 2 * (k_motif_size + v_motif_size):
        raise ValueError(
            f"seq_len must be > 2 * (k_motif_size + v_motif_size) = {2 * (k_motif_size + v_motif_size)} "
            f"for fuzzy recall, got {seq_len}"
        )
    if (num_keys + 1) ** k_motif_size * (seq_len // 2 + 1) >= 2**62:
        raise ValueError(
            f"k_motif_size={k_motif_size} too large for vocab_size={vocab_size}: key motifs cannot be encoded "
            "as 64-bit integers"
        )


def draw_distinct(rng: np.random.Generator, shape: tuple[int, ...], num_tokens: int, size: int) -> np.ndarray:
    """``size`` distinct tokens of ``[0, num_tokens)`` in uniformly random order, for every index of ``shape``.

    Draw ``i`` picks the ``r``-th unused token (``r`` uniform in ``[0, num_tokens - i)``) by stepping ``r`` over
    the already chosen tokens in ascending order. Returns int64 ``[*shape, size]``.
    """
    out = np.empty((*shape, size), dtype=np.int64)
    for i in range(size):
        r = rng.integers(0, num_tokens - i, shape)
        if i:
            chosen = np.sort(out[..., :i], axis=-1)
            for j in range(i):
                r += r >= chosen[..., j]
        out[..., i] = r
    return out


def _motif_codes(tokens: np.ndarray, sizes: np.ndarray, base: int) -> np.ndarray:
    """Injective integer code of the motifs ``tokens[..., :sizes]`` (tokens in ``[0, base - 1)``)."""
    width = tokens.shape[-1]
    weights = base ** np.arange(width, dtype=np.int64)
    present = np.arange(width) < sizes[..., None]
    return ((tokens + 1) * weights * present).sum(axis=-1)


def _key_sizes(rng: np.random.Generator, shape: tuple[int, ...], k_motif_size: int, train: bool) -> np.ndarray:
    if train:
        return rng.integers(1, k_motif_size + 1, shape)
    return np.full(shape, k_motif_size, dtype=np.int64)


def _scatter(
    buffer: np.ndarray, row_base: np.ndarray, positions: np.ndarray, values: np.ndarray, mask: np.ndarray
) -> None:
    """``buffer`` (flat) at ``row_base + positions`` gets ``values`` where ``mask`` (all broadcast together)."""
    flat_index = np.broadcast_to(row_base + positions, mask.shape)[mask]
    buffer[flat_index] = np.broadcast_to(values, mask.shape)[mask]


def _generate_chunk(
    rng: np.random.Generator,
    num_rows: int,
    train: bool,
    ignore_index: int,
    vocab_size: int,
    seq_len: int,
    k_motif_size: int,
    v_motif_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Full-length (``seq_len + 1``) token and target arrays for ``num_rows`` sequences."""
    k, v = k_motif_size, v_motif_size
    num_keys, num_values = _key_vocab(vocab_size)
    pad = vocab_size - 1
    num_slots = seq_len // 2 + 1  # upper bound on regular pairs: every pair has >= 2 tokens
    rows = np.arange(num_rows)
    slots = np.arange(num_slots)

    # 1. probe pair and insertion point
    probe_ks = _key_sizes(rng, (num_rows,), k, train)
    probe_vs = rng.integers(1, v + 1, num_rows)
    probe_key = draw_distinct(rng, (num_rows,), num_keys, k)
    probe_value = draw_distinct(rng, (num_rows,), num_values, v) + num_keys
    kvp = probe_ks + probe_vs
    probe_idx = rng.integers(0, seq_len - 2 * kvp)
    limit = seq_len - kvp - (k + v)

    # 2. candidate regular pairs (i.i.d. per slot)
    key_sizes = _key_sizes(rng, (num_rows, num_slots), k, train)
    fresh_sizes = rng.integers(1, v + 1, (num_rows, num_slots))
    key_tokens = draw_distinct(rng, (num_rows, num_slots), num_keys, k)
    fresh_values = draw_distinct(rng, (num_rows, num_slots), num_values, v) + num_keys

    codes = _motif_codes(key_tokens, key_sizes, num_keys + 1)
    is_probe_key = codes == _motif_codes(probe_key, probe_ks, num_keys + 1)[:, None]
    first_slot = first_occurrence_slot(codes)
    value_tokens = np.where(
        is_probe_key[..., None],
        probe_value[:, None, :],
        np.take_along_axis(fresh_values, first_slot[..., None], axis=1),
    )
    value_sizes = np.where(is_probe_key, probe_vs[:, None], np.take_along_axis(fresh_sizes, first_slot, axis=1))

    # positions: probe goes before the first regular pair starting at >= probe_idx, unless its key came earlier
    lengths = key_sizes + value_sizes
    starts = np.cumsum(lengths, axis=1) - lengths
    probe_slot = np.argmax(starts >= probe_idx[:, None], axis=1)
    probe_start = starts[rows, probe_slot]
    matched_before = (is_probe_key & (slots < probe_slot[:, None])).any(axis=1)
    inserted = ~matched_before & (probe_start < limit)
    after_probe = inserted[:, None] & (slots >= probe_slot[:, None])
    starts = starts + np.where(after_probe, kvp[:, None], 0)
    included = starts < limit[:, None]
    end = (lengths * included).sum(axis=1) + kvp * inserted
    offset = seq_len + 1 - (end + kvp)  # left padding

    scored = included & ((first_slot < slots) | (is_probe_key & after_probe))

    seq = np.full(num_rows * (seq_len + 1), pad, dtype=np.int64)
    tgt = np.full(num_rows * (seq_len + 1), ignore_index, dtype=np.int64)
    row_base = (rows * (seq_len + 1) + offset)[:, None, None]
    key_pos, val_pos = np.arange(k), np.arange(v)
    # regular pairs
    key_mask = included[..., None] & (key_pos < key_sizes[..., None])
    _scatter(seq, row_base, starts[..., None] + key_pos, key_tokens, key_mask)
    val_mask = included[..., None] & (val_pos < value_sizes[..., None])
    val_at = (starts + key_sizes)[..., None] + val_pos
    _scatter(seq, row_base, val_at, value_tokens, val_mask)
    _scatter(tgt, row_base, val_at, value_tokens, val_mask & scored[..., None])
    # in-loop probe pair (unscored) and final probe pair (value scored)
    row_base = row_base[:, 0]
    probe_key_mask = key_pos < probe_ks[:, None]
    probe_val_mask = val_pos < probe_vs[:, None]
    probe_start = probe_start[:, None]
    _scatter(seq, row_base, probe_start + key_pos, probe_key, probe_key_mask & inserted[:, None])
    probe_val_at = probe_start + probe_ks[:, None] + val_pos
    _scatter(seq, row_base, probe_val_at, probe_value, probe_val_mask & inserted[:, None])
    end = end[:, None]
    _scatter(seq, row_base, end + key_pos, probe_key, probe_key_mask)
    final_val_at = end + probe_ks[:, None] + val_pos
    _scatter(seq, row_base, final_val_at, probe_value, probe_val_mask)
    _scatter(tgt, row_base, final_val_at, probe_value, probe_val_mask)
    return seq.reshape(num_rows, seq_len + 1), tgt.reshape(num_rows, seq_len + 1)


def generate_fuzzy_recall(
    rng: np.random.Generator,
    num_examples: int,
    train: bool,
    ignore_index: int,
    vocab_size: int,
    seq_len: int,
    k_motif_size: int,
    v_motif_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num_examples`` fuzzy recall sequences; see the module docstring."""
    chunk = max(1, _CHUNK_SLOTS // (seq_len // 2 + 1))
    inputs = np.empty((num_examples, seq_len), dtype=np.int64)
    targets = np.empty((num_examples, seq_len), dtype=np.int64)
    for lo in range(0, num_examples, chunk):
        hi = min(num_examples, lo + chunk)
        seq, tgt = _generate_chunk(
            rng, hi - lo, train, ignore_index, vocab_size, seq_len, k_motif_size, v_motif_size
        )
        inputs[lo:hi] = seq[:, :-1]
        targets[lo:hi] = seq[:, 1:] if train else tgt[:, 1:]
    return inputs, targets
