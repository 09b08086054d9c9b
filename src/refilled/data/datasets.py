"""Dataset readers. Every reader returns an :class:`ImageSet` of uint8 images (N x C x H x W).

Readers never download anything unless asked (only CIFAR-100 can); a missing or malformed
dataset raises :class:`~refilled.errors.DatasetNotFoundError` naming the paths looked at and
how to get the data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from refilled.data.common import ImageSet, _check_split
from refilled.errors import ConfigError, DatasetNotFoundError
from refilled.files import atomic_torch_save

__all__ = [
    "ImageSet",
    "load_fashion_mnist",
    "load_digits",
    "load_cifar100",
    "load_cub200",
    "load_image_folder",
    "list_cub200",
    "list_image_folder",
]


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def _need_root(root, dataset: str, how: str) -> Path:
    if root is None:
        raise DatasetNotFoundError(f"{dataset}: no dataset root given; set data.root=PATH. {how}")
    return Path(root).expanduser()


# ----------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Read an idx file of unsigned bytes (magic 0x0000 08 <ndim>), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # includes gzip.BadGzipFile and truncated gzip streams
        raise DatasetNotFoundError(f"could not read idx file {path}: {e}") from e
    header = 4 + 4 * ndim
    if len(data) < 4 or data[:4] != bytes((0, 0, 0x08, ndim)):
        raise DatasetNotFoundError(
            f"malformed idx file {path}: bad magic number {data[:4].hex() or '(empty)'}, "
            f"expected 000008{ndim:02x} (unsigned-byte, {ndim}-d)"
        )
    if len(data) < header:
        raise DatasetNotFoundError(f"malformed idx file {path}: truncated header")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    if len(data) != header + int(np.prod(dims)):
        raise DatasetNotFoundError(
            f"malformed idx file {path}: dims {dims} need {int(np.prod(dims))} bytes of data, "
            f"found {len(data) - header} (truncated or corrupt file)"
        )
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy())


def load_fashion_mnist(root=None, split: str = "train") -> ImageSet:
    """Official Fashion-MNIST idx files (``train-images-idx3-ubyte[.gz]`` ...) under ``root``."""
    _check_split(split)
    root = Path(root or FASHION_MNIST_ROOT).expanduser()
    prefix = "train" if split == "train" else "t10k"
    found = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        candidates = [root / stem, root / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DatasetNotFoundError(
                f"Fashion-MNIST {split} split not found: looked for {candidates[0]} and {candidates[1]}. "
                "Install it with `sudo apt-get install dataset-fashion-mnist` (files go to "
                f"{FASHION_MNIST_ROOT}) or point data.root=... at a folder holding the official idx files."
            )
        found.append(path)
    images, labels = _read_idx(found[0], 3), _read_idx(found[1], 1)
    if images.shape[0] != labels.shape[0]:
        raise DatasetNotFoundError(
            f"Fashion-MNIST files disagree: {found[0]} has {images.shape[0]} images, "
            f"{found[1]} has {labels.shape[0]} labels"
        )
    if labels.numel() and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DatasetNotFoundError(f"malformed label file {found[1]}: label {int(labels.max())} > 9")
    return ImageSet(images.unsqueeze(1), labels.long(), list(FASHION_MNIST_CLASSES), "fashion_mnist")


# ----------------------------------------------------------------------------- digits


def load_digits(split: str = "train", seed: int = 0, test_fraction: float = 0.25) -> ImageSet:
    """scikit-learn's bundled 8x8 digits with a fixed, seeded, stratified train/test split."""
    _check_split(split)
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    d = sk_load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    train_idx, test_idx = train_test_split(
        np.arange(len(d.target)), test_size=test_fraction, stratify=d.target, random_state=seed
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    return ImageSet(
        torch.from_numpy(images[idx]).unsqueeze(1),
        torch.from_numpy(d.target[idx]).long(),
        [str(i) for i in range(10)],
        "digits",
    )


# ----------------------------------------------------------------------------- CIFAR-100


# The only globals the official CIFAR-100 pickles (and re-pickled copies of them) need: numpy
# arrays and Python 3's spelling of bytes. Nothing else is ever looked up, so nothing runs.
_CIFAR_GLOBALS = {
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        import warnings

        with warnings.catch_warnings():  # numpy 2 warns about the numpy.core spelling
            warnings.simplefilter("ignore")
            return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """A CIFAR-100 python pickle (dicts, lists, bytes, numpy arrays) without running any code."""
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("refused global"):
            raise DatasetNotFoundError(
                f"CIFAR-100 file {path} holds Python objects other than arrays and lists "
                f"({str(e).removeprefix('refused global ')}); refilled never runs code from a file: "
                "use the official cifar-100-python files"
            ) from None
        raise DatasetNotFoundError(f"malformed CIFAR-100 file {path}: {' '.join(str(e).split())[:160]}") from None
    except Exception as e:  # noqa: BLE001 - any other unpickling failure means a corrupt file
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        raise DatasetNotFoundError(f"malformed CIFAR-100 file {path}: {reason}") from None
    if not isinstance(data, dict):
        raise DatasetNotFoundError(f"malformed CIFAR-100 file {path}: holds a {type(data).__name__}, not a dict")
    return data


def _download_cifar100(parent: Path) -> None:
    """Download the official archive into ``parent``, check its md5 and extract it there."""
    parent.mkdir(parents=True, exist_ok=True)
    archive = parent / "cifar-100-python.tar.gz.part"
    md5 = hashlib.md5()
    try:
        with urllib.request.urlopen(CIFAR100_URL, timeout=60) as resp, open(archive, "wb") as out:
            while chunk := resp.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
    except OSError as e:
        archive.unlink(missing_ok=True)
        raise DatasetNotFoundError(f"downloading {CIFAR100_URL} failed: {e}") from e
    if md5.hexdigest() != CIFAR100_MD5:
        archive.unlink(missing_ok=True)
        raise DatasetNotFoundError(
            f"download of {CIFAR100_URL} is corrupt: md5 {md5.hexdigest()} != {CIFAR100_MD5}"
        )
    # Extract into a temporary folder next to the target, then move the result into place,
    # so an interrupted extraction never leaves a half-filled cifar-100-python/.
    with tempfile.TemporaryDirectory(dir=parent) as tmp, tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if not (member.isfile() or member.isdir()) or not member.name.startswith("cifar-100-python"):
                raise DatasetNotFoundError(f"unexpected member {member.name!r} in {CIFAR100_URL}")
            if ".." in Path(member.name).parts:
                raise DatasetNotFoundError(f"unsafe path {member.name!r} in {CIFAR100_URL}")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.12 (and patched older releases)
            tar.extractall(tmp, filter="data")
        else:
            tar.extractall(tmp)
        target = parent / "cifar-100-python"
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(tmp) / "cifar-100-python", target)
    archive.unlink()


def load_cifar100(root, split: str = "train", download: bool = False) -> ImageSet:
    """Official python-pickle CIFAR-100 (``cifar-100-python/{train,test,meta}``), fine labels.

    ``root`` may be the ``cifar-100-python`` folder or its parent.
    """
    _check_split(split)
    how = (
        f"Download and extract {CIFAR100_URL} (or pass download=True) and point data.root=... "
        "at the cifar-100-python folder or its parent."
    )
    root = _need_root(root, "CIFAR-100", how)
    candidates = [root, root / "cifar-100-python"]
    folder = next((c for c in candidates if (c / split).is_file() and (c / "meta").is_file()), None)
    if folder is None and download:
        parent = root.parent if root.name == "cifar-100-python" else root
        _download_cifar100(parent)
        folder = parent / "cifar-100-python"
    if folder is None:
        looked = ", ".join(str(c / f) for c in candidates for f in (split, "meta"))
        raise DatasetNotFoundError(f"CIFAR-100 {split} split not found: looked for {looked}. {how}")

    data, meta = _unpickle(folder / split), _unpickle(folder / "meta")
    try:
        pixels = np.asarray(data[b"data"], dtype=np.uint8)
        labels = np.asarray(data[b"fine_labels"], dtype=np.int64)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"fine_label_names"]]
        images = pixels.reshape(-1, 3, 32, 32)  # rows are R, G, B planes of 32 x 32, row-major
    except (KeyError, ValueError, TypeError) as e:
        raise DatasetNotFoundError(f"malformed CIFAR-100 files in {folder}: {type(e).__name__}: {e}") from e
    if len(images) != len(labels):
        raise DatasetNotFoundError(
            f"malformed CIFAR-100 file {folder / split}: {len(images)} images but {len(labels)} labels"
        )
    return ImageSet(torch.from_numpy(images.copy()), torch.from_numpy(labels), names, "cifar100")


# ----------------------------------------------------------------------------- CUB-200-2011


def _read_table(path: Path) -> list[tuple[str, str]]:
    """Rows ``<id> <value>`` of a CUB metadata file."""
    rows = []
    try:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    raise DatasetNotFoundError(f"malformed CUB file {path}, line {n}: {line!r}")
                rows.append((parts[0], parts[1].strip()))
    except OSError as e:
        raise DatasetNotFoundError(f"could not read CUB file {path}: {e}") from e
    return rows


def _load_image(path: Path, size: int, grayscale: bool = False) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if grayscale else "RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - not an image, truncated, too large, unreadable: all one line
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        raise DatasetNotFoundError(f"could not read image {path} ({reason}); delete or replace that file") from None
    return arr[None] if grayscale else arr.transpose(2, 0, 1)


_CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
_CUB_HOW = ("Download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/, "
            "extract it and point data.root=... at the CUB_200_2011 folder or its parent.")


def _cub_base(root) -> Path:
    root = _need_root(root, "CUB-200-2011", _CUB_HOW)
    candidates = [root, root / "CUB_200_2011"]
    base = next((c for c in candidates if all((c / f).is_file() for f in _CUB_FILES)), None)
    if base is None:
        looked = ", ".join(str(c / f) for c in candidates for f in _CUB_FILES)
        raise DatasetNotFoundError(f"CUB-200-2011 not found: looked for {looked}. {_CUB_HOW}")
    return base


def _cub_files(base: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    paths = dict(_read_table(base / "images.txt"))
    try:
        class_of = {i: int(c) - 1 for i, c in _read_table(base / "image_class_labels.txt")}  # 1-based
        is_train = {i: int(t) == 1 for i, t in _read_table(base / "train_test_split.txt")}
        classes = sorted((int(i), name) for i, name in _read_table(base / "classes.txt"))
    except ValueError as e:
        raise DatasetNotFoundError(f"malformed CUB metadata in {base}: {e}") from e
    class_names = [name for _, name in classes]
    try:
        ids = [i for i in paths if is_train[i] == (split == "train")]
        labels = [class_of[i] for i in ids]
    except KeyError as e:
        raise DatasetNotFoundError(f"CUB metadata in {base} disagree: image id {e} missing") from e
    return [base / "images" / paths[i] for i in ids], labels, class_names


def list_cub200(root, split: str = "train") -> tuple[list[Path], list[int], list[str]]:
    """The files, labels and class names of CUB-200-2011's ``split``, without reading any image."""
    _check_split(split)
    return _cub_files(_cub_base(root), split)


def load_cub200(root, split: str = "train", image_size: int = 84, cache_dir=None) -> ImageSet:
    """Official CUB_200_2011 layout, images resized to ``image_size`` and cached as a ``.pt`` file.

    ``root`` may be the ``CUB_200_2011`` folder or its parent. The cache (default
    ``<CUB_200_2011>/.refilled_cache/``) is keyed by the metadata files, the split and the size.
    """
    _check_split(split)
    base = _cub_base(root)
    key = hashlib.sha1(f"{split}:{image_size}".encode())
    for f in _CUB_FILES:
        key.update((base / f).read_bytes())
    cache_dir = Path(cache_dir) if cache_dir is not None else base / ".refilled_cache"
    cache = cache_dir / f"cub200_{split}_{image_size}px_{key.hexdigest()[:12]}.pt"
    if cache.is_file():
        try:
            d = torch.load(cache, weights_only=True)
            return ImageSet(d["images"], d["labels"], list(d["class_names"]), "cub200")
        except Exception:  # unreadable cache: rebuild it below
            pass

    files, labels, class_names = _cub_files(base, split)
    labels = torch.tensor(labels, dtype=torch.int64)
    out = ImageSet(_decode_all(files, image_size), labels, class_names, "cub200")

    # Written atomically, so a crash never leaves a half-written cache (nor a temporary file).
    try:
        atomic_torch_save({"images": out.images, "labels": out.labels, "class_names": class_names}, cache)
    except OSError:  # read-only dataset folder: work without a cache
        pass
    return out


# ----------------------------------------------------------------------------- image folder


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _carve_test(files: list[Path], class_dir: Path, fraction: float, seed: int, split: str) -> list[Path]:
    """The ``split`` part of one class's (sorted) files in a flat image folder.

    ``round(fraction * n)`` files, at least 1 and at most n - 1, are the test part, drawn by a
    generator seeded from (``seed``, class folder name): the same files for either split, and a
    class's split does not move when other classes change.
    """
    n = len(files)
    if n < 2:
        raise DatasetNotFoundError(
            f"image folder: class folder {class_dir} holds {n} image{'s' if n != 1 else ''}; without "
            "train/ and test/ folders each class needs at least 2 (one to test, one to train). "
            "Add images or remove that folder"
        )
    n_test = min(max(round(fraction * n), 1), n - 1)
    # (torch's CPU generator keeps 32 bits of a seed: hash seed and name together)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{int(seed)}/{class_dir.name}".encode()))
    is_test = torch.zeros(n, dtype=torch.bool)
    is_test[torch.randperm(n, generator=generator)[:n_test]] = True
    return [f for f, t in zip(files, is_test.tolist()) if t == (split == "test")]


def list_image_folder(root, split=None, test_fraction: float = 0.2, test_seed: int = 0
                      ) -> tuple[list[Path], list[int], list[str]]:
    """The files, labels and class names of an image folder's ``split`` (see
    :func:`load_image_folder`), without reading any image."""
    how = "Point data.root=... at a folder holding one sub-folder of images per class."
    root = _need_root(root, "image folder", how)
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise DatasetNotFoundError(f"image folder: {root} {state}. {how}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"image folder: the test fraction must be in (0, 1), got {test_fraction}")
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    if has_splits:
        split = _check_split(split or "train")
        class_names = sorted(set(_class_dirs(root / "train")) | set(_class_dirs(root / "test")))
        folder = root / split
    else:
        if split is not None:
            _check_split(split)
        folder = root
        class_names = _class_dirs(root)
    if not class_names:
        raise DatasetNotFoundError(f"image folder: no class folders found in {folder}. {how}")
    files, labels = [], []
    for label, name in enumerate(class_names):
        cdir = folder / name
        if not cdir.is_dir():
            continue  # a class of the other split only
        found = _image_files(cdir)
        if not has_splits and split is not None:
            found = _carve_test(found, cdir, test_fraction, test_seed, split)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DatasetNotFoundError(f"image folder: no images found under {folder}. {how}")
    return files, labels, class_names


def load_image_folder(root, split=None, image_size: int = 32, grayscale: bool = False,
                      test_fraction: float = 0.2, test_seed: int = 0) -> ImageSet:
    """Images in one sub-folder per class, in either of two layouts.

    - ``root/{train,test}/<class>/<image>``: ``split`` ("train", the default, or "test") picks
      the folder; the classes of both are merged so that the labels agree between splits.
    - ``root/<class>/<image>`` (flat): the test split is carved from every class, stratified and
      seeded: of a class's ``n`` images (file names sorted), ``round(test_fraction * n)``, at
      least 1 and at most ``n - 1``, are drawn as test images by a generator seeded from
      ``test_seed`` and the class folder's name; the rest are the training images. Every call
      with the same files, fraction and seed gives the same split, so ``split="train"`` and
      ``split="test"`` never share an image. A class folder with fewer than 2 images is an
      error naming it. ``split=None`` gives every image (no test split carved).

    Class names are the sorted folder names (hidden folders are skipped). Images are converted
    to RGB (or grey with ``grayscale``) and resized to ``image_size`` x ``image_size``; a file
    that cannot be read as an image is an error naming it.
    """
    files, labels, class_names = list_image_folder(root, split, test_fraction, test_seed)
    return ImageSet(_decode_all(files, image_size, grayscale), torch.tensor(labels, dtype=torch.int64),
                    class_names, "image_folder")


def _decode_all(files: list[Path], size: int, grayscale: bool = False) -> torch.Tensor:
    """Every file decoded and resized into one preallocated uint8 tensor (no list of arrays to
    stack: the peak memory is the images' own size), with a progress bar on long folders."""
    from tqdm.auto import tqdm

    out = np.empty((len(files), 1 if grayscale else 3, size, size), dtype=np.uint8)
    for i, p in enumerate(tqdm(files, desc="decoding images", leave=False, disable=len(files) < 5000)):
        out[i] = _load_image(p, size, grayscale)
    return torch.from_numpy(out)
