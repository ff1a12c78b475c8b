"""``convbn experiment attack``: PGD against the pre-trained EfficientNet-Lite0 in eval mode.

Real photographs (scikit-image, scikit-learn), 224x224, ImageNet normalisation inside the
model. L-inf PGD, untargeted against the clean prediction, random start drawn from a fixed
seed (the same in every mode). Only the input requires grad. Each mode (Eval: the model as it
is; Tune: ``convbn.tune``; Deploy: ``convbn.fuse``) runs in its own process.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

import convbn
from convbn._tools.experiments import common, data
from convbn._tools.measure import count_saved, current_rss_bytes
from convbn._tools.output import MIB, Progress, log, machine_info, mib, pyplot, write_json
from convbn._tools.process import run_isolated

__all__ = ["MODES", "pgd", "attack_mode", "run"]

MODES = ("eval", "tune", "deploy")


def _count_norms(model) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def pgd(
    model,
    x: torch.Tensor,
    target: torch.Tensor,
    epsilon: float,
    steps: int = 10,
    alpha: float | None = None,
    seed: int = 0,
    counter=None,
) -> torch.Tensor:
    """L-inf PGD: maximise the cross-entropy of ``target`` within ``epsilon`` of ``x`` in [0, 1].

    Step size ``alpha`` (default ``2.5 * epsilon / steps``), random start from ``seed``. When a
    ``counter`` (:class:`convbn._tools.measure.SavedBytes`) is given, the first forward's saved
    tensors are counted.
    """
    alpha = 2.5 * epsilon / steps if alpha is None else alpha
    g = torch.Generator().manual_seed(seed)
    # drawn in float32 whatever x's dtype, so that a float64 run starts from the same point
    noise = ((torch.rand(x.shape, generator=g) * 2 - 1) * epsilon).to(x.dtype)
    adv = (x + noise).clamp(0.0, 1.0)
    for step in range(steps):
        adv = adv.detach().requires_grad_(True)
        if counter is not None and step == 0:
            with counter.count():
                loss = F.cross_entropy(model(adv), target)
        else:
            loss = F.cross_entropy(model(adv), target)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + alpha * grad.sign()
            adv = torch.minimum(torch.maximum(adv, x - epsilon), x + epsilon).clamp(0.0, 1.0)
    return adv.detach()


def attack_mode(
    mode: str,
    epsilons: list[float],
    steps: int = 10,
    limit: int | None = None,
    more_photos: bool = False,
    save_dir: str | None = None,
    repeats: int = 1,
    dtype: str = "float32",
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """PGD on the photographs in one mode; adversarial images saved to ``save_dir``.

    ``dtype="float64"`` gives the reference that tells rounding from a difference of modes;
    ``checkpoint``: the network's weights from that file instead of the packaged ones.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    torch_dtype = getattr(torch, dtype)
    x, names = data.photos(224, more=more_photos)
    if limit is not None:
        x, names = x[:limit], names[:limit]
    x = x.to(torch_dtype)
    model = data.efficientnet_lite0(checkpoint=checkpoint).eval().to(torch_dtype)
    model.requires_grad_(False)
    if mode == "tune":
        convbn.tune(model)
        pairs = len(convbn.report(model).converted)
    elif mode == "deploy":
        before = _count_norms(model)
        convbn.fuse(model)
        pairs = before - _count_norms(model)
    else:
        pairs = 0
    with torch.no_grad():
        clean = model(x)
    clean_pred = clean.argmax(1)
    baseline_rss = current_rss_bytes()
    out = []
    for eps in epsilons:
        times = []
        counter = count_saved(model)
        for r in range(repeats):
            t0 = time.perf_counter()
            adv = pgd(model, x, clean_pred, eps, steps, counter=counter if r == 0 else None)
            times.append(time.perf_counter() - t0)
        with torch.no_grad():
            adv_pred = model(adv).argmax(1)
        if save_dir is not None:
            torch.save(adv, os.path.join(save_dir, f"{mode}_{dtype}_{eps:.6f}.pt"))
        out.append(
            {
                "epsilon": eps,
                "saved_bytes": counter.total,
                "time_s": min(times),
                "success_rate": float((adv_pred != clean_pred).double().mean()),
                "adv_pred": adv_pred.tolist(),
            }
        )
    return {
        "mode": mode,
        "pairs_converted": pairs,
        "images": names,
        "clean_pred": clean_pred.tolist(),
        "clean_prob": clean.softmax(1).amax(1).tolist(),
        "baseline_rss_bytes": baseline_rss,
        "results": out,
    }


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    diff = (a - b).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "frac_values_differ": float((diff > 0).double().mean()),
        # a pixel differs when any of its three channels does
        "frac_pixels_differ": float((diff.amax(1) > 0).double().mean()),
        "frac_pixels_differ_gt_1_255": float((diff.amax(1) > 1 / 255).double().mean()),
    }


def _plot(payload: dict, example: dict | None, path: str) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    recs = payload["records"]
    eps_list = sorted({r["epsilon"] for r in recs})
    fig, axes = plt.subplots(1, 4 if example else 3, figsize=(16 if example else 12, 3.6))
    colors = {"eval": "tab:orange", "tune": "tab:green", "deploy": "tab:red"}
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        sel = [r for r in recs if r["mode"] == mode]
        if not sel:
            continue
        xs = [eps_list.index(r["epsilon"]) + i * width for r in sel]
        axes[0].bar(
            xs, [r["saved_bytes"] / MIB for r in sel], width, label=mode, color=colors[mode]
        )
        axes[1].bar(xs, [r["time_s"] for r in sel], width, label=mode, color=colors[mode])
        axes[2].bar(xs, [r["success_rate"] for r in sel], width, label=mode, color=colors[mode])
    labels = [f"{255 * e:.0f}/255" for e in eps_list]
    for ax, title in zip(
        axes[:3], ["saved for backward (MiB)", "time per attack (s)", "success rate"]
    ):
        ax.set_xticks([k + width for k in range(len(eps_list))], labels)
        ax.set_title(title)
        ax.legend(fontsize=8)
    if example:
        axes[3].imshow(example["image"])
        axes[3].set_title(example["title"], fontsize=8)
        axes[3].axis("off")
    fig.suptitle(
        f"PGD ({payload['config']['steps']} steps) on EfficientNet-Lite0, "
        f"{len(payload['images'])} photographs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _float64_check(kwargs, epsilons, tmp, adv, in_process) -> dict[str, Any]:
    """Eval and Tune again in float64: Tune vs Eval without float32 rounding, and float32
    Eval's own distance from float64 Eval (the yardstick for the float32 comparison)."""
    out = {}
    for mode in ("eval", "tune"):
        log(f"attack: float64 {mode} (reference)")
        run_isolated(
            "convbn._tools.experiments.attack:attack_mode",
            {**kwargs, "mode": mode, "dtype": "float64", "repeats": 1},
            isolate=not in_process,
        )
    for e in epsilons:
        e64 = torch.load(os.path.join(tmp, f"eval_float64_{e:.6f}.pt"))
        t64 = torch.load(os.path.join(tmp, f"tune_float64_{e:.6f}.pt"))
        key = f"{255 * e:.0f}/255"
        out[f"tune_vs_eval_float64@{key}"] = _compare(t64, e64)
        out[f"eval_float32_vs_float64@{key}"] = _compare(adv[("eval", e)].double(), e64)
        out[f"tune_float32_vs_float64@{key}"] = _compare(adv[("tune", e)].double(), e64)
    return out


def run(args) -> int:
    if args.checkpoint is not None:  # checked before any run
        data.efficientnet_lite0(checkpoint=args.checkpoint)
    epsilons = args.epsilons or [4 / 255, 8 / 255]
    steps = args.steps or (2 if args.quick else 10)
    limit = args.limit or (3 if args.quick else None)
    modes = args.modes or list(MODES)
    progress = Progress(len(modes), "attack")
    results = {}
    with tempfile.TemporaryDirectory(prefix="convbn-attack-") as tmp:
        for mode in modes:
            kwargs = {
                "mode": mode,
                "epsilons": epsilons,
                "steps": steps,
                "limit": limit,
                "more_photos": args.more_photos,
                "save_dir": tmp,
                "repeats": 1 if args.quick else args.repeats,
                "checkpoint": args.checkpoint,
            }
            results[mode] = run_isolated(
                "convbn._tools.experiments.attack:attack_mode", kwargs, isolate=not args.in_process
            )
            rates = ", ".join(f"{r['success_rate']:.2f}" for r in results[mode]["results"])
            progress.step(f"{mode}: success {rates}")
        progress.close()
        adv = {
            (m, e): torch.load(os.path.join(tmp, f"{m}_float32_{e:.6f}.pt"))
            for m in modes
            for e in epsilons
        }
        check = None
        if args.check and {"eval", "tune"} <= set(modes):
            check = _float64_check(kwargs, epsilons, tmp, adv, args.in_process)
    records = []
    for mode in modes:
        res = results[mode]
        for r in res["results"]:
            records.append(
                {
                    "mode": mode,
                    "epsilon": r["epsilon"],
                    "saved_bytes": r["saved_bytes"],
                    "peak_bytes": res["peak_rss_bytes"],
                    "peak_growth_bytes": res["peak_rss_bytes"] - res["baseline_rss_bytes"],
                    "time_s": r["time_s"],
                    "time_per_step_s": r["time_s"] / steps,
                    "success_rate": r["success_rate"],
                    "pairs_converted": res["pairs_converted"],
                }
            )
    comparisons = {}
    for other in ("tune", "deploy"):
        if "eval" in modes and other in modes:
            for e in epsilons:
                comparisons[f"{other}_vs_eval@{255 * e:.0f}/255"] = _compare(
                    adv[(other, e)], adv[("eval", e)]
                )
    tune_cmp = [v for k, v in comparisons.items() if k.startswith("tune")]
    first = results[modes[0]]
    payload = {
        "experiment": "attack",
        "command": args.command_line,
        "config": {
            "epsilons": epsilons,
            "steps": steps,
            "alpha": "2.5 * epsilon / steps",
            "random_start": "uniform in [-eps, eps], seed 0",
            "modes": modes,
            "limit": limit,
            "more_photos": args.more_photos,
            "repeats": args.repeats,
        },
        "environment": machine_info("cpu"),
        "peak_note": "peak_bytes: peak RSS of the process that ran the mode (one process per "
        "mode); peak_growth_bytes: that peak minus the RSS after the model and photos were "
        "loaded and the clean predictions made",
        "images": first["images"],
        "clean_pred": first["clean_pred"],
        "clean_prob": first["clean_prob"],
        "records": records,
        "tune_vs_eval_max_abs_diff": max(c["max_abs_diff"] for c in tune_cmp) if tune_cmp else None,
        "tune_vs_eval_frac_pixels_differ": max(c["frac_pixels_differ"] for c in tune_cmp)
        if tune_cmp
        else None,
        "comparisons": comparisons,
        "float64_check": check,
        "adv_pred": {
            m: {f"{255 * r['epsilon']:.0f}/255": r["adv_pred"] for r in results[m]["results"]}
            for m in modes
        },
    }
    path = write_json(os.path.join(args.out, "attack.json"), payload)
    example = None
    if ("eval", max(epsilons)) in adv:
        e = max(epsilons)
        img = adv[("eval", e)][0].permute(1, 2, 0).numpy()
        example = {
            "image": img,
            "title": f"{first['images'][0]}, Eval, eps {255 * e:.0f}/255: "
            f"class {first['clean_pred'][0]} -> "
            f"{payload['adv_pred']['eval'][f'{255 * e:.0f}/255'][0]}",
        }
    plot = _plot(payload, example, os.path.join(args.out, "attack.png"))
    print(summary_table(payload, args.markdown))
    print(common.written(path, plot))
    return 0


def summary_table(payload: dict[str, Any], markdown: bool = False) -> str:
    rows = [
        [
            r["mode"],
            f"{255 * r['epsilon']:.0f}/255",
            mib(r["saved_bytes"]),
            mib(r["peak_bytes"]),
            mib(r["peak_growth_bytes"]),
            f"{r['time_s']:.2f}",
            f"{100 * r['success_rate']:.0f}",
        ]
        for r in payload["records"]
    ]
    header = ["mode", "eps", "saved MiB", "peak RSS MiB", "RSS growth MiB", "time s", "success %"]
    lines = [common.result_table(payload, header, rows, markdown), ""]
    items = list(payload["comparisons"].items())
    items += list((payload.get("float64_check") or {}).items())
    for key, c in items:
        lines.append(
            f"{key}: max |diff| {c['max_abs_diff']:.3g}, pixels differing "
            f"{100 * c['frac_pixels_differ']:.3f}% (> 1/255: "
            f"{100 * c['frac_pixels_differ_gt_1_255']:.3f}%)"
        )
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--epsilons", nargs="+", type=float, help="default 4/255 8/255")
    p.add_argument("--steps", type=int, help="PGD steps (default 10)")
    p.add_argument("--limit", type=int, help="attack only the first N photographs")
    p.add_argument("--more-photos", action="store_true", help="5 more scikit-image pictures")
    p.add_argument("--modes", nargs="+", choices=MODES, help="modes to attack (default all three)")
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="EfficientNet-Lite0's weights from this file (a state dict of "
        "efficientnet-pytorch's EfficientNet, classifier included) instead of the packaged ones",
    )
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the float64 Eval and Tune reference attacks",
    )
    p.add_argument("--repeats", type=int, default=3, help="time the attack N times, keep min")
