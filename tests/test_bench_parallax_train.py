"""benchmarks/bench_parallax_train.py's report, from made-up results (the timing itself needs the GPU)."""

import pytest
import torch

from benchmarks import bench_parallax_train as bench
from benchmarks import check_parallax_triton as check

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _memory_results(ours_peak) -> list:
    """Peak GiB at MEM_SHAPES: softmax peers grow linearly, ours as `ours_peak(L, D)` says."""
    results = []
    for B, L, H, D in bench.MEM_SHAPES:
        unit = L / bench.MEM_LENS[0] * D / 64
        for peer, gib in (("cudnn", unit), ("flash", 1.3 * unit), ("ours", ours_peak(L, D))):
            results.append(bench.Result("mem", B, L, H, D, peer, "peak_mem", gib))
    return results


def _report(results) -> dict[str, str]:
    """The table rows of the report's memory growth table and its targets table, by their first cell."""
    peers = {n: bench.Peer(n, "BTHD", n == "ours") for n in ("ours", "cudnn", "flash")}
    md = bench.report(results, peers, {}, "made up", "-", [], 0.0, "")
    after_memory = md.split("\nPeak memory at L = ", 1)[1]
    return {line.split(" | ")[0].strip("| "): line for line in after_memory.splitlines() if line.startswith("| ")}


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


class _Config:  # what the report reads of a triton.Config
    def __init__(self, m, n, warps, stages):
        self.kwargs, self.num_warps, self.num_stages = {"BLOCK_M": m, "BLOCK_N": n}, warps, stages


class _Tuner:  # a triton Autotuner's cache: (HEAD_DIM, TUNE_KEY, dtype of each tensor argument) -> Config
    def __init__(self, cache):
        self.cache = cache


def test_the_report_lists_the_tiles_our_autotuners_picked():
    bf16 = ("torch.bfloat16",) * 4
    saving = ("torch.bfloat16",) * 3 + ("torch.float16",)  # the training forward's key: its saved copies are fp16
    tuners = {"fwd": _Tuner({(64, 29, *bf16): _Config(128, 64, 8, 3), (64, 29, *saving): _Config(64, 64, 4, 3),
                             (8, 21, *bf16): _Config(64, 64, 4, 2)}),
              "dq": _Tuner({(64, 29, *bf16): _Config(64, 32, 4, 3)}),
              "dkv": _Tuner({(64, 29, *bf16): _Config(32, 128, 8, 3)})}
    picks = bench.autotune_picks(tuners)
    assert [(p.kernel, p.head_dim) for p in picks] == [("fwd", 8), ("fwd", 64), ("fwd", 64), ("dq", 64), ("dkv", 64)]
    md = bench.report(_memory_results(lambda L, D: L / 4096), {}, {}, "made up", "-", [], 0.0, "", picks)
    assert "| 64 | 16384 | yes | bfloat16 | 128x64, 8w, 3s / 64x64, 4w, 3s | 64x32, 4w, 3s | 32x128, 8w, 3s |" in md
    assert "| 8 | 1024 | yes | bfloat16 | 64x64, 4w, 2s | - | - |" in md
    assert "\n\n\n" not in md
    assert "Tiles our autotuners picked" not in bench.report([], {}, {}, "made up", "-", [], 0.0, "")


def test_the_check_forces_every_candidate_of_every_kernel():
    """Forced config indices run up to the longest of the three kernels' candidate lists (at small head dims dq and
    dkv have 4 candidates, the forward 3), each kernel wrapping around its own."""
    import kernels.parallax.triton as tri

    specs = check.make_specs(220, 0, lambda D, dt: check.most_candidates(tri, D, DTYPES[dt]))
    for D in check.HEAD_DIMS:
        for dtype in ("bf16", "fp32"):
            forced = [s.configs for s in specs if (s.D, s.dtype) == (D, dtype) and s.configs != "auto"]
            for slot, kind in enumerate(check.KERNEL_KINDS):
                candidates = tri.candidate_configs(kind, D, DTYPES[dtype])
                used = {id(check.forced_config(candidates, int(c.split(",")[slot]))) for c in forced}
                assert used == {id(c) for c in candidates}, (D, dtype, kind)
    assert check.most_candidates(tri, 8, torch.bfloat16) == 4
