"""Shipping the student: `refilled export`, `refilled.load_student`, `refilled predict`.

Two tiny finished runs, made once: REFILLED on a folder of RGB images of several sizes (a
user's `file.py:factory` student whose classifier is called `classifier` and whose factory does
not take `num_classes`; partly overlapping classes), and the student alone on grey 8 x 8 digits
(a zoo model, no teacher).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny import run_cli, tiny

import refilled
from refilled.config import make_config
from refilled.files import safe_load, tensors_digest

NET_FILE = '''
import torch.nn as nn


class Net(nn.Module):
    """Not the zoo's contract; the classifier is not called fc; no num_classes argument."""

    def __init__(self, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(width, width, 3, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(width, 10)

    def forward(self, x):
        return self.classifier(self.body(x))


def make(width=8):
    return Net(width)
'''

NAMES = ["d0_zero", "d1_one", "d2_two", "d3_three", "d4_four", "d5_five"]  # sorted: the label order


def _image_folder(root: Path) -> None:
    """root/{train,test}/<name>/: sklearn's digits 0-5, coloured, at sizes 12 to 30 px; some
    test images are JPEG."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    counts = {}
    for image, label in zip(d.images, d.target):
        if label >= len(NAMES) or counts.get(label, 0) >= 36:
            continue
        n = counts[label] = counts.get(label, 0) + 1
        split = "test" if n > 26 else "train"
        grey = (image * 255 / 16).astype(np.uint8)
        colour = rng.integers(60, 256, size=3)
        rgb = (grey[..., None].astype(np.float32) * colour / 255).astype(np.uint8)
        side = int(rng.integers(12, 31))
        img = Image.fromarray(rgb, "RGB").resize((side, side), Image.NEAREST)
        folder = root / split / NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        if split == "test" and n % 3 == 0:
            img.save(folder / f"{n:03d}.jpg", quality=90)
        else:
            img.save(folder / f"{n:03d}.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(tmp, the RGB image-folder REFILLED run, the grey digits student-alone run)."""
    from refilled.config import load_config
    from refilled.pipeline import run

    tmp = tmp_path_factory.mktemp("ship")
    (tmp / "net.py").write_text(NET_FILE)
    _image_folder(tmp / "images")
    rgb = tiny(data={"name": "image_folder", "root": str(tmp / "images"), "image_size": 16,
                     "teacher_classes": 4, "student_offset": 2, "student_classes": 4,
                     "train_per_class": None, "val_per_class": 4},
               student={"arch": f"{tmp / 'net.py'}:make", "kwargs": {"width": 8}},
               stage1={"optim": {"epochs": 2, "batch_size": 16, "m_per_class": 4, "lr": 0.05}},
               train={"epochs": 3, "batch_size": 16, "m_per_class": 4, "lr": 0.05},
               log={"tensorboard": True}, out_dir=str(tmp / "runs"))
    grey = tiny(method="ce", out_dir=str(tmp / "runs"))
    dirs = []
    for name, tree in (("rgb", rgb), ("grey", grey)):
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        dirs.append(Path(run(load_config(path))["run_dir"]))
    return tmp, dirs[0], dirs[1]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _test_split(run_dir: Path):
    from refilled.pipeline import PROTOCOLS

    cfg = make_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    return PROTOCOLS[cfg.protocol].tasks(cfg).student.test


# ------------------------------------------------------------------ export


def test_results_record_classes_and_the_teachers_digest(runs):
    tmp, rgb, grey = runs
    r = _results(rgb)
    assert r["class_names"] == NAMES[2:6] and r["teacher_class_names"] == NAMES[0:4]
    assert r["teacher_arch"] == "mlp"
    teacher_dir = Path(r["teacher"])
    described = json.loads((teacher_dir / "model.json").read_text())
    assert r["teacher_digest"] == described["weights_digest"]
    ckpt = safe_load(teacher_dir / "model.pt")
    assert r["teacher_digest"] == tensors_digest(ckpt["state_dict"])
    g = _results(grey)
    assert g["teacher_arch"] is None and g["teacher_digest"] is None


def test_export_holds_the_student_alone_and_describes_it(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    _, rgb, _ = runs
    out = tmp_path / "export"
    code, _, err = run_cli(capsys, "export", rgb, "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "net.py"]
    saved = load_file(out / "model.safetensors")
    ckpt = safe_load(rgb / "model.pt")
    student = refilled.load_student(out)
    # exactly the student module's own tensors: no teacher, no wrapper prefix, no optimiser state
    assert sorted(saved) == sorted(student.model.state_dict()) == sorted(ckpt["state_dict"])
    assert not any(k.startswith(("module.", "teacher", "student.")) for k in saved)
    assert all(torch.equal(saved[k], ckpt["state_dict"][k]) for k in saved)
    assert saved["classifier.weight"].shape == (4, 8)  # the replaced classifier, not the factory's 10
    config = json.loads((out / "config.json").read_text())
    r = _results(rgb)
    assert config["arch"] == f"{runs[0] / 'net.py'}:make" and config["arch_file"] == "net.py"
    assert config["kwargs"] == {"width": 8} and config["num_classes"] == 4
    assert config["class_names"] == NAMES[2:6] and config["in_chans"] == 3 and config["input_size"] == 16
    assert config["mean"] == pytest.approx([0.5] * 3) and config["head_module"] == "classifier"
    t = config["teacher"]
    assert t["arch"] == "mlp" and t["weights_digest"] == r["teacher_digest"]
    assert t["label_spaces"] == "overlapping" and t["shared_classes"] == 2
    assert config["training"]["method"] == "refilled" and config["training"]["protocol"] == "partial_overlap"
    assert [s["stage"] for s in config["training"]["stages"]] == ["stage1", "stage2"]
    assert config["results"]["test_accuracy"] == r["test_accuracy"]
    assert config["results"]["stage1_ncm_val_accuracy"] == r["stage1_ncm_val_accuracy"]
    assert config["refilled_version"] == refilled.__version__ and config["onnx"] is None
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "refilled" and header["datasets"] == ["image_folder"]
    for text in ("refilled.load_student(", "## Intended use and limits", "Relationship Matching",
                 f"{100 * r['test_accuracy']:.2f}", "2 of the student's classes"):
        assert text in card
    # the copied architecture travels with the export: the original file is not needed
    os.rename(runs[0] / "net.py", runs[0] / "net.py.away")
    try:
        again = refilled.load_student(out)
    finally:
        os.rename(runs[0] / "net.py.away", runs[0] / "net.py")
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(again(x), student(x))


def test_load_student_of_a_run_directory_is_the_evaluated_network(runs):
    from refilled.models.checkpoints import network_from_model_file

    _, rgb, grey = runs
    for run_dir in (rgb, grey):
        student = refilled.load_student(run_dir)
        assert isinstance(student, torch.nn.Module) and not student.training
        ckpt = safe_load(run_dir / "model.pt")
        net = network_from_model_file(ckpt, run_dir / "model.pt", role="student").eval()
        x = torch.rand(4, ckpt["in_chans"], ckpt["input_size"], ckpt["input_size"])
        with torch.no_grad():
            assert torch.equal(student(x), net.features_and_logits(x)[1])
        assert student.classes == ckpt["class_names"] and student.input_size == ckpt["input_size"]


def test_onnx_runs_without_refilled_and_agrees_with_pytorch_and_the_test(runs, tmp_path, capsys):
    _, rgb, _ = runs
    from refilled.cli import main

    out = tmp_path / "export"
    assert main(["export", str(rgb), "--out", str(out), "--onnx"]) == 0
    printed = capsys.readouterr().out
    assert "ONNX parity on 16 images of the run's validation split: max abs logit difference" in printed
    assert "top-1 agreement 100.00%" in printed
    config = json.loads((out / "config.json").read_text())
    parity = config["onnx"]["parity"]
    assert parity["passed"] and parity["top1_agreement"] == 1.0 and parity["images"] == 16
    assert parity["max_abs_logit_diff"] <= parity["tolerance"] and config["onnx"]["dynamic_batch"]
    test = _test_split(rgb)
    images = test.images.float().div_(255.0)
    np.save(tmp_path / "images.npy", images.numpy())
    script = (
        "import sys, json, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(out / 'model.onnx')!r}, providers=['CPUExecutionProvider'])\n"
        f"x = np.load({str(tmp_path / 'images.npy')!r})\n"
        "one = s.run(None, {'images': x[:1]})[0]\n"
        "logits = np.concatenate([s.run(None, {'images': x[i:i + 5]})[0] for i in range(0, len(x), 5)])\n"
        "assert np.allclose(one, logits[:1], atol=1e-5)\n"
        f"np.save({str(tmp_path / 'onnx.npy')!r}, logits)\n"
        "classes = json.loads(s.get_modelmeta().custom_metadata_map['refilled.classes'])\n"
        "print(json.dumps({'classes': classes, 'refilled': 'refilled' in sys.modules, "
        "'torch': 'torch' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"classes": NAMES[2:6], "refilled": False, "torch": False}
    onnx_pred = torch.from_numpy(np.load(tmp_path / "onnx.npy")).argmax(1)
    with torch.no_grad():
        torch_pred = refilled.load_student(out)(images).argmax(1)
    assert torch.equal(onnx_pred, torch_pred)
    accuracy = (onnx_pred == test.labels).double().mean().item()
    assert accuracy == _results(rgb)["test_accuracy"]


def test_an_onnx_export_whose_parity_fails_is_refused_and_leaves_nothing(runs, tmp_path, capsys, monkeypatch):
    import refilled.export as export

    _, rgb, _ = runs
    monkeypatch.setattr(export, "PARITY_RTOL", -1.0)  # no difference is small enough
    code, _, err = run_cli(capsys, "export", rgb, "--out", tmp_path / "export", "--onnx")
    assert code == 2 and "ONNX export refused" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_export_errors_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    _, rgb, grey = runs

    def refused(run_dir, out, *words):
        code, _, err = run_cli(capsys, "export", run_dir, "--out", out)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert all(w in err for w in words), err

    unfinished = tmp_path / "unfinished"
    shutil.copytree(rgb, unfinished)
    (unfinished / "results.json").unlink()
    refused(unfinished, tmp_path / "a", "has not finished", "refilled run")
    refused(tmp_path / "nowhere", tmp_path / "a", "does not exist")
    for method in ("teacher_ncm", "refilled_stage1"):
        other = tmp_path / method
        shutil.copytree(grey, other)
        r = _results(grey)
        r.update(method=method, student_arch=None if method == "teacher_ncm" else r["student_arch"])
        (other / "results.json").write_text(json.dumps(r))
        refused(other, tmp_path / "a", method)
    no_model = tmp_path / "no_model"
    shutil.copytree(grey, no_model)
    for name in ("model.pt", "model.json", "model.safetensors"):
        (no_model / name).unlink()
    refused(no_model, tmp_path / "a", "no student model")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    refused(grey, busy, "already holds files")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "a").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "export", grey, "--out", empty)  # an empty folder is fine
    assert code == 0, err


def test_an_older_run_with_model_pt_only(runs, tmp_path, capsys):
    _, _, grey = runs
    old = tmp_path / "old"
    shutil.copytree(grey, old)
    (old / "model.json").unlink()
    (old / "model.safetensors").unlink()
    with pytest.raises(refilled.UserError, match="refilled export"):
        refilled.load_student(old)
    code, _, err = run_cli(capsys, "export", old, "--out", tmp_path / "export")
    assert code == 0, err
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["teacher"] is None and config["training"]["method"] == "ce"
    assert "trained alone" in (tmp_path / "export" / "README.md").read_text()
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(refilled.load_student(tmp_path / "export")(x), refilled.load_student(grey)(x))


# ------------------------------------------------------------------ predict


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_reproduces_the_reported_test_accuracy(runs, tmp_path, capsys):
    tmp, rgb, _ = runs
    out = tmp_path / "export"
    assert run_cli(capsys, "export", rgb, "--out", out, "--onnx")[0] == 0
    test_dir = tmp / "images" / "test"
    expected = _results(rgb)["test_accuracy"]
    students = [test_dir / n for n in NAMES[2:6]]  # the student's classes (the others' folders too below)
    for model in (out, rgb, out / "model.onnx"):
        csv_path = tmp_path / f"{Path(model).name}.csv"
        code, _, err = run_cli(capsys, "predict", model, *students, "--top-k", 2, "--batch-size", 7,
                               "--out", csv_path)
        assert code == 0, err
        rows = _csv(csv_path)
        assert list(rows[0]) == ["file", "class_1", "prob_1", "class_2", "prob_2"]
        hits = [Path(r["file"]).parent.name == r["class_1"] for r in rows]
        assert sum(hits) / len(hits) == expected, model
        assert f"top-1 accuracy {100 * expected:.2f}%" in err
        assert all(float(r["prob_1"]) >= float(r["prob_2"]) for r in rows)


def test_predict_grey_images_and_skips_what_it_cannot_read(runs, tmp_path, capsys):
    _, _, grey = runs
    test = _test_split(grey)
    names = _results(grey)["class_names"]
    for i, (image, label) in enumerate(zip(test.images, test.labels)):
        folder = tmp_path / "images" / "nested" / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy(), "L").save(folder / f"{i:04d}.png")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not an image")
    code, _, err = run_cli(capsys, "predict", grey, tmp_path / "images", bad, "--top-k", 3)
    assert code == 0, err
    assert "broken.png" in err and "1 file(s) skipped" in err
    expected = _results(grey)["test_accuracy"]
    assert f"top-1 accuracy {100 * expected:.2f}%" in err
    result = refilled.export.predict_images(grey, [tmp_path / "images"], top_k=1, progress=False)
    assert result["accuracy"] == expected and result["labelled"] == len(test.labels)
    code, _, err = run_cli(capsys, "predict", grey, bad)
    assert code == 2 and "none of the 1 input files" in err
    code, _, err = run_cli(capsys, "predict", grey, tmp_path / "missing.png")
    assert code == 2 and "does not exist" in err


# ------------------------------------------------------------------ optional packages


def test_each_command_names_the_package_it_misses(runs, tmp_path, capsys, monkeypatch):
    _, rgb, grey = runs
    out = tmp_path / "export"
    assert run_cli(capsys, "export", grey, "--out", out, "--onnx")[0] == 0
    for module, package, args in (
            ("onnx", "onnx", ("export", grey, "--out", tmp_path / "x", "--onnx")),
            ("onnxscript", "onnxscript", ("export", grey, "--out", tmp_path / "x", "--onnx")),
            ("onnxruntime", "onnxruntime", ("predict", out / "model.onnx", tmp_path)),
            ("safetensors.torch", "safetensors", ("export", grey, "--out", tmp_path / "x")),
            ("safetensors.torch", "safetensors", ("predict", out, tmp_path))):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # `import module` now fails
            code, _, err = run_cli(capsys, *args)
        assert code == 2 and f"pip install {package}" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch.utils.tensorboard", None)
        with pytest.raises(refilled.UserError, match="pip install tensorboard"):
            student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
            refilled.distill(None, student, (torch.rand(8, 1, 4, 4), torch.arange(8) % 2),
                             method="ce", epochs=1, device="cpu", progress=False,
                             tensorboard=tmp_path / "tb")


# ------------------------------------------------------------------ TensorBoard


def _scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _raw_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(folder.iterdir()):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_tensorboard_log_of_a_run(runs):
    import csv

    _, rgb, _ = runs
    scalars = _scalars(rgb / "tensorboard")
    with open(rgb / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [s for s, _ in scalars["stage1/loss"]] == [1, 2]
    assert [s for s, _ in scalars["stage2/loss"]] == [3, 4, 5]
    assert [s for s, _ in scalars["val/ncm_accuracy"]] == [1, 2]  # stage 1: NCM on the embedding
    assert [s for s, _ in scalars["val/accuracy"]] == [3, 4, 5]
    assert [v for _, v in scalars["stage2/lr"]] == pytest.approx([float(r["lr"]) for r in rows[2:]])
    assert [v for _, v in scalars["val/accuracy"]] == pytest.approx([float(r["val_accuracy"]) for r in rows[2:]])


@pytest.mark.parametrize("when", ["logged, not checkpointed", "during the epoch"])
def test_a_resumed_run_continues_the_same_log(tmp_path, monkeypatch, when):
    """Interrupted at stage 2's first epoch (step 3 of 4), then resumed: every step once, the
    values of the finished run's metrics.csv."""
    import csv

    import refilled.distillation as api
    import refilled.engine as engine
    from refilled.pipeline import run

    cfg = make_config(tiny(log={"tensorboard": True}, out_dir=str(tmp_path / "runs"), method="refilled"))
    calls = {"n": 0}
    if when == "logged, not checkpointed":
        real = engine.atomic_torch_save

        def save(obj, path):
            if Path(path).name == "stage2.ckpt":
                raise KeyboardInterrupt
            return real(obj, path)

        monkeypatch.setattr(engine, "atomic_torch_save", save)
    else:
        real = api.validation

        def validation(student, train, val, device, kind, dist=None, num_classes=None):
            calls["n"] += kind == "ncm"  # stage 1's; the first classifier one after them is stage 2's
            if kind == "accuracy" and calls["n"]:
                raise KeyboardInterrupt
            return real(student, train, val, device, kind, dist, num_classes)

        monkeypatch.setattr(api, "validation", validation)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.undo()
    results = run(cfg)
    run_dir = Path(results["run_dir"])
    scalars = _scalars(run_dir / "tensorboard")
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [s for s, _ in scalars["stage1/loss"]] == [1, 2]
    assert [s for s, _ in scalars["stage2/loss"]] == [3, 4]
    assert [v for _, v in scalars["stage1/loss"] + scalars["stage2/loss"]] == pytest.approx(
        [float(r["loss"]) for r in rows])
    raw = _raw_steps(run_dir / "tensorboard", "stage2/loss")
    if when == "during the epoch":
        assert raw == [3, 4]  # nothing was ever written twice
    else:
        assert raw == [3, 3, 4]  # step 3 twice on disk; TensorBoard's reader drops the first (purge_step)
    assert len(list((run_dir / "tensorboard").iterdir())) == 2  # one event file per session


def test_the_card_shows_the_controls_run_beside_it(runs, tmp_path, capsys):
    """Runs in the same folder with the same data, protocol and seed but another method, arm or
    teacher are the controls; another seed or other data are not."""
    _, _, grey = runs
    folder = tmp_path / "sweep"
    base = _results(grey)
    variants = {"mine": dict(method="refilled", arm="REFILLED", teacher_init="trained", test_accuracy=0.5),
                "alone": dict(arm="student alone", test_accuracy=0.25),
                "random": dict(method="refilled", arm="REFILLED, random teacher", teacher_init="random",
                               test_accuracy=0.375),
                "seed1": dict(arm="student alone", seed=1, test_accuracy=0.125)}
    for name, change in variants.items():
        shutil.copytree(grey, folder / name)
        (folder / name / "results.json").write_text(json.dumps({**base, **change}))
    shutil.copytree(grey, folder / "other_data")
    tree = yaml.safe_load((grey / "config.yaml").read_text())
    tree["data"]["train_per_class"] = 11
    (folder / "other_data" / "config.yaml").write_text(yaml.safe_dump(tree))
    (folder / "other_data" / "results.json").write_text(json.dumps({**base, "arm": "x", "test_accuracy": 0.0625}))
    assert run_cli(capsys, "export", folder / "mine", "--out", tmp_path / "export")[0] == 0
    card = (tmp_path / "export" / "README.md").read_text()
    controls = card.split("### Controls run beside it")[1].split("##")[0]
    assert "| **REFILLED (this model)** | refilled | trained | 50.00 |" in controls
    assert "| student alone | ce | — | 25.00 |" in controls
    assert "| REFILLED, random teacher | refilled | random | 37.50 |" in controls
    assert "12.50" not in controls and "6.25" not in controls
