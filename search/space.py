"""Search-space files: YAML -> a validated `SearchSpec`, refused with one line before Ray starts.

A space file holds everything about a search: the fixed config values, the searched
distributions, the searcher and scheduler settings, the number of trials, concurrency and
per-trial resources. See spaces/fusion.yaml for every key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mmsa.app.commands import read_yaml
from mmsa.config import MONITORS, Config, refuse_derived
from mmsa.errors import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")


@dataclass(frozen=True)
class Key:
    """One setting of a space file: where it sits, the SearchSpec field it sets (whose default
    gives its type), and what a valid value is."""
    path: str  # "num_samples", or "section.name"
    attr: str
    check: Callable[[Any, Any], bool] = lambda value, spec: True
    expected: str = ""


KEYS = (
    Key("data_dir", "data_dir"),
    Key("metric", "metric", lambda v, s: v in MONITORS, f"one of {MONITORS}"),
    Key("num_samples", "num_samples", lambda v, s: v > 0, "> 0"),
    Key("max_concurrent", "max_concurrent", lambda v, s: v > 0, "> 0"),
    Key("max_failures", "max_failures", lambda v, s: v >= 0, ">= 0"),
    Key("seed", "seed"),
    Key("cv_folds", "cv_folds", lambda v, s: v >= 1, ">= 1 (1: one held-out split)"),
    Key("memory_budget", "memory_budget"),
    Key("time_budget", "time_budget"),
    Key("scheduler.type", "scheduler", lambda v, s: v in ("asha", "fifo"), "asha or fifo"),
    Key("scheduler.max_epochs", "max_epochs", lambda v, s: v > 0, "> 0"),
    Key("scheduler.rungs", "rungs", lambda v, s: v in ("folds", "epochs"), "folds or epochs"),
    Key("scheduler.grace_period", "grace_period", lambda v, s: 0 < v <= s.max_rung,
        "in [1, cv_folds] with rungs: folds, in [1, cv_folds x max_epochs] with rungs: epochs"),
    Key("scheduler.reduction_factor", "reduction_factor", lambda v, s: v >= 2, ">= 2"),
    Key("searcher.type", "searcher", lambda v, s: v in ("tpe", "random"), "tpe or random"),
    Key("searcher.n_startup_trials", "n_startup_trials", lambda v, s: v >= 0, ">= 0"),
    Key("searcher.start_from_defaults", "start_from_defaults"),
    Key("selection.max_members", "max_members", lambda v, s: v >= 0, ">= 0 (0: no limit)"),
    Key("selection.max_params", "max_params", lambda v, s: v >= 0, ">= 0 (0: no limit)"),
    Key("resources.cpu", "cpu", lambda v, s: v > 0, "> 0"),
    Key("resources.gpu", "gpu", lambda v, s: 0 <= v <= 1,
        "in [0, 1], or auto: a share of one GPU (a trial trains on one GPU: more would sit idle)"),
)
SECTIONS = ("scheduler", "searcher", "resources", "selection")
# Keys that older space files may hold: refused with what to do instead.
RETIRED = {"fork_trials": "removed: every trial runs as a plain Ray worker; delete the key",
           "mode": "removed: both metrics (val_acc, val_macro_f1) are maximised; delete the key"}
# Config keys the search itself decides: refused under fixed, params and --set, where they would be
# overridden without a word.
SEARCH_DECIDES = {
    "monitor": "what trials monitor is the search's `metric`",
    "max_epochs": "the epoch schedule of a search is `scheduler.max_epochs` (or --max-epochs)",
    "patience": "trials train whole schedules, and the search picks the epoch on the folds' mean curve",
    "stop_epoch": "trials train whole schedules, and the search picks the epoch on the folds' mean curve",
}


# Data keys a space may search, as a choice: each cached kind's features are built before the trials
# start (the hidden states entering the text layers that train); finetune=full trials read the
# pairs themselves. Every trial reads its own kind.
FEATURE_CHOICES = {
    "finetune": ({"none", "last_k", "full"}, "a choice among none, last_k and full"),
    "text_finetune_layers": ({str(k) for k in range(1, 49)}, "a choice of whole numbers of layers, e.g. [2, 6]"),
}


def refuse_search_decided(keys, where: str) -> None:
    for key in keys:
        if key in SEARCH_DECIDES:
            raise ConfigError(f"{where}: key '{key}' cannot be set here: {SEARCH_DECIDES[key]}")
TOP_KEYS = tuple(k.path for k in KEYS if "." not in k.path) + SECTIONS + ("fixed", "params", "warm_start")


@dataclass
class Param:
    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    values: list | None = None

    def to_optuna(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
        if self.kind == "choice":
            return CategoricalDistribution(self.values)
        if self.kind in ("int", "logint"):
            return IntDistribution(int(self.low), int(self.high), log=self.kind == "logint")
        return FloatDistribution(float(self.low), float(self.high), log=self.kind == "loguniform")

    def largest(self):
        """The largest value a trial may sample (a numeric parameter)."""
        return max(self.values) if self.kind == "choice" else self.high

    def contains(self, value) -> bool:
        """Whether a trial could have sampled `value` (a choice's value or its text, as a run's
        params hold it)."""
        if self.kind == "choice":
            return value in self.values or str(value) in map(str, self.values)
        return self.low <= float(value) <= self.high


@dataclass(frozen=True)
class SearchSpec:
    """A space file with the command line's flags over it, validated; never changed once built
    (`apply_flags` and dataclasses.replace make new ones)."""

    path: Path
    data_dir: str | None = None
    metric: str = "val_acc"  # trials monitor it; the search maximises it
    num_samples: int = 20
    max_concurrent: int = 2
    cpu: float = 1.0
    gpu: float = 0.0
    gpu_auto: bool = False  # resources.gpu: auto: the GPU memory plan decides the trials per GPU (search.gpu_memory)
    max_failures: int = 0
    seed: int = 0
    # Trials are scored by stratified K-fold cross-validation over the labeled pairs (folds seeded
    # by split_seed, the same for every trial); 1: one held-out split of val_fraction.
    cv_folds: int = 5
    scheduler: str = "asha"
    max_epochs: int = 8
    # What ASHA's rungs count: folds finished (cheap trials: judged on whole folds), or epochs
    # trained (expensive trials, e.g. finetune=full: judged after their first epoch). docs/search.md
    rungs: str = "folds"
    grace_period: int = 1  # rungs every trial trains before ASHA may stop it
    reduction_factor: int = 3
    searcher: str = "tpe"
    n_startup_trials: int = 8
    start_from_defaults: bool = True  # the first trial is the default config, where the space holds it
    # The final model's size, for ensemble selection: distinct members at most, and their
    # parameters (each member's model times its seeds: what is served) at most; 0: no limit.
    max_members: int = 0
    max_params: float = 0.0
    memory_budget: str | None = None
    time_budget: str | None = None  # e.g. 20m: the search's wall time once its features exist (search.time_budget)
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)
    warm_start: tuple[str, ...] = ()  # earlier searches' parent run ids (search.warm_start)

    @property
    def longest_schedule(self) -> int:
        """Epochs of the longest schedule a trial may train (a space may search max_epochs)."""
        return int(self.largest("max_epochs", self.max_epochs))

    def largest(self, name: str, default):
        """The largest value of config key `name` a trial may have: its searched largest, else `default`."""
        p = self.params.get(name)
        return default if p is None else p.largest()

    def most_demanding(self) -> Config:
        """The space's most demanding trial, for memory plans: its base config with the largest
        batch, width, depth, schedule and text layers fine-tuned a trial may sample, fine-tuning
        the way that holds most where any trial does (full over last_k)."""
        flat = self.base_config().to_flat()
        for name in ("batch_size", "fusion_depth", "d_model", "max_epochs", "text_finetune_layers"):
            flat[name] = type(flat[name])(self.largest(name, flat[name]))
        kinds = [str(v) for v in (getattr(self.params.get("finetune"), "values", None) or [])]
        for kind in ("last_k", "full"):
            if kind in kinds:
                flat["finetune"] = kind
        return Config.from_flat(flat, source=f"{self.path}: the most demanding trial")

    @property
    def max_rung(self) -> int:
        """Where ASHA's rungs end: every fold, or every epoch of every fold."""
        return max(self.cv_folds, 1) * (self.longest_schedule if self.rungs == "epochs" else 1)

    def base_config(self) -> Config:
        """The fixed values on top of the defaults, with what the search decides itself
        (SEARCH_DECIDES): what every trial starts from."""
        Config.from_flat(self.fixed, source=f"{self.path}: fixed")  # its own errors named as its own
        # Trials train whole schedules: cross-validation averages the folds' curves epoch by epoch
        # and picks the epoch on that mean (mmsa.training.crossval).
        decided = {"max_epochs": self.max_epochs, "monitor": self.metric, "patience": 0, "stop_epoch": 0}
        if self.data_dir is not None:
            decided["data_dir"] = self.data_dir
        return Config.from_flat({**self.fixed, **decided}, source=f"{self.path}: fixed")

    def feature_configs(self) -> list:
        """The data configs of every kind of features a trial may read (the base one first)."""
        from itertools import product
        base = self.base_config().data
        choices = {k: self.params[k].values for k in FEATURE_CHOICES if k in self.params}
        out = [base]
        for values in product(*choices.values()):
            data = dataclasses.replace(base, **dict(zip(choices, values)))
            if data.finetune != "last_k":
                data = dataclasses.replace(data, text_finetune_layers=base.text_finetune_layers)
            if data not in out:
                out.append(data)
        return out

    def optuna_space(self) -> dict:
        return {name: p.to_optuna() for name, p in self.params.items()}


def _typed(path: Path, key: str, value: Any, typ: type) -> Any:
    """A space-file value as the SearchSpec field's type, or a one-line ConfigError."""
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: key '{key}' must be true or false")
        return value
    if typ is str:
        return str(value)
    number = _number(path, key, value)
    if typ is int and not number.is_integer():
        raise ConfigError(f"{path}: '{key}' = {value!r} must be a whole number")
    return typ(number)


def _number(path: Path, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{path}: {where} = {value!r} is not a number")
    try:
        out = float(value)
    except ValueError:
        raise ConfigError(f"{path}: {where} = {value!r} is not a number") from None
    if not math.isfinite(out):
        raise ConfigError(f"{path}: {where} = {value!r} is not a finite number")
    return out


def _check_keys(path: Path, where: str, data: Any, allowed: tuple[str, ...]) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: '{where}' must be a mapping")
    for key in data:
        if not where and key in RETIRED:
            raise ConfigError(f"{path}: key '{key}' was {RETIRED[key]}")
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key '{where + '.' if where else ''}{key}' "
                              f"(known: {', '.join(allowed)})")
    return data


def _parse_param(path: Path, name: str, spec: Any, fixed: dict) -> Param:
    where = f"params.{name}"
    known = Config.known_keys()
    if name not in known:
        raise ConfigError(f"{path}: unknown key '{where}' (not a config key; known: {', '.join(sorted(known))})")
    if known[name][0] == "data" and name not in FEATURE_CHOICES:
        # The driver prepares the data once per search (features, split): a trial cannot change it.
        raise ConfigError(f"{path}: '{where}': '{name}' decides the features and the split, prepared once "
                          f"per search: set it under 'fixed' (one search per value)")
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{path}: '{where}' needs a 'type' ({', '.join(DISTRIBUTIONS)})")
    kind = spec["type"]
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{path}: '{where}': unknown distribution '{kind}' (known: {', '.join(DISTRIBUTIONS)})")
    if kind == "choice":
        _check_keys(path, where, spec, ("type", "values"))
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: '{where}.values' must be a non-empty list")
        candidates = values
        param = Param(name, kind, values=list(values))
    else:
        _check_keys(path, where, spec, ("type", "low", "high"))
        if "low" not in spec or "high" not in spec:
            raise ConfigError(f"{path}: '{where}' needs 'low' and 'high'")
        low, high = _number(path, f"{where}.low", spec["low"]), _number(path, f"{where}.high", spec["high"])
        if kind in ("int", "logint") and not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"{path}: '{where}': int bounds must be whole numbers")
        candidates = [low, high]
        param = Param(name, kind, low=low, high=high)
        if low > high:  # the bounds Optuna's distributions accept (checked here without importing it)
            raise ConfigError(f"{path}: '{where}': low {low:g} is above high {high:g}")
        if kind in ("loguniform", "logint") and low <= 0:
            raise ConfigError(f"{path}: '{where}': low {low:g} must be > 0 on a log scale")
    if name in FEATURE_CHOICES and (kind != "choice" or not set(map(str, param.values)) <= FEATURE_CHOICES[name][0]):
        raise ConfigError(f"{path}: '{where}': {FEATURE_CHOICES[name][1]}")
    for value in candidates:  # every value must make a valid config (names, ranges, types)
        try:
            Config.from_flat({**fixed, name: value})
        except ConfigError as e:
            raise ConfigError(f"{path}: '{where}': {str(e).split(': ', 1)[-1]}") from None
    return param


def load_space(path: str | Path) -> SearchSpec:
    path = Path(path)
    data = _check_keys(path, "", read_yaml(path), TOP_KEYS)
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: 'fixed' must be a mapping of config keys")
    refuse_search_decided(fixed, f"{path}: fixed")
    try:
        Config.from_flat(refuse_derived(fixed, "fixed"))
    except ConfigError as e:
        raise ConfigError(f"{path}: fixed: {str(e).split(': ', 1)[-1]}") from None
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: 'params' must be a mapping of config keys to distributions")
    refuse_derived(params, f"{path}: params")
    refuse_search_decided([k for k in params if k != "max_epochs"], f"{path}: params")  # a searched schedule is fine
    for name in params:
        if name in fixed:
            raise ConfigError(f"{path}: key '{name}' is both fixed and searched")
    warm = data.get("warm_start") or []
    if not isinstance(warm, list) or not all(isinstance(r, str) and r for r in warm):
        raise ConfigError(f"{path}: 'warm_start' must be a list of earlier searches' run ids")
    values: dict[str, Any] = {"path": path, "fixed": dict(fixed), "warm_start": tuple(warm),
                              "params": {name: _parse_param(path, name, p, fixed) for name, p in params.items()}}
    allowed = {name: tuple(k.path.split(".")[1] for k in KEYS if k.path.startswith(name + ".")) for name in SECTIONS}
    sections = {"": data, **{name: _check_keys(path, name, data.get(name) or {}, allowed[name]) for name in SECTIONS}}
    defaults = {f.name: f.default for f in fields(SearchSpec)}
    for key in KEYS:
        section, _, name = key.path.rpartition(".")
        value = sections[section].get(name)
        if key.path == "resources.gpu" and value == "auto":
            values.update(gpu=1.0, gpu_auto=True)
        elif value is not None:
            default = defaults[key.attr]
            values[key.attr] = _typed(path, key.path, value, str if default is None else type(default))
    spec = SearchSpec(**values)
    for key in KEYS:
        if not key.check(getattr(spec, key.attr), spec):
            raise ConfigError(f"{path}: key '{key.path}' must be {key.expected}")
    if spec.time_budget is not None:
        from search.time_budget import parse_duration
        parse_duration(spec.time_budget, f"{path}: time_budget")
    check_devices(spec, str(path))
    return spec


def check_devices(spec: SearchSpec, where: str) -> None:
    """The base config is valid, and asks for no GPU its trials do not reserve."""
    cfg = spec.base_config()  # the fixed values plus data_dir and max_epochs must make a valid config
    if cfg.train.device == "cuda" and spec.gpu == 0:
        raise ConfigError(f"{where}: device: cuda, but resources.gpu is 0: a trial uses only the GPU it reserves "
                          f"(set resources.gpu, or device: auto)")


def apply_flags(spec: SearchSpec, cpus: float | None = None, gpus: float | str | None = None,
                max_concurrent: int | None = None, seed: int | None = None,
                sets: dict[str, Any] | None = None) -> tuple[SearchSpec, list[str]]:
    """Command-line flags over the space file's values: resources per trial, concurrency, the
    searcher's seed, and `--set key=value` (fixes a config key; a searched key stops being
    searched). Returns the new spec and the searched keys that --set fixed."""
    key_of = {k.attr: k for k in KEYS}  # a flag is checked as the space-file key it overrides
    changes: dict[str, Any] = {}
    if gpus == "auto":
        changes.update(gpu=1.0, gpu_auto=True)
        gpus = None
    elif gpus is not None:
        changes["gpu_auto"] = False
    for flag, attr, value in (("--cpus-per-trial", "cpu", cpus), ("--gpus-per-trial", "gpu", gpus),
                              ("--max-concurrent", "max_concurrent", max_concurrent), ("--seed", "seed", seed)):
        if value is None:
            continue
        if not key_of[attr].check(value, spec):
            raise ConfigError(f"{flag} {value}: must be {key_of[attr].expected}")
        changes[attr] = value
    sets = sets or {}
    refuse_search_decided(sets, "--set")
    typed = Config.from_flat(refuse_derived(sets, "--set"), source="--set").to_flat()  # unknown keys, bad values: one line
    unsearched = [key for key in sets if key in spec.params]
    if sets:
        changes["fixed"] = {**spec.fixed, **{key: typed[key] for key in sets}}
        changes["params"] = {name: p for name, p in spec.params.items() if name not in sets}
    out = dataclasses.replace(spec, **changes)
    try:
        out.base_config()
    except ConfigError as e:
        raise ConfigError(f"--set: {str(e).split(': ', 1)[-1]}") from None
    check_devices(out, "the command line's flags")
    return out, unsearched


def check_against_data(spec: SearchSpec, n_train: int) -> None:
    """Refuse settings the data cannot satisfy, e.g. a batch larger than a fold's training part."""
    largest = int(spec.largest("batch_size", spec.base_config().train.batch_size))
    if largest > n_train:
        raise ConfigError(f"{spec.path}: key 'batch_size': {largest} is larger than the {n_train} training examples")
