"""`refilled report` on folders it cannot use: one line naming the file, nothing written (issue 13)."""

import json

import pytest
from test_report import make_runs
from tiny import run_cli


def _report(capsys, *args):
    code, _, err = run_cli(capsys, "report", *args)
    assert "Traceback" not in err and err.count("\n") == 1, err
    return code, err


@pytest.mark.parametrize(
    "content,expected",
    [
        ('{"method": "ce", "seed": 0,', "is not valid JSON (line 1, column 28"),
        ("[1, 2, 3]", "must hold a JSON object, got list"),
        ('{"loss": 0.1, "epochs": 3}', "is not a refilled result (no 'method', 'test_accuracy', 'seed')"),
        ('{"method": "ce", "seed": 0, "test_accuracy": "high"}', "('test_accuracy' is 'high', not a number)"),
        ('{"method": "ce", "seed": "0", "test_accuracy": 0.5}', "('seed' is '0', not an integer)"),
        ('{"method": 3, "seed": 0, "test_accuracy": 0.5}', "('method' is 3, not a string)"),
        ('{"method": "ce", "seed": 0, "test_accuracy": 0.5, "overlap": "5"}', "'overlap' is '5'"),
    ],
)
def test_corrupt_or_foreign_results_file(tmp_path, capsys, content, expected):
    runs = tmp_path / "runs"
    make_runs(runs)
    bad = runs / "zzz" / "results.json"
    bad.parent.mkdir()
    bad.write_text(content)
    code, err = _report(capsys, runs)
    assert code == 2
    assert f"results file '{bad}'" in err and expected in err, err
    assert f"move it out of '{runs}' or delete it" in err
    assert not (runs / "report.md").exists()


def test_runs_folder_missing_or_a_file(tmp_path, capsys):
    code, err = _report(capsys, tmp_path / "nope")
    assert code == 2 and "runs folder" in err and "does not exist" in err
    assert not (tmp_path / "nope").exists()
    (tmp_path / "f").write_text("x")
    code, err = _report(capsys, tmp_path / "f")
    assert code == 2 and "is a file, not a folder of runs" in err


def test_out_is_a_file_or_cannot_be_created(tmp_path, capsys):
    make_runs(tmp_path / "runs")
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    code, err = _report(capsys, tmp_path / "runs", "--out", blocker)
    assert code == 2 and f"--out '{blocker}' is a file" in err
    assert blocker.read_text() == "keep me"
    code, err = _report(capsys, tmp_path / "runs", "--out", blocker / "sub")
    assert code == 2 and f"cannot create the report folder '{blocker / 'sub'}'" in err
    assert "choose another --out" in err


def test_corrupt_metrics_file(tmp_path, capsys):
    make_runs(tmp_path / "runs")
    metrics = next((tmp_path / "runs").glob("*/metrics.csv"))
    metrics.write_text("stage,epoch,steps,loss\ntrain,1,many,0.5\n")
    code, err = _report(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert code == 2 and f"metrics file '{metrics}' cannot be read" in err


def test_teacher_and_student_records_still_report(tmp_path, capsys):
    make_runs(tmp_path / "runs")
    record = json.loads(next((tmp_path / "runs").glob("*/results.json")).read_text())
    assert {"method", "seed", "test_accuracy"} <= record.keys()
    code, _, err = run_cli(capsys, "report", tmp_path / "runs")
    assert code == 0, err
