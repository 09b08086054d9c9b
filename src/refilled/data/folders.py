"""Image files read one at a time: the streaming path of image folders (and CUB-200).

:class:`FileItems` is a map-style Dataset of ``(uint8 C x H x W image, label)`` decoded from
files in a worker process, with the standard transforms for the size the networks see
(``image_size``), whatever the files' own sizes:

* **large images** (``image_size >= LARGE``): training — a random resized crop (8%–100% of the
  area, aspect 3/4–4/3) and a horizontal flip; evaluation — the shorter side resized to
  ``image_size / 0.875``, then the centre ``image_size`` x ``image_size`` crop;
* **small images**: training — resized to ``image_size`` x ``image_size``, then zero-padded by
  ``pad`` and randomly cropped back, and flipped; evaluation — resized to ``image_size`` x
  ``image_size``, exactly as the in-memory path decodes them.

Random draws come from torch's global generator, which the streaming loader seeds per item
from ``(seed, epoch, index)``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

LARGE = 64  # image_size from which the large-image recipe applies
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_RESIZE = 0.875  # centre crop of image_size out of image_size / 0.875


def files_fingerprint(files: Sequence[Path]) -> str:
    """Names, sizes and modification times of files (no file is read)."""
    h = hashlib.sha256()
    for f in files:
        try:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}|missing\n".encode())
    return h.hexdigest()


def _open(path: Path, grayscale: bool):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("L" if grayscale else "RGB")


def _array(img) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())


def random_resized_crop(img, size: int):
    """A crop of random area (CROP_SCALE of the image) and aspect ratio (CROP_RATIO, log-uniform),
    resized to size x size; the whole image centred when ten draws do not fit."""
    from PIL import Image

    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(*CROP_SCALE))
        ratio = math.exp(float(torch.empty(()).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, ()))
            top = int(torch.randint(0, h - ch + 1, ()))
            return img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


def resize_centre_crop(img, size: int):
    from PIL import Image

    w, h = img.size
    short = max(size, round(size / EVAL_RESIZE))
    nw, nh = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pad_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop a random window of the original size."""
    if pad <= 0:
        return x
    _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    top, left = int(torch.randint(0, 2 * pad + 1, ())), int(torch.randint(0, 2 * pad + 1, ()))
    return padded[:, top:top + h, left:left + w]


def resize_mode(image_size: int) -> str:
    """How evaluation resizes a file streamed at ``image_size``: ``"centre_crop"`` (large
    images) or ``"square"`` (resized to image_size x image_size, as the in-memory path does)."""
    return "centre_crop" if image_size >= LARGE else "square"


def read_eval_image(path: Path, image_size: int, *, grayscale: bool = False, resize: str = "square"
                    ) -> torch.Tensor:
    """An image file as evaluation reads it (uint8 C x H x W): ``resize`` is ``"square"`` or
    ``"centre_crop"`` (see :func:`resize_mode`). Raises OSError naming a file it cannot read."""
    from PIL import Image

    if resize not in ("square", "centre_crop"):
        raise ValueError(f"resize must be 'square' or 'centre_crop', got {resize!r}")
    try:
        img = _open(path, grayscale)
    except Exception as err:  # noqa: BLE001 - not an image, truncated, unreadable: one line
        raise OSError(f"cannot read image {path} ({type(err).__name__}: {err}); delete or replace "
                      "that file") from None
    if resize == "centre_crop":
        return _array(resize_centre_crop(img, image_size))
    return _array(img.resize((image_size, image_size), Image.BILINEAR))


class FileItems(torch.utils.data.Dataset):
    """``(image, label)`` from image files, decoded at every access (see the module docstring).

    ``train`` picks the random training transforms, otherwise the evaluation ones.
    """

    def __init__(self, files: Sequence[Path], labels: Sequence[int], image_size: int, *,
                 train: bool, grayscale: bool = False, flip: bool = True, pad: int = 4):
        self.files = [Path(f) for f in files]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)  # read without decoding
        self.image_size, self.train, self.grayscale = int(image_size), bool(train), bool(grayscale)
        self.flip, self.pad = bool(flip), int(pad)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        path = self.files[index]
        size = self.image_size
        if not self.train:
            return read_eval_image(path, size, grayscale=self.grayscale, resize=resize_mode(size)), \
                int(self.labels[index])
        try:
            img = _open(path, self.grayscale)
        except Exception as err:  # noqa: BLE001 - not an image, truncated, unreadable: one line
            raise OSError(f"cannot read image {path} ({type(err).__name__}: {err}); delete or replace "
                          "that file") from None
        if size >= LARGE:
            x = _array(random_resized_crop(img, size))
        else:
            x = pad_crop(_array(img.resize((size, size), Image.BILINEAR)), self.pad)
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, int(self.labels[index])


def streamed_files(files: Sequence[Path], labels: Sequence[int], image_size: int, *, grayscale: bool,
                   flip: bool, pad: int, settings, what: str, augment: bool = True):
    """A :class:`~refilled.data.streaming.StreamedImages` view of image files: training reads
    take the random transforms (unless ``augment`` is off), evaluation reads the deterministic
    ones."""
    from refilled.data.streaming import StreamedImages

    kw = dict(grayscale=grayscale, flip=flip, pad=pad)
    train = FileItems(files, labels, image_size, train=augment, **kw)
    evaluate = FileItems(files, labels, image_size, train=False, **kw)
    return StreamedImages(train, evaluate, item_shape=(1 if grayscale else 3, image_size, image_size),
                          dtype=torch.uint8, settings=settings, fingerprint=files_fingerprint(files),
                          what=what)
