"""The `stacked` launcher's config node (`hydra.launcher.*`); the launcher is in stacked_launcher.py.

No `from __future__ import annotations` here: Hydra's plugin scan imports this module in a way that breaks
dataclasses with string annotations.
"""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class StackedLauncherConf:
    _target_: str = "hydra_plugins.mad_stacked_launcher.stacked_launcher.StackedLauncher"
    devices: Any = "auto"  # auto: every CUDA device of the host, else the CPU; or a list such as [cuda:0, cuda:2]
    workers_per_device: int = 1  # concurrent groups (processes) per device
    max_group: int = 0  # most runs per stack; 0: the whole lr x weight-decay grid of a setting
    # Most runs x sequence length per stack (0: no limit): 1536 stacks one run at L=1024, three at 512, six at 256, so
    # that a long setting's stacks finish within a deadline (mad.stacked_run.stack_size).
    max_group_tokens: int = 0
    cuda_graph: bool = True  # capture each stack's training step as a CUDA graph (CUDA only)
    compile: bool = False  # the stack's forward under torch.compile (CUDA only; analysis/throughput/sweep_compile.md)
    # With compile: stacks with fewer training steps (epochs x steps per epoch) than this skip it. ~20 s of compiling
    # (analysis/throughput/epoch_softmax.md, first epoch) against 3.8 ms saved per step at L=128 (throughput.md,
    # graph vs graph+compile) pays back after ~5,000 steps (at L=1024, 12 ms saved: ~1,700; the protocol's settings
    # under 5,000 steps are all at L <= 256); the 400-step memorization stacks spent over 80 % of their epochs' time
    # in the epochs that compiled.
    compile_min_steps: int = 5000
    # For calls with a deadline, in seconds after deadline_origin (0: no limit). Past stop_at every stack checkpoints
    # its runs at the end of its epoch and stops, and none starts; past start_until none starts. The next launch
    # resumes the stopped stacks first (mad/stack_checkpoint.py).
    start_until: float = 0.0
    stop_at: float = 0.0
    # The Unix time they count from; 0: the sweep's process start (Linux /proc; elsewhere the launch). A script that
    # wraps the sweep in `timeout` passes its own clock (benchmarks/device_sweep.sh: `date +%s`).
    deadline_origin: float = 0.0
    # A stack saves a checkpoint per run this often (at the end of an epoch; 0: not periodically, though stop_at still
    # saves), and a stack stopped before its runs finished resumes from them at the next launch
    # (mad/stack_checkpoint.py). ~5 MB per MAD run with AdamW.
    checkpoint_every_s: float = 60.0


ConfigStore.instance().store(group="hydra/launcher", name="stacked", node=StackedLauncherConf, provider="mad")
