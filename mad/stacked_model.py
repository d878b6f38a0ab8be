"""N runs of one architecture as one model: every parameter stacked `[N, ...]`, one forward for all runs.

Each run's slice computes what its own module computes; only the kernels are shared, which is what makes many
small MAD models fast on one GPU: a step launches the kernels of one model, each doing N runs' work. Two ways:

  folded  the runs folded into the batch (N * B rows, run-major) of one module whose Linear, RMSNorm, Embedding
          and HeadVector layers apply each run's slice to its rows (mad/folded_layers.py); plain tensors, so
          torch.compile and the fused SDPA kernels see an ordinary model. Used whenever every parameter lives in
          such a layer, as in every stackable MAD architecture.
  vmap    torch.func.vmap over `functional_call` of one run's module: any architecture (e.g. a bare
          nn.Parameter), at the price of vmap's batching rules (kernels/sdpa.py, and the bias cast below).

    stacked = StackedModel([build(seed) for _ in range(N)])
    logits = stacked(tokens)          # tokens [N, B, T] -> logits [N, B, T, V]
    stacked.load_into(n, module)      # run n's weights into an ordinary module (records, diagnostics)
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from mad.folded_layers import fold


class StackedModel(nn.Module):
    """N modules of identical structure as stacked parameters `[N, ...]` (leaves of their own)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        if not modules:
            raise ValueError("StackedModel needs at least one module")
        shapes = [[(name, p.shape) for name, p in m.named_parameters()] for m in modules]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("StackedModel needs modules of identical structure (same parameter names and shapes)")
        params, _ = stack_module_state(modules)
        self.names = list(params)
        self.stacked = nn.ParameterList(nn.Parameter(params[name].detach()) for name in self.names)
        # Buffers are constants of the architecture (rotary frequencies, sin-cos positions): one copy for all runs.
        self.buffers_of_all = {name: b.detach().clone() for name, b in modules[0].named_buffers()}
        for m in modules[1:]:
            if any(not torch.equal(b, self.buffers_of_all[name]) for name, b in m.named_buffers()):
                raise ValueError("StackedModel needs modules whose buffers are equal (constants of the architecture)")
        template = copy.deepcopy(modules[0]).to("meta")
        folded = fold(template, len(modules))
        self.strategy = "vmap" if folded is None else "folded"
        # What the forward's functional_call runs (meta: shapes only), in a list: not a registered submodule, so no
        # parameters of its own. The vmap way runs one run's module and casts its linear biases (see there).
        self.runner = [template if folded is None else folded]
        self.linear_biases = {f"{name}.bias".lstrip(".") for name, m in template.named_modules()
                              if isinstance(m, nn.Linear) and m.bias is not None}  # fmt: skip

    @property
    def num_runs(self) -> int:
        return self.stacked[0].shape[0]

    def named_stacked(self) -> dict[str, nn.Parameter]:
        return dict(zip(self.names, self.stacked))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens [N, B, T]` -> the outputs of each run's module on its own slice, stacked `[N, ...]`."""
        if tokens.shape[0] != self.num_runs:
            raise ValueError(f"expected inputs for {self.num_runs} runs (first dim), got shape {tuple(tokens.shape)}")
        return self._folded_forward(tokens) if self.strategy == "folded" else self._vmapped_forward(tokens)

    def _folded_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.flatten(0, 1)  # [N * B, T], run-major
        out = functional_call(self.runner[0], (self.named_stacked(), self.buffers_of_all), (flat,), strict=True)
        return out.unflatten(0, tokens.shape[:2])

    def _vmapped_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        template, params = self.runner[0], self.named_stacked()
        device = tokens.device.type
        if torch.is_autocast_enabled(device):
            # Under vmap F.linear runs as matmul + add: autocast casts the matmul's operands but not the bias, so
            # the sum would come out in float32 (and a layer's q, k, v in float32 beside a bias-free r in bf16).
            # Casting the linear biases as autocast casts F.linear's makes each run compute what it does alone.
            dtype = torch.get_autocast_dtype(device)
            params = {name: p.to(dtype) if name in self.linear_biases else p for name, p in params.items()}

        def one_run(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
            return functional_call(template, (params, buffers), (x,), strict=True)

        return torch.vmap(one_run, in_dims=(0, None, 0), randomness="error")(params, self.buffers_of_all, tokens)

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.cuda()`, ... move the shared buffers too (a plain dict: their names hold dots), so that a
        forward never copies them (a copy from host memory is not allowed while a CUDA graph is captured)."""
        super()._apply(fn, recurse)
        self.buffers_of_all = {name: fn(b) for name, b in self.buffers_of_all.items()}
        return self

    def train(self, mode: bool = True) -> "StackedModel":
        super().train(mode)
        self.runner[0].train(mode)  # what the functional_call runs
        return self

    @torch.no_grad()
    def load_into(self, run: int, module: nn.Module) -> nn.Module:
        """Copy run `run`'s parameters into `module` (same structure); returns it."""
        own = dict(module.named_parameters())
        for name, stacked in self.named_stacked().items():
            own[name].copy_(stacked[run])
        return module

    @torch.no_grad()
    def load_run(self, run: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a module's parameters (its `state_dict`, same structure) into run `run`, in place (the stacked
        optimizers' buffers, whose views the parameters are, see the new values)."""
        for name, stacked in self.named_stacked().items():
            stacked[run].copy_(state_dict[name])

    @torch.no_grad()
    def select(self, keep: torch.Tensor) -> None:
        """Keep only runs `keep` (indices into the current runs), in that order. Gradients are dropped (the next
        step computes them afresh); a gradient of the old size would also break `torch.compile`'s next trace."""
        for p in self.stacked:
            p.data = p.data[keep.to(p.device)]
            p.grad = None
