"""The benchmark's models: names, construction, synthetic inputs and losses.

Every model is built with random weights (nothing is downloaded), seeded, and
given non-trivial BatchNorm statistics, so that two processes building the same
name with the same seed hold identical tensors.

Name forms accepted by :func:`resolve`:

- a torchvision classification or video model name (``resnet50``, ``r3d_18``);
- ``fasterrcnn_resnet50_fpn``, ``retinanet_resnet50_fpn``, ``maskrcnn_resnet50_fpn``:
  built as torchvision builds them around a pre-trained backbone (FrozenBatchNorm2d,
  three trainable backbone stages), images resized to the benchmark size;
- ``timm:<name>`` (needs timm);
- ``package.module:callable``, a user's factory returning an ``nn.Module`` that takes
  one ``(N, 3, S, S)`` image batch.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

__all__ = [
    "BenchUsageError",
    "ModelInfo",
    "PAPER_ZOO",
    "DETECTION",
    "resolve",
    "build_model",
    "randomize_norms",
    "make_batch",
    "Loss",
    "flat_output",
]

PAPER_ZOO = (
    "resnet18",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "regnet_y_400mf",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "vgg11_bn",
    "shufflenet_v2_x1_0",
    "mnasnet1_0",
    "inception_v3",
    "fasterrcnn_resnet50_fpn",
    "retinanet_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
    "r3d_18",
)
DETECTION = ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn")
VIDEO_FRAMES = 8
DETECTION_BOXES = 3
INCEPTION_MIN_SIZE = 75


class BenchUsageError(ValueError):
    """A request the benchmark refuses before running anything (unknown model or mode...)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the benchmark knows about a model name before building it.

    ``kind`` is one of ``classification``, ``detection``, ``video``, ``timm``, ``callable``;
    ``size`` is the image side the model runs at and ``frames`` the clip length
    (video only); ``note`` says when the requested size was changed.
    """

    name: str
    kind: str
    size: int
    frames: int | None = None
    note: str = ""


def _torchvision_names(module_name: str) -> list[str]:
    import torchvision

    module = importlib.import_module(f"torchvision.models{module_name}")
    return list(torchvision.models.list_models(module=module))


def _check_callable(name: str) -> None:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise BenchUsageError(f"model {name!r}: expected package.module:callable")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BenchUsageError(f"model {name!r}: cannot import {module_name!r} ({e})") from e
    if not callable(getattr(module, attr, None)):
        raise BenchUsageError(f"model {name!r}: {module_name} has no callable {attr!r}")


def resolve(name: str, size: int | None) -> ModelInfo:
    """Check ``name`` and decide its input geometry; :class:`BenchUsageError` if unknown.

    ``size`` None means the model's own default: 224, except inception_v3 (299) and
    video models (112, clips of 8 frames). inception_v3 needs at least 75 pixels: a
    smaller requested size is replaced by 299, with a note.
    """
    if name.startswith("timm:"):
        if importlib.util.find_spec("timm") is None:
            raise BenchUsageError(
                f"model {name!r}: timm is not installed (pip install timm) and is needed "
                "for timm:<name> models"
            )
        import timm

        if not timm.is_model(name[5:]):
            raise BenchUsageError(f"model {name!r}: timm has no model named {name[5:]!r}")
        return ModelInfo(name, "timm", size or 224)
    if ":" in name:
        _check_callable(name)
        return ModelInfo(name, "callable", size or 224)
    if name in DETECTION:
        return ModelInfo(name, "detection", size or 224)
    if name in _torchvision_names(".video"):
        if name not in ("r3d_18", "mc3_18", "r2plus1d_18"):
            raise BenchUsageError(
                f"model {name!r}: of the video models only r3d_18, mc3_18, r2plus1d_18 are supported"
            )
        return ModelInfo(name, "video", size or 112, frames=VIDEO_FRAMES)
    if name in _torchvision_names(""):
        if name == "inception_v3":
            if size is None:
                return ModelInfo(name, "classification", 299)
            if size < INCEPTION_MIN_SIZE:
                note = f"inception_v3 needs size >= {INCEPTION_MIN_SIZE}: ran at 299"
                return ModelInfo(name, "classification", 299, note=note)
        return ModelInfo(name, "classification", size or 224)
    if name in _torchvision_names(".detection"):
        raise BenchUsageError(
            f"model {name!r}: of the detection models only {', '.join(DETECTION)} are supported"
        )
    raise BenchUsageError(
        f"unknown model {name!r}: expected a torchvision classification or video model name, "
        f"one of {', '.join(DETECTION)}, timm:<name> or package.module:callable"
    )


def _detection(info: ModelInfo) -> nn.Module:
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    # What torchvision's builders make when given a pre-trained backbone (the
    # fine-tuning setting): FrozenBatchNorm2d, conv1 and layer1 frozen.
    common: dict[str, Any] = {
        "weights": None,
        "norm_layer": FrozenBatchNorm2d,
        "trainable_layers": 3,
    }
    geometry = {"min_size": info.size, "max_size": info.size}
    if info.name == "retinanet_resnet50_fpn":
        backbone = resnet_fpn_backbone(
            backbone_name="resnet50",
            returned_layers=[2, 3, 4],
            extra_blocks=LastLevelP6P7(256, 256),
            **common,
        )
        return RetinaNet(backbone, num_classes=91, **geometry)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", **common)
    cls = MaskRCNN if info.name == "maskrcnn_resnet50_fpn" else FasterRCNN
    return cls(backbone, num_classes=91, **geometry)


def build_model(info: ModelInfo, seed: int = 0) -> nn.Module:
    """The model for ``info``, with seeded random weights and :func:`randomize_norms`."""
    torch.manual_seed(seed)
    if info.kind == "detection":
        model = _detection(info)
    elif info.kind in ("classification", "video"):
        import torchvision

        kwargs: dict[str, Any] = {"weights": None}
        if info.name in ("inception_v3", "googlenet"):
            kwargs.update(aux_logits=False, init_weights=True)
        model = torchvision.models.get_model(info.name, **kwargs)
    elif info.kind == "timm":
        import timm

        model = timm.create_model(info.name[5:], pretrained=False)
    else:
        module_name, _, attr = info.name.partition(":")
        factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
        model = factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{info.name} returned {type(model).__name__}, not an nn.Module")
    return randomize_norms(model, seed)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN-like module (anything with ``running_mean``/``running_var``)
    statistics mu ~ U(-0.5, 0.5), var ~ U(0.5, 2), gamma ~ U(0.5, 1.5), beta ~ U(-0.5, 0.5),
    from a generator seeded with ``seed``: deterministic for a given model."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
            if not isinstance(mean, Tensor) or not isinstance(var, Tensor):
                continue
            c = mean.numel()
            mean.copy_(torch.rand(c, generator=g) - 0.5)
            var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, Tensor) and weight.numel() == c:
                weight.copy_(torch.rand(c, generator=g) + 0.5)
            if isinstance(bias, Tensor) and bias.numel() == c:
                bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def make_batch(info: ModelInfo, batch: int, seed: int = 0) -> tuple[tuple[Any, ...], bool]:
    """Seeded synthetic forward arguments, on CPU, and whether the model returns a loss dict.

    Classification: ``(images,)``; video: ``(clips (N, 3, T, S, S),)``; detection:
    ``(images, targets)`` with three random boxes per image (and box-shaped masks).
    """
    g = torch.Generator().manual_seed(seed + 2)
    s = info.size
    if info.kind == "video":
        return (torch.randn(batch, 3, info.frames or VIDEO_FRAMES, s, s, generator=g),), False
    if info.kind != "detection":
        return (torch.randn(batch, 3, s, s, generator=g),), False
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, s, s, generator=g))
        corner = torch.rand(DETECTION_BOXES, 2, generator=g) * 0.6 * s
        extent = (torch.rand(DETECTION_BOXES, 2, generator=g) * 0.3 + 0.1) * s
        boxes = torch.cat([corner, corner + extent], dim=1).floor()
        target = {
            "boxes": boxes,
            "labels": torch.randint(1, 91, (DETECTION_BOXES,), generator=g),
        }
        if info.name.startswith("maskrcnn"):
            masks = torch.zeros(DETECTION_BOXES, s, s, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                masks[k, y0:y1, x0:x1] = 1
            target["masks"] = masks
        targets.append(target)
    return (images, targets), True


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, dict):
        out = [out[k] for k in sorted(out)]
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]


class Loss:
    """The scalar a training step minimises.

    A loss dict (detection) is summed. Any other output is projected on fixed random
    tensors (seeded, one per output tensor shape), so that the output gradient is a
    random tensor the same in every process: ``sum_i <out_i, P_i> / sqrt(numel_i)``.
    """

    def __init__(self, returns_losses: bool, seed: int = 0):
        self.returns_losses = returns_losses
        self.seed = seed
        self._projections: dict[tuple[int, tuple[int, ...]], Tensor] = {}

    def _projection(self, i: int, t: Tensor) -> Tensor:
        key = (i, tuple(t.shape))
        if key not in self._projections:
            g = torch.Generator().manual_seed(self.seed + 3 + i)
            p = torch.randn(t.shape, generator=g) / max(t.numel(), 1) ** 0.5
            self._projections[key] = p.to(t.device)
        return self._projections[key]

    def __call__(self, out: Any) -> Tensor:
        tensors = _tensors(out)
        if not tensors:
            raise TypeError("the model's output holds no floating-point tensor")
        if self.returns_losses:
            return sum(t.float().sum() for t in tensors)  # type: ignore[return-value]
        total = torch.zeros((), device=tensors[0].device)
        for i, t in enumerate(tensors):
            total = total + (t.float() * self._projection(i, t)).sum()
        return total


def flat_output(out: Any) -> Tensor:
    """Every floating-point tensor of the output (loss dict values in key order), detached,
    flattened and concatenated in float32 on CPU: what the equivalence check compares."""
    return torch.cat([t.detach().float().reshape(-1).cpu() for t in _tensors(out)])
