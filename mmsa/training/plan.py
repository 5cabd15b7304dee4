"""The plan of a final model: the members to train on all labeled pairs, each with its full
config, the epochs of its schedule to train, its weight, its seeds and the run it came from.

The search writes one (search/ensemble.py: the members ensemble selection chose, as `plan.json` on
its parent run); `mmsa.final` resolves a run to one, or builds one from `--members`, and executes
it with `train_plan`. One versioned document, read back by `Plan.from_dict` alone:

    {"format": "mmsa-plan", "version": 1, "metric": "val_acc", "origin": "search <run id>",
     "members": [{"name": "trial 3f2a_00004", "kind": "model", "config": {flat config},
                  "epochs": 4, "weight": 0.6, "seeds": 5, "source": "<trial run id>"},
                 {"name": "linear probe", "kind": "probe", "config": {...}, "epochs": 0,
                  "weight": 0.4, "seeds": 1, "source": "<search run id>"}]}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmsa.config import Config, DataConfig
from mmsa.errors import ConfigError

FORMAT = "mmsa-plan"
VERSION = 1
KINDS = ("model", "probe")  # model: trained by mmsa.training.fit; probe: the linear probe (mmsa.models.probe)
# Models of a member trained on cached features, from consecutive seeds, sharing its weight (5 seeds
# were worth 0.91 points over one in nested CV: docs/results.md); one where it fine-tunes both
# backbones (finetune=full), whose every model costs a whole fine-tuning and a copy of both backbones.
CACHED_SEEDS = 5


# The fixed fine-tuning recipe (--members ...,finetune), kept for comparison with what the search
# selects: the whole text backbone trains at lr * text_lr_scale = 3e-5 on the cached embedding
# output, an mlp head on it and the cached image tokens at 1e-3, for 2 epochs of a 3-epoch warm-up +
# cosine schedule (the epoch cross-validation chose: bench/results/cv_finetune.md).
FINETUNE_RECIPE = {"finetune": "last_k", "head": "mlp", "pooling": "mean", "lr": 1e-3, "text_lr_scale": 0.03,
                   "max_epochs": 3}
FINETUNE_EPOCHS = 2


def default_seeds(cfg: Config) -> int:
    return 1 if cfg.data.finetune == "full" else CACHED_SEEDS


@dataclass(frozen=True)
class PlanMember:
    name: str  # what users read: "trial 3f2a_00004", "linear probe", "fine-tuning recipe"
    kind: str  # one of KINDS
    config: Config  # the whole config it trains with (the probe: the data it reads and its head)
    epochs: int  # epochs of its schedule to train (where its folds' mean peaked); 0 for the probe
    weight: float  # its share of the final model's averaged probabilities
    seeds: int = 1  # models trained from seeds config.seed, +1, ..., sharing `weight`
    source: str = ""  # the run it comes from: a trial's run id, the search's for the probe

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "config": self.config.to_flat(), "epochs": self.epochs,
                "weight": self.weight, "seeds": self.seeds, "source": self.source}

    @classmethod
    def from_dict(cls, entry: Any, where: str) -> PlanMember:
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: a member must be a mapping")
        missing = [k for k in ("name", "kind", "config", "epochs", "weight") if k not in entry]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        name = str(entry["name"])
        if not isinstance(entry["config"], dict):
            raise ConfigError(f"{where} ({name}): 'config' must be a mapping of config keys")
        member = cls(name=name, kind=str(entry["kind"]),
                     config=Config.from_stored(entry["config"], source=f"{where} ({name}) config"),
                     epochs=_number(entry["epochs"], int, f"{where} ({name}) epochs"),
                     weight=_number(entry["weight"], float, f"{where} ({name}) weight"),
                     seeds=_number(entry.get("seeds", 1), int, f"{where} ({name}) seeds"),
                     source=str(entry.get("source") or ""))
        member.check(where)
        return member

    def check(self, where: str) -> None:
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind '{self.kind}' is not one of {', '.join(KINDS)}")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            problems.append(f"weight {self.weight} must be > 0")
        if self.seeds < 1:
            problems.append(f"seeds {self.seeds} must be >= 1")
        if self.kind == "model" and not 1 <= self.epochs <= self.config.train.max_epochs:
            problems.append(f"epochs {self.epochs} must be in [1, max_epochs = {self.config.train.max_epochs}]")
        if problems:
            raise ConfigError(f"{where} ({self.name}): {'; '.join(problems)}")

    def stopping(self) -> Config:
        """Its config, stopping after `epochs` of its schedule."""
        return self.config.with_train(stop_epoch=self.epochs if self.kind == "model" else 0)


def finetune_recipe(cfg: Config) -> PlanMember:
    """FINETUNE_RECIPE on `cfg`'s data, every layer of its text backbone training (counted from the
    backbone's config, no weights loaded)."""
    from mmsa.features.encoders import text_shape
    keep = {k: getattr(cfg.data, k) for k in ("data_dir", "cache_dir", "text_encoder", "image_encoder",
                                               "max_text_len", "text_clean", "split_seed")}
    recipe = Config.from_flat({**keep, **FINETUNE_RECIPE, "text_finetune_layers": text_shape(cfg.data.text_encoder).layers,
                               "seed": cfg.train.seed, "device": cfg.train.device, "num_threads": cfg.train.num_threads},
                              source="--members finetune")
    return PlanMember("fine-tuning recipe", "model", recipe, FINETUNE_EPOCHS, 1.0, default_seeds(recipe), "finetune")


def stored_config(params: dict[str, Any], source: str) -> Config:
    """The config a run trained, from its logged params: the keys the config knows (a search's run
    holds others too), read as an earlier version stored them (Config.from_stored)."""
    known = Config.known_keys()
    return Config.from_stored({k: v for k, v in params.items() if k in known}, source)


def trial_member(name: str, params: dict[str, Any], best_epoch: int, run_id: str, weight: float = 1.0) -> PlanMember:
    """A trial run as a member of a plan: the config its params hold, trained for its best epoch.
    The one conversion, for the search's plan and for mmsa.final's --run-id of a trial alike."""
    cfg = stored_config(params, f"run {run_id} params")
    return PlanMember(name, "model", cfg, min(best_epoch, cfg.train.max_epochs), weight, default_seeds(cfg), run_id)


def _number(value: Any, typ: type, where: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and value != int(value)):
        raise ConfigError(f"{where}: {value!r} is not a{'' if typ is float else ' whole'} number")
    return typ(value)


@dataclass(frozen=True)
class Plan:
    members: tuple[PlanMember, ...]
    metric: str = "val_acc"  # what the search selected by
    origin: str = ""  # what it was made from, for the user: "search <id>", "trial <id>", "--members ..."

    def __post_init__(self):
        if not self.members:
            raise ConfigError(f"plan of {self.origin or 'a run'}: no members")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "metric": self.metric, "origin": self.origin,
                "members": [m.to_dict() for m in self.members]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> Plan:
        """The one loader: every field checked, each problem one line naming `where`."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{where}: not an mmsa plan (no \"format\": \"{FORMAT}\")")
        version = data.get("version")
        if version != VERSION:
            raise ConfigError(f"{where}: plan version {version!r}; this mmsa reads version {VERSION}"
                              + (" (written by a newer mmsa: upgrade it)" if isinstance(version, int)
                                 and version > VERSION else ""))
        entries = data.get("members")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{where}: 'members' must be a non-empty list")
        members = tuple(PlanMember.from_dict(e, f"{where}: member {i + 1}") for i, e in enumerate(entries))
        return cls(members, metric=str(data.get("metric", "val_acc")), origin=str(data.get("origin", "")))

    def describe(self) -> str:
        return " + ".join(f"{m.name} ({m.weight:.2f}" + (f", {m.seeds} seeds" if m.seeds > 1 else "") + ")"
                          for m in self.members)

    def reading(self, data_dir: str) -> Plan:
        """The same plan, every member reading `data_dir`."""
        return dataclasses.replace(self, members=tuple(
            dataclasses.replace(m, config=_with_data_dir(m.config, data_dir)) for m in self.members))

    def chosen(self) -> PlanMember:
        """The member of most weight (the first of equals): whose config the final run shows."""
        return max(self.members, key=lambda m: m.weight)


def _with_data_dir(cfg: Config, data_dir: str) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))


def merge(parts: list[tuple[float, Plan]], origin: str) -> Plan:
    """Plans joined, each taking its share of the weight; the same member in two of them (the probe
    named and also selected, a trial selected and named as the best one, with as many seeds)
    becomes one member with both shares."""
    merged: dict[tuple, PlanMember] = {}
    for share, plan in parts:
        total = sum(m.weight for m in plan.members)
        for m in plan.members:
            key = ("probe",) if m.kind == "probe" else (m.source or m.name, m.seeds)
            weight = share * m.weight / total
            merged[key] = dataclasses.replace(merged[key], weight=merged[key].weight + weight) if key in merged \
                else dataclasses.replace(m, weight=weight)
    return Plan(tuple(merged.values()), metric=parts[0][1].metric, origin=origin)


# ---------------------------------------------------------------- executing a plan

def train_plan(plan: Plan, prepared: Callable[[DataConfig], Any], on_epoch=None,
               log: Callable[[str], None] = lambda line: None, jobs: int = 1) -> tuple[list, list[float]]:
    """Every member of `plan` trained on all labeled pairs: (the final model's members, each a
    weighted model (mmsa.models.ensemble.Member), in the plan's order, and their last training
    losses). `prepared(data config)` -> the Prepared data whose `train` is every labeled pair
    (mmsa.features.prepare.Preparations). `jobs` > 1: the models on cached features train that many
    at a time, each in a process of its own with its share of the cores (one line per model, not
    per epoch); models that fine-tune both backbones train one at a time, here."""
    from mmsa.models.ensemble import Member
    models = [(m, i) for m in plan.members if m.kind == "model" for i in range(m.seeds)]
    apart = [job for job in models if job[0].config.data.finetune != "full"] if jobs > 1 else []
    trained = _train_apart(apart, jobs, log) if apart else {}
    members, losses = [], []
    for m in plan.members:
        data = prepared(m.config.data)
        if m.kind == "probe":
            from mmsa.models.factory import probe_head
            from mmsa.models.probe import fit_probe
            log(f"member: {m.name}")
            cfg = m.config.with_features(data.features)
            weights = fit_probe(data.features, data.train, lexicon=cfg.model.lexicon)
            members.append(Member(m.name, cfg, probe_head(cfg, *weights), m.weight))
            continue
        if not any(job[0] is m for job in apart):
            log(f"member: {m.name}, {m.seeds} model(s) for {m.epochs} of {m.config.train.max_epochs} scheduled epochs")
        for i in range(m.seeds):
            seeded = _seeded(m, i)
            if (id(m), i) in trained:
                model, cfg, loss = trained[id(m), i]
            else:
                from mmsa.training.fit import fit
                if m.seeds > 1:
                    log(f"{m.name}: seed {seeded.train.seed}")
                result = fit(seeded, data.features, data.train, None, on_epoch=on_epoch,
                             progress=seeded.data.finetune == "full")
                model, cfg, loss = result.model, result.cfg, result.metrics["train_loss"]
            members.append(Member(f"{m.name}, seed {seeded.train.seed}" if m.seeds > 1 else m.name, cfg, model,
                                  weight=m.weight / m.seeds))
            losses.append(loss)
    return members, losses


def _seeded(m: PlanMember, i: int) -> Config:
    """The config of model i of a member: stopping at its epochs, from seed config.seed + i."""
    return m.stopping().with_train(seed=m.config.train.seed + i)


def _train_apart(jobs: list, workers: int, log) -> dict:
    """{(id(member), i): (model, its config, loss)}: each job (member, i) trained in one of
    `workers` processes (spawned: torch's threads and memory stay theirs), each with its share of
    the cores."""
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from mmsa.models.factory import create_model
    threads = max(1, (os.cpu_count() or 1) // workers)
    out = {}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_train_one, _seeded(m, i).to_flat(), threads): (m, i) for m, i in jobs}
        for done in as_completed(futures):
            m, i = futures[done]
            flat, state, loss, seconds = done.result()
            cfg = Config.from_flat(flat, source=f"{m.name}, trained")
            model = create_model(cfg)
            model.load_state_dict(state)
            out[id(m), i] = (model.eval(), cfg, loss)
            log(f"{m.name}, seed {cfg.train.seed}: trained {m.epochs} epoch(s) in {seconds:.0f}s, loss {loss:.4f}")
    return out


_PREPARED: dict = {}  # in a training process: the data of each kind of features, prepared once


def _train_one(flat: dict, threads: int) -> tuple[dict, dict, float, float]:
    """One model of a plan, in a process of train_plan's: (its config with its feature sizes, its
    weights, its last training loss, seconds)."""
    import time

    import torch

    from mmsa.features.prepare import Preparations
    from mmsa.training.fit import fit
    torch.set_num_threads(threads)
    cfg = Config.from_flat(flat, source="a plan's model")
    data = _PREPARED.setdefault("prepared", Preparations())(cfg.data)
    start = time.time()
    result = fit(cfg.with_train(num_threads=threads), data.features, data.train, None)
    # its config as planned (the threads its process had are not the model's), with its feature sizes
    sized = dataclasses.replace(cfg, model=result.cfg.model)
    return sized.to_flat(), result.model.state_dict(), result.metrics["train_loss"], time.time() - start
