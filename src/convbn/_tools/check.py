"""``convbn check``: convert every torchvision model that has BatchNorm and check the
promises on each one; ``convbn check --timm``: every timm architecture that has a
BatchNorm-like module instead (see :mod:`convbn._tools.check_timm`).

For each model: converted/skipped pairs with reasons; Tune equals Eval in float64
(outputs and every gradient); in float32 the error of Tune and of Eval against the
float64 truth; bytes kept for backward in Eval, Tune and after ``convbn.fuse``.
A model passes when the float64 check holds and Tune keeps at most Eval's bytes and
exactly the fused model's. Results go to ``<out>/check.json`` and ``<out>/check.md`` (a
GitHub markdown table under a line naming the machine); the same table is printed, as
text or, with ``--markdown``, as markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

import convbn
from convbn._tools import check_timm
from convbn._tools.bench_models import randomize_norms
from convbn._tools.measure import rel_err, saved_bytes
from convbn._tools.modules import formula_norms
from convbn._tools.output import (
    Progress,
    add_markdown_option,
    describe_error,
    format_table,
    machine_info,
    machine_line,
    mib,
    write_json,
)
from convbn._tools.process import WorkerFailed, run_isolated

__all__ = ["main", "check_model", "list_models", "build_parser"]

FAMILIES = ("classification", "detection", "segmentation", "video", "optical_flow")
_MODULES = {
    "classification": torchvision.models,
    "detection": torchvision.models.detection,
    "segmentation": torchvision.models.segmentation,
    "video": torchvision.models.video,
    "optical_flow": torchvision.models.optical_flow,
}
# Larger models are skipped: their float64 copies take tens of GiB.
MAX_PARAMS = 150_000_000


def list_models(families=FAMILIES) -> list[tuple[str, str]]:
    return [
        (family, name)
        for family in families
        for name in torchvision.models.list_models(module=_MODULES[family])
    ]


def _has_norm(model: nn.Module) -> bool:
    return any(isinstance(getattr(m, "running_var", None), torch.Tensor) for m in model.modules())


def _build(family: str, name: str) -> nn.Module:
    kwargs: dict = {"weights": None}
    if family == "classification":
        kwargs["num_classes"] = 10
        if name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=False)
    elif family in ("detection", "segmentation"):
        kwargs.update(weights_backbone=None, num_classes=3)
        if family == "detection" and not name.startswith("ssd"):
            kwargs.update(min_size=128, max_size=128)
        if name.startswith("keypointrcnn"):
            kwargs.update(num_classes=2, num_keypoints=4)
    elif family == "video":
        kwargs["num_classes"] = 5
    torch.manual_seed(0)
    return torchvision.models.get_model(name, **kwargs)


def _targets(dtype, size, n=2, keypoints=False):
    g = torch.Generator().manual_seed(1)
    targets = []
    for _ in range(n):
        lo = torch.rand(2, 2, generator=g, dtype=dtype) * size * 0.4
        hi = lo + size * 0.3 + torch.rand(2, 2, generator=g, dtype=dtype) * size * 0.2
        boxes = torch.cat([lo, hi], 1)
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        t = {"boxes": boxes, "labels": torch.tensor([1, 1 if keypoints else 2]), "masks": masks}
        if keypoints:
            kp = (
                torch.rand(2, 4, 3, generator=g, dtype=dtype) * size * 0.3
                + lo.repeat(1, 2)[:, None, :3]
            )
            kp[..., 2] = 1
            t["keypoints"] = kp
        targets.append(t)
    return targets


def _runner(family: str, name: str, size: int) -> tuple[Callable, bool]:
    """A function (model, dtype) -> scalar loss, and whether the model trains in train mode."""
    g = torch.Generator().manual_seed(2)
    if family == "detection":
        size = 300 if name.startswith("ssd300") else (320 if name.startswith("ssdlite") else 128)
        images = torch.rand(2, 3, size, size, generator=g)
        targets = _targets(torch.float32, size, keypoints=name.startswith("keypoint"))

        def run(model, dtype):
            ims = [im.to(dtype) for im in images]
            # torchvision insists on float32 keypoints whatever the model's dtype.
            tg = [
                {
                    k: (v.to(dtype) if v.is_floating_point() and k != "keypoints" else v)
                    for k, v in t.items()
                }
                for t in targets
            ]
            torch.manual_seed(0)
            return sum(model(ims, tg).values())

        return run, True
    if family == "optical_flow":
        a, b = torch.rand(1, 3, 128, 128, generator=g), torch.rand(1, 3, 128, 128, generator=g)
        return (lambda m, d: m(a.to(d), b.to(d), num_flow_updates=2)[-1].square().mean()), False
    if family == "video":
        # S3D's last pooling needs 16 frames of 224 x 224 (2 x 7 x 7 after downsampling).
        shape = (1, 3, 16, 224, 224) if name == "s3d" else (1, 3, 4, 32, 32)
        x = torch.randn(*shape, generator=g)
        return (lambda m, d: m(x.to(d)).square().mean()), False
    # Inception needs 75 pixels or more; MaxViT's 7x7 windows need a side of 224 (7 * 2**5).
    side = {"inception_v3": max(size, 75), "maxvit_t": 224}.get(name, size)
    x = torch.randn(2, 3, side, side, generator=g)
    if family == "segmentation":
        return (lambda m, d: m(x.to(d))["out"].square().mean()), False
    return (lambda m, d: m(x.to(d)).square().mean()), False


def _loss_grads(model, run, dtype):
    model.zero_grad(set_to_none=True)
    loss = run(model, dtype)
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return loss.detach(), grads


def _error(got: tuple, ref: tuple) -> float:
    """The worse of the loss's and the gradients' :func:`rel_err` against ``ref``."""
    return max(rel_err(got[0], ref[0]), rel_err(got[1], ref[1]))


def check_model(family: str, name: str, size: int = 64) -> dict:
    """Check one torchvision model; never raises (an error is recorded)."""
    record: dict = {"family": family, "model": name}
    start = time.perf_counter()
    try:
        model = _build(family, name)
        if not _has_norm(model):
            return None
        n_params = sum(p.numel() for p in model.parameters())
        record["params"] = n_params
        if n_params > MAX_PARAMS:
            record["error"] = f"skipped: {n_params / 1e6:.0f}M parameters"
            return record
        model = randomize_norms(model)
        run, trains = _runner(family, name, size)
        # Detectors compute their losses in train mode; every BN is frozen (eval mode).
        model.train(trains)
        for m in model.modules():
            if isinstance(getattr(m, "running_var", None), torch.Tensor):
                m.eval()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tuned = convbn.tune(copy.deepcopy(model), freeze_bn=True)
            # Copied before any forward: some models (RAFT) keep non-leaf tensors afterwards.
            fused = convbn.fuse(copy.deepcopy(tuned))
            m64 = None
            try:
                m64 = copy.deepcopy(model).double()
                # Eval with BatchNorm written out: torch's CPU eval backward is wrong for a
                # channels-last gradient of a contiguous input (see modules.formula_norms).
                ref = _loss_grads(formula_norms(copy.deepcopy(m64)), run, torch.float64)
                got = _loss_grads(convbn.tune(m64, freeze_bn=True), run, torch.float64)
                record["exact_err"] = _error(got, ref)
                exact_tol = 1e-9
            except RuntimeError as e:
                # Some models (RAFT) do not run in float64: compare in float32 instead.
                record["note"] = f"no float64 run ({str(e).splitlines()[0][:80]}); float32 only"
                ref = _loss_grads(model, run, torch.float32)
                got = _loss_grads(tuned, run, torch.float32)
                record["exact_err"] = _error(got, ref)
                exact_tol = 1e-3
            m64 = None
        report = convbn.report(tuned)
        record["converted"] = len(report.converted)
        record["skipped"] = len(report.skipped)
        record["skip_reasons"] = sorted({r for _, r in report.skipped})
        record["method"] = report.method
        if "note" not in record:
            e32 = _loss_grads(model, run, torch.float32)
            t32 = _loss_grads(tuned, run, torch.float32)
            record["fp32_err_eval"] = rel_err(e32[1], ref[1])
            record["fp32_err_tune"] = rel_err(t32[1], ref[1])
        record["saved_eval"] = saved_bytes(model, lambda: run(model, torch.float32))
        record["saved_tune"] = saved_bytes(tuned, lambda: run(tuned, torch.float32))
        record["saved_fused"] = saved_bytes(fused, lambda: run(fused, torch.float32))
        record["ok"] = (
            record["exact_err"] < exact_tol
            and record["saved_tune"] <= record["saved_eval"]
            and record["saved_tune"] == record["saved_fused"]
        )
    except Exception as e:  # one model's failure is a result, not the end of the sweep
        record["error"] = describe_error(e)
        record["traceback"] = traceback.format_exc(limit=6)
        record["ok"] = False
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def _check_one(family: str, name: str, size: int) -> dict:
    """One model's check, as run in a worker process (see ``_isolated``)."""
    return {"record": check_model(family, name, size)}


def _isolated(family: str, name: str, size: int) -> dict | None:
    """``_check_one`` in a fresh process: memory does not pile up over a sweep (in one
    process a sweep's resident memory grows model after model), and a model that crashes
    or is killed for memory is a failed record, not the end of the sweep.
    """
    try:
        out = run_isolated(
            "convbn._tools.check:_check_one",
            {"family": family, "name": name, "size": size},
            threads=torch.get_num_threads(),
        )
    except WorkerFailed as e:
        return {"family": family, "model": name, "ok": False, "error": str(e)}
    rec = out["record"]
    if rec is not None:
        rec["peak_rss_bytes"] = out["peak_rss_bytes"]
    return rec


def _failed(record: dict) -> bool:
    """Not ok, and not a model skipped on purpose (too large to check)."""
    return not record.get("ok") and not str(record.get("error", "")).startswith("skipped")


def _table(records: list[dict], markdown: bool) -> str:
    header = (
        "family", "model", "conv.", "skip.", "fp64 err", "fp32 err Tune / Eval",
        "saved MiB Eval / Tune / fused", "ok", "s", "peak RSS GiB", "note",
    )  # fmt: skip
    rows = []
    for r in records:
        note = r.get("error") or "; ".join(r.get("skip_reasons", []) + [r.get("note", "")])
        err32 = (
            f"{float(r['fp32_err_tune']):.1e} / {float(r['fp32_err_eval']):.1e}"
            if "fp32_err_tune" in r
            else ""
        )
        saved = " / ".join(mib(r.get(k)) for k in ("saved_eval", "saved_tune", "saved_fused"))
        rss = f"{r['peak_rss_bytes'] / 2**30:.1f}" if "peak_rss_bytes" in r else ""
        rows.append(
            (
                r["family"],
                r["model"],
                r.get("converted", ""),
                r.get("skipped", ""),
                "-" if r.get("exact_err") is None else f"{float(r['exact_err']):.1e}",
                err32,
                saved,
                "yes" if r.get("ok") else "NO",
                r.get("seconds", ""),
                rss,
                note.strip("; ")[:120],
            )  # fmt: skip
        )
    return format_table(header, rows, markdown=markdown, align="llrrrllrrrl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convbn check",
        description="Convert every torchvision model that has BatchNorm (with --timm: every "
        "timm architecture that has a BatchNorm-like module) and check that Tune equals Eval "
        "in float64 and keeps Deploy's bytes.",
    )
    parser.add_argument(
        "--families",
        default=",".join(FAMILIES),
        help=f"comma-separated torchvision families (default: {','.join(FAMILIES)})",
    )
    parser.add_argument(
        "--models", default="", help="comma-separated torchvision names (default: all)"
    )
    parser.add_argument(
        "--timm",
        action="store_true",
        help="sweep every timm architecture (timm.list_models(), pretrained=False) that has a "
        "BatchNorm-like module instead of torchvision",
    )
    parser.add_argument(
        "--timm-filter",
        metavar="PATTERN",
        default="",
        help="with --timm: only the names matching these comma-separated shell patterns "
        "(e.g. 'resnet*,levit_*')",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="with --timm: the first N names only"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="with --timm: seconds one model may take before it is recorded as out of time "
        "(default 600)",
    )
    parser.add_argument(
        "--memory-gib",
        type=float,
        default=8,
        help="with --timm: memory (heap) one model's process may take before it is recorded "
        "as out of memory (default 8; 0: no limit)",
    )
    parser.add_argument("--size", type=int, default=64, help="input side (default 64)")
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default check-results, with --timm check-timm-results)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the records already in <out>/check.json (torchvision: the passing ones; "
        "--timm: all of them, failures too unless --retry-failed) and check the other models",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --timm --resume: check again the models whose record is a failure",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="check every model in this process (default: a fresh process per model)",
    )
    add_markdown_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a malformed option (2)
        return int(e.code or 0)
    if args.timm:
        if args.models:
            print("convbn check: --models names torchvision models; with --timm use "
                  "--timm-filter", file=sys.stderr)  # fmt: skip
            return 2
        return check_timm.sweep(
            Path(args.out or "check-timm-results"),
            pattern=args.timm_filter or None,
            limit=args.limit,
            size=args.size,
            timeout=args.timeout or None,
            memory_gib=args.memory_gib or None,
            resume=args.resume,
            retry_failed=args.retry_failed,
            isolate=not args.in_process,
            markdown=args.markdown,
            command="convbn check " + " ".join(argv),
        )
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"convbn check: unknown family {unknown}; one of {FAMILIES}", file=sys.stderr)
        return 2
    todo = list_models(families)
    if args.models:
        wanted = set(args.models.split(","))
        todo = [t for t in todo if t[1] in wanted]
        missing = wanted - {t[1] for t in todo}
        if missing:
            print(f"convbn check: unknown model(s) {sorted(missing)}", file=sys.stderr)
            return 2
    out = Path(args.out or "check-results")
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info("cpu") | {"command": "convbn check " + " ".join(argv)}
    records: list[dict] = []
    if args.resume and (out / "check.json").exists():
        # Failures are checked again; models skipped for their size are not.
        payload = json.loads((out / "check.json").read_text())
        if payload.get("sweep") == check_timm.SWEEP:
            print(f"convbn check: {out / 'check.json'} holds a timm sweep", file=sys.stderr)
            return 2
        records = [r for r in payload["records"] if not _failed(r)]
    done = {(r["family"], r["model"]) for r in records}
    progress = Progress(len(todo), "convbn check")
    for i, (family, name) in enumerate(todo):
        if (family, name) in done:
            progress.step(f"{family} {name}: kept from the earlier run")
            continue
        if args.in_process:
            rec = _check_one(family, name, args.size)["record"]
        else:
            rec = _isolated(family, name, args.size)
        if rec is None:
            progress.step(f"{family} {name}: no BatchNorm")
            continue
        records.append(rec)
        # Written after every model: an interrupted sweep keeps what it has checked.
        payload = {"machine": machine, "done": i + 1, "of": len(todo), "records": records}
        write_json(out / "check.json", payload)
        (out / "check.md").write_text(f"{machine_line(machine)}\n\n{_table(records, True)}\n")
        status = "ok" if rec.get("ok") else f"NOT OK {rec.get('error', '')}"
        progress.step(f"{family} {name}: {status} ({rec.get('seconds')} s)")
    progress.close()
    print(f"{machine_line(machine)}\n")
    print(_table(records, args.markdown))
    bad = [r["model"] for r in records if _failed(r)]
    print(f"\n{len(records)} models with BatchNorm checked, {len(bad)} failed: {bad}")
    return 1 if bad else 0
