"""Where a run trains: the CPU, the only GPU, or a GPU slot leased among concurrent runs on a multi-GPU host.

Concurrent runs of a sweep (joblib workers, submitit jobs on one node) each lease one slot with an exclusive
`flock` on a file `gpu<i>-slot<s>.lock` in a host-wide directory; slots are handed out GPU-major (every GPU's
first slot before any second slot), so the runs spread over the GPUs. The OS releases a lock when its process
dies, so a killed run never strands a GPU.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class SlotLease:
    device_index: int
    slot: int
    fd: int  # keep open while training; closing it releases the slot

    def release(self) -> None:
        os.close(self.fd)


def try_lease(num_devices: int, slots_per_device: int, lock_dir: Path) -> SlotLease | None:
    """Lease the first free (slot, device) in GPU-major order, or None when all are taken."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for slot in range(slots_per_device):
        for device in range(num_devices):
            fd = os.open(lock_dir / f"gpu{device}-slot{slot}.lock", os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return SlotLease(device, slot, fd)
    return None


def lease_slot(num_devices: int, slots_per_device: int, lock_dir: Path, poll_s: float = 2.0) -> SlotLease:
    """Wait until a slot is free and lease it."""
    while (lease := try_lease(num_devices, slots_per_device, lock_dir)) is None:
        time.sleep(poll_s)
    return lease


def choose_device(requested: str, *, runs_per_gpu: int, lock_dir: Path) -> tuple[torch.device, SlotLease | None]:
    """`auto`: cpu without CUDA, cuda:0 with one GPU, a leased GPU slot with several; anything else as given."""
    if requested != "auto":
        return torch.device(requested), None
    if not torch.cuda.is_available():
        return torch.device("cpu"), None
    if torch.cuda.device_count() == 1:
        return torch.device("cuda:0"), None
    lease = lease_slot(torch.cuda.device_count(), runs_per_gpu, lock_dir)
    return torch.device(f"cuda:{lease.device_index}"), lease
