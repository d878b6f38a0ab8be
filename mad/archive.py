"""Records archives: carry a sweep's finished records between machines, so no finished run is ever trained twice.

    python -m mad.archive pack runs/sweeps/mad -o records.tar.gz       # finished records (+ their .hydra configs)
    python -m mad.archive unpack records.tar.gz -C runs/sweeps/mad     # merge them into a sweep directory

An archive holds, per finished run (status ok or diverged), `result.json` and the job's `.hydra/` files under the
run's path relative to the sweep directory; weights (`model.pt`) only with `--weights` (1.6 MB per MAD run).
Unpacking never replaces a finished record: an identical one is left alone, a different one is an error (before
anything is written), and unfinished or missing records are filled in. Relaunching the sweep then skips exactly the
runs the archive brought (mad/resume.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path, PurePosixPath

from mad.resume import FINISHED
from mad.results import RECORD_NAME, WEIGHTS_NAME, read_record, write_json_atomically


def finished_run_dirs(sweep_dir: Path) -> list[Path]:
    """Run directories under `sweep_dir` whose record is finished, sorted."""
    return [path.parent for path in sorted(Path(sweep_dir).rglob(RECORD_NAME)) if _finished_or_none(path) is not None]


def pack(sweep_dir: Path, out: Path, *, weights: bool = False) -> int:
    """Write the archive of `sweep_dir`'s finished runs to `out` (gzip tar); returns how many runs it holds."""
    sweep_dir = Path(sweep_dir)
    runs = finished_run_dirs(sweep_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for run in runs:
            files = [run / RECORD_NAME, *sorted((run / ".hydra").glob("*.yaml"))]
            if weights and (run / WEIGHTS_NAME).exists():
                files.append(run / WEIGHTS_NAME)
            for f in files:
                tar.add(f, arcname=f.relative_to(sweep_dir).as_posix())
    tmp.replace(out)
    return len(runs)


def _safe_member(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"archive member {name!r} is not a relative path inside the sweep directory")
    return path


def unpack(archive: Path, sweep_dir: Path) -> dict[str, int]:
    """Merge `archive` into `sweep_dir`. Returns counts: `added`, `identical` (already there), `files`.

    Raises ValueError, before writing anything, for an unsafe member path, an unreadable record, or a record that
    would replace a different finished one.
    """
    sweep_dir = Path(sweep_dir)
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        payload = {_safe_member(m.name): tar.extractfile(m).read() for m in members}
    incoming = {path.parent: json.loads(data) for path, data in payload.items() if path.name == RECORD_NAME}
    added, identical = set(), set()
    for rel_dir, record in incoming.items():
        if not isinstance(record, dict) or record.get("status") not in FINISHED:
            raise ValueError(f"{archive}: {rel_dir}/{RECORD_NAME} is not a finished record")
        target = sweep_dir / rel_dir / RECORD_NAME
        existing = _finished_or_none(target)
        if existing is None:
            added.add(rel_dir)
        elif existing == record:
            identical.add(rel_dir)
        else:
            raise ValueError(f"{target} already holds a different finished record; not replaced (move it away first)")
    files = 0
    for path, data in payload.items():
        run_dir = path.parent.parent if path.parent.name == ".hydra" else path.parent
        if run_dir not in added or path.name == RECORD_NAME:
            continue  # records are written last, below: a run never has its record without its config
        dest = sweep_dir / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        files += 1
    for rel_dir in added:
        write_json_atomically(sweep_dir / rel_dir / RECORD_NAME, incoming[rel_dir])
        files += 1
    return {"added": len(added), "identical": len(identical), "files": files}


def _finished_or_none(path: Path) -> dict | None:
    """The record at `path` if it is readable and finished, else None."""
    if not path.exists():
        return None
    try:
        record = read_record(path)
    except ValueError:
        return None
    return record if record["status"] in FINISHED else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="archive a sweep directory's finished runs")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True, help="the .tar.gz to write")
    p.add_argument("--weights", action="store_true", help="include model.pt (1.6 MB per MAD run)")
    u = sub.add_parser("unpack", help="merge an archive into a sweep directory")
    u.add_argument("archive", type=Path)
    u.add_argument("-C", "--sweep-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            print(f"{pack(args.sweep_dir, args.out, weights=args.weights)} finished runs -> {args.out}")
        else:
            counts = unpack(args.archive, args.sweep_dir)
            print(f"{counts['added']} runs added, {counts['identical']} already there -> {args.sweep_dir}")
    except (ValueError, OSError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
