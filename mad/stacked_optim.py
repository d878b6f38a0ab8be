"""AdamW and Muon over stacked parameters: N runs' copies of one parameter as one tensor `[N, ...]`.

Each run n keeps its own learning rate and weight decay (`lr[n]`, `weight_decay[n]`, set per epoch by the caller) and
its own moments; slice n of every state tensor evolves exactly as the state of `torch.optim.AdamW` / `torch.optim.Muon`
stepping run n alone (same formulas in the same order; tests/test_stacked_training.py checks it against torch.optim).
torch.optim cannot do this itself: a param group shares one lr, and Muon takes 2-D parameters only.

A step launches few kernels whatever the number of parameters, since a MAD step is bound by launches, not arithmetic:
AdamW keeps all its parameters as views into one flat buffer `[N, P]` and updates it in one pass (the gradients
gathered by one `cat`); Muon keeps the matrices of each shape as views into one `[N, G, A, B]` buffer and
orthogonalises them in one batched Newton-Schulz. Everything a step reads lives on the device (step count, lr,
weight decay), so a step never syncs with the host and can be captured in a CUDA graph. `select(keep)` drops
finished runs.
"""

from __future__ import annotations

import torch

_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults (Keller Jordan's quintic iteration)
_NS_EPS = 1e-7


def _per_run(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """`[N]` -> `[N, 1, ..., 1]` with `ndim` dims in all, broadcasting against an `[N, ...]` tensor."""
    return values.view(-1, *([1] * (ndim - 1)))


class StackedOptimizer:
    """Shared plumbing: per-run lr and weight decay `[N]` (float32, on the parameters' device), a step count, and
    the flat buffers the parameters are views of (`_buffers`: each `[N, ...]`, `_groups`: their parameters)."""

    def __init__(self, params: list[torch.Tensor], lr: torch.Tensor, weight_decay: torch.Tensor) -> None:
        self.params = list(params)
        device = self.params[0].device
        self.lr = lr.to(device=device, dtype=torch.float32).clone()
        self.weight_decay = weight_decay.to(device=device, dtype=torch.float32).clone()
        self.step_count = torch.zeros((), device=device, dtype=torch.float32)
        self._groups = self._group(self.params)
        self._buffers = [self._pack(group) for group in self._groups]

    def _group(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        return [params]

    def _pack(self, group: list[torch.Tensor]) -> torch.Tensor:
        """Copy `group` into a new buffer and make each parameter a view of it (the optimizer updates the buffer)."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> list[torch.Tensor]:
        """Every per-run state tensor (first dim N)."""
        raise NotImplementedError

    def select(self, keep: torch.Tensor) -> None:
        """Keep runs `keep` (indices into the current N), in that order. Call it after `StackedModel.select` has
        sliced the parameters themselves: they are re-packed from their current values."""
        self.lr, self.weight_decay = self.lr[keep], self.weight_decay[keep]
        for state in self.state_tensors():
            state.data = state.data[keep]
        self._buffers = [self._pack(group) for group in self._groups]


class StackedAdamW(StackedOptimizer):
    """`torch.optim.AdamW` (decoupled weight decay, no amsgrad) on each run's slice; parameters of any shape."""

    def __init__(self, params, lr, weight_decay, *, betas: tuple[float, float], eps: float) -> None:
        super().__init__(params, lr, weight_decay)
        self.beta1, self.beta2 = betas
        self.eps = eps
        flat = self._buffers[0]
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(flat), torch.zeros_like(flat)

    def _pack(self, group: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([p.detach().flatten(1) for p in group], dim=1)  # [N, P]
        offset = 0
        for p in group:
            size = p[0].numel()
            p.data = flat[:, offset : offset + size].view(p.shape)
            offset += size
        return flat

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.exp_avg, self.exp_avg_sq]

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        bias_correction1 = 1 - torch.pow(self.beta1, self.step_count)
        bias_correction2_sqrt = (1 - torch.pow(self.beta2, self.step_count)).sqrt()
        flat, m, v = self._buffers[0], self.exp_avg, self.exp_avg_sq
        grad = torch.cat([p.grad.flatten(1) for p in self.params], dim=1)
        lr = _per_run(self.lr, 2)
        flat.mul_(1 - lr * _per_run(self.weight_decay, 2))
        m.lerp_(grad, 1 - self.beta1)
        v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
        flat.add_(-(lr / bias_correction1) * m / denom)  # torch's addcdiv_(m, denom, value=-step_size), same order


def newton_schulz(update: torch.Tensor, steps: int) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation, per matrix of a stack `[..., A, B]`, in bf16."""
    a, b, c = _NS_COEFFICIENTS
    x = update.bfloat16()
    tall = update.shape[-2] > update.shape[-1]
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=_NS_EPS)
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(shape)
    return x.mT if tall else x


def muon_lr_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """torch.optim.Muon's lr adjustment for an `[A, B]` matrix."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return max(1.0, rows / cols) ** 0.5
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * max(rows, cols) ** 0.5
    return 1.0


class StackedMuon(StackedOptimizer):
    """`torch.optim.Muon` on each run's slice of stacked matrices `[N, A, B]`; matrices of one shape are stepped
    together, as views into one `[N, G, A, B]` buffer."""

    def __init__(self, params, lr, weight_decay, *, momentum: float, nesterov: bool, ns_steps: int,
                 adjust_lr_fn: str | None) -> None:  # fmt: skip
        for p in params:
            if p.ndim != 3:
                raise ValueError(f"StackedMuon takes stacks of matrices [N, A, B], got a parameter of shape {tuple(p.shape)}")
        super().__init__(params, lr, weight_decay)
        self.momentum, self.nesterov, self.ns_steps, self.adjust_lr_fn = momentum, nesterov, ns_steps, adjust_lr_fn
        self.momentum_buffer = [torch.zeros_like(buffer) for buffer in self._buffers]

    def _group(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape[1:]), []).append(p)
        return list(by_shape.values())

    def _pack(self, group: list[torch.Tensor]) -> torch.Tensor:
        buffer = torch.stack([p.detach() for p in group], dim=1)  # [N, G, A, B]
        for index, p in enumerate(group):
            p.data = buffer[:, index]
        return buffer

    def state_tensors(self) -> list[torch.Tensor]:
        return self.momentum_buffer

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        for group, buffer, momentum_buffer in zip(self._groups, self._buffers, self.momentum_buffer):
            grad = torch.stack([p.grad for p in group], dim=1)
            momentum_buffer.lerp_(grad, 1 - self.momentum)
            update = grad.lerp(momentum_buffer, self.momentum) if self.nesterov else momentum_buffer
            update = newton_schulz(update, self.ns_steps)
            lr = _per_run(self.lr, 4)
            buffer.mul_(1 - lr * _per_run(self.weight_decay, 4))
            buffer.add_(update * (-lr * muon_lr_ratio(buffer.shape, self.adjust_lr_fn)))
