"""The Triton Parallax kernels against the reference, on CPU under Triton's interpreter (fp32 and fp16).

The interpreter is switched on for this module only: `TRITON_INTERPRET=1` is set, `kernels.parallax.triton` is
imported fresh (its kernels are built as interpreted functions at import), and both are undone afterwards.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels.parallax as parallax_pkg
from kernels.parallax import parallax_attention
from kernels.parallax.reference import parallax_attention as reference_attention
from kernels.testing import nan_filled_empty
from tests.forked_python import run_script

REPO = Path(__file__).resolve().parents[1]
MODULE = "kernels.parallax.triton"


def _forget_kernel_module() -> None:
    sys.modules.pop(MODULE, None)
    if hasattr(parallax_pkg, "triton"):
        delattr(parallax_pkg, "triton")


@pytest.fixture(scope="module")
def tri():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        _forget_kernel_module()
        import kernels.parallax.triton as module

        assert module.INTERPRET
        yield module
    _forget_kernel_module()  # later imports build real GPU kernels again


@pytest.fixture
def poisoned_empty():
    """torch.empty / empty_like return NaN-filled tensors, so any element a kernel fails to write shows up."""
    with nan_filled_empty():
        yield


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float) -> float:
    """max|x - ref| / max|ref| (max-norm), the denominator floored for reference tensors that are ~0."""
    return ((x.double() - ref).abs().max() / max(ref.abs().max().item(), floor)).item()


def make_inputs(B, T, H, H_kv, D, dtype, T_k=None, r_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T_k = T if T_k is None else T_k

    def rms(x):
        return x / x.pow(2).mean(-1, keepdim=True).sqrt()

    q = rms(torch.randn(B, T, H, D, generator=gen))
    r = r_scale * rms(torch.randn(B, T, H, D, generator=gen))
    k = rms(torch.randn(B, T_k, H_kv, D, generator=gen))
    v = torch.randn(B, T_k, H_kv, D, generator=gen)
    g = torch.randn(B, T, H, D, generator=gen)
    return [x.to(dtype) for x in (q, r, k, v)], g.to(dtype)


def reference_grads(q, r, k, v, g, scale=None):
    """The float64 reference's output and its gradients in q, r, k, v for the output gradient g."""
    leaves = [x.double().requires_grad_() for x in (q, r, k, v)]
    out = reference_attention(*leaves, scale=scale)
    return out, torch.autograd.grad(out, leaves, g.double())


def run_and_compare(q, r, k, v, g, *, scale=None, configs=None, tri=None):
    """Errors of the output and of the four gradients against the float64 reference."""
    leaves = [x.clone().requires_grad_() for x in (q, r, k, v)]
    if configs is None:
        out = parallax_attention(*leaves, scale=scale, impl="triton")
    else:
        out = tri.parallax_attention_triton(*leaves, scale=scale, configs=configs)
    grads = torch.autograd.grad(out, leaves, g)
    ref, ref_grads = reference_grads(q, r, k, v, g, scale)
    for x in (out, *grads):
        assert not torch.isnan(x).any(), "NaN: an output element was not written (or the math broke)"
    floor = 1e-2 * max(t.abs().max().item() for t in ref_grads)  # dq, dr, dk are exactly 0 when T_k == 1
    names = ("o", "dq", "dr", "dk", "dv")
    return {n: rel_err(x, y, floor) for n, x, y in zip(names, (out, *grads), (ref, *ref_grads))}


TOL = {torch.float32: 1e-4, torch.float16: 5e-3}
CASES = [
    # dtype, B, T, H, H_kv, D, extra
    pytest.param(torch.float32, 1, 1, 2, 1, 16, {}, id="fp32-T1-gqa2"),
    pytest.param(torch.float32, 2, 7, 4, 2, 8, {}, id="fp32-T7-gqa2-d8"),
    pytest.param(torch.float32, 1, 33, 4, 1, 32, {}, id="fp32-T33-gqa4-d32"),
    pytest.param(torch.float32, 1, 70, 2, 2, 16, {"scale": 0.3}, id="fp32-T70-scale"),
    pytest.param(torch.float32, 1, 40, 2, 1, 64, {"r_scale": 8.0}, id="fp32-T40-d64-large-r"),
    pytest.param(torch.float32, 1, 20, 2, 2, 16, {"T_k": 45}, id="fp32-Tq20-Tk45"),
    pytest.param(torch.float16, 1, 33, 4, 2, 16, {}, id="fp16-T33-gqa2"),
    pytest.param(torch.float16, 2, 70, 4, 4, 8, {}, id="fp16-T70-d8"),
    pytest.param(torch.float16, 1, 17, 2, 1, 32, {"T_k": 29, "scale": 0.2}, id="fp16-Tq17-Tk29"),
    pytest.param(torch.float16, 1, 150, 4, 2, 16, {"r_scale": 4.0}, id="fp16-T150-gqa2-large-r"),
]


@pytest.mark.parametrize("dtype,B,T,H,H_kv,D,extra", CASES)
def test_matches_reference(tri, poisoned_empty, dtype, B, T, H, H_kv, D, extra):
    extra = dict(extra)
    scale = extra.pop("scale", None)
    (q, r, k, v), g = make_inputs(B, T, H, H_kv, D, dtype, **extra)
    errs = run_and_compare(q, r, k, v, g, scale=scale)
    assert max(errs.values()) < TOL[dtype], errs


def test_forced_tile_configs(tri, poisoned_empty):
    """Other tile shapes (BLOCK_M < BLOCK_N, several diagonal tiles) through the `configs` override."""
    (q, r, k, v), g = make_inputs(1, 50, 2, 1, 16, torch.float32, seed=1)
    configs = {"fwd": tri._cfg(16, 32, 4, 1), "dq": tri._cfg(16, 32, 4, 1), "dkv": tri._cfg(32, 16, 4, 1)}
    errs = run_and_compare(q, r, k, v, g, configs=configs, tri=tri)
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.parametrize("kind,index,saved_stats", [("dq", 3, False), ("dq", 3, True), ("dkv", 3, False)],
                         ids=["dq-recomputed", "dq-saved", "dkv"])  # the dk/dv kernel takes no row statistics
def test_the_gpu_tiles_of_small_head_dims_match_the_reference(tri, poisoned_empty, monkeypatch, kind, index,
                                                              saved_stats):
    """The GPU candidates with 128-key tiles at head_dim <= 32 (MAD's dim 8), their tile shapes run by the
    interpreter (which ignores warps and stages) at a ragged length; the dq kernel's with row statistics recomputed
    (fp16 inputs) and, as for bf16 inputs, taken from saved fp16 copies where a query tile's rows all see 64 keys."""
    if saved_stats:
        monkeypatch.setattr(tri, "stat_dtype", lambda dtype: torch.float16)
    (q, r, k, v), g = make_inputs(1, 200, 2, 1, 8, torch.float16, seed=14)
    configs = {kind: tri.GPU_CONFIGS[kind]["small"][index]}
    assert configs[kind].kwargs["BLOCK_N"] == 128
    errs = run_and_compare(q, r, k, v, g, configs=configs, tri=tri)
    assert max(errs.values()) < TOL[torch.float16], errs


def _forward_backward(tri, q, r, k, v, g, corrupt=None, stats=None):
    """(dq, dr, dk, dv) through `parallax_fwd` and `parallax_bwd`; `corrupt(o_stat, v_bar_stat)` edits the saved
    copies in between."""
    scale = q.shape[-1] ** -0.5
    o, lse2, u_bar, o_stat, v_bar_stat = tri.parallax_fwd(q, r, k, v, scale, stats=stats)
    if corrupt is not None:
        corrupt(o_stat, v_bar_stat)
    return tri.parallax_bwd(q, r, k, v, lse2, u_bar, o_stat, v_bar_stat, g, scale)


@pytest.mark.parametrize("T_q,T_k", [(100, 100), (40, 100)])
def test_row_stats_come_from_the_saved_copies_only_where_rows_see_enough_keys(tri, T_q, T_k):
    """With 32-row query tiles (the interpreter's config) the tiles whose first row sees fewer than STATS_MIN_KEYS
    keys recompute b and t, so garbage in their rows of the saved o and v_bar changes nothing; garbage in the other
    rows changes dq, so the backward does read the copies there."""
    (q, r, k, v), g = make_inputs(1, T_q, 2, 1, 16, torch.float32, T_k=T_k, seed=6)
    copies = dict(stats=torch.float32)  # fp32 inputs save none by default (`stat_dtype`)
    first_saved = next(m0 for m0 in range(0, T_q, 32) if m0 + (T_k - T_q) + 1 >= tri.STATS_MIN_KEYS)
    assert 0 < first_saved < T_q  # both kinds of tile are present

    def garbage(rows):
        def corrupt(o_stat, v_bar_stat):
            o_stat[:, rows] = 1e3
            v_bar_stat[:, rows] = -1e3
        return corrupt

    clean = _forward_backward(tri, q, r, k, v, g, **copies)
    for got, want in zip(_forward_backward(tri, q, r, k, v, g, garbage(slice(0, first_saved)), **copies), clean):
        assert torch.equal(got, want)
    dq = _forward_backward(tri, q, r, k, v, g, garbage(slice(first_saved, None)), **copies)[0]
    assert (dq[:, first_saved:] - clean[0][:, first_saved:]).abs().max() > 1.0


@pytest.mark.parametrize("v_scale,why", [(1e6, "beyond fp16's range"), (1e-8, "in fp16's subnormals")])
def test_row_stats_outside_fp16s_normal_range_are_recomputed(tri, v_scale, why):
    """fp16 copies of fp32 inputs (as bf16 inputs get them) whose values left fp16's range (inf) or lie below its
    smallest normal number: the backward recomputes b and t there and stays as accurate as fp32."""
    (q, r, k, v), g = make_inputs(1, 100, 2, 1, 16, torch.float32, seed=7)
    v = v * v_scale
    o_stat = tri.parallax_fwd(q, r, k, v, 0.25, stats=torch.float16)[3]
    largest = o_stat.float().abs().max().item()
    assert largest == float("inf") if v_scale > 1 else largest < 2.0**-14, why
    grads = _forward_backward(tri, q, r, k, v, g, stats=torch.float16)
    for name, got, want in zip(("dq", "dr", "dk", "dv"), grads, reference_grads(q, r, k, v, g)[1]):
        assert rel_err(got, want, 0.0) < TOL[torch.float32], name


def test_non_contiguous_inputs_are_accepted(tri):
    (q, r, k, v), _ = make_inputs(1, 9, 2, 2, 16, torch.float32, seed=2)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, H, T, D] memory
    assert not q_t.is_contiguous()
    out = parallax_attention(q_t, r, k, v, impl="triton")
    torch.testing.assert_close(out, reference_attention(q, r, k, v), rtol=1e-5, atol=1e-5)


def test_vmap_over_runs_folds_them_into_the_batch(tri, poisoned_empty):
    """torch.vmap (stacked training, mad/stacked_model.py) gives each slice what its own call gives, gradients too;
    k and v unbatched (in_dims None) are shared by every slice."""
    gen = torch.Generator().manual_seed(3)
    q, r = (torch.randn(2, 2, 13, 4, 16, generator=gen, requires_grad=True) for _ in range(2))
    k, v = (torch.randn(2, 13, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
    out = torch.vmap(tri.parallax_attention_triton, in_dims=(0, 0, None, None))(q, r, k, v)
    want = torch.stack([tri.parallax_attention_triton(q[i], r[i], k, v) for i in range(2)])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    g = torch.randn_like(out)
    for got, ref in zip(torch.autograd.grad(out, (q, r, k, v), g), torch.autograd.grad(want, (q, r, k, v), g)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_compiles_as_opaque_operators(tri):
    """torch.compile traces a call of the kernels as two custom operators (kernels/parallax/triton_ops.py) and gives
    what the eager call gives, gradients too (aot_eager: Dynamo and AOTAutograd without Inductor's code generation)."""
    (q, r, k, v), _ = make_inputs(2, 11, 4, 2, 16, torch.float32, seed=4)
    leaves = [x.clone().requires_grad_() for x in (q, r, k, v)]
    compiled = torch.compile(tri.parallax_attention_triton, backend="aot_eager", fullgraph=True)
    out = compiled(*leaves)
    want = tri.parallax_attention_triton(q, r, k, v)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    g = torch.randn_like(out)
    eager_leaves = [x.clone().requires_grad_() for x in (q, r, k, v)]
    eager_grads = torch.autograd.grad(tri.parallax_attention_triton(*eager_leaves), eager_leaves, g)
    for got, ref in zip(torch.autograd.grad(out, leaves, g), eager_grads):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_eager_calls_skip_the_custom_operators(tri, monkeypatch):
    """Outside torch.compile the kernels launch directly: the operators' dispatch would only add host time."""
    from kernels.parallax import triton_ops

    def refuse(*args):
        raise AssertionError("an eager call went through the custom operator")

    monkeypatch.setattr(triton_ops, "triton_fwd", refuse)
    monkeypatch.setattr(triton_ops, "triton_bwd", refuse)
    (q, r, k, v), _ = make_inputs(1, 7, 2, 2, 16, torch.float32, seed=5)
    leaves = [x.clone().requires_grad_() for x in (q, r, k, v)]
    out = tri.parallax_attention_triton(*leaves)
    torch.autograd.grad(out, leaves, torch.ones_like(out))
    torch.testing.assert_close(out, reference_attention(q, r, k, v), rtol=1e-5, atol=1e-5)


def test_auto_uses_the_reference_on_cpu(tri):
    (q, r, k, v), _ = make_inputs(1, 5, 2, 2, 8, torch.float32)
    assert torch.equal(parallax_attention(q, r, k, v), reference_attention(q, r, k, v))
    assert torch.equal(parallax_attention(q, r, k, v, impl="auto"), reference_attention(q, r, k, v))


def _qrkv(dtype=torch.float32, D=16, Dv=None, T=5):
    q, r, k = (torch.randn(1, T, 2, D, dtype=dtype) for _ in range(3))
    v = torch.randn(1, T, 2, D if Dv is None else Dv, dtype=dtype)
    return q, r, k, v


@pytest.mark.parametrize(
    "make,kwargs,match",
    [
        (lambda: _qrkv(), {"causal": False}, "causal only"),
        (lambda: _qrkv(torch.float64), {}, "dtypes"),
        (lambda: _qrkv(torch.bfloat16), {}, "bfloat16 is not supported under TRITON_INTERPRET"),
        (lambda: _qrkv(D=24), {}, "head_dim in"),
        (lambda: _qrkv(Dv=8), {}, "value head_dim"),
        (lambda: _qrkv()[:3] + (torch.randn(1, 5, 3, 16),), {}, "agree in batch, seq and heads"),
        (lambda: (torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 8), *_qrkv()[2:]), {}, "shape of q"),
        (lambda: _qrkv(), {"impl": "cuda"}, "impl must be one of"),
    ],
)
def test_bad_inputs_raise_value_error(tri, make, kwargs, match):
    kwargs = {"impl": "triton", **kwargs}
    with pytest.raises(ValueError, match=match):
        parallax_attention(*make(), **kwargs)


def test_cpu_tensors_need_the_interpreter(tri, monkeypatch):
    monkeypatch.setattr(tri, "INTERPRET", False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        parallax_attention(*_qrkv(), impl="triton")


def _script(*args: str, interpret: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return run_script(args[0], args[1:], cwd=REPO, env=env, timeout=timeout)


@pytest.mark.parametrize("script", ["benchmarks/check_parallax_triton.py", "benchmarks/bench_parallax_train.py",
                                    "benchmarks/bench_throughput.py"])
def test_gpu_scripts_parse_args(script):
    proc = _script(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout


def test_check_script_cpu_smoke(tmp_path):
    proc = _script("benchmarks/check_parallax_triton.py", "--cpu-smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (tmp_path / "parallax_triton_check.md").read_text()
    assert "| all |" in report and "FAIL" not in report


def test_row_stats_emulation_script_cpu_smoke(tmp_path):
    proc = _script("benchmarks/emulate_row_stats.py", "--seeds", "1", "--lengths", "2", "64", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (tmp_path / "parallax_row_stats_emulation.md").read_text().splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in table}
    assert rows["recomputed"].endswith("| 0 of 60 |")  # the kernel's choice stays within the check's tolerance
    assert "saved bf16" in rows and "saved fp16, first tile recomputed" in rows


def test_forward_tuning_script_cpu_smoke(tmp_path):
    proc = _script("benchmarks/tune_parallax_fwd.py", "--cpu-smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (tmp_path / "parallax_fwd_tune.md").read_text()
    assert "| ours fp16 |" in report and "| ours choose |" in report and "Error" not in report


def test_fp16_dots_only_where_values_fit_fp16(tri):
    """The forward's one-dot fp16 path is chosen per (sequence, KV head) only where V and the probe scores fit."""
    (q, r, k, v), _ = make_inputs(4, 9, 4, 2, 16, torch.float32)
    v[1] *= 1e6  # beyond fp16's range
    v[2] *= 1e-4  # into fp16's subnormals
    r[3, :, 3] *= 3000.0  # one query head's probe scores beyond fp16's range: its whole KV head (1 of 2) splits
    expected = torch.tensor([[True, True], [False, False], [False, False], [True, False]])
    assert torch.equal(tri.fp16_pv_ok(r, k, v), expected)
    assert torch.equal(tri.fp16_pv_ok(r[:, :5], k, v), expected)  # fewer queries than keys


def test_range_parts_are_the_maxima_over_every_slice(tri):
    """The partial maxima the fp16 choice is made from cover every token row once, at lengths around the slices."""
    for T in (1, 31, 33, 200):
        (q, r, k, v), _ = make_inputs(2, T, 6, 2, 8, torch.float32, seed=T)
        parts = tri.range_parts(r, k, v).amax(1).view(2, 2, 3)
        torch.testing.assert_close(parts[..., 0], v.abs().amax(dim=(1, 3)))
        torch.testing.assert_close(parts[..., 1], k.pow(2).sum(3).amax(1))
        torch.testing.assert_close(parts[..., 2], r.pow(2).sum(3).amax(1).view(2, 2, 3).amax(2))


def test_pv_mode_by_dtype_and_length(tri):
    """fp32: plain dots; fp16: one fp16 dot; bf16: split below FP16_CHECK_MIN_LEN tokens, chosen per program above."""
    n = tri.FP16_CHECK_MIN_LEN
    assert tri.pv_mode(torch.float32, n, n) == tri.PV_PLAIN.value
    assert tri.pv_mode(torch.float16, 5, 5) == tri.PV_FP16.value
    assert tri.pv_mode(torch.bfloat16, n - 1, n - 1) == tri.PV_SPLIT.value
    assert tri.pv_mode(torch.bfloat16, 1, n) == tri.pv_mode(torch.bfloat16, n, n) == tri.PV_CHOOSE.value


def test_fp16_and_split_paths_in_one_launch(tri, poisoned_empty):
    """PV_CHOOSE (bf16 inputs' mode, run here in fp16: the interpreter is wrong in bf16) with sequences on the fp16
    path and on the split path side by side, each matching the reference on its own."""
    (q, r, k, v), g = make_inputs(2, 37, 2, 1, 16, torch.float16, seed=3)
    v[1] *= 2e-3  # below the fp16 path's range: sequence 1 takes the split path
    assert tri.fp16_pv_ok(r, k, v).flatten().tolist() == [True, False]
    out = tri.parallax_fwd(q, r, k, v, 16**-0.5, pv=tri.PV_CHOOSE.value)[0]
    ref = reference_attention(q.double(), r.double(), k.double(), v.double())
    for b in range(2):
        assert not torch.isnan(out[b]).any()
        assert rel_err(out[b], ref[b], 0.0) < TOL[torch.float16], b


def test_choose_streams_an_fp16_copy_of_v_on_its_fp16_path(tri, monkeypatch):
    """PV_CHOOSE's fp16 sweep reads the fp16 copy of V made before the launch, its split sweep V itself: with the copy
    poisoned (negated), only the fp16 sequence's output changes, to the reference's output for -V."""
    (q, r, k, v), _ = make_inputs(2, 37, 2, 1, 16, torch.float32, seed=4)
    v[1] *= 2e-3  # below the fp16 path's range: sequence 1 takes the split path
    assert tri.fp16_pv_ok(r, k, v).flatten().tolist() == [True, False]
    monkeypatch.setattr(tri, "fp16_copy", lambda x: (-x).to(torch.float16))
    out = tri.parallax_fwd(q, r, k, v, 16**-0.5, pv=tri.PV_CHOOSE.value)[0]
    ref = reference_attention(q.double(), r.double(), k.double(), v.double())
    assert rel_err(out[0], -ref[0], 0.0) < TOL[torch.float16]  # o is linear in V
    assert rel_err(out[1], ref[1], 0.0) < TOL[torch.float32]


def test_register_report_builds_for_sm90_on_the_cpu(tmp_path):
    """benchmarks/kernel_registers.py compiles a kernel for the H200 here (Triton's ptxas, no GPU) and reports it."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not ((tools / "ptxas").exists() and (tools / "nvdisasm").exists()):
        pytest.skip(f"this Triton build ships no ptxas and nvdisasm in {tools}, which the report needs")
    proc = _script("benchmarks/kernel_registers.py", "--kinds", "dq", "--head-dims", "8", "--tiles", "64x32x4x2",
                   "--out", str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in (tmp_path / "parallax_train_registers.md").read_text().splitlines()
            if line.startswith("| dq |")]  # fmt: skip
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    registers, stores, loads, _, wgmma, waits = (int(cell) for cell in cells[4:10])
    assert 0 < registers <= 255 and stores >= 0 and loads >= 0 and 0 <= waits <= wgmma and cells[10] in ("yes", "no")


def test_the_long_sequence_forward_keeps_its_wgmma_in_flight(tmp_path):
    """Built for the H200, the bf16 forward at L >= FP16_CHECK_MIN_LEN (both sweeps of PV_CHOOSE in one kernel) is
    not serialized by ptxas: with its full key tiles before the diagonal ones, or its sweeps inside a branch, every
    tensor-core op waited for the one before (80 waits for 80 wgmma at D = 64, 128x64 tiles)."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not ((tools / "ptxas").exists() and (tools / "nvdisasm").exists()):
        pytest.skip(f"this Triton build ships no ptxas and nvdisasm in {tools}, which the build report needs")
    code = """
from benchmarks.kernel_registers import build, our_launches
from kernels.parallax.triton import PV_CHOOSE
((_, _, fn, args),) = [l for l in our_launches(64) if l[0] == "fwd" and l[3]["PV"] == PV_CHOOSE.value]
given = {p.name: args[p.name] for p in fn.params if p.is_constexpr and p.name in args}
res = build(fn, args, given | {"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
print(res.serialized, res.wgmma, res.wgmma_waits)
"""
    (tmp_path / "fwd_build.py").write_text(code)
    proc = _script(str(tmp_path / "fwd_build.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    serialized, wgmma, waits = proc.stdout.split()[-3:]
    assert serialized == "False" and int(waits) < int(wgmma) / 2, proc.stdout


def test_register_report_refuses_a_malformed_tile():
    proc = _script("benchmarks/kernel_registers.py", "--tiles", "64x48x4x2")
    assert proc.returncode == 2 and "blocks must be 16-256 (powers of two)" in proc.stderr


def test_register_report_specializes_arguments_as_a_launch_does(tmp_path):
    """Aligned pointers and integers divisible by 16 carry Triton's divisibility mark, integers equal to 1 become
    constants, and `do_not_specialize` arguments stay plain: else the report describes a different binary."""
    code = """
import triton, triton.language as tl
import torch
from benchmarks.kernel_registers import our_launches, specialize

((_, _, fn, args),) = [launch for launch in our_launches(64) if launch[0] == "dq"]
signature, constants, attrs = specialize(fn, args, {"HEAD_DIM": 64, "BLOCK_D": 64, "PREC": "tf32",
                                                    "BLOCK_M": 64, "BLOCK_N": 32})
index = {name: i for i, name in enumerate(fn.arg_names)}
assert signature["Q"] == "*bf16" and attrs[(index["Q"],)] == [["tt.divisibility", 16]]
assert signature["T_q"] == "i32" and (index["T_q"],) not in attrs  # do_not_specialize
assert signature["HEAD_DIM"] == "constexpr" and constants["HEAD_DIM"] == 64

@triton.jit
def k(x, n, one):
    pass

signature, constants, attrs = specialize(k, {"x": torch.empty(16, dtype=torch.bfloat16), "n": 32, "one": 1}, {})
assert attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
assert signature["one"] == "constexpr" and constants["one"] == 1
print("ok")
"""
    (tmp_path / "specialize_check.py").write_text(code)  # triton.jit needs its kernel in a file
    proc = _script(str(tmp_path / "specialize_check.py"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_saved_row_stats_stay_accurate_for_values_with_a_large_offset(tri):
    """fp16 copies (as bf16 inputs get them) of fp32 inputs whose values share a large offset: the copies hold o and
    v_bar less the value at the first key, so they round at the scale of the values' spread, not of the offset, and the
    gradients stay within fp16's rounding of the float64 reference (without the shift: dq 1.4e-2, dr 1.1e-2)."""
    (q, r, k, v), g = make_inputs(1, 200, 2, 1, 16, torch.float32, seed=8)
    v = v + 50.0
    grads = _forward_backward(tri, q, r, k, v, g, stats=torch.float16)
    for name, got, want in zip(("dq", "dr", "dk", "dv"), grads, reference_grads(q, r, k, v, g)[1]):
        assert rel_err(got, want, 0.0) < 1e-3, name


def test_saved_row_stats_everywhere_match_the_reference(tri, poisoned_empty, monkeypatch):
    """With STATS_MIN_KEYS = 1 every query tile, the diagonal and ragged ones included, takes b and t from the
    saved copies (fp32 here, as accurate as recomputing): GQA, head_dim 8 padded to 16, T_q < T_k."""
    monkeypatch.setattr(tri, "STATS_MIN_KEYS", 1)
    monkeypatch.setattr(tri, "stat_dtype", lambda dtype: torch.float32)
    (q, r, k, v), g = make_inputs(2, 37, 4, 2, 8, torch.float32, T_k=50, seed=9)
    errs = run_and_compare(q, r, k, v, g)
    assert max(errs.values()) < TOL[torch.float32], errs


def test_a_forward_without_backward_saves_no_copies(tri, monkeypatch):
    """Under no_grad (or with no input needing a gradient) the forward skips the row statistics' copies and gives
    the output the training path gives."""
    (q, r, k, v), _ = make_inputs(1, 40, 2, 1, 16, torch.float32, seed=10)
    calls = []
    forward = tri.parallax_fwd
    monkeypatch.setattr(tri, "parallax_fwd",
                        lambda *a, **kw: calls.append(kw.get("save_stats", True)) or forward(*a, **kw))  # fmt: skip
    with torch.no_grad():
        out = tri.parallax_attention_triton(q, r, k, v)
    plain = tri.parallax_attention_triton(q, r, k, v)  # no input requires grad
    trained = tri.parallax_attention_triton(*(x.clone().requires_grad_() for x in (q, r, k, v)))
    assert calls == [False, False, True]
    assert torch.equal(out, trained.detach()) and torch.equal(plain, out)
    assert [x.numel() for x in tri.parallax_fwd(q, r, k, v, 0.25, stats=torch.float32, save_stats=False)[3:]] == [0, 0]


def test_backward_gets_no_zero_filled_gradients_of_the_saved_state(tri, monkeypatch):
    """Autograd hands backward no zeros for the state outputs (lse2, u_bar and the copies): materialized, the two
    [B, T, H, D] copies took peak memory from 0.86x to 1.52x cuDNN softmax's at 16k on the H200."""
    (q, r, k, v), g = make_inputs(1, 40, 2, 1, 16, torch.float32, seed=12)
    seen = []
    backward = tri.ParallaxTritonFunction.backward
    monkeypatch.setattr(tri.ParallaxTritonFunction, "backward",
                        staticmethod(lambda ctx, grad_o, *state: seen.append(state) or backward(ctx, grad_o, *state)))
    inputs = [x.clone().requires_grad_() for x in (q, r, k, v)]
    grads = torch.autograd.grad(tri.parallax_attention_triton(*inputs), inputs, g)
    assert seen == [(None, None, None, None)]
    assert all(torch.isfinite(x).all() for x in grads)


def test_row_stats_copies_are_fp16_or_fp32(tri):
    """bf16 inputs save fp16 copies; fp16 and fp32 inputs none (their backward recomputes, `stat_dtype`)."""
    assert [tri.stat_dtype(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == [torch.float16, None, None]
    (q, r, k, v), _ = make_inputs(1, 4, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="stats must be torch.float16 or torch.float32"):
        tri.parallax_fwd(q, r, k, v, 0.25, stats=torch.bfloat16)


def test_custom_operators_pass_opcheck_in_fp16(tri):
    """The fake (shape-only) implementations torch.compile traces agree with the kernels, the empty placeholders
    that fp16 inputs get instead of copies included (torch.library.opcheck)."""
    from kernels.parallax import triton_ops

    (q, r, k, v), g = make_inputs(1, 9, 2, 1, 16, torch.float16, seed=11)
    torch.library.opcheck(triton_ops.triton_fwd, (q, r, k, v, 0.25), test_utils=("test_schema", "test_faketensor"))
    state = tri.parallax_fwd(q, r, k, v, 0.25)[1:]
    torch.library.opcheck(triton_ops.triton_bwd, (q, r, k, v, *state, g, 0.25),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


class _NewStorages(TorchDispatchMode):
    """Bytes of every storage the torch ops run under it return that was not there before (by data pointer: one
    placed where a freed one was is missed, so it can undercount, never overcount)."""

    def __init__(self, existing):
        super().__init__()
        self.seen = {t.untyped_storage().data_ptr() for t in existing}
        self.nbytes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                self.seen.add(t.untyped_storage().data_ptr())
                self.nbytes.append(t.untyped_storage().nbytes())
        return out


def _forward_backward_allocations(tri, T):
    """(largest, total) bytes of the storages one forward+backward creates at length T, saved copies on."""
    (q, r, k, v), g = make_inputs(1, T, 2, 1, 16, torch.float16, seed=13)
    inputs = [x.clone().requires_grad_() for x in (q, r, k, v)]
    with _NewStorages([*inputs, g]) as new:
        torch.autograd.grad(tri.parallax_attention_triton(*inputs), inputs, g)
    return max(new.nbytes), sum(new.nbytes)


def test_forward_backward_memory_grows_linearly_in_length(tri, monkeypatch):
    """No L x L buffer: from T = 64 to 256 the largest storage forward+backward creates and their total grow 4x
    (an fp32 [T, T] score tile per head would grow 16x and, at 256 keys, outweigh every [T, H, D] tensor 8x).
    Triton kernels allocate nothing themselves; the host wrappers' torch ops are what is counted."""
    monkeypatch.setattr(tri, "stat_dtype", lambda dtype: torch.float16)  # the bf16 path: the two copies too
    (big_64, total_64), (big_256, total_256) = (_forward_backward_allocations(tri, T) for T in (64, 256))
    assert big_256 <= 4 * big_64 and total_256 <= 4.2 * total_64, (big_64, total_64, big_256, total_256)
    assert big_256 <= 256 * 2 * 16 * 4  # one fp32 [T, H, D] tensor
