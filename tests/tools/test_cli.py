"""The command line and the helpers every tool shares: usage, help lines, progress in a log,
tables, worker processes, module replacement, and that the tools use only convbn's public API."""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import convbn.__main__ as cli
from convbn._tools import bench, check
from convbn._tools.experiments import build_parser as experiment_parser
from convbn._tools.measure import current_rss_bytes, peak_rss_bytes, rel_err
from convbn._tools.modules import replace_modules
from convbn._tools.output import Progress, format_table, json_safe, machine_info, machine_line
from convbn._tools.process import Worker, WorkerFailed, call_forked, run_isolated

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "src" / "convbn" / "_tools"
OWN = [
    *sorted(TOOLS.rglob("*.py")),
    *sorted((ROOT / "src" / "convbn" / "integrations").rglob("*.py")),
    ROOT / "src" / "convbn" / "__main__.py",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


# --------------------------------------------------------------------------- usage


def test_bare_convbn_prints_usage_and_succeeds(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: convbn <command>")
    assert all(name in out for name in ("bench", "check", "experiment"))


def test_bare_convbn_runs_nothing():
    proc = subprocess.run(
        [sys.executable, "-m", "convbn"], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: convbn")
    assert proc.stderr == ""


def test_an_option_without_a_command_is_refused(capsys):
    assert cli.main(["--models", "resnet18"]) == 2
    assert "a command comes first" in capsys.readouterr().err


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    parsers = [("bench", bench.build_parser()), ("check", check.build_parser())]
    pending = [("experiment", experiment_parser())]
    while pending:
        name, parser = pending.pop()
        parsers.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return parsers


def test_every_option_of_every_command_has_a_help_line():
    parsers = _parsers()
    assert {name for name, _ in parsers} >= {
        "bench", "check", "experiment", "experiment transfer", "experiment detection",
        "experiment attack",
    }  # fmt: skip
    for name, parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


def test_markdown_and_checkpoint_options():
    for name, parser in _parsers():
        options = {o for a in parser._actions for o in a.option_strings}
        if name != "experiment":
            assert "--markdown" in options, name
        if name in ("experiment transfer", "experiment attack"):
            assert "--checkpoint" in options, name


# --------------------------------------------------------------------------- progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_is_one_line_per_item():
    stream = io.StringIO()
    progress = Progress(3, "work", stream)
    for label in ("a", "b", "c"):
        progress.step(label)
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("work 1/3") and lines[0].endswith(" a")
    assert lines[2].startswith("work 3/3") and lines[2].endswith(" c")


def test_progress_on_a_terminal_redraws_one_line():
    stream = _Terminal()
    progress = Progress(2, "work", stream)
    progress.step("first item, a long label")
    progress.step("b")
    progress.close()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.count("\n") == 1 and text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    # The shorter line blanks what is left of the longer one.
    assert "work 2/2" in last and "long label" not in last
    assert len(last) == len(text.split("\r")[1])


# --------------------------------------------------------------------------- tables


def test_text_table_aligns_numbers_right():
    table = format_table(["name", "value"], [["a", "1.5"], ["longer", "-"], ["c", "12.25"]])
    lines = table.splitlines()
    assert lines[0] == "name    value"
    assert lines[1] == "------  -----"
    assert lines[2] == "a         1.5"
    assert lines[4] == "c       12.25"


def test_markdown_table():
    table = format_table(["name", "n"], [["a|b", 3], ["c", 10]], markdown=True)
    lines = table.splitlines()
    assert lines[0] == "| name |   n |"
    assert lines[1] == "|------|----:|"
    assert lines[2] == "| a\\|b |   3 |"
    assert all(line.startswith("|") and line.endswith("|") for line in lines)


def test_machine_line_names_cpu_torch_and_threads():
    info = machine_info("cpu", threads=3)
    line = machine_line(info)
    assert line.startswith("Machine: ") and info["cpu"] in line
    assert f"torch {torch.__version__}" in line and "3 threads" in line
    gpu = machine_line(
        {"cpu": "X", "gpu": "NVIDIA Y", "cuda": "12", "torch": "2", "torch_threads": 1}
    )
    assert "NVIDIA Y" in gpu and "1 thread" in gpu and "threads" not in gpu


def test_json_safe():
    assert json.dumps(json_safe({"a": [float("nan"), float("inf"), -float("inf"), 1.0]})) == (
        '{"a": [null, "inf", "-inf", 1.0]}'
    )


# --------------------------------------------------------------------------- measurements


def test_rel_err():
    ref = torch.tensor([1.0, -4.0])
    assert rel_err(ref + 0.4, ref) == pytest.approx(0.1)
    assert rel_err(torch.ones(3), torch.ones(4)) == float("inf")
    assert rel_err(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")
    assert rel_err(torch.tensor([0.5]), torch.zeros(1)) == 0.5
    # Over a sequence of tensors together: the scale is the largest of all.
    assert rel_err([ref, torch.tensor([0.1])], [ref, torch.tensor([0.0])]) == pytest.approx(0.025)
    assert rel_err([ref], [ref, ref]) == float("inf")


def test_memory_readers():
    assert 0 < current_rss_bytes() <= peak_rss_bytes()


# --------------------------------------------------------------------------- processes


def test_worker_calls_functions_and_keeps_stdout_for_replies(tmp_path):
    log = tmp_path / "worker.log"
    with Worker(threads=1, log=log) as worker:
        # What the worker prints goes to its log, not among the replies.
        assert worker.call("builtins:print", end="printed by the worker\n") is None
        assert worker.call("torch:get_num_threads") == 1
        assert worker.call("json:dumps", obj=[1, 2]) == "[1, 2]"
    assert not worker.alive
    assert "printed by the worker" in worker.log_text()


def test_worker_reports_an_exception_and_ends(tmp_path):
    worker = Worker(log=tmp_path / "worker.log")
    with pytest.raises(WorkerFailed, match="ModuleNotFoundError"):
        worker.call("no_such_module_xyz:f")
    assert not worker.alive
    assert "Traceback" in worker.log_text()
    with pytest.raises(WorkerFailed, match="no longer running"):
        worker.call("json:dumps", obj=1)


def test_worker_crash_is_a_failure(tmp_path):
    with (
        Worker(log=tmp_path / "worker.log") as worker,
        pytest.raises(WorkerFailed, match="crashed \\(exit status 3\\)"),
    ):
        worker.call("os:_exit", status=3)


def test_run_isolated_reports_the_peak_memory_of_its_process():
    out = run_isolated("convbn._tools.output:machine_info", {"device": "cpu", "threads": 2})
    assert out["torch_threads"] == 2 and out["peak_rss_bytes"] > 0
    here = run_isolated("convbn._tools.output:machine_info", {}, isolate=False)
    assert here["peak_rss_bytes"] == peak_rss_bytes()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_call_runs_in_its_own_process_and_fails_like_a_worker():
    pid, peak = call_forked("os:getpid", {})
    assert pid != os.getpid() and peak > 0
    assert call_forked("json:dumps", {"obj": [1, 2]})[0] == "[1, 2]"
    with pytest.raises(WorkerFailed, match="ModuleNotFoundError"):
        call_forked("no_such_module_xyz:f", {})
    with pytest.raises(WorkerFailed, match="crashed \\(exit status 3\\)"):
        call_forked("os:_exit", {"status": 3})
    with pytest.raises(WorkerFailed, match="did not answer within 1 s"):
        call_forked("subprocess:run", {"args": ["sleep", "5"]}, timeout=1)


# --------------------------------------------------------------------------- modules


def test_replace_modules_once_per_module_everywhere():
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Sequential(shared, nn.ReLU()))
    asked = []

    def replacement(m: nn.Module) -> nn.Module | None:
        asked.append(m)
        return nn.Identity() if isinstance(m, nn.BatchNorm2d) else None

    assert replace_modules(model, replacement) == 1
    assert model[1] is model[2][0] and isinstance(model[1], nn.Identity)
    assert sum(m is shared for m in asked) == 1
    assert model not in asked  # the model itself is never replaced


# --------------------------------------------------------------------------- the tools' code


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.module or "", alias.name) for alias in node.names]
    return found


def test_tools_use_only_the_public_api_of_the_core():
    for path in OWN:
        text = path.read_text()
        for module, name in _imports(path):
            if module == "convbn" or module.startswith("convbn."):
                assert module in ("convbn", "convbn.functional") or module.startswith(
                    "convbn._tools"
                ), (path.name, module)
                if module in ("convbn", "convbn.functional"):
                    assert not name.startswith("_"), (path.name, name)
        for private in ("_convbn_state", "convbn._math", "convbn._blocks", "convbn._model"):
            assert private not in text, (path.name, private)


def _definitions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
    }


def test_each_shared_helper_is_defined_once():
    homes = {
        "Progress": "output.py",
        "format_table": "output.py",
        "machine_info": "output.py",
        "pyplot": "output.py",
        "write_json": "output.py",
        "rel_err": "measure.py",
        "peak_rss_bytes": "measure.py",
        "current_rss_bytes": "measure.py",
        "run_isolated": "process.py",
        "Worker": "process.py",
        "replace_modules": "modules.py",
    }
    for path in OWN:
        names = {n.lstrip("_") for n in _definitions(path)}
        for helper, home in homes.items():
            if path.name != home:
                assert helper not in names, (path.name, helper)
    processes = [p.name for p in OWN if "subprocess.Popen" in p.read_text()]
    assert processes == ["process.py"]
