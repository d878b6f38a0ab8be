"""The parameterised layers of a stack whose N runs are folded into the batch (mad/stacked_model.py).

A stack of N runs can execute as one ordinary module on a batch of N * B rows, run-major (rows n*B .. n*B+B-1 are
run n's), if every layer that holds parameters applies each run's own slice to that run's rows. These are those
layers for nn.Linear, nn.RMSNorm, nn.Embedding and our per-head HeadVector (gate logits, log-temperatures); every
other layer of the MAD models (rotary, attention kernels, activations, the residual stream) acts per row and needs
nothing. Their parameters have the stacked shapes `[N, ...]` and the names of the layer they replace, so
`functional_call` feeds them the stack's tensors.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.head_vector import HeadVector


def _per_run(x: torch.Tensor, runs: int) -> torch.Tensor:
    """`[N * B, ..., C]` -> `[N, B * ..., C]` (a view for contiguous x)."""
    return x.reshape(runs, -1, x.shape[-1])


def _stacked(param: torch.Tensor, runs: int) -> nn.Parameter:
    """A placeholder `[runs, *param.shape]` on the meta device: `functional_call` supplies the stack's tensor."""
    return nn.Parameter(torch.empty(runs, *param.shape, device="meta"))


class FoldedLinear(nn.Module):
    """N Linear layers: `x [N * B, ..., in] -> [N * B, ..., out]`, run n's rows through weight[n], bias[n]."""

    def __init__(self, layer: nn.Linear, runs: int) -> None:
        super().__init__()
        self.weight = _stacked(layer.weight, runs)  # [N, out, in]
        self.bias = None if layer.bias is None else _stacked(layer.bias, runs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs = self.weight.shape[0]
        rows = _per_run(x, runs)  # [N, M, in]
        weight_t = self.weight.transpose(1, 2)  # [N, in, out]
        out = torch.bmm(rows, weight_t) if self.bias is None else torch.baddbmm(self.bias[:, None, :], rows, weight_t)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class FoldedRMSNorm(nn.Module):
    """N RMSNorm layers over the last dim (elementwise affine): run n's rows scaled by weight[n]."""

    def __init__(self, layer: nn.RMSNorm, runs: int) -> None:
        super().__init__()
        self.normalized_shape, self.eps = tuple(layer.normalized_shape), layer.eps
        if len(self.normalized_shape) != 1 or layer.weight is None:
            raise ValueError("FoldedRMSNorm folds RMSNorm over the last dim with a weight only")
        self.weight = _stacked(layer.weight, runs)  # [N, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x, self.normalized_shape, None, self.eps)
        return (_per_run(normed, self.weight.shape[0]) * self.weight[:, None, :]).reshape(normed.shape)


class FoldedEmbedding(nn.Module):
    """N embedding tables: `tokens [N * B, ...] -> [N * B, ..., C]`, run n's rows looked up in table n."""

    def __init__(self, layer: nn.Embedding, runs: int) -> None:
        super().__init__()
        self.weight = _stacked(layer.weight, runs)  # [N, V, C]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        runs, vocab, width = self.weight.shape
        first_row_token = torch.arange(runs, device=tokens.device) * vocab  # run n's table starts at row n * V
        offsets = first_row_token.repeat_interleave(tokens.shape[0] // runs).view(-1, *[1] * (tokens.dim() - 1))
        return F.embedding(tokens + offsets, self.weight.reshape(runs * vocab, width))


class FoldedHeadVector(nn.Module):
    """N HeadVectors: `x [N * B, ...] -> [N * B, 1, H, 1]`, run n's rows given weight[n] (broadcasts against
    `[N * B, T, H, D]` as one HeadVector's `[H, 1]` does against `[B, T, H, D]`)."""

    def __init__(self, layer: HeadVector, runs: int) -> None:
        super().__init__()
        self.weight = _stacked(layer.weight, runs)  # [N, H]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs = self.weight.shape[0]
        return self.weight.repeat_interleave(x.shape[0] // runs, dim=0)[:, None, :, None]


FOLDED_LAYERS = {nn.Linear: FoldedLinear, nn.RMSNorm: FoldedRMSNorm, nn.Embedding: FoldedEmbedding,
                 HeadVector: FoldedHeadVector}  # fmt: skip


def fold(template: nn.Module, runs: int) -> nn.Module | None:
    """A meta-device module computing `runs` copies of `template` on a run-major batch of N * B rows, or None if
    some parameter lives outside the layers above (e.g. a bare nn.Parameter): such stacks run through torch.vmap
    instead. Only shapes are read from `template`; the parameters come from the stack at each call."""
    folded = copy.deepcopy(template).to("meta")
    for name, layer in list(folded.named_modules()):
        kind = FOLDED_LAYERS.get(type(layer))
        if kind is not None:
            parent, _, child = name.rpartition(".")
            setattr(folded.get_submodule(parent), child, kind(layer, runs))
    owners = {name for name, m in folded.named_modules() if isinstance(m, tuple(FOLDED_LAYERS.values()))}
    if any(name.rpartition(".")[0] not in owners for name, _ in folded.named_parameters()):
        return None
    return folded
