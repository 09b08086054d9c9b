"""The dataset formats: one table entry each (name -> reader, layout, defaults).

A format is a reader (``root, split, **options -> ImageSet`` of decoded images), the layout it
expects on disk (for messages and documentation), its input statistics and training
augmentation, the ``data.*`` options it takes, and, for formats of image files, a lister
(``root, split, **options -> (files, labels, class names)``, no image read) that lets it be
streamed from disk. A new format is one file (its reader) and one entry of :data:`FORMATS`.

:func:`load_images` reads a format's split in memory or streamed: ``data.in_memory`` true /
false, or ``auto`` — decoded in memory when its images at the size the networks see fit the
memory budget, streamed from disk otherwise (image files only: the other formats are arrays
read whole anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from refilled.data.common import ImageSet
from refilled.data.datasets import (
    list_cub200,
    list_image_folder,
    load_cifar100,
    load_cub200,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
)
from refilled.errors import ConfigError

__all__ = ["DatasetFormat", "FORMATS", "DATASET_INFO", "DATASET_NAMES", "load_dataset", "load_images"]


def _glyphs(root=None, split="train", **kw):
    from refilled.data.glyphs import load_glyphs  # renders fonts: imported when used

    return load_glyphs(root, split, **kw)


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset format; see the module docstring."""

    name: str
    read: Callable[..., ImageSet]
    layout: str
    info: dict  # mean, std (of images in [0, 1]), pad, flip, in_chans, optional batch augment
    options: tuple[str, ...] = ()  # of image_size, test_fraction, test_seed
    files: Callable | None = None  # lister of image files: the format streams from disk
    image_size: int | None = None  # default side in pixels (formats of image files)
    extra: dict = field(default_factory=dict)  # reader keywords always given


FORMATS: dict[str, DatasetFormat] = {f.name: f for f in (
    DatasetFormat("fashion_mnist", lambda root, split, **kw: load_fashion_mnist(root, split),
                  "the official idx files (train-images-idx3-ubyte[.gz] ...) in data.root "
                  "(default /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)",
                  {"mean": (0.2860,), "std": (0.3530,), "flip": True, "pad": 2, "in_chans": 1}),
    DatasetFormat("digits", lambda root, split, **kw: load_digits(split),
                  "none: scikit-learn's bundled 8x8 digits (fixed, seeded 75/25 split)",
                  {"mean": (0.3053,), "std": (0.3759,), "flip": False, "pad": 1, "in_chans": 1}),
    # Rendered font glyphs: stats of the whole rendered set; no flip, but small affine
    # distortions, stroke width and pixel noise (refilled.data.loader.augment_batch).
    DatasetFormat("glyphs", _glyphs,
                  "none: rendered once from Debian's font packages, cached in data.root "
                  "(default ~/.cache/refilled/glyphs)",
                  {"mean": (0.0887,), "std": (0.2604,), "flip": False, "pad": 2, "in_chans": 1,
                   "augment": {"degrees": 10.0, "scale": 0.1, "shear": 0.2, "thickness": 0.7,
                               "noise": 0.05}}),
    DatasetFormat("cifar100", lambda root, split, **kw: load_cifar100(root, split),
                  "the official cifar-100-python folder (train, test, meta) or its parent",
                  {"mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762), "flip": True,
                   "pad": 4, "in_chans": 3}),
    # ImageNet statistics; pad 8 is for the default 84 x 84 size.
    DatasetFormat("cub200", lambda root, split, image_size=84, **kw: load_cub200(root, split, image_size),
                  "the official CUB_200_2011 folder (images/, images.txt, "
                  "image_class_labels.txt, train_test_split.txt, classes.txt) or its parent",
                  {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "flip": True,
                   "pad": 8, "in_chans": 3},
                  options=("image_size",), files=lambda root, split, **kw: list_cub200(root, split),
                  image_size=84),
    # Generic defaults for a user's folder of RGB images.
    DatasetFormat("image_folder",
                  lambda root, split, image_size=32, test_fraction=0.2, test_seed=0, grayscale=False:
                  load_image_folder(root, split, image_size, grayscale, test_fraction, test_seed),
                  "data.root/{train,test}/<class>/<image>, or data.root/<class>/<image> (a test "
                  "split carved per class)",
                  {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "flip": True, "pad": 4, "in_chans": 3},
                  options=("image_size", "test_fraction", "test_seed"),
                  files=lambda root, split, test_fraction=0.2, test_seed=0, **kw:
                  list_image_folder(root, split, test_fraction, test_seed),
                  image_size=32),
)}

DATASET_NAMES = tuple(FORMATS)
DATASET_INFO: dict[str, dict] = {name: f.info for name, f in FORMATS.items()}


def dataset_format(name: str) -> DatasetFormat:
    if name not in FORMATS:
        raise ConfigError(f"config key 'data.name' must be one of {list(FORMATS)}, got {name!r}")
    return FORMATS[name]


def _options(fmt: DatasetFormat, options: dict) -> dict:
    return {k: v for k, v in options.items() if k in fmt.options and v is not None}


def load_dataset(name: str, root=None, split: str = "train", **options) -> ImageSet:
    """Dataset ``name``'s ``split``, decoded in memory; ``options`` it does not take are ignored
    (see :data:`FORMATS`), except the reader's own keywords (e.g. ``grayscale``)."""
    fmt = dataset_format(name)
    known = ("image_size", "test_fraction", "test_seed")
    own = {k: v for k, v in options.items() if k not in known}
    return fmt.read(root, split, **_options(fmt, options), **own)


def load_images(name: str, root, split: str, *, in_memory="auto", settings=None, image_size=None,
                test_fraction: float = 0.2, test_seed: int = 0, augment: bool = True
                ) -> tuple[ImageSet, str]:
    """A format's split in memory or streamed (see the module docstring), and why."""
    from refilled.data.folders import streamed_files
    from refilled.data.inputs import _size, memory_budget
    from refilled.data.streaming import StreamedImages, StreamSettings

    fmt = dataset_format(name)
    settings = settings or StreamSettings()
    options = _options(fmt, {"image_size": image_size, "test_fraction": test_fraction,
                             "test_seed": test_seed})
    if fmt.files is not None and in_memory is not True:
        files, labels, class_names = fmt.files(root, split, **options)
        size = image_size or fmt.image_size
        decoded = len(files) * fmt.info["in_chans"] * size * size
        budget = memory_budget()
        if in_memory is False or decoded > budget:
            why = ("asked for (data.in_memory false)" if in_memory is False else
                   f"its decoded images ({_size(decoded)}) exceed the memory budget ({_size(budget)})")
            images = streamed_files(files, labels, size, grayscale=fmt.info["in_chans"] == 1,
                                    flip=fmt.info["flip"], pad=fmt.info["pad"], settings=settings,
                                    what=f"{name} {split} split", augment=augment)
            workers = settings.resolved_workers()
            note = f"streamed from disk: {why}; {workers} worker process{'es' if workers != 1 else ''}"
            return ImageSet(images, torch.tensor(labels, dtype=torch.long), class_names, name), note
        note = f"in memory: {_size(decoded)} of decoded images, within the memory budget ({_size(budget)})"
        return fmt.read(root, split, **options), note
    data = fmt.read(root, split, **options)
    if in_memory is False:  # arrays read whole, then read item by item like any Dataset
        items = torch.utils.data.TensorDataset(data.images, data.labels)
        images = StreamedImages(items, item_shape=data.images.shape[1:], dtype=data.images.dtype,
                                settings=settings, fingerprint=f"{name}/{split}/{len(data)}",
                                what=f"{name} {split} split")
        return ImageSet(images, data.labels, data.class_names, name), "streamed: asked for (data.in_memory false)"
    return data, "in memory"
