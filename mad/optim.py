"""Optimizers: AdamW on everything, or Muon on the hidden matrices with AdamW on the rest.

The learning-rate schedules are in mad/schedules.py.
"""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon")


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, everything else).

    Hidden matrices are the 2-D weights of the mixers and MLPs. Embeddings and the output head (the module named
    `head`) are 2-D too but are not hidden: like norms, biases and non-2-D parameters they go to AdamW.
    """
    head = getattr(model, "head", None)
    excluded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) or m is head for p in m.parameters()}
    hidden, rest = [], []
    for p in model.parameters():
        (hidden if p.ndim == 2 and id(p) not in excluded else rest).append(p)
    assert len(hidden) + len(rest) == len(list(model.parameters()))
    return hidden, rest


def build_optimizers(model: nn.Module, cfg: dict) -> list[torch.optim.Optimizer]:
    """`cfg`: the `optimizer` config (name, lr, weight_decay, betas, eps; Muon adds momentum, nesterov, ns_steps,
    adjust_lr_fn). Weight decay applies to every parameter, as in MAD."""
    adamw = dict(lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=tuple(cfg["betas"]), eps=cfg["eps"])
    if cfg["name"] == "adamw":
        return [torch.optim.AdamW(model.parameters(), **adamw)]
    if cfg["name"] == "muon":
        hidden, rest = split_parameters(model)
        muon = torch.optim.Muon(
            hidden,
            lr=cfg["lr"],
            weight_decay=cfg["weight_decay"],
            momentum=cfg["momentum"],
            nesterov=cfg["nesterov"],
            ns_steps=cfg["ns_steps"],
            adjust_lr_fn=cfg["adjust_lr_fn"],
        )
        return [muon, torch.optim.AdamW(rest, **adamw)]
    raise ValueError(f"unknown optimizer {cfg['name']!r}; allowed: {', '.join(OPTIMIZERS)}")

