"""Sweeps: the grid of cells, and a finished sweep that is run again trains nothing."""

from pathlib import Path

import pytest
import yaml

import refilled.distillation
from refilled.sweep import cell_label, expand, run_sweep, split_values
from tiny import tiny

TINY = tiny(method="ce", train={"epochs": 1})


def test_expand_gives_every_combination_in_order():
    assert expand(["a=1,2", "b=[1,2],x"]) == [
        ["a=1", "b=[1,2]"], ["a=1", "b=x"], ["a=2", "b=[1,2]"], ["a=2", "b=x"]]
    assert expand(["a=1"]) == [["a=1"]]
    assert expand([]) == [[]]
    # an arm= label is one value even when it holds commas
    assert expand(["arm=REFILLED, random teacher", "a=1,2"]) == [
        ["arm=REFILLED, random teacher", "a=1"], ["arm=REFILLED, random teacher", "a=2"]]
    assert split_values("a,{b: 1, c: 2},[3]") == ["a", "{b: 1, c: 2}", "[3]"]
    assert cell_label(["a=1", "b=x", "seed=0"], {"a", "seed"}, "ce") == "ce, a=1"
    assert cell_label(["method=kd", "seed=0"], {"method", "seed"}, "kd") == "kd"
    assert cell_label(["a=2"], {"a"}, "refilled", arm="mine") == "mine, a=2"


def test_sweep_run_twice_trains_nothing_the_second_time(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path / "runs")}))
    overrides = ["method=ce,label_smoothing", "seed=0,1"]
    first = run_sweep(str(config), overrides, progress=False)
    assert [r["cell"] for r in first["rows"]] == ["ce", "label_smoothing"]
    assert all(r["n"] == 2 for r in first["rows"])
    results = sorted(Path(tmp_path / "runs").rglob("results.json"))
    assert len(results) == 4
    mtimes = [p.stat().st_mtime_ns for p in results]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(refilled.distillation, "train_stage", no_training)
    second = run_sweep(str(config), overrides, progress=False)
    assert second["rows"] == first["rows"]
    assert [p.stat().st_mtime_ns for p in results] == mtimes
    assert (tmp_path / "runs" / "sweep_summary.md").is_file()
    assert "| label_smoothing | 2 |" in capsys.readouterr().out


def test_sweep_checks_every_cell_before_running_any(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path / "runs")}))
    from refilled.errors import ConfigError

    with pytest.raises(ConfigError, match="baselines.sp_gamma"):
        run_sweep(str(config), ["method=ce", "baselines.sp_gamma=1,-1"], progress=False)
    assert not (tmp_path / "runs").exists()
