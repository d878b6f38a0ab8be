"""`python -m mad.study_report RUNS_DIR [--out analysis/optimizer_study]`: the optimizer study's report.

    python -m mad.study_report runs/sweeps/optimizer_study
    python -m mad.study_report runs/sweeps/optimizer_study_smoke --out analysis/optimizer_study

Reads every `result.json` under RUNS_DIR in full (history and diagnostics included; never directory names) and
writes `report.md`, `selection.csv` and PNG plots. The report states each claim of the Parallax paper about
optimizers (issue #7 lists them), how we measure it, and a verdict:

* **supported**: the 95 % interval of the measured quantity lies entirely on the claimed side of its threshold;
* **not supported**: it does not (the numbers say whether the estimate even points the claimed way);
* **not measurable here**: the runs needed are missing, or fewer than two units (no spread).

An accuracy comparison whose runs all score at least 0.99 (CEILING) carries a caveat beside its verdict: a setting
that every compared arm solves cannot show an advantage either way, so there "not supported" means "not testable
with these settings", and harder ones are needed. Where some settings are solved by every compared arm and others
are not, the estimate leaves the solved ones out (pooled in, their near-zero differences would pull it toward zero
whatever the claim), so it is the mean over the settings some arm does not solve, a subset the data chose; the
evidence names the settings left out, and a line gives each setting's own difference.

Arms are attention x optimizer x schedule (`cosine`, `wsd`, `wsd+anneal`). Per arm and task setting, the learning
rate (and weight decay, if several were run) with the best seed-mean test accuracy is kept, as MAD selects its grid
point; `selection.csv` lists the choice. A unit is one (task setting, seed); paired comparisons match units across
arms. Each estimate gives the mean over units, the spread over seeds (standard deviation of the per-seed means over
settings), a t-interval over units and an effect size (mean distance to the threshold over the units' standard
deviation, Cohen's d). Diagnostics are the last epoch's (a run that stopped early keeps its last values); layer
statistics average the attention layers unless a claim names the deepest one. Every number comes from the profile
the header names.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mad.leaderboard import setting_label
from mad.results import RECORD_NAME, record_problem
from mad.schedules import wsd_phases

DEFAULT_OUT = Path("analysis/optimizer_study")
LAYER_KEYS = ("correction_ratio_mean", "correction_ratio_p90", "gate_mean", "negative_fraction", "above_one_fraction",
              "max_abs_weight", "sink_mass", "sink_mass_base", "entropy")  # fmt: skip
RANK_KEYS = {"sr_q": "q_proj", "sr_k": "k_proj", "sr_v": "v_proj", "sr_o": "out_proj", "sr_r": "r_proj"}
ARM = ["attention", "optimizer", "schedule"]
UNIT = ["task", "setting", "seed"]
RATIO_HIGH, RATIO_LOW = 8.0, 4.0  # the paper's correction-to-output ratios under Muon / AdamW
COLLAPSE = 0.5  # "collapse": W_R's final stable rank below this fraction of its value at initialisation
GATE_INIT = 0.5  # sigmoid(0), where every gate starts
CEILING = 0.99  # test accuracy at which a setting counts as solved: accuracy differences there test nothing
VERDICTS = ("supported", "not supported", "not measurable here")
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042)  # Student's t 0.975 quantiles, 1 to 30 degrees of freedom
_DPI = 130


class StudyError(ValueError):
    """Records that cannot make a report; the message says what to pass instead."""


# ---- loading -------------------------------------------------------------------------------------------------------


def load_runs(runs_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per finished run (status ok or diverged) under `runs_dir`, and one line per file left out."""
    rows, skipped = [], []
    for path in sorted(Path(runs_dir).rglob(RECORD_NAME)):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            skipped.append(f"{path}: unreadable ({type(e).__name__})")
            continue
        problem = record_problem(record)
        if problem or record["status"] == "failed" or not _finite(record.get("test_accuracy")):
            skipped.append(f"{path}: {problem or 'status ' + record['status'] + ' without a test accuracy'}")
            continue
        try:
            rows.append(_row(record, path))
        except (KeyError, TypeError, ValueError, IndexError) as e:  # a record of another layout: say so, go on
            skipped.append(f"{path}: malformed record ({type(e).__name__}: {e})")
    return pd.DataFrame(rows), skipped


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def schedule_label(schedule: dict | None) -> str:
    """`cosine` (also records written before schedules existed), `wsd` or `wsd+anneal`."""
    if not schedule:
        return "cosine"
    return schedule["name"] + ("+anneal" if schedule.get("anneal_weight_decay") else "")


def _row(record: dict, path: Path) -> dict:
    config, history = record["config"], record.get("history") or {}
    epochs = int(config["train"]["epochs"])
    schedule = config["train"].get("schedule")
    decay_start = 0  # epochs before WSD's decay phase; 0 for other schedules
    if schedule and schedule["name"] == "wsd":
        decay_start = epochs - wsd_phases(epochs, schedule["warmup_fraction"], schedule["decay_fraction"])[1]
    diagnostics = history.get("diagnostics")
    series = None
    if diagnostics is not None and record.get("diagnostics_at_init") is not None:
        series = _layer_series([record["diagnostics_at_init"], *diagnostics], epochs + 1)
    return {
        "path": str(path), "task": record["task"], "setting": setting_label(record["task"], record["setting"]),
        "attention": record["attention"], "optimizer": record["optimizer"], "schedule": schedule_label(schedule),
        "lr": float(record["lr"]), "weight_decay": float(record["weight_decay"]), "seed": int(record["seed"]),
        "profile": record["profile"], "comparable": bool(record["comparable_with_published_mad"]),
        "status": record["status"], "accuracy": float(record["test_accuracy"]), "epochs": epochs,
        "epochs_run": int(record.get("epochs_run") or len(history.get("test_accuracy", []))),
        "early_stop": float(config["train"].get("early_stop_accuracy", math.nan)),
        "decay_start": decay_start, "curve": _ffill(history.get("test_accuracy", []), epochs), "series": series,
        "seq_len": record["setting"].get("seq_len"), "num_train_examples": record["setting"].get("num_train_examples"),
        "device": record.get("device"),
    }  # fmt: skip


def _ffill(values: list, length: int) -> np.ndarray:
    """`values` padded to `length` with its last value: a run that stopped early keeps its last model."""
    out = np.full(length, np.nan)
    values = [v if _finite(v) else np.nan for v in values[:length]]
    out[: len(values)] = values
    if values:
        out[len(values) :] = values[-1]
    return out


def _layer_series(entries: list[dict], length: int) -> dict[str, np.ndarray]:
    """{key: [length, attention layers]} from per-epoch diagnostics (epoch 0 = initialisation), forward-filled."""
    series: dict[str, list] = {key: [] for key in (*LAYER_KEYS, *RANK_KEYS)}
    for entry in entries:
        layers = [layer for layer in entry["layers"] if "entropy" in layer]
        for key in LAYER_KEYS:
            series[key].append([layer.get(key, np.nan) for layer in layers])
        for key, name in RANK_KEYS.items():
            series[key].append([layer["stable_rank"].get(name, np.nan) for layer in layers])
    out = {}
    for key, rows in series.items():
        array = np.array(rows, dtype=float).reshape(len(rows), -1)
        padded = np.repeat(array[-1:], length, axis=0)
        padded[: len(array)] = array[:length]
        out[key] = padded
    return out


# ---- selection and statistics --------------------------------------------------------------------------------------


def select_best(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the runs at each arm and setting's best grid point, the choice per arm and setting).

    The best (lr, weight decay) has the highest mean test accuracy over seeds; ties go to the smaller lr. The choice's
    `grid_points` counts the (lr, weight decay) points it was chosen from (1: no choice).
    """
    grid = ARM + ["task", "setting", "lr", "weight_decay"]
    means = runs.groupby(grid, as_index=False).agg(mean_accuracy=("accuracy", "mean"), seeds=("seed", "nunique"))
    means = means.sort_values([*ARM, "task", "setting", "mean_accuracy", "lr"], ascending=[True] * 5 + [False, True])
    per_setting = means.groupby(ARM + ["task", "setting"], as_index=False)
    choice = per_setting.first().merge(per_setting.size().rename(columns={"size": "grid_points"}))
    chosen = runs.merge(choice[grid], on=grid)
    return chosen, choice


@dataclass
class Estimate:
    """A quantity over units: its mean, spread over seeds, 95 % t-interval over units and effect size."""

    mean: float
    seed_sd: float
    seeds: int
    n: int
    low: float
    high: float
    effect: float  # (mean - threshold) / sd over units; NaN without spread

    def text(self, digits: int = 3) -> str:
        f = f"{{:.{digits}f}}"
        effect = "n/a (no spread)" if math.isnan(self.effect) else f"{self.effect:.2f}"
        return (f"{f.format(self.mean)} (sd over {self.seeds} seeds {f.format(self.seed_sd)}; 95% CI "
                f"[{f.format(self.low)}, {f.format(self.high)}] over n = {self.n}; effect size d = {effect})")


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (table, then the Cornish-Fisher tail)."""
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.37 / df


def estimate(units: pd.DataFrame, threshold: float = 0.0) -> Estimate | None:
    """`units`: columns seed and value (one row per unit, NaNs dropped). None without any unit."""
    units = units.dropna(subset=["value"])
    if units.empty:
        return None
    values = units["value"].to_numpy(dtype=float)
    n, mean = len(values), float(values.mean())
    sd = float(values.std(ddof=1)) if n > 1 else math.nan
    half = t_quantile(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    per_seed = units.groupby("seed")["value"].mean()
    seed_sd = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else math.nan
    # No spread (identical units, up to rounding): the effect size is undefined rather than astronomically large.
    effect = (mean - threshold) / sd if n > 1 and sd > 1e-9 * max(1.0, abs(mean)) else math.nan
    return Estimate(mean, seed_sd, len(per_seed), n, mean - half, mean + half, effect)


def judge(est: Estimate | None, side: str, threshold: float) -> tuple[str, str]:
    """(verdict, why) for "the quantity is `side` (`>` or `<`) `threshold`"."""
    if est is None:
        return VERDICTS[2], "no runs (or no diagnostics) of the arms this needs"
    if est.n < 2:
        return VERDICTS[2], f"one unit only (value {est.mean:.3f}): no spread to judge it by"
    above = side == ">"
    if (est.low > threshold) if above else (est.high < threshold):
        return VERDICTS[0], f"the 95% CI lies {'above' if above else 'below'} {threshold:g}"
    if (est.high < threshold) if above else (est.low > threshold):
        return VERDICTS[1], f"contradicted: the 95% CI lies {'below' if above else 'above'} {threshold:g}"
    leaning = (est.mean > threshold) == above
    return VERDICTS[1], (f"the 95% CI includes {threshold:g} (the mean {'does' if leaning else 'does not'} point the "
                         "claimed way)")  # fmt: skip


def combine_verdicts(verdicts: list[str]) -> str:
    if VERDICTS[2] in verdicts:
        return VERDICTS[2]
    return VERDICTS[0] if all(v == VERDICTS[0] for v in verdicts) else VERDICTS[1]


# ---- quantities per run --------------------------------------------------------------------------------------------


def final(key: str, layer: str = "mean") -> Callable[[pd.Series], float]:
    """The last epoch's diagnostic `key` of a run: mean, max or deepest (`last`) over its attention layers."""

    def value(run: pd.Series) -> float:
        if run["series"] is None or key not in run["series"] or run["series"][key].shape[1] == 0:
            return math.nan
        row = run["series"][key][-1]
        if np.isnan(row).all():
            return math.nan
        return float({"mean": np.nanmean, "max": np.nanmax, "last": lambda r: r[-1]}[layer](row))

    return value


def rank_retention(key: str) -> Callable[[pd.Series], float]:
    """Final over initial stable rank of a weight (mean over attention layers)."""

    def value(run: pd.Series) -> float:
        if run["series"] is None or run["series"][key].shape[1] == 0:
            return math.nan
        first, last = run["series"][key][0], run["series"][key][-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.nanmean(last / first))

    return value


def accuracy_at(which: str) -> Callable[[pd.Series], float]:
    """Test accuracy of the record (`record`), the last epoch (`final`), or, for a run that trained in WSD's decay
    phase, the last epoch before it (`before_decay`) and the last epoch (`after_decay`); NaN for a run that stopped
    before its decay phase began (or has none)."""

    def value(run: pd.Series) -> float:
        if which == "record":
            return run["accuracy"]
        if which == "final":
            return float(run["curve"][-1])
        if not trained_in_decay(run):
            return math.nan
        return float(run["curve"][int(run["decay_start"]) - 1] if which == "before_decay" else run["curve"][-1])

    return value


def trained_in_decay(run: pd.Series) -> bool:
    """Whether a run has a WSD decay phase and trained at least one epoch in it."""
    return 0 < run["decay_start"] < run["epochs_run"]


def stopped_before_decay(run: pd.Series) -> float:
    """1.0 for a WSD run that stopped (early stop, divergence) before its decay phase began, else 0.0."""
    return float(run["decay_start"] > 0 and not trained_in_decay(run))


def units_of(chosen: pd.DataFrame, arm: tuple[str, str, str], quantity: Callable) -> pd.DataFrame:
    rows = chosen[(chosen[ARM] == pd.Series(arm, index=ARM)).all(axis=1)]
    return pd.DataFrame({**{k: rows[k] for k in UNIT}, "value": [quantity(r) for _, r in rows.iterrows()]})


def paired(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """a - b on the units present in both."""
    both = a.merge(b, on=UNIT, suffixes=("_a", "_b"))
    return pd.DataFrame({**{k: both[k] for k in UNIT}, "value": both["value_a"] - both["value_b"]})


# ---- the claims ----------------------------------------------------------------------------------------------------


@dataclass
class Claim:
    key: str
    claim: str  # the paper's statement
    measure: str  # how we test it
    verdict: str
    evidence: list[str]  # one line per number, each "<what>: <Estimate.text> -> <why>"
    caveat: str = ""  # why the verdict says less than it seems to (accuracy ceiling), or ""


def _test(name: str, est: Estimate | None, side: str, threshold: float, digits: int = 3) -> tuple[str, str]:
    verdict, why = judge(est, side, threshold)
    number = "no data" if est is None else est.text(digits)
    return verdict, f"{name} (claimed {side} {threshold:g}): {number} -> {verdict}: {why}"


def _claim(key: str, claim: str, measure: str, tests: list[tuple[str, str]], notes: list[str] = (),
           caveat: str = "") -> Claim:  # fmt: skip
    verdict = combine_verdicts([v for v, _ in tests])
    return Claim(key, claim, measure, verdict, [line for _, line in tests] + list(notes), caveat)


def ceiling_caveat(*arms: pd.DataFrame) -> str:
    """A caveat when every compared arm (accuracies per unit) has runs and all of them are at or above CEILING."""
    values = [arm["value"].dropna() for arm in arms]
    if any(v.empty for v in values):
        return ""
    lowest = min(v.min() for v in values)
    if lowest < CEILING:
        return ""
    return (f"every compared run is at the accuracy ceiling (all >= {CEILING:g}, lowest {lowest:.4f}): differences "
            "here are a few errors per thousand at most, so these settings say little about the claim either way; "
            "harder settings are needed to test it")


def solved_settings(*arms: pd.DataFrame) -> set[tuple[str, str]]:
    """The (task, setting)s where every compared arm (accuracies per unit) has runs, all at or above CEILING."""
    lowest = [arm.dropna(subset=["value"]).groupby(["task", "setting"])["value"].min() for arm in arms]
    common = set.intersection(*(set(low.index) for low in lowest)) if lowest else set()
    return {key for key in common if all(low[key] >= CEILING for low in lowest)}


def beyond_ceiling(units: pd.DataFrame, arms: list[pd.DataFrame]) -> tuple[pd.DataFrame, list[str], str]:
    """(the units to estimate from, notes, a caveat) for `units`, a paired accuracy difference between `arms`.

    Settings that every compared arm solves (`solved_settings`) leave the estimate, and a note names them: there
    each difference is a few errors per thousand whatever the claim, so pooled in they would pull the estimate
    toward zero. The estimate is then the mean over the other settings, a subset the data chose, as the note says.
    When every setting of `units` is solved, all of them stay and the caveat says how little they can test.
    """
    keys = list(zip(units["task"], units["setting"]))
    solved = solved_settings(*arms) & set(keys)
    if not solved:
        return units, [], ""
    if solved == set(keys):
        return units, [], ceiling_caveat(*(_in_settings(arm, solved) for arm in arms))
    names = ", ".join(f"{task} {setting}" for task, setting in sorted(solved))
    note = (f"left out of the estimate: {len(solved)} setting(s) that every compared run solves (test accuracy >= "
            f"{CEILING:g}): {names}; the estimate is the mean over the other settings")
    return units[[key not in solved for key in keys]], [note], ""


def _in_settings(units: pd.DataFrame, settings: set[tuple[str, str]]) -> pd.DataFrame:
    return units[[key in settings for key in zip(units["task"], units["setting"])]]


def per_setting(name: str, units: pd.DataFrame) -> list[str]:
    """One line with `units`' mean and spread per (task, setting), when there are several settings."""
    groups = units.dropna(subset=["value"]).groupby(["task", "setting"])["value"]
    if groups.ngroups < 2:
        return []
    parts = []
    for (task, setting), values in groups:
        spread = f"sd {values.std(ddof=1):.3f} over {len(values)} seeds" if len(values) > 1 else "1 seed"
        parts.append(f"{task} {setting} {values.mean():+.3f} ({spread})")
    return [f"{name} per setting: " + "; ".join(parts)]


class _Units:
    """`units(attention, optimizer, quantity, schedule)`: one quantity per unit of one arm of the chosen runs."""

    def __init__(self, chosen: pd.DataFrame) -> None:
        self.chosen = chosen

    def __call__(self, attention: str, optimizer: str, quantity: Callable, schedule: str = "cosine") -> pd.DataFrame:
        return units_of(self.chosen, (attention, optimizer, schedule), quantity)


def evaluate_claims(chosen: pd.DataFrame) -> list[Claim]:
    """Every claim of the issue, each with its verdict and numbers (module docstring for the method)."""
    u = _Units(chosen)
    return [*_ratio_claims(u), _rank_claim(u), *_accuracy_claims(u), _gate_claim(u), *_weight_claims(u),
            *_wsd_claims(u)]  # fmt: skip


def _ratio_claims(u: _Units) -> list[Claim]:
    muon = estimate(u("parallax", "muon", final("correction_ratio_mean", "last")), RATIO_HIGH)
    adamw = estimate(u("parallax", "adamw", final("correction_ratio_mean", "max")), RATIO_LOW)
    return [
        _claim("ratio_muon",
               "Under Muon the correction branch carries a large share of the output: correction-to-output ratio "
               "above 8 in the deepest layers.",
               "|o - v_bar| / |v_bar| (mean over tokens and heads) of the deepest Parallax layer at the end of "
               "training, parallax + muon.",
               [_test("deepest-layer ratio, muon", muon, ">", RATIO_HIGH)]),
        _claim("ratio_adamw", "Under AdamW the correction-to-output ratio stays below 4.",
               "The largest layer's ratio (mean over tokens and heads) at the end of training, parallax + adamw.",
               [_test("largest-layer ratio, adamw", adamw, "<", RATIO_LOW)]),
    ]  # fmt: skip


def _rank_claim(u: _Units) -> Claim:
    keep = estimate(u("parallax", "muon", rank_retention("sr_r")), COLLAPSE)
    collapse = estimate(u("parallax", "adamw", rank_retention("sr_r")), COLLAPSE)
    contrast = [(opt, estimate(u("parallax", opt, rank_retention("sr_q")))) for opt in ("muon", "adamw")]
    return _claim(
        "rank", "Under Muon W_R keeps a high stable rank; under AdamW it collapses.",
        f"W_R's stable rank at the end over its value at initialisation (mean over layers), parallax; collapse = "
        f"below {COLLAPSE:g}.",
        [_test("W_R final/initial, muon", keep, ">", COLLAPSE),
         _test("W_R final/initial, adamw", collapse, "<", COLLAPSE)],
        [f"for contrast, W_Q final/initial, {opt}: {e.text()}" for opt, e in contrast if e],
    )  # fmt: skip


def _accuracy_claims(u: _Units) -> list[Claim]:
    record = accuracy_at("record")
    arms = {(att, opt): u(att, opt, record) for att in ("parallax", "softmax") for opt in ("muon", "adamw")}
    gain = {opt: paired(arms["parallax", opt], arms["softmax", opt]) for opt in ("muon", "adamw")}
    shrink = paired(gain["muon"], gain["adamw"])
    muon, muon_left, muon_caveat = beyond_ceiling(gain["muon"], [arms["parallax", "muon"], arms["softmax", "muon"]])
    less, less_left, less_caveat = beyond_ceiling(shrink, list(arms.values()))
    adamw_alone = estimate(beyond_ceiling(gain["adamw"], list(arms.values()))[0])
    return [
        _claim("beats_softmax", "Under Muon Parallax beats softmax attention.",
               "Test accuracy (MAD's, at the lowest-perplexity epoch) of parallax minus softmax, both with Muon, "
               "paired by setting and seed.",
               [_test("accuracy gain, muon", estimate(muon), ">", 0.0)],
               muon_left + per_setting("gain", gain["muon"]), caveat=muon_caveat),
        _claim("advantage_adamw", "Under AdamW the advantage over softmax shrinks or vanishes.",
               "(parallax - softmax) accuracy with Muon minus the same with AdamW, paired by setting and seed.",
               [_test("advantage(muon) - advantage(adamw)", estimate(less), ">", 0.0)],
               less_left + per_setting("advantage(muon) - advantage(adamw)", shrink)
               + ([f"advantage under adamw alone: {adamw_alone.text()}"] if adamw_alone else [])
               + per_setting("advantage under adamw", gain["adamw"]),
               caveat=less_caveat),
    ]  # fmt: skip


def _gate_claim(u: _Units) -> Claim:
    adamw = u("parallax_gated", "adamw", final("gate_mean"))
    gap = paired(u("parallax_gated", "muon", final("gate_mean")), adamw)
    return _claim(
        "gate", "A gated model learns to suppress the correction under AdamW.",
        f"The gate g (mean over heads, tokens and layers) of parallax_gated at the end: below its initial "
        f"{GATE_INIT:g} with AdamW, and lower than with Muon (paired).",
        [_test("gate, adamw", estimate(adamw, GATE_INIT), "<", GATE_INIT),
         _test("gate(muon) - gate(adamw)", estimate(gap), ">", 0.0)],
    )  # fmt: skip


def _weight_claims(u: _Units) -> list[Claim]:
    negative = estimate(u("parallax", "muon", final("negative_fraction")))
    largest = estimate(u("parallax", "muon", final("max_abs_weight", "max")), 1.0)
    above_one = estimate(u("parallax", "muon", final("above_one_fraction")))
    sink = paired(u("parallax", "muon", final("sink_mass")), u("softmax", "muon", final("sink_mass")))
    entropy = paired(u("parallax", "muon", final("entropy")), u("softmax", "muon", final("entropy")))
    return [
        _claim("weights", "Parallax's effective weights go negative and beyond one in magnitude.",
               "Effective weights w = p(1 + g(u_bar - u)) of parallax + muon at the end: the fraction of negative "
               "weights (mean over layers) and the largest |w| (max over layers).",
               [_test("negative fraction", negative, ">", 0.0, 4), _test("largest |w|", largest, ">", 1.0)],
               [f"fraction with |w| > 1: {above_one.text(4)}"] if above_one else []),
        _claim("sink", "The attention sink on the first token shrinks.",
               "Mean effective weight on the first position (rows i >= 1, mean over layers), parallax minus "
               "softmax, both with Muon, paired.",
               [_test("sink mass difference", estimate(sink), "<", 0.0, 4)]),
        _claim("entropy", "Parallax's base softmax stays more diffuse (higher entropy).",
               "Mean entropy (nats) of the base softmax rows, parallax minus softmax, both with Muon, paired.",
               [_test("entropy difference", estimate(entropy), ">", 0.0)]),
    ]  # fmt: skip


def _wsd_claims(u: _Units) -> list[Claim]:
    points = (("wsd", "before_decay"), ("wsd", "after_decay"), ("wsd+anneal", "after_decay"))
    # [parallax, softmax] accuracy units per (schedule, epoch), and their paired difference: the advantage
    runs = {(schedule, which): [u(attention, "muon", accuracy_at(which), schedule)
                                for attention in ("parallax", "softmax")]
            for schedule, which in points}  # fmt: skip
    advantage = {point: paired(*arms) for point, arms in runs.items()}
    before, after, annealed = points
    erosion_all = paired(advantage[before], advantage[after])
    restored_all = paired(advantage[annealed], advantage[after])
    erosion, erosion_left, erosion_caveat = beyond_ceiling(erosion_all, runs[before] + runs[after])
    restored, restored_left, restored_caveat = beyond_ceiling(restored_all, runs[annealed] + runs[after])

    def stopped_note(schedules: tuple[str, ...]) -> list[str]:
        counts = pd.concat([u(attention, "muon", stopped_before_decay, schedule)["value"]
                            for attention in ("parallax", "softmax") for schedule in schedules])  # fmt: skip
        if not counts.sum():
            return []
        return [f"{int(counts.sum())} of {len(counts)} runs of these arms stopped (early stop) before their decay "
                "phase began, so they never trained in it and are left out; the claim needs WSD runs that train "
                "to the end (train.early_stop_accuracy=1)"]
    return [
        _claim("wsd_erosion", "The advantage erodes during the decay phase of a warmup-stable-decay schedule.",
               "(parallax - softmax) test accuracy with Muon and WSD at the last epoch before the decay phase minus "
               "at the last epoch, paired.",
               [_test("advantage lost in the decay phase", estimate(erosion), ">", 0.0)],
               erosion_left + per_setting("advantage lost", erosion_all) + stopped_note(("wsd",)),
               caveat=erosion_caveat),
        _claim("wsd_anneal", "Annealing weight decay during the decay phase partly restores the advantage.",
               "(parallax - softmax) final test accuracy with Muon, WSD with weight-decay annealing minus WSD "
               "without, paired.",
               [_test("advantage regained by annealing", estimate(restored), ">", 0.0)],
               restored_left + per_setting("advantage regained", restored_all) + stopped_note(("wsd", "wsd+anneal")),
               caveat=restored_caveat),
    ]  # fmt: skip


# ---- plots ---------------------------------------------------------------------------------------------------------


def _curve(chosen: pd.DataFrame, arm: tuple, values: Callable[[pd.Series], np.ndarray | None]) -> tuple | None:
    """(mean, sd over seeds) per epoch of `values(run)` for one arm: averaged over settings per seed first."""
    rows = chosen[(chosen[ARM] == pd.Series(arm, index=ARM)).all(axis=1)]
    arrays = [(r["seed"], values(r)) for _, r in rows.iterrows()]
    arrays = [(s, a) for s, a in arrays if a is not None]
    if not arrays or len({len(a) for _, a in arrays}) > 1:
        return None
    seeds = sorted({s for s, _ in arrays})
    per_seed = np.array([np.nanmean([a for s2, a in arrays if s2 == s], axis=0) for s in seeds])
    sd = per_seed.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(per_seed.shape[1])
    return per_seed.mean(axis=0), sd


def _layer_values(key: str, layer: int | None = None) -> Callable[[pd.Series], np.ndarray | None]:
    def values(run: pd.Series) -> np.ndarray | None:
        if run["series"] is None or run["series"][key].shape[1] == 0:
            return None
        series = run["series"][key]
        if layer is None:
            return np.nanmean(series, axis=1) if not np.isnan(series).all() else None
        return series[:, layer] if layer < series.shape[1] else None

    return values


def _band(ax, x, curve, **style) -> None:
    mean, sd = curve
    ax.plot(x, mean, **style)
    ax.fill_between(x, mean - sd, mean + sd, alpha=0.15, color=style.get("color"))


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def plot_accuracy(chosen: pd.DataFrame, path: Path) -> Path:
    per_seed = chosen.groupby([*ARM, "task", "seed"])["accuracy"].mean()
    stats = per_seed.groupby([*ARM, "task"]).agg(["mean", "std"]).reset_index()
    tasks = sorted(stats["task"].unique())
    arms = stats[ARM].drop_duplicates().values.tolist()
    fig = Figure(figsize=(3.0 + 1.8 * len(tasks), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / max(len(arms), 1)
    for j, (attention, optimizer, schedule) in enumerate(arms):
        s = stats[(stats[ARM] == pd.Series([attention, optimizer, schedule], index=ARM)).all(axis=1)]
        s = s.set_index("task").reindex(tasks)
        label = f"{attention} + {optimizer}" + ("" if schedule == "cosine" else f" ({schedule})")
        ax.bar(np.arange(len(tasks)) - 0.4 + (j + 0.5) * width, s["mean"], width, yerr=s["std"].fillna(0),
               label=label, capsize=2)  # fmt: skip
    ax.set_xticks(range(len(tasks)), labels=[t.replace("_", " ") for t in tasks], fontsize=8)
    ax.set_ylabel("test accuracy (mean over settings; bars: sd over seeds)", fontsize=8)
    ax.set_title("Accuracy per arm (best lr per arm and setting)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def plot_over_training(chosen: pd.DataFrame, path: Path, panels: list[tuple[str, str, list[tuple]]]) -> Path:
    """One panel per (title, y label, [(arm, values, label, style)]), epochs on x (0 = initialisation)."""
    fig = Figure(figsize=(5.0 * len(panels), 3.8))
    for i, (title, ylabel, lines) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for arm, values, label, style in lines:
            curve = _curve(chosen, arm, values)
            if curve is not None:
                _band(ax, np.arange(len(curve[0])), curve, label=label, **style)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel, fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_weights(chosen: pd.DataFrame, path: Path) -> Path:
    keys = [("negative_fraction", "mean"), ("above_one_fraction", "mean"), ("max_abs_weight", "max"),
            ("sink_mass", "mean"), ("entropy", "mean")]  # fmt: skip
    cosine = chosen[chosen["schedule"] == "cosine"]
    arms = sorted({(a, o) for a, o in zip(cosine["attention"], cosine["optimizer"])})
    fig = Figure(figsize=(3.2 * len(keys), 3.6))
    for i, (key, layer) in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        stats = [estimate(units_of(chosen, (a, o, "cosine"), final(key, layer))) for a, o in arms]
        ax.bar(range(len(arms)), [s.mean if s else np.nan for s in stats],
               yerr=[0 if not s or math.isnan(s.seed_sd) else s.seed_sd for s in stats], capsize=2,
               color=[_OPTIMIZER_COLORS.get(o, "tab:gray") for _, o in arms])  # fmt: skip
        ax.set_xticks(range(len(arms)), labels=[f"{a}\n{o}" for a, o in arms], fontsize=6, rotation=45)
        ax.set_title(f"{key} ({layer} over layers)", fontsize=8)
    return _save(fig, path)


_OPTIMIZER_COLORS = {"muon": "tab:red", "adamw": "tab:blue"}
_LAYER_STYLES = ("-", "--", ":", "-.")


def _per_layer_lines(attention: str, key: str, layers: int) -> list[tuple]:
    """Plot lines of one diagnostic of an arm: colour = optimizer, line style = layer (0 = first attention layer)."""
    return [((attention, opt, "cosine"), _layer_values(key, layer), f"{opt}, layer {layer}",
             {"color": color, "linestyle": _LAYER_STYLES[layer % len(_LAYER_STYLES)]})
            for opt, color in _OPTIMIZER_COLORS.items() for layer in range(layers)]  # fmt: skip


def write_plots(chosen: pd.DataFrame, out: Path) -> list[Path]:
    layers = max((r["series"]["entropy"].shape[1] for _, r in chosen.iterrows() if r["series"] is not None), default=0)
    ratio = "|o - v_bar| / |v_bar| (mean)"
    ratio_panels = [(f"{a}: correction ratio per layer", ratio, _per_layer_lines(a, "correction_ratio_mean", layers))
                    for a in ("parallax", "parallax_gated")]  # fmt: skip
    rank_lines = lambda opt: [(("parallax", opt, "cosine"), _layer_values(key), name, {"color": color})  # noqa: E731
                              for key, name, color in (("sr_r", "W_R", "tab:green"), ("sr_q", "W_Q", "tab:gray"))]
    rank_panels = [(f"parallax + {opt}: stable rank", "stable rank (mean over layers)", rank_lines(opt))
                   for opt in _OPTIMIZER_COLORS]  # fmt: skip
    gate_panel = [("parallax_gated: gate", "g (mean over heads, tokens)",
                   _per_layer_lines("parallax_gated", "gate_mean", layers))]  # fmt: skip
    return [
        plot_accuracy(chosen, out / "accuracy.png"),
        plot_over_training(chosen, out / "correction_ratio.png", ratio_panels),
        plot_over_training(chosen, out / "stable_rank.png", rank_panels),
        plot_over_training(chosen, out / "gate.png", gate_panel),
        plot_weights(chosen, out / "weights.png"),
        _plot_advantage(chosen, out / "advantage.png"),
    ]


def _plot_advantage(chosen: pd.DataFrame, path: Path) -> Path:
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.add_subplot()
    colors = {"cosine": "tab:gray", "wsd": "tab:orange", "wsd+anneal": "tab:purple"}
    for schedule, color in colors.items():
        for optimizer, style in (("muon", "-"), ("adamw", "--")):
            a = units_curves(chosen, ("parallax", optimizer, schedule))
            b = units_curves(chosen, ("softmax", optimizer, schedule))
            keys = sorted(set(a) & set(b))
            if not keys:
                continue
            seeds = sorted({k[2] for k in keys})
            per_seed = np.array([np.mean([a[k] - b[k] for k in keys if k[2] == s], axis=0) for s in seeds])
            sd = per_seed.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(per_seed.shape[1])
            x = np.arange(1, per_seed.shape[1] + 1)
            _band(ax, x, (per_seed.mean(axis=0), sd), label=f"{schedule}, {optimizer}", color=color, linestyle=style)
    starts = chosen.loc[chosen["decay_start"] > 0, "decay_start"]
    if not starts.empty:
        ax.axvspan(float(starts.min()) + 0.5, float(chosen["epochs"].max()) + 0.5, color="tab:orange", alpha=0.08,
                   label="WSD decay phase")  # fmt: skip
    ax.axhline(0.0, color="black", linewidth=0.7)
    ax.set_xlabel("epoch")
    ax.set_ylabel("parallax - softmax test accuracy")
    ax.set_title("Advantage over training (band: sd over seeds)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _save(fig, path)


def units_curves(chosen: pd.DataFrame, arm: tuple) -> dict[tuple, np.ndarray]:
    rows = chosen[(chosen[ARM] == pd.Series(arm, index=ARM)).all(axis=1)]
    return {tuple(r[k] for k in UNIT): r["curve"] for _, r in rows.iterrows()}


# ---- the report ----------------------------------------------------------------------------------------------------


def describe_scale(runs: pd.DataFrame) -> list[str]:
    """Markdown lines saying which scale (profile, sizes, epochs, devices) the numbers come from."""
    (profile,) = runs["profile"].unique()
    comparable = bool(runs["comparable"].all())
    lines = [f"**Scale: profile `{profile}`** — "
             + ("the published MAD protocol's sizes." if comparable else
                "**smoke scale: CPU-sized runs (short sequences, few examples and epochs). These numbers test the "
                "pipeline; they are not comparable with the paper or with published MAD scores, and say nothing "
                "about the claims at MAD scale.**"), "",
             "| task | settings | seq_len | train sequences | epochs | runs | devices |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for task, rows in runs.groupby("task"):
        devices = ", ".join(sorted({str(d).split(" (")[0] for d in rows["device"]}))
        lines.append(f"| {task} | {_distinct(rows['setting'])} | {_distinct(rows['seq_len'])} | "
                     f"{_distinct(rows['num_train_examples'])} | {_distinct(rows['epochs'])} | {len(rows)} | "
                     f"{devices} |")  # fmt: skip
    return lines


def per_arm_table(chosen: pd.DataFrame, column: str = "accuracy", digits: int = 3) -> list[str]:
    """Per arm and task: `column` averaged over settings per seed, then mean ± sd over seeds (seeds in brackets)."""
    per_seed = chosen.groupby([*ARM, "task", "seed"])[column].mean()
    return _arm_table(per_seed.groupby([*ARM, "task"]).agg(["mean", "std", "count"]), digits)


def per_setting_table(chosen: pd.DataFrame, column: str = "accuracy", digits: int = 3) -> list[str]:
    """Per arm and (task, setting): `column`'s mean ± sd over seeds (seeds in brackets)."""
    return _arm_table(_setting_labels(chosen.groupby([*ARM, "task", "setting"])[column].agg(["mean", "std", "count"])),
                      digits)


def _setting_labels(frame: pd.DataFrame | pd.Series) -> pd.DataFrame | pd.Series:
    """`frame` indexed by the ARM columns, task and setting, re-indexed by the ARM columns and "task setting"."""
    frame.index = pd.MultiIndex.from_tuples([(*arm, f"{task} {setting}") for *arm, task, setting in frame.index])
    return frame


def _natural(label: str) -> list:
    """Sort key that orders the numbers inside labels by value: vocab_size=64 before vocab_size=128."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]


def _arm_table(stats: pd.DataFrame, digits: int) -> list[str]:
    """A Markdown table of `stats` (mean, std, count; indexed by the ARM columns and one column label)."""
    def cell(row: pd.Series) -> str:
        spread = "n/a" if math.isnan(row["std"]) else f"{row['std']:.{digits}f}"
        return f"{row['mean']:.{digits}f} ± {spread} ({int(row['count'])})"

    return _matrix(stats.apply(cell, axis=1))


def _matrix(cells: pd.Series) -> list[str]:
    """A Markdown table with a row per arm and a column per label: `cells` (text) is indexed by the ARM columns and
    the column label; a missing cell shows —."""
    columns = sorted({key[-1] for key in cells.index}, key=_natural)
    lines = ["| attention | optimizer | schedule | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for arm in sorted({key[:-1] for key in cells.index}):
        row = [cells.get((*arm, column), "—") for column in columns]
        lines.append(f"| {' | '.join(arm)} | " + " | ".join(row) + " |")
    return lines


def grid_table(runs: pd.DataFrame) -> list[str]:
    """Per arm and (task, setting): the learning rates it ran there (the selection chooses among these; weight decays
    too where there were several)."""
    def cell(rows: pd.DataFrame) -> str:
        wds = rows["weight_decay"].dropna().unique()
        return _distinct(rows["lr"], "{:g}") + (f" (wd {_distinct(rows['weight_decay'], '{:g}')})" if len(wds) > 1 else "")

    return _matrix(_setting_labels(runs.groupby([*ARM, "task", "setting"])[["lr", "weight_decay"]].apply(cell)))


def _distinct(values: pd.Series, fmt: str = "{}") -> str:
    """The distinct non-missing values, sorted, each formatted with `fmt`, comma-separated."""
    return ", ".join(fmt.format(v) for v in sorted(values.dropna().unique()))


def markdown(runs: pd.DataFrame, chosen: pd.DataFrame, claims: list[Claim], skipped: list[str], plots: list[Path],
             runs_dir: Path, out_dir: Path) -> str:  # fmt: skip
    (profile,) = runs["profile"].unique()
    stop = ", ".join(f"{v:g}" for v in sorted(runs["early_stop"].dropna().unique())) or "not recorded"
    scale = "" if runs["comparable"].all() else " (SMOKE SCALE: pipeline check, not evidence)"
    out = [f"# Optimizer study: does Muon unlock Parallax's correction branch?{scale}", "",
           f"Generated by `python -m mad.study_report {runs_dir} --out {out_dir}` from {len(runs)} run records "
           f"({len(chosen)} at the selected learning rates; {len(skipped)} files left out); the runs come from the "
           "presets conf/sweep/optimizer_study.yaml (full) and optimizer_study_smoke.yaml (smoke), whose headers give "
           "the commands. Do not edit by hand.", "",
           *describe_scale(runs), "", "## Verdicts", "",
           "| claim (Parallax paper) | verdict |", "|---|---|",
           *[f"| {c.claim} | **{c.verdict}**{' (all compared runs at the accuracy ceiling)' if c.caveat else ''} |"
             for c in claims], "",
           f"Every number below comes from profile `{profile}`.", "", "## Claims and numbers", ""]  # fmt: skip
    for c in claims:
        out += [f"### {c.claim}", "", f"*Measured as:* {c.measure}", "", f"**Verdict: {c.verdict}** "
                f"(scale: `{profile}`)", "", *[f"- {line}" for line in c.evidence],
                *([f"- **Caveat:** {c.caveat}"] if c.caveat else []), ""]  # fmt: skip
    out += ["## Accuracy per arm", "", "Test accuracy (MAD's macro accuracy at the lowest-perplexity epoch) at each "
            "arm's best learning rate per setting: mean over settings and seeds ± sd over seeds (of the per-seed "
            "means over settings), seeds in brackets.", "", *per_arm_table(chosen), "",
            "Per setting (the same runs; — where an arm has no runs of a setting): the means above average whatever "
            "settings each arm ran, so compare arms there only where this table shows the same settings.", "",
            *per_setting_table(chosen), "",
            f"Epochs trained (the same runs): a run stops after the first epoch whose test accuracy exceeds "
            f"train.early_stop_accuracy ({stop}), so where every arm solves a setting, fewer epochs is the faster "
            "learner (but the learning rate was chosen on accuracy alone).", "",
            *per_arm_table(chosen, "epochs_run", 1), "",
            f"Learning rates each arm ran per setting (weight decay {_distinct(runs['weight_decay'], '{:g}')}): the "
            "selection above chose among these, so where a cell holds one, that arm had no choice there "
            "(`selection.csv`'s grid_points).", "", *grid_table(runs), "", "## Plots", "",
            "Curves over training: a run that stops early keeps its last model, so its curve stays flat from its "
            "last epoch on.", ""]  # fmt: skip
    out += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    out += ["## Method", "", __doc__.split("\n\n", 2)[2].strip(), "",
            f"Thresholds: ratio above {RATIO_HIGH:g} (Muon) / below {RATIO_LOW:g} (AdamW) as the paper states them; "
            f"'collapse' = W_R's final stable rank below {COLLAPSE:g} x its initial value (our operationalisation; "
            f"W_Q shown for contrast); the gate starts at {GATE_INIT:g}. Diagnostics: mad/diagnostics.py.",
            ""]  # fmt: skip
    if skipped:
        out += ["## Files left out", "", *[f"- {line}" for line in skipped[:20]],
                *([f"- ... and {len(skipped) - 20} more"] if len(skipped) > 20 else []), ""]  # fmt: skip
    return "\n".join(out)


def make_report(runs_dir: Path, out: Path = DEFAULT_OUT, profile: str | None = None) -> Path:
    """Write report.md, selection.csv and the plots to `out`; returns the report's path."""
    runs, skipped = load_runs(runs_dir)
    if runs.empty:
        raise StudyError(f"no finished run records under {runs_dir}; run `python -m mad.run -m +sweep=optimizer_study`")
    profiles = sorted(runs["profile"].unique())
    if profile is None and len(profiles) > 1:
        raise StudyError(f"{runs_dir} mixes profiles {', '.join(profiles)}; pick one with --profile")
    if profile is not None:
        if profile not in profiles:
            raise StudyError(f"no runs of profile {profile!r} under {runs_dir}; present: {', '.join(profiles)}")
        runs = runs[runs["profile"] == profile].reset_index(drop=True)
    chosen, choice = select_best(runs)
    claims = evaluate_claims(chosen)
    out.mkdir(parents=True, exist_ok=True)
    choice.to_csv(out / "selection.csv", index=False)
    plots = write_plots(chosen, out)
    report = out / "report.md"
    report.write_text(markdown(runs, chosen, claims, skipped, plots, runs_dir, out))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mad.study_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--profile", default=None, help="use only runs of this profile (required if several)")
    args = parser.parse_args(argv)
    try:
        report = make_report(args.runs_dir, args.out, args.profile)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
