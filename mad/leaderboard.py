"""`python -m mad.leaderboard RUNS_DIR ...`: the MAD score of every architecture (attention x optimizer) in runs folders.

    python -m mad.leaderboard runs/multirun/2026-11-30          # writes analysis/2026-11-30/
    python -m mad.leaderboard runs --profile smoke --out analysis/smoke
    python -m mad.leaderboard runs/sweeps/a runs/sweeps/b --out analysis/a_vs_b   # several folders, one board

Reads every `result.json` under RUNS_DIR (never directory names) and aggregates exactly as MAD does
(docs/mad-protocol.md section 3): per setting the best test accuracy over the lr x weight-decay runs, per task the mean
over its settings, overall the plain mean of the six task scores, all fractions in [0, 1]. Missing settings, diverged
runs, failed runs and files that are not run records are reported, never silently dropped. Writes leaderboard.md,
leaderboard.csv, settings.csv, heatmap.png and muon_gap.png. Records of one attention x optimizer whose configs differ
(e.g. two sweeps of another init) are rows of their own, and leaderboard.md sets them side by side per setting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mad import plots
from mad.published import comparison_lines
from mad.records import GRID, canonical, load_records
from mad.results import RECORD_NAME, STATUSES
from mad.tasks import TASKS
from mad.tasks.grid import BASELINES, LEARNING_RATES, WEIGHT_DECAYS, mad_settings
from mad.variants import variant_lines

__all__ = ["LeaderboardError", "Leaderboard", "build_leaderboard", "make_leaderboard", "setting_label"]

FULL_PROFILE = "full"  # the published MAD protocol: its expected settings are the 66 of mad_settings()
SCORE_COLUMNS = [*TASKS, "average"]
ARCH = ["arch", "optimizer"]  # `arch` is the attention name, plus a config hash when variants exist
KEYS = [*ARCH, "task", "setting"]
_SETTING_STATS = ["best_accuracy", "best_lr", "best_weight_decay", *(f"runs_{s}" for s in STATUSES), "grid_points_run",
                  "grid_points_missing", "repeated_runs", "off_grid_runs"]  # fmt: skip
_EXAMPLE_PATHS = 3
_SHORT = {"in_context_recall": "recall", "noisy_in_context_recall": "noisy", "fuzzy_in_context_recall": "fuzzy",
          "selective_copying": "copy", "compression": "compr.", "memorization": "memo."}  # console headers, 80 columns
_SHOWN_NAMES = 6  # settings named per note in leaderboard.md and on the console (settings.csv has all)


class LeaderboardError(ValueError):
    """Runs that cannot be turned into a leaderboard; the message says why and what to pass instead."""


@dataclass
class Leaderboard:
    """Everything the outputs are made of.

    board: one row per architecture (attention, optimizer, the six task scores, average, counts, notes).
    settings: one row per architecture x setting (best accuracy, its lr and wd, run counts).
    partial: bool, one row per row of ``board`` in its order (indexed by attention, optimizer), columns
        SCORE_COLUMNS: True where a task score misses some settings or some of their lr x wd runs, and for the
        average where any task score does.
    gaps: Muon minus AdamW scores (index: attention label, columns SCORE_COLUMNS); empty if no pair exists.
    archs: one row per architecture: attention (the name), optimizer, arch (its label in ``board`` and ``settings``)
        and variant (the config values that set it apart from its siblings of the same attention x optimizer, or "").
    """

    board: pd.DataFrame
    settings: pd.DataFrame
    partial: pd.DataFrame
    gaps: pd.DataFrame
    archs: pd.DataFrame
    shown_notes: list[str]  # the notes of ``board`` naming at most _SHOWN_NAMES settings each
    runs_dirs: list[Path]
    profile: str
    comparability: str  # one sentence: comparable with published MAD scores or not, and why
    status_counts: dict[str, int]
    ignored: pd.DataFrame  # columns path, reason
    other_profiles: dict[str, int]  # records skipped because --profile picked another profile


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _select_profile(records: pd.DataFrame, profile: str | None, where: str) -> tuple[pd.DataFrame, str]:
    counts = records["profile"].value_counts()
    found = ", ".join(f"{name} ({n} records)" for name, n in counts.items())
    if profile is None and len(counts) > 1:
        raise LeaderboardError(
            f"{where} mixes records of several profiles: {found}. Scores of different profiles are not "
            f"comparable; pass --profile NAME (profile=NAME from Python) to pick one."
        )
    profile = counts.index[0] if profile is None else profile
    if profile not in counts:
        raise LeaderboardError(f"no record of profile {profile!r} in {where}; profiles found: {found}")
    return records[records["profile"] == profile], profile


def setting_label(task: str, setting: dict) -> str:
    """``baseline``, or ``key=value`` (comma-joined) for each key that differs from the task's MAD baseline.

    ``num_test_examples`` is left out: MAD keeps it at 1280 in every setting.
    """
    base = BASELINES[task]
    keys = [key for key in {**base, **setting} if key != "num_test_examples"]
    return ",".join(f"{key}={setting.get(key)}" for key in keys if setting.get(key) != base.get(key)) or "baseline"


def _architectures(records: pd.DataFrame) -> pd.DataFrame:
    """One row per architecture: attention, optimizer, body, opt_config, arch (label) and variant (a note or "").

    Records of one attention x optimizer whose config differs get the attention name plus a short stable hash of
    that config, e.g. ``parallax[3f2a]``; the common case of a single config keeps the plain name.
    """
    archs = records[["attention", "optimizer", "body", "opt_config"]].drop_duplicates().reset_index(drop=True)
    digests = [_digest(body + opt) for body, opt in zip(archs["body"], archs["opt_config"])]
    width = 4
    while len({d[:width] for d in digests}) < len(set(digests)):
        width += 1
    variants = archs.groupby(["attention", "optimizer"])["body"].transform("size")
    archs["arch"] = [a if n == 1 else f"{a}[{d[:width]}]" for a, n, d in zip(archs["attention"], variants, digests)]
    archs["variant"] = _variant_notes(archs)
    return archs


def _variant_notes(archs: pd.DataFrame) -> list[str]:
    """For each architecture with siblings of the same attention x optimizer: the config values that tell them apart."""
    configs = [{**json.loads(body), "optimizer": json.loads(opt)} for body, opt in zip(archs.body, archs.opt_config)]
    flat = [dict(_flatten_dict(config)) for config in configs]
    notes = [""] * len(archs)
    for _, group in archs.groupby(["attention", "optimizer"]):
        if len(group) < 2:
            continue
        members = [flat[i] for i in group.index]
        keys = sorted({k for m in members for k in m if len({json.dumps(o.get(k)) for o in members}) > 1})
        for i in group.index:
            notes[i] = "config variant: " + ", ".join(f"{k}={flat[i].get(k)}" for k in keys)
    return notes


def _flatten_dict(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten_dict(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _expected_settings(records: pd.DataFrame, profile: str) -> pd.DataFrame:
    """Settings a complete sweep covers (columns task, setting): the 66 MAD settings for the full profile, else
    every setting seen in the runs, in task order."""
    if profile == FULL_PROFILE:
        pairs = [(task, canonical(setting)) for task, setting in mad_settings()]
        pairs.sort(key=lambda pair: TASKS.index(pair[0]))  # stable: keeps the grid order within a task
    else:
        pairs = sorted(set(zip(records["task"], records["setting"])), key=lambda p: (TASKS.index(p[0]), p[1]))
    return pd.DataFrame(pairs, columns=["task", "setting"])


def _expected_points(records: pd.DataFrame, profile: str) -> pd.DataFrame:
    """The lr x weight-decay points every setting should have (columns GRID): the protocol's grid for the full
    profile (a run off it is not scored: the score would not be MAD's), else every point seen in the records."""
    if profile == FULL_PROFILE:
        return pd.DataFrame([(lr, wd) for lr in LEARNING_RATES for wd in WEIGHT_DECAYS], columns=GRID)
    return records[GRID].drop_duplicates().reset_index(drop=True)


def _setting_table(records: pd.DataFrame, archs: pd.DataFrame, expected: pd.DataFrame,
                   points: pd.DataFrame) -> pd.DataFrame:
    """One row per architecture x setting: every expected setting, plus any other setting that was run
    (``in_grid`` False). Best accuracy over the runs at the expected lr x wd ``points``, with its lr and wd; run
    counts per status; how many of the points were run and are missing; runs off them (not scored)."""
    counts = (
        records.groupby([*KEYS, "status"]).size().unstack("status", fill_value=0)
        .reindex(columns=list(STATUSES), fill_value=0).add_prefix("runs_")
    )  # fmt: skip
    done = records[records["status"] != "failed"]
    on_grid = done.merge(points, on=GRID)  # runs at an expected lr x wd point: the only ones scored
    ok = on_grid[on_grid["status"] == "ok"].sort_values([*GRID, "path"])  # ties go to the smallest lr, then wd
    best = ok.loc[ok.groupby(KEYS)["test_accuracy"].idxmax(), [*KEYS, "test_accuracy", *GRID]].set_index(KEYS)
    best.columns = ["best_accuracy", "best_lr", "best_weight_decay"]
    runs = done.groupby(KEYS).size()
    on_grid_runs = on_grid.groupby(KEYS).size().reindex(runs.index, fill_value=0)
    points_run = on_grid.drop_duplicates([*KEYS, *GRID]).groupby(KEYS).size()
    stats = counts.join([
        best, points_run.rename("grid_points_run"), (on_grid_runs - points_run).rename("repeated_runs"),
        (runs - on_grid_runs).rename("off_grid_runs"),
    ]).reset_index()  # fmt: skip
    table = archs[ARCH].merge(expected, how="cross").merge(stats, on=KEYS, how="outer", indicator=True)
    table["in_grid"] = table.pop("_merge") != "right_only"
    int_columns = [*counts.columns, "grid_points_run", "repeated_runs", "off_grid_runs"]
    table[int_columns] = table[int_columns].fillna(0).astype(int)
    table["grid_points_missing"] = len(points) - table["grid_points_run"]
    rank = {pair: i for i, pair in enumerate(zip(expected["task"], expected["setting"]))}
    table["_task"] = table["task"].map(TASKS.index)
    table["_rank"] = [rank.get(pair, len(rank)) for pair in zip(table["task"], table["setting"])]
    table = table.sort_values([*ARCH, "_task", "_rank", "setting"]).drop(columns=["_task", "_rank"])
    return _describe_settings(table.reset_index(drop=True))


def _describe_settings(table: pd.DataFrame) -> pd.DataFrame:
    """Replaces the canonical ``setting`` JSON by a readable label, a short id and one column per setting key."""
    settings = [json.loads(s) for s in table["setting"]]
    table["setting_label"] = [setting_label(task, setting) for task, setting in zip(table["task"], settings)]
    table["setting_id"] = [_digest(f"{task}/{text}")[:8] for task, text in zip(table["task"], table["setting"])]
    keys = pd.DataFrame(settings, index=table.index).convert_dtypes()  # integer keys stay integers beside NaN
    known = list(dict.fromkeys(key for task in TASKS for key in BASELINES[task])) + ["num_test_examples"]
    keys = keys[[k for k in known if k in keys] + sorted(set(keys) - set(known))]
    front = table[[*ARCH, "task", "setting_label", "setting_id", "in_grid"]]
    return pd.concat([front, keys, table[_SETTING_STATS]], axis=1)


def _scores(settings: pd.DataFrame, archs: pd.DataFrame, full_protocol: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per architecture (index arch, optimizer): the task scores and their average, and which task scores are partial
    (some setting has no score, or, in the ``full_protocol``, its best is over only part of the lr x weight-decay
    grid).

    A task score is the mean best accuracy over its in-grid settings that have one (a setting whose runs all
    diverged or are missing drops out, as in MAD); NaN when none has. The average is NaN when any task is.
    """
    index = pd.MultiIndex.from_frame(archs[ARCH])
    in_grid = settings[settings["in_grid"]]
    grid = in_grid.groupby([*ARCH, "task"])["best_accuracy"]
    scores = grid.mean().unstack("task").reindex(index=index, columns=list(TASKS))
    scores["average"] = scores[list(TASKS)].mean(axis=1, skipna=False)
    partial = grid.count() < grid.size()
    if full_protocol:  # there the grid is known, and a best over part of it is provisional
        partial |= in_grid.groupby([*ARCH, "task"])["grid_points_missing"].sum() > 0
    partial = partial.unstack("task").reindex(index=index, columns=list(TASKS))
    partial = partial.eq(True)  # a task without any in-grid row (NaN) is not partial but absent
    partial["average"] = partial.any(axis=1)  # an average over partial task scores is partial too
    return scores, partial


def _notes(rows: pd.DataFrame, grid_size: int, variant: str, limit: int | None) -> str:
    """What a reader must know about one architecture's score; ``rows``: its rows of the settings table."""
    grid = rows[rows["in_grid"]]
    missing = grid[grid["best_accuracy"].isna()]
    part_run = grid[grid["best_accuracy"].notna() & (grid["grid_points_missing"] > 0)]
    diverged = grid[grid["runs_diverged"] > 0]
    outside = rows[~rows["in_grid"]]
    unscored = [task for task in TASKS if not grid.loc[grid["task"] == task, "best_accuracy"].notna().any()]
    points = f"of {len(grid) * grid_size} grid points (setting x lr x wd) not run"
    notes = [
        _listing(f"{len(missing)} setting(s) missing", missing, limit, grid),
        _listing(f"{len(part_run)} setting(s) scored over part of the lr x wd grid", part_run, limit, grid),
        _listing(f"{len(diverged)} setting(s) with diverged runs", diverged, limit),
        f"no average: no score for {', '.join(unscored)}" if unscored else "",
        _count(int(grid["grid_points_missing"].sum()), points),
        _count(int(rows["runs_failed"].sum()), "failed run(s), not scored"),
        _count(int(rows["repeated_runs"].sum()), "repeated run(s) of a grid point (the best one counts)"),
        _count(int(grid["off_grid_runs"].sum()), "run(s) at an lr x wd point off the protocol's grid, not scored"),
        _listing(f"{len(outside)} setting(s) outside the MAD grid, not scored", outside, limit),
        variant,
    ]  # fmt: skip
    return "; ".join(note for note in notes if note)


def _listing(summary: str, rows: pd.DataFrame, limit: int | None, grid: pd.DataFrame | None = None) -> str:
    """``summary: task/label, ...``; a task whose ``grid`` settings are all listed shows as ``task/all N``."""
    if rows.empty:
        return ""
    names = []
    for task, group in rows.groupby("task", sort=False):
        total = 0 if grid is None else int((grid["task"] == task).sum())
        whole = len(group) == total > 1
        names += [f"{task}/all {total}"] if whole else [f"{task}/{label}" for label in group["setting_label"]]
    shown = names[:limit]
    more = f", ... (+{len(names) - len(shown)} more in settings.csv)" if len(shown) < len(names) else ""
    return f"{summary}: {', '.join(shown)}{more}"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n else ""


def _board(settings: pd.DataFrame, archs: pd.DataFrame, scores: pd.DataFrame, grid_size: int) -> pd.DataFrame:
    """One row per architecture, best average first; ``notes`` names every setting, ``shown_notes`` a few."""
    rows = []
    for arch in archs.itertuples():
        mine = settings[(settings["arch"] == arch.arch) & (settings["optimizer"] == arch.optimizer)]
        in_grid = mine[mine["in_grid"]]
        rows.append({
            "attention": arch.arch,
            "optimizer": arch.optimizer,
            **scores.loc[(arch.arch, arch.optimizer)].to_dict(),
            "settings_scored": int(in_grid["best_accuracy"].notna().sum()),
            "settings_expected": len(in_grid),
            **{f"runs_{status}": int(mine[f"runs_{status}"].sum()) for status in STATUSES},
            "notes": _notes(mine, grid_size, arch.variant, limit=None),
            "shown_notes": _notes(mine, grid_size, arch.variant, limit=_SHOWN_NAMES),
        })  # fmt: skip
    board = pd.DataFrame(rows)
    board = board.sort_values(["average", "attention", "optimizer"], ascending=[False, True, True], na_position="last")
    return board.reset_index(drop=True)


def _muon_gaps(board: pd.DataFrame, archs: pd.DataFrame) -> pd.DataFrame:
    """Muon minus AdamW scores (index: the Muon row's attention label, columns SCORE_COLUMNS), for each Muon
    architecture whose attention, model and train config match exactly one AdamW architecture."""
    scores = board.set_index(["attention", "optimizer"])[SCORE_COLUMNS]
    adamw = archs[archs["optimizer"] == "adamw"]
    gaps = {}
    for muon in archs[archs["optimizer"] == "muon"].itertuples():
        partner = adamw[(adamw["attention"] == muon.attention) & (adamw["body"] == muon.body)]
        if len(partner) == 1:
            gaps[muon.arch] = scores.loc[(muon.arch, "muon")] - scores.loc[(partner["arch"].iloc[0], "adamw")]
    return pd.DataFrame.from_dict(gaps, orient="index", columns=SCORE_COLUMNS).sort_index()


def _comparability(selected: pd.DataFrame, profile: str) -> str:
    flagged = int((~selected["comparable"].astype(bool)).sum())
    if profile == FULL_PROFILE and not flagged:
        return "Comparable with published MAD scores: **yes** (profile full, the published MAD protocol)."
    why = f"{flagged} of {len(selected)} records are marked not comparable" if flagged else "not the full protocol"
    return f"Comparable with published MAD scores: **no** (profile {profile}: {why})."


def _load(runs_dirs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The records and ignored files under every folder, each file once (folders may nest)."""
    for runs_dir in runs_dirs:
        if not runs_dir.is_dir():
            raise LeaderboardError(f"runs directory {runs_dir} does not exist; pass folders that hold run folders")
    loaded = [load_records(runs_dir) for runs_dir in runs_dirs]
    records, ignored = (pd.concat([part[i] for part in loaded], ignore_index=True) for i in (0, 1))
    return records.drop_duplicates("path", ignore_index=True), ignored.drop_duplicates("path", ignore_index=True)


def build_leaderboard(runs_dirs: Path | list[Path], profile: str | None = None) -> Leaderboard:
    """Load and aggregate the records under ``runs_dirs`` (one folder or several); raises LeaderboardError (a
    ValueError) when impossible."""
    runs_dirs = [Path(runs_dirs)] if isinstance(runs_dirs, (str, Path)) else [Path(d) for d in runs_dirs]
    if not runs_dirs:
        raise LeaderboardError("no runs directory given; pass at least one folder that holds run folders")
    records, ignored = _load([Path(os.path.abspath(d)) for d in runs_dirs])
    where = ", ".join(map(str, runs_dirs))
    if records.empty:
        reasons = "; ".join(_reason_lines(ignored, runs_dirs))
        raise LeaderboardError(
            f"no valid run record ({RECORD_NAME}) under {where}" + (f"; ignored {reasons}" if reasons else "")
        )
    selected, profile = _select_profile(records, profile, where)
    archs = _architectures(selected)
    selected = selected.merge(archs[["attention", "optimizer", "body", "opt_config", "arch"]])
    points = _expected_points(selected, profile)
    grid_size = len(points)
    settings = _setting_table(selected, archs, _expected_settings(selected, profile), points)
    scores, partial = _scores(settings, archs, full_protocol=profile == FULL_PROFILE)
    board = _board(settings, archs, scores, grid_size)
    return Leaderboard(
        board=board.drop(columns="shown_notes"),
        settings=settings.rename(columns={"arch": "attention"}),
        partial=partial.reindex(pd.MultiIndex.from_frame(board[["attention", "optimizer"]])),
        gaps=_muon_gaps(board, archs),
        archs=archs[["attention", "optimizer", "arch", "variant"]],
        shown_notes=board["shown_notes"].tolist(),
        runs_dirs=runs_dirs,
        profile=profile,
        comparability=_comparability(selected, profile),
        status_counts=selected["status"].value_counts().reindex(list(STATUSES), fill_value=0).to_dict(),
        ignored=ignored,
        other_profiles=records.loc[records["profile"] != profile, "profile"].value_counts().to_dict(),
    )


def _reason_lines(ignored: pd.DataFrame, runs_dirs: list[Path]) -> list[str]:
    """One line per reason: count, reason and a few example paths (relative to the runs dirs' common folder)."""
    base = os.path.commonpath([os.path.abspath(d) for d in runs_dirs])
    lines = []
    for reason, group in ignored.groupby("reason"):
        examples = [os.path.relpath(p, base) for p in group["path"].head(_EXAMPLE_PATHS)]
        more = ", ..." if len(group) > len(examples) else ""
        lines.append(f"{len(group)} x {reason} (e.g. {', '.join(examples)}{more})")
    return lines


def _cells(lb: Leaderboard) -> list[list[tuple[str, str, bool]]]:
    """Per board row and score column: the three-decimal value (``—`` for no score), ``*`` when the task score is
    partial (else ""), and whether the value is the column's best."""
    best = lb.board[SCORE_COLUMNS].max()
    rows = []
    for (_, row), (_, partial) in zip(lb.board.iterrows(), lb.partial.iterrows()):
        cells = []
        for column in SCORE_COLUMNS:
            value, star = row[column], "*" if partial.get(column, False) else ""
            cells.append(("—", "", False) if math.isnan(value) else (f"{value:.3f}", star, value == best[column]))
        rows.append(cells)
    return rows


def _record_line(lb: Leaderboard) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in lb.status_counts.items())
    others = ", ".join(f"{n} of profile {name}" for name, n in lb.other_profiles.items())
    return (f"records: {sum(lb.status_counts.values())} used ({counts}; failed runs are never scored), "
            f"{len(lb.ignored)} ignored as invalid" + (f", {others} skipped" if others else ""))  # fmt: skip


def _markdown(lb: Leaderboard, plot_note: str) -> str:
    lines = [
        f"# MAD leaderboard: {_name(lb.runs_dirs)}", "",
        f"- profile: `{lb.profile}`", f"- {lb.comparability}",
        "- source: " + ", ".join(f"`{d}`" for d in lb.runs_dirs), f"- {_record_line(lb)}",
        "- score: per setting the best test accuracy (MAD macro accuracy) over the lr x weight-decay runs; task = mean"
        " over its settings; average = plain mean of the six tasks; fractions in [0, 1].", "",
        "| attention | optimizer | " + " | ".join(SCORE_COLUMNS) + " |", "|---|---|" + "---:|" * len(SCORE_COLUMNS),
    ]  # fmt: skip
    for row, cells in zip(lb.board.itertuples(), _cells(lb)):
        values = [(f"**{text}**" if best else text) + star.replace("*", r"\*") for text, star, best in cells]
        lines.append(f"| {row.attention} | {row.optimizer} | " + " | ".join(values) + " |")
    lines += ["", "Best per column in bold. `*`: provisional, some settings have no score or some of their lr x wd "
              "runs are missing (see notes). `—`: no score."]
    lines += ["", "## Notes", ""]
    for row, note in zip(lb.board.itertuples(), lb.shown_notes):
        lines.append(f"- **{row.attention} + {row.optimizer}**: {note or 'complete'}")
    published = comparison_lines(lb.board, lb.partial) if lb.profile == FULL_PROFILE else []
    if published:
        lines += ["", "## Against the published Transformer", "",
                  "MAD's Transformer baseline as published (docs/mad-protocol.md section 4; both trained with AdamW):", "",
                  *published]  # fmt: skip
    variants = variant_lines(lb.settings, lb.archs)
    if variants:
        lines += ["", "## Config variants side by side", "", *variants]
    if len(lb.ignored):
        lines += ["", "## Ignored files", ""] + [f"- {line}" for line in _reason_lines(lb.ignored, lb.runs_dirs)]
    return "\n".join([*lines, "", "## Plots", "", f"- {plot_note}", ""])


def _write_plots(lb: Leaderboard, out_dir: Path) -> tuple[list[Path], str]:
    scores = lb.board.set_index(lb.board["attention"] + " + " + lb.board["optimizer"])[SCORE_COLUMNS]
    written = [plots.heatmap(scores, out_dir / "heatmap.png")]
    if lb.gaps.empty:
        return written, "heatmap.png; muon_gap.png skipped: no attention has runs with both adamw and muon"
    written.append(plots.muon_gap(lb.gaps, out_dir / "muon_gap.png"))
    return written, "heatmap.png, muon_gap.png (Muon minus AdamW score per attention and task)"


def write_outputs(lb: Leaderboard, out_dir: Path) -> tuple[list[Path], str]:
    """Writes leaderboard.md/.csv, settings.csv and the plots; returns the paths and a line about the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lb.board.to_csv(out_dir / "leaderboard.csv", index=False)
    lb.settings.to_csv(out_dir / "settings.csv", index=False)
    plot_paths, plot_note = _write_plots(lb, out_dir)
    (out_dir / "leaderboard.md").write_text(_markdown(lb, plot_note))
    return [out_dir / "leaderboard.md", out_dir / "leaderboard.csv", out_dir / "settings.csv", *plot_paths], plot_note


def print_leaderboard(lb: Leaderboard, written: list[Path], plot_note: str, console: Console) -> None:
    """The table (best per column in bold green), then the notes, the ignored files and where the outputs went."""
    title = escape(f"MAD leaderboard: {_name(lb.runs_dirs)} (profile {lb.profile})")
    caption = ", ".join(f"{short}: {name}" for name, short in _SHORT.items())
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)
    table.add_column("attention", no_wrap=True)
    table.add_column("optimizer", no_wrap=True)
    for column in SCORE_COLUMNS:
        table.add_column(_SHORT.get(column, column), justify="right", no_wrap=True)
    for row, cells in zip(lb.board.itertuples(), _cells(lb)):
        values = [(f"[bold green]{text}[/bold green]" if best else text) + star for text, star, best in cells]
        table.add_row(escape(row.attention), escape(row.optimizer), *values)
    console.print(table)
    console.print(escape(lb.comparability.replace("**", "")))
    console.print(escape(_record_line(lb)))
    for row, note in zip(lb.board.itertuples(), lb.shown_notes):
        if note:
            console.print(f"[yellow]{escape(row.attention)} + {escape(row.optimizer)}:[/yellow] {escape(note)}")
    for line in _reason_lines(lb.ignored, lb.runs_dirs):
        console.print(f"[yellow]ignored:[/yellow] {escape(line)}")
    console.print(escape(f"plots: {plot_note}"))
    console.print("wrote " + ", ".join(escape(str(path)) for path in written))


def _name(runs_dirs: list[Path]) -> str:
    """The folders' names joined by `+`: the board's title and default output folder."""
    return "+".join(Path(os.path.abspath(d)).name for d in runs_dirs)


def make_leaderboard(
    runs_dirs: Path | list[Path], out_dir: Path | None = None, profile: str | None = None,
    console: Console | None = None,
) -> pd.DataFrame:
    """Aggregate the run records under ``runs_dirs``, write every output to ``out_dir`` and print the leaderboard.

    Args:
        runs_dirs (Path or list of Path): searched recursively for ``result.json`` records.
        out_dir (Path, Optional): where outputs go. Default: ``analysis/<names of runs_dirs joined by +>`` under the
            current dir.
        profile (str, Optional): keep only records of this profile; required when several profiles are present.
        console (rich.console.Console, Optional): where the table is printed. Default: a new stdout console.

    Returns the leaderboard table: one row per architecture, columns attention, optimizer, the six tasks, average
    (NaN when a task has no score), settings_scored, settings_expected, runs_ok/diverged/failed and notes.
    Raises LeaderboardError (a ValueError) when a folder is missing, none holds a valid record or they mix profiles.
    """
    lb = build_leaderboard(runs_dirs, profile)
    out_dir = Path(out_dir) if out_dir is not None else Path("analysis") / _name(lb.runs_dirs)
    written, plot_note = write_outputs(lb, out_dir)
    print_leaderboard(lb, written, plot_note, console or Console())
    return lb.board


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mad.leaderboard", description=__doc__.splitlines()[0])
    parser.add_argument("runs_dirs", type=Path, nargs="+", metavar="RUNS_DIR",
                        help="folders searched recursively for result.json")  # fmt: skip
    parser.add_argument("--out", type=Path, help="output folder (default: analysis/<names of RUNS_DIR joined by +>)")
    parser.add_argument("--profile", help="use only records of this profile (e.g. full, smoke)")
    args = parser.parse_args(argv)
    try:
        make_leaderboard(args.runs_dirs, args.out, args.profile)
    except LeaderboardError as e:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(e))}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
