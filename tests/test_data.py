"""Tests of the data layer: readers on tiny files in the official formats, splits, loader."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from refilled.data import (
    DATASET_INFO,
    Augment,
    ClassBalancedSampler,
    TensorLoader,
    augment_batch,
    cap_per_class,
    class_order,
    class_window,
    load_cifar100,
    load_cub200,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    select_classes,
    stratified_split,
)
from refilled.data import datasets as datasets_mod
from refilled.data.loader import affine_matrices, crop_flip, stroke_width
from refilled.errors import ConfigError, DatasetNotFoundError

# ----------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, magic=None):
    array = np.asarray(array, dtype=np.uint8)
    magic = magic if magic is not None else bytes((0, 0, 0x08, array.ndim))
    data = magic + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_fashion(root: Path, n=5, gz=True, prefix="train"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    ext = ".gz" if gz else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_idx_roundtrip(tmp_path, gz):
    images, labels = write_fashion(tmp_path, gz=gz, prefix="t10k")
    d = load_fashion_mnist(tmp_path, "test")
    assert d.images.shape == (5, 1, 28, 28) and d.images.dtype == torch.uint8
    assert torch.equal(d.images[:, 0], torch.from_numpy(images))
    assert d.labels.dtype == torch.int64 and d.labels.tolist() == labels.tolist()
    assert d.class_names[0] == "T-shirt/top" and d.class_names[9] == "Ankle boot"
    assert d.name == "fashion_mnist"


def test_fashion_bad_magic_and_truncated(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)), magic=b"\x00\x00\x08\x01")
    with pytest.raises(DatasetNotFoundError, match="magic") as e:
        load_fashion_mnist(tmp_path, "train")
    assert "train-images-idx3-ubyte.gz" in str(e.value)

    write_fashion(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    raw = tmp_path / "train-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(DatasetNotFoundError, match="truncated") as e:
        load_fashion_mnist(tmp_path, "train")
    assert str(raw) in str(e.value)


def test_fashion_missing_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_fashion_mnist(tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root=" in msg


def test_fashion_real_debian_files():
    root = Path(datasets_mod.FASHION_MNIST_ROOT)
    if not (root / "t10k-images-idx3-ubyte.gz").exists() and not (root / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"Fashion-MNIST not installed at {root} (sudo apt-get install dataset-fashion-mnist)")
    train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))


# ----------------------------------------------------------------------------- digits


def test_digits_split_disjoint_reproducible():
    train, test = load_digits("train"), load_digits("test")
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - 0.25) < 0.01
    # Disjoint: no (image, label) of test appears in train, compared as byte rows.
    def rows(d):
        return {bytes(r) for r in torch.cat([d.images.flatten(1), d.labels[:, None]], 1).numpy()}

    assert not rows(train) & rows(test)
    again = load_digits("test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    assert set(test.labels.tolist()) == set(range(10))
    assert not torch.equal(load_digits("test", seed=1).labels, test.labels)


# ----------------------------------------------------------------------------- CIFAR-100


def write_cifar(folder: Path):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 3), ("test", 2)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = list(range(n))
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": labels}, f)
        out[split] = (data, labels)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return out


def test_cifar100_folder_or_parent(tmp_path):
    truth = write_cifar(tmp_path / "cifar-100-python")
    for root in (tmp_path, tmp_path / "cifar-100-python"):
        d = load_cifar100(root, "train")
        data, labels = truth["train"]
        assert d.images.shape == (3, 3, 32, 32) and d.images.dtype == torch.uint8
        assert d.labels.tolist() == labels and d.class_names[:2] == ["c0", "c1"]
        # Row layout: 1024 R values, then G, then B, each 32 x 32 row-major.
        assert int(d.images[1, 2, 3, 4]) == int(data[1, 2 * 1024 + 3 * 32 + 4])
    assert len(load_dataset("cifar100", tmp_path, "test")) == 2


def test_cifar100_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_cifar100(tmp_path, "train")
    assert str(tmp_path / "cifar-100-python" / "train") in str(e.value)
    write_cifar(tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python/test"):
        load_cifar100(tmp_path, "test")


# ----------------------------------------------------------------------------- CUB-200-2011


def write_cub(base: Path):
    """3 classes x 2 images; image k of each class is train when k == 0."""
    classes = ["001.Albatross", "002.Auklet", "003.Blackbird"]
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": []}
    img_id = 0
    for ci, cname in enumerate(classes):
        (base / "images" / cname).mkdir(parents=True)
        for k in range(2):
            img_id += 1
            rel = f"{cname}/img_{k}.jpg"
            color = (80 * ci, 100 * k, 50)
            Image.new("RGB", (20 + 3 * k, 15), color).save(base / "images" / rel)
            lines["images.txt"].append(f"{img_id} {rel}")
            lines["image_class_labels.txt"].append(f"{img_id} {ci + 1}")
            lines["train_test_split.txt"].append(f"{img_id} {1 if k == 0 else 0}")
    for name, rows in lines.items():
        (base / name).write_text("\n".join(rows) + "\n")
    (base / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))


def test_cub200_layout_and_cache(tmp_path):
    base = tmp_path / "CUB_200_2011"
    write_cub(base)
    train = load_cub200(tmp_path, "train", image_size=12)  # parent of CUB_200_2011
    assert train.images.shape == (3, 3, 12, 12) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 1, 2]
    assert train.class_names == ["001.Albatross", "002.Auklet", "003.Blackbird"]
    assert abs(int(train.images[1, 0].float().mean()) - 80) <= 3  # class 1 red = 80
    test = load_cub200(base, "test", image_size=12)
    assert test.labels.tolist() == [0, 1, 2]
    assert abs(int(test.images[0, 1].float().mean()) - 100) <= 3  # k = 1 green = 100
    assert len(list((base / ".refilled_cache").glob("*.pt"))) == 2
    assert not list((base / ".refilled_cache").glob("*.tmp"))
    # Second load comes from the cache: it works with the JPEGs gone.
    for p in (base / "images").rglob("*.jpg"):
        p.unlink()
    again = load_cub200(base, "train", image_size=12)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    with pytest.raises(DatasetNotFoundError):  # other size: not cached, images gone
        load_cub200(base, "train", image_size=10)


def test_cub200_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_cub200(tmp_path, "train")
    assert str(tmp_path / "CUB_200_2011" / "images.txt") in str(e.value)


# ----------------------------------------------------------------------------- image folder


def test_image_folder_with_splits(tmp_path):
    for split, n in (("train", 2), ("test", 1)):
        for ci, cname in enumerate(["zebra", "ant"]):
            (tmp_path / split / cname).mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (10, 7), (10 + 100 * ci, 0, 0)).save(tmp_path / split / cname / f"{k}.png")
    train = load_image_folder(tmp_path, "train", image_size=6)
    assert train.class_names == ["ant", "zebra"] and train.labels.tolist() == [0, 0, 1, 1]
    assert train.images.shape == (4, 3, 6, 6)
    assert int(train.images[0, 0, 0, 0]) == 110  # ant is red 110
    test = load_dataset("image_folder", tmp_path, "test", image_size=6, grayscale=True)
    assert test.images.shape == (2, 1, 6, 6) and test.labels.tolist() == [0, 1]
    with pytest.raises(DatasetNotFoundError, match="no class folders"):
        load_image_folder(tmp_path / "train" / "ant")


def test_load_dataset_unknown_and_info():
    with pytest.raises(ConfigError, match="fashion_mnist.*cub200"):
        load_dataset("mnist")
    assert DATASET_INFO["digits"]["flip"] is False and DATASET_INFO["cifar100"]["pad"] == 4
    assert all(len(i["mean"]) == i["in_chans"] for i in DATASET_INFO.values())


# ----------------------------------------------------------------------------- splits


def test_class_order_and_window():
    assert class_order(5, None) == [0, 1, 2, 3, 4]
    o = class_order(10, 3)
    assert sorted(o) == list(range(10)) and o == class_order(10, 3) and o != class_order(10, 4)
    assert class_window([4, 2, 0, 1, 3], 2, 1) == [2, 0]
    with pytest.raises(ConfigError, match=r"n=3, s=3.*5 classes"):
        class_window([4, 2, 0, 1, 3], 3, 3)
    with pytest.raises(ConfigError, match="n=1"):
        class_window([0, 1, 2], 1, 0)


def test_select_classes_remaps():
    labels = torch.tensor([0, 3, 1, 3, 2, 1])
    images = torch.arange(6).reshape(6, 1, 1, 1)
    x, y = select_classes(images, labels, [3, 1])
    assert x.flatten().tolist() == [1, 2, 3, 5] and y.tolist() == [0, 1, 0, 1]
    with pytest.raises(ConfigError):
        select_classes(images, labels, [7, 1])


def test_cap_per_class():
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 4)
    idx = cap_per_class(labels, 3, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [3, 2, 3]
    assert len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, cap_per_class(labels, 3, seed=0))
    assert any(not torch.equal(cap_per_class(labels, 3, seed=s), idx) for s in range(1, 6))
    with pytest.raises(ConfigError, match="no examples"):
        cap_per_class(torch.tensor([0, 2, 2]), 1, seed=0)


def test_stratified_split():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 6)
    tr, va = stratified_split(labels, val_per_class=2, seed=1)
    assert torch.bincount(labels[va]).tolist() == [2, 2, 2]
    assert torch.bincount(labels[tr]).tolist() == [8, 2, 4]
    assert sorted(tr.tolist() + va.tolist()) == list(range(20))
    tr2, va2 = stratified_split(labels, val_per_class=2, seed=1)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    _, va3 = stratified_split(labels, val_fraction=0.25, seed=0)
    assert torch.bincount(labels[va3]).tolist() == [2, 1, 2]  # round(2.5)=2, 1, round(1.5)=2
    with pytest.raises(ConfigError, match="class 1 has 4"):
        stratified_split(labels, val_per_class=4)
    with pytest.raises(ConfigError, match="exactly one"):
        stratified_split(labels)


# ----------------------------------------------------------------------------- augmentation


def oracle_augment(x, pad, flip, generator):
    """Per-sample loop consuming the same draws as augment_batch (documented order)."""
    b, _, h, w = x.shape
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator) if pad > 0 else torch.zeros(b, dtype=torch.long)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator) if pad > 0 else torch.zeros(b, dtype=torch.long)
    fl = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    out = torch.empty_like(x)
    for i in range(b):
        img = F.pad(x[i], (pad, pad, pad, pad))[:, oy[i] : oy[i] + h, ox[i] : ox[i] + w]
        out[i] = img.flip(-1) if fl[i] else img
    return out


@pytest.mark.parametrize("pad,flip", [(0, False), (0, True), (2, False), (3, True)])
def test_augment_batch_matches_loop(pad, flip):
    x = torch.rand(16, 3, 7, 5)
    got = augment_batch(x, pad, flip, torch.Generator().manual_seed(5))
    want = oracle_augment(x, pad, flip, torch.Generator().manual_seed(5))
    assert torch.equal(got, want)
    assert torch.equal(Augment(pad, flip)(x, torch.Generator().manual_seed(5)), want)
    if pad or flip:  # something actually changed for some sample
        assert not torch.equal(got, x)


def test_crop_flip_is_augment_batch_without_extras():
    x = torch.rand(8, 1, 6, 6)
    want = crop_flip(x, 2, True, torch.Generator().manual_seed(1))
    assert torch.equal(augment_batch(x, 2, True, torch.Generator().manual_seed(1)), want)
    assert torch.equal(Augment(2, True, degrees=0, noise=0)(x, torch.Generator().manual_seed(1)), want)


def test_affine_matrices_geometry():
    x = torch.rand(3, 2, 6, 6)
    n = len(x)

    def warp(angle, mag, shear):
        theta = affine_matrices(torch.full((n,), angle), torch.full((n,), mag), torch.full((n,), shear))
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    assert torch.allclose(warp(0.0, 1.0, 0.0), x, atol=1e-6)
    # A right angle samples pixel centres exactly: counter-clockwise on screen, like rot90.
    assert torch.allclose(warp(np.pi / 2, 1.0, 0.0), torch.rot90(x, 1, (-2, -1)), atol=1e-5)
    assert torch.allclose(warp(-np.pi / 2, 1.0, 0.0), torch.rot90(x, -1, (-2, -1)), atol=1e-5)
    # Magnifying by 2 about the centre: output pixel centres 2 apart sample input pixel corners;
    # halving keeps the content in the central half (zeros around it).
    ones = torch.ones(1, 1, 8, 8)
    theta = affine_matrices(torch.zeros(1), torch.tensor([0.5]), torch.zeros(1))
    small = F.grid_sample(ones, F.affine_grid(theta, [1, 1, 8, 8], align_corners=False), align_corners=False)
    assert torch.allclose(small[0, 0, 2:6, 2:6], torch.ones(4, 4))
    assert small[0, 0, :, :1].abs().max() < 1e-6 and small[0, 0, :1].abs().max() < 1e-6
    # x-shear: a vertical bar leans; row r of the output is shifted by shear * (y of row r).
    bar = torch.zeros(1, 1, 8, 8)
    bar[..., 4] = 1.0
    theta = affine_matrices(torch.zeros(1), torch.ones(1), torch.tensor([0.25]))
    leaned = F.grid_sample(bar, F.affine_grid(theta, [1, 1, 8, 8], align_corners=False), align_corners=False)[0, 0]
    centre = (leaned * torch.arange(8.0)).sum(1) / leaned.sum(1)  # ink column per row
    ys = (torch.arange(8.0) + 0.5) / 4 - 1  # normalised y of each row (down is +)
    assert torch.allclose(centre - centre.mean(), 0.25 * (ys - ys.mean()) * 4, atol=1e-4)


def test_stroke_width_matches_min_max_filter_loop():
    x = torch.rand(4, 1, 5, 6)
    padded_lo = F.pad(x, (1, 1, 1, 1), value=float("inf"))
    padded_hi = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    grown, shrunk = torch.empty_like(x), torch.empty_like(x)
    for i in range(5):
        for j in range(6):
            grown[..., i, j] = padded_hi[..., i : i + 3, j : j + 3].amax((-2, -1))
            shrunk[..., i, j] = padded_lo[..., i : i + 3, j : j + 3].amin((-2, -1))
    t = torch.tensor([1.0, -1.0, 0.0, 0.5])
    got = stroke_width(x, t)
    assert torch.allclose(got[0], grown[0]) and torch.allclose(got[1], shrunk[1])
    assert torch.equal(got[2], x[2])
    assert torch.allclose(got[3], 0.5 * x[3] + 0.5 * grown[3])
    assert (got[0] >= x[0]).all() and (got[1] <= x[1]).all()


def oracle_augment_extras(x, pad, degrees, scale, shear, thickness, noise, generator):
    """One sample at a time, with the draws of augment_batch's documented order."""
    b = len(x)
    x = crop_flip(x, pad, False, generator)
    angle = (torch.rand(b, generator=generator) * 2 - 1) * np.deg2rad(degrees)
    mag = 1 + (torch.rand(b, generator=generator) * 2 - 1) * scale
    sh = (torch.rand(b, generator=generator) * 2 - 1) * shear
    t = (torch.rand(b, generator=generator) * 2 - 1) * thickness
    eps = torch.randn(x.shape, generator=generator)
    out = []
    for i in range(b):
        theta = affine_matrices(angle[i : i + 1], mag[i : i + 1], sh[i : i + 1])
        img = F.grid_sample(x[i : i + 1], F.affine_grid(theta, [1, *x.shape[1:]], align_corners=False),
                            align_corners=False)
        img = stroke_width(img, t[i : i + 1])
        out.append((img + noise * eps[i : i + 1]).clamp(0, 1))
    return torch.cat(out), (angle, mag, sh, t)


def test_augment_batch_extras_match_per_sample_loop():
    x = torch.rand(6, 1, 10, 10)
    extras = dict(degrees=10.0, scale=0.1, shear=0.2, thickness=0.7, noise=0.05)
    got = augment_batch(x, 1, False, torch.Generator().manual_seed(3), **extras)
    want, (angle, mag, sh, t) = oracle_augment_extras(x, 1, *extras.values(), torch.Generator().manual_seed(3))
    assert torch.allclose(got, want, atol=1e-5)
    assert got.min() >= 0 and got.max() <= 1
    # Draws stay inside the documented ranges and differ between samples.
    assert angle.abs().max() <= np.deg2rad(10) and (mag - 1).abs().max() <= 0.1
    assert sh.abs().max() <= 0.2 and t.abs().max() <= 0.7 and len(set(angle.tolist())) == 6
    again = augment_batch(x, 1, False, torch.Generator().manual_seed(3), **extras)
    assert torch.equal(got, again)
    other = augment_batch(x, 1, False, torch.Generator().manual_seed(4), **extras)
    assert not torch.allclose(got, other)
    # Noise alone: mean-zero, about the requested spread (away from the clamp at 0 and 1).
    grey = torch.full((64, 1, 16, 16), 0.5)
    noisy = augment_batch(grey, 0, False, torch.Generator().manual_seed(0), noise=0.05) - 0.5
    assert abs(noisy.mean()) < 0.002 and abs(noisy.std() - 0.05) < 0.002


def test_glyph_training_loader_uses_the_extra_augmentation(tmp_path):
    from refilled.pipeline import augment_of as _augment
    from refilled.data import Split
    from refilled.protocols import Task

    info = {**DATASET_INFO["glyphs"], "in_chans": 1}
    split = Split(torch.zeros(8, 1, 8, 8, dtype=torch.uint8), torch.arange(8) % 2)
    task = Task(train=split, val=split, test=split, classes=(0, 1), class_names=("a", "b"), info=info)
    augment = _augment(task)
    assert augment.extra == {k: float(v) for k, v in DATASET_INFO["glyphs"]["augment"].items()}
    off = Task(**{**task.__dict__, "info": {**info, "train_augment": False}})
    assert _augment(off) is None


def test_data_augment_false_switches_training_augmentation_off():
    from tiny import TINY

    from refilled.config import make_config
    from refilled.pipeline import augment_of as _augment
    from refilled.protocols import window_task

    on = window_task(make_config(TINY), "student")
    off = window_task(make_config(TINY, ["data.augment=false"]), "student")
    assert _augment(on) is not None and _augment(off) is None


# ----------------------------------------------------------------------------- loader


def test_tensor_loader_epoch_cover_and_resume():
    n = 23
    images = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = torch.arange(n)
    loader = TensorLoader(images, labels, 5, shuffle=True, drop_last=False, mean=(0.0,), std=(1 / 255,), seed=3)
    assert len(loader) == 5
    epochs = []
    for _ in range(3):
        seen = []
        for x, y in loader:
            assert x.dtype == torch.float32 and torch.allclose(x[:, 0, 0, 0], y.float())
            seen += y.tolist()
        assert sorted(seen) == list(range(n))
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    loader.set_epoch(1)  # resume at epoch 1 reproduces it, then moves on to epoch 2
    assert [v for _, y in loader for v in y.tolist()] == epochs[1]
    assert [v for _, y in loader for v in y.tolist()] == epochs[2]

    dropped = TensorLoader(images, labels, 5, mean=(0.0,), std=(1.0,), augment=Augment(1, True))
    assert len(dropped) == 4 and sum(len(y) for _, y in dropped) == 20
    dropped.set_epoch(7)
    a = [x for x, _ in dropped]
    dropped.set_epoch(7)
    assert all(torch.equal(p, q) for p, q in zip(a, [x for x, _ in dropped]))


def test_class_balanced_sampler():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7 + [5] * 20)
    s = ClassBalancedSampler(labels, m_per_class=4, batch_size=8, seed=0)
    assert len(s) == 5
    batches = list(s)
    assert len(batches) == 5
    for b in batches:
        counts = torch.bincount(labels[b])
        assert sorted(counts[counts > 0].tolist()) == [4, 4]  # two classes, four each
        for c in labels[b].unique():
            members = b[labels[b] == c]
            # Repeats only for class 1, which has fewer than m samples.
            assert len(members.unique()) == (3 if int(c) == 1 else 4)
    s.set_epoch(0)
    assert all(torch.equal(p, q) for p, q in zip(batches, s))
    assert any(not torch.equal(p, q) for p, q in zip(batches, s))  # epoch 1 differs

    loader = TensorLoader(labels.to(torch.uint8).reshape(-1, 1, 1, 1), labels, 8, mean=(0,), std=(1,), sampler=s)
    loader.set_epoch(0)
    assert [y.tolist() for _, y in loader] == [labels[b].tolist() for b in batches]

    with pytest.raises(ConfigError, match="multiple"):
        ClassBalancedSampler(labels, 3, 8)
    with pytest.raises(ConfigError, match="at least 2"):
        ClassBalancedSampler(labels, 4, 4)
