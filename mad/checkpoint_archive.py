"""Checkpoint archives: carry the checkpoints of stacks stopped at a deadline (mad/stack_checkpoint.py) to the next
machine beside the records archive (mad/archive.py), so that a call to a machine lent for minutes loses no training.

    python -m mad.checkpoint_archive pack runs/sweeps/mad -o OUT_DIR       # OUT_DIR/checkpoints-1.tar, -2, ...
    python -m mad.checkpoint_archive unpack OUT_DIR/checkpoints-*.tar -C runs/sweeps/mad

`pack` takes the checkpoint of every run without a finished record and writes them into numbered parts of at most
`--part-mb` MiB each (the device machine hands back files of up to 16 MiB; a MAD run's checkpoint is 4.7 MiB with
AdamW), a stack's checkpoints one after another, the stacks that trained the most epochs first, `--max-mb` MiB in all
(what a call can carry back in beside the repository). A stack beyond that is left out whole and named: its runs
restart together at the next launch rather than split into a resumed stack and a restarted one. It refuses a folder
that already holds parts, so that two calls' checkpoints never mix.

`unpack` checks every part first (safe paths, only checkpoint files, each readable) and writes nothing if one is bad.
Then it puts each checkpoint into its run directory unless the run has a finished record there (it is done) or a
checkpoint of the same or a later epoch (it got further here). A checkpoint is written atomically. The launcher
then stacks the runs whose checkpoints hold one epoch and resumes them (mad/stacked_run.py).
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from mad.archive import finished_or_none, safe_member
from mad.results import RECORD_NAME, write_bytes_atomically
from mad.stack_checkpoint import CHECKPOINT_NAME, checkpoint_epoch

PART_NAME = "checkpoints-{}.tar"
_TAR_OVERHEAD = 3072  # a member's header, its PAX header (sub-second mtime, a long path) and padding, at most
_TAR_END = 10240  # the end-of-archive blocks and record padding


def stopped_stacks(sweep_dir: Path) -> list[list[Path]]:
    """The checkpoints of runs without a finished record under `sweep_dir`, as stacks (one folder's runs at one
    epoch), the most epochs first; checkpoints whose epoch cannot be read are left out."""
    stacks: dict[tuple, list[Path]] = defaultdict(list)
    for path in sorted(Path(sweep_dir).rglob(CHECKPOINT_NAME)):
        epoch = checkpoint_epoch(path.parent)
        if epoch is not None and finished_or_none(path.parent / RECORD_NAME) is None:
            stacks[(path.parent.parent, epoch)].append(path)
    return [stacks[key] for key in sorted(stacks, key=lambda key: (-key[1], str(key[0])))]


@dataclass
class Packed:
    parts: list[Path]  # written
    checkpoints: int  # in them
    left_out: list[list[Path]]  # stacks beyond `max_bytes`, or with a checkpoint larger than a part


def pack(sweep_dir: Path, out_dir: Path, part_bytes: int, max_bytes: int) -> Packed:
    """Write the checkpoints of `sweep_dir`'s stopped stacks into parts of at most `part_bytes`, `max_bytes` in all,
    under `out_dir`."""
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    existing = sorted(out_dir.glob(PART_NAME.format("*")))
    if existing:
        raise ValueError(f"{out_dir} already holds {', '.join(p.name for p in existing)}; move them away first, so "
                         "that two sweeps' checkpoints do not mix")  # fmt: skip
    parts: list[list[Path]] = []
    sizes: list[int] = []
    left_out = []
    for stack in stopped_stacks(sweep_dir):
        placed = _place(stack, parts, sizes, part_bytes, max_bytes)
        if placed is None:
            left_out.append(stack)
        else:
            parts, sizes = placed
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for number, members in enumerate(parts, start=1):
        path = out_dir / PART_NAME.format(number)
        tmp = path.with_name(path.name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for member in members:
                tar.add(member, arcname=member.relative_to(sweep_dir).as_posix())
        tmp.replace(path)
        written.append(path)
    return Packed(written, sum(map(len, parts)), left_out)


def _place(stack: list[Path], parts: list[list[Path]], sizes: list[int], part_bytes: int,
           max_bytes: int) -> tuple[list[list[Path]], list[int]] | None:  # fmt: skip
    """`parts` and their `sizes` with the stack's checkpoints appended in order (a new part where the last is full),
    or None when the parts then exceed `max_bytes` or a checkpoint exceeds a part on its own."""
    parts, sizes = [list(p) for p in parts], list(sizes)
    for path in stack:
        size = path.stat().st_size + _TAR_OVERHEAD
        if size + _TAR_END > part_bytes:
            return None
        if not parts or sizes[-1] + size > part_bytes:
            parts.append([])
            sizes.append(_TAR_END)
        parts[-1].append(path)
        sizes[-1] += size
    return (parts, sizes) if sum(sizes) <= max_bytes else None


def unpack(parts: list[Path], sweep_dir: Path) -> dict[str, int]:
    """Merge checkpoint parts into `sweep_dir`. Returns the counts `added`, `finished` (the run has a finished
    record: not added) and `behind` (a checkpoint of the same or a later epoch is there: not added).

    Raises ValueError, before writing anything, for an unsafe member path, a member that is not a checkpoint, or
    a checkpoint that cannot be read."""
    sweep_dir = Path(sweep_dir)
    incoming: dict[PurePosixPath, tuple[bytes, int]] = {}
    for part in parts:
        with tarfile.open(part, "r") as tar:
            for member in tar.getmembers():
                path = safe_member(member.name)
                if not member.isfile() or path.name != CHECKPOINT_NAME:
                    raise ValueError(f"{part}: {member.name} is not a {CHECKPOINT_NAME}; not a checkpoint archive")
                data = tar.extractfile(member).read()
                incoming[path] = (data, _epoch(data, f"{part}: {member.name}"))
    counts = {"added": 0, "finished": 0, "behind": 0}
    for path, (data, epoch) in sorted(incoming.items()):
        run_dir = sweep_dir / path.parent
        here = checkpoint_epoch(run_dir)
        if finished_or_none(run_dir / RECORD_NAME) is not None:
            counts["finished"] += 1
        elif here is not None and here >= epoch:
            counts["behind"] += 1
        else:
            write_bytes_atomically(sweep_dir / path, data)
            counts["added"] += 1
    return counts


def _epoch(data: bytes, name: str) -> int:
    try:
        return int(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["epoch"])
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise ValueError(f"{name}: not a readable checkpoint ({type(e).__name__}: {e})") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the checkpoints of a sweep's stopped stacks into parts")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("-o", "--out-dir", type=Path, required=True, help="the folder that receives checkpoints-N.tar")
    p.add_argument("--part-mb", type=float, default=15.0, help="most MiB per part (default: %(default)s)")
    p.add_argument("--max-mb", type=float, default=36.0, help="most MiB in all (default: %(default)s)")
    u = sub.add_parser("unpack", help="merge checkpoint parts into a sweep directory")
    u.add_argument("parts", type=Path, nargs="+")
    u.add_argument("-C", "--sweep-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            if not (args.part_mb > 0 and args.max_mb > 0):
                raise ValueError(f"need --part-mb > 0 and --max-mb > 0, got {args.part_mb:g} and {args.max_mb:g}")
            packed = pack(args.sweep_dir, args.out_dir, int(args.part_mb * 2**20), int(args.max_mb * 2**20))
            print(f"{packed.checkpoints} checkpoints in {len(packed.parts)} parts -> {args.out_dir}")
            for stack in packed.left_out:
                print(f"left out (over --max-mb {args.max_mb:g}, or one larger than --part-mb {args.part_mb:g}): the "
                      f"{len(stack)} checkpoints of {stack[0].parent.parent}; that stack starts over")  # fmt: skip
        else:
            counts = unpack(args.parts, args.sweep_dir)
            print(f"{counts['added']} checkpoints added, {counts['finished']} of finished runs and {counts['behind']} "
                  f"behind the ones there left out -> {args.sweep_dir}")  # fmt: skip
    except (ValueError, OSError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
