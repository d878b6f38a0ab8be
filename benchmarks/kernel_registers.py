"""Registers, spills and shared memory of our Parallax training kernels as the H200 would run them, measured on any
machine: Triton compiles each kernel at each config its autotuner may pick (`candidate_configs`, bf16 inputs) for
sm_90a, and ptxas (shipped with Triton) reports what it allocated. No GPU is needed, so a kernel change can be judged
on the CPU machine before device time is spent: a tile that spills to local memory runs slower whatever else it does.
Each kernel is built with the arguments our host wrappers pass it for bf16 inputs at B=1, H=16 (L=1024 for the split
forward, L=16384 for the rest), recorded, not run (`recorded_launches`), and specialized as a launch would
(`specialize`): without the alignment marks a launch adds, Triton neither vectorizes nor pipelines the loads, and the
registers and spills it reports are those of a different binary.

    python benchmarks/kernel_registers.py --out analysis/kernels            # writes parallax_train_registers.md
    python benchmarks/kernel_registers.py --head-dims 128 --kinds fwd       # a subset, printed only
    python benchmarks/kernel_registers.py --kinds dkv --tiles 32x128x8x3 64x64x4x2   # other tiles than the candidates

`--official DIR` adds the official Parallax kernels (`parallax.triton.parallax_train`'s forward, dq/dr and dk/dv
kernels from the parallax-kernel wheel unpacked in DIR) at its own tile configs, for comparison, each built with the
arguments its host wrappers pass (recorded, not run). The PTX comes from the Triton here,
which may differ from the device's (the header names both versions where known).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402 (how a launch specializes its arguments)
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels.parallax.triton as ours  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
KERNELS = {"fwd": "_fwd_kernel", "dq": "_bwd_dq_kernel", "dkv": "_bwd_dkv_kernel"}
SEQ = 16384  # the sequence length of the recorded launches (the split forward: SHORT_SEQ, where bf16 takes it)
SHORT_SEQ = 1024
PV_NAMES = {ours.PV_PLAIN.value: "plain", ours.PV_FP16.value: "fp16", ours.PV_SPLIT.value: "split",
            ours.PV_CHOOSE.value: "choose"}  # fmt: skip


@dataclass
class Resources:
    """What one sm_90a binary uses: per-thread registers and spill bytes (ptxas), whether ptxas serialized its wgmma
    instructions (its C7515 note), shared memory bytes (Triton), and its wgmma (HGMMA) instructions with the waits
    among them (WARPGROUP.DEPBAR, from nvdisasm)."""

    registers: int
    spill_stores: int
    spill_loads: int
    serialized: bool
    shared: int
    wgmma: int
    wgmma_waits: int


@dataclass
class Build:
    kernel: str
    head_dim: int
    mode: str
    config: str
    res: Resources
    seconds: float


def nvidia_tool(name: str) -> str:
    """Path of a CUDA tool that Triton ships (ptxas, nvdisasm)."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise SystemExit(f"error: no {name} at {path}; this Triton build does not ship one")
    return str(path)


def wgmma_counts(cubin: bytes) -> tuple[int, int]:
    """(wgmma instructions, waits for them) in the SASS of `cubin`. As many waits as wgmmas: each tensor-core op
    waits for the one before it to finish, and none overlaps other work."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([nvidia_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True)
    return sass.stdout.count("HGMMA"), sass.stdout.count("WARPGROUP.DEPBAR")


def resources(ptx: str) -> tuple[int, int, int, bool]:
    """(registers, spill-store bytes, spill-load bytes, wgmma serialized) that `ptxas -v` reports for sm_90a. ptxas
    serializes every wgmma of a kernel (each waits for the one before) when it finds one it cannot keep in flight
    safely, and says so in a note numbered C7515, with the reason."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([nvidia_tool("ptxas"), "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True)  # fmt: skip
    report = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {report[-500:]}")
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2)), "C7515" in report


def specialize(fn, args: dict[str, object], constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) of `fn` launched with `args` and `constexprs`, as a launch derives them:
    16-byte-aligned pointers and integers divisible by 16 are marked so, integers equal to 1 become constants, except
    where the kernel says `do_not_specialize`."""
    signature, constants, attrs = {}, dict(constexprs), {}
    for param in fn.params:
        name = param.name
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind, desc = native_specialize_impl(BaseBackend, args[name], False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)  # fmt: skip
        signature[name] = kind
        if kind == "constexpr":
            constants[name] = desc
        elif desc:
            attrs[(param.num,)] = BaseBackend.parse_attr(desc)
    return signature, constants, attrs


def build(fn, args: dict[str, object], constexprs: dict, num_warps: int, num_stages: int) -> Resources:
    """Compile `fn` (a JITFunction) for sm_90a as a launch with `args` would, and measure the binary."""
    signature, constants, attrs = specialize(fn, args, constexprs)
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs), target=TARGET,
                              options={"num_warps": num_warps, "num_stages": num_stages})  # fmt: skip
    return Resources(*resources(compiled.asm["ptx"]), compiled.metadata.shared, *wgmma_counts(compiled.asm["cubin"]))


def jit_function(kernel):
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def parse_tile(text: str) -> triton.Config:
    """BLOCK_MxBLOCK_NxWARPSxSTAGES, e.g. 64x32x4x2 (the kernels' BLOCK_M and BLOCK_N, as in `candidate_configs`)."""
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"tile {text!r}: expected BLOCK_MxBLOCK_NxWARPSxSTAGES, e.g. 64x32x4x2")
    block_m, block_n, warps, stages = map(int, parts)
    if any(b not in (16, 32, 64, 128, 256) for b in (block_m, block_n)) or warps not in (1, 2, 4, 8) or stages < 1:
        raise argparse.ArgumentTypeError(f"tile {text!r}: blocks must be 16-256 (powers of two), warps 1-8, stages >= 1")
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


@contextlib.contextmanager
def recorded_launches():
    """Within the block every Triton launch is recorded instead of run: yields a list that receives
    (JITFunction, {argument name: value}) per launch, so a host wrapper shows what it would pass its kernels."""
    calls = []

    def record(self, *args, grid, warmup, **kwargs):
        fn = jit_function(self)
        calls.append((fn, dict(zip(fn.arg_names, args)) | kwargs))

    saved = triton.runtime.jit.JITFunction.run, triton.runtime.Autotuner.run
    triton.runtime.jit.JITFunction.run = triton.runtime.Autotuner.run = record
    try:
        yield calls
    finally:
        triton.runtime.jit.JITFunction.run, triton.runtime.Autotuner.run = saved


def our_launches(head_dim: int) -> list[tuple[str, str, object, dict]]:
    """(kind, mode, JITFunction, arguments) of each of our training kernels as `parallax_fwd` and `parallax_bwd`
    launch them for bf16 inputs [B, L, H, D] = [1, L, 16, head_dim]: the forward at SHORT_SEQ and at SEQ, the
    backward at SEQ. Empty CPU tensors stand in for the device buffers, and no kernel runs."""
    inputs = lambda seq: [torch.empty(1, seq, 16, head_dim, dtype=torch.bfloat16) for _ in range(4)]  # noqa: E731
    scale = head_dim**-0.5
    with recorded_launches() as calls:
        ours.parallax_fwd(*inputs(SHORT_SEQ), scale)
        q, r, k, v = inputs(SEQ)
        _, *state = ours.parallax_fwd(q, r, k, v, scale)
        ours.parallax_bwd(q, r, k, v, *state, torch.empty_like(q), scale)
    kinds = {name: kind for kind, name in KERNELS.items()}
    return [(kinds[fn.__name__], f"{PV_NAMES[args['PV']]} (L = {args['T_q']})" if "PV" in args else "-", fn, args)
            for fn, args in calls if fn.__name__ in kinds]  # fmt: skip


def our_builds(kinds: list[str], head_dims: list[int], tiles: list[triton.Config] | None = None) -> list[Build]:
    """Every recorded launch of the chosen kernel kinds x head dim x config (`tiles`, else the autotuner's
    candidates)."""
    rows, launches = [], {head_dim: our_launches(head_dim) for head_dim in head_dims}
    for kind in kinds:
        for head_dim in head_dims:
            for config in tiles or ours.candidate_configs(kind, head_dim, torch.bfloat16):
                for _, mode, fn, args in [launch for launch in launches[head_dim] if launch[0] == kind]:
                    given = {p.name: args[p.name] for p in fn.params if p.is_constexpr and p.name in args}
                    start = time.time()
                    res = build(fn, args, given | config.kwargs, config.num_warps, config.num_stages)
                    rows.append(Build(kind, head_dim, mode, _label(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"],
                                      config.num_warps, config.num_stages), res, time.time() - start))  # fmt: skip
                    print(_row(rows[-1]), flush=True)
    return rows


# Official tiles (its autotuners' 36 configs include these): the 64x64 forward tile the tuning table found fastest
# at L=16k, D=128 (analysis/kernels/parallax_fwd_tune.md), and tiles ours uses.
OFFICIAL_TILES = [(64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 3), (128, 64, 8, 3)]


# The official kernels that do the work (its backward's preprocess kernel is elementwise), as this table names them.
OFFICIAL_KERNELS = {"_fwd_kernel": "official fwd", "_bwd_rq_kernel": "official dq, dr", "_bwd_kv_kernel": "official dk, dv"}


def official_launches(parallax_train, head_dim: int) -> list[tuple[str, object, dict]]:
    """(label, JITFunction, arguments) of each official kernel as its forward and backward wrappers launch it for
    contiguous bf16 (B * H, L, D) = (2, SEQ, head_dim) inputs: empty CPU tensors stand in for the device buffers,
    and no kernel runs."""
    x = lambda: torch.empty(2, SEQ, head_dim, dtype=torch.bfloat16)  # noqa: E731
    q, r, k, v = x(), x(), x(), x()
    with recorded_launches() as calls:
        o, barv, d1, bart, m = parallax_train.parallax_fwd(q, r, k, v, head_dim**-0.5)
        parallax_train.parallax_bwd(q, r, k, v, o, barv, d1, bart, m, x(), head_dim**-0.5)
    return [(OFFICIAL_KERNELS[fn.__name__], fn, args) for fn, args in calls if fn.__name__ in OFFICIAL_KERNELS]


def official_builds(folder: Path, head_dims: list[int]) -> list[Build]:
    sys.path.insert(0, str(folder))
    from parallax.triton import parallax_train  # noqa: PLC0415 (optional peer, imported on request)

    rows = []
    for head_dim in head_dims:
        for label, fn, args in official_launches(parallax_train, head_dim):
            given = {p.name: args[p.name] for p in fn.params if p.is_constexpr and p.name in args}
            for block_m, block_n, warps, stages in OFFICIAL_TILES:
                constexprs = given | {"ROW_TILE_SIZE": block_m, "COL_TILE_SIZE": block_n}
                start = time.time()
                res = build(fn, args, constexprs, warps, stages)
                rows.append(Build(label, head_dim, "bf16 dots", _label(block_m, block_n, warps, stages), res,
                                  time.time() - start))  # fmt: skip
                print(_row(rows[-1]), flush=True)
    return rows


def _label(block_m: int, block_n: int, warps: int, stages: int) -> str:
    return f"{block_m}x{block_n}, {warps}w, {stages}s"


def _row(b: Build) -> str:
    r = b.res
    return (f"| {b.kernel} | {b.head_dim} | {b.mode} | {b.config} | {r.registers} | {r.spill_stores} | "
            f"{r.spill_loads} | {r.shared} | {r.wgmma} | {r.wgmma_waits} | {'yes' if r.serialized else 'no'} |")  # fmt: skip


def official_version(folder: Path | None) -> str | None:
    """The parallax-kernel version of the wheel unpacked in `folder` (its dist-info folder's name)."""
    if folder is None:
        return None
    infos = sorted(folder.glob("parallax_kernel-*.dist-info"))
    return infos[0].name.removeprefix("parallax_kernel-").removesuffix(".dist-info") if infos else "unknown version"


def markdown(rows: list[Build], command: str, seconds: float, official: str | None) -> str:
    ptxas = subprocess.run([nvidia_tool("ptxas"), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return "\n".join([
        "# Parallax training kernels: registers, spills and tensor-core waits as built for the H200 (sm_90a)", "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- built on: {os.uname().machine} CPU, no GPU; triton {triton.__version__}, torch {torch.__version__}, "
        f"ptxas {ptxas}" + (f"; official kernels from parallax-kernel {official}" if official else ""),
        f"- command: `{command}`",
        f"- wall time: {seconds:.0f} s",
        "- method: Triton compiles each kernel at each config (`candidate_configs`' for bf16 inputs unless the "
        "command names tiles) to PTX for sm_90a, with the arguments our host wrappers (and the official ones) pass "
        f"it for bf16 inputs at B=1, H=16 (our forward at L={SHORT_SEQ} and L={SEQ}, the rest at L={SEQ}; recorded, "
        "not run), specialized (alignment marks, constants) as a launch would; `ptxas -v` reports registers per thread (255 is the "
        "most a thread can have) and the bytes each thread spills to local memory; shared memory from Triton's "
        "metadata; wgmma: the HGMMA instructions in the binary, waits: the WARPGROUP.DEPBAR among them (nvdisasm). "
        "As many waits as wgmmas means every tensor-core op waits for the one before it: none is overlapped with "
        "another or with the softmax arithmetic; serialized: ptxas's note C7515 says it serialized them (the reason "
        "it gives for our forward, before its loops ran the diagonal tiles first: accumulator registers defined by "
        "non-wgmma instructions within a pipeline stage). The device's Triton may build differently from this one.",
        "",
        "| kernel | D | P V mode | tile, warps, stages | registers | spill stores (B) | spill loads (B) | "
        "shared memory (B) | wgmma | waits | serialized |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *[_row(b) for b in rows], ""])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for parallax_train_registers.md (else print only)")
    p.add_argument("--kinds", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--head-dims", nargs="+", type=int, default=[8, 64, 128], choices=[8, 16, 32, 64, 128])
    p.add_argument("--tiles", nargs="+", type=parse_tile, metavar="MxNxWxS",
                   help="build these configs instead of the autotuner's candidates, e.g. 64x64x4x2")
    p.add_argument("--official", type=Path, help="folder holding the unpacked parallax-kernel wheel")
    args = p.parse_args(argv)
    if args.official is not None and not (args.official / "parallax" / "triton" / "parallax_train.py").exists():
        p.error(f"--official {args.official}: no parallax/triton/parallax_train.py there (unzip the wheel into it)")
    nvidia_tool("ptxas"), nvidia_tool("nvdisasm")
    start = time.time()
    rows = our_builds(args.kinds, args.head_dims, args.tiles)
    if args.official is not None:
        rows += official_builds(args.official, [d for d in args.head_dims if d >= 16])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/kernel_registers.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = args.out / "parallax_train_registers.md"
        path.write_text(markdown(rows, command, time.time() - start, official_version(args.official)))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
