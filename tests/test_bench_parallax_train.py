"""benchmarks/bench_parallax_train.py's report, from made-up results (the timing itself needs the GPU)."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_parallax_train", REPO / "benchmarks" / "bench_parallax_train.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclasses look their module up there
_spec.loader.exec_module(bench)


def _memory_results(ours_peak) -> list:
    """Peak GiB at MEM_SHAPES: softmax peers grow linearly, ours as `ours_peak(L, D)` says."""
    results = []
    for B, L, H, D in bench.MEM_SHAPES:
        unit = L / bench.MEM_LENS[0] * D / 64
        for peer, gib in (("cudnn", unit), ("flash", 1.3 * unit), ("ours", ours_peak(L, D))):
            results.append(bench.Result("mem", B, L, H, D, peer, "peak_mem", gib))
    return results


def _report(results) -> dict[str, str]:
    peers = {n: bench.Peer(n, "BTHD", n == "ours") for n in ("ours", "cudnn", "flash")}
    md = bench.report(results, peers, {}, "made up", "-", [], 0.0, "")
    return {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}


def test_memory_growing_linearly_in_length_meets_the_target():
    rows = _report(_memory_results(lambda L, D: 1.1 * L / bench.MEM_LENS[0] * D / 64 + 0.05))
    growth = next(v for k, v in rows.items() if k.startswith("peak memory growth"))
    assert growth.endswith("| yes | - |")
    assert rows["cudnn"] == "| cudnn | 4.00 | 4.00 |"  # the growth table: one column per head dim
    memory_16k = rows["peak memory vs softmax (leaner of cuDNN, flash) at 16k, worst"]
    assert "| 1.11 | yes |" in memory_16k  # taken at 16k only: at 4k ours is 1.15x cuDNN's


@pytest.mark.parametrize("per_token", [0.0, 0.01], ids=["L^2 alone", "L^2 beside a linear part"])
def test_memory_with_an_L_by_L_buffer_misses_the_growth_target(per_token):
    rows = _report(_memory_results(lambda L, D: (L / bench.MEM_LENS[0]) ** 2 * 0.1 + per_token * L / 1024))
    growth = next(v for k, v in rows.items() if k.startswith("peak memory growth"))
    assert "| NO |" in growth and "too much" in growth
    assert rows["ours"].startswith("| ours | ") and "| 4.00 |" not in rows["ours"]
