"""Bad inputs: exit status 2, one line naming the problem, nothing trained, nothing changed, no
code run from any file (issue 13). Each case starts from the tiny digits setting."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import run_cli, tiny


def written(root: Path) -> dict[str, int]:
    """Every file below ``root`` with its modification time (what 'nothing changed' compares)."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def one_line_error(code, err):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**tiny(), "out_dir": str(tmp_path / "runs")}))
    return path


EARLY = [  # (overrides, a piece of the message): all found before the teacher trains
    (["student.arch=nope"], "student.arch: unknown model 'nope'"),
    (["student.kwargs={foo: 1}"], "unknown argument 'foo'"),
    (["teacher.arch=wrn_16"], "teacher.arch: unknown model 'wrn_16'"),
    (["method=kd", "data.student_offset=5"], "classes the teacher knows"),
    (["method=fitnet"], "method 'fitnet' regresses the student's last feature map"),
    (["method=at"], "method 'at' pairs student and teacher feature maps"),
    (["train.lr=nan"], "config key 'train.lr' must be a finite number"),
    (["stage1.optim.lr=inf"], "config key 'stage1.optim.lr' must be a finite number"),
    (["device=cuda:abc"], "config key 'device'"),
    (["seed=1099511627776"], "config key 'seed'"),
    (["data.image_size=-3"], "data.image_size"),
    (["stage1.optim.m_per_class=1", "stage1.optim.batch_size=20"], "positive pair"),
    (["ablation=stage1_only", "stage1.optim.epochs=0"], "stage1.optim.epochs=0 trains nothing"),
    (["data.name=imagenet"], "config key 'data.name'"),
    (["train.m_per_class=4", "train.batch_size=40"], "batches of 10 classes"),
    (["teacher.embedding=nowhere"], "teacher.embedding: the teacher has no submodule 'nowhere'"),
]


@pytest.mark.parametrize("overrides, message", EARLY, ids=[" ".join(o) for o, _ in EARLY])
def test_early_errors_come_before_anything_trains(config, capsys, tmp_path, overrides, message):
    code, _, err = run_cli(capsys, "run", config, *overrides)
    one_line_error(code, err)
    assert message in err
    assert not list((tmp_path / "runs").rglob("*.ckpt")), "something trained before the error"


def test_device_not_on_this_machine(config, capsys):
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "run", config, "device=cuda")
        one_line_error(code, err)
        assert "no CUDA device" in err
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        code, _, err = run_cli(capsys, "run", config, "device=mps")
        one_line_error(code, err)
        assert "not available" in err


def test_refilled_config_checks_names_as_run_does(config, capsys):
    code, _, err = run_cli(capsys, "config", config, "student.arch=nope")
    one_line_error(code, err)
    assert "unknown model 'nope'" in err
    code, _, err = run_cli(capsys, "config", config, "teacher.arch=no_such_pkg:make")
    one_line_error(code, err)
    assert "cannot import 'no_such_pkg'" in err


def test_default_refilled_runs_both_stages(tmp_path, capsys):
    tree = tiny()
    del tree["stage1"]  # the defaults' stage 1 (same schedule as stage 2), with the tiny batches
    tree["stage1"] = {"optim": {"batch_size": 20, "m_per_class": 4, "lr": 0.05}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**tree, "out_dir": str(tmp_path / "runs")}))
    code, res, err = run_cli(capsys, "run", path, "stage1.optim.epochs=10", "train.epochs=1")
    assert code == 0, err
    from refilled.config import Config

    assert Config().stage1.optim.epochs == Config().train.epochs == 10
    assert res["stage1_ncm_accuracy"] is not None
    assert (Path(res["run_dir"]) / "stage1.ckpt").is_file()


# ------------------------------------------------------------------ run directories


def test_run_directory_without_its_config_is_not_resumed(config, capsys, tmp_path):
    code, res, err = run_cli(capsys, "run", config, "name=shared", "method=ce")
    assert code == 0, err
    run_dir = Path(res["run_dir"])
    (run_dir / "config.yaml").unlink()
    (run_dir / "results.json").unlink()
    before = written(tmp_path / "runs")
    code, _, err = run_cli(capsys, "run", config, "name=shared", "method=ce", "train.lr=0.2")
    one_line_error(code, err)
    assert "no config.yaml" in err and str(run_dir) in err
    assert written(tmp_path / "runs") == before


def test_run_directory_of_another_config_names_the_keys(config, capsys, tmp_path):
    code, res, err = run_cli(capsys, "run", config, "name=shared", "method=ce")
    assert code == 0, err
    before = written(tmp_path / "runs")
    code, _, err = run_cli(capsys, "run", config, "name=shared", "method=ce", "train.lr=0.2")
    one_line_error(code, err)
    assert "holds a run with a different configuration" in err and str(res["run_dir"]) in err
    assert "(train.lr: 0.05 there, 0.2 here)" in err, err
    assert written(tmp_path / "runs") == before


@pytest.mark.parametrize("name, content, message", [
    ("config.yaml", b"\xff\xfe not yaml", "run config"),
    ("config.yaml", b"a: [1, 2", "run config"),
    ("results.json", b"{not json", "results file"),
    ("results.json", b'{"loss": 1}', "not a refilled result"),
    ("train.ckpt", b"garbage", "checkpoint"),
])
def test_corrupt_files_in_a_run_directory_are_named(config, capsys, tmp_path, name, content, message):
    code, res, err = run_cli(capsys, "run", config, "method=ce")
    assert code == 0, err
    run_dir = Path(res["run_dir"])
    if name == "train.ckpt":
        (run_dir / "results.json").unlink()
    (run_dir / name).write_bytes(content)
    before = written(tmp_path / "runs")
    code, _, err = run_cli(capsys, "run", config, "method=ce")
    one_line_error(code, err)
    assert message in err and name in err
    assert written(tmp_path / "runs") == before


def test_checkpoint_of_another_model_in_a_run_directory(config, capsys, tmp_path):
    code, res, err = run_cli(capsys, "run", config, "method=ce", "name=x")
    assert code == 0, err
    code, other, err = run_cli(capsys, "run", config, "method=ce", "student.arch=mlp", "name=y")
    assert code == 0, err
    x = Path(res["run_dir"])
    (x / "results.json").unlink()
    (x / "train.ckpt").write_bytes((Path(other["run_dir"]) / "train.ckpt").read_bytes())
    code, _, err = run_cli(capsys, "run", config, "method=ce", "name=x")
    one_line_error(code, err)
    assert "written for another model or method" in err and "train.ckpt" in err


def test_deleted_teacher_model_is_recovered_without_retraining(config, capsys, tmp_path):
    code, first, err = run_cli(capsys, "run", config, "method=rkd")
    assert code == 0, err
    teacher_dir = next((tmp_path / "runs").glob("teacher-*"))
    ckpt_mtime = (teacher_dir / "train.ckpt").stat().st_mtime_ns
    (teacher_dir / "model.pt").unlink()
    code, second, err = run_cli(capsys, "run", config, "method=rkd", "seed=1")
    assert code == 0, err
    assert (teacher_dir / "model.pt").is_file()
    assert (teacher_dir / "train.ckpt").stat().st_mtime_ns == ckpt_mtime  # evaluated, not retrained
    assert second["teacher_test_accuracy"] == first["teacher_test_accuracy"]


def test_a_finished_run_says_so(config, capsys):
    code, res, _ = run_cli(capsys, "run", config, "method=ce", "progress=true")
    assert code == 0
    code, again, err = run_cli(capsys, "run", config, "method=ce", "progress=true")
    assert code == 0 and again == res and "has finished already" in err


def test_two_processes_on_one_run_directory_train_it_once(config, tmp_path):
    command = [sys.executable, "-m", "refilled.cli", "run", str(config), "method=ce", "name=both",
               "train.epochs=6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
    rows = (tmp_path / "runs" / "both" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 6  # one training, not two


# ------------------------------------------------------------------ no code from any file


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_no_file_refilled_reads_can_run_code(config, capsys, tmp_path):
    marker = tmp_path / "pwned"
    evil = {"arch": "mlp", "kwargs": {}, "num_classes": 5, "in_chans": 1, "state_dict": {},
            "payload": Payload(marker)}
    for i, legacy in enumerate((False, True)):
        path = tmp_path / f"evil{i}.pt"
        torch.save(evil, path, _use_new_zipfile_serialization=not legacy)
        code, _, err = run_cli(capsys, "run", config, f"teacher.checkpoint={path}")
        one_line_error(code, err)
        code, _, err = run_cli(capsys, "run", config, f"teacher.weights={path}")
        one_line_error(code, err)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload(marker)))
    code, _, err = run_cli(capsys, "run", config, f"teacher.weights={raw}")
    one_line_error(code, err)
    # payloads placed in a run directory: a stage checkpoint and the teacher centres
    code, res, err = run_cli(capsys, "run", config)
    assert code == 0, err
    run_dir = Path(res["run_dir"])
    for name in ("stage2.ckpt", "teacher_centers.pt"):
        for f in ("results.json", "model.pt"):
            (run_dir / f).unlink(missing_ok=True)
        saved = (run_dir / name).read_bytes()
        torch.save({"method": Payload(marker)}, run_dir / name)
        code, _, err = run_cli(capsys, "run", config)
        one_line_error(code, err)
        assert name in err and "unsafe unpickling" in err
        (run_dir / name).write_bytes(saved)
    assert not marker.exists(), "code from a file ran"


def test_flat_image_folder_and_mlp_sized_from_the_data(tmp_path, capsys):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(4):  # four classes of 14 coloured 12x12 images, no train/ or test/ folders
        folder = tmp_path / "images" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(14):
            base = torch.zeros(12, 12, 3)
            base[..., c % 3] = 0.3 + 0.2 * c
            pixels = (base + 0.2 * torch.rand(12, 12, 3, generator=g)).clamp(0, 1)
            Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
    tree = tiny(data={"name": "image_folder", "root": str(tmp_path / "images"), "image_size": 12,
                      "teacher_classes": 2, "student_offset": 2, "train_per_class": None,
                      "val_per_class": 2, "test_fraction": 0.25},
                teacher={"arch": "mlp"}, student={"arch": "mlp"},
                train={"batch_size": 8, "m_per_class": 4}, stage1={"optim": {"batch_size": 8, "m_per_class": 4}})
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump({**tree, "out_dir": str(tmp_path / "runs")}))
    code, res, err = run_cli(capsys, "run", path)
    assert code == 0, err
    assert res["train_images"] == 2 * (14 - 4 - 2)  # 4 test (25%) and 2 validation per class
    model = torch.load(Path(res["run_dir"]) / "model.pt", weights_only=True)
    assert model["input_size"] == 12 and model["state_dict"]["features.1.weight"].shape[1] == 3 * 12 * 12
