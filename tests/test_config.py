import pytest

from mmsa.config import Config, parse_overrides
from mmsa.errors import ConfigError


def test_flat_keys_route_to_sections():
    cfg = Config.from_flat({"lr": "3e-4", "fusion_depth": "2", "text_encoder": "minilm", "dropout": 0.2})
    assert cfg.train.lr == 3e-4 and cfg.model.fusion_depth == 2 and cfg.model.dropout == 0.2
    assert Config.from_flat(cfg.to_flat()) == cfg


@pytest.mark.parametrize("values,match", [
    ({"learning_rate": 1}, "unknown key 'learning_rate'"),
    ({"pooling": "max"}, "key 'pooling'"),
    ({"fusion_depth": 1.5}, "key 'fusion_depth'"),
    ({"batch_size": "lots"}, "key 'batch_size'"),
    ({"d_model": 30, "heads": 4}, "key 'd_model'"),
    ({"lr": -1}, "key 'lr'"),
    ({"ensemble": 3}, "key 'ensemble' was removed: .*mmsa.final --members ensemble:seeds=K"),
])
def test_bad_values_are_one_line_errors(values, match):
    with pytest.raises(ConfigError, match=match) as e:
        Config.from_flat(values, source="x.yaml")
    assert "\n" not in str(e.value) and str(e.value).startswith("x.yaml")


def test_parse_overrides():
    assert parse_overrides(["modalities=text", " lr = 1e-3 "]) == {"modalities": "text", "lr": "1e-3"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["oops"])


def test_derived_sizes_are_refused_where_users_give_values(tmp_path):
    from mmsa.app.commands import config_from_args
    with pytest.raises(ConfigError, match="--set: key 'text_dim' follows from the data"):
        config_from_args(None, ["text_dim=7"])
    (tmp_path / "c.yaml").write_text("image_dim: 9\n")
    with pytest.raises(ConfigError, match="c.yaml: key 'image_dim' follows from the data"):
        config_from_args(None, [], str(tmp_path / "c.yaml"))
    # a checkpoint's config carries them, and loads
    assert Config.from_flat({"text_dim": 7}).model.text_dim == 7
