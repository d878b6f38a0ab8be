import json
import os
from pathlib import Path

import pytest
import torch

from tests import forked_python
from tests.forked_python import run_cli

REPO = Path(__file__).resolve().parents[1]

# Triton decides at its first import whether kernels are interpreted, and some test modules import it at collection
# (directly or through fla). Without a GPU the interpreter is the only way to run our kernels, so switch it on for
# the whole session before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def records_under(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("result.json"))]


@pytest.fixture
def cli(tmp_path):
    return lambda args, **kw: run_cli(args, tmp_path, **kw)


@pytest.fixture(scope="session", autouse=True)
def fork_servers(tmp_path_factory):
    """The fork servers of run_cli and run_script (tests/forked_python.py) keep their files under pytest's basetemp
    and are closed at the end of the session."""
    forked_python.TEMP_ROOT = tmp_path_factory.mktemp("fork-servers")
    yield
    forked_python.close_all()
