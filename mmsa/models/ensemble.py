"""The one ensemble mechanism: a final model is a list of weighted members, whose class
probabilities are averaged with their weights. Each member is a trained model with its own
config, and so with the features (cache) it reads: the models of several seeds, the linear probe
and the selected trials of a search are all members (mmsa.training.plan.train_plan trains them).

Checkpoint: {"format": 3, "labels": [...], "members": [{"name", "weight", "config": flat config,
"model": state_dict}]}, loadable with torch.load(weights_only=True). A member on cached features
holds its head only (the frozen backbones load from their packages, or the hub, by the names in
its config); a finetune=full member holds its fine-tuned backbones too.
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
    """The members of a checkpoint, in eval mode."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"{path}: not a loadable mmsa checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise UserError(f"{path}: not an mmsa checkpoint (no 'format')")
    if ckpt["format"] != FORMAT:
        raise UserError(f"{path}: checkpoint format {ckpt['format']}, this version reads format {FORMAT}; "
                        f"train it again with this version's mmsa.final")
    if list(ckpt.get("labels", LABELS)) != list(LABELS):
        raise UserError(f"{path}: labels {ckpt['labels']} differ from this version's {list(LABELS)}")
    from mmsa.models.factory import create_model
    members = []
    for entry in ckpt["members"]:
        cfg = Config.from_stored(entry["config"], source=f"{path}: member '{entry['name']}'")
        model = create_model(cfg)
        model.load_state_dict(entry["model"])
        members.append(Member(entry["name"], cfg, model.to(device or "cpu").eval(), float(entry["weight"])))
    return members


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
        groups.setdefault(m.cfg.data.feature_key(), []).append(i)
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
