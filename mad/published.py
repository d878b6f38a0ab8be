"""Published MAD scores of the Transformer baseline, and our softmax rows set beside them.

The numbers are docs/mad-protocol.md section 4's (tables a and e), in [0, 1], six tasks:

- the MAD paper's Transformer (Poli et al. 2024, as reproduced in the DeltaNet paper's MAD table): average 0.745;
- an independent re-run of the mad-lab code with 4 layers of width 128 (github.com/HassanJbara/lin-attn-bench, branch
  `mad`): average 0.764. Its Transformer's attention is not MAD's: fla's `Attention` with 2 heads of dim 64 and a
  128-token sliding window (its evals/mad/mad_eval_transformer.py), where MAD's (and ours) has 16 heads of dim 8.
  Its branch (first commit Aug 2025) imports a mad-lab clone it does not pin; mad-lab's main has kept PyTorch's
  Linear init since Dec 2024, so its language models most likely trained under that init.

`TRANSFORMER_SETUPS` says how each published Transformer differs from ours, and the leaderboard prints it under the
table, so that a gap is read with its cause in view.

Only a leaderboard of the full protocol is comparable with them (mad/leaderboard.py says which one is), and both were
trained with AdamW: Muon rows differ in the optimizer too.
"""

from __future__ import annotations

import math

import pandas as pd

from mad.tasks import TASKS

PUBLISHED_TRANSFORMER: dict[str, dict[str, float]] = {
    "MAD paper (Poli et al. 2024)": {
        "in_context_recall": 0.941, "noisy_in_context_recall": 0.868, "fuzzy_in_context_recall": 0.298,
        "selective_copying": 0.996, "compression": 0.516, "memorization": 0.852, "average": 0.745,
    },
    "independent re-run (lin-attn-bench)": {
        "in_context_recall": 0.905, "noisy_in_context_recall": 0.897, "fuzzy_in_context_recall": 0.565,
        "selective_copying": 0.998, "compression": 0.432, "memorization": 0.788, "average": 0.764,
    },
}  # fmt: skip
TRANSFORMER_SETUPS: dict[str, str] = {
    "MAD paper (Poli et al. 2024)": "the architecture ours follows (4 layers of width 128, attention with 16 heads "
    "of dim 8), from the paper-era code, which drew every Linear weight from N(0, 0.02), as ours does by default "
    "(`model.linear_init=normal`; mad-lab's code keeps PyTorch's init since Dec 2024; docs/mad-protocol.md 2.1)",
    "independent re-run (lin-attn-bench)": "mad-lab's training loop and released data, cloned after mad-lab's Dec "
    "2024 init change (so PyTorch's Linear init, our `model.linear_init=pytorch`), and its attention is fla's "
    "`Attention` with 2 heads of dim 64 and a 128-token sliding window, not 16 heads of dim 8",
}
COLUMNS = [*TASKS, "average"]


def comparison_lines(board: pd.DataFrame, partial: pd.DataFrame) -> list[str]:
    """Markdown: the softmax rows of `board` (a leaderboard of the full protocol) over the published Transformer
    scores, then ours minus each published score for every complete task score. `partial` (one row per row of
    `board`, in its order; columns the tasks and the average) marks scores over fewer settings than the protocol's,
    which are shown with `*` and never differenced. Empty when the board has no softmax row."""
    rows = [(row, flags) for (_, row), (_, flags) in zip(board.iterrows(), partial.iterrows())
            if row["attention"] == "softmax"]  # fmt: skip
    if not rows:
        return []
    lines = ["| scores | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for row, flags in rows:
        lines.append(f"| ours: softmax + {row['optimizer']} | " + " | ".join(
            _cell(row[c], bool(flags[c])) for c in COLUMNS) + " |")  # fmt: skip
    for source, scores in PUBLISHED_TRANSFORMER.items():
        lines.append(f"| {source} | " + " | ".join(f"{scores[c]:.3f}" for c in COLUMNS) + " |")
    lines += ["", "`*`: some settings have no score or some of their lr x wd runs are missing (not comparable yet). "
              "`—`: no score.", ""]
    lines += [*(f"- {source}: {setup}." for source, setup in TRANSFORMER_SETUPS.items()), ""]
    for row, flags in rows:
        complete = [c for c in COLUMNS if not math.isnan(row[c]) and not flags[c]]
        if not complete:
            lines.append(f"- softmax + {row['optimizer']}: no complete task score yet, nothing to compare.")
            continue
        for source, scores in PUBLISHED_TRANSFORMER.items():
            deltas = ", ".join(f"{c} {row[c] - scores[c]:+.3f}" for c in complete)
            lines.append(f"- softmax + {row['optimizer']} minus the {source}: {deltas}.")
    return lines


def _cell(value: float, partial: bool) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}" + (r"\*" if partial else "")
