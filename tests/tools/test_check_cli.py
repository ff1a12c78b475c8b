"""`convbn check`: the zoo sweep command on a small selection."""

from __future__ import annotations

import json

import convbn.__main__ as cli


def test_check_selected_models(tmp_path, capsys):
    rc = cli.main(["check", "--models", "resnet18,mobilenet_v3_small", "--out", str(tmp_path)])
    assert rc == 0
    records = json.loads((tmp_path / "check.json").read_text())["records"]
    assert sorted(r["model"] for r in records) == ["mobilenet_v3_small", "resnet18"]
    for r in records:
        assert r["ok"] and r["converted"] > 0 and r["exact_err"] < 1e-9
        assert r["saved_tune"] == r["saved_fused"] < r["saved_eval"]
    assert "| classification | resnet18 |" in (tmp_path / "check.md").read_text()


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
