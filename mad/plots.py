"""Leaderboard plots, drawn on matplotlib `Figure` objects (Agg canvas): no pyplot, no global backend state."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

_DPI = 150
_LABELLED_GROUPS = 6  # above this many attentions, bar values are not printed (they would overlap)


def heatmap(scores: pd.DataFrame, path: Path) -> Path:
    """Architecture x task heatmap of MAD scores, each cell annotated (``—`` where there is no score).

    Args:
        scores (pd.DataFrame): ``[architectures, tasks]``, values in [0, 1] or NaN; the index labels the rows of
            the plot (one per architecture, so that long leaderboards grow downwards), the columns its columns.
        path (Path): the PNG to write.
    """
    values = scores.to_numpy(dtype=float)  # (architectures, tasks)
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(3.0 + 1.0 * n_cols, 1.6 + 0.32 * n_rows))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (r, c), value in np.ndenumerate(values):
        text, color = ("—", "black") if math.isnan(value) else (f"{value:.3f}", "black" if value > 0.6 else "white")
        ax.text(c, r, text, ha="center", va="center", color=color, fontsize=8)
    ax.set_yticks(range(n_rows), labels=[str(label) for label in scores.index], fontsize=8)
    labels = [textwrap.fill(str(task).replace("_", " "), 14) for task in scores.columns]
    ax.set_xticks(range(n_cols), labels=labels, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title("MAD score: best over lr x wd, mean over settings, mean over tasks", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def muon_gap(gaps: pd.DataFrame, path: Path) -> Path:
    """Grouped bar chart of Muon minus AdamW scores: one group per attention, one bar per task (and the average).

    Args:
        gaps (pd.DataFrame): ``[attentions, tasks]``, differences in [-1, 1]; NaN (a score missing on either side)
            is drawn as ``n/a`` instead of a bar.
        path (Path): the PNG to write.
    """
    n_groups, n_bars = gaps.shape
    width = 0.8 / n_bars
    fig = Figure(figsize=(5.5 + 1.4 * n_groups, 4.5))
    ax = fig.add_subplot()
    for j, task in enumerate(gaps.columns):
        x = np.arange(n_groups) - 0.4 + (j + 0.5) * width
        values = gaps[task].to_numpy(dtype=float)
        bars = ax.bar(x, np.nan_to_num(values), width, label=str(task).replace("_", " "))
        show_values = n_groups <= _LABELLED_GROUPS
        labels = ["n/a" if math.isnan(v) else f"{v:+.3f}" if show_values else "" for v in values]
        ax.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(n_groups), labels=[str(label) for label in gaps.index], fontsize=8)
    ax.set_ylabel("Muon − AdamW score")
    ax.set_title("Muon minus AdamW, per attention and task (positive: Muon better)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path
