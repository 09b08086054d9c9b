"""Data at any size (issue 21): a Dataset streamed with fresh per-item transforms every epoch,
reproducibly; image folders streamed from disk; the path chosen automatically and visibly; the
in-memory path unchanged."""

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
from test_api import FcStudent, digits, sequential_teacher
from tiny import run_cli

import refilled
import refilled.data.inputs as inputs
from refilled.data import Augment, ClassBalancedSampler, TensorLoader, as_split
from refilled.data.folders import FileItems
from refilled.data.formats import DATASET_NAMES, FORMATS, load_images
from refilled.data.streaming import StreamedImages, StreamLoader, StreamSettings, labels_of
from refilled.errors import DataError

X, Y = digits(5, 10, per_class=12)
FAST = dict(stage1_epochs=2, stage2_epochs=2, batch_size=20, m_per_class=4, lr=0.05, stage1_lr=0.05,
            device="cpu", progress=False)


class Jittered(torch.utils.data.Dataset):
    """A user's Dataset with a random per-item transform (flip and noise), counting its reads."""

    def __init__(self, x=X, y=Y, expose_targets=False):
        self.x, self.y = x, y
        self.reads = 0
        if expose_targets:
            self.targets = y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        x = self.x[i].float() / 255
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x + 0.05 * torch.randn_like(x), int(self.y[i])


class Plain(torch.utils.data.Dataset):
    def __init__(self, x=X, y=Y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class Broken(Plain):
    def __getitem__(self, i):
        if i == 17:
            raise KeyError("no such record: 17")
        return super().__getitem__(i)


def view(dataset, workers=0):
    x0, _ = dataset[0]
    return StreamedImages(dataset, item_shape=torch.as_tensor(x0).shape, dtype=torch.as_tensor(x0).dtype,
                          settings=StreamSettings(workers=workers), what="train=")


def epochs(loader, n):
    out = []
    for e in range(n):
        loader.set_epoch(e)
        out.append(list(loader))
    return out


# ------------------------------------------------------------------ the loader


@pytest.mark.parametrize("workers", [0, 1])
def test_random_transforms_differ_between_epochs_and_repeat_for_the_same_seed(workers):
    ds = Jittered()
    make = lambda seed: StreamLoader(view(ds, workers), Y, 20, seed=seed)  # noqa: E731
    a = epochs(make(3), 3)
    b = epochs(make(3), 3)
    for ea, eb in zip(a, b):  # the same seed: the same batches and the same views
        for (xa, ya), (xb, yb) in zip(ea, eb):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # another epoch: the same item seen differently (fresh transforms every epoch)
    first = {int(i): None for i in range(len(Y))}
    loader = make(3)
    for e in range(2):
        loader.set_epoch(e)
        gen = torch.Generator().manual_seed((3 << 20) + e)
        order = torch.randperm(len(Y), generator=gen)
        seen = torch.cat([x for x, _ in loader])
        for pos, i in enumerate(order[:len(seen)].tolist()):
            if first[i] is None:
                first[i] = seen[pos]
            else:
                assert not torch.equal(first[i], seen[pos]), f"item {i} read the same in two epochs"
    # resuming at epoch 2 gives what the uninterrupted loader gave at epoch 2
    resumed = make(3)
    resumed.set_epoch(2)
    for (x, y), (xw, yw) in zip(list(resumed), a[2]):
        assert torch.equal(x, xw) and torch.equal(y, yw)
    # and the number of workers does not change what is read
    other = epochs(StreamLoader(view(ds, 1 - workers), Y, 20, seed=3), 1)[0]
    for (x, _), (xw, _) in zip(other, a[0]):
        assert torch.equal(x, xw)


@pytest.mark.parametrize("sampler", [False, True])
def test_streaming_a_plain_dataset_gives_the_in_memory_batches_exactly(sampler):
    images, labels = X, Y
    augment = Augment(1, True, degrees=10, scale=0.1, noise=0.05)
    kw = lambda: dict(augment=augment, seed=5,  # noqa: E731
                      sampler=ClassBalancedSampler(labels, 4, 20, seed=5) if sampler else None)
    memory = epochs(TensorLoader(images, labels, 20, **kw()), 2)
    stream = epochs(StreamLoader(view(Plain(), 1), labels, 20, **kw()), 2)
    for em, es in zip(memory, stream):
        assert len(em) == len(es)
        for (xm, ym), (xs, ys) in zip(em, es):
            assert torch.equal(xm, xs) and torch.equal(ym, ys)
    if sampler:  # class balance: 5 classes x 4 images in every batch
        for _, y in stream[0]:
            assert sorted(torch.bincount(y, minlength=5).tolist()) == [4] * 5


def test_each_rank_reads_only_its_slice_of_the_global_batch():
    ds = Jittered()
    augment = Augment(1, True, noise=0.05)
    whole = epochs(StreamLoader(view(ds), Y, 20, seed=1, augment=augment,
                                sampler=ClassBalancedSampler(Y, 4, 20, seed=1)), 2)
    for rank in range(2):
        mine = epochs(StreamLoader(view(ds), Y, 20, seed=1, augment=augment, rank=rank, world=2,
                                   sampler=ClassBalancedSampler(Y, 4, 20, seed=1)), 2)
        for ew, em in zip(whole, mine):
            for (xw, yw), (x, y) in zip(ew, em):
                assert torch.equal(x, xw.chunk(2)[rank]) and torch.equal(y, yw.chunk(2)[rank])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failing_item_is_one_line_naming_its_index_and_the_error(workers):
    loader = StreamLoader(view(Broken(), workers), Y, 20, seed=0)
    with pytest.raises(DataError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    assert "item 17" in message and "KeyError" in message and "no such record: 17" in message
    assert "\n" not in message

    class NaNAt9(Plain):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x.float().fill_(float("nan")) if i == 9 else x.float()), y

    with pytest.raises(DataError, match="item 9 .*NaN or infinite"):
        list(StreamLoader(view(NaNAt9(), workers), Y, 20, seed=0))


def test_evaluation_passes_read_in_order_through_the_workers():
    v = view(Plain(), 1)
    got = torch.cat(list(v.batches(7)))
    assert torch.equal(got, X)
    sub = v[torch.tensor([5, 2, 9])]
    assert torch.equal(sub.materialise(), X[[5, 2, 9]]) and sub.shape == (3, 1, 8, 8)
    assert torch.equal(torch.cat(list(v[10:20].batches(4))), X[10:20])


# ------------------------------------------------------------------ the choice


def test_a_plain_dataset_stays_in_memory_and_trains_bit_identically_to_tensors():
    torch.manual_seed(0)
    a = refilled.distill(sequential_teacher(), FcStudent(5), (X, Y), **FAST)
    torch.manual_seed(0)
    b = refilled.distill(sequential_teacher(), FcStudent(5), Plain(), **FAST)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    split = as_split(Plain())
    assert not split.streamed and split.note.startswith("in memory")


def test_a_dataset_with_random_transforms_streams_and_is_read_every_epoch(capsys):
    ds = Jittered(expose_targets=True)
    split = as_split(ds, in_memory="auto", settings=StreamSettings(workers=0))
    assert split.streamed and "per-item random transforms" in split.note and ".targets" in split.note
    ds.reads = 0
    refilled.distill(sequential_teacher(), FcStudent(5), ds, **{**FAST, "progress": True, "workers": 0})
    err = capsys.readouterr().err
    assert "training data streamed: the Dataset has per-item random transforms" in err
    # 2 + 2 epochs of 3 batches of 20 images: every epoch reads its images again
    assert ds.reads >= 4 * 3 * 20


def test_in_memory_can_be_forced_either_way_and_the_budget_decides_auto(monkeypatch):
    assert as_split(Plain(), in_memory=False).streamed
    forced = as_split(Jittered(), in_memory=True)
    assert not forced.streamed and "run once" in forced.note
    monkeypatch.setattr(inputs, "MEMORY_FRACTION", 1e-12)
    tight = as_split(Plain())
    assert tight.streamed and "exceed the memory budget" in tight.note
    with pytest.raises(refilled.ConfigError, match="in_memory= must be"):
        refilled.distill(sequential_teacher(), FcStudent(5), Plain(), in_memory="maybe", **FAST)


def test_labels_are_read_without_decoding_where_the_dataset_exposes_them():
    class Counting(Plain):
        def __init__(self):
            super().__init__()
            self.reads = 0
            self.samples = [(f"img{i}.png", int(y)) for i, y in enumerate(Y)]

        def __getitem__(self, i):
            self.reads += 1
            return super().__getitem__(i)

    ds = Counting()
    labels, how = labels_of(ds)
    assert torch.equal(labels, Y) and how == "its .samples" and ds.reads == 0
    sub = torch.utils.data.Subset(ds, [3, 1, 4])
    assert torch.equal(labels_of(sub)[0], Y[[3, 1, 4]]) and ds.reads == 0
    labels, how = labels_of(Plain())
    assert torch.equal(labels, Y) and "one pass" in how


def test_a_streamed_run_directory_resumes_exactly(tmp_path, monkeypatch):
    import refilled.engine as engine

    def fit(run_dir):
        torch.manual_seed(0)
        return refilled.distill(sequential_teacher(), FcStudent(5), Jittered(), run_dir=run_dir,
                                **{**FAST, "workers": 1})

    whole = fit(tmp_path / "whole")
    real = engine.atomic_torch_save
    calls = []

    def killed(obj, path):
        real(obj, path)
        calls.append(path)
        if Path(path).name == "stage2.ckpt":
            raise KeyboardInterrupt  # killed right after stage 2's first epoch was saved

    monkeypatch.setattr(engine, "atomic_torch_save", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "cut")
    monkeypatch.setattr(engine, "atomic_torch_save", real)
    resumed = fit(tmp_path / "cut")
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------ image folders


def make_folder(root: Path, classes=3, per_class=8, sizes=((40, 52), (61, 37))):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            arr = (rng.random((h, w, 3)) * 90 + c * 50).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_a_small_folder_streamed_evaluates_exactly_as_in_memory(tmp_path):
    root = make_folder(tmp_path / "imgs")
    memory, note_m = load_images("image_folder", str(root), "train", image_size=16, in_memory=True)
    stream, note_s = load_images("image_folder", str(root), "train", image_size=16, in_memory=False,
                                 settings=StreamSettings(workers=0))
    assert isinstance(stream.images, StreamedImages) and "streamed from disk" in note_s
    assert torch.equal(stream.images.materialise(), memory.images)  # evaluation reads: the same
    assert torch.equal(stream.labels, memory.labels) and stream.class_names == memory.class_names


def test_large_images_get_random_resized_crops_for_training_and_a_centre_crop_for_evaluation(tmp_path):
    root = make_folder(tmp_path / "imgs", sizes=((120, 90), (70, 200)))
    from refilled.data.datasets import list_image_folder

    files, labels, _ = list_image_folder(root)
    train = FileItems(files, labels, 64, train=True)
    evaluate = FileItems(files, labels, 64, train=False)
    for i in range(4):
        torch.manual_seed(i)
        x, _ = train[i]
        torch.manual_seed(i + 100)
        x2, _ = train[i]
        e, e2 = evaluate[i][0], evaluate[i][0]
        assert x.shape == e.shape == (3, 64, 64) and x.dtype == torch.uint8
        assert not torch.equal(x, x2) and torch.equal(e, e2)


def test_a_folder_over_the_memory_budget_streams_from_the_cli(tmp_path, capsys, monkeypatch):
    root = make_folder(tmp_path / "imgs", classes=3, per_class=10)
    monkeypatch.setattr(inputs, "MEMORY_FRACTION", 1e-12)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": "image_folder", "root": str(root), "teacher_classes": 2, "student_offset": 1,
                 "val_per_class": 2, "image_size": 16, "workers": 1},
        "teacher": {"arch": "cnn_small", "optim": {"epochs": 1, "batch_size": 4}},
        "student": {"arch": "cnn_small"},
        "train": {"epochs": 1, "batch_size": 4, "m_per_class": 2},
        "stage1": {"optim": {"epochs": 1, "batch_size": 4, "m_per_class": 2}},
        "device": "cpu", "out_dir": str(tmp_path / "runs"),
    }))
    code, res, err = run_cli(capsys, "run", config)
    assert code == 0, err
    assert "streamed from disk: its decoded images" in err and "exceed the memory budget" in err
    assert 0 <= res["test_accuracy"] <= 1 and res["stage1_ncm_accuracy"] is not None


def test_every_format_is_one_entry_of_the_registry():
    assert DATASET_NAMES == tuple(FORMATS)
    for name, fmt in FORMATS.items():
        assert fmt.name == name and callable(fmt.read) and fmt.layout
        assert {"mean", "std", "flip", "pad", "in_chans"} <= fmt.info.keys()
        assert (fmt.files is None) == (fmt.image_size is None)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this Python")
def test_torchrun_streams_a_folder_on_cpu(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=4, per_class=8)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": "image_folder", "root": str(root), "teacher_classes": 2, "student_offset": 2,
                 "val_per_class": 2, "image_size": 16, "in_memory": False, "workers": 1},
        "teacher": {"arch": "cnn_small", "optim": {"epochs": 1, "batch_size": 4}},
        "student": {"arch": "cnn_small"}, "progress": False,
        "train": {"epochs": 1, "batch_size": 4, "m_per_class": 2},
        "stage1": {"optim": {"epochs": 1, "batch_size": 4, "m_per_class": 2}},
        "out_dir": str(tmp_path / "runs"),
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone",
                           "--nproc_per_node=2", "-m", "refilled.cli", "run", str(config)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next((tmp_path / "runs").glob("image_folder-refilled-*/results.json")).read_text())
    assert 0 <= res["test_accuracy"] <= 1


def test_predict_reads_a_streamed_large_image_run_exactly_as_its_evaluation(tmp_path, capsys):
    """A run that streamed 64-px crops from disk is evaluated on centre crops: predict reproduces
    its test accuracy from the image files."""
    pytest.importorskip("safetensors")
    from refilled.export import predict_images

    for split, n in (("train", 6), ("test", 4)):
        make_folder(tmp_path / "imgs" / split, classes=3, per_class=n, sizes=((90, 70), (72, 120)))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": "image_folder", "root": str(tmp_path / "imgs"), "teacher_classes": 3,
                 "student_offset": 0, "val_per_class": 1, "image_size": 64, "in_memory": False,
                 "workers": 0},
        "method": "ce", "student": {"arch": "cnn_small"}, "progress": False,
        "train": {"epochs": 2, "batch_size": 6, "lr": 0.05},
        "device": "cpu", "out_dir": str(tmp_path / "runs"),
    }))
    code, res, err = run_cli(capsys, "run", config)
    assert code == 0, err
    meta = json.loads((Path(res["run_dir"]) / "model.json").read_text())
    assert meta["eval_resize"] == "centre_crop"
    got = predict_images(res["run_dir"], [tmp_path / "imgs" / "test"], progress=False)
    assert got["labelled"] == 12 and got["accuracy"] == pytest.approx(res["test_accuracy"], abs=0)
