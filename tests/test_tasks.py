"""Tests of the MAD task generators (mad.tasks) and the 66-setting grid (mad.tasks.grid)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from mad.tasks import IGNORE_INDEX, TASKS, generate, memorization_table, task_settings
from mad.tasks.grid import generator_kwargs, mad_settings

N = 128  # examples per generated set (keeps the file fast)
SEED = 12345

# (task, changed setting) pairs: every task at its baseline and at one non-baseline setting
CASES: list[tuple[str, dict[str, Any]]] = [
    ("in_context_recall", {}),
    ("in_context_recall", {"vocab_size": 64, "seq_len": 256}),
    ("noisy_in_context_recall", {}),
    ("noisy_in_context_recall", {"vocab_size": 80, "frac_noise": 0.6}),
    ("fuzzy_in_context_recall", {}),
    ("fuzzy_in_context_recall", {"vocab_size": 32, "seq_len": 256}),
    ("selective_copying", {}),
    ("selective_copying", {"vocab_size": 32, "seq_len": 512, "num_tokens_to_copy": 64}),
    ("compression", {}),
    ("compression", {"vocab_size": 64, "seq_len": 128}),
    ("memorization", {}),
    ("memorization", {"vocab_size": 1024}),
]
CASE_IDS = [f"{task}-{'-'.join(f'{k}{v}' for k, v in kw.items()) or 'baseline'}" for task, kw in CASES]

_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def gen(task: str, split: str, n: int = N, seed: int = SEED, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Cached generation, returned as numpy arrays."""
    key = (task, split, n, seed, tuple(sorted(kw.items())))
    if key not in _cache:
        _cache[key] = generate(task, split, n, seed, **kw)
    x, y = _cache[key]
    return x.numpy(), y.numpy()


def full_setting(task: str, kw: dict[str, Any]) -> dict[str, Any]:
    return {**task_settings(task), **kw}


def value_range(task: str, s: dict[str, Any]) -> tuple[int, int]:
    """Half-open range of scored (test) target tokens."""
    v = s["vocab_size"]
    if task in ("in_context_recall", "noisy_in_context_recall"):
        n = v - s.get("noise_vocab_size", 0)
        return n // 2, n
    if task == "fuzzy_in_context_recall":
        return (v - 1) // 2, v - 1
    if task == "selective_copying":
        return 0, v - 2
    if task == "compression":
        return 0, v
    return (v - 1) // 2, v - 1  # memorization


def input_length(task: str, s: dict[str, Any]) -> int:
    return s["seq_len"] - 1 if task in ("in_context_recall", "noisy_in_context_recall") else s["seq_len"]


# --------------------------------------------------------------------------------------------- shapes & ranges


@pytest.mark.parametrize("task,kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_shapes_dtype_and_token_ranges(task: str, kw: dict[str, Any], split: str) -> None:
    s = full_setting(task, kw)
    x_t, y_t = generate(task, split, 16, SEED, **kw)
    assert x_t.dtype == torch.int64 and y_t.dtype == torch.int64
    assert tuple(x_t.shape) == tuple(y_t.shape) == (16, input_length(task, s))
    x, y = gen(task, split, **kw)
    assert x.min() >= 0 and x.max() < s["vocab_size"]
    scored = y != IGNORE_INDEX
    assert scored.any(axis=1).all()
    assert (y[~scored] == IGNORE_INDEX).all()
    if split == "train" and task in ("in_context_recall", "noisy_in_context_recall", "fuzzy_in_context_recall"):
        assert scored.all() and y.max() < s["vocab_size"]
    else:
        lo, hi = value_range(task, s)
        assert y[scored].min() >= lo and y[scored].max() < hi


def test_task_settings_defaults_and_copy() -> None:
    assert TASKS == (
        "in_context_recall",
        "noisy_in_context_recall",
        "fuzzy_in_context_recall",
        "selective_copying",
        "compression",
        "memorization",
    )
    assert task_settings("in_context_recall") == {"vocab_size": 16, "seq_len": 128}
    assert task_settings("noisy_in_context_recall") == {
        "vocab_size": 32, "seq_len": 128, "noise_vocab_size": 16, "frac_noise": 0.2}
    assert task_settings("fuzzy_in_context_recall") == {
        "vocab_size": 16, "seq_len": 128, "k_motif_size": 3, "v_motif_size": 3}
    assert task_settings("selective_copying") == {"vocab_size": 16, "seq_len": 256, "num_tokens_to_copy": 16}
    assert task_settings("compression") == {"vocab_size": 16, "seq_len": 32}
    assert task_settings("memorization") == {"vocab_size": 256, "seq_len": 32}
    d = task_settings("compression")
    d["vocab_size"] = 999
    assert task_settings("compression")["vocab_size"] == 16


# --------------------------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("task,kw", CASES, ids=CASE_IDS)
def test_determinism_and_stream_separation(task: str, kw: dict[str, Any]) -> None:
    x1, y1 = generate(task, "train", 32, 7, **kw)
    x2, y2 = generate(task, "train", 32, 7, **kw)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    xt, _ = generate(task, "test", 32, 7, **kw)
    assert not torch.equal(x1, xt)
    x3, _ = generate(task, "train", 32, 8, **kw)
    assert not torch.equal(x1, x3)


def test_tasks_sharing_a_generator_use_different_streams() -> None:
    a, _ = generate("in_context_recall", "train", 8, 1, vocab_size=32)
    b, _ = generate("noisy_in_context_recall", "train", 8, 1, vocab_size=32, noise_vocab_size=0, frac_noise=0.0)
    assert a.shape == b.shape and not torch.equal(a, b)


# --------------------------------------------------------------------------------------------- recall


@pytest.mark.parametrize("task", ["in_context_recall", "noisy_in_context_recall", "fuzzy_in_context_recall"])
def test_recall_train_targets_are_next_tokens(task: str) -> None:
    x, y = gen(task, "train")
    assert (y[:, :-1] == x[:, 1:]).all()


def test_in_context_recall_baseline_scores_56_positions() -> None:
    """V=16, L=128: 63 key-value slots + probe; scored = repeats (63 - distinct keys) + probe = 56 when all 8 keys
    occur. With keys drawn with replacement a key is missing from ~0.18 % of sequences (then 57)."""
    x, y = gen("in_context_recall", "test", n=512)
    counts = (y != IGNORE_INDEX).sum(axis=1)
    distinct = np.array([len(set(row[0:126:2].tolist())) for row in x])
    assert (counts == 64 - distinct).all()
    assert (counts[distinct == 8] == 56).all()
    assert (counts == 56).mean() > 0.99
    x, y = gen("in_context_recall", "test", n=64)  # with this seed all 64 sequences present all 8 keys
    assert ((y != IGNORE_INDEX).sum(axis=1) == 56).all()


def test_in_context_recall_long_sequences_score_504() -> None:
    _, y = gen("in_context_recall", "test", n=16, seq_len=1024)
    assert ((y != IGNORE_INDEX).sum(axis=1) == 504).all()


@pytest.mark.parametrize("task,kw", [c for c in CASES if c[0] in ("in_context_recall", "noisy_in_context_recall")])
def test_recall_scored_values_are_correct(task: str, kw: dict[str, Any]) -> None:
    s = full_setting(task, kw)
    n_clean = s["vocab_size"] - s.get("noise_vocab_size", 0)
    x, y = gen(task, "test", **kw)
    seq = np.concatenate([x, y[:, -1:]], axis=1)  # the last target (probe value) is always scored
    for row_seq, row_y in zip(seq, y):
        table: dict[int, int] = {}
        for slot in range(len(row_seq) // 2):
            key, value = int(row_seq[2 * slot]), int(row_seq[2 * slot + 1])
            target = int(row_y[2 * slot])  # target of input position 2*slot is token 2*slot+1
            if key >= n_clean:  # noise pair: both tokens noise, never scored
                assert value >= n_clean and target == IGNORE_INDEX
                continue
            assert key < n_clean // 2 <= value < n_clean
            if key in table:
                assert table[key] == value and target == value
            else:
                assert target == IGNORE_INDEX
                assert slot < len(row_seq) // 2 - 1, "the probe key must have been presented"
                table[key] = value
        assert (row_y[1::2] == IGNORE_INDEX).all()  # targets that are keys are never scored


def test_noisy_recall_noise_fraction() -> None:
    x, y = gen("noisy_in_context_recall", "test", n=256)
    keys = x[:, 0:126:2]
    assert 0.15 < (keys >= 16).mean() < 0.25  # frac_noise = 0.2 per slot
    x, _ = gen("noisy_in_context_recall", "test", n=256, frac_noise=0.8)
    assert 0.7 < (x[:, 0:126:2] >= 16).mean() < 0.85


def _parse_fuzzy(row: np.ndarray, num_keys: int, pad: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Split a full fuzzy sequence into (key motif, value motif, start of value) runs."""
    i = int(np.argmax(row != pad))
    pairs = []
    while i < len(row):
        j = i
        while j < len(row) and row[j] < num_keys:
            j += 1
        k = j
        while k < len(row) and num_keys <= row[k] < pad:
            k += 1
        assert j > i and k > j, "keys and values must alternate"
        pairs.append((tuple(row[i:j].tolist()), tuple(row[j:k].tolist()), j))
        i = k
    return pairs


@pytest.mark.parametrize("kw", [c[1] for c in CASES if c[0] == "fuzzy_in_context_recall"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_fuzzy_recall_structure_and_scored_values(kw: dict[str, Any], split: str) -> None:
    s = full_setting("fuzzy_in_context_recall", kw)
    v, k_max, v_max = s["vocab_size"], s["k_motif_size"], s["v_motif_size"]
    num_keys, pad = (v - 1) // 2, v - 1
    x, y = gen("fuzzy_in_context_recall", split, **kw)
    seq = np.concatenate([x, y[:, -1:]], axis=1)
    key_sizes: Counter = Counter()
    for row_seq, row_y in zip(seq, y):
        first = int(np.argmax(row_seq != pad))
        assert first >= 1 and (row_seq[first:] != pad).all()  # left padding only, at least one pad
        pairs = _parse_fuzzy(row_seq, num_keys, pad)
        expected = np.full(len(row_y), IGNORE_INDEX)  # test targets rebuilt from the definition
        table: dict[tuple[int, ...], tuple[int, ...]] = {}
        for index, (key, value, start) in enumerate(pairs):
            assert 1 <= len(key) <= k_max and 1 <= len(value) <= v_max
            assert len(set(key)) == len(key) and len(set(value)) == len(value)
            key_sizes[len(key)] += 1
            if key in table:
                assert table[key] == value  # a repeated key motif reuses its value motif
            if key in table or index == len(pairs) - 1:  # repeat, or the final probe
                expected[start - 1 : start - 1 + len(value)] = value
            table[key] = value
        if split == "train":
            assert (row_y == row_seq[1:]).all()
        else:
            assert (row_y == expected).all()
    if split == "test":
        assert set(key_sizes) == {k_max}
    else:
        assert set(key_sizes) == set(range(1, k_max + 1))


def _naive_fuzzy(rng: np.random.Generator, vocab: int, length: int, k: int, v: int, train: bool) -> tuple[int, int]:
    """Literal per-sequence loop of protocol section 1.3; returns (scored test positions, pads)."""
    n = vocab - 1
    keys, vals = np.arange(n // 2), np.arange(n // 2, n)

    def motif(voc: np.ndarray, size: int) -> tuple[int, ...]:
        return tuple(rng.permutation(voc)[:size].tolist())

    def key_size() -> int:
        return int(rng.integers(1, k + 1)) if train else k

    pk, pv = motif(keys, key_size()), motif(vals, int(rng.integers(1, v + 1)))
    kvp = len(pk) + len(pv)
    probe_idx = int(rng.integers(0, length - 2 * kvp))
    cur, scored, table, placed = 0, 0, {}, False
    while cur < length - kvp - (k + v):
        ks, vs = key_size(), int(rng.integers(1, v + 1))
        if cur >= probe_idx and not placed:
            cur += kvp
            table[pk], placed = pv, True
            continue
        key = motif(keys, ks)
        seen = key in table
        if key == pk:
            value, placed = pv, True
        else:
            value = table[key] if seen else motif(vals, vs)
        table[key] = value
        cur += len(key) + len(value)
        scored += len(value) if seen else 0
    return scored + len(pv), length + 1 - (cur + kvp)


@pytest.mark.parametrize("split", ["train", "test"])
def test_fuzzy_recall_matches_literal_algorithm_in_distribution(split: str) -> None:
    vocab, length, k, v, n = 12, 48, 2, 3, 1500
    rng = np.random.default_rng(0)
    naive = np.array([_naive_fuzzy(rng, vocab, length, k, v, split == "train") for _ in range(n)])
    x, y = generate("fuzzy_in_context_recall", "test" if split == "test" else "train", n, 3,
                    vocab_size=vocab, seq_len=length, k_motif_size=k, v_motif_size=v)
    pads = (torch.cat([x, y[:, -1:]], 1) == vocab - 1).sum(1).numpy()
    for ours, theirs in [(pads, naive[:, 1])] + ([((y != IGNORE_INDEX).sum(1).numpy(), naive[:, 0])]
                                                 if split == "test" else []):
        se = np.sqrt(ours.var() / n + theirs.var() / n)
        assert abs(ours.mean() - theirs.mean()) < 5 * se, (ours.mean(), theirs.mean())


# --------------------------------------------------------------------------------------------- copying, compression


@pytest.mark.parametrize("kw", [c[1] for c in CASES if c[0] == "selective_copying"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_selective_copying_layout(kw: dict[str, Any], split: str) -> None:
    s = full_setting("selective_copying", kw)
    v, length, c = s["vocab_size"], s["seq_len"], s["num_tokens_to_copy"]
    blank, copy = v - 2, v - 1
    x, y = gen("selective_copying", split, **kw)
    assert ((y != IGNORE_INDEX).sum(axis=1) == c).all()
    assert (y[:, : length - c] == IGNORE_INDEX).all()
    assert (x[:, length - c - 1] == copy).all() and (x[:, length - c :] == blank).all()
    assert (x[:, length - c - 2] < blank).all()  # last content token directly precedes the copy token
    head = x[:, : length - c - 1]
    assert (head != copy).all() and ((head != blank).sum(axis=1) == c).all()
    content = head[head != blank].reshape(len(x), c)
    assert (content == y[:, length - c :]).all()


def test_selective_copying_blank_distribution() -> None:
    """Each blank picks one of the c gaps before a content token uniformly."""
    x, _ = gen("selective_copying", "train", n=256)
    content_pos = np.nonzero(x[:, :239] != 14)[1].reshape(256, 16)
    gaps = np.diff(np.concatenate([np.full((256, 1), -1), content_pos], axis=1), axis=1) - 1
    assert (gaps.sum(axis=1) == 256 - 33).all()
    assert np.allclose(gaps.mean(axis=0), 223 / 16, rtol=0.15)


@pytest.mark.parametrize("kw", [c[1] for c in CASES if c[0] == "compression"])
def test_compression_targets_equal_inputs(kw: dict[str, Any]) -> None:
    v = full_setting("compression", kw)["vocab_size"]
    for split in ("train", "test"):
        x, y = gen("compression", split, **kw)
        assert (x == y).all() and (y != IGNORE_INDEX).all()
        assert (x[:, -1] == v - 1).all() and (x[:, :-1] < v - 1).all()


# --------------------------------------------------------------------------------------------- memorization


@pytest.mark.parametrize("kw", [c[1] for c in CASES if c[0] == "memorization"])
def test_memorization_table_fixed_across_splits(kw: dict[str, Any]) -> None:
    v = full_setting("memorization", kw)["vocab_size"]
    table = memorization_table(SEED, v).numpy()
    num_keys = (v - 1) // 2
    assert table.shape == (num_keys,)
    assert len(set(table.tolist())) == num_keys and table.min() >= num_keys and table.max() < v - 1
    for split in ("train", "test"):
        x, y = gen("memorization", split, **kw)
        assert ((y != IGNORE_INDEX).sum(axis=1) == 16).all()
        assert (x[:, 1::2] == v - 1).all() and (x[:, 0::2] < num_keys).all()
        assert (y[:, 0::2] == IGNORE_INDEX).all()
        assert (y[:, 1::2] == table[x[:, 0::2]]).all()
    assert torch.equal(memorization_table(SEED, v), memorization_table(SEED, v))
    assert not torch.equal(memorization_table(SEED + 1, v), memorization_table(SEED, v))


# --------------------------------------------------------------------------------------------- errors

BAD_CALLS: list[tuple[tuple, dict[str, Any], str]] = [
    (("nope", "train", 4, 0), {}, r"unknown task 'nope'.*in_context_recall.*memorization"),
    (("compression", "val", 4, 0), {}, r"unknown split 'val'.*train, test"),
    (("compression", "train", 0, 0), {}, r"num_examples must be an integer >= 1"),
    (("compression", "train", 2.0, 0), {}, r"num_examples must be an integer"),
    (("compression", "train", 4, -1), {}, r"seed must be an integer >= 0"),
    (("compression", "train", 4, "1"), {}, r"seed must be an integer"),
    (("in_context_recall", "train", 4, 0), {"frac_noise": 0.1},
     r"unknown setting keyword\(s\) frac_noise.*'in_context_recall'.*allowed keywords: vocab_size, seq_len"),
    (("compression", "train", 4, 0), {"num_tokens_to_copy": 3}, r"allowed keywords: vocab_size, seq_len"),
    (("compression", "train", 4, 0), {"vocab_size": 16.0}, r"vocab_size must be an integer"),
    (("compression", "train", 4, 0), {"vocab_size": True}, r"vocab_size must be an integer"),
    (("compression", "train", 4, 0), {"seq_len": -3}, r"seq_len must be an integer >= 0"),
    (("in_context_recall", "train", 4, 0), {"seq_len": 127}, r"seq_len must be even"),
    (("noisy_in_context_recall", "test", 4, 0), {"seq_len": 65}, r"seq_len must be even"),
    (("in_context_recall", "train", 4, 0), {"seq_len": 2}, r"seq_len must be >= 4"),
    (("in_context_recall", "train", 4, 0), {"vocab_size": 3}, r"at least 2 keys and 2 values"),
    (("noisy_in_context_recall", "train", 4, 0), {"vocab_size": 19}, r"at least 2 keys and 2 values"),
    (("noisy_in_context_recall", "train", 4, 0), {"frac_noise": 1.0}, r"frac_noise must be in \[0, 1\)"),
    (("noisy_in_context_recall", "train", 4, 0), {"frac_noise": -0.1}, r"frac_noise must be in \[0, 1\)"),
    (("noisy_in_context_recall", "train", 4, 0), {"frac_noise": "0.2"}, r"frac_noise must be a real number"),
    (("noisy_in_context_recall", "train", 4, 0), {"noise_vocab_size": 0}, r"noise_vocab_size must be >= 1"),
    (("fuzzy_in_context_recall", "train", 4, 0), {"vocab_size": 6}, r"vocab_size=6 too small.*k_motif_size=3"),
    (("fuzzy_in_context_recall", "train", 4, 0), {"vocab_size": 64, "v_motif_size": 40},
     r"v_motif_size=40 distinct value tokens"),
    (("fuzzy_in_context_recall", "train", 4, 0), {"seq_len": 12}, r"seq_len must be > 2 \* \(k_motif_size"),
    (("fuzzy_in_context_recall", "train", 4, 0), {"k_motif_size": 0}, r"k_motif_size and v_motif_size must be >= 1"),
    (("selective_copying", "train", 4, 0), {"seq_len": 33}, r"seq_len must be > 2 \* num_tokens_to_copy \+ 1 = 33"),
    (("selective_copying", "train", 4, 0), {"vocab_size": 2}, r"vocab_size must be >= 3"),
    (("selective_copying", "train", 4, 0), {"num_tokens_to_copy": 0}, r"num_tokens_to_copy must be >= 1"),
    (("compression", "train", 4, 0), {"vocab_size": 1}, r"vocab_size must be >= 2"),
    (("compression", "train", 4, 0), {"seq_len": 1}, r"seq_len must be >= 2"),
    (("memorization", "train", 4, 0), {"vocab_size": 2}, r"vocab_size must be >= 3"),
    (("memorization", "train", 4, 0), {"seq_len": 31}, r"seq_len must be even"),
]


@pytest.mark.parametrize("args,kw,match", BAD_CALLS, ids=[m[:40] for _, _, m in BAD_CALLS])
def test_bad_inputs_raise_value_error(args: tuple, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate(*args, **kw)


def test_task_settings_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown task 'x'; valid tasks: in_context_recall"):
        task_settings("x")


# --------------------------------------------------------------------------------------------- grid


def test_grid_has_66_settings_in_registry_order() -> None:
    settings = mad_settings()
    assert len(settings) == 66
    counts = Counter(task for task, _ in settings)
    assert counts == {
        "in_context_recall": 11,
        "noisy_in_context_recall": 14,
        "fuzzy_in_context_recall": 11,
        "memorization": 6,
        "compression": 11,
        "selective_copying": 13,
    }
    order = list(dict.fromkeys(task for task, _ in settings))
    assert order == ["in_context_recall", "noisy_in_context_recall", "fuzzy_in_context_recall",
                     "memorization", "compression", "selective_copying"]
    assert len({(t, tuple(sorted(s.items()))) for t, s in settings}) == 66
    for task, s in settings:
        assert s["num_test_examples"] == 1280
        assert s["num_train_examples"] == (256 if task == "memorization" else s["num_train_examples"])
        assert set(generator_kwargs(s)) == set(task_settings(task))
    baselines = [s for t, s in settings if generator_kwargs(s) == task_settings(t)
                 and s["num_train_examples"] in (12800, 256)]
    assert len(baselines) == 6
    assert sorted(s["vocab_size"] for t, s in settings if t == "memorization") == [256, 512, 1024, 2048, 4096, 8192]
    assert sorted(s["num_tokens_to_copy"] for t, s in settings if t == "selective_copying")[-3:] == [32, 64, 96]
    assert sorted({s["frac_noise"] for t, s in settings if t == "noisy_in_context_recall"}) == [0.2, 0.4, 0.6, 0.8]


def test_every_grid_setting_generates() -> None:
    for task, s in mad_settings():
        x, y = generate(task, "test", 2, SEED, **generator_kwargs(s))
        assert x.shape == y.shape == (2, s["seq_len"] - (task in ("in_context_recall", "noisy_in_context_recall")))
