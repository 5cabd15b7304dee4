"""The one ensemble mechanism: a final model is a list of weighted members, whose class
probabilities are averaged with their weights. Each member is a trained model with its own
config, and so with the features (cache) it reads: the models of several seeds, of each fold of
a search, the linear probe and any blend are all members.

Checkpoint: {"format": 3, "labels": [...], "members": [{"name", "weight", "config": flat config,
"model": state_dict}]}, loadable with torch.load(weights_only=True). The backbones are never in it:
they load from their packages (or the hub) by the names in each member's config.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmsa.config import Config, DataConfig
from mmsa.data.dataset import LABELS, Example
from mmsa.data.files import write_atomically
from mmsa.errors import UserError

FORMAT = 3


@dataclass
class Member:
    name: str  # what it is, e.g. "chosen config, seed 1" or "linear probe"
    cfg: Config  # with its feature sizes (FitResult.cfg)
    model: torch.nn.Module
    weight: float = 1.0  # its share of the averaged probabilities, before normalising


def save_members(path: Path, members: list[Member]) -> None:
    """Written to a temporary file, then renamed into place."""
    buffer = io.BytesIO()  # torch.save reports a full disk as a RuntimeError; a plain write, as OSError
    torch.save({"format": FORMAT, "labels": list(LABELS),
                "members": [{"name": m.name, "weight": m.weight, "config": m.cfg.to_flat(),
                             "model": m.model.state_dict()} for m in members]}, buffer)
    write_atomically(path, buffer.getvalue())


def load_members(path: str | Path, device: torch.device | None = None) -> list[Member]:
    """The members of a checkpoint, in eval mode. Earlier formats load too: one model (1), and
    members without weights whose config may hold an `ensemble` of K models in one state dict (2)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"{path}: not a loadable mmsa checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or ("members" not in ckpt and "model" not in ckpt):
        raise UserError(f"{path}: not an mmsa checkpoint (no 'members' or 'model')")
    if list(ckpt.get("labels", LABELS)) != list(LABELS):
        raise UserError(f"{path}: labels {ckpt['labels']} differ from this version's {list(LABELS)}")
    entries = ckpt.get("members") or [{"name": "chosen config", "config": ckpt["config"], "model": ckpt["model"]}]
    from mmsa.models.factory import create_model
    members = []
    for entry in entries:
        cfg = Config.from_stored(entry["config"], source=f"{path}: member '{entry['name']}'")
        for name, weight, state in _split_ensemble(entry):
            model = create_model(cfg)
            model.load_state_dict(state)
            members.append(Member(name, cfg, model.to(device or "cpu").eval(), weight))
    return members


def _split_ensemble(entry: dict) -> list[tuple[str, float, dict]]:
    """(name, weight, state_dict) of each model in a checkpoint entry: a format-2 entry whose
    config has `ensemble: K` holds K models as `members.<i>.*`, each 1/K of the entry's weight."""
    weight, k = float(entry.get("weight", 1.0)), int(entry["config"].get("ensemble", 1))
    if k == 1:
        return [(entry["name"], weight, entry["model"])]
    return [(f"{entry['name']}, model {i + 1}", weight / k,
             {key.split(".", 2)[2]: v for key, v in entry["model"].items() if key.startswith(f"members.{i}.")})
            for i in range(k)]


def feature_key(cfg: DataConfig) -> tuple:
    """Members with equal keys read the same features."""
    return (cfg.text_encoder, cfg.image_encoder, cfg.max_text_len, cfg.text_clean, cfg.finetune,
            cfg.text_finetune_layers if cfg.finetune == "last_k" else 0)


def average_probabilities(probs, weights=None) -> np.ndarray:
    """(rows, classes): members' class probabilities (members, rows, classes) averaged with
    their weights (equal where none are given). The one way this project blends models."""
    return np.average(np.asarray(probs), axis=0, weights=weights)


FeaturesFor = Callable[[DataConfig], tuple]  # data config -> (features, rows to predict)


def predict_members(members: list[Member], features_for: FeaturesFor, device: torch.device) -> np.ndarray:
    """(rows, classes): the members' class probabilities averaged with their weights.
    `features_for` is called once per distinct feature key; the members reading the same
    features read each batch of them once."""
    from mmsa.models.runtime import on_device, predict_proba_each
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(feature_key(m.cfg.data), []).append(i)
    probs: list = [None] * len(members)
    for indices in groups.values():
        group = [members[i] for i in indices]
        features, rows = features_for(group[0].cfg.data)
        each = predict_proba_each([on_device(m.model, device) for m in group], features, rows, device,
                                  precisions=[m.cfg.train.precision for m in group])
        for i, p in zip(indices, each):
            probs[i] = p
    return average_probabilities(probs, [m.weight for m in members])


def predict_examples(members: list[Member], examples: list[Example], cache_dir: str,
                     device: torch.device) -> np.ndarray:
    """Class probabilities of raw pairs, through each member's backbones (features cached in
    `cache_dir`, reused where the same pairs were seen)."""
    from dataclasses import replace

    from mmsa.features.cache import features_of
    from mmsa.features.rawsource import RawSource

    def features_for(cfg: DataConfig):
        cfg = replace(cfg, cache_dir=cache_dir)
        features = RawSource(examples, cfg) if cfg.finetune == "full" else features_of(cfg, examples)
        return features, np.arange(len(examples))
    return predict_members(members, features_for, device)
