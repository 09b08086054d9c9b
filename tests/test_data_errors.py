"""Image folders without train/ and test/, unreadable images, split messages (issue 13)."""

import ast
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import refilled.data
from refilled.data import ImageSet, cap_per_class, load_dataset, load_image_folder, select_classes, stratified_split
from refilled.data.common import ImageSet as CommonImageSet
from refilled.data.datasets import ImageSet as DatasetsImageSet
from refilled.errors import ConfigError, DatasetNotFoundError


def make_flat(root: Path, sizes: dict[str, int], start: int = 0) -> dict[int, tuple[str, str]]:
    """One solid grey PNG per image, its grey level unique: level -> (class, file name)."""
    made, level = {}, start
    for cname, n in sizes.items():
        (root / cname).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            level += 1
            Image.new("L", (9, 9), level).save(root / cname / f"img{k:02d}.png")
            made[level] = (cname, f"img{k:02d}.png")
    return made


def levels(images: ImageSet) -> list[int]:
    return [int(v) for v in images.images[:, 0, 0, 0]]


def test_flat_folder_gives_a_seeded_stratified_test_split(tmp_path):
    made = make_flat(tmp_path, {"cat": 5, "dog": 6, "eel": 2, "fox": 11})
    train = load_image_folder(tmp_path, "train", image_size=8, grayscale=True)
    test = load_dataset("image_folder", tmp_path, "test", image_size=8, grayscale=True)
    assert train.class_names == test.class_names == ["cat", "dog", "eel", "fox"]
    # round(0.2 n), at least 1 and at least one left to train: 5 -> 1, 6 -> 1, 2 -> 1, 11 -> 2
    assert torch.bincount(test.labels).tolist() == [1, 1, 1, 2]
    assert torch.bincount(train.labels).tolist() == [4, 5, 1, 9]
    assert set(levels(train)).isdisjoint(levels(test))
    assert sorted(levels(train) + levels(test)) == sorted(made)
    for imgs in (train, test):  # labels follow the class folders
        assert all(made[v][0] == imgs.class_names[y] for v, y in zip(levels(imgs), imgs.labels.tolist()))
    # the same split on every call; everything with split=None
    assert levels(load_image_folder(tmp_path, "test", image_size=8, grayscale=True)) == levels(test)
    assert sorted(levels(load_image_folder(tmp_path, None, image_size=8, grayscale=True))) == sorted(made)


def test_flat_folder_fraction_and_seed(tmp_path):
    make_flat(tmp_path, {"a": 5, "b": 6, "c": 2})
    half = load_image_folder(tmp_path, "test", image_size=8, grayscale=True, test_fraction=0.5)
    assert torch.bincount(half.labels).tolist() == [round(2.5), 3, 1]  # Python's round: 2
    most = load_image_folder(tmp_path, "train", image_size=8, grayscale=True, test_fraction=0.99)
    assert torch.bincount(most.labels).tolist() == [1, 1, 1]  # at least one left for training
    splits = {tuple(levels(load_image_folder(tmp_path, "test", image_size=8, grayscale=True, test_seed=s)))
              for s in range(6)}
    assert len(splits) > 1  # the seed moves the split


def test_a_class_split_does_not_move_when_other_classes_change(tmp_path):
    make_flat(tmp_path / "one", {"a": 10})
    make_flat(tmp_path / "two", {"a": 10, "b": 7})
    first = load_image_folder(tmp_path / "one", "test", image_size=8, grayscale=True)
    second = load_image_folder(tmp_path / "two", "test", image_size=8, grayscale=True)
    assert levels(first) == [v for v, y in zip(levels(second), second.labels.tolist()) if y == 0]


def test_a_class_with_a_single_image_is_one_line_naming_it(tmp_path):
    make_flat(tmp_path, {"a": 4, "lonely": 1})
    for split in ("train", "test"):
        with pytest.raises(DatasetNotFoundError) as info:
            load_image_folder(tmp_path, split, image_size=8)
        message = str(info.value)
        assert f"class folder {tmp_path / 'lonely'} holds 1 image" in message and "\n" not in message
    assert len(load_image_folder(tmp_path, None, image_size=8)) == 5


def test_flat_folder_bad_arguments(tmp_path):
    make_flat(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(ConfigError, match=r"test fraction must be in \(0, 1\)"):
        load_image_folder(tmp_path, "train", test_fraction=1.0)
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        load_image_folder(tmp_path, "val")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope", "train")
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        load_image_folder(tmp_path / "a" / "img00.png", "train")


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_unreadable_image_is_one_line_naming_it(tmp_path, content):
    make_flat(tmp_path, {"a": 3, "b": 3})
    bad = tmp_path / "b" / "zz.png"
    bad.write_bytes(content)
    with pytest.raises(DatasetNotFoundError) as info:
        load_image_folder(tmp_path, None, image_size=8)
    message = str(info.value)
    assert f"could not read image {bad}" in message and "delete or replace" in message and "\n" not in message


def test_truncated_image(tmp_path):
    make_flat(tmp_path, {"a": 3})
    bad = tmp_path / "a" / "big.png"
    Image.effect_noise((64, 64), 50).save(bad)
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DatasetNotFoundError, match=f"could not read image {bad}"):
        load_image_folder(tmp_path, None, image_size=8)


def test_image_set_lives_in_common_and_glyphs_does_not_import_datasets():
    assert ImageSet is CommonImageSet is DatasetsImageSet is refilled.data.ImageSet
    source = Path(refilled.data.__file__).with_name("glyphs.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert "refilled.data.datasets" not in imported and "refilled.data.common" in imported


@pytest.mark.parametrize(
    "call",
    [
        lambda: select_classes(torch.zeros(4, 1), torch.tensor([0, 0, 1, 1]), [0, 0]),
        lambda: select_classes(torch.zeros(4, 1), torch.tensor([0, 0, 1, 1]), [-1, 0]),
        lambda: select_classes(torch.zeros(4, 1), torch.tensor([0, 0, 1, 1]), [0, 4]),
        lambda: cap_per_class(torch.tensor([0, 1]), 0, seed=0),
        lambda: cap_per_class(torch.tensor([0, 2]), 1, seed=0),
        lambda: stratified_split(torch.tensor([0, 0, 1]), val_per_class=1),
        lambda: stratified_split(torch.tensor([0, 0, 1]), val_per_class=0),
        lambda: stratified_split(torch.tensor([0, 0, 1]), val_fraction=1.5),
    ],
)
def test_split_messages_describe_the_data_not_the_function(call):
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    for name in ("select_classes", "cap_per_class", "stratified_split"):
        assert name not in message
    assert "\n" not in message


def test_split_messages_wording():
    with pytest.raises(ConfigError, match=r"classes \[4\] have no images in this split"):
        select_classes(torch.zeros(4, 1), torch.tensor([0, 0, 1, 1]), [0, 4])
    with pytest.raises(ConfigError, match=r"taking 1 images per class for validation leaves no training "
                                          r"example for 1 class\(es\) \(class 1 has 1\)"):
        stratified_split(torch.tensor([0, 0, 1]), val_per_class=1)


# ----------------------------------------------------------------------------- CIFAR-100 pickles


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _write_cifar(folder: Path, protocol: int, extra=None):
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    record = {b"data": data, b"fine_labels": [0, 1], **(extra or {})}
    for split in ("train", "test"):
        (folder / split).write_bytes(pickle.dumps(record, protocol=protocol))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a", b"b"]}, protocol=protocol))
    return data


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_every_protocol_load(tmp_path, protocol):
    from refilled.data import load_cifar100

    data = _write_cifar(tmp_path / "cifar-100-python", protocol)
    d = load_cifar100(tmp_path, "train")
    assert d.class_names == ["a", "b"] and int(d.images[1, 0, 0, 5]) == int(data[1, 5])


def test_cifar_pickle_never_runs_code(tmp_path):
    from refilled.data import load_cifar100

    marker = tmp_path / "ran"
    _write_cifar(tmp_path / "cifar-100-python", 4, {b"evil": _Payload(marker)})
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar100(tmp_path, "train")
    assert not marker.exists()
    assert "holds Python objects other than arrays and lists (builtins.exec)" in str(info.value)
    assert "\n" not in str(info.value)
