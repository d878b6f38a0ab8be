"""Count the operators one optimizer step dispatches: N runs stacked (mad/stacked_optim.py) vs N torch.optim runs.

    PYTHONPATH=. python benchmarks/count_step_ops.py [--runs 6] [--attention parallax]

A MAD training step on a GPU is bound by kernel launches, so the number of operators a step dispatches is what the
stacked optimizers are built to keep small. Counts top-level `aten::` operators (views included, so an upper bound
on kernels) of one step after a warm-up step, with torch.profiler on the CPU; no timing. torch.optim's AdamW is put
on its multi-tensor (`foreach`) path, its default on CUDA.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def count_ops(step) -> int:
    step()  # warm-up: optimizer state is created lazily
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not _inside_aten(e))


def _inside_aten(event) -> bool:
    """Whether an enclosing event is an aten operator (then this one is part of it, not dispatched by the step)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--attention", default="parallax")
    args = p.parse_args(argv)

    from hydra import compose, initialize_config_dir

    from mad.optim import build_optimizers
    from mad.run import build_model
    from mad.stacked_model import StackedModel
    from mad.stacked_train import build_optimizers as build_stacked

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"attention={args.attention}"])
    print(f"| optimizer | {args.runs} torch.optim runs | {args.runs} runs stacked |\n| --- | ---: | ---: |")
    for name in ("adamw", "muon"):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            opt_cfg = dict(compose("config", overrides=[f"optimizer={name}"]).optimizer)
        opt_cfg["betas"] = list(opt_cfg["betas"])
        models = [build_model(cfg) for _ in range(args.runs)]
        alone = [(m, build_optimizers(m, opt_cfg)) for m in models]
        for _, opts in alone:  # AdamW's multi-tensor path, the default on CUDA (torch's Muon has none)
            for group in (g for opt in opts if isinstance(opt, torch.optim.AdamW) for g in opt.param_groups):
                group["foreach"] = True
        for m, _ in alone:
            for q in m.parameters():
                q.grad = torch.randn_like(q)

        def step_alone():
            for _, optimizers in alone:
                for opt in optimizers:
                    opt.step()

        stacked = StackedModel(models)
        optimizers = build_stacked(stacked, models[0], [opt_cfg] * len(models))
        for q in stacked.stacked:
            q.grad = torch.randn_like(q)

        def step_stacked():
            for opt in optimizers:
                opt.step()

        print(f"| {name} | {count_ops(step_alone)} | {count_ops(step_stacked)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
