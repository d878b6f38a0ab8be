"""Learning-rate schedules, stepped once per epoch: MAD's cosine, and warmup-stable-decay (WSD) with optional linear
weight-decay annealing during the decay phase.

    schedules = build_schedules(optimizers, cfg["train"]["schedule"], epochs=cfg["train"]["epochs"])
    ... after every epoch: for s in schedules: s.step()

Why per epoch, also for WSD: MAD's cosine is stepped per epoch (Lightning's default, docs/mad-protocol.md 2.3), and
the study compares the two schedules under otherwise identical loops. At MAD scale a run has 200 epochs, so the
decay phase (20 % by default) has 40 distinct learning rates and the warm-up (5 %) 10; the question asked of WSD is
what happens in the decay *phase*, which epoch steps resolve. Stepping per optimizer step would change the loop for
every schedule and gain nothing for that question. At smoke scale (a handful of epochs) the phases are coarse; the
report says which scale its numbers come from.

Epoch e = 0, 1, ..., E - 1 trains at lr(e) (the schedule is stepped after each epoch). With W warm-up epochs and D
decay epochs (fractions of E, rounded; D >= 1 whenever decay_fraction > 0):

    warm-up   e < W:               lr = base (e + 1) / (W + 1)
    stable    W <= e < E - D:      lr = base
    decay     E - D <= e:          lr = base + t (min_lr - base),  t = (e - (E - D) + 1) / D   (the last epoch: min_lr)

Weight-decay annealing (`anneal_weight_decay`) scales every param group's weight decay by 1 - t in the decay
phase, so it falls linearly with the learning rate and reaches 0 in the last epoch.
"""

from __future__ import annotations

import math
import numbers

import torch

SCHEDULES = ("cosine", "wsd")


def cosine_schedules(optimizers: list[torch.optim.Optimizer], epochs: int, min_lr: float) -> list:
    """MAD's schedule: cosine from the base lr to `min_lr` over `epochs`, stepped once per epoch, no warm-up."""
    return [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs, eta_min=min_lr) for o in optimizers]


def wsd_phases(epochs: int, warmup_fraction: float, decay_fraction: float) -> tuple[int, int]:
    """(warm-up epochs W, decay epochs D) of a WSD schedule over `epochs`; W + D <= epochs."""
    warmup = round(warmup_fraction * epochs)
    decay = max(1, round(decay_fraction * epochs)) if decay_fraction > 0 else 0
    decay = min(decay, epochs - warmup)
    return warmup, decay


def wsd_factor(epoch: int, *, epochs: int, warmup: int, decay: int) -> tuple[float, float]:
    """(f, t) of 0-based `epoch`, such that its lr is `f * base + t * (min_lr - base)` (module docstring).

    f is the warm-up multiplier (1 outside warm-up), t in [0, 1] the decay progress (0 before the decay phase).
    """
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1), 0.0
    start = epochs - decay
    if epoch < start:
        return 1.0, 0.0
    return 1.0, min(1.0, (epoch - start + 1) / decay)


class WSDSchedule:
    """Warmup-stable-decay of one optimizer's learning rate (and optionally its weight decay), per epoch.

    Args:
        optimizer (Optimizer): its param groups' current `lr` and `weight_decay` are the base values.
        epochs (int): the run's epochs E. warmup_fraction, decay_fraction (float): W / E and D / E, in [0, 1].
        min_lr (float): the lr of the last epoch.
        anneal_weight_decay (bool): also scale each group's weight decay by 1 - t in the decay phase.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        warmup_fraction: float,
        decay_fraction: float,
        min_lr: float,
        anneal_weight_decay: bool,
    ) -> None:
        self.optimizer = optimizer
        self.epochs, self.min_lr, self.anneal_weight_decay = epochs, float(min_lr), anneal_weight_decay
        self.warmup, self.decay = wsd_phases(epochs, warmup_fraction, decay_fraction)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.base_weight_decays = [group["weight_decay"] for group in optimizer.param_groups]
        self.epoch = 0
        self._apply()

    def step(self) -> None:
        """Move to the next epoch's values."""
        self.epoch += 1
        self._apply()

    def _apply(self) -> None:
        # Past the last epoch (never trained) the last epoch's values are kept.
        fraction, t = wsd_factor(min(self.epoch, self.epochs - 1), epochs=self.epochs, warmup=self.warmup,
                                 decay=self.decay)  # fmt: skip
        for group, lr, wd in zip(self.optimizer.param_groups, self.base_lrs, self.base_weight_decays):
            group["lr"] = fraction * lr + t * (self.min_lr - lr)
            if self.anneal_weight_decay:
                group["weight_decay"] = (1.0 - t) * wd

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "base_lrs": self.base_lrs, "base_weight_decays": self.base_weight_decays}


def check_schedule(schedule: dict, epochs: int) -> None:
    """ValueError naming the bad field and the allowed values, for a `train.schedule` config."""
    name = schedule.get("name")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)} (e.g. schedule=wsd)")
    _fraction_field(schedule, "min_lr", upper=math.inf)
    if name == "cosine":
        return
    warmup = _fraction_field(schedule, "warmup_fraction")
    decay = _fraction_field(schedule, "decay_fraction")
    if warmup + decay > 1.0:
        raise ValueError(
            f"train.schedule.warmup_fraction + decay_fraction must be <= 1, got {warmup} + {decay}; lower one of them"
        )
    if not isinstance(schedule.get("anneal_weight_decay"), bool):
        raise ValueError(
            f"train.schedule.anneal_weight_decay must be true or false, got {schedule.get('anneal_weight_decay')!r}"
        )


def _fraction_field(schedule: dict, key: str, upper: float = 1.0) -> float:
    value = schedule.get(key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= upper:
        allowed = "a number >= 0" if upper == math.inf else f"a number in [0, {upper:g}]"
        raise ValueError(f"train.schedule.{key} must be {allowed}, got {value!r}")
    return float(value)


def build_schedules(optimizers: list[torch.optim.Optimizer], schedule: dict, *, epochs: int) -> list:
    """One per-epoch schedule per optimizer, from a `train.schedule` config (`conf/schedule/*.yaml`).

    Every returned object has `step()`, called once after each epoch. `cosine` is exactly MAD's schedule.
    """
    check_schedule(schedule, epochs)
    if schedule["name"] == "cosine":
        return cosine_schedules(optimizers, epochs, schedule["min_lr"])
    return [
        WSDSchedule(
            o,
            epochs=epochs,
            warmup_fraction=schedule["warmup_fraction"],
            decay_fraction=schedule["decay_fraction"],
            min_lr=schedule["min_lr"],
            anneal_weight_decay=schedule["anneal_weight_decay"],
        )
        for o in optimizers
    ]
