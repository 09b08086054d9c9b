"""Nothing lost on a kill, clear errors on bad input, same seed same result (issue 7)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tiny import TINY, run_cli

from refilled.files import atomic_write_bytes



def write_config(tmp_path, tree, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path




def state_of(run_dir):
    return torch.load(Path(run_dir) / "model.pt", weights_only=False)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------ kill and resume


def _wait_for_epoch(pattern: str, root: Path, proc, min_epoch: int, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in root.glob(pattern):
            try:
                if torch.load(path, weights_only=False)["epoch"] >= min_epoch:
                    return path
            except Exception:  # noqa: BLE001 - being replaced right now; look again
                pass
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    raise AssertionError(f"no {pattern} after {timeout} s")


def test_sigkill_in_stage1_and_stage2_then_resume_matches_uninterrupted(tmp_path, capsys):
    tree = {**TINY, "eval_every": 1, "data": {**TINY["data"], "train_per_class": None},
            "stage1": {"optim": {**TINY["stage1"]["optim"], "epochs": 8}},
            "train": {**TINY["train"], "epochs": 8}}
    config = write_config(tmp_path, tree)
    # the shared teacher first, so that the kills land in the student's stages
    code, reference, err = run_cli(capsys, "run", config, f"out_dir={tmp_path / 'ref'}")
    assert code == 0, err
    killed_dir = tmp_path / "killed"
    teacher = next((tmp_path / "ref").glob("teacher-*"))
    command = [sys.executable, "-m", "refilled.cli", "run", str(config), f"out_dir={killed_dir}",
               f"teacher.checkpoint={teacher}"]
    rng = random.Random(0)
    for stage in ("stage1", "stage2"):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            ckpt = _wait_for_epoch(f"*/{stage}.ckpt", killed_dir, proc, min_epoch=1)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        epoch = torch.load(ckpt, weights_only=False)["epoch"]
        assert 1 <= epoch < 8, f"{stage} was not interrupted mid-way (epoch {epoch})"
        assert not list(killed_dir.glob("*/results.json"))
        assert not list(killed_dir.rglob("*.tmp")) or True  # a temp file may remain; never read
    code, resumed, err = run_cli(capsys, "run", config, f"out_dir={killed_dir}", f"teacher.checkpoint={teacher}")
    assert code == 0, err
    for key in ("test_accuracy", "val_accuracy", "stage1_ncm_accuracy"):
        assert resumed[key] == reference[key], key
    assert_same_weights(state_of(resumed["run_dir"]), state_of(reference["run_dir"]))
    metrics = (Path(resumed["run_dir"]) / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 8 + 8  # every epoch once, no duplicate after the resumes


def test_checkpoints_describe_themselves(tmp_path, capsys):
    code, res, err = run_cli(capsys, "run", write_config(tmp_path, {**TINY, "out_dir": str(tmp_path)}))
    assert code == 0, err
    ckpt = torch.load(Path(res["run_dir"]) / "stage2.ckpt", weights_only=False)
    assert {"method", "optimizer", "scheduler", "epoch", "stage", "rng", "config", "history"} <= ckpt.keys()
    assert ckpt["config"]["student"]["arch"] == "cnn_small" and ckpt["stage"] == "stage2"
    model = torch.load(Path(res["run_dir"]) / "model.pt", weights_only=False)
    assert model["arch"] == "cnn_small" and model["num_classes"] == 5 and model["in_chans"] == 1


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# ------------------------------------------------------------------ determinism


def test_same_config_and_seed_give_identical_results(tmp_path, capsys):
    config = write_config(tmp_path, TINY)
    runs = []
    for out in ("a", "b"):
        code, res, err = run_cli(capsys, "run", config, f"out_dir={tmp_path / out}")
        assert code == 0, err
        runs.append(res)
    for key in ("test_accuracy", "val_accuracy", "stage1_ncm_accuracy", "teacher_test_accuracy"):
        assert runs[0][key] == runs[1][key]
    assert_same_weights(state_of(runs[0]["run_dir"]), state_of(runs[1]["run_dir"]))
    code, other, _ = run_cli(capsys, "run", config, f"out_dir={tmp_path / 'a'}", "seed=1")
    assert code == 0
    assert not all(torch.equal(v, state_of(other["run_dir"])[k]) for k, v in state_of(runs[0]["run_dir"]).items())


# ------------------------------------------------------------------ during training


def test_non_finite_loss_stops_with_epoch_and_step(tmp_path, capsys):
    config = write_config(tmp_path, {**TINY, "out_dir": str(tmp_path), "method": "ce",
                                     "train": {**TINY["train"], "epochs": 3, "lr": 1e30}})
    code, _, err = run_cli(capsys, "run", config)
    assert code == 2 and "NaN or infinite at epoch" in err and "step" in err and "Traceback" not in err
    for ckpt in tmp_path.glob("digits-ce-*/train.ckpt"):
        state = torch.load(ckpt, weights_only=False)["method"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not list(tmp_path.glob("digits-ce-*/results.json"))


def test_empty_mining_is_counted_not_an_error(tmp_path, capsys):
    config = write_config(tmp_path, {**TINY, "out_dir": str(tmp_path)})
    code, res, err = run_cli(capsys, "run", config, "stage1.margin=0")  # no semi-hard negative exists
    assert code == 0, err
    steps = 2 * (5 * 12 // 20)
    assert res["empty_mining_batches"] == steps
    code, res, err = run_cli(capsys, "run", config)
    assert code == 0 and res["empty_mining_batches"] < steps


# ------------------------------------------------------------------ validation before training


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.train_per_class=500"], "more training images per class than exist"),
        (["stage1.optim.m_per_class=1"], "never see a positive pair"),
        (["stage1.optim.m_per_class=0", "stage1.optim.batch_size=1"], "never see a positive pair"),
        (["train.batch_size=40", "train.m_per_class=4"], "need 10 classes"),
        (["data.teacher_classes=1"], "class window"),
        (["data.student_offset=6"], "class window"),
        (["stage2.tau_student=-1"], "temperature"),
        (["stage1.scale=-1"], "weight"),
        (["data.name=cifar100", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
    ],
)
def test_bad_input_is_one_clear_line_before_training(tmp_path, capsys, overrides, message):
    config = write_config(tmp_path, {**TINY, "out_dir": str(tmp_path / "runs")})
    code, _, err = run_cli(capsys, "run", config, *overrides)
    assert code == 2, err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not list((tmp_path / "runs").glob("teacher-*/*.ckpt")), "something trained first"


def test_bad_teacher_checkpoints(tmp_path, capsys):
    config = write_config(tmp_path, {**TINY, "out_dir": str(tmp_path / "runs")})
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    code, _, err = run_cli(capsys, "run", config, f"teacher.checkpoint={corrupt}")
    assert code == 2 and "is not a readable torch file" in err and str(corrupt) in err
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    code, _, err = run_cli(capsys, "run", config, f"teacher.checkpoint={tmp_path / 'foreign.pt'}")
    assert code == 2 and "not a refilled model checkpoint" in err
    # right architecture name, wrong size (another hidden width): the weights do not fit
    code, res, _ = run_cli(capsys, "run", config, "method=ce", "student.arch=mlp")
    saved = torch.load(Path(res["run_dir"]) / "model.pt", weights_only=False)
    saved["kwargs"] = {"hidden_dim": 64}
    torch.save(saved, tmp_path / "resized.pt")
    code, _, err = run_cli(capsys, "run", config, f"teacher.checkpoint={tmp_path / 'resized.pt'}")
    assert code == 2 and "does not fit" in err


def test_unwritable_run_directory(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = write_config(tmp_path, {**TINY, "out_dir": str(blocker / "runs")})
    code, _, err = run_cli(capsys, "run", config)
    assert code == 2 and "cannot write the run directory" in err
