"""write_report on a hand-made folder of runs: means, sample stds, n and paired differences."""

import csv
import json
import math

import pytest

from refilled.cli import main
from refilled.errors import UserError
from refilled.report import read_curve, report_arm, write_report

# test accuracy per (protocol, overlap) -> arm -> seed; refilled has 2 seeds in the cross-task group
ACC = {
    ("standard", 5): {"ce": {0: 0.70, 1: 0.72, 2: 0.74}, "refilled": {0: 0.75, 1: 0.74, 2: 0.79}},
    ("cross_task", 0): {"ce": {0: 0.60, 1: 0.61, 2: 0.65}, "refilled": {0: 0.66, 1: 0.60}},
}
OFFSET = {5: 0, 0: 5}


def make_runs(root):
    for (protocol, overlap), arms in ACC.items():
        for arm, by_seed in arms.items():
            for seed, acc in by_seed.items():
                run_dir = root / f"{protocol}-{arm}-seed{seed}"
                run_dir.mkdir(parents=True)
                record = {
                    "method": arm, "role": "student", "protocol": protocol, "overlap": overlap,
                    "seed": seed, "test_accuracy": acc, "val_accuracy": acc,
                    "stage1_ncm_accuracy": 0.5 if arm == "refilled" else None,
                    # ce: no label; refilled: a sweep cell label, as `refilled sweep` writes it
                    "arm": None if arm == "ce" else f"data.student_offset={OFFSET[overlap]}",
                    "teacher_init": "trained" if arm == "refilled" else None,
                }
                (run_dir / "results.json").write_text(json.dumps(record))
                rows = ["stage,epoch,lr,loss,steps,seconds,val_accuracy,val_ncm_accuracy"]
                if arm == "refilled":
                    rows += ["stage1,1,0.1,3.0,2,0.1,,0.4", "stage1,2,0.1,2.0,2,0.1,,0.5"]
                rows += [f"{'train' if arm == 'ce' else 'stage2'},1,0.1,1.0,2,0.1,{acc - 0.1},",
                         f"{'train' if arm == 'ce' else 'stage2'},2,0.1,0.5,2,0.1,{acc},"]
                (run_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
    # a teacher run is not a student arm
    teacher = root / "teacher-x"
    teacher.mkdir()
    (teacher / "results.json").write_text(json.dumps(
        {"method": "ce", "role": "teacher", "protocol": "standard", "overlap": 5, "seed": 0,
         "test_accuracy": 0.99}))


def sample_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_report_numbers_files_and_plots(tmp_path):
    make_runs(tmp_path / "runs")
    text = write_report(tmp_path / "runs", out=tmp_path / "out")
    out = tmp_path / "out"
    for name in ("report.md", "report.csv", "accuracy_vs_overlap.png", "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "report.md").read_text() == text + "\n"

    rows = {(r["protocol"], r["arm"]): r for r in csv.DictReader((out / "report.csv").open())}
    assert set(rows) == {("standard", "ce"), ("standard", "refilled"),
                         ("cross_task", "ce"), ("cross_task", "refilled")}

    def check(key, n, mean, std, diff=None):
        r = rows[key]
        assert int(r["n"]) == n
        assert float(r["test_mean"]) == pytest.approx(mean)
        assert float(r["test_std"]) == pytest.approx(std)
        if diff is None:
            assert not r.get("diff_mean")
        else:
            assert float(r["diff_mean"]) == pytest.approx(diff[0])
            assert float(r["diff_std"]) == pytest.approx(diff[1])
            assert int(r["diff_n"]) == diff[2]

    # by hand: standard ce 70/72/74 -> 72 ± 2; refilled 75/74/79 -> 76 ± sqrt(7);
    # paired differences 5, 2, 5 -> 4 ± sqrt(3)
    check(("standard", "ce"), 3, 72.0, 2.0)
    check(("standard", "refilled"), 3, 76.0, math.sqrt(7), (4.0, math.sqrt(3), 3))
    # cross-task: ce 60/61/65 -> 62 ± sqrt(7); refilled 66/60 (2 seeds) -> 63 ± sqrt(18);
    # paired over the 2 shared seeds: 6, -1 -> 2.5 ± sqrt(24.5)
    check(("cross_task", "ce"), 3, 62.0, math.sqrt(7))
    check(("cross_task", "refilled"), 2, 63.0, math.sqrt(18), (2.5, math.sqrt(24.5), 2))
    assert sample_std([75, 74, 79]) == pytest.approx(math.sqrt(7))

    # the markdown: standard (overlap 5) first, the baseline first in each group
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| protocol | overlap | arm | n |")
    assert [line.split(" | ")[:3] for line in lines[1:]] == [
        ["| standard", "5", "ce"], ["| standard", "5", "refilled"],
        ["| cross_task", "0", "ce"], ["| cross_task", "0", "refilled"]]
    assert "| 76.0 ± 2.6 |" in lines[2] and "+4.0 ± 1.7" in lines[2]
    assert "| 2 | 63.0 ± 4.2 |" in lines[4] and "+2.5 ± 4.9" in lines[4]
    assert "11 student runs" in text  # 6 + 5 students; the teacher run is left out


def test_report_via_cli_defaults_to_the_runs_folder(tmp_path, capsys):
    make_runs(tmp_path / "runs")
    assert main(["report", str(tmp_path / "runs"), "--baseline", "refilled"]) == 0
    assert "paired diff. vs refilled" in capsys.readouterr().out
    assert (tmp_path / "runs" / "report.md").is_file()


def test_read_curve_accumulates_steps_and_uses_ncm_in_stage1(tmp_path):
    make_runs(tmp_path / "runs")
    curve = read_curve(tmp_path / "runs" / "standard-refilled-seed0")
    assert curve == [(2, 0.4, 3.0), (4, 0.5, 2.0), (6, pytest.approx(0.65), 1.0), (8, 0.75, 0.5)]
    assert read_curve(tmp_path / "nowhere") == []


def test_report_arm_labels():
    assert report_arm({"method": "ce", "arm": None}) == "ce"
    assert report_arm({"method": "rkd", "arm": "data.student_offset=2"}) == "rkd"
    assert report_arm({"method": "rkd", "arm": "method=rkd, data.student_offset=2"}) == "rkd"
    assert report_arm({"method": "refilled", "arm": "ablation=triplet, data.student_offset=0"}) == (
        "refilled (ablation=triplet)")
    assert report_arm({"method": "ce", "arm": "student alone"}) == "student alone"
    assert report_arm({"method": "sp", "arm": "base"}) == "sp"  # an older sweep of seeds only
    assert report_arm({"method": "rkd", "arm": "rkd, data.student_offset=2"}) == "rkd"
    assert report_arm({"method": "refilled", "arm": "refilled, stage2.lam=3"}) == "refilled (stage2.lam=3)"
    # a free-form label with commas stays whole (two such arms must not fall in one cell)
    assert report_arm({"method": "refilled", "arm": "REFILLED, paper budget"}) == "REFILLED, paper budget"
    assert report_arm({"method": "refilled", "arm": "REFILLED, TPAMI hand-off, stage2.lam=1"}) == (
        "REFILLED, TPAMI hand-off (stage2.lam=1)")
    assert report_arm({"method": "refilled", "arm": None, "teacher_init": "random"}) == (
        "refilled (random teacher)")


def test_report_refuses_empty_folders_and_ambiguous_cells(tmp_path):
    with pytest.raises(UserError, match="no student results.json"):
        write_report(tmp_path)
    make_runs(tmp_path / "runs")
    clash = tmp_path / "runs" / "another-ce-seed0"
    clash.mkdir()
    record = json.loads((tmp_path / "runs" / "standard-ce-seed0" / "results.json").read_text())
    (clash / "results.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="same report cell"):
        write_report(tmp_path / "runs")
