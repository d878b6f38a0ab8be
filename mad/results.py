"""One run, one record: `result.json` in the run directory, written atomically (write, fsync, rename)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import torch

RECORD_NAME = "result.json"
WEIGHTS_NAME = "model.pt"
SCHEMA_VERSION = 1
STATUSES = ("ok", "diverged", "failed")
_PACKAGES = ("torch", "numpy", "hydra-core", "omegaconf", "pandas", "triton", "fla-core")


def write_json_atomically(path: Path, payload: dict) -> None:
    """Readers see either the old file or the complete new one, never a partial write (also under kill -9)."""
    write_bytes_atomically(path, json.dumps(payload, indent=2, allow_nan=True).encode())


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """As write_json_atomically, for any file's bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path: Path) -> dict:
    """Load a run record; ValueError if it is not a complete record of a known schema."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON record ({e})") from e
    problem = record_problem(record)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return record


def record_problem(record: object) -> str | None:
    """Why a parsed JSON value is not a run record of the current schema with a known status, or None."""
    if not isinstance(record, dict) or record.get("schema") != SCHEMA_VERSION:
        return f"not a run record of schema {SCHEMA_VERSION}"
    if record.get("status") not in STATUSES:
        return f"status {record.get('status')!r} is not one of {', '.join(STATUSES)}"
    return None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def git_revision(cwd: Path) -> str | None:
    """The commit of the checkout the run was launched from, '+dirty' when it has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=cwd, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
