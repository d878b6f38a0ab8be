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
    cuda_graph: bool = True  # capture each stack's training step as a CUDA graph (CUDA only)
    compile: bool = False  # the stack's forward under torch.compile (CUDA only; analysis/throughput/sweep_compile.md)
    start_until: float = 0.0  # seconds after the launch: no group starts later (0: no limit); for calls with a deadline


ConfigStore.instance().store(group="hydra/launcher", name="stacked", node=StackedLauncherConf, provider="mad")
