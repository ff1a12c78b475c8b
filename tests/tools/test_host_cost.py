"""`convbn bench --host-cost`: operator and host-read counts per pair, the interleaved rounds
and the outputs, on chains of a few pairs (timings never asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from convbn._tools import bench
from convbn._tools.bench_modes import apply_mode
from convbn._tools.host_cost import (
    HOST_COST_DEFAULTS,
    HostCostConfig,
    build_chain,
    count_dispatch,
    measure,
)
from convbn._tools.modules import replace_modules

MODES = ["eval", "deploy", "tune", "tune-paper"]
SMALL = ["--pairs", "4", "--rounds", "2", "--steps", "2", "--warmup", "1"]


def _config(modes, pairs=4, **more):
    return HostCostConfig(modes=list(modes), pairs=pairs, rounds=2, steps=2, warmup=1, **more)


@pytest.fixture(scope="module")
def four_modes():
    return measure(_config(MODES))


# --------------------------------------------------------------------------- the counter


def test_host_reads_are_counted_on_any_callable():
    t = torch.tensor([2.0])
    counted = count_dispatch(lambda: (t.item(), float(t), bool(t)))
    assert counted.host_reads == 3
    assert counted.ops["_local_scalar_dense"] == 3
    assert count_dispatch(lambda: t + 1).host_reads == 0


def test_views_and_detach_are_not_counted():
    t = torch.randn(2, 3, requires_grad=True)
    counted = count_dispatch(lambda: (t.view(3, 2), t.t(), t[0], t.reshape(6), t.detach()))
    assert counted.total == 0 and not counted.ops
    counted = count_dispatch(lambda: (t * 2).view(-1).t())
    assert dict(counted.ops) == {"mul": 1}


def test_the_counter_adds_up_over_entries():
    t = torch.randn(3)
    counter = count_dispatch(lambda: t + 1)
    with counter:
        t.sum()
    assert counter.ops == {"add": 1, "sum": 1} and counter.total == 2


# --------------------------------------------------------------------------- the chain


def test_the_chain_is_seeded_with_frozen_statistics():
    a, b = build_chain(3, seed=5), build_chain(3, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    convs = [m for m in a if isinstance(m, nn.Conv2d)]
    bns = [m for m in a if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 3 and all(c.bias is None for c in convs)
    for bn in bns:  # not the defaults: folding them changes the weight
        assert not torch.equal(bn.running_mean, torch.zeros(8))
        assert not torch.equal(bn.running_var, torch.ones(8))
        assert not torch.equal(bn.weight, torch.ones(8))
    assert all(
        c.bias is not None for c in build_chain(2, conv_bias=True) if isinstance(c, nn.Conv2d)
    )
    assert not torch.equal(build_chain(1, seed=1)[0].weight, build_chain(1, seed=2)[0].weight)


def test_counts_are_whole_numbers_per_pair(four_modes):
    for mode in MODES:
        r = four_modes["modes"][mode]
        assert r["error"] is None, (mode, r["error"])
        assert isinstance(r["ops_per_pair"], int) and r["ops_per_pair"] > 0, mode
        assert isinstance(r["host_reads_per_pair"], int), mode
        assert all(isinstance(n, int) for n in r["ops_by_name"].values()), mode
        assert sum(r["ops_by_name"].values()) == r["ops_per_pair"]
    ref = four_modes["modes"]["eval"]["ops_by_name"]
    assert ref["native_batch_norm"] == 1 and ref["convolution"] == 1
    assert ref["native_batch_norm_backward"] == 1 and ref["convolution_backward"] == 1
    deploy = four_modes["modes"]["deploy"]["ops_by_name"]  # BN folded away: no BN operator
    assert deploy["convolution"] == 1 and not any("batch_norm" in name for name in deploy)
    assert [four_modes["modes"][m]["converted"] for m in MODES] == [None, 4, 4, 4]


def test_tune_dispatches_seven_operators_per_pair_eight_with_a_bias(four_modes):
    tune = four_modes["modes"]["tune"]
    assert tune["ops_by_name"] == {
        "_native_batch_norm_legit_no_training": 4,
        "convolution": 1,
        "convolution_backward": 1,
        "native_batch_norm_backward": 1,
    }
    assert tune["host_reads_per_pair"] == 0
    biased = measure(_config(["tune"], pairs=3, conv_bias=True))["modes"]["tune"]
    assert biased["ops_per_pair"] == 8 and biased["host_reads_per_pair"] == 0
    assert biased["ops_by_name"]["_native_batch_norm_legit_no_training"] == 5


def test_counts_per_pair_do_not_depend_on_the_chain_length(four_modes):
    three = measure(_config(["eval", "tune-paper"], pairs=3, conv_bias=True))
    for mode in ("eval", "tune-paper"):
        assert three["modes"][mode]["ops_per_pair"] > 0
    assert three["modes"]["eval"]["ops_by_name"] == four_modes["modes"]["eval"]["ops_by_name"]


class _ReadsOnTheHost(nn.Module):
    """A frozen BN whose forward reads one value back on the host, as a careless
    implementation might (``float`` of a tensor)."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        if float(self.bn.running_var.min()) <= 0:
            raise ValueError("a variance is not positive")
        return self.bn(x)


def _prepare_with_reads(model, mode):
    if mode != "reads":
        return apply_mode(model, mode)
    prepared = apply_mode(model, "eval")
    replace_modules(model, lambda m: _ReadsOnTheHost(m) if isinstance(m, _BatchNorm) else None)
    return prepared


def test_a_mode_that_reads_on_the_host_is_counted():
    payload = measure(_config(["eval", "reads"]), prepare=_prepare_with_reads)
    reads, ref = payload["modes"]["reads"], payload["modes"]["eval"]
    assert reads["host_reads_per_pair"] == 1 and ref["host_reads_per_pair"] == 0
    assert reads["ops_by_name"]["_local_scalar_dense"] == 1
    assert reads["ops_per_pair"] == ref["ops_per_pair"] + 2  # min, then the read


def test_rounds_interleave_and_rotate(four_modes):
    assert four_modes["round_orders"] == [MODES, MODES[1:] + MODES[:1]]
    for mode in MODES:
        r = four_modes["modes"][mode]
        assert len(r["block_s_rounds"]) == len(r["us_per_pair_rounds"]) == 2
        assert all(t > 0 for t in r["block_s_rounds"]) and r["us_per_pair"] > 0
        assert set(r["ratios"]) == {"eval", "tune-paper"} - {mode}
        for ratio in r["ratios"].values():
            assert len(ratio["rounds"]) == 2 and ratio["interval"] is None  # 2 rounds: too few


# --------------------------------------------------------------------------- command line


def test_defaults_depend_on_host_cost():
    plain, host = bench.parse_args([]), bench.parse_args(["--host-cost"])
    assert (plain.rounds, plain.steps, plain.modes) == (6, 1, "train,eval,tune,deploy")
    assert (host.rounds, host.steps) == (30, 20) and host.pairs == 50 and not host.conv_bias
    assert host.modes == HOST_COST_DEFAULTS["modes"] == "eval,deploy,tune,tune-paper"
    assert bench.parse_args(["--host-cost", "--rounds", "7"]).rounds == 7


def test_cli_writes_results_and_a_markdown_table(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--host-cost", *SMALL, "--modes", "eval,tune-paper", "--out", str(out)]
    assert bench.main([*argv, "--markdown"]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    machine = next(i for i, line in enumerate(lines) if line.startswith("Machine: "))
    table = [line for line in lines if line.startswith("|")]
    assert table and lines.index(table[0]) > machine
    assert "ops/pair" in table[0] and "host reads/pair" in table[0] and "µs/pair" in table[0]
    assert "vs eval" in table[0] and "vs tune-paper" in table[0]
    assert any(line.startswith("| eval") for line in table)
    assert "- eval: " in stdout and "native_batch_norm: 1" in stdout
    payload = json.loads((out / "results.json").read_text())
    assert payload["command"] == ["convbn", "bench", *argv, "--markdown"]
    assert payload["machine"]["torch_threads"] == 1
    assert payload["config"] | {"modes": None} == {
        "modes": None, "pairs": 4, "conv_bias": False, "rounds": 2, "steps": 2,
        "warmup": 1, "seed": 0, "device": "cpu", "threads": 1,
    }  # fmt: skip
    assert set(payload["modes"]) == {"eval", "tune-paper"}
    for r in payload["modes"].values():
        assert {
            "ops_per_pair", "host_reads_per_pair", "ops_by_name", "us_per_pair",
            "us_per_pair_rounds", "block_s_rounds", "ratios", "converted", "error",
        } <= set(r)  # fmt: skip
        assert len(r["block_s_rounds"]) == 2


def test_text_table(tmp_path, capsys):
    assert bench.main(["--host-cost", *SMALL, "--modes", "deploy", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    assert "Machine: " in stdout and "|" not in stdout
    assert "deploy: convolution: 1, convolution_backward: 1" in stdout


@pytest.mark.parametrize(
    "more, message",
    [
        (["--batch", "4"], "--batch: not used by --host-cost"),
        (["--modes", "eval,inductor"], "compiled mode(s) inductor"),
        (["--modes", "eval,bogus"], "unknown mode(s) bogus"),
        (["--pairs", "0"], "--pairs must be at least 1"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_usage_errors(more, message, tmp_path, capsys):
    assert bench.main(["--host-cost", *more, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_chain_options_need_host_cost(tmp_path, capsys):
    assert bench.main(["--pairs", "3", "--out", str(tmp_path)]) == 2
    assert "--pairs and --conv-bias go with --host-cost" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_counts_like_cpu(four_modes):
    payload = measure(_config(MODES, device="cuda"))
    for mode in MODES:
        r = payload["modes"][mode]
        assert r["error"] is None and r["us_per_pair"] > 0
        assert r["host_reads_per_pair"] == four_modes["modes"][mode]["host_reads_per_pair"]
    assert payload["modes"]["eval"]["ops_by_name"]["convolution_backward"] == 1
