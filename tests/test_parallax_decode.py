"""Parallax decode (kernels/parallax/decode.py): the reference path, input checks, the Triton kernel under the
interpreter, and a compile-only check of the CuTeDSL kernel for sm_90a.

The interpreter must be switched on before triton is first imported, so the Triton and CuTeDSL checks run this
file as a script in a subprocess (`python tests/test_parallax_decode.py --interpret | --cute-compile`) and the
tests read its JSON report; nothing in this process sets TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kernels.parallax.decode import MAX_SPLITS, TRITON_MERGES, hopper_kernel, parallax_decode, triton_decode  # noqa: E402
from kernels.parallax.reference import parallax_attention  # noqa: E402
from kernels.testing import nan_filled_empty  # noqa: E402


def make_inputs(B, H, H_kv, L, D, dtype=torch.float32, seed=0, ragged=True, poison_tail=True):
    """RMS-scale q, r, k, v; ragged lengths in [1, L] (1 and L included); NaN in the cache past each prefix."""
    g = torch.Generator().manual_seed(seed)
    q, r = (torch.randn(B, 1, H, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, L, H_kv, D, generator=g) for _ in range(2))
    r = 0.3 * r
    lens = None
    if ragged:
        lens = torch.randint(1, L + 1, (B,), generator=g, dtype=torch.int32)
        lens[0] = L
        if B > 1:
            lens[1] = 1
        if poison_tail:
            for b, n in enumerate(lens.tolist()):
                k[b, n:] = float("nan")
                v[b, n:] = float("nan")
    return q.to(dtype), r.to(dtype), k.to(dtype), v.to(dtype), lens


def prefix_reference(q, r, k, v, lens, scale=None):
    """float64 reference on each sequence's valid prefix."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        n = k.shape[1] if lens is None else int(lens[b])
        out[b : b + 1] = parallax_attention(
            *(x[b : b + 1].double() for x in (q, r)), k[b : b + 1, :n].double(), v[b : b + 1, :n].double(), scale=scale
        )
    return out


def _pythonpath() -> str:
    return os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])


def rel_err(out, ref) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


# ---- reference path --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_reference_impl_matches_reference_attention_on_each_prefix(dtype, heads, kv_heads):
    q, r, k, v, lens = make_inputs(3, heads, kv_heads, 21, 16, dtype=dtype)
    out = parallax_decode(q, r, k, v, cache_seqlens=lens, impl="reference", scale=0.37)
    assert out.shape == q.shape and out.dtype == dtype
    for b in range(3):
        n = int(lens[b])
        expect = parallax_attention(q[b : b + 1], r[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], scale=0.37)
        torch.testing.assert_close(out[b : b + 1], expect, rtol=0, atol=0)
    assert not out.isnan().any()


def test_reference_impl_without_seqlens_is_reference_attention():
    q, r, k, v, _ = make_inputs(2, 4, 2, 9, 8, ragged=False)
    torch.testing.assert_close(parallax_decode(q, r, k, v, impl="reference"), parallax_attention(q, r, k, v))


def test_auto_on_hopper_takes_the_kernel_measured_faster():
    # analysis/kernels/parallax_decode_bench.md: Triton at B*H <= 256 query rows, CuTeDSL above; Triton for GQA
    # groups the CuTeDSL tile cannot hold; CuTeDSL where Triton's split would leave several programs two tiles each.
    assert hopper_kernel(1, 8, 1, 2048) == "triton" and hopper_kernel(32, 8, 1, 128) == "triton"  # 32 x 1 tile; 1 x 2
    assert hopper_kernel(1, 16, 1, 2048) == "cute" and hopper_kernel(8, 8, 1, 512) == "cute"  # 16 x 2; 4 x 2 tiles
    assert hopper_kernel(1, 16, 1, 8192) == "triton" and hopper_kernel(1, 16, 2, 2048) == "triton"  # 16 x 8; 32 x 1
    assert hopper_kernel(32, 16, 1, 128) == "cute" and hopper_kernel(2048, 8, 1, 128) == "cute"
    assert hopper_kernel(2048, 16, 16, 128) == "triton"
    assert hopper_kernel(1, 8, 1, 2048, num_splits=16) == "cute" and hopper_kernel(1, 16, 1, 2048, num_splits=32) == "triton"


def test_auto_on_cpu_is_the_reference():
    q, r, k, v, lens = make_inputs(2, 2, 1, 11, 8)
    torch.testing.assert_close(
        parallax_decode(q, r, k, v, cache_seqlens=lens), parallax_decode(q, r, k, v, cache_seqlens=lens, impl="reference")
    )


# ---- input checks ----------------------------------------------------------------------------------------


def _good(dtype=torch.bfloat16, D=64):
    q, r, k, v, lens = make_inputs(2, 4, 2, 10, D, dtype=dtype, poison_tail=False)
    return dict(q=q, r=r, k_cache=k, v_cache=v, cache_seqlens=lens)


BAD_CASES = {
    "q_rank": (lambda a: a.update(q=a["q"][:, 0]), "4-D"),
    "q_len": (lambda a: a.update(q=a["q"].expand(2, 3, 4, 64), r=a["r"].expand(2, 3, 4, 64)), "one query per sequence"),
    "r_shape": (lambda a: a.update(r=a["r"][:, :, :2]), "r must have the shape of q"),
    "kv_shape": (lambda a: a.update(v_cache=a["v_cache"][:, :5]), "must have one shape"),
    "batch": (lambda a: a.update(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), "batch"),
    "head_dim": (lambda a: a.update(k_cache=a["k_cache"][..., :32], v_cache=a["v_cache"][..., :32]), "head_dim"),
    "gqa": (lambda a: a.update(k_cache=a["k_cache"][:, :, :1].expand(2, 10, 3, 64),
                               v_cache=a["v_cache"][:, :, :1].expand(2, 10, 3, 64)), "multiple of kv_heads"),
    "mixed_dtype": (lambda a: a.update(r=a["r"].float()), "share one dtype"),
    "int_dtype": (lambda a: a.update(**{n: a[n].to(torch.int32) for n in ("q", "r", "k_cache", "v_cache")}), "dtypes"),
    "seqlens_dtype": (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), "int32"),
    "seqlens_shape": (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), r"shape \[batch\]"),
    "seqlens_zero": (lambda a: a["cache_seqlens"].__setitem__(0, 0), r"\[1, max_len=10\]"),
    "seqlens_long": (lambda a: a["cache_seqlens"].__setitem__(1, 11), r"\[1, max_len=10\]"),
    "seqlens_type": (lambda a: a.update(cache_seqlens=[3, 4]), "int32 tensor"),
    "device": (lambda a: a.update(cache_seqlens=a["cache_seqlens"].to("meta")), "one device"),
    "not_tensor": (lambda a: a.update(q=1.0), "torch.Tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_input_raises_value_error_before_launch(case, impl):
    args = _good()
    mutate, match = BAD_CASES[case]
    mutate(args)
    with pytest.raises(ValueError, match=match):
        parallax_decode(args.pop("q"), args.pop("r"), args.pop("k_cache"), args.pop("v_cache"), impl=impl, **args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(impl="fast"), "impl="),
        (dict(impl="triton", num_splits=0), "num_splits"),
        (dict(impl="triton", num_splits=MAX_SPLITS + 1), "num_splits"),
        (dict(impl="triton", num_splits=2.0), "num_splits"),
        (dict(impl="reference", scale=float("nan")), "scale"),
        (dict(impl="reference", scale="0.1"), "scale"),
    ],
)
def test_bad_options_raise_value_error(kwargs, match):
    a = _good()
    with pytest.raises(ValueError, match=match):
        parallax_decode(a["q"], a["r"], a["k_cache"], a["v_cache"], **kwargs)


def test_kernels_reject_other_head_dims_and_strided_last_dim():
    a = _good(torch.float16, D=32)
    with pytest.raises(ValueError, match=r"head_dim in \(64, 128\)"):
        parallax_decode(a["q"], a["r"], a["k_cache"], a["v_cache"], impl="triton")
    a = _good(torch.float16)
    k = a["k_cache"].transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        parallax_decode(a["q"], a["r"], k, a["v_cache"], impl="triton")


def test_reference_rejects_float64_and_cute_needs_a_gpu():
    a = _good(torch.float32)
    with pytest.raises(ValueError, match="dtypes"):
        parallax_decode(*(a[n].double() for n in ("q", "r", "k_cache", "v_cache")), impl="reference")
    with pytest.raises(ValueError, match="dtypes"):  # fp32 is for the reference and Triton paths only
        parallax_decode(a["q"], a["r"], a["k_cache"], a["v_cache"], impl="cute")
    b = _good(torch.bfloat16)
    with pytest.raises(ValueError, match="cute"):
        parallax_decode(b["q"], b["r"], b["k_cache"], b["v_cache"], impl="cute")


def test_triton_decode_rejects_an_unknown_merge():
    a = _good(torch.float16)
    with pytest.raises(ValueError, match="merge="):
        triton_decode(a["q"], a["r"], a["k_cache"], a["v_cache"], scale=0.1, merge="lse")


def test_triton_on_cpu_without_the_interpreter_is_a_value_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = _good(torch.float16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        parallax_decode(a["q"], a["r"], a["k_cache"], a["v_cache"], impl="triton")


def test_triton_on_cpu_rejects_bfloat16():
    a = _good(torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16|TRITON_INTERPRET"):
        parallax_decode(a["q"], a["r"], a["k_cache"], a["v_cache"], impl="triton")


# ---- Triton under the interpreter (subprocess) -----------------------------------------------------------

# (name, B, H, H_kv, L, D, dtype, num_splits list, ragged)
INTERPRET_CASES = [
    ("g1_fp32", 3, 4, 4, 77, 64, "float32", [None, 1, 3], True),
    ("g2_fp32", 3, 4, 2, 100, 64, "float32", [None, 2], True),
    ("g4_fp32_d128", 2, 8, 2, 45, 128, "float32", [None, 1, 2], True),
    ("g1_fp16", 3, 2, 2, 70, 64, "float16", [None, 1, 4], True),
    ("g2_fp16_d128", 2, 4, 2, 33, 128, "float16", [None, 2], True),
    ("g4_fp16", 2, 4, 1, 65, 64, "float16", [None, 3], True),
    ("full_fp16", 2, 4, 2, 50, 64, "float16", [None, 2], False),
    # every split count for one shape: 4 tiles of 32 keys, so 5 and 6 leave every sequence some empty splits
    ("splits_fp32", 2, 2, 1, 100, 64, "float32", list(range(1, 7)) + [MAX_SPLITS], True),
]


def _run_interpreter_cases() -> dict:
    report = {}
    for name, B, H, H_kv, L, D, dtype, splits_list, ragged in INTERPRET_CASES:
        q, r, k, v, lens = make_inputs(B, H, H_kv, L, D, dtype=getattr(torch, dtype), seed=len(report), ragged=ragged)
        ref = prefix_reference(q, r, k, v, lens, scale=0.2)
        for splits in splits_list:
            out = parallax_decode(q, r, k, v, cache_seqlens=lens, scale=0.2, impl="triton", num_splits=splits)
            report[f"{name}/splits={splits}"] = dict(
                err=rel_err(out, ref), nan=bool(out.isnan().any()), dtype_ok=out.dtype == q.dtype, shape_ok=out.shape == q.shape
            )
    # A strided cache: a head slice of a wider cache, and a max_len slice of a longer one.
    q, r, k, v, lens = make_inputs(2, 4, 2, 40, 64, seed=99, poison_tail=False)
    wide_k, wide_v = (torch.cat([x, torch.randn_like(x)], dim=2)[:, :, :2] for x in (k, v))
    long_k, long_v = (torch.cat([x, torch.full_like(x, float("nan"))], dim=1)[:, :40] for x in (k, v))
    ref = prefix_reference(q, r, k, v, lens)
    for name, (kk, vv) in {"strided_heads": (wide_k, wide_v), "strided_len": (long_k, long_v)}.items():
        out = parallax_decode(q, r, kk, vv, cache_seqlens=lens, impl="triton", num_splits=2)
        report[name] = dict(err=rel_err(out, ref), nan=bool(out.isnan().any()), dtype_ok=True, shape_ok=True)
    report.update(_run_large_probe_cases())
    report.update(_run_merge_cases())
    report.update(_run_counter_reuse())
    return report


# Large probe scores, fp16: (name, D, per-sequence cache lengths, max_len, num_splits list). Short prefixes are
# where an unshifted P∘U failed (on the H200 in bf16 at lengths 1 and 7; at one key o = v exactly, so nothing
# masks the |u|·2^-11·|v| rounding of p·u); the long ones cover the shift being rebased across tiles and splits.
LARGE_PROBE_CASES = [
    ("short_d64", 64, [1, 2, 3, 7], 7, [None, 2]),
    ("short_d128", 128, [1, 2, 3, 7], 7, [None, 2]),
    ("long_d128", 128, [70, 33, 100], 100, [None, 1, 3]),
]
LARGE_PROBE_TOL = 2e-3  # fp16 (2^-11): the bf16 bound 1e-2 scaled by the 4x finer rounding, with margin


def large_probe_inputs(D, lens, max_len, seed, H=4, H_kv=2):
    """|u| ~ 8·sqrt(D): r RMS-normalised x8; RMS-normalised keys sharing a per-(sequence, KV head) direction
    (plus 0.02 noise), so that the probe scores of a prefix are large but close to one another (ū large, u − ū
    small) and o stays of the size of v: the case where rounding p·u to 16 bits before the MMA costs the most."""
    rms = lambda x: x * x.pow(2).mean(-1, keepdim=True).rsqrt()  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    q, r = (rms(torch.randn(B, 1, H, D, generator=g)) for _ in range(2))
    k = rms(torch.randn(B, 1, H_kv, D, generator=g) + 0.02 * torch.randn(B, max_len, H_kv, D, generator=g))
    v = torch.randn(B, max_len, H_kv, D, generator=g)
    lens = torch.tensor(lens, dtype=torch.int32)
    for b, n in enumerate(lens.tolist()):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    return q.half(), (8 * r).half(), k.half(), v.half(), lens


def _run_large_probe_cases() -> dict:
    """Relative max-norm error of each sequence on its own (so that no longer prefix's output masks it)."""
    report = {}
    for i, (name, D, lens, max_len, splits_list) in enumerate(LARGE_PROBE_CASES):
        q, r, k, v, seqlens = large_probe_inputs(D, lens, max_len, seed=1000 + i)
        ref = prefix_reference(q, r, k, v, seqlens)
        for splits in splits_list:
            out = parallax_decode(q, r, k, v, cache_seqlens=seqlens, impl="triton", num_splits=splits)
            for b, n in enumerate(lens):
                report[f"large_u_{name}/L={n}/splits={splits}"] = dict(
                    err=rel_err(out[b], ref[b]), nan=bool(out[b].isnan().any()), dtype_ok=out.dtype == q.dtype,
                    shape_ok=out.shape == q.shape)
    return report


# Both split merges of triton_decode, forced: (name, B, H, H_kv, L, D, dtype, num_splits list). 32-key tiles under
# the interpreter: L = 100 is 4 tiles, so 5 and MAX_SPLITS leave empty splits, and the ragged lengths (1 and L
# included) leave short sequences empty splits at every count above 1. (splits_fp32 above runs every count.)
MERGE_CASES = [  # split counts below the tile count (splits of several tiles) and above it (empty splits)
    ("g1_fp32", 3, 2, 2, 100, 64, "float32", [3]),
    ("g1_max_fp32", 3, 1, 1, 100, 64, "float32", [MAX_SPLITS]),  # one head per sequence: the interpreter runs
    # each of the 3 x 64 programs in turn
    ("g2_fp16", 3, 4, 2, 100, 64, "float16", [5]),
    ("g4_fp32_d128", 2, 8, 2, 70, 128, "float32", [2]),
    ("g8_fp16", 2, 8, 1, 45, 64, "float16", [4]),
]


def _run_merge_cases() -> dict:
    report = {}
    for i, (name, B, H, H_kv, L, D, dtype, splits_list) in enumerate(MERGE_CASES):
        q, r, k, v, lens = make_inputs(B, H, H_kv, L, D, dtype=getattr(torch, dtype), seed=200 + i)
        ref = prefix_reference(q, r, k, v, lens, scale=0.2)
        for merge in TRITON_MERGES:
            for splits in splits_list:
                out = triton_decode(q, r, k, v, cache_seqlens=lens, scale=0.2, num_splits=splits, merge=merge)
                report[f"merge_{merge}_{name}/splits={splits}"] = dict(
                    err=rel_err(out, ref), nan=bool(out.isnan().any()), dtype_ok=out.dtype == q.dtype,
                    shape_ok=out.shape == q.shape)
    return report


def _run_counter_reuse() -> dict:
    """merge="atomic" three times in a row on one counter buffer, from empty and with room for 2 counters at first:
    B * H_kv = 2, then 6 (the buffer grows, the old one is kept), then 2 again (the grown one is reused). Each
    call must match the reference and leave every counter at 0."""
    from kernels.parallax import decode

    decode._MERGE_COUNTERS.clear()
    decode._MIN_COUNTERS = 2
    report = {}
    for call, (B, H, H_kv, splits) in enumerate([(2, 2, 1, 3), (3, 4, 2, 4), (2, 4, 1, 2)]):
        q, r, k, v, lens = make_inputs(B, H, H_kv, 70, 64, seed=300 + call)
        out = triton_decode(q, r, k, v, cache_seqlens=lens, scale=0.2, num_splits=splits, merge="atomic")
        buffers = decode._MERGE_COUNTERS[q.device]
        report[f"reuse/call={call}"] = dict(
            err=rel_err(out, prefix_reference(q, r, k, v, lens, scale=0.2)), nan=bool(out.isnan().any()),
            counters=[int(c.abs().sum()) for c in buffers], sizes=[c.numel() for c in buffers])
    return report


def _run_script_smokes(out_dir: str) -> dict:
    """`--cpu-smoke` of both GPU scripts, in this (interpreter) process to save a start-up per script."""
    import importlib.util

    rcs = {}
    for key, script in (("check", SCRIPTS[0]), ("bench", SCRIPTS[1])):
        spec = importlib.util.spec_from_file_location(f"_smoke_{key}", REPO / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        rcs[f"{key}_rc"] = module.main(["--cpu-smoke", "--out", out_dir])
    rcs["check_report"] = (Path(out_dir) / "parallax_decode_check.md").read_text()
    return rcs


@pytest.fixture(scope="module")
def interpreter_report(tmp_path_factory):
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": "1"}
    out_dir = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run([sys.executable, __file__, "--interpret", str(out_dir)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_interpreter_covers_every_case(interpreter_report):
    expected = {f"{c[0]}/splits={s}" for c in INTERPRET_CASES for s in c[7]} | {"strided_heads", "strided_len", "_smoke"}
    expected |= {f"large_u_{c[0]}/L={n}/splits={s}" for c in LARGE_PROBE_CASES for n in c[2] for s in c[4]}
    expected |= {f"merge_{m}_{c[0]}/splits={s}" for c in MERGE_CASES for m in TRITON_MERGES for s in c[7]}
    expected |= {f"reuse/call={i}" for i in range(3)}
    assert set(interpreter_report) == expected


def assert_rows_match(rows: dict, case: str) -> None:
    """Interpreter-report rows of one case: written, right dtype and shape, within the dtype's tolerance."""
    assert rows
    tol = 2e-3 if "fp16" in case else 1e-5
    for key, row in rows.items():
        assert not row["nan"], key
        assert row["dtype_ok"] and row["shape_ok"], key
        assert row["err"] < tol, (key, row["err"])


@pytest.mark.parametrize("case", [c[0] for c in INTERPRET_CASES] + ["strided"])
def test_triton_decode_matches_the_prefix_reference(interpreter_report, case):
    rows = {k: v for k, v in interpreter_report.items() if k.startswith(case) and not k.startswith("_")}
    assert_rows_match(rows, case)


@pytest.mark.parametrize("merge", TRITON_MERGES)
@pytest.mark.parametrize("case", [c[0] for c in MERGE_CASES])
def test_triton_split_merges_match_the_prefix_reference(interpreter_report, merge, case):
    """merge="atomic" (the last split program merges, one launch) and merge="kernel" (a second launch), at every
    forced split count, empty splits included. The interpreter runs programs one after another, so this checks the
    arithmetic and the counter protocol, not the memory ordering (benchmarks/check_parallax_decode.py does that on
    a GPU)."""
    rows = {k: v for k, v in interpreter_report.items() if k.startswith(f"merge_{merge}_{case}/")}
    assert_rows_match(rows, case)


def test_triton_atomic_merge_reuses_and_resets_its_counters(interpreter_report):
    rows = [interpreter_report[f"reuse/call={i}"] for i in range(3)]
    for i, row in enumerate(rows):
        assert not row["nan"] and row["err"] < 1e-5, (i, row)
        assert not any(row["counters"]), (i, row)  # the merging program put its counter back to 0
    assert [row["sizes"] for row in rows] == [[2], [2, 6], [2, 6]]  # grown once, old buffer kept, then reused


@pytest.mark.parametrize("case", [c[0] for c in LARGE_PROBE_CASES])
def test_triton_decode_shifts_large_probe_scores(interpreter_report, case):
    """|u| ~ 8·sqrt(D) at short and long prefixes: P∘U must be formed from shifted scores (u − ū) before the
    16-bit rounding. Measured under the interpreter: unshifted, every row errs by 4e-3 to 5e-2; shifted, by at
    most 5e-4 (0 at one key, where o = v exactly)."""
    rows = {k: v for k, v in interpreter_report.items() if k.startswith(f"large_u_{case}/")}
    assert rows
    for key, row in rows.items():
        assert not row["nan"], key
        assert row["dtype_ok"] and row["shape_ok"], key
        assert row["err"] < LARGE_PROBE_TOL, (key, row["err"])


# ---- GPU scripts: they import, --help works, and --cpu-smoke runs the Triton impl under the interpreter ----

SCRIPTS = ["benchmarks/check_parallax_decode.py", "benchmarks/bench_parallax_decode.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_script_help(script):
    from tests.forked_python import run_script  # not at import: this file also runs as a script

    proc = run_script(REPO / script, ["--help"], timeout=60)
    assert proc.returncode == 0 and "--cpu-smoke" in proc.stdout and "--out" in proc.stdout, proc.stderr


def test_gpu_scripts_cpu_smoke(interpreter_report):
    """Both scripts ran with --cpu-smoke inside the interpreter subprocess (see _run_interpreter_cases)."""
    smoke = interpreter_report["_smoke"]
    assert smoke["check_rc"] == 0 and smoke["bench_rc"] == 0, smoke
    for impl in ("triton", "triton_1launch", "triton_2launch"):
        assert f"| {impl} | PASS | 2 | 2 |" in smoke["check_report"], smoke["check_report"]


# ---- CuTeDSL: compile for sm_90a without a GPU (subprocess) ----------------------------------------------

CUTE_COMPILE_CASES = [(128, 1, False, True), (128, 2, True, False), (64, 8, True, True), (64, 4, False, False)]


def _run_cute_compile() -> dict:
    """Compile each configuration to a cubin, stopping before the host JIT (which needs libcuda)."""
    import io

    import cuda.bindings.driver as cuda_driver
    import cutlass
    from cutlass.base_dsl import compiler as dsl_compiler
    from cutlass.cute.runtime import from_dlpack

    from kernels.parallax import cute_decode

    class Compiled(Exception):
        pass

    def stop_before_jit(self, module, *args, **kwargs):
        sizes = []

        def walk(op):
            if op.name == "gpu.binary":
                buf = io.BytesIO()
                op.write_bytecode(buf)
                sizes.append(len(buf.getvalue()))
            return cutlass._mlir.ir.WalkResult.ADVANCE

        module.operation.walk(walk)
        raise Compiled(sizes)

    dsl_compiler.Compiler.jit = stop_before_jit
    report = {}
    for D, G, has_seqlens, one_split in CUTE_COMPILE_CASES:
        B, H_kv, L, S = 2, 2, 100, 1 if one_split else 3
        H = G * H_kv
        bf16 = lambda *s: from_dlpack(torch.zeros(*s, dtype=torch.bfloat16), assumed_align=16).mark_layout_dynamic(leading_dim=len(s) - 1)  # noqa: E731
        f32 = lambda *s: from_dlpack(torch.zeros(*s), assumed_align=16 if len(s) > 1 else 4).mark_layout_dynamic(leading_dim=len(s) - 1)  # noqa: E731
        rows = 1 if one_split else B * H * S
        args = (bf16(B, H, D), bf16(B, H, D), bf16(B, L, H_kv, D), bf16(B, L, H_kv, D),
                from_dlpack(torch.zeros(B, dtype=torch.int32), assumed_align=4).mark_layout_dynamic(leading_dim=0),
                bf16(B, H, D), f32(rows), f32(rows), f32(rows), f32(rows, D), f32(rows, D),
                cutlass.Float32(0.1), cutlass.Int32(S), cuda_driver.CUstream(0))
        key = f"D={D},g={G},seqlens={has_seqlens},one_split={one_split}"
        try:
            cute_decode.compile_decode(args, dtype=cutlass.BFloat16, head_dim=D, group=G,
                                       has_seqlens=has_seqlens, one_split=one_split)
            report[key] = dict(ok=False, error="compile returned without reaching the JIT stage")
        except Exception as err:  # noqa: BLE001 - the DSL wraps our stop signal in its own error types
            cause = err
            while cause is not None and not isinstance(cause, Compiled):
                cause = cause.__cause__ or cause.__context__
            report[key] = dict(ok=True, cubins=cause.args[0]) if cause else dict(ok=False, error=f"{type(err).__name__}: {err}"[-2000:])
    return report


def test_cute_kernel_compiles_for_sm90a():
    try:
        import cutlass  # noqa: F401
        from importlib.metadata import version

        dsl_version = version("nvidia-cutlass-dsl")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"nvidia-cutlass-dsl is not installed ({type(err).__name__}: {err}); "
                    "the GPU machine carries 4.1.0, CI on Python 3.11 can install 4.2.1")
    env = os.environ | {"CUTE_DSL_ARCH": "sm_90a", "PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--cute-compile"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {k: v for k, v in report.items() if not v["ok"]}
    assert not failed, f"nvidia-cutlass-dsl {dsl_version}: {failed}"
    assert all(v["cubins"] and min(v["cubins"]) > 1000 for v in report.values()), report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--interpret"] and len(sys.argv) == 3:
        assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
        torch.set_num_threads(1)
        with nan_filled_empty():  # unwritten output elements show up as NaN
            result = _run_interpreter_cases()
        result["_smoke"] = _run_script_smokes(sys.argv[2])
        print(json.dumps(result))
    elif sys.argv[1:] == ["--cute-compile"]:
        print(json.dumps(_run_cute_compile()))
    else:
        sys.exit(f"usage: {sys.argv[0]} --interpret OUT_DIR | --cute-compile")
