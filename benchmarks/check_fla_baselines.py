"""Check each fla-backed baseline's CUDA kernel path against its reference path, on the same GPU inputs.

Usage (from the repository root, on a CUDA machine with fla-core installed):

    PYTHONPATH=. python benchmarks/check_fla_baselines.py --out $OUT/baselines.md

For every layer (built from its conf/attention/<preset>.yaml, plus a few variants) and for float32 and bf16, the
same weights and inputs go through `backend="reference"` (fla's PyTorch reference, or our SSD for Mamba-2) and
`backend="kernel"` (fla's chunked Triton kernel). The table reports, for the output, the input gradient and the worst
parameter gradient: the max abs difference kernel - reference, the relative error (that max over max |reference|),
and, as the yardstick of flash-attention's tests, the errors of the kernel and of the reference in that dtype
against the float32 reference. TF32 is off for PyTorch matmuls (fla's Triton kernels choose their own precision).

`--cpu-dry-run` runs only the reference half, on CPU, and writes the same table with the kernel columns empty:
the test suite uses it to keep this script working on machines without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import importlib.metadata
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402  (pyyaml: the GPU machine has it, but neither hydra nor omegaconf)

DEFAULT_OUT = ROOT / "analysis" / "baselines" / "cuda_vs_reference.md"
DIM = 128
VARIANTS = (  # (preset yaml, overrides of its knobs)
    ("gated_deltanet", {}),
    ("kda", {}),
    ("gla", {}),
    ("mesanet", {}),
    ("mamba2", {}),
    ("linear_attention", {}),
    ("linear_attention", {"feature_map": "elu"}),
    ("linear_attention", {"normalize": False, "output_norm": True}),
)


def restrict_autotuning() -> int:
    """Make every Triton autotuner in the imported fla modules use its first config only; returns how many.

    This script checks values, not speed: one config per kernel is as valid as any other, and autotuning fla's
    kernels (each over many configs, compiled one after another) took minutes per layer on the H200.
    """
    import triton

    seen, restricted = set(), 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("fla.") or module is None:
            continue
        for obj in list(vars(module).values()):
            while obj is not None and id(obj) not in seen:  # unwrap heuristics / autotune / jit layers
                seen.add(id(obj))
                if isinstance(obj, triton.runtime.Autotuner):
                    obj.configs = obj.configs[:1]  # a single config skips the tuning benchmark
                    restricted += 1
                obj = getattr(obj, "fn", None) if isinstance(obj, triton.runtime.KernelInterface) else None
    return restricted


def build_layer(preset: str, overrides: dict, dim: int = DIM) -> torch.nn.Module:
    """The preset's layer at width `dim`, read from its yaml without Hydra (`_target_` plus the knobs)."""
    cfg = yaml.safe_load((ROOT / "conf" / "attention" / f"{preset}.yaml").read_text())
    module_name, _, class_name = cfg.pop("_target_").rpartition(".")
    cfg.pop("_partial_", None)
    return getattr(importlib.import_module(module_name), class_name)(dim, **{**cfg, **overrides})


def run_path(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, backend: str) -> dict[str, torch.Tensor]:
    """Forward and backward through one path: {'out', 'dx', 'param:<name>' ...}, all detached.

    A backward that raises leaves {'out', 'backward_error'}: the forward is still compared.
    """
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    result = {"out": y.detach()}
    try:
        y.backward(dy)
    except Exception as e:  # noqa: BLE001 - reported in the table (e.g. fla refusing a Triton version)
        result["backward_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:240]}"
        return result
    result["dx"] = x.grad.detach()
    result.update({f"param:{n}": p.grad.detach() for n, p in layer.named_parameters() if p.grad is not None})
    return result


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want|, that over max |want|), in float32."""
    diff = (got.float() - want.float()).abs().max().item()
    return diff, diff / max(want.float().abs().max().item(), 1e-30)


def worst_param(got: dict, want: dict) -> tuple[str, float, float]:
    """The parameter gradient with the largest relative error: (name, max abs, relative)."""
    rows = [(name.removeprefix("param:"), *errors(got[name], want[name])) for name in want if name.startswith("param:")]
    return max(rows, key=lambda r: r[2])


def check_variant(preset: str, overrides: dict, args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    """Table rows for one layer: float32 then bf16; output, input gradient, worst parameter gradient."""
    torch.manual_seed(args.seed)
    layer32 = build_layer(preset, overrides).to(device)
    name = type(layer32).__name__ + "".join(f" {k}={v}" for k, v in overrides.items())
    x32 = torch.randn(args.batch, args.seq_len, DIM, device=device)
    dy32 = torch.randn(args.batch, args.seq_len, DIM, device=device)
    truth = run_path(layer32, x32, dy32, "reference")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        layer = copy.deepcopy(layer32).to(dtype)
        x, dy = x32.to(dtype), dy32.to(dtype)
        ref = truth if dtype == torch.float32 else run_path(layer, x, dy, "reference")
        kernel = None
        if not args.cpu_dry_run:
            try:
                kernel = run_path(layer, x, dy, "kernel")
            except Exception as e:  # noqa: BLE001 - one failing kernel is reported in its row, the rest still run
                rows.append([name, str(dtype).removeprefix("torch."), "all", f"kernel failed: {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:200]}", "", "", ""])
                continue
        if kernel is not None and "backward_error" in kernel:
            abs_err, rel_err = errors(kernel["out"], ref["out"])
            rows.append([name, str(dtype).removeprefix("torch."), "out", f"{abs_err:.2e}", f"{rel_err:.2e}",
                         f"{errors(kernel['out'], truth['out'])[1]:.2e}", f"{errors(ref['out'], truth['out'])[1]:.2e}"])
            rows.append([name, str(dtype).removeprefix("torch."), "backward",
                         f"kernel backward failed: {kernel['backward_error']}", "", "", ""])
            continue
        worst = worst_param(kernel, ref)[0] if kernel is not None else worst_param(ref, truth)[0]
        for key, label in (("out", "out"), ("dx", "dx"), (f"param:{worst}", f"grad {worst} (worst)")):
            ref_vs_truth = errors(ref[key], truth[key])[1]
            if kernel is None:
                cells = ["–", "–", "–"]
            else:
                abs_err, rel_err = errors(kernel[key], ref[key])
                cells = [f"{abs_err:.2e}", f"{rel_err:.2e}", f"{errors(kernel[key], truth[key])[1]:.2e}"]
            rows.append([name, str(dtype).removeprefix("torch."), label, *cells, f"{ref_vs_truth:.2e}"])
    return rows


def versions() -> str:
    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for package in ("triton", "fla-core"):
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{package} not installed")
    return ", ".join(parts)


def render(rows: list[list[str]], args: argparse.Namespace, device: torch.device, argv: list[str]) -> str:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()})"
    header = ["layer", "dtype", "tensor", "max abs (kernel - ref)", "rel (kernel vs ref)", "kernel vs fp32 ref (rel)",
              "ref vs fp32 ref (rel)"]  # fmt: skip
    lines = [
        "# fla baselines: CUDA kernel path vs reference path",
        "",
        f"* Device: {device_name}" + (" — **dry run: reference path only**" if args.cpu_dry_run else ""),
        f"* Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"* Versions: {versions()}",
        f"* Command: `PYTHONPATH=. python {shlex.join(['benchmarks/check_fla_baselines.py', *argv])}`",
        f"* Inputs: batch {args.batch}, length {args.seq_len}, width {DIM}, seed {args.seed}; x and the output "
        "gradient ~ N(0, 1); each layer's preset from conf/attention/ (variants override the knobs shown).",
        *([f"* fla's {args.restricted} Triton autotuners were restricted to their first config (this checks values, "
           "not speed)."] if getattr(args, "restricted", 0) else []),
        "* rel = max |a - b| / max |b|. The last column is the reference's own error in that dtype (the yardstick of "
        "flash-attention's tolerance rule); in float32 it is 0 by construction.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to write")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=255, help="odd on purpose: not a multiple of the chunk size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-dry-run", action="store_true", help="reference path only, on CPU")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.cpu_dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        importlib.import_module("fla.ops")  # every kernel module, so that all of fla's autotuners can be restricted
        args.restricted = restrict_autotuning()
        print(f"fla autotuners restricted to their first config: {args.restricted}", flush=True)
    else:
        raise SystemExit("no CUDA device: the kernel path needs one; use --cpu-dry-run to run the reference half")
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for preset, overrides in VARIANTS:
        started = time.perf_counter()
        rows += check_variant(preset, overrides, args, device)
        print(*rows[-1], sep=" | ", flush=True)
        print(f"{preset} {overrides or ''}: {time.perf_counter() - started:.1f} s (kernel compile included)", flush=True)
        # Rewritten after every layer, so a run stopped by a time limit still leaves the rows it finished.
        args.out.write_text(render(rows, args, device, argv))
    text = render(rows, args, device, argv)
    print(text)
    return args.out


if __name__ == "__main__":
    main()
