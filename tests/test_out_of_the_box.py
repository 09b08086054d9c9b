"""benchmarks/out_of_the_box.py: its table marks a task where the defaults lose to CE (and the
script then exits non-zero), its candidates parse, its digits task splits without overlap."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ootb(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("out_of_the_box", ROOT / "benchmarks" / "out_of_the_box.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path / "out")
    monkeypatch.setattr(module, "MARKDOWN", tmp_path / "out_of_the_box.md")
    return module


def _record(ootb, arm, task, seed, val, test):
    path = ootb.record_path(arm, "", task, seed, "test")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"task": task, "seed": seed, "arm": arm, "settings": {}, "epochs": 20,
                                "val_accuracy": val, "test_accuracy": test, "train_images": 100,
                                "shared_classes": 0, "seconds": 1.0, "notes": {}}))


def test_the_table_marks_a_task_below_ce_and_the_step_fails(ootb, monkeypatch, capsys):
    for seed, (ce, rf) in enumerate([(0.50, 0.60), (0.52, 0.58), (0.48, 0.61)]):
        _record(ootb, "ce", "digits", seed, ce, ce)
        _record(ootb, "refilled", "digits", seed, rf, rf)
    for seed, (ce, rf) in enumerate([(0.80, 0.70), (0.82, 0.81), (0.79, 0.75)]):
        _record(ootb, "ce", "fashion", seed, ce, ce)
        _record(ootb, "refilled", "fashion", seed, rf, rf)
    text = ootb.table()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert rows["digits"].endswith("| yes |") and "+9.7 ± 3.5 [±8.7]" in rows["digits"]
    assert rows["fashion"].endswith("| **no** |") and "-5.0 ± 4.6 [±11.4]" in rows["fashion"]
    monkeypatch.setattr(sys, "argv", ["out_of_the_box.py", "table"])
    assert ootb.main() == 1
    assert "below CE on 1 task" in capsys.readouterr().err
    written = ootb.MARKDOWN.read_text()
    assert "| fashion |" in written and "<!-- answer -->" in written


def test_the_answer_written_by_hand_is_kept(ootb):
    _record(ootb, "ce", "digits", 0, 0.5, 0.5)
    _record(ootb, "refilled", "digits", 0, 0.6, 0.6)
    ootb.MARKDOWN.write_text("old\n<!-- answer -->\nmine\n<!-- /answer -->\nold\n")
    ootb.write_markdown(ootb.table())
    assert "<!-- answer -->\nmine\n<!-- /answer -->" in ootb.MARKDOWN.read_text()


def test_candidates_parse_and_ce_gets_refilleds_total_epochs(ootb):
    assert ootb.parse_candidate("lr=0.05 batch_size=16 lam=3") == {"lr": 0.05, "batch_size": 16, "lam": 3}
    assert ootb.total_epochs({}) == 20
    assert ootb.total_epochs({"stage1_epochs": 6, "stage2_epochs": 14}) == 20
    assert ootb.total_epochs({"stage1_epochs": 20}) == 30


def test_the_digits_task_splits_disjointly_per_seed(ootb):
    a, b = ootb.digits_task(0), ootb.digits_task(1)
    for task in (a, b):
        sizes = {k: len(task[k][1]) for k in ("train", "val", "test")}
        assert sizes["train"] == 100 and sizes["val"] == 100 and sizes["test"] > 500
        assert sorted(torch.unique(task["train"][1]).tolist()) == [0, 1, 2, 3, 4]
        rows = {tuple(x.flatten().tolist()) for x in task["train"][0]}
        assert not rows & {tuple(x.flatten().tolist()) for x in task["test"][0]}
    assert not torch.equal(a["train"][0], b["train"][0])  # another seed, another draw
    assert a["teacher"] is b["teacher"]  # trained once
