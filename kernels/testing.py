"""Helpers for checking kernels against their references (tests and the GPU check scripts)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def nan_filled_empty() -> Iterator[None]:
    """Inside, `torch.empty` / `torch.empty_like` return NaN-filled floating tensors, so any output element a
    kernel fails to write shows up as NaN. Restores both on exit."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(x: torch.Tensor) -> torch.Tensor:
        return x.fill_(float("nan")) if x.is_floating_point() else x

    torch.empty = lambda *a, **kw: fill(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: fill(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
