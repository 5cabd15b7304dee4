"""The pyfunc model in memory: a request's features come from backbones loaded once, and give
what the disk cache gives (mmsa.predict's way in)."""

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def model(subset_prepared):
    """A SentimentModel of three members: the probe (with lexicon scores), an untrained mlp head,
    and an untrained head fine-tuning the top 2 text layers (another feature config)."""
    import torch

    from mmsa.app.pyfunc import SentimentModel
    from mmsa.config import Config, ModelConfig
    from mmsa.models.ensemble import Member
    from mmsa.models.factory import create_model, probe_head
    from mmsa.models.probe import probe_config
    from mmsa.models.probe import fit_probe
    data_cfg, data = subset_prepared
    probe_cfg = probe_config(Config(data=data_cfg)).with_features(data.features)
    torch.manual_seed(0)
    mlp_cfg = Config(data=data_cfg, model=ModelConfig(head="mlp", pooling="attention")).with_features(data.features)
    import dataclasses
    ft_cfg = Config(data=dataclasses.replace(data_cfg, finetune="last_k", text_finetune_layers=2),
                    model=ModelConfig(head="mlp", pooling="mean")).with_features(data.features)
    model = SentimentModel()
    model.members = [Member("probe", probe_cfg, probe_head(probe_cfg, *fit_probe(data.features, data.train, lexicon=True))),
                     Member("mlp", mlp_cfg, create_model(mlp_cfg).eval(), 0.5),
                     Member("fine-tuned", ft_cfg, create_model(ft_cfg).eval(), 0.5)]
    return model


def test_a_request_is_predicted_in_memory_as_the_cache_predicts_it(model, subset_prepared, subset_dir, tmp_path):
    from mmsa.app.pyfunc import input_example
    _, data = subset_prepared
    examples = data.dataset.test[:6]
    request = input_example(str(subset_dir), [ex.guid for ex in examples])
    served = model.predict(None, request)
    cached = model.predict_examples(examples, cache_dir=str(tmp_path))
    assert list(served.columns) == ["label", "p_positive", "p_neutral", "p_negative", "image_status"]
    assert (served["image_status"] == "read").all()
    probs = ["p_positive", "p_neutral", "p_negative"]
    assert np.allclose(served[probs].to_numpy(), cached[probs].to_numpy(), atol=2e-3)
    assert list(served["label"]) == list(cached["label"])
    assert len(model._serving()["backbones"]) == 1  # loaded once, shared by the three members


def test_bad_requests_become_mlflow_s_400_answers(model):
    from mlflow.exceptions import MlflowException
    with pytest.raises(MlflowException, match="missing column 'text'") as e:
        model.predict(None, pd.DataFrame({"image": [b""]}))
    assert e.value.get_http_status_code() == 400
