"""Lightning callback and MMEngine hook: training with them equals training in Eval mode
(frozen BN), and the model is converted while it trains. Skipped where the framework is
not installed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convbn


def _backbone():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net


def _data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _converted(module: nn.Module) -> bool:
    """Whether ``module`` is converted now: ``convbn.report`` refuses one that is not."""
    try:
        convbn.report(module)
    except ValueError:
        return False
    return True


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_lightning_callback():
    lightning = pytest.importorskip("lightning")
    from convbn.integrations.lightning import ConvBNTune

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = _backbone()
            self.converted = None

        def on_train_start(self):
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()

        def training_step(self, batch, _):
            if self.converted is None:
                self.converted = _converted(self.backbone)
            x, y = batch
            return nn.functional.cross_entropy(self.backbone(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def fit(callbacks):
        module = Module()
        trainer = lightning.Trainer(
            max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(_data(), batch_size=4)
        trainer.fit(module, loader)
        return module

    plain = fit([])
    callback = ConvBNTune(freeze_bn=True, modules=["backbone"])
    tuned = fit([callback])
    assert tuned.converted and len(callback.reports["backbone"].converted) == 2
    assert not _converted(tuned.backbone)  # restored at the end of fit
    assert _max_diff(plain, tuned) < 1e-5


def test_mmengine_hook(tmp_path):
    pytest.importorskip("mmengine")
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    import convbn.integrations.mmengine  # noqa: F401  (registers the hook)

    class Model(BaseModel):
        def __init__(self):
            super().__init__()
            self.backbone = _backbone()
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()

        def train(self, mode=True):
            # norm_eval: keep BNs frozen, as MMDetection backbones do.
            super().train(mode)
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
            return self

        def forward(self, inputs, labels, mode="loss"):
            return {"loss": nn.functional.cross_entropy(self.backbone(inputs), labels)}

    def collate(batch):
        xs, ys = zip(*batch)
        return {"inputs": torch.stack(xs), "labels": torch.stack(ys)}

    def run(hooks, name):
        model = Model()
        runner = Runner(
            model=model,
            work_dir=str(tmp_path / name),
            train_dataloader=torch.utils.data.DataLoader(_data(), batch_size=4, collate_fn=collate),
            train_cfg=dict(by_epoch=False, max_iters=4),
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
            custom_hooks=hooks,
            default_hooks=dict(checkpoint=None, logger=None),
            randomness=dict(seed=0),
        )
        runner.train()
        return model

    plain = run([], "plain")
    tuned = run([dict(type="ConvBNTuneHook", modules=["backbone"])], "tuned")
    assert len(convbn.report(tuned.backbone).converted) == 2
    assert _max_diff(plain, tuned) < 1e-5
    assert copy.deepcopy(tuned) is not None
