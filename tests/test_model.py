import itertools

import pytest
import torch

from mmsa.config import COMBINES, MODALITIES, POOLINGS, ModelConfig
from mmsa.models.factory import create_head, create_model
from mmsa.models.heads import FusionModel, PooledHead, _pool_grid


def _inputs(b=3, L=7, T=5, dt=12, di=10):
    torch.manual_seed(0)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[0, 4:] = False  # a padded text
    return torch.randn(b, L, dt), mask, torch.randn(b, T, di), torch.rand(b, 4)


@pytest.mark.parametrize("pooling,depth,modalities", list(itertools.product(POOLINGS, (0, 1, 2), MODALITIES)))
def test_every_pooling_depth_modality_gives_logits(pooling, depth, modalities):
    cfg = ModelConfig(d_model=16, heads=2, fusion_depth=depth, pooling=pooling, modalities=modalities,
                      text_dim=12, image_dim=10, token_dropout=0.2)
    model = FusionModel(cfg)
    text, mask, image, lex = _inputs()
    logits = model(text, mask, image, lex)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    logits.sum().backward()  # trains end to end
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("combine", COMBINES)
def test_combines(combine):
    model = FusionModel(ModelConfig(d_model=16, heads=2, combine=combine, text_dim=12, image_dim=10))
    assert model(*_inputs()).shape == (3, 3)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_padding_does_not_change_the_output(pooling):
    model = FusionModel(ModelConfig(d_model=16, heads=2, pooling=pooling, text_dim=12, image_dim=10)).eval()
    text, mask, image, lex = _inputs(b=1)
    mask[0, 4:] = False
    garbage = text.clone()
    garbage[0, 4:] = 100.0  # what sits under padding must not matter
    with torch.no_grad():
        assert torch.allclose(model(text, mask, image, lex), model(garbage, mask, image, lex), atol=1e-5)


def test_modalities_ignore_the_other_side():
    text, mask, image, lex = _inputs()
    for modalities, changed in (("text", "image"), ("image", "text")):
        model = FusionModel(ModelConfig(d_model=16, heads=2, modalities=modalities, text_dim=12,
                                        image_dim=10)).eval()
        with torch.no_grad():
            a = model(text, mask, image, lex)
            b = model(text if changed == "image" else text + 1, mask, image + 1 if changed == "image" else image, lex)
        assert torch.allclose(a, b)


def test_routes_have_their_own_modules():
    model = FusionModel(ModelConfig(d_model=16, heads=2, fusion_depth=2, text_dim=12, image_dim=10))
    ids = {id(m) for m in list(model.text_to_image) + list(model.image_to_text)}
    assert len(ids) == 4


def test_image_grid_pooling():
    model = FusionModel(ModelConfig(d_model=16, heads=2, image_grid=3, text_dim=12, image_dim=10))
    text, mask, _, lex = _inputs()
    image = torch.randn(3, 49, 10)
    assert _pool_grid(image, 3).shape == (3, 9, 10)
    assert torch.allclose(_pool_grid(image, 3).mean(1), image.mean(1), atol=0.2)
    assert model(text, mask, image, lex).shape == (3, 3)


def test_the_factory_builds_the_configured_family():
    from mmsa.config import Config
    cfg = Config(model=ModelConfig(d_model=16, heads=2, text_dim=12, image_dim=10))
    assert isinstance(create_model(cfg), FusionModel)
    assert isinstance(create_model(cfg.updated({"head": "mlp"})), PooledHead)


@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_pooled_heads_give_logits_and_ignore_padding(head, pooling):
    cfg = ModelConfig(head=head, pooling=pooling, d_model=16, heads=2, text_dim=12, image_dim=10, token_dropout=0.0)
    model = create_head(cfg).eval()
    assert isinstance(model, PooledHead)
    text, mask, image, lex = _inputs()
    assert model(text, mask, image, lex).shape == (3, 3)
    padded = text.clone()
    padded[~mask.bool()] = 1e4  # what sits under the padding must not matter
    with torch.no_grad():
        assert torch.allclose(model(text, mask, image, lex), model(padded, mask, image, lex), atol=1e-5)
    # linear: no hidden layer, one weight per pooled feature and class
    if head == "linear":
        assert sum(p.numel() for p in model.classify.parameters()) == (12 + 10 + 4) * 3 + 3


def test_pooled_head_on_one_modality():
    model = create_head(ModelConfig(head="mlp", modalities="image", d_model=16, heads=2, text_dim=12, image_dim=10))
    text, mask, image, lex = _inputs()
    assert model(text, mask, image, lex).shape == (3, 3) and not hasattr(model, "pool_text")


@pytest.mark.parametrize("head", ["fusion", "mlp", "linear"])
def test_the_lexicon_scores_are_read_only_where_the_config_says(head):
    text, mask, image, lex = _inputs()
    for lexicon in (True, False):
        model = create_head(ModelConfig(head=head, lexicon=lexicon, d_model=16, heads=2, text_dim=12,
                                        image_dim=10)).eval()
        with torch.no_grad():
            moved = not torch.allclose(model(text, mask, image, lex), model(text, mask, image, lex + 0.5))
        assert moved == lexicon


def test_a_stored_config_from_before_the_lexicon_does_not_read_it():
    from mmsa.config import Config
    assert Config.from_stored({"head": "mlp"}).model.lexicon is False
    assert Config.from_stored({"head": "mlp", "lexicon": True}).model.lexicon is True
    assert Config().model.lexicon is True
