"""AdamW and Muon over stacked parameters: N runs' copies of one parameter as one tensor `[N, ...]`.

Each run n keeps its own learning rate and weight decay (`lr[n]`, `weight_decay[n]`, set per epoch by the caller) and
its own moments; slice n of every state tensor evolves exactly as the state of `torch.optim.AdamW` / `torch.optim.Muon`
stepping run n alone (same formulas in the same order; tests/test_stacked_training.py checks it against torch.optim).
torch.optim cannot do this itself: a param group shares one lr, and Muon takes 2-D parameters only.

Everything a step reads lives on the device (step count, lr, weight decay), so a step never syncs with the host and
can be captured in a CUDA graph; `select(keep)` drops finished runs from every state tensor.
"""

from __future__ import annotations

import torch

_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults (Keller Jordan's quintic iteration)
_NS_EPS = 1e-7


def _per_run(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`[N]` -> `[N, 1, ..., 1]` broadcasting against `like` `[N, ...]`."""
    return values.view(-1, *([1] * (like.ndim - 1)))


class StackedOptimizer:
    """Shared plumbing: per-run lr and weight decay `[N]` (float32, on the parameters' device) and a step count."""

    def __init__(self, params: list[torch.Tensor], lr: torch.Tensor, weight_decay: torch.Tensor) -> None:
        self.params = list(params)
        device = self.params[0].device
        self.lr = lr.to(device=device, dtype=torch.float32).clone()
        self.weight_decay = weight_decay.to(device=device, dtype=torch.float32).clone()
        self.step_count = torch.zeros((), device=device, dtype=torch.float32)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> list[torch.Tensor]:
        """Every per-run state tensor (first dim N), for `select`."""
        raise NotImplementedError

    def select(self, keep: torch.Tensor) -> None:
        """Keep runs `keep` (indices into the current N), after the parameters themselves were sliced in place."""
        self.lr, self.weight_decay = self.lr[keep], self.weight_decay[keep]
        for state in self.state_tensors():
            state.data = state.data[keep]


class StackedAdamW(StackedOptimizer):
    """`torch.optim.AdamW` (decoupled weight decay, no amsgrad) on each run's slice."""

    def __init__(self, params, lr, weight_decay, *, betas: tuple[float, float], eps: float) -> None:
        super().__init__(params, lr, weight_decay)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def state_tensors(self) -> list[torch.Tensor]:
        return self.exp_avg + self.exp_avg_sq

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        bias_correction1 = 1 - torch.pow(self.beta1, self.step_count)
        bias_correction2_sqrt = (1 - torch.pow(self.beta2, self.step_count)).sqrt()
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            lr = _per_run(self.lr, p)
            p.mul_(1 - lr * _per_run(self.weight_decay, p))
            m.lerp_(p.grad, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.add_(-(lr / bias_correction1) * m / denom)  # torch's addcdiv_(m, denom, value=-step_size), same order


def newton_schulz(update: torch.Tensor, steps: int) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation, per matrix of a stack `[N, A, B]`, in bf16."""
    a, b, c = _NS_COEFFICIENTS
    x = update.bfloat16()
    tall = update.shape[-2] > update.shape[-1]
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=_NS_EPS)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
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
    """`torch.optim.Muon` on each run's slice of stacked matrices `[N, A, B]`."""

    def __init__(self, params, lr, weight_decay, *, momentum: float, nesterov: bool, ns_steps: int,
                 adjust_lr_fn: str | None) -> None:  # fmt: skip
        super().__init__(params, lr, weight_decay)
        for p in self.params:
            if p.ndim != 3:
                raise ValueError(f"StackedMuon takes stacks of matrices [N, A, B], got a parameter of shape {tuple(p.shape)}")
        self.momentum, self.nesterov, self.ns_steps, self.adjust_lr_fn = momentum, nesterov, ns_steps, adjust_lr_fn
        self.momentum_buffer = [torch.zeros_like(p) for p in self.params]

    def state_tensors(self) -> list[torch.Tensor]:
        return self.momentum_buffer

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        for p, buf in zip(self.params, self.momentum_buffer):
            buf.lerp_(p.grad, 1 - self.momentum)
            update = p.grad.lerp(buf, self.momentum) if self.nesterov else buf
            update = newton_schulz(update, self.ns_steps)
            lr = _per_run(self.lr, p)
            p.mul_(1 - lr * _per_run(self.weight_decay, p))
            p.add_(update * (-lr * muon_lr_ratio(p.shape, self.adjust_lr_fn)))
