"""Train/test tensors for one task setting, cached on disk, and the shuffled training batches."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from mad.tasks import generate

# Bump when a generator changes what it draws, so stale cached datasets are never reused.
GENERATOR_VERSION = 1


@dataclass
class Split:
    inputs: torch.Tensor  # [N, T] int64
    targets: torch.Tensor  # [N, T] int64, -100 where unscored


def load_split(
    task: str, split: str, num_examples: int, seed: int, setting: dict, cache_dir: Path | None
) -> Split:
    """Generate (or read back from `cache_dir`) one split. The cache key covers every argument."""
    if cache_dir is None:
        return Split(*generate(task, split, num_examples, seed, **setting))
    key = json.dumps(
        {"task": task, "split": split, "n": num_examples, "seed": seed, "setting": setting, "v": GENERATOR_VERSION},
        sort_keys=True,
    )
    path = Path(cache_dir) / task / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == key:
            return Split(cached["inputs"], cached["targets"])
    inputs, targets = generate(task, split, num_examples, seed, **setting)
    _save_atomically(path, {"key": key, "inputs": inputs, "targets": targets})
    return Split(inputs, targets)


def _save_atomically(path: Path, payload: dict) -> None:
    """Concurrent writers of the same dataset each write a private file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_batches(split: Split, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled batches `([b, T], [b, T])`; the last partial batch is kept, as MAD's loader does."""
    order = torch.randperm(split.inputs.shape[0], generator=generator)
    for start in range(0, order.numel(), batch_size):
        idx = order[start : start + batch_size]
        yield split.inputs[idx], split.targets[idx]


def test_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test set in order, in batches of `batch_size` (MAD scores per batch of 128)."""
    for start in range(0, split.inputs.shape[0], batch_size):
        yield split.inputs[start : start + batch_size], split.targets[start : start + batch_size]
