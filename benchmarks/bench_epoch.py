"""Seconds per epoch of a real stack, training and test evaluation timed apart, and the full protocol's GPU time.

    PYTHONPATH=. python benchmarks/bench_epoch.py --out analysis/throughput/

bench_throughput.py times the training step alone; a sweep also evaluates every run on its test set after every
epoch (MAD's best-epoch selection and early stopping) and pays compiles and captures per stack. Here a stack of the
six runs of one setting's lr x weight-decay grid trains through `mad.stacked_train.train_stacked` exactly as the
`stacked` launcher trains it (CUDA graphs and `torch.compile` on, as in the protocol sweeps), at every sequence
length of the MAD grid, on random tokens (the time does not depend on them; early stopping is off): `--epochs`
epochs of `--steps` training steps and the 10 test batches of 128 sequences of every MAD setting, without the
mechanism diagnostics (off in the protocol sweeps). The first epoch
(compiles, captures) is reported apart; the others give the median seconds per training step and per test batch.

The protocol estimate adds, over the 66 settings, 200 epochs x (steps per epoch x seconds per step + test batches x
seconds per test batch) of one stack at the setting's length, one stack at a time on one GPU, no early stopping,
no compile or capture costs (the first-epoch column: paid again whenever a stack shrinks), all at the default
task's vocabulary of 16 (memorization's, up to 8192, makes its output layer larger).

`--eval-eager` and `--sdpa-default` switch off what this harness does on top of the plain loop (the captured test
forward, cuDNN's attention first: kernels/sdpa.py), to measure what each brings. Before timing, the captured test
forward is checked against the eager one, and cuDNN's and flash's attention against fp32 at a MAD shape.
`--cpu-smoke` runs one tiny length at batch 16 eagerly on the CPU to test the script (not a measurement).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.bench_throughput import SMOKE_OVERRIDES, compose_cfg  # noqa: E402
from kernels.softmax import KERNELS, softmax_attention  # noqa: E402

LENGTHS = (32, 128, 256, 512, 1024)  # every sequence length of the MAD grid but 64 (timed at 32 or 128)
RUNS = 6  # one setting's lr x weight-decay grid
TEST_BATCHES = 10  # 1280 test sequences of 128, every MAD setting


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "analysis" / "throughput")
    p.add_argument("--attention", default="softmax")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--steps", type=int, default=20, help="training steps per epoch (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per length, the first untimed (default: %(default)s)")
    p.add_argument("--eval-eager", action="store_true", help="evaluate eagerly (no captured test forward)")
    p.add_argument("--sdpa-default", action="store_true", help="PyTorch's SDPA order (flash first), not cuDNN first")
    p.add_argument("--softmax-kernel", choices=KERNELS, default="sdpa", help="launch.softmax_kernel (kernels/softmax.py)")
    p.add_argument("--cpu-smoke", action="store_true", help="one tiny length on the CPU, eagerly (not a measurement)")
    return p.parse_args(argv)


def time_length(attention: str, seq_len: int, args, device: torch.device) -> dict:
    """Train one stack for `args.epochs` epochs at `seq_len`; seconds of the first epoch, per step and per test batch."""
    from mad import stacked_train
    from mad.data import Split
    from mad.run import build_model, loop_config
    from mad.stacked_train import StackedRun, StepOptions, train_stacked

    cfg = compose_cfg(attention, seq_len, f"launch.softmax_kernel={args.softmax_kernel}",
                      *(SMOKE_OVERRIDES if args.cpu_smoke else ()))
    loop = loop_config(cfg, device)
    # Every epoch runs; no mechanism diagnostics, as in the protocol sweeps (conf/sweep/mad.yaml).
    loop.epochs, loop.early_stop_accuracy, loop.diagnostics_batch = args.epochs, 2.0, 0
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        tokens = torch.randint(0, cfg.task.vocab_size, (n, seq_len), generator=gen)
        return Split(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    train, test = split(args.steps * loop.batch_size), split(TEST_BATCHES * loop.batch_size)
    opt_cfg = {**cfg.optimizer, "betas": list(cfg.optimizer.betas)}
    torch.manual_seed(0)
    runs = [StackedRun(build_model(cfg), dict(opt_cfg, lr=1e-4 * (1 + i), weight_decay=0.1 * (i % 2)), train, test,
                       seed=i) for i in range(RUNS)]  # fmt: skip
    eval_seconds, epoch_seconds = [], []
    evaluate = stacked_train.evaluate_stacked

    def timed_evaluate(*a, **kw):
        start = time.perf_counter()
        scores = evaluate(*a, **kw)  # ends in a host copy of the scores: synchronised
        eval_seconds.append(time.perf_counter() - start)
        return scores

    on_cuda = device.type == "cuda"
    options = StepOptions(cuda_graph=on_cuda, compile=on_cuda, eval_graph=not args.eval_eager)
    schedule = OmegaConf.to_container(cfg.train.schedule, resolve=True)
    stacked_train.evaluate_stacked = timed_evaluate
    try:
        train_stacked(runs, schedule, loop, options=options,
                      on_epoch=lambda epoch, left, seconds: epoch_seconds.append(seconds))  # fmt: skip
    finally:
        stacked_train.evaluate_stacked = evaluate
    later = list(zip(epoch_seconds, eval_seconds))[1:]
    return {
        "attention": attention, "L": seq_len, "runs": RUNS, "steps_per_epoch": args.steps,
        "first_epoch_s": epoch_seconds[0],
        "ms_per_step": 1e3 * statistics.median((e - v) / args.steps for e, v in later),
        "ms_per_test_batch": 1e3 * statistics.median(v / TEST_BATCHES for _, v in later),
    }  # fmt: skip


def captured_eval_matches_eager(attention: str, seq_len: int, device: torch.device, kernel: str) -> float:
    """Max |captured - eager| test logits of a fresh 2-run stack, under bf16 autocast and the loops' SDPA order."""
    from kernels.sdpa import preferred_backends
    from mad.run import build_model, loop_config
    from mad.stacked_model import StackedModel
    from mad.stacked_train import EvalFunction

    cfg = compose_cfg(attention, seq_len, f"launch.softmax_kernel={kernel}")
    torch.manual_seed(0)
    stacked = StackedModel([build_model(cfg) for _ in range(2)]).to(device).eval()
    tokens = torch.randint(0, cfg.task.vocab_size, (2, cfg.train.batch_size, seq_len - 1), device=device)
    loop = loop_config(cfg, device)
    with preferred_backends():  # the kernels the training loops pick
        eager = EvalFunction(stacked, loop, cuda_graph=False)(tokens).float()
        captured = EvalFunction(stacked, loop, cuda_graph=True)(tokens).float()
    return (eager - captured).abs().max().item()


def attention_errors(device: torch.device) -> dict[str, float]:
    """Max-norm relative error of bf16 SDPA (output and q, k, v gradients) against fp32 math, per backend, at a MAD
    shape (batch 32, 16 heads of dim 8, L = 512, causal)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(32, 16, 512, 8, device=device, generator=gen) for _ in range(3))
    g = torch.randn(32, 16, 512, 8, device=device, generator=gen)

    def run(dtype, backend):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        if backend == "fla":  # fla-core's Triton kernel takes [B, T, H, D]
            out = softmax_attention(*(x.transpose(1, 2) for x in leaves), scale=8**-0.5, kernel="fla").transpose(1, 2)
            grads = torch.autograd.grad(out, leaves, g.to(dtype))
        else:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(*leaves, is_causal=True)
                grads = torch.autograd.grad(out, leaves, g.to(dtype))
        return [x.float() for x in (out, *grads)]

    want = run(torch.float32, SDPBackend.MATH)
    errors = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION), ("fla", "fla")):
        got = run(torch.bfloat16, backend)
        errors[name] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
    return errors


def stack_epoch_seconds(rows: list[dict], setting: dict) -> float:
    """Seconds of one epoch (training and test) of a stack of `setting`'s runs, at the measured length nearest to its
    own (log scale; a tie, L = 64 between 32 and 128, takes the longer, costlier length). `rows`: this script's rows
    (keys L, ms_per_step, ms_per_test_batch) of one attention."""
    by_len = {int(r["L"]): r for r in rows}
    row = by_len[min(by_len, key=lambda m: (abs(math.log(m / setting["seq_len"])), -m))]
    steps = math.ceil(setting["num_train_examples"] / 128)
    batches = math.ceil(setting["num_test_examples"] / 128)
    return (steps * float(row["ms_per_step"]) + batches * float(row["ms_per_test_batch"])) / 1e3


def protocol_minutes(rows: list[dict]) -> float:
    """GPU-minutes of the full protocol for one attention: 66 settings, one 6-run stack each, 200 epochs, no early
    stopping."""
    from mad.tasks.grid import mad_settings

    return sum(200 * stack_epoch_seconds(rows, setting) for _task, setting in mad_settings()) / 60


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.cpu_smoke:
        args.lengths, args.steps, args.epochs = "16", 2, 2
    if args.sdpa_default:
        import kernels.sdpa

        default = torch._C._get_sdp_priority_order()  # the same backends in PyTorch's own order
        preferred = kernels.sdpa.PREFERRED_BACKENDS
        kernels.sdpa.PREFERRED_BACKENDS = tuple(sorted(preferred, key=lambda b: default.index(int(b))))
    notes = []
    if device.type == "cuda":
        notes.append(f"captured vs eager test logits (2-run stack, L=128): max |difference| = "
                     f"{captured_eval_matches_eager(args.attention, 128, device, args.softmax_kernel):.2e}")  # fmt: skip
        errors = attention_errors(device)
        notes.append("bf16 SDPA vs fp32 math at B=32 H=16 L=512 D=8 (max-norm relative error of o, dq, dk, dv): "
                     + ", ".join(f"{name} {e:.2e}" for name, e in errors.items()))  # fmt: skip
    rows = []
    for seq_len in (int(x) for x in args.lengths.split(",")):
        rows.append(time_length(args.attention, seq_len, args, device))
        print(rows[-1], flush=True)
    write_tables(args, device, rows, notes, argv if argv is not None else sys.argv[1:])
    return 0


def write_tables(args, device: torch.device, rows: list[dict], notes: list[str], argv) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        variant = "graphs + compile, " + ("eval eager" if args.eval_eager else "eval captured")
    else:
        variant = "eager on the CPU"
    variant += ", SDPA default order" if args.sdpa_default else ", cuDNN first"
    stem = f"epoch_{args.attention}{'_eval_eager' if args.eval_eager else ''}{'_sdpa_default' if args.sdpa_default else ''}"
    if args.softmax_kernel != "sdpa":
        variant += f", launch.softmax_kernel={args.softmax_kernel}"
        stem += f"_{args.softmax_kernel}"
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (--cpu-smoke: not a measurement)"
    lines = [f"# Seconds per epoch of a {RUNS}-run stack: {args.attention}, {variant}", "",
             f"- device: {device_name}; torch {torch.__version__}, Python {platform.python_version()}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `PYTHONPATH=. python benchmarks/bench_epoch.py {' '.join(argv)}`",
             f"- {args.epochs} epochs of {args.steps} steps and {TEST_BATCHES} test batches per length; the first apart, "
             "medians of the others", "",
             "| L | first epoch s | ms per step | ms per test batch | test share of a 100-step epoch |",
             "| ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        share = TEST_BATCHES * r["ms_per_test_batch"] / (100 * r["ms_per_step"] + TEST_BATCHES * r["ms_per_test_batch"])
        lines.append(f"| {r['L']} | {r['first_epoch_s']:.1f} | {r['ms_per_step']:.2f} | {r['ms_per_test_batch']:.2f} | "
                     f"{100 * share:.0f} % |")  # fmt: skip
    lines += ["", f"Full protocol (66 settings x 6 runs x 200 epochs, no early stopping, one stack at a time): "
              f"**{protocol_minutes(rows):.0f} GPU-minutes** for {args.attention}.", "",
              "## Notes", "", *(f"- {n}" for n in notes), ""]  # fmt: skip
    (args.out / f"{stem}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
