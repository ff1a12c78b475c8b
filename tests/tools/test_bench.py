"""`convbn bench`: the command line end to end, on tiny models (timings never asserted)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from convbn._tools import bench
from convbn._tools.bench_models import PAPER_ZOO, ModelInfo, build_model, resolve
from convbn._tools.bench_modes import MODES, FrozenScaleShift, PaperTuneProducer, apply_mode
from convbn._tools.bench_report import (
    Record,
    add_ratios,
    aggregate,
    format_summary,
    median_interval,
    plot,
    results_table,
    step_ratio,
)
from convbn._tools.measure import SavedBytes, rel_err

# A user's model module, written to a folder on the workers' PYTHONPATH: `tiny` has a
# Conv2d->BN2d pair, a Conv2d->BN2d pair with stride, and a Linear->BN1d pair;
# `broken` raises, as a user's factory might.
USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn


    def tiny():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(16, 10), nn.BatchNorm1d(10),
        )


    def broken():
        raise RuntimeError("this factory is broken on purpose")


    def nobn():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


    class _Counting(nn.Sequential):
        # Does something odd in its `at`-th step.

        def __init__(self, at, odd):
            super().__init__(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
            self.calls, self.at, self.odd = 0, at, odd

        def forward(self, x):
            # Training steps only, not torch.fx tracing (convbn.tune traces the model).
            self.calls += isinstance(x, torch.Tensor)
            if self.calls == self.at:
                self.odd()
            return super().forward(x)


    def _raise():
        raise RuntimeError("fails in its second step on purpose")


    def flaky():
        return _Counting(2, _raise)


    def crashing():
        import os
        return _Counting(3, lambda: os._exit(3))


    def chatty():
        import os
        return _Counting(1, lambda: (print("a line on stdout"), os.write(1, b"and from C\\n")))
    """
)
MODES_RUN = "eval,tune,deploy,train,tune-paper,frozenbn,mmengine"
ROOT = Path(__file__).resolve().parents[2]


def _env(path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(path), str(ROOT / "src"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    return env


def _cli(args: list[str], path: Path, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convbn", "bench", *args],
        cwd=path,
        env=_env(path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user")
    (path / "benchmod.py").write_text(USER_MODULE)
    return path


def _small_run(
    path: Path, models: str, modes: str, out: Path, *more: str
) -> subprocess.CompletedProcess:
    return _cli(
        [
            "--models", models, "--batch", "2", "--size", "32", "--rounds", "1", "--steps", "1",
            "--warmup", "0", "--threads", "1", "--jobs", "2", "--modes", modes, "--out", str(out),
            *more,
        ],
        path,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(user_dir) -> tuple[subprocess.CompletedProcess, Path]:
    """resnet18 in every mode that runs without compiling."""
    out = user_dir / "results"
    return _small_run(user_dir, "resnet18", MODES_RUN, out), out


@pytest.fixture(scope="module")
def user_run(user_dir) -> tuple[subprocess.CompletedProcess, Path]:
    """The user's tiny model, the broken one and one without BatchNorm, loaded as
    package.module:callable; the tables in markdown."""
    out = user_dir / "user-results"
    models = "benchmod:tiny,benchmod:broken,benchmod:nobn"
    return _small_run(user_dir, models, "eval,tune", out, "--markdown"), out


def _records(out: Path) -> dict[tuple[str, str], dict]:
    data = json.loads((out / "results.json").read_text())
    return {(r["model"], r["mode"]): r for r in data["records"]}


def test_results_structure(run):
    proc, out = run
    data = json.loads((out / "results.json").read_text())
    assert {"torch", "cpu", "torch_threads", "python"} <= set(data["machine"])
    for when in ("start", "end"):  # the machine's speed, taken at both ends of the run
        assert data["machine"][f"matmul_gflops_{when}"] > 0
    assert "matrix product at start" in proc.stdout
    # Above the table, the line that names the machine.
    lines = proc.stdout.splitlines()
    machine = next(i for i, line in enumerate(lines) if line.startswith("Machine: "))
    table = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert machine < table and f"torch {torch.__version__}" in lines[machine]
    records = data["records"]
    assert len(records) == len(MODES_RUN.split(","))
    assert proc.returncode == 0, proc.stderr[-2000:]
    required = {
        "model", "mode", "batch", "size", "dtype", "device", "saved_bytes", "peak_bytes",
        "step_s", "out_rel_err", "grad_rel_err", "saved_vs_eval", "step_vs_eval", "error",
    }  # fmt: skip
    for r in records:
        assert required <= set(r)
        assert (r["batch"], r["size"], r["dtype"], r["device"]) == (2, 32, "fp32", "cpu")
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["mode"]) for r in rows] == [(r["model"], r["mode"]) for r in records]
    assert required <= set(rows[0])
    # The table and the summary are printed: measurements and ratios, no verdicts.
    assert "saved MiB" in proc.stdout and "tune/deploy" in proc.stdout
    assert "step deploy/eval" in proc.stdout
    for word in ("target", "met", "missed", "budget"):
        assert word not in proc.stdout.lower().split(), word
    assert "target" not in proc.stdout.lower()
    # Progress went to stderr, one plain line per item (stderr is not a terminal here).
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    assert "convbn bench 7/" in proc.stderr  # the first model's set-up: 7 modes
    # Every run's page faults per step were counted (zero when malloc reused its pages).
    assert all(
        isinstance(r["minor_faults"], int) and r["minor_faults"] >= 0
        for r in records
        if r["error"] is None
    )
    assert "minor page faults per step" in proc.stdout


def test_tune_memory_and_equivalence(run):
    _, out = run
    model = "resnet18"
    recs = _records(out)
    ok = {mode: recs[(model, mode)] for mode in MODES_RUN.split(",") if mode != "mmengine"}
    for mode, r in ok.items():
        assert r["error"] is None, (mode, r["error"])
        assert r["saved_bytes"] > 0 and r["step_s"] > 0 and r["peak_bytes"] is not None
    tune = ok["tune"]["saved_bytes"]
    assert tune <= 1.005 * ok["deploy"]["saved_bytes"]
    assert tune < ok["tune-paper"]["saved_bytes"]
    assert tune < ok["eval"]["saved_bytes"]
    assert ok["tune"]["pairs"] == ok["tune-paper"]["pairs"] == ok["deploy"]["pairs"] > 0
    for mode in ("tune", "deploy", "tune-paper", "frozenbn"):
        assert ok[mode]["out_rel_err"] < 1e-4, mode
    for mode in ("tune", "tune-paper", "frozenbn"):
        assert ok[mode]["grad_rel_err"] < 1e-3, mode
    assert ok["deploy"]["grad_rel_err"] is None  # fused parameters mean something else
    assert ok["train"]["out_rel_err"] is None and ok["train"]["grad_rel_err"] is None
    assert ok["eval"]["saved_vs_eval"] == 1.0
    assert math.isclose(ok["tune"]["saved_vs_eval"], tune / ok["eval"]["saved_bytes"])


def test_user_callable_and_failure(user_run):
    proc, out = user_run
    assert proc.returncode == 1  # some run failed, results still written
    recs = _records(out)
    assert set(recs) == {
        (m, mode)
        for m in ("benchmod:tiny", "benchmod:broken", "benchmod:nobn")
        for mode in ("eval", "tune")
    }
    for mode in ("eval", "tune"):
        assert "broken on purpose" in recs[("benchmod:broken", mode)]["error"]
    assert "broken on purpose" in proc.stdout
    # The tiny model (Conv2d->BN2d twice, Linear->BN1d) ran in both modes all the same.
    eval_, tune = recs[("benchmod:tiny", "eval")], recs[("benchmod:tiny", "tune")]
    assert eval_["error"] is None and tune["error"] is None
    assert tune["pairs"] == 3
    assert tune["saved_bytes"] < eval_["saved_bytes"]
    assert tune["out_rel_err"] < 1e-5 and tune["grad_rel_err"] < 1e-4


def test_a_mode_that_converted_nothing_says_so(user_run):
    proc, out = user_run
    tune = _records(out)[("benchmod:nobn", "tune")]
    assert tune["error"] is None and tune["pairs"] == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()]
    row = next(r for r in rows if r[:2] == ["benchmod:nobn", "tune"])
    assert row[-1] == "no pair converted" and row[8] == "-"  # no step/eval
    summary = proc.stdout[proc.stdout.index("benchmod:nobn:") :].split("\n\n")[1]
    assert "- tune: no pair converted" in summary and "tune/eval" not in summary


def test_markdown_tables(user_run):
    proc, _ = user_run
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| model "))
    assert lines[head - 2].startswith("Machine: ") and lines[head - 1] == ""
    assert set(lines[head + 1]) <= set("|-: ")  # the header's rule
    rows = [line for line in lines[head + 2 :] if line.startswith("|")]
    assert len(rows) == 6
    assert all(line.count("|") == lines[head].count("|") for line in rows)


def test_unavailable_mode_is_reported(run):
    _, out = run
    r = _records(out)[("resnet18", "mmengine")]
    if importlib.util.find_spec("mmengine") is None:
        assert r["error"] == "unavailable: mmengine is not installed"


def test_plot_written(run):
    _, out = run
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed")
    assert (out / "bench.png").stat().st_size > 1000


def test_unknown_mode_exits_nonzero(tmp_path):
    proc = _cli(["--modes", "eval,bogus"], tmp_path, timeout=600)
    assert proc.returncode == 2
    assert "unknown mode" in proc.stderr and "bogus" in proc.stderr
    assert not (tmp_path / "bench-results").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "resnet18,not_a_model"], "unknown model 'not_a_model'"),
        (["--models", "keypointrcnn_resnet50_fpn"], "only"),
        (["--models", "no_such_module_xyz:f"], "cannot import"),
        (["--dtype", "fp8"], "unknown dtype"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_usage_errors(tmp_path, capsys, args, message):
    assert bench.main([*args, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_timm_needs_timm(tmp_path, capsys):
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed")
    assert bench.main(["--models", "timm:resnet18", "--out", str(tmp_path)]) == 2
    assert "timm is not installed" in capsys.readouterr().err


def test_paper_zoo_plan():
    plan = bench.make_plan(bench.parse_args(["--zoo", "paper"]))
    kinds = {m.name: m.kind for m in plan.models}
    assert [m.name for m in plan.models] == list(PAPER_ZOO)
    assert sum(k == "classification" for k in kinds.values()) >= 12
    assert {n for n, k in kinds.items() if k == "detection"} == {
        "fasterrcnn_resnet50_fpn",
        "retinanet_resnet50_fpn",
        "maskrcnn_resnet50_fpn",
    }
    by_name = {m.name: m for m in plan.models}
    assert by_name["r3d_18"].kind == "video" and by_name["r3d_18"].size == 112
    assert by_name["inception_v3"].size == 299
    assert resolve("inception_v3", 32).size == 299 and resolve("inception_v3", 128).size == 128
    assert plan.modes == ["train", "eval", "tune", "deploy"]


def test_paper_tune_keeps_parameters_and_matches_eval():
    info = ModelInfo("resnet18", "classification", 32)
    model = build_model(info)
    before = {id(p) for p in model.parameters()}
    ref = build_model(info)
    prepared = apply_mode(model, "tune-paper")
    apply_mode(ref, "eval")
    assert {id(p) for p in model.parameters()} == before
    assert sum(isinstance(m, PaperTuneProducer) for m in model.modules()) == prepared.pairs == 20
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(model(x), ref(x)) < 1e-5


def test_frozenbn_any_rank():
    model = torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 1), torch.nn.BatchNorm3d(4), torch.nn.Flatten(2),
        torch.nn.BatchNorm1d(4),
    )  # fmt: skip
    apply_mode(model, "frozenbn")
    assert sum(isinstance(m, FrozenScaleShift) for m in model.modules()) == 2
    assert not any(
        p.requires_grad
        for m in model.modules()
        if isinstance(m, FrozenScaleShift)
        for p in m.parameters()
    )
    assert model(torch.randn(2, 2, 3, 3, 3)).shape == (2, 4, 27)


def test_aggregate_and_table():
    record = Record("m", "tune", 1, 32, "fp32", "cpu")
    aggregate(
        record,
        [
            {"saved_bytes": 10, "peak_bytes": 5, "step_s": 3.0, "pairs": 2},
            {"step_s": 1.0, "peak_bytes": 7},
            {"error": "RuntimeError: boom"},
        ],
    )
    assert (record.saved_bytes, record.step_s, record.peak_bytes) == (10, 2.0, 6)
    assert record.error == "RuntimeError: boom"
    assert "RuntimeError: boom" in results_table([record])
    assert rel_err(torch.ones(3), torch.ones(4)) == math.inf


def _timed(mode, rounds, error=None, model="resnet50"):
    record = Record(model, mode, 8, 224, "fp32", "cpu", error=error)
    aggregate(record, [{"step_s": t} for t in rounds])
    return record


def test_step_ratio_pairs_the_rounds():
    # A slow spell on Eval's third round and not on Tune's: round by round the two take
    # the same time, while the medians' ratio would say Tune takes half as long.
    eval_ = _timed("eval", [1.0, 1.0, 2.0, 2.0, 2.0])
    tune = _timed("tune", [1.0, 1.0, 1.0, 2.0, 2.0])
    assert tune.step_s / eval_.step_s == 0.5
    assert step_ratio(tune, eval_) == 1.0
    add_ratios([eval_, tune])
    assert (eval_.step_vs_eval, tune.step_vs_eval) == (1.0, 1.0)
    summary = format_summary([eval_, tune])
    assert (
        "step tune/eval 1.000 [rounds 0.50-1.00, too few rounds for a 95% interval, "
        "medians' ratio 0.500]"
    ) in summary
    # Rounds that cannot be paired (one lost, or a single round): the medians' ratio.
    assert step_ratio(_timed("tune", [1.0, 1.0, 1.0, 2.0]), eval_) == 0.5
    assert step_ratio(_timed("tune", [1.0]), _timed("eval", [2.0])) == 0.5
    failed = _timed("tune", [1.0, 1.0, 1.0, 2.0, 2.0], error="RuntimeError: boom")
    assert step_ratio(failed, eval_) == 0.5


def test_median_interval():
    assert median_interval([1.0] * 5) is None  # no 95% interval from 5 values
    assert median_interval([3, 1, 2, 6, 5, 4]) == (1, 6)  # 6 values: the range, 96.9%
    ten = [2.0, 0.9, 0.95, 1.0, 1.01, 1.02, 1.03, 1.04, 1.3, 0.5]
    assert median_interval(ten) == (0.9, 1.3)  # 10: 2nd smallest and largest, 97.9%
    assert median_interval(list(range(20))) == (5, 14)  # 20: ranks 6 and 15, 95.9%
    # Coverage, on a skewed distribution with a known median (lognormal: e^mu).
    rng = random.Random(0)
    trials, held = 2000, 0
    for _ in range(trials):
        lo, hi = median_interval([rng.lognormvariate(0.0, 0.5) for _ in range(10)])
        held += lo <= 1.0 <= hi
    assert 0.96 <= held / trials <= 0.995  # 97.9% in theory


def test_summary_gives_intervals_and_no_verdict():
    eval_ = _timed("eval", [1.0] * 10)
    tune = _timed("tune", [0.85, 0.88, 0.9, 0.91, 0.915, 0.93, 0.94, 0.95, 0.97, 1.0])
    deploy = _timed("deploy", [0.8] * 10)
    add_ratios([eval_, tune, deploy])
    assert (tune.step_vs_eval_low, tune.step_vs_eval_high) == (0.88, 0.97)
    for markdown in (False, True):
        summary = format_summary([eval_, tune, deploy], markdown=markdown)
        assert "step tune/eval 0.923 [rounds 0.85-1.00, 95% interval 0.880-0.970" in summary
        assert "step deploy/eval 0.800" in summary
        for word in ("target", "met", "missed", "budget", "cannot tell"):
            assert word not in summary.lower().split(), word
    assert "0.880-0.970" in results_table([eval_, tune, deploy])


def test_zero_pairs_are_not_compared():
    eval_ = _timed("eval", [1.0] * 6)
    tune = _timed("tune", [0.9] * 6)
    tune.pairs = 0
    add_ratios([eval_, tune])
    summary = format_summary([eval_, tune])
    assert "tune: no pair converted" in summary and "tune/eval" not in summary
    row = results_table([eval_, tune]).splitlines()[-1]
    # Its step time is a measurement; its ratios to Eval are not given.
    assert row.endswith("no pair converted") and row.split()[5:9] == ["0.900", "-", "-", "-"]


def test_minor_faults_recorded_and_printed():
    eval_ = Record("m", "eval", 1, 32, "fp32", "cpu")
    aggregate(eval_, [{"step_s": 1.0, "minor_faults": 1234567}, {"step_s": 1.0}])
    tune = Record("m", "tune", 1, 32, "fp32", "cpu")
    aggregate(tune, [{"step_s": 1.0, "minor_faults": 89}])
    assert (eval_.minor_faults, tune.minor_faults) == (1234567, 89)
    summary = format_summary([eval_, tune])
    assert "minor page faults per step (median): eval 1,234,567, tune 89" in summary


def test_plot_when_every_run_failed(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed")
    failed = [Record("m", mode, 1, 32, "fp32", "cpu", error="boom") for mode in ("eval", "tune")]
    assert plot(failed, tmp_path / "bench.png", "all failed")
    assert (tmp_path / "bench.png").exists()


@pytest.mark.slow
def test_compiled_modes(user_dir):
    out = user_dir / "compiled"
    proc = _cli(
        [
            "--models", "benchmod:tiny", "--batch", "2", "--size", "16", "--rounds", "1",
            "--steps", "1", "--modes", "eval,tune,inductor,compiled-tune", "--out", str(out),
        ],
        user_dir,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = _records(out)
    for mode in ("inductor", "compiled-tune"):
        assert recs[("benchmod:tiny", mode)]["compiled"]
        assert recs[("benchmod:tiny", mode)]["out_rel_err"] < 1e-4


@pytest.mark.slow
def test_detection_and_video(user_dir):
    out = user_dir / "detection"
    proc = _cli(
        [
            "--models", "fasterrcnn_resnet50_fpn,r3d_18", "--batch", "1", "--size", "64",
            "--rounds", "1", "--steps", "1", "--modes", "eval,tune,tune-paper,deploy",
            "--out", str(out),
        ],
        user_dir,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = _records(out)
    for model in ("fasterrcnn_resnet50_fpn", "r3d_18"):
        assert recs[(model, "tune")]["pairs"] > 0
        assert (
            recs[(model, "tune")]["saved_bytes"] <= 1.005 * recs[(model, "deploy")]["saved_bytes"]
        )
    assert recs[("r3d_18", "tune")]["frames"] == 8


def test_modes_listed_in_help(capsys):
    assert bench.main(["--help"]) == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines at hyphens
    assert all(mode in text for mode in MODES)


def test_failures_mid_run_keep_the_rounds_before(user_dir):
    """A model that raises in its second step, one whose process dies in its third, and
    one that prints to stdout (where the worker's answers go) in the same run."""
    out = user_dir / "mid-run"
    proc = _cli(
        [
            "--models", "benchmod:flaky,benchmod:crashing,benchmod:chatty", "--batch", "2",
            "--size", "16", "--rounds", "3", "--warmup", "0", "--threads", "1",
            "--modes", "eval,tune", "--out", str(out),
        ],
        user_dir,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    recs = _records(out)
    for mode in ("eval", "tune"):
        flaky = recs[("benchmod:flaky", mode)]
        assert "fails in its second step on purpose" in flaky["error"]
        assert len(flaky["step_s_rounds"]) == 1 and flaky["step_s"] > 0
        crashing = recs[("benchmod:crashing", mode)]
        assert "worker crashed (exit status 3)" in crashing["error"]
        assert len(crashing["step_s_rounds"]) == 2
        chatty = recs[("benchmod:chatty", mode)]
        assert chatty["error"] is None, chatty["error"]
        assert len(chatty["step_s_rounds"]) == 3 and chatty["saved_bytes"] > 0
    assert recs[("benchmod:chatty", "tune")]["out_rel_err"] < 1e-5
    assert (out / "logs" / "benchmod_flaky-eval.log").exists()


def test_matmul_gflops_measures_the_product():
    from convbn._tools.measure import matmul_gflops

    # 2 * 64^3 flops at any plausible speed: a positive, finite rate below a PFLOP/s.
    assert 0 < matmul_gflops("cpu", size=64, repeats=2) < 1e6


def test_saved_bytes_count_what_autograd_still_keeps():
    x = torch.randn(1000, dtype=torch.float32, requires_grad=True)
    counter = SavedBytes()
    with counter.count():
        unused = (x * 2).exp()  # exp saves its result: 4,000 bytes, dropped with its graph
        alias = unused.detach()  # the memory stays allocated, so no later tensor reuses it
        del unused
        kept = (x + 1).sin()  # sin saves its input: 4,000 bytes, kept
    assert counter.total == 4000
    # Counted storages are distinct tensors alive together: nothing is merged.
    assert list(counter.storages.values()) == [4000]
    kept.sum().backward()
    assert torch.allclose(x.grad, (x + 1).cos())
    del alias
