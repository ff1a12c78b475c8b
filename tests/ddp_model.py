"""The model and data shared by the DDP test and its torchrun worker."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from helpers import randomize_norms


def make_model(sync: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.resnet18(num_classes=5))
    if sync:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)
