"""`convbn check`: the zoo sweep command on a small selection."""

from __future__ import annotations

import json

import convbn.__main__ as cli


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def test_check_selected_models(tmp_path, capsys):
    argv = ["check", "--models", "resnet18,mobilenet_v3_small", "--out", str(tmp_path)]
    assert cli.main([*argv, "--markdown"]) == 0
    records = json.loads((tmp_path / "check.json").read_text())["records"]
    assert sorted(r["model"] for r in records) == ["mobilenet_v3_small", "resnet18"]
    for r in records:
        assert r["ok"] and r["converted"] > 0 and r["exact_err"] < 1e-9
        assert r["saved_tune"] == r["saved_fused"] < r["saved_eval"]
    lines = (tmp_path / "check.md").read_text().splitlines()
    assert lines[0].startswith("Machine: ") and lines[1] == ""
    assert _cells(lines[0 + 2])[:2] == ["family", "model"]
    assert any(_cells(line)[:2] == ["classification", "resnet18"] for line in lines[4:])
    captured = capsys.readouterr()
    # The same table printed, in markdown, under the machine's line; progress on stderr.
    assert "\n".join(lines) in captured.out
    assert "\r" not in captured.err and "convbn check 1/2" in captured.err


def test_check_unknown_model_is_an_error(tmp_path, capsys):
    assert cli.main(["check", "--models", "no_such_net", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_check_resume_keeps_records_and_runs_each_model_in_its_own_process(tmp_path):
    out = str(tmp_path)
    assert cli.main(["check", "--models", "resnet18", "--out", out, "--in-process"]) == 0
    first = json.loads((tmp_path / "check.json").read_text())["records"]
    assert "peak_rss_bytes" not in first[0]
    rc = cli.main(["check", "--models", "resnet18,mobilenet_v3_small", "--out", out, "--resume"])
    assert rc == 0
    records = json.loads((tmp_path / "check.json").read_text())["records"]
    assert [r["model"] for r in records] == ["resnet18", "mobilenet_v3_small"]
    assert records[0] == first[0]  # kept, not checked again
    # Checked in a worker process, whose own peak memory is recorded.
    assert records[1]["ok"] and records[1]["peak_rss_bytes"] > 0


def test_check_resume_refuses_a_timm_sweeps_results(tmp_path, capsys):
    (tmp_path / "check.json").write_text(json.dumps({"sweep": "timm", "records": []}))
    argv = ["check", "--models", "resnet18", "--out", str(tmp_path), "--resume"]
    assert cli.main(argv) == 2
    assert "holds a timm sweep" in capsys.readouterr().err
