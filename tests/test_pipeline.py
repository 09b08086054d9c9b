"""End-to-end smoke tests on scikit-learn's 8x8 digits: tiny, CPU, a few steps per stage."""

import json
from pathlib import Path

import pytest
from tiny import run_cli


RESULT_KEYS = {"method", "role", "dataset", "protocol", "seed", "test_accuracy", "val_accuracy",
               "stage1_ncm_accuracy", "teacher_test_accuracy", "wall_seconds"}


def test_refilled_end_to_end_writes_a_complete_run(config_file, capsys, tmp_path):
    code, res, err = run_cli(capsys, "run", config_file)
    assert code == 0, err
    assert RESULT_KEYS <= res.keys()
    assert res["method"] == "refilled" and res["role"] == "student" and res["protocol"] == "cross_task"
    for key in ("test_accuracy", "val_accuracy", "stage1_ncm_accuracy", "teacher_test_accuracy"):
        assert 0.0 <= res[key] <= 1.0
    run_dir = Path(res["run_dir"])
    for name in ("config.yaml", "metrics.csv", "model.pt", "results.json", "stage1.ckpt",
                 "stage2.ckpt", "teacher_centers.pt"):
        assert (run_dir / name).is_file(), name
    # stage1_ncm_accuracy is the embedding right after stage 1, not after stage 2
    import torch

    from refilled.config import load_config
    from refilled.evaluation import ncm_eval
    from refilled.models import create_model
    from refilled.networks import Network
    from refilled.protocols import window_task

    task = window_task(load_config(config_file), "student")
    after_stage1 = Network(create_model("cnn_small", 5, 1), mean=task.info["mean"], std=task.info["std"])
    state = torch.load(run_dir / "stage1.ckpt", weights_only=True)["method"]
    after_stage1.load_state_dict({k.removeprefix("student."): v for k, v in state.items()})
    args = (task.train.images, task.train.labels, task.test.images, task.test.labels, "cpu")
    assert ncm_eval(after_stage1, *args) == pytest.approx(res["stage1_ncm_accuracy"])
    metrics = (run_dir / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("stage,epoch") and len(metrics) == 1 + 2 + 2
    assert any(line.startswith("stage1,") for line in metrics)
    teacher_dirs = list((tmp_path / "runs").glob("teacher-digits-mlp-*"))
    assert len(teacher_dirs) == 1
    teacher = json.loads((teacher_dirs[0] / "results.json").read_text())
    assert teacher["role"] == "teacher" and teacher["method"] == "ce"
    assert teacher["test_accuracy"] == pytest.approx(res["teacher_test_accuracy"])

    # the same command again: the finished run is returned, not redone
    before = (run_dir / "results.json").stat().st_mtime_ns
    code, again, _ = run_cli(capsys, "run", config_file)
    assert code == 0 and again == res and (run_dir / "results.json").stat().st_mtime_ns == before

    # resume after losing stage 2 and the results: stage 1 is not redone, the result is identical
    for name in ("results.json", "model.pt", "stage2.ckpt"):
        (run_dir / name).unlink()
    stage1_mtime = (run_dir / "stage1.ckpt").stat().st_mtime_ns
    code, resumed, _ = run_cli(capsys, "run", config_file)
    assert code == 0
    assert (run_dir / "stage1.ckpt").stat().st_mtime_ns == stage1_mtime
    for key in ("test_accuracy", "val_accuracy", "stage1_ncm_accuracy"):
        assert resumed[key] == res[key]


def test_student_alone_and_teacher_reuse_by_path(config_file, capsys, tmp_path):
    code, alone, err = run_cli(capsys, "run", config_file, "method=ce")
    assert code == 0, err
    assert alone["stage1_ncm_accuracy"] is None and alone["teacher_test_accuracy"] is None
    assert (Path(alone["run_dir"]) / "train.ckpt").is_file()

    code, first, err = run_cli(capsys, "run", config_file, "seed=1")
    assert code == 0, err
    teacher_dir = first["teacher"]
    code, reused, err = run_cli(capsys, "run", config_file, "seed=1", f"teacher.checkpoint={teacher_dir}",
                                "out_dir=" + str(tmp_path / "other"))
    assert code == 0, err
    assert reused["teacher"] == teacher_dir
    assert not list((tmp_path / "other").glob("teacher-*")), "the teacher was retrained"
    assert reused["test_accuracy"] == first["test_accuracy"]


def test_random_teacher_control_and_cvpr_preset(config_file, capsys):
    code, res, err = run_cli(capsys, "run", config_file, "teacher.init=random")
    assert code == 0, err
    assert res["teacher"] == "random" and res["teacher_init"] == "random"
    assert "randteacher" in res["run_dir"]
    code, res, err = run_cli(capsys, "run", config_file, "stage2.preset=cvpr")
    assert code == 0, err
    assert not (Path(res["run_dir"]) / "teacher_centers.pt").exists()  # local centres


def test_partial_overlap_and_standard_protocol_names(config_file, capsys):
    code, res, err = run_cli(capsys, "run", config_file, "data.student_offset=2", "stage1.optim.epochs=0")
    assert code == 0, err
    assert res["protocol"] == "partial_overlap" and res["overlap"] == 3 and res["stage1_ncm_accuracy"] is None
    code, res, err = run_cli(capsys, "run", config_file, "data.student_offset=0", "stage1.optim.epochs=0")
    assert code == 0 and res["protocol"] == "standard"


def test_user_errors_exit_2_with_one_line(config_file, capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", config_file, "train.lrr=1")
    assert code == 2 and "unknown config key 'train.lrr'" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "run", config_file, "data.name=fashion_mnist",
                           f"data.root={tmp_path / 'nowhere'}")
    assert code == 2 and str(tmp_path / "nowhere") in err
    code, _, err = run_cli(capsys, "run", config_file, "data.student_offset=8")
    assert code == 2 and "class window" in err
    code, _, err = run_cli(capsys, "run", config_file, f"teacher.checkpoint={tmp_path / 'none.pt'}")
    assert code == 2 and "does not exist" in err
    # a teacher checkpoint of another architecture than configured
    code, res, _ = run_cli(capsys, "run", config_file, "method=ce")
    code, _, err = run_cli(capsys, "run", config_file, f"teacher.checkpoint={res['run_dir']}")
    assert code == 2 and "architecture 'cnn_small'" in err
    code, _, err = run_cli(capsys, "run", tmp_path / "missing.yaml")
    assert code == 2 and "does not exist" in err


def test_demo_runs_on_tiny_settings(tmp_path, capsys):
    from refilled.demo import run_demo

    overrides = [f"{k}={v}" for k, v in {
        "data.name": "digits", "data.train_per_class": 12, "data.val_per_class": 8,
        "teacher.arch": "mlp", "teacher.optim.epochs": 1, "train.epochs": 1, "stage1.optim.epochs": 1,
        "train.batch_size": 20, "train.m_per_class": 4, "stage1.optim.batch_size": 20,
        "stage1.optim.m_per_class": 4, "device": "cpu", "eval_every": 1,
    }.items()]
    out = run_demo(str(tmp_path / "demo"), seeds=(0, 1), overrides=overrides, progress=False)
    assert {r["arm"] for r in out["rows"]} == {"student alone", "REFILLED", "REFILLED, random teacher"}
    assert all(r["n"] == 2 for r in out["rows"])
    for name in ("summary.md", "summary.csv", "demo.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    assert "paired diff" in (tmp_path / "demo" / "summary.md").read_text()
