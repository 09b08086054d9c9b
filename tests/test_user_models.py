"""Models a user brings to the command line: import paths, plain state_dict files, timm."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from tiny import run_cli, tiny

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

USER_FILE = '''
import torch.nn as nn


def sequential_teacher(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))


class FcStudent(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


def not_a_module(num_classes):
    return "oops"
'''


@pytest.fixture()
def user(tmp_path):
    """A user's own models file, a teacher state_dict saved from it, and a config using both."""
    (tmp_path / "user_models.py").write_text(USER_FILE)
    sys.path.insert(0, str(tmp_path))
    import importlib

    mod = importlib.import_module("user_models")
    torch.manual_seed(0)
    weights = tmp_path / "teacher.pt"
    torch.save(mod.sequential_teacher(5).state_dict(), weights)
    tree = tiny(teacher={"arch": "user_models:sequential_teacher", "weights": str(weights)},
                student={"arch": "user_models:FcStudent", "kwargs": {"width": 6}})
    config = tmp_path / "user.yaml"
    config.write_text(yaml.safe_dump({**tree, "out_dir": str(tmp_path / "runs")}))
    yield tmp_path, config, weights
    sys.path.remove(str(tmp_path))
    sys.modules.pop("user_models", None)


def test_refilled_run_with_import_paths_and_a_state_dict(user, capsys):
    tmp_path, config, weights = user
    code, res, err = run_cli(capsys, "run", config)
    assert code == 0, err
    assert res["teacher"] == str(weights) and not list((tmp_path / "runs").glob("teacher-*"))
    assert 0 <= res["test_accuracy"] <= 1 and res["stage1_ncm_accuracy"] is not None
    model = torch.load(Path(res["run_dir"]) / "model.pt", weights_only=True)
    assert model["arch"] == "user_models:FcStudent" and "fc.weight" in model["state_dict"]
    assert model["state_dict"]["fc.weight"].shape == (5, 6)


@pytest.mark.parametrize("override, message", [
    ("teacher.arch=no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
    ("teacher.arch=user_models:missing", "has no attribute 'missing'"),
    ("teacher.arch=user_models:not_a_module", "returned a str, not a torch.nn.Module"),
    ("student.arch=user_models", "unknown model 'user_models'"),
    ("student.kwargs={depth: 3}", "failed when called with"),
    ("teacher.embedding=nowhere", "teacher.embedding: the teacher has no submodule 'nowhere'"),
])
def test_bad_user_models_are_one_line_errors(user, capsys, override, message):
    _, config, _ = user
    code, _, err = run_cli(capsys, "run", config, override)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_mismatched_state_dicts_name_the_keys(user, capsys):
    tmp_path, config, _ = user
    other = tmp_path / "other.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5)).state_dict(), other)
    code, _, err = run_cli(capsys, "run", config, f"teacher.weights={other}")
    assert code == 2 and "does not fit the teacher" in err and "1.weight (16, 64) in the file vs (32, 64)" in err
    renamed = tmp_path / "renamed.pt"
    torch.save({"layer." + k: v for k, v in torch.load(tmp_path / "teacher.pt").items()}, renamed)
    code, _, err = run_cli(capsys, "run", config, f"teacher.weights={renamed}")
    assert code == 2 and "missing keys 1.weight" in err and "unexpected keys layer.1.weight" in err
    code, _, err = run_cli(capsys, "run", config, f"teacher.weights={tmp_path / 'none.pt'}")
    assert code == 2 and "does not exist" in err
    torch.save([1, 2, 3], tmp_path / "list.pt")
    code, _, err = run_cli(capsys, "run", config, f"teacher.weights={tmp_path / 'list.pt'}")
    assert code == 2 and "does not hold a state dict" in err


def test_timm_models_build_where_timm_is_installed():
    pytest.importorskip("timm")
    from refilled.models.external import build_module
    from refilled.networks import Network

    net = Network(build_module("timm:resnet18", 7, 1))
    z, logits = net.features_and_logits(torch.rand(2, 1, 32, 32))
    assert z.shape == (2, 512) and logits.shape == (2, 7)


def test_timm_missing_is_a_clear_error():
    try:
        import timm  # noqa: F401
    except ImportError:
        from refilled.errors import ConfigError
        from refilled.models.external import build_module

        with pytest.raises(ConfigError, match="needs timm"):
            build_module("timm:resnet18", 3, 1)
    else:
        pytest.skip("timm is installed")


# ------------------------------------------------------------------ examples/


def test_example_own_training_loop_runs():
    out = subprocess.run([sys.executable, str(EXAMPLES / "own_loop.py"), "--epochs", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "student test accuracy on digits 5-9" in out.stdout
    assert len((EXAMPLES / "own_loop.py").read_text().splitlines()) < 60


def test_example_own_models_from_the_cli(tmp_path):
    weights = tmp_path / "my_teacher.pt"
    out = subprocess.run([sys.executable, str(EXAMPLES / "my_models.py"), str(weights), "--epochs", "3"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    cmd = [sys.executable, "-m", "refilled.cli", "run", "examples/my_models.yaml",
           f"teacher.weights={weights}", f"out_dir={tmp_path / 'runs'}", "train.epochs=1",
           "stage1.optim.epochs=1", "progress=false"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert '"protocol": "cross_task"' in out.stdout and '"teacher_test_accuracy"' in out.stdout


def test_kd_refuses_a_teacher_whose_outputs_are_not_the_teacher_window(user, capsys, tmp_path):
    _, config, _ = user
    import user_models

    other = tmp_path / "t1000.pt"
    torch.save(user_models.sequential_teacher(1000).state_dict(), other)
    code, _, err = run_cli(capsys, "run", config, "method=kd", "data.student_offset=2",
                           "teacher.kwargs={num_classes: 1000}", f"teacher.weights={other}")
    assert code == 2 and "has 1000 outputs" in err
    # REFILLED needs no shared label space: the same teacher is fine
    code, res, err = run_cli(capsys, "run", config, "teacher.kwargs={num_classes: 1000}",
                             f"teacher.weights={other}")
    assert code == 0, err
    assert res["teacher_test_accuracy"] is None  # its classes are not this dataset's
