"""Records archives: carry a sweep's finished records between machines, so no finished run is ever trained twice.

    python -m mad.archive pack runs/sweeps/mad -o records.tar.gz       # finished records (+ their .hydra configs)
    python -m mad.archive unpack records.tar.gz -C runs/sweeps/mad     # merge them into a sweep directory
    python -m mad.archive compare a.tar.gz b.tar.gz                    # runs both hold, and how their records differ

An archive holds, per finished run (status ok or diverged), `result.json` and the job's `.hydra/` files under the
run's path relative to the sweep directory; weights (`model.pt`) only with `--weights` (1.6 MB per MAD run).
Unpacking never replaces a finished record: an identical one is left alone, a different one is an error (before
anything is written) unless `--keep-existing` keeps the one already there and says which, and unfinished or missing
records are filled in. Relaunching the sweep then skips exactly the runs the archive brought (mad/resume.py).

A run trained twice (two machines given the same work) gives two different records on a GPU: its kernels are not
bit-reproducible, and a run near the early-stopping threshold can stop epochs apart. `compare` shows by how much.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path, PurePosixPath

from mad.resume import FINISHED, run_identity
from mad.results import RECORD_NAME, WEIGHTS_NAME, read_record, write_json_atomically


def finished_run_dirs(sweep_dir: Path) -> list[Path]:
    """Run directories under `sweep_dir` whose record is finished, sorted."""
    return [path.parent for path in sorted(Path(sweep_dir).rglob(RECORD_NAME)) if finished_or_none(path) is not None]


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


def read_records(archive: Path) -> dict[PurePosixPath, dict]:
    """The finished records of `archive`, by run directory (relative); ValueError for an unsafe path or a record
    that is not finished."""
    return _read(archive, records_only=True)[1]


def safe_member(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"archive member {name!r} is not a relative path inside the sweep directory")
    return path


def _read(archive: Path, records_only: bool = False) -> tuple[dict[PurePosixPath, bytes], dict[PurePosixPath, dict]]:
    """`archive`'s files by path (only its records with `records_only`), and its records by run directory;
    ValueError for an unsafe path or a record that is not finished."""
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        if records_only:
            members = [m for m in members if PurePosixPath(m.name).name == RECORD_NAME]
        payload = {safe_member(m.name): tar.extractfile(m).read() for m in members}
    records = {path.parent: json.loads(data) for path, data in payload.items() if path.name == RECORD_NAME}
    for rel_dir, record in records.items():
        if not isinstance(record, dict) or record.get("status") not in FINISHED:
            raise ValueError(f"{archive}: {rel_dir}/{RECORD_NAME} is not a finished record")
    return payload, records


def unpack(archive: Path, sweep_dir: Path, *, keep_existing: bool = False) -> dict[str, int | list[str]]:
    """Merge `archive` into `sweep_dir`. Returns the counts `added`, `identical` (already there) and `files`
    (written), and `kept`: the run directories (relative) where a different finished record was already there and
    stayed.

    Raises ValueError, before writing anything, for an unsafe member path, an unreadable record, or (unless
    `keep_existing`) a record that would replace a different finished one.
    """
    sweep_dir = Path(sweep_dir)
    payload, incoming = _read(archive)
    added, identical, kept = set(), set(), []
    for rel_dir, record in incoming.items():
        target = sweep_dir / rel_dir / RECORD_NAME
        existing = finished_or_none(target)
        if existing is None:
            added.add(rel_dir)
        elif existing == record:
            identical.add(rel_dir)
        elif keep_existing:
            kept.append(rel_dir.as_posix())
        else:
            raise ValueError(f"{target} already holds a different finished record; not replaced (move it away first, "
                             "or pass --keep-existing to keep it)")
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
    return {"added": len(added), "identical": len(identical), "files": files, "kept": sorted(kept)}


COMPARED = ("test_accuracy", "best_epoch", "epochs_run", "early_stopped")
# What says when, where and how a run trained, not what it learned: left out when `compare` asks whether two outcomes
# are equal (with the config's launch-only keys, `mad.resume.run_identity`).
_CIRCUMSTANCES = ("started_at", "finished_at", "wall_time_s", "tokens_per_s", "versions", "git", "device",
                  "stacked_runs")


def compare(a: Path, b: Path) -> list[dict]:
    """The runs both archives hold, one row each, sorted by run directory: `run`, `same_outcome` (the records agree
    in everything but when, where and how the run trained) and each of `COMPARED` from a and b; then one row
    (`run`, `only_in` "a" or "b") per run only one of them holds."""
    records_a, records_b = _read(a, records_only=True)[1], _read(b, records_only=True)[1]
    rows = []
    for rel_dir in sorted(set(records_a) & set(records_b)):
        ra, rb = records_a[rel_dir], records_b[rel_dir]
        row = {"run": rel_dir.as_posix(), "same_outcome": _outcome(ra) == _outcome(rb)}
        for key in COMPARED:
            row[f"{key} a"], row[f"{key} b"] = ra.get(key), rb.get(key)
        rows.append(row)
    for side, only in (("a", set(records_a) - set(records_b)), ("b", set(records_b) - set(records_a))):
        rows += [{"run": rel_dir.as_posix(), "only_in": side} for rel_dir in sorted(only)]
    return rows


def _outcome(record: dict) -> dict:
    history = {k: v for k, v in (record.get("history") or {}).items() if k != "seconds"}
    config = run_identity(record.get("config") or {})
    return {k: v for k, v in record.items() if k not in _CIRCUMSTANCES} | {"history": history, "config": config}


def comparison_markdown(rows: list[dict]) -> str:
    """`compare`'s rows as a summary line and a Markdown table of the runs whose outcomes differ."""
    both = [r for r in rows if "only_in" not in r]
    differ = [r for r in both if not r["same_outcome"]]
    only = {side: sum(r.get("only_in") == side for r in rows) for side in "ab"}
    gaps = [abs(r["test_accuracy a"] - r["test_accuracy b"]) for r in differ
            if isinstance(r["test_accuracy a"], float) and isinstance(r["test_accuracy b"], float)]  # fmt: skip
    lines = [f"{_plural(len(both), 'run')} in both archives: {len(both) - len(differ)} with the same outcome, "
             f"{len(differ)} different (only in a: {only['a']}, only in b: {only['b']})"
             + (f"; |test accuracy a - b| over {len(gaps)}: max {max(gaps):.4f}, mean {sum(gaps) / len(gaps):.4f}"
                if gaps else "")]  # fmt: skip
    if differ:
        columns = ["run", *(f"{key} {side}" for key in COMPARED for side in "ab")]
        lines += ["", "| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
        lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in differ]
    return "\n".join(lines)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cell(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def finished_or_none(path: Path) -> dict | None:
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
    u.add_argument("--keep-existing", action="store_true",
                   help="where a different finished record is already there, keep it and say so instead of stopping")
    c = sub.add_parser("compare", help="the runs two archives both hold, and how their records differ")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            print(f"{pack(args.sweep_dir, args.out, weights=args.weights)} finished runs -> {args.out}")
        elif args.command == "compare":
            print(comparison_markdown(compare(args.a, args.b)))
        else:
            counts = unpack(args.archive, args.sweep_dir, keep_existing=args.keep_existing)
            print(f"{counts['added']} runs added, {counts['identical']} already there -> {args.sweep_dir}")
            for rel_dir in counts["kept"]:
                print(f"kept: {rel_dir}: the record already there differs from the archive's, and stays")
    except (ValueError, OSError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
