"""Periods and budgets as text: ``"500 steps"``, ``"64k samples"``, ``"1M tokens"``, ``"90 s"``, ``"30 min"``, ``"2h"``.

``Progress`` holds what training has done in each unit; a ``Period`` is an amount of one of them.
"""

import re
from dataclasses import dataclass
from typing import Any

from xlab.errors import UserError

UNITS = {
    **dict.fromkeys(("step", "steps"), ("steps", 1)),
    **dict.fromkeys(("sample", "samples"), ("samples", 1)),
    **dict.fromkeys(("token", "tokens"), ("tokens", 1)),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), ("seconds", 1)),
    **dict.fromkeys(("min", "mins", "minute", "minutes"), ("seconds", 60)),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), ("seconds", 3600)),
    **dict.fromkeys(("d", "day", "days"), ("seconds", 86400)),
}
SCALES = {"": 1, "k": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
PERIOD_SYNTAX = re.compile(
    r"\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<scale>[kMBG]?)\s*(?P<unit>[A-Za-z]+(?:\s+[A-Za-z]+)*)\s*"
)
PERIOD_HELP = (
    "write a positive number and a unit: steps, samples, tokens, s, min, h or d, "
    "optionally scaled by k, M or B (500 steps, 64k samples, 1M tokens, 30 min, 2h)"
)


@dataclass
class Progress:
    """What training has done: optimizer steps, samples and tokens (summed over processes), seconds of wall time."""

    steps: int = 0
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def get(self, unit: str) -> float:
        return getattr(self, unit)


@dataclass(frozen=True)
class Period:
    """An amount of one of the counts in ``Progress``: a period between events or a budget."""

    amount: float
    unit: str
    text: str = ""

    @classmethod
    def parse(cls, text: Any, setting: str) -> "Period":
        """``"1M tokens"`` -> ``Period(1e6, "tokens")``; a ``UserError`` naming ``setting`` for anything else."""
        match = PERIOD_SYNTAX.fullmatch(str(text))
        if match is None:
            raise bad_period(setting, text, "not a period")
        name = match["unit"].lower()
        if name not in UNITS:
            raise bad_period(setting, text, f"unknown unit {match['unit']!r}")
        unit, seconds_per_unit = UNITS[name]
        amount = float(match["number"]) * SCALES[match["scale"]] * seconds_per_unit
        if amount <= 0:
            raise bad_period(setting, text, "it must be more than zero")
        if unit != "seconds" and not amount.is_integer():
            raise bad_period(setting, text, f"a number of {unit} must be whole")
        return cls(amount, unit, str(text).strip())

    def crossed(self, before: Progress, after: Progress) -> bool:
        """Whether going from ``before`` to ``after`` passes a multiple of the period.

        Periods fire at multiples (1M, 2M, 3M tokens), not at a distance from the last firing, so that
        where the next one falls follows from the counts alone and a resumed run keeps the schedule.
        """
        return after.get(self.unit) // self.amount > before.get(self.unit) // self.amount

    def reached(self, progress: Progress) -> bool:
        return progress.get(self.unit) >= self.amount

    def __str__(self) -> str:
        return self.text or f"{self.amount:g} {self.unit}"


def bad_period(setting: str, text: Any, problem: str) -> UserError:
    return UserError(f"{setting}={text!r}: {problem}; {PERIOD_HELP}")


def parse_optional(text: str | None, setting: str) -> Period | None:
    return None if text is None else Period.parse(text, setting)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
