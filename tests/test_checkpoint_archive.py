"""Checkpoint archives (mad/checkpoint_archive.py) and the device call that carries them (benchmarks/device_sweep.sh):
a stack stopped at a call's deadline resumes in the next call, on a fresh machine, where it stopped."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from mad.archive import read_records
from mad.checkpoint_archive import main as checkpoint_main
from mad.checkpoint_archive import pack, stopped_stacks, unpack
from mad.results import SCHEMA_VERSION
from mad.stack_checkpoint import CHECKPOINT_NAME, checkpoint_epoch
from tests.conftest import REPO

MIB = 2**20


def _checkpoint(run_dir, epoch: int, mib: float = 1.0) -> None:
    """A stand-in checkpoint of about `mib` MiB (the archive reads only its epoch)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "weights": {"w": torch.randn(int(mib * MIB) // 4)}}, run_dir / CHECKPOINT_NAME)


def _record(run_dir, status: str = "ok") -> None:
    (run_dir / "result.json").write_text(json.dumps({"schema": SCHEMA_VERSION, "status": status}))


def _members(parts) -> list[list[str]]:
    out = []
    for part in parts:
        with tarfile.open(part) as tar:
            out.append(tar.getnames())
    return out


def test_pack_writes_the_stopped_stacks_in_parts_the_furthest_first_and_leaves_out_whole_stacks(tmp_path):
    sweep = tmp_path / "sweep"
    for lr in range(3):  # a stack stopped after epoch 40 (three runs)
        _checkpoint(sweep / "recall" / f"lr{lr}", 40)
    for lr in range(2):  # another, after epoch 90
        _checkpoint(sweep / "copy" / f"lr{lr}", 90)
    _checkpoint(sweep / "copy" / "lr2", 90)
    _record(sweep / "copy" / "lr2")  # finished: its checkpoint stays behind
    for lr in range(2):  # and one after epoch 12
        _checkpoint(sweep / "noisy" / f"lr{lr}", 12)
    _record(sweep / "noisy" / "lr0", status="failed")  # a failed record is not finished: the run resumes
    assert [[p.parent.name for p in stack] for stack in stopped_stacks(sweep)] == [
        ["lr0", "lr1"], ["lr0", "lr1", "lr2"], ["lr0", "lr1"]]  # fmt: skip

    # Three 1-MiB checkpoints per 3.5-MiB part, 6 MiB in all: the two furthest stacks fit (the recall stack spans two
    # parts), and the last (the fewest epochs) is left out whole.
    packed = pack(sweep, tmp_path / "out", int(3.5 * MIB), 6 * MIB)
    assert packed.checkpoints == 5 and [s[0].parent.parent.name for s in packed.left_out] == ["noisy"]
    assert _members(packed.parts) == [["copy/lr0/checkpoint.pt", "copy/lr1/checkpoint.pt", "recall/lr0/checkpoint.pt"],
                                      ["recall/lr1/checkpoint.pt", "recall/lr2/checkpoint.pt"]]  # fmt: skip
    with pytest.raises(ValueError, match="already holds checkpoints-1.tar"):
        pack(sweep, tmp_path / "out", int(3.5 * MIB), 6 * MIB)
    assert len(pack(sweep, tmp_path / "small", MIB // 2, 36 * MIB).left_out) == 3  # each checkpoint exceeds a part


def test_parts_stay_within_their_size_with_many_small_checkpoints(tmp_path):
    """Each member costs the archive a header, a PAX header and padding beside its bytes: with 300 checkpoints of
    ~4 KiB those are a third of a part, and a part still never exceeds --part-mb."""
    sweep = tmp_path / "sweep"
    for i in range(300):
        _checkpoint(sweep / f"setting_with_a_long_name_{i // 6}" / f"lr{i % 6}-wd0.1-seed12345", 3, mib=3 / 1024)
    packed = pack(sweep, tmp_path / "out", MIB // 2, 36 * MIB)
    assert packed.checkpoints == 300 and not packed.left_out and len(packed.parts) >= 3
    assert max(p.stat().st_size for p in packed.parts) <= MIB // 2


def test_unpack_adds_checkpoints_except_where_a_run_finished_or_got_further(tmp_path):
    sweep, other = tmp_path / "sweep", tmp_path / "other"
    for name, epoch in (("a", 50), ("b", 50), ("c", 50), ("d", 50)):
        _checkpoint(sweep / "s" / name, epoch, mib=0.01)
    parts = pack(sweep, tmp_path / "out", 15 * MIB, 36 * MIB).parts
    _checkpoint(other / "s" / "b", 70, mib=0.01)  # got further here: kept
    _checkpoint(other / "s" / "c", 20, mib=0.01)  # behind: replaced
    (other / "s" / "d").mkdir(parents=True)
    _record(other / "s" / "d")  # finished here: left alone
    assert unpack(parts, other) == {"added": 2, "finished": 1, "behind": 1}
    assert [checkpoint_epoch(other / "s" / n) for n in "abcd"] == [50, 70, 50, None]
    assert checkpoint_main(["unpack", *map(str, parts), "-C", str(other)]) == 0  # again: nothing new


def test_unpack_refuses_a_bad_part_before_writing_anything(tmp_path, capsys):
    good = tmp_path / "good"
    _checkpoint(good / "s" / "a", 3, mib=0.01)
    parts = pack(good, tmp_path / "out", 15 * MIB, 36 * MIB).parts
    cases = {"escape.tar": ("../x/checkpoint.pt", None), "other.tar": ("s/b/result.json", b"{}"),
             "broken.tar": ("s/b/checkpoint.pt", b"not a checkpoint")}  # fmt: skip
    for name, (member, data) in cases.items():
        path = tmp_path / name
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo(member)
            payload = data if data is not None else (good / "s" / "a" / CHECKPOINT_NAME).read_bytes()
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        target = tmp_path / f"sweep_{name}"
        assert checkpoint_main(["unpack", str(parts[0]), str(path), "-C", str(target)]) == 2
        assert not target.exists(), f"{name}: written before the bad member was found"
    err = capsys.readouterr().err
    assert "not a relative path" in err and "is not a checkpoint.pt" in err and "not a readable checkpoint" in err
    assert checkpoint_main(["pack", str(good), "-o", str(tmp_path / "o"), "--part-mb", "0"]) == 2


def test_two_device_calls_carry_a_stopped_stack_from_one_fresh_machine_to_the_next(tmp_path):
    """benchmarks/device_sweep.sh twice, each in a sweep folder of its own (a fresh machine), the second given what
    the first handed back: the first stops its stack at stop_at and hands back its checkpoints, the second resumes
    it after that epoch and stops it further on. The training never ends here (100,000 epochs): only the deadlines
    stop it. The launch takes 5-12 s on a 2-core machine (longer under load), so stop_at is 25 s."""
    env = os.environ | {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
                        "OMP_NUM_THREADS": "1", "STOP_MARGIN": "20", "START_MARGIN": "0"}  # fmt: skip
    args = ["profile=smoke", "task.num_train_examples=64", "task.num_test_examples=64", "task.seq_len=16",
            "train.epochs=100000", "train.early_stop_accuracy=1", "attention=softmax", "optimizer.lr=1e-3,5e-3"]

    def call(n: int, carry) -> tuple[str, list[int]]:
        out = tmp_path / f"out{n}"
        out.mkdir()
        proc = subprocess.run(["bash", "benchmarks/device_sweep.sh", str(carry), "45", str(tmp_path / f"sweep{n}"),
                               *args], cwd=REPO, env=env | {"OUT": str(out)}, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert sorted(p.name for p in out.iterdir()) == ["checkpoints-1.tar", "records.tar.gz"], proc.stdout
        assert read_records(out / "records.tar.gz") == {}, "no run finishes: only the deadline stops them"
        with tarfile.open(out / "checkpoints-1.tar") as tar:
            epochs = [torch.load(tar.extractfile(m), weights_only=True)["epoch"] for m in tar.getmembers()]
        return proc.stdout, epochs

    said, first = call(1, tmp_path / "nothing yet")
    assert "2 runs in 1 stacks stopped at hydra.launcher.stop_at=25 s" in said and "with their checkpoints" in said
    assert len(first) == 2 and first[0] == first[1] >= 1, said
    assert "2 no record yet, a checkpoint to resume from" in said
    said, second = call(2, tmp_path / "out1")
    assert "2 checkpoints added" in said and f"stack of 2 runs resumes after epoch {first[0]}" in said, said
    assert second[0] == second[1] > first[0], said


def test_a_device_call_refuses_deadlines_it_cannot_keep_before_any_work(tmp_path):
    env = os.environ | {"OUT": str(tmp_path), "STOP_MARGIN": "40"}
    for seconds in ("70", "530.5", "x"):  # 70 <= 40 + 30 (START_MARGIN's default)
        proc = subprocess.run(["bash", "benchmarks/device_sweep.sh", "none", seconds, str(tmp_path / "sweep")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 2 and "must be whole numbers with SECONDS > STOP_MARGIN + START_MARGIN" in proc.stderr
        assert not (tmp_path / "sweep").exists() and not list(tmp_path.iterdir())
