"""mmsa/training/plan.py: the plan of a final model, one versioned document, and training it."""

import json

import numpy as np
import pytest

from mmsa.config import Config
from mmsa.errors import ConfigError
from mmsa.training.plan import CACHED_SEEDS, Plan, PlanMember, default_seeds, merge


def _member(name="trial a", kind="model", weight=1.0, seeds=2, epochs=2, source="run-a", **cfg) -> PlanMember:
    return PlanMember(name, kind, Config.from_flat({"max_epochs": 3, **cfg}), epochs, weight, seeds, source)


def test_a_plan_survives_json_and_loads_typed():
    plan = Plan((_member(weight=0.6, d_model=32, heads=2), _member("linear probe", "probe", 0.4, 1, 0, "run-s")),
                metric="val_macro_f1", origin="search run-s")
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert isinstance(again.members[0].config, Config) and again.members[0].config.model.d_model == 32
    assert again.to_dict()["format"] == "mmsa-plan" and again.to_dict()["version"] == 1
    assert plan.describe() == "trial a (0.60, 2 seeds) + linear probe (0.40)"
    assert plan.chosen().name == "trial a"
    assert plan.reading("elsewhere").members[1].config.data.data_dir == "elsewhere"


@pytest.mark.parametrize("change, said", [
    (lambda d: d.update(format="other"), "not an mmsa plan"),
    (lambda d: d.update(version=2), "plan version 2; this mmsa reads version 1 (written by a newer mmsa"),
    (lambda d: d.update(members=[]), "'members' must be a non-empty list"),
    (lambda d: d["members"][0].pop("epochs"), "member 1: missing epochs"),
    (lambda d: d["members"][0].update(weight=-1), "weight -1.0 must be > 0"),
    (lambda d: d["members"][0].update(epochs=9), "epochs 9 must be in [1, max_epochs = 3]"),
    (lambda d: d["members"][0].update(epochs=1.5), "epochs: 1.5 is not a whole number"),
    (lambda d: d["members"][0].update(kind="knn"), "kind 'knn' is not one of model, probe"),
    (lambda d: d["members"][0]["config"].update(pooling="max"), "key 'pooling' = 'max'"),
    (lambda d: d["members"][0]["config"].update(colour=1), "unknown key 'colour'"),
])
def test_a_bad_plan_is_one_line_naming_where(change, said):
    data = Plan((_member(),)).to_dict()
    change(data)
    with pytest.raises(ConfigError) as e:
        Plan.from_dict(data, where="run x: plan.json")
    assert said in str(e.value) and str(e.value).startswith("run x: plan.json") and "\n" not in str(e.value)


def test_merged_plans_share_weight_and_join_the_same_member():
    selected = Plan((_member("trial a", weight=3.0), _member("linear probe", "probe", 1.0, 1, 0, "run-s")))
    probe = Plan((_member("linear probe", "probe", 1.0, 1, 0, "probe"),))
    merged = merge([(0.5, selected), (0.5, probe)], origin="--members ensemble,probe")
    assert [(m.name, m.weight) for m in merged.members] == [("trial a", 0.375), ("linear probe", 0.625)]
    other_seeds = merge([(0.5, selected), (0.5, Plan((_member("trial a", seeds=1),)))], origin="x")
    assert [(m.name, m.seeds) for m in other_seeds.members] == [("trial a", 2), ("linear probe", 1), ("trial a", 1)]


def test_seeds_by_default_five_and_one_for_full_fine_tuning():
    assert default_seeds(Config()) == CACHED_SEEDS == 5
    assert default_seeds(Config.from_flat({"finetune": "full"})) == 1


def test_train_plan_trains_each_member_on_all_labeled_pairs(subset_prepared):
    import dataclasses

    from mmsa.training.plan import train_plan
    data_cfg, data = subset_prepared
    cfg = dict(dataclasses.asdict(data_cfg), d_model=16, heads=2, batch_size=32)
    model = PlanMember("trial a", "model", Config.from_flat({**cfg, "max_epochs": 3}), 2, 0.75, 2, "run-a")
    from mmsa.models.probe import probe_config
    probe = PlanMember("linear probe", "probe", probe_config(Config.from_flat(cfg)), 0, 0.25, 1, "run-s")
    calls, lines, epochs = [], [], []

    def prepared(data_config):
        calls.append(data_config.feature_key())
        return dataclasses.replace(data, train=data.train)
    members, losses = train_plan(Plan((model, probe)), prepared, on_epoch=lambda e, m: epochs.append(e),
                                 log=lines.append)
    assert [(m.name, m.weight) for m in members] == [("trial a, seed 0", 0.375), ("trial a, seed 1", 0.375),
                                                     ("linear probe", 0.25)]
    assert epochs == [1, 2, 1, 2] and len(losses) == 2 and all(np.isfinite(losses))
    assert members[0].cfg.train.seed == 0 and members[1].cfg.train.seed == 1
    assert lines[0] == "member: trial a, 2 model(s) for 2 of 3 scheduled epochs"


def test_models_trained_apart_are_the_plan_s_in_its_order(subset_prepared):
    """jobs=2: the models on cached features train two at a time in processes of their own; the
    final model's members are the same ones, in the same order, with the same weights."""
    import dataclasses

    from mmsa.features.prepare import Preparations
    from mmsa.models.probe import probe_config
    from mmsa.training.plan import train_plan
    data_cfg, _ = subset_prepared
    cfg = dict(dataclasses.asdict(data_cfg), d_model=16, heads=2, batch_size=32, max_epochs=2)
    plan = Plan((PlanMember("trial a", "model", Config.from_flat(cfg), 1, 0.6, 2, "run-a"),
                 PlanMember("linear probe", "probe", probe_config(Config.from_flat(cfg)), 0, 0.4, 1, "run-s")))
    lines = []
    apart, _ = train_plan(plan, Preparations(), log=lines.append, jobs=2)
    here, _ = train_plan(plan, Preparations(), jobs=1)
    assert [(m.name, m.weight) for m in apart] == [(m.name, m.weight) for m in here] == [
        ("trial a, seed 0", 0.3), ("trial a, seed 1", 0.3), ("linear probe", 0.4)]
    assert all(a.cfg.to_flat() | {"num_threads": 0} == h.cfg.to_flat() | {"num_threads": 0} for a, h in zip(apart, here))
    assert sorted(ln.split(": trained")[0] for ln in lines if ": trained" in ln) == ["trial a, seed 0", "trial a, seed 1"]
