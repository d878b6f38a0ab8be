import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Triton decides at its first import whether kernels are interpreted, and some test modules import it at collection
# (directly or through fla). Without a GPU the interpreter is the only way to run our kernels, so switch it on for
# the whole session before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def run_cli(args: list[str], cwd: Path, module: str = "mad.run", timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>` from `cwd` (so runs/ and the data cache land there)."""
    env = os.environ | {"PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "2"}
    env.pop("MAD_DATA_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def records_under(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("result.json"))]


@pytest.fixture
def cli(tmp_path):
    return lambda args, **kw: run_cli(args, tmp_path, **kw)
