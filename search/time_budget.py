"""`--time-budget 20m` (space key `time_budget`): how long a search takes once its features exist.

Wall time while a driver runs, from the moment the feature cache is ready (the probe's
cross-validation and the trials inside it), summed over resumes; the selection and the report
after it take seconds (printed). Once it is spent the searcher proposes no more trials, and a
trial in flight stops at the end of the epoch it is in (it knows the deadline:
search.trainable.TrialData.deadline), scored on the folds it finished; the stopper
(search.driver.BudgetStopper) stops it at its next fold otherwise. No Ray here: validating a
space file parses durations.
"""

from __future__ import annotations

import re
import time

from mmsa.errors import UserError

# Starting Ray and a trial process alone takes tens of seconds: below this no fold can end.
MIN_SECONDS = 60
_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str, where: str) -> float:
    """'90s', '20m', '1h30m', '1.5h' or plain seconds -> seconds; a one-line UserError otherwise."""
    s = str(text).strip().lower()
    parts = re.fullmatch(r"((?:\d+(?:\.\d+)?[smh])+|\d+(?:\.\d+)?)", s)
    if not parts:
        raise UserError(f"{where} {text}: not a duration (e.g. 90s, 20m, 1h30m)")
    seconds = float(s) if s[-1].isdigit() else sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", s))
    if seconds < MIN_SECONDS:
        raise UserError(f"{where} {text}: shorter than {MIN_SECONDS} s, too short for one fold of one trial "
                        f"(starting Ray and a trial process alone takes tens of seconds)")
    return seconds


def describe(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m else f"{s} s"


class TimeBudget:
    """Seconds left of a search's budget. One object is shared by the searcher (no new trials once
    spent), the stopper (trials end at their next fold) and the recorder (which records what is
    left); trials are told its deadline; Ray pickles all three in one state, so they share it after a resume too, and the
    stopper carries `state()` in Ray's periodic experiment checkpoint."""

    def __init__(self, seconds: float, spent_already: float = 0.0):
        """The clock runs from now, `spent_already` seconds of it gone (the probe's, before Ray's trials)."""
        self.seconds, self.left = seconds, seconds - spent_already
        self._last: float | None = time.monotonic()

    def spent(self) -> bool:
        now = time.monotonic()
        if self._last is not None:
            self.left -= now - self._last
        self._last = now
        return self.left <= 0

    def deadline(self) -> float:
        """When it runs out, in wall-clock time (time.time(), what a trial on another node reads too)."""
        self.spent()
        return time.time() + self.left

    def state(self) -> dict:
        self.spent()  # brought up to now
        return {"seconds": self.seconds, "left": self.left}

    def restore(self, state: dict) -> None:
        """A resumed search: what was left when Ray last saved it; the clock goes on from now (the
        time between a kill and the resume not counted; trials that Ray restarts count from here)."""
        self.seconds, self.left = state["seconds"], state["left"]
        self._last = time.monotonic()

    def __getstate__(self):
        return {**self.__dict__, "_last": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._last = time.monotonic()
