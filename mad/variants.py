"""Config variants of one architecture side by side: the same attention x optimizer trained under configs that differ
(e.g. `model.linear_init=normal` against `pytorch`), compared setting by setting on the settings both have scored.

The leaderboard gives each variant a row of its own (`softmax[3f2a]`); its task scores average over different sets
of settings while sweeps are incomplete, so they are not comparable with each other. This table is: every setting
scored by at least two variants, their best accuracies, and (for two) the difference.
"""

from __future__ import annotations

import pandas as pd

from mad.tasks import TASKS


def variant_lines(settings: pd.DataFrame, archs: pd.DataFrame) -> list[str]:
    """Markdown, one table per attention x optimizer that has several variants; empty when none has.

    settings: the leaderboard's settings table (columns attention [the variant's label], optimizer, task,
        setting_label, in_grid, best_accuracy). archs: columns attention, optimizer, arch (the label), variant.
    """
    lines = []
    for (attention, optimizer), group in archs.groupby(["attention", "optimizer"], sort=True):
        if len(group) < 2:
            continue
        labels = sorted(group["arch"])
        lines += [f"### {attention} + {optimizer}", ""]
        lines += [f"- `{label}`: {group.loc[group['arch'] == label, 'variant'].iloc[0]}" for label in labels]
        lines += ["", *_table(settings, optimizer, labels), ""]
    return lines[:-1]


def _table(settings: pd.DataFrame, optimizer: str, labels: list[str]) -> list[str]:
    mine = settings[(settings["optimizer"] == optimizer) & settings["attention"].isin(labels) & settings["in_grid"]]
    wide = mine.pivot_table(index=["task", "setting_label"], columns="attention", values="best_accuracy", sort=False)
    wide = wide.reindex(columns=labels)
    wide = wide[wide.notna().sum(axis=1) >= 2]
    if wide.empty:
        return ["No setting has a score under two of these variants yet."]
    two = len(labels) == 2
    header = ["task", "setting", *(f"`{label}`" for label in labels), *(["difference"] if two else [])]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    order = sorted(wide.index, key=lambda key: TASKS.index(key[0]))  # stable: the leaderboard's setting order
    for task, label in order:
        values = wide.loc[(task, label)]
        cells = [_cell(v) for v in values] + ([_cell(values.iloc[1] - values.iloc[0], signed=True)] if two else [])
        lines.append(f"| {task} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{len(wide)} settings scored by at least two variants; " + (
        f"difference: `{labels[1]}` minus `{labels[0]}`." if two else "`—`: no score."))  # fmt: skip
    return lines


def _cell(value: float, signed: bool = False) -> str:
    if pd.isna(value):
        return "—"
    return f"{value:+.3f}" if signed else f"{value:.3f}"
