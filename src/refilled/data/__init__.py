"""Data layer: dataset readers, class/split selection and an in-memory batch loader."""

from refilled.data.common import ImageSet, Split
from refilled.data.inputs import as_split, check_data
from refilled.data.datasets import (
    load_cifar100,
    load_cub200,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
)
from refilled.data.formats import DATASET_INFO, DATASET_NAMES, FORMATS, DatasetFormat, load_dataset, load_images
from refilled.data.glyphs import GlyphSet, load_glyphs
from refilled.data.loader import Augment, ClassBalancedSampler, TensorLoader, augment_batch, epoch_generator
from refilled.data.splits import cap_per_class, class_order, class_window, select_classes, stratified_split

__all__ = [
    "DATASET_INFO",
    "DATASET_NAMES",
    "DatasetFormat",
    "FORMATS",
    "load_images",
    "ImageSet",
    "Split",
    "as_split",
    "check_data",
    "load_cifar100",
    "load_cub200",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "GlyphSet",
    "load_glyphs",
    "load_image_folder",
    "Augment",
    "ClassBalancedSampler",
    "TensorLoader",
    "augment_batch",
    "epoch_generator",
    "cap_per_class",
    "class_order",
    "class_window",
    "select_classes",
    "stratified_split",
]
