import numpy as np
import torch
from torch import nn

from mmsa.config import ModelConfig
from mmsa.models.heads import FusionModel, PooledHead
from mmsa.models.runtime import predict_proba_each


class _Batches:
    """A dataset of random token features with a 7x7 image grid, batched as FeatureSet batches."""

    def __init__(self, n=10, L=6, T=49, dt=12, di=10):
        g = torch.Generator().manual_seed(0)
        self.text, self.image = torch.randn(n, L, dt, generator=g), torch.randn(n, T, di, generator=g)
        self.mask = torch.ones(n, L, dtype=torch.bool)
        self.mask[::3, 3:] = False
        self.lexicon = torch.rand(n, 4, generator=g)

    def batch(self, rows, device):
        rows = torch.as_tensor(rows)
        return self.text[rows], self.mask[rows], self.image[rows], self.lexicon[rows]

    def iter_batches(self, row_batches, device):
        for rows in row_batches:
            yield self.batch(rows, device)

    def text_lengths(self, rows):
        return self.mask[torch.as_tensor(rows)].sum(1).numpy()


class _NotAHead(nn.Module):
    """A member that reads the raw batch (as finetune=full models do)."""

    def forward(self, text, mask, image, lexicon):
        return torch.stack([image.mean((1, 2)), text.mean((1, 2)), lexicon.sum(1)], 1)


def test_heads_that_share_an_averaged_image_grid_predict_as_they_do_alone():
    data = _Batches()
    torch.manual_seed(1)
    models = [PooledHead(ModelConfig(head="mlp", image_grid=3, d_model=16, heads=2, text_dim=12, image_dim=10)),
              PooledHead(ModelConfig(head="mlp", image_grid=3, d_model=16, heads=2, text_dim=12, image_dim=10)),
              FusionModel(ModelConfig(image_grid=2, d_model=16, heads=2, text_dim=12, image_dim=10)),
              PooledHead(ModelConfig(head="linear", image_grid=0, d_model=16, heads=2, text_dim=12, image_dim=10)),
              _NotAHead()]
    rows = np.arange(10)
    together = predict_proba_each(models, data, rows, torch.device("cpu"), batch_size=4)
    with torch.no_grad():
        alone = [torch.cat([m.eval()(*data.batch(rows[s:s + 4], None)).softmax(-1) for s in range(0, 10, 4)]).numpy()
                 for m in models]
    for mine, expected in zip(together, alone):
        assert np.array_equal(mine, expected)  # the same bits, not merely close
    assert not np.array_equal(together[0], together[1])  # two heads, two answers


def test_a_fine_tuned_cnn_in_channels_last_computes_the_same():
    """On CUDA the fine-tuned image backbone's weights and its pixels are laid out channels_last
    (tensor cores read NHWC under autocast): the layout changes no result."""
    import copy

    from mmsa.config import Config
    from mmsa.features.encoders import text_shape
    from mmsa.models.factory import create_model
    from mmsa.models.runtime import channels_last
    cfg = Config.from_flat({"finetune": "full", "d_model": 16, "heads": 2, "max_text_len": 8})

    class Sizes:
        text_dim, image_dim = text_shape("minilm").dim, 1280
    torch.manual_seed(0)
    model = create_model(cfg.with_features(Sizes), pretrained=False).eval()
    inputs = (torch.randint(3, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.long), torch.randn(2, 3, 224, 224),
              torch.zeros(2, 4))
    want = model(*inputs)
    laid_out = channels_last(copy.deepcopy(model))
    convs = [m.weight for m in laid_out.image_backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)
    pixels = inputs[2].contiguous(memory_format=torch.channels_last)
    got = laid_out(inputs[0], inputs[1], pixels, inputs[3])
    assert torch.allclose(got, want, atol=1e-4)
