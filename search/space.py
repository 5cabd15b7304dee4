"""Search-space files: YAML -> a validated `SearchSpec`, refused with one line before Ray starts.

A space file holds everything about a search: the fixed config values, the searched
distributions, the searcher and scheduler settings, the number of trials, concurrency and
per-trial resources. See spaces/fusion.yaml for every key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmsa.cli import read_yaml
from mmsa.config import MONITORS, Config, refuse_derived
from mmsa.errors import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")
TOP_KEYS = ("data_dir", "metric", "mode", "num_samples", "max_concurrent", "resources", "max_failures",
            "seed", "cv_folds", "scheduler", "searcher", "fixed", "params", "memory_budget",
            "fork_trials")
SCHEDULER_KEYS = ("type", "max_epochs", "grace_period", "reduction_factor")
SEARCHER_KEYS = ("type", "n_startup_trials", "start_from_defaults")
RESOURCE_KEYS = ("cpu", "gpu")


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


@dataclass
class SearchSpec:
    path: Path
    data_dir: str | None = None
    metric: str = "val_acc"
    mode: str = "max"
    num_samples: int = 20
    max_concurrent: int = 2
    cpu: float = 1.0
    gpu: float = 0.0
    max_failures: int = 0
    seed: int = 0
    # Trials are scored by stratified K-fold cross-validation over the labeled pairs (folds seeded
    # by split_seed, the same for every trial); 1: one held-out split of val_fraction.
    cv_folds: int = 5
    scheduler: str = "asha"
    max_epochs: int = 8
    grace_period: int = 1  # folds every trial trains before ASHA may stop it
    reduction_factor: int = 3
    searcher: str = "tpe"
    n_startup_trials: int = 8
    start_from_defaults: bool = True  # the first trial is the default config, where the space holds it
    memory_budget: str | None = None
    # Opt-in, for tight memory on one CPU machine: trials fork from one process that imported torch
    # (search/forkserver.py), sharing its pages. Off, every trial is a plain Ray worker.
    fork_trials: bool = False
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)

    def base_config(self) -> Config:
        """The fixed values on top of the defaults (what every trial starts from)."""
        cfg = Config.from_flat(self.fixed, source=f"{self.path}: fixed")
        cfg.train.max_epochs = self.max_epochs
        if self.data_dir is not None:
            cfg.data.data_dir = self.data_dir
        return cfg

    def trial_config(self, sampled: dict[str, Any]) -> Config:
        cfg = self.base_config()
        cfg.update(sampled, source=f"{self.path}: params")
        return cfg

    def optuna_space(self) -> dict:
        return {name: p.to_optuna() for name, p in self.params.items()}


def _flag(path: Path, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: key '{key}' must be true or false")
    return value


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
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key '{where + '.' if where else ''}{key}' "
                              f"(known: {', '.join(allowed)})")
    return data


def _parse_param(path: Path, name: str, spec: Any, fixed: dict) -> Param:
    where = f"params.{name}"
    known = Config.known_keys()
    if name not in known:
        raise ConfigError(f"{path}: unknown key '{where}' (not a config key; known: {', '.join(sorted(known))})")
    if known[name][0] == "data":
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
        if low >= high:
            raise ConfigError(f"{path}: '{where}': low ({spec['low']}) must be below high ({spec['high']})")
        if kind in ("loguniform", "logint") and low <= 0:
            raise ConfigError(f"{path}: '{where}': a log-scale bound must be positive (low = {spec['low']})")
        if kind in ("int", "logint") and not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"{path}: '{where}': int bounds must be whole numbers")
        candidates = [low, high]
        param = Param(name, kind, low=low, high=high)
    for value in candidates:  # every value must make a valid config (names, ranges, types)
        try:
            Config.from_flat({**fixed, name: value})
        except ConfigError as e:
            raise ConfigError(f"{path}: '{where}': {str(e).split(': ', 1)[-1]}") from None
    return param


def load_space(path: str | Path) -> SearchSpec:
    path = Path(path)
    data = _check_keys(path, "", read_yaml(path), TOP_KEYS)
    spec = SearchSpec(path=path)
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: 'fixed' must be a mapping of config keys")
    try:
        Config.from_flat(refuse_derived(fixed, "fixed"))
    except ConfigError as e:
        raise ConfigError(f"{path}: fixed: {str(e).split(': ', 1)[-1]}") from None
    spec.fixed = dict(fixed)
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: 'params' must be a mapping of config keys to distributions")
    refuse_derived(params, f"{path}: params")
    for name in params:
        if name in fixed:
            raise ConfigError(f"{path}: key '{name}' is both fixed and searched")
    spec.params = {name: _parse_param(path, name, p, fixed) for name, p in params.items()}

    for key, typ in (("data_dir", str), ("metric", str), ("mode", str), ("num_samples", int),
                     ("max_concurrent", int), ("max_failures", int), ("seed", int), ("cv_folds", int),
                     ("memory_budget", str)):
        if key in data and data[key] is not None:
            value = data[key]
            if typ is int:
                number = _number(path, key, value)
                if not number.is_integer():
                    raise ConfigError(f"{path}: '{key}' = {value!r} must be a whole number")
                value = int(number)
            setattr(spec, key, typ(value))
    if data.get("fork_trials") is not None:
        spec.fork_trials = _flag(path, "fork_trials", data["fork_trials"])
    sched = _check_keys(path, "scheduler", data.get("scheduler") or {}, SCHEDULER_KEYS)
    spec.scheduler = sched.get("type", spec.scheduler)
    for key in ("max_epochs", "grace_period", "reduction_factor"):
        if key in sched:
            setattr(spec, key, int(_number(path, f"scheduler.{key}", sched[key])))
    search = _check_keys(path, "searcher", data.get("searcher") or {}, SEARCHER_KEYS)
    spec.searcher = search.get("type", spec.searcher)
    if "start_from_defaults" in search:
        spec.start_from_defaults = _flag(path, "searcher.start_from_defaults", search["start_from_defaults"])
    if "n_startup_trials" in search:
        spec.n_startup_trials = int(_number(path, "searcher.n_startup_trials", search["n_startup_trials"]))
    res = _check_keys(path, "resources", data.get("resources") or {}, RESOURCE_KEYS)
    spec.cpu = _number(path, "resources.cpu", res.get("cpu", spec.cpu))
    spec.gpu = _number(path, "resources.gpu", res.get("gpu", spec.gpu))

    checks = [
        ("metric", spec.metric in MONITORS, f"one of {MONITORS}"),
        ("mode", spec.mode in ("max", "min"), "max or min"),
        ("num_samples", spec.num_samples > 0, "> 0"),
        ("max_concurrent", spec.max_concurrent > 0, "> 0"),
        ("max_failures", spec.max_failures >= 0, ">= 0"),
        ("scheduler.type", spec.scheduler in ("asha", "fifo"), "asha or fifo"),
        ("scheduler.max_epochs", spec.max_epochs > 0, "> 0"),
        ("cv_folds", spec.cv_folds >= 1, ">= 1 (1: one held-out split)"),
        ("scheduler.grace_period", 0 < spec.grace_period <= max(spec.cv_folds, 1), "in [1, cv_folds] (folds)"),
        ("scheduler.reduction_factor", spec.reduction_factor >= 2, ">= 2"),
        ("searcher.type", spec.searcher in ("tpe", "random"), "tpe or random"),
        ("searcher.n_startup_trials", spec.n_startup_trials >= 0, ">= 0"),
        ("resources.cpu", spec.cpu > 0, "> 0"),
        ("resources.gpu", spec.gpu >= 0, ">= 0"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{path}: key '{key}' must be {expected}")
    spec.base_config()  # the fixed values plus data_dir and max_epochs must make a valid config
    return spec


def apply_flags(spec: SearchSpec, cpus: float | None = None, gpus: float | None = None,
                max_concurrent: int | None = None, seed: int | None = None,
                sets: dict[str, Any] | None = None) -> list[str]:
    """Command-line flags over the space file's values: resources per trial, concurrency, the
    searcher's seed, and `--set key=value` (fixes a config key; a searched key stops being
    searched). Returns the searched keys that --set fixed."""
    for flag, value, ok, expected in (("--cpus-per-trial", cpus, cpus is None or cpus > 0, "> 0"),
                                      ("--gpus-per-trial", gpus, gpus is None or gpus >= 0, ">= 0"),
                                      ("--max-concurrent", max_concurrent,
                                       max_concurrent is None or max_concurrent > 0, "> 0")):
        if not ok:
            raise ConfigError(f"{flag} {value}: must be {expected}")
    spec.cpu = spec.cpu if cpus is None else cpus
    spec.gpu = spec.gpu if gpus is None else gpus
    spec.max_concurrent = spec.max_concurrent if max_concurrent is None else max_concurrent
    spec.seed = spec.seed if seed is None else seed
    typed = Config.from_flat(refuse_derived(sets or {}, "--set"), source="--set").to_flat()  # unknown keys, bad values: one line
    unsearched = []
    for key in sets or {}:
        spec.fixed[key] = typed[key]
        if spec.params.pop(key, None) is not None:
            unsearched.append(key)
    try:
        spec.base_config()
    except ConfigError as e:
        raise ConfigError(f"--set: {str(e).split(': ', 1)[-1]}") from None
    return unsearched


def check_against_data(spec: SearchSpec, n_train: int) -> None:
    """Refuse settings the data cannot satisfy, e.g. a batch larger than a fold's training part."""
    sizes = [spec.base_config().train.batch_size]
    if "batch_size" in spec.params:
        p = spec.params["batch_size"]
        sizes = p.values if p.kind == "choice" else [p.high]
    too_big = [int(s) for s in sizes if int(s) > n_train]
    if too_big:
        raise ConfigError(f"{spec.path}: key 'batch_size': {max(too_big)} is larger than the "
                          f"{n_train} training examples")
