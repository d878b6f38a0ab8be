"""Training throughput of the harness on one GPU: run-steps per second, against one eager training process.

    PYTHONPATH=. python benchmarks/bench_throughput.py --out analysis/throughput/

For softmax and parallax at L = 128 and 1024 (the MAD model of conf/model/mad.yaml, batch 128, the in-context-recall
vocabulary), it times one training step (forward, backward, optimizer; AdamW) of:

  eager        one run, the loop of mad/train.py (torch.optim.AdamW), as one `mad.run` process trains
  compiled     the same with the model under `torch.compile` (reported when it compiles)
  stacked      N runs as one stack (mad/stacked_train.py; folded into the batch where the model allows), eager
  graph        N runs as one stack, the step captured as a CUDA graph (the `stacked` launcher's default)
  graph+compile  the same with the stacked forward under `torch.compile` (reported when it compiles)
  graph xK     K processes each replaying an N-run graph at once (workers_per_device = K)

run-steps/s counts every run's step (a stack of N runs doing one step makes N run-steps). Each number is the
median of 3 timings of `--steps` steps after warm-up (CUDA-synchronised wall clock). Before timing, the graph
replay is checked against the eager step (parameters after 4 steps from the same start).

The protocol estimate multiplies every setting's run-steps without early stopping (66 settings x 6 runs x 200 epochs
x ceil(train examples / 128)) by the measured time per run-step of `graph` at the nearest measured length.

Writes <out>/throughput.md and <out>/throughput.csv. `--cpu-smoke` runs the eager and stacked variants at a tiny
length and batch 16 on the CPU (no graphs, no compile, no worker processes), so the script is tested without a GPU.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import multiprocessing
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "analysis" / "throughput")
    p.add_argument("--attentions", default="softmax,parallax")
    p.add_argument("--lens", default="128,1024")
    p.add_argument("--runs", type=int, default=6, help="runs per stack (the lr x wd grid of one setting)")
    p.add_argument("--workers", default="2,4", help="concurrent graph processes to try (K)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting new measurements after this")
    p.add_argument("--cpu-smoke", action="store_true", help="eager and stacked only, on the CPU, to test the script")
    return p.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SMOKE_BATCH = 16  # script tests on the CPU (--cpu-smoke here and in bench_epoch.py; profile_step.py): 8x less work
SMOKE_OVERRIDES = (f"train.batch_size={SMOKE_BATCH}",)


def compose_cfg(attention: str, seq_len: int, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"attention={attention}", f"task.seq_len={seq_len}", "progress=false",
                                            *overrides])  # fmt: skip


def make_batch(cfg, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.train.batch_size, cfg.task.seq_len - 1)
    tokens = torch.randint(0, cfg.task.vocab_size, shape, generator=gen)
    return tokens.to(device), torch.roll(tokens, -1, dims=1).to(device)


def time_steps(step, steps: int, device: torch.device) -> float:
    """Median seconds per step over 3 timings of `steps` steps (after 10 warm-up steps)."""
    for _ in range(10):
        step()
    synchronize(device)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def eager_step_fn(cfg, device, compiled: bool):
    from mad.optim import build_optimizers
    from mad.run import build_model, loop_config
    from mad.train import train_step

    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    forward = torch.compile(model) if compiled else model
    optimizers = build_optimizers(model, {**cfg.optimizer, "betas": list(cfg.optimizer.betas)})
    inputs, targets = make_batch(cfg, device)
    loop = loop_config(cfg, device)
    return lambda: train_step(forward, optimizers, inputs, targets, loop)


def stacked_step_fn(cfg, device, runs: int, graph: bool, seed: int = 0, compiled: bool = False):
    from mad.run import build_model, loop_config
    from mad.stacked_model import StackedModel
    from mad.stacked_train import StepFunction, StepOptions, build_optimizers

    torch.manual_seed(seed)
    models = [build_model(cfg) for _ in range(runs)]
    stacked = StackedModel(models).to(device)
    opt_cfg = {**cfg.optimizer, "betas": list(cfg.optimizer.betas)}
    grid = [dict(opt_cfg, lr=1e-4 * (1 + i), weight_decay=0.1 * (i % 2)) for i in range(runs)]
    optimizers = build_optimizers(stacked, models[0].to(device), grid)
    step = StepFunction(stacked, optimizers, loop_config(cfg, device), StepOptions(cuda_graph=graph, compile=compiled))
    inputs, targets = (x.expand(runs, *x.shape) for x in make_batch(cfg, device))
    return (lambda: step(inputs, targets)), stacked


def graph_matches_eager(cfg, device, runs: int, compiled: bool) -> float:
    """Max |eager - graph (compiled or not)| over the parameters after 4 steps from the same initialisation."""
    params = []
    for graph in (False, True):
        step, stacked = stacked_step_fn(cfg, device, runs, graph, compiled=graph and compiled)
        for _ in range(4):
            step()
        torch.cuda.synchronize()
        params.append([p.detach().float().clone() for p in stacked.stacked])
    return max((a - b).abs().max().item() for a, b in zip(*params))


def _worker(attention, seq_len, runs, steps, barrier, results):
    device = torch.device("cuda")
    cfg = compose_cfg(attention, seq_len)
    step, _ = stacked_step_fn(cfg, device, runs, graph=True)
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    barrier.wait()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    results.put(steps / (time.perf_counter() - start))


def concurrent_graphs(attention, seq_len, runs, steps, workers) -> float:
    """Total stack-steps/s of `workers` processes replaying graphs at once."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(attention, seq_len, runs, steps * 2, barrier, results)) for _ in range(workers)]
    for p in procs:
        p.start()
    rates = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def protocol_run_steps() -> dict[int, int]:
    """Run-steps of the full protocol without early stopping, by sequence length."""
    from mad.tasks.grid import mad_settings

    by_len: dict[int, int] = {}
    for task, setting in mad_settings():
        seq_len = setting["seq_len"]
        steps = 6 * 200 * math.ceil(setting["num_train_examples"] / 128)
        by_len[seq_len] = by_len.get(seq_len, 0) + steps
    return by_len


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        args.lens, args.workers = "16", ""
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device: this benchmark times the GPU (--cpu-smoke tests the script on the CPU)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows, notes = [], []

    def add(attention, seq_len, variant, runs, seconds_per_step):
        rows.append({"attention": attention, "L": seq_len, "variant": variant, "runs": runs,
                     "ms_per_step": 1e3 * seconds_per_step, "run_steps_per_s": runs / seconds_per_step})  # fmt: skip
        print(f"{attention:8s} L={seq_len:5d} {variant:12s} runs={runs:2d} {1e3 * seconds_per_step:8.3f} ms/step "
              f"{runs / seconds_per_step:9.1f} run-steps/s", flush=True)  # fmt: skip

    # Length outermost: the L=128 rows (the target's) come first if the budget runs out.
    for seq_len in (int(x) for x in args.lens.split(",")):
        for attention in args.attentions.split(","):
            if time.time() - started > args.budget_s:
                notes.append(f"{attention} L={seq_len}: skipped, time budget {args.budget_s:.0f} s")
                continue
            cfg = compose_cfg(attention, seq_len, *(SMOKE_OVERRIDES if args.cpu_smoke else ()))
            add(attention, seq_len, "eager", 1, time_steps(eager_step_fn(cfg, device, False), args.steps, device))
            if device.type == "cuda":
                try:
                    step = eager_step_fn(cfg, device, True)
                    add(attention, seq_len, "compiled", 1, time_steps(step, args.steps, device))
                except Exception as e:  # noqa: BLE001 - reported, the other variants still run
                    notes.append(f"{attention} L={seq_len} compiled: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                for compiled, name in ((False, "graph"), (True, "graph+compile")):
                    diff = graph_matches_eager(cfg, device, args.runs, compiled)
                    notes.append(f"{attention} L={seq_len}: {name} vs eager, max |param difference| after 4 steps = "
                                 f"{diff:.2e}")  # fmt: skip
            for variant, graph in (("stacked", False), ("graph", True))[: 2 if device.type == "cuda" else 1]:
                step, stacked = stacked_step_fn(cfg, device, args.runs, graph)
                add(attention, seq_len, variant, args.runs, time_steps(step, args.steps, device))
            notes.append(f"{attention} L={seq_len}: stacks run {stacked.strategy} (mad/stacked_model.py)")
            if device.type == "cuda":
                try:
                    step, _ = stacked_step_fn(cfg, device, args.runs, True, compiled=True)
                    add(attention, seq_len, "graph+compile", args.runs, time_steps(step, args.steps, device))
                except Exception as e:  # noqa: BLE001 - reported, the other variants still run
                    notes.append(f"{attention} L={seq_len} graph+compile: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}")  # fmt: skip
            for workers in (int(x) for x in args.workers.split(",") if x):
                if time.time() - started > args.budget_s:  # these start processes that compile: minutes at L=1024
                    notes.append(f"{attention} L={seq_len} graph x{workers}: skipped, time budget {args.budget_s:.0f} s")
                    continue
                rate = concurrent_graphs(attention, seq_len, args.runs, args.steps, workers)
                add(attention, seq_len, f"graph x{workers}", args.runs * workers, workers / rate)
            torch.cuda.empty_cache()
            write_tables(args, rows, notes, argv if argv is not None else sys.argv[1:])  # a killed run keeps its rows
    return 0


def write_tables(args, rows, notes, argv) -> None:
    with open(args.out / "throughput.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import triton

    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (--cpu-smoke: not a measurement)"
    lines = ["# Training throughput of the harness", "",
             f"- device: {device_name}; torch {torch.__version__}, triton {triton.__version__}, "
             f"Python {platform.python_version()}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `PYTHONPATH=. python benchmarks/bench_throughput.py {' '.join(argv)}`",
             f"- model: the MAD model (conf/model/mad.yaml), batch {SMOKE_BATCH if args.cpu_smoke else 128}, bf16 "
             "autocast on GPU, AdamW; times: median of 3 x "
             f"{args.steps} steps after warm-up", "",
             "| attention | L | variant | runs | ms per step | run-steps/s | x eager |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    eager = {(r["attention"], r["L"]): r["run_steps_per_s"] for r in rows if r["variant"] == "eager"}
    for r in rows:
        base = eager.get((r["attention"], r["L"]))
        lines.append(f"| {r['attention']} | {r['L']} | {r['variant']} | {r['runs']} | {r['ms_per_step']:.3f} | "
                     f"{r['run_steps_per_s']:.0f} | {r['run_steps_per_s'] / base:.1f} |")  # fmt: skip
    lines += ["", "## Full protocol estimate (no early stopping; per attention)", "",
              "| attention | run-steps | GPU-minutes at `graph` | GPU-minutes at the best variant |",
              "| --- | ---: | ---: | ---: |"]  # fmt: skip
    by_len = protocol_run_steps()
    for attention in sorted({r["attention"] for r in rows}):
        mine = [r for r in rows if r["attention"] == attention]
        measured = sorted({r["L"] for r in mine})
        total_graph = total_best = 0.0
        for seq_len, steps in by_len.items():
            nearest = min(measured, key=lambda m: abs(math.log(m / seq_len)))
            at = [r for r in mine if r["L"] == nearest]
            graph = next((r for r in at if r["variant"] == "graph"), at[-1])  # the CPU smoke run has no graph
            total_graph += steps / graph["run_steps_per_s"]
            total_best += steps / max(r["run_steps_per_s"] for r in at)
        lines.append(f"| {attention} | {sum(by_len.values()):,} | {total_graph / 60:.0f} | {total_best / 60:.0f} |")
    lines += ["", "Settings are timed at the measured length nearest to theirs (log scale), so lengths between",
              "128 and 1024 are estimated, not measured. Early stopping (accuracy > 0.999) shortens many runs.", "",
              "## Notes", "", *(f"- {n}" for n in notes), ""]
    (args.out / "throughput.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
