"""`--time-budget 20m` (space key `time_budget`): how long a search may train.

Counted like Ray Tune's TimeoutStopper: wall time while a driver runs trials, from the first
trial's start, summed over resumes (the budget travels in Ray's saved state, so a resumed search
has what was left). Once it is spent the searcher proposes no more trials, and a trial in flight
stops at its next fold boundary, scored on the folds it finished, as ASHA would stop it.
"""

from __future__ import annotations

import re
import time

from ray.tune import Stopper

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
    """Seconds left, pickled with the searcher that holds it (Ray saves it with the search)."""

    live: dict[str, "TimeBudget"] = {}  # the copy in use, per search (parent run id)

    def __init__(self, seconds: float, search_id: str):
        self.seconds, self.left, self.search_id = seconds, seconds, search_id
        self._last: float | None = None
        TimeBudget.live[search_id] = self

    def spent(self) -> bool:
        now = time.monotonic()
        if self._last is not None:
            self.left -= now - self._last
        self._last = now
        return self.left <= 0

    def __getstate__(self):
        return {**self.__dict__, "_last": None}

    def __setstate__(self, state):
        """Restored (a resumed search): the clock goes on from now, the time between a kill and the
        resume not counted; trials that Ray restarts count from here, before any new one starts."""
        self.__dict__.update(state)
        self._last = time.monotonic()
        TimeBudget.live[self.search_id] = self


class FoldBoundaryStopper(Stopper):
    """Stops each trial at its first report (a fold boundary) after the budget is spent."""

    def __init__(self, search_id: str):
        self.search_id = search_id

    def __call__(self, trial_id, result) -> bool:
        budget = TimeBudget.live.get(self.search_id)
        return budget is not None and budget.spent()

    def stop_all(self) -> bool:
        return False  # the searcher ends the search: it proposes nothing once the budget is spent
