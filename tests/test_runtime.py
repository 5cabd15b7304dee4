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
