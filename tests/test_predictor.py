import numpy as np
import pytest
import torch

from mmsa.config import Config
from mmsa.models.factory import create_model
from mmsa.models.ensemble import Member, load_members, predict_members, save_members
from mmsa.models.runtime import predict_proba


def _members(subset_prepared, n: int) -> list[Member]:
    data_cfg, p = subset_prepared
    cfg = Config.from_flat({**Config(data=data_cfg).to_flat(), "d_model": 16, "heads": 2}).with_features(p.features)
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(Member(f"m{i}", cfg, create_model(cfg).eval(), weight=float(i + 1)))
    return out


def test_members_are_averaged_with_their_weights(subset_prepared):
    _, p = subset_prepared
    members = _members(subset_prepared, 2)
    rows = p.val.rows
    each = [predict_proba(m.model, p.features, rows, torch.device("cpu")) for m in members]
    blended = predict_members(members, lambda _: (p.features, rows), torch.device("cpu"))
    assert np.allclose(blended, (1 * each[0] + 2 * each[1]) / 3, atol=1e-6)
    assert not np.allclose(blended, (each[0] + each[1]) / 2, atol=1e-4)  # the weights matter


def test_a_checkpoint_keeps_names_weights_and_configs(subset_prepared, tmp_path):
    _, p = subset_prepared
    members = _members(subset_prepared, 2)
    save_members(tmp_path / "model.pt", members)
    loaded = load_members(tmp_path / "model.pt")
    assert [(m.name, m.weight, m.cfg) for m in loaded] == [(m.name, m.weight, m.cfg) for m in members]
    for a, b in zip(members, loaded):
        assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_an_earlier_checkpoint_format_is_one_line_saying_what_to_do(subset_prepared, tmp_path):
    from mmsa.errors import UserError
    members = _members(subset_prepared, 1)
    torch.save({"format": 2, "labels": ["positive", "neutral", "negative"],
                "members": [{"name": "chosen config", "config": members[0].cfg.to_flat(),
                             "model": members[0].model.state_dict()}]}, tmp_path / "old.pt")
    with pytest.raises(UserError, match="format 2, this version reads format 3; train it again") as e:
        load_members(tmp_path / "old.pt")
    assert "\n" not in str(e.value)


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path):
    from mmsa.errors import UserError
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable mmsa checkpoint"):
        load_members(tmp_path / "x.pt")
