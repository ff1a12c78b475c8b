"""``convbn experiment detection``: torchvision detectors trained on generated shapes, Eval vs Tune.

Faster R-CNN, Mask R-CNN and RetinaNet with a ResNet-FPN backbone (``weights=None``: nothing
can be downloaded). Since no pre-trained statistics exist, the backbone's BN statistics are
calibrated first on generated images (train-mode forwards, no gradient). Two settings:

- ``frozen``: as torchvision builds a detector on a pre-trained backbone: every BatchNorm2d
  becomes ``torchvision.ops.FrozenBatchNorm2d`` (affine in buffers) and the stem and layer1
  are frozen (``trainable_backbone_layers=3``);
- ``bn_eval``: as MMDetection configs do (``norm_eval=True``): ``nn.BatchNorm2d`` in eval mode
  with trainable affine, every backbone layer trainable (``trainable_backbone_layers=5``).

Eval: the model as it is; Tune: ``convbn.tune(model, freeze_bn=True)``. ``torch.manual_seed``
is called before each step in both, so the RPN/ROI samplers draw the same.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

import torch
from torch import nn

import convbn
from convbn._tools.experiments import common
from convbn._tools.measure import count_saved, current_rss_bytes
from convbn._tools.modules import replace_modules
from convbn._tools.output import MIB, Progress, machine_info, mib, pyplot, write_json
from convbn._tools.process import run_isolated

__all__ = ["DETECTORS", "SETTINGS", "make_shapes", "build_detector", "train_detector", "run"]

DETECTORS = ("fasterrcnn", "maskrcnn", "retinanet")
SETTINGS = ("frozen", "bn_eval")
MODES = ("eval", "tune")
CLASSES = ("rectangle", "ellipse", "triangle")


# --------------------------------------------------------------------------- data


def make_shapes(n: int, size: int, seed: int = 0, max_objects: int = 4):
    """``n`` images ``(3, size, size)`` in [0, 1] with 1..max_objects filled shapes each.

    Returns ``(images, targets)``; each target has ``boxes`` (x0, y0, x1, y1, float),
    ``labels`` (1 rectangle, 2 ellipse, 3 triangle) and ``masks`` (uint8, one per object).
    Later shapes cover earlier ones; a box is the tight box of its visible mask.
    """
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ys, xs = ys.float() + 0.5, xs.float() + 0.5
    images, targets = [], []
    for _ in range(n):
        base = torch.rand(3, 1, 1, generator=g) * 0.5
        img = base + 0.08 * torch.randn(3, size, size, generator=g)
        owner = torch.zeros(size, size, dtype=torch.long)
        labels = []
        count = int(torch.randint(1, max_objects + 1, (1,), generator=g))
        for k in range(count):
            label = int(torch.randint(1, len(CLASSES) + 1, (1,), generator=g))
            w, h = (torch.rand(2, generator=g) * 0.3 + 0.12) * size
            cx = float(torch.rand(1, generator=g)) * (size - w) + w / 2
            cy = float(torch.rand(1, generator=g)) * (size - h) + h / 2
            if label == 1:
                inside = ((xs - cx).abs() <= w / 2) & ((ys - cy).abs() <= h / 2)
            elif label == 2:
                inside = ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1
            else:  # apex up: |x - cx| <= (y - top) * (w / 2) / h
                top = cy - h / 2
                inside = (
                    (ys >= top) & (ys <= cy + h / 2) & ((xs - cx).abs() <= (ys - top) * (w / 2) / h)
                )
            color = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.5
            img = torch.where(inside, color, img)
            owner[inside] = k + 1
            labels.append(label)
        boxes, masks, kept = [], [], []
        for k, label in enumerate(labels):
            mask = owner == k + 1
            if int(mask.sum()) < 16:
                continue
            yy, xx = torch.nonzero(mask, as_tuple=True)
            boxes.append(
                [float(xx.min()), float(yy.min()), float(xx.max()) + 1, float(yy.max()) + 1]
            )
            masks.append(mask.to(torch.uint8))
            kept.append(label)
        images.append(img.clamp(0, 1))
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(kept, dtype=torch.int64),
                "masks": torch.stack(masks)
                if masks
                else torch.zeros(0, size, size, dtype=torch.uint8),
            }
        )
    return images, targets


# --------------------------------------------------------------------------- models


def _backbone(name: str, detector: str):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    extra = {}
    if detector == "retinanet":  # as torchvision's retinanet_resnet50_fpn
        extra = {"returned_layers": [2, 3, 4], "extra_blocks": LastLevelP6P7(256, 256)}
    return resnet_fpn_backbone(
        backbone_name=name, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5, **extra
    )


@torch.no_grad()
def _calibrate(model: nn.Module, size: int, batches: int = 4, batch: int = 2) -> None:
    """Give the backbone's BNs running statistics of real activations (train-mode forwards)."""
    body = model.backbone.body
    norms = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    body.train()
    images, _ = make_shapes(batches * batch, size, seed=10_000)
    x = torch.stack(images)
    mean = torch.tensor(model.transform.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.transform.image_std).view(1, 3, 1, 1)
    x = (x - mean) / std
    for i in range(batches):
        body(x[i * batch : (i + 1) * batch])
    for bn in norms:
        bn.momentum = 0.1


def _frozen(bn: nn.Module) -> nn.Module | None:
    """A FrozenBatchNorm2d with ``bn``'s numbers, for a BatchNorm2d (None otherwise)."""
    from torchvision.ops import FrozenBatchNorm2d

    if not isinstance(bn, nn.BatchNorm2d):
        return None
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    frozen.weight.copy_(bn.weight.detach())
    frozen.bias.copy_(bn.bias.detach())
    frozen.running_mean.copy_(bn.running_mean)
    frozen.running_var.copy_(bn.running_var)
    return frozen


def build_detector(
    detector: str,
    backbone: str = "resnet50",
    setting: str = "bn_eval",
    size: int = 512,
    seed: int = 0,
) -> nn.Module:
    """A detector for the 3 shape classes (+ background), in training mode, BNs frozen."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet

    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    torch.manual_seed(seed)
    cls = {"fasterrcnn": FasterRCNN, "maskrcnn": MaskRCNN, "retinanet": RetinaNet}[detector]
    num_classes = len(CLASSES) + 1
    model = cls(
        _backbone(backbone, detector), num_classes=num_classes, min_size=size, max_size=size
    )
    _calibrate(model, size)
    if setting == "frozen":
        replace_modules(model.backbone.body, _frozen)
        # torchvision's default trainable_backbone_layers=3 for a pre-trained backbone
        for name, p in model.backbone.body.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


# --------------------------------------------------------------------------- training


def train_detector(
    detector: str,
    backbone: str,
    setting: str,
    mode: str,
    steps: int = 8,
    batch_size: int = 2,
    size: int = 512,
    lr: float = 0.01,
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Train for ``steps`` steps in ``mode``; per-step losses, saved bytes, step times.

    ``dtype="float64"`` separates rounding (and the discrete choices it can flip: proposal
    top-k and NMS) from a difference between the modes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    torch_dtype = getattr(torch, dtype)
    model = build_detector(detector, backbone, setting, size, seed).to(torch_dtype)
    pairs = 0
    if mode == "tune":
        convbn.tune(model, freeze_bn=True)
        pairs = len(convbn.report(model).converted)
    images, targets = make_shapes(steps * batch_size, size, seed=seed)
    images = [im.to(torch_dtype) for im in images]
    for t in targets:
        t["boxes"] = t["boxes"].to(torch_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    baseline_rss = current_rss_bytes()
    losses, parts, times, saved = [], [], [], None
    for step in range(steps):
        xb = images[step * batch_size : (step + 1) * batch_size]
        tb = targets[step * batch_size : (step + 1) * batch_size]
        if detector != "maskrcnn":
            tb = [{k: v for k, v in t.items() if k != "masks"} for t in tb]
        torch.manual_seed(seed * 100_003 + step)  # same RPN/ROI sampling in every mode
        t0 = time.perf_counter()
        if step == 0:
            counter = count_saved(model)
            with counter.count():
                loss_dict = model(xb, tb)
                loss = sum(loss_dict.values())
            saved = counter.total
        else:
            loss_dict = model(xb, tb)
            loss = sum(loss_dict.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        if step > 0:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        parts.append({k: float(v.detach()) for k, v in loss_dict.items()})
        if not math.isfinite(losses[-1]):
            break
    return {
        "model": detector,
        "backbone": backbone,
        "setting": setting,
        "mode": mode,
        "pairs_converted": pairs,
        "trainable_params": sum(p.numel() for p in params),
        "losses": losses,
        "loss_parts": parts,
        "saved_bytes": saved,
        "step_s": statistics.median(times) if times else float("nan"),
        "baseline_rss_bytes": baseline_rss,
    }


# --------------------------------------------------------------------------- command line


def _plot(results: list[dict], path: str) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    combos = sorted({(r["model"], r["backbone"], r["setting"]) for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels, eval_saved, tune_saved = [], [], []
    for i, combo in enumerate(combos):
        rs = {r["mode"]: r for r in results if (r["model"], r["backbone"], r["setting"]) == combo}
        name = f"{combo[0]} {combo[1]} {combo[2]}"
        for mode, ls in (("eval", "-"), ("tune", "--")):
            if mode in rs:
                axes[0].plot(
                    range(1, len(rs[mode]["losses"]) + 1),
                    rs[mode]["losses"],
                    ls,
                    color=colors[i % len(colors)],
                    label=f"{name} {mode}",
                )
        labels.append(name.replace(" ", "\n"))
        eval_saved.append(rs["eval"]["saved_bytes"] / MIB if "eval" in rs else 0)
        tune_saved.append(rs["tune"]["saved_bytes"] / MIB if "tune" in rs else 0)
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss (solid: Eval, dashed: Tune)")
    axes[0].legend(fontsize=6)
    xs = range(len(labels))
    axes[1].bar([x - 0.2 for x in xs], eval_saved, 0.4, label="eval", color="tab:orange")
    axes[1].bar([x + 0.2 for x in xs], tune_saved, 0.4, label="tune", color="tab:green")
    axes[1].set_xticks(list(xs), labels, fontsize=7)
    axes[1].set_title("saved for backward (MiB), one step")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run(args) -> int:
    detectors = args.detectors or list(DETECTORS)
    backbones = args.backbones or ["resnet50"]
    settings = args.settings or list(SETTINGS)
    steps = args.steps or (2 if args.quick else 8)
    size = args.size or (256 if args.quick else 512)
    batch = args.batch_size or (1 if args.quick else 2)
    if args.quick and not args.settings:
        settings = ["bn_eval"]
    jobs = [(d, b, s, m) for b in backbones for d in detectors for s in settings for m in MODES]
    progress = Progress(len(jobs), "detection")
    results = []
    for detector, backbone, setting, mode in jobs:
        kwargs = {
            "detector": detector,
            "backbone": backbone,
            "setting": setting,
            "mode": mode,
            "steps": steps,
            "batch_size": batch,
            "size": size,
            "lr": args.lr,
            "dtype": args.dtype,
        }
        r = run_isolated(
            "convbn._tools.experiments.detection:train_detector",
            kwargs,
            isolate=not args.in_process,
        )
        results.append(r)
        progress.step(
            f"{detector} {backbone} {setting} {mode}: "
            f"saved {mib(r['saved_bytes'])} MiB, step {r['step_s']:.2f} s, "
            f"loss {r['losses'][-1]:.4f}"
        )
    progress.close()
    records, diffs = [], {}
    for r in results:
        records.append(
            {
                "model": r["model"],
                "backbone": r["backbone"],
                "setting": r["setting"],
                "mode": r["mode"],
                "batch_size": batch,
                "size": size,
                "saved_bytes": r["saved_bytes"],
                "peak_bytes": r["peak_rss_bytes"],
                "peak_growth_bytes": r["peak_rss_bytes"] - r["baseline_rss_bytes"],
                "step_s": r["step_s"],
                "final_loss": r["losses"][-1] if r["losses"] else float("nan"),
                "pairs_converted": r["pairs_converted"],
                "losses": r["losses"],
            }
        )
    by_key = {(r["model"], r["backbone"], r["setting"], r["mode"]): r for r in results}
    for (d, b, s, m), r in by_key.items():
        ref = by_key.get((d, b, s, "eval"))
        if m == "tune" and ref is not None:
            diffs[f"{d}/{b}/{s}"] = common.max_loss_diff(r["losses"], ref["losses"])
    payload = {
        "experiment": "detection",
        "command": args.command_line,
        "config": {
            "detectors": detectors,
            "backbones": backbones,
            "settings": settings,
            "steps": steps,
            "size": size,
            "batch_size": batch,
            "lr": args.lr,
            "dtype": args.dtype,
            "optimizer": "SGD momentum 0.9, weight decay 1e-4, grad-norm clip 10",
            "data": "generated shapes (rectangle, ellipse, triangle), 1-4 per image",
        },
        "environment": machine_info("cpu"),
        "peak_note": "peak_bytes: peak RSS of the process that trained the (detector, setting, "
        "mode), one process each; peak_growth_bytes: that peak minus the RSS after the model "
        "and data were built",
        "records": records,
        "tune_vs_eval_max_loss_diff": max(diffs.values()) if diffs else None,
        "tune_vs_eval_loss_diff": diffs,
    }
    path = write_json(os.path.join(args.out, "detection.json"), payload)
    plot = _plot(results, os.path.join(args.out, "detection.png"))
    print(summary_table(payload, args.markdown))
    print(common.written(path, plot))
    return 0


def _pct(a: float, b: float) -> str:
    return f"{100 * (b - a) / a:+.1f}%" if a else "-"


def summary_table(payload: dict[str, Any], markdown: bool = False) -> str:
    recs = {(r["model"], r["backbone"], r["setting"], r["mode"]): r for r in payload["records"]}
    rows = []
    for (d, b, s, m), e in recs.items():
        t = recs.get((d, b, s, "tune"))
        if m != "eval" or t is None:
            continue
        rows.append(
            [
                d,
                b,
                s,
                e["batch_size"],
                f"{mib(e['saved_bytes'])} → {mib(t['saved_bytes'])} "
                f"({_pct(e['saved_bytes'], t['saved_bytes'])})",
                f"{mib(e['peak_bytes'])} → {mib(t['peak_bytes'])}",
                f"{mib(e['peak_growth_bytes'])} → {mib(t['peak_growth_bytes'])}",
                f"{e['step_s']:.2f} → {t['step_s']:.2f} ({_pct(e['step_s'], t['step_s'])})",
                f"{e['final_loss']:.4f} → {t['final_loss']:.4f}",
                payload["tune_vs_eval_loss_diff"].get(f"{d}/{b}/{s}"),
            ]
        )
    header = [
        "detector",
        "backbone",
        "BN",
        "batch",
        "saved MiB Eval → Tune",
        "peak RSS MiB",
        "RSS growth MiB",
        "step s",
        "final loss",
        "max |Δloss|",
    ]
    return common.result_table(payload, header, rows, markdown)


def add_arguments(p) -> None:
    p.add_argument(
        "--detectors", nargs="+", choices=DETECTORS, help="detectors to train (default all three)"
    )
    p.add_argument(
        "--backbones",
        nargs="+",
        choices=["resnet50", "resnet101", "resnext101_32x8d"],
        help="backbones of the detectors (default resnet50)",
    )
    p.add_argument(
        "--settings",
        nargs="+",
        choices=SETTINGS,
        help="frozen: FrozenBatchNorm2d, stem and layer1 frozen; bn_eval: BatchNorm2d in eval "
        "mode, every layer trainable (default both; quick: bn_eval)",
    )
    p.add_argument("--steps", type=int, help="training steps (default 8)")
    p.add_argument("--size", type=int, help="image side (default 512)")
    p.add_argument("--batch-size", type=int, help="images per training step (default 2)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64"],
        help="float64: Eval vs Tune without float32 rounding (slow)",
    )
    p.add_argument("--lr", type=float, default=0.005, help="0.02 / 16 per image, x batch 2")
