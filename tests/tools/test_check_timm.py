"""`convbn check --timm`: the census of BNs fed directly by a producer, one model's record,
the sweep's files, its summary and resuming it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import convbn
import convbn.__main__ as cli
from convbn._tools import check_timm
from convbn._tools.check_timm import (
    calibrate_norms,
    check_timm_model,
    exact,
    fed_directly,
    is_bn_like,
    reason_kind,
    run_model,
    summary,
    table,
)

timm = pytest.importorskip("timm")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


# --------------------------------------------------------------------------- the census


class FrozenBatchNorm2d(nn.Module):
    """BN-like by its class name only, like torchvision's."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return (x - self.running_mean[:, None, None]) / self.running_var[:, None, None].sqrt()


class SameConv(nn.Conv2d):
    """A producer subclass, as timm's Conv2dSame."""


class Census(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)  # fed
        self.shared = SameConv(4, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)  # fed, the conv's output also goes elsewhere
        self.conv_act = nn.Conv2d(4, 4, 1)
        self.bn_after_inplace = nn.BatchNorm2d(4)  # conv -> relu_ -> bn: not fed
        self.bn_input = nn.BatchNorm2d(3)  # the model's input: not fed
        self.frozen_conv = nn.Conv2d(4, 4, 1)
        self.frozen = FrozenBatchNorm2d(4)  # fed
        self.conv_flat = nn.Conv2d(4, 2, 1)
        self.bn_conv_flat = nn.BatchNorm1d(2 * 8 * 8)  # a conv's output flattened: not fed
        self.linear = nn.Linear(4, 6)
        self.bn_linear_flat = nn.BatchNorm1d(6)  # Linear -> flatten -> BatchNorm1d: fed
        self.linear_chain = nn.Linear(4, 6)
        self.bn_linear_chain = nn.BatchNorm1d(6)  # Linear -> reshape -> view: fed
        self.linear_act = nn.Linear(4, 6)
        self.bn_linear_act = nn.BatchNorm1d(6)  # Linear -> relu -> BatchNorm1d: not fed
        self.twice = nn.Conv2d(4, 4, 1)
        self.bn_twice = nn.BatchNorm2d(4)  # first called on a sum, then on a conv: fed
        self.bn_unused = nn.BatchNorm2d(4)  # never called

    def forward(self, x):
        self.bn_input(x)
        y = self.bn(self.conv(x))
        s = self.shared(y)
        y = self.bn_shared(s) + s
        a = self.conv_act(y).relu_()
        y = self.bn_after_inplace(a)
        y = self.frozen(self.frozen_conv(y))
        flat = self.bn_conv_flat(torch.flatten(self.conv_flat(y), 1))
        tokens = y.flatten(2).transpose(1, 2)  # (N, 64, 4)
        t1 = self.bn_linear_flat(self.linear(tokens).flatten(0, 1))
        t2 = self.bn_linear_chain(self.linear_chain(tokens).reshape(-1, 8, 6).view(-1, 6))
        t3 = self.bn_linear_act(torch.relu(self.linear_act(tokens)).flatten(0, 1))
        y = self.bn_twice(y + 1)
        y = self.bn_twice(self.twice(y))
        return y.sum() + flat.sum() + t1.sum() + t2.sum() + t3.sum()


def test_fed_directly_by_identity_through_linear_reshapes():
    model = Census().eval()
    fed, called = fed_directly(model, (torch.randn(2, 3, 8, 8),))
    assert fed == [
        "bn", "bn_shared", "frozen", "bn_linear_flat", "bn_linear_chain", "bn_twice"
    ]  # fmt: skip
    every = [n for n, m in model.named_modules() if is_bn_like(m)]
    assert called == [n for n in every if n != "bn_unused"]
    # The hooks are gone afterwards, and no function mode is left behind.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.flatten(torch.ones(2, 2)).shape == (4,)


def test_calibrated_statistics_are_those_of_each_norms_input():
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5)
    ).eval()
    x = torch.randn(4, 3, 8, 8) * 5 + 2
    calibrate_norms(model, (x,))
    h = model[0](x)
    assert torch.allclose(model[1].running_mean, h.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(model[1].running_var, h.var((0, 2, 3), unbiased=False), rtol=1e-4)
    with torch.no_grad():
        y = model(x)
    # Each BN now normalises what it receives (its gamma 1, beta 0).
    assert y.mean((0, 2, 3)).abs().max() < 1e-4
    assert (y.var((0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3


def test_exact_below_1e9_or_with_calibrated_statistics():
    record = {"exact_err": 11.8, "err_floor": 0.26}
    assert not exact(record)
    # Within 10x Eval's own floor counts where the floor is small; a chaotic network's
    # floor proves nothing: its statistics are calibrated.
    assert exact({"exact_err": 2.6e-9, "err_floor": 9.4e-10})
    assert not exact({"exact_err": 1e-6, "err_floor": 1e-6})
    assert not exact(record | {"calibrated_err": 1.0, "calibrated_floor": 1.9})
    assert exact(record | {"calibrated_err": 2e-10, "calibrated_floor": 1e-10})
    assert not exact(record | {"calibrated_err": 1e-3, "calibrated_floor": 1e-12})
    assert exact({"exact_err": 3e-15, "err_floor": 2e-15})


def test_bn_like_modules():
    from timm.layers import BatchNormAct2d

    assert is_bn_like(nn.BatchNorm1d(3)) and is_bn_like(nn.SyncBatchNorm(3))
    assert is_bn_like(BatchNormAct2d(3)) and is_bn_like(FrozenBatchNorm2d(3))
    assert not is_bn_like(nn.LayerNorm(3)) and not is_bn_like(nn.GroupNorm(1, 3))


def test_reason_kind_reads_the_same_in_every_model():
    names = ["", "stages", "stages.0", "stages.0.conv", "stages.10.conv"]
    assert reason_kind("output of stages.0.conv also goes to 2 other place(s)", names) == (
        "output of <m> also goes to N other place(s)"
    )
    assert reason_kind("output of stages.10.conv also goes to 3 other place(s)", names) == (
        "output of <m> also goes to N other place(s)"
    )
    assert reason_kind("input comes from call_method mean, not a producer module", names) == (
        "input comes from call_method mean, not a producer module"
    )


# --------------------------------------------------------------------------- one model


def _reference(name: str, **kwargs) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    return model, [n for n, m in model.named_modules() if is_bn_like(m)]


@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050"])
def test_record_of_a_convolutional_model(name):
    record = check_timm_model(name)
    assert "error" not in record and "stage" not in record, record.get("error")
    model, bns = _reference(name)
    assert record["build_kwargs"] == {}
    assert record["params"] == sum(p.numel() for p in model.parameters())
    # Every BN of these networks follows a convolution.
    assert record["bn"] == record["fed"] == record["bn_called"] == len(bns)
    assert record["fed_names"] == bns
    report = convbn.report(convbn.tune(model))
    converted = list(dict.fromkeys(b for _, b in report.converted))
    assert record["converted_pairs"] == len(report.converted)
    assert record["converted_bns"] == len(converted)
    assert record["fed_converted"] == len(set(converted) & set(bns))
    assert record["skipped"] == [list(s) for s in report.skipped]
    assert len(record["skip_kinds"]) == len(record["skipped"])
    assert record["method"] == report.method
    assert record["fed_not_converted"] == [
        [b, dict(report.skipped).get(b, "not in the report")] for b in bns if b not in converted
    ]
    assert record["exact_err"] == max(record["err_out"], record["err_grad"]) < 1e-9
    for key in ("saved_eval", "saved_tune", "saved_deploy"):
        assert isinstance(record[key], int) and record[key] > 0


def test_a_model_that_needs_its_image_size_is_built_for_64_pixels():
    record = check_timm_model("levit_128s")
    assert "error" not in record, record.get("error")
    # LeViT's attention biases are sized for its image: as it is, it does not run on 64^2.
    assert record["build_kwargs"] == {"img_size": 64}
    _, bns = _reference("levit_128s", img_size=64)
    assert record["bn"] == record["bn_called"] == len(bns)
    # Its Linear -> flatten -> BatchNorm1d blocks are fed directly; the heads' BNs read a mean.
    assert record["fed_names"] == [b for b in bns if not b.startswith("head")]
    assert record["fed"] == len(bns) - 2
    assert record["fed_converted"] + len(record["fed_not_converted"]) == record["fed"]


def test_a_model_that_runs_only_at_its_own_size_is_checked_there():
    # EfficientFormer's attention is sized for 224^2, with or without img_size.
    record = check_timm_model("efficientformer_l1")
    assert "error" not in record, record.get("error")
    assert record["size"] == 224 and record["build_kwargs"] == {}
    assert record["fed_converted"] == record["fed"] > 0 and exact(record)
    assert record["saved_tune"] == record["saved_deploy"]


def test_a_model_without_batchnorm_has_a_short_record():
    record = check_timm_model("test_vit")
    assert record["bn"] == 0 and "error" not in record and "exact_err" not in record


def test_failures_are_recorded_with_their_stage():
    record = check_timm_model("no_such_timm_model")
    assert record["failure"] == "build" and record["stage"] == "build"
    assert "no_such_timm_model" in record["error"]
    record = check_timm_model("resnet10t", timeout=0.001)
    assert record["failure"] == "out of time" and "out of time" in record["error"]


@pytest.mark.parametrize("fork", [False, True] if hasattr(os, "fork") else [False])
def test_a_worker_out_of_memory_is_a_record(fork):
    record = run_model("resnet10t", memory_gib=0.3, threads=1, fork=fork)
    assert record["model"] == "resnet10t" and record["failure"] == "out of memory", record.get(
        "error"
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_worker_checks_a_model():
    record = run_model("resnet10t", threads=1, fork=True)
    assert "error" not in record and record["fed_converted"] == record["fed"] == 14
    assert record["saved_tune"] == record["saved_deploy"] and record["peak_rss_bytes"] > 0


# --------------------------------------------------------------------------- the sweep


def _record(model, **fields):
    base = {
        "model": model, "params": 1_000_000, "bn": 4, "fed": 3, "converted_pairs": 3,
        "converted_bns": 3, "fed_converted": 2, "converted_not_fed": ["x"],
        "skipped": [["a", "input comes from call_method mean, not a producer module"]],
        "skip_kinds": ["input comes from call_method mean, not a producer module"],
        "exact_err": 1e-15, "saved_eval": 3 * 2**20, "saved_tune": 2 * 2**20,
        "saved_deploy": 2 * 2**20, "seconds": 1.0,
    }  # fmt: skip
    return base | fields


def test_summary_and_table():
    records = [
        _record("net_a"),
        _record("net_b", exact_err=1e-6, fed_converted=3, saved_deploy=1),
        {"model": "no_bn", "bn": 0},
        {"model": "broken_a", "failure": "build", "error": "TypeError: bad argument"},
        {"model": "broken_b", "failure": "build", "error": "TypeError: bad argument"},
        {"model": "fixed_size", "bn": 2, "failure": "run", "error": "RuntimeError: shape"},
        {"model": "slow", "failure": "out of time", "error": "out of time: over 9 s"},
        {"model": "big_a", "failure": "out of memory", "error": "E: tried to allocate 1024 bytes"},
        {"model": "big_b", "failure": "out of memory", "error": "E: tried to allocate 2048 bytes"},
        {"model": "bug", "bn": 2, "failure": "convbn", "stage": "convbn.tune", "error": "E: x"},
    ]
    lines = summary(records, ["net_a", "net_b", "no_bn", "later"])
    text = "\n".join(lines)
    assert lines[0].startswith("Models swept: 10 (3 of the 4 names this run lists); 1 without")
    assert "9 in the table, 2 checked through, 7 failed" in lines[0]
    assert "failed to build: 2: TypeError: bad argument (2)" in text
    assert "did not run at 64x64: 1: RuntimeError: shape (1)" in text
    assert "ran out of time: 1: out of time: over N s (1)" in text
    assert "ran out of memory: 2: E: tried to allocate N bytes (2)" in text
    assert "convbn raised: 1 (bug): convbn.tune: E: x (1)" in text
    assert (
        "checked through: 8; fed directly by a producer: 6; of those converted: 5 (83.3%)" in text
    )
    assert "BNs converted in all: 6 (2 not fed directly by the census)" in text
    assert "Exact in float64: 1 of 2 models" in text
    assert "Tune keeps Deploy's in 1 of 2 models, at most Eval's in 2" in text
    assert "Skipped BNs: 2; reasons: input comes from call_method mean" in text

    rows = table(records, markdown=True).splitlines()
    assert _cells(rows[0])[:4] == ["model", "params M", "BN", "fed"]
    models = [_cells(r)[0] for r in rows[2:]]
    assert models == sorted(r["model"] for r in records if r.get("bn") != 0)
    bug = _cells(next(r for r in rows if _cells(r)[0] == "bug"))
    assert bug[2] == "2" and bug[8] == "-" and bug[-1] == "convbn: E: x"
    net_b = _cells(next(r for r in rows if _cells(r)[0] == "net_b"))
    assert net_b[1:9] == ["1.0", "4", "3", "3", "3", "3", "1", "1.0e-06"]
    assert net_b[10] == "3.0 / 2.0 / 0.0"


def _sweep(tmp_path, *options):
    return cli.main(["check", "--timm", "--out", str(tmp_path), *options])


def test_sweep_writes_results_and_resumes(tmp_path, capsys):
    names = "test_resnet,test_vit"
    assert _sweep(tmp_path, "--timm-filter", names, "--in-process", "--markdown") == 0
    payload = json.loads((tmp_path / "check.json").read_text())
    assert payload["sweep"] == "timm" and payload["size"] == 64
    first = {r["model"]: r for r in payload["records"]}
    assert sorted(first) == ["test_resnet", "test_vit"]
    assert first["test_vit"] == {
        "model": "test_vit", "bn": 0, "params": first["test_vit"]["params"], "counted_on": "meta"
    }  # fmt: skip
    assert first["test_resnet"]["bn"] == 15 and first["test_resnet"]["exact_err"] < 1e-9

    md = (tmp_path / "check.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith("Machine: ") and lines[1] == ""
    assert _cells(lines[2])[:3] == ["model", "params M", "BN"]
    assert [_cells(line)[0] for line in lines[4:5]] == ["test_resnet"] and lines[5] == ""
    assert "Models swept: 2 (2 of the 2 names this run lists); 1 without" in md
    captured = capsys.readouterr()
    assert md.strip() in captured.out  # the same table and summary, printed
    assert "convbn check --timm 2/2" in captured.err

    # Resumed: the records kept as they are, the new name checked.
    assert _sweep(tmp_path, "--timm-filter", "test_resnet,test_efficientnet", "--resume",
                  "--in-process") == 0  # fmt: skip
    records = json.loads((tmp_path / "check.json").read_text())["records"]
    assert [r["model"] for r in records] == ["test_resnet", "test_vit", "test_efficientnet"]
    assert records[:2] == list(first.values())
    assert "kept from the earlier run" in capsys.readouterr().err

    # A failure is kept by --resume, checked again with --retry-failed.
    payload = json.loads((tmp_path / "check.json").read_text())
    payload["records"][0] = {"model": "test_resnet", "failure": "crash", "error": "gone"}
    (tmp_path / "check.json").write_text(json.dumps(payload))
    assert _sweep(tmp_path, "--timm-filter", "test_resnet", "--resume", "--in-process") == 0
    records = json.loads((tmp_path / "check.json").read_text())["records"]
    assert records[0]["model"] == "test_resnet" and records[0]["error"] == "gone"
    assert "worker crashed: 1: gone (1)" in (tmp_path / "check.md").read_text()
    assert _sweep(tmp_path, "--timm-filter", "test_resnet", "--resume", "--retry-failed",
                  "--in-process") == 0  # fmt: skip
    records = json.loads((tmp_path / "check.json").read_text())["records"]
    assert [r["model"] for r in records] == ["test_vit", "test_efficientnet", "test_resnet"]
    assert "error" not in records[-1]


@pytest.mark.slow
def test_sweep_runs_each_model_in_its_own_process(tmp_path):
    assert _sweep(tmp_path, "--timm-filter", "test_efficientnet") == 0
    (record,) = json.loads((tmp_path / "check.json").read_text())["records"]
    assert "error" not in record and record["bn"] == 13
    assert record["peak_rss_bytes"] > 0


def test_sweep_refuses_other_results_and_torchvision_names(tmp_path, capsys):
    (tmp_path / "check.json").write_text(json.dumps({"records": []}))
    assert _sweep(tmp_path, "--timm-filter", "test_vit", "--resume") == 2
    assert "holds no timm sweep" in capsys.readouterr().err
    assert _sweep(tmp_path, "--models", "resnet18") == 2
    assert "--timm-filter" in capsys.readouterr().err


def test_names_filtered_and_limited():
    names = check_timm.timm_names("resnet1*,levit_128s", limit=3)
    assert len(names) == 3 and all(n.startswith("resnet1") or n == "levit_128s" for n in names)
    assert check_timm.timm_names("levit_128s") == ["levit_128s"]
