"""The glyphs dataset (rendered from Debian's font packages) and the controls of issue 8."""

from pathlib import Path

import numpy as np
import pytest
import torch

from refilled.config import make_config
from refilled.data import glyphs
from refilled.data.splits import class_window
from refilled.errors import DatasetNotFoundError
from tiny import run_cli


def _fonts_installed() -> bool:
    try:
        glyphs.font_files()
    except DatasetNotFoundError:
        return False
    return True


needs_fonts = pytest.mark.skipif(
    not _fonts_installed(),
    reason="font packages not installed (sudo apt-get install -y " + " ".join(glyphs.FONT_PACKAGES) + ")",
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("glyphs-cache")


@pytest.fixture(scope="module")
def train_set(cache_dir):
    return glyphs.load_glyphs(cache_dir, "train")


@pytest.fixture(scope="module")
def test_set(cache_dir, train_set):
    return glyphs.load_glyphs(cache_dir, "test")


# ------------------------------------------------------------------ fonts and rendering


def test_missing_font_package_names_it_and_the_apt_command(tmp_path):
    for package, folder in glyphs.FONT_PACKAGES.items():
        if package != "fonts-noto-core":
            (tmp_path / folder).mkdir(parents=True)
            (tmp_path / folder / "Fake.ttf").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError) as err:
        glyphs.font_files(tmp_path)
    msg = str(err.value)
    assert "fonts-noto-core" in msg and "apt-get install -y fonts-noto-core" in msg
    assert "fonts-dejavu-core" not in msg
    with pytest.raises(DatasetNotFoundError, match="fonts-dejavu-core.*fonts-noto-core"):
        glyphs.load_glyphs(tmp_path / "cache", font_dir=tmp_path / "empty")


@needs_fonts
def test_rendering_is_deterministic_and_centred():
    path = next(p for p in glyphs.font_files() if p.name == "DejaVuSans.ttf")
    first = glyphs.render_glyph(glyphs._load_font(path, 32), "R")
    again = glyphs.render_glyph(glyphs._load_font(path, 32), "R")
    assert first.dtype == np.uint8 and first.shape == (32, 32)
    assert first.tobytes() == again.tobytes() and first.max() > 200
    cols = np.nonzero(first.sum(0))[0]
    assert abs((cols[0] + cols[-1]) / 2 - 15.5) <= 1  # centred on the ink horizontally
    # the font's own scale is kept: lower-case o is smaller than capital O
    font = glyphs._load_font(path, 32)
    assert glyphs.render_glyph(font, "o").sum() < glyphs.render_glyph(font, "O").sum()
    assert glyphs.render_glyph(font, " ") is None  # no ink


def test_split_mask_keeps_a_test_image_per_class_and_is_seeded():
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 2)
    mask = glyphs.split_mask(labels, seed=3)
    assert torch.bincount(labels[mask]).tolist() == [2, 1, 1]
    assert torch.equal(mask, glyphs.split_mask(labels, seed=3))


# ------------------------------------------------------------------ the rendered set


@needs_fonts
def test_cache_is_written_once_and_used_on_the_second_load(cache_dir, train_set, monkeypatch):
    files = list(Path(cache_dir).glob("glyphs_32px_*.pt"))
    assert len(files) == 1 and not list(Path(cache_dir).glob("*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("rendered again although the cache exists")

    monkeypatch.setattr(glyphs, "build_glyphs", fail)
    again = glyphs.load_glyphs(cache_dir, "train")
    assert torch.equal(again.images, train_set.images) and torch.equal(again.labels, train_set.labels)


@needs_fonts
def test_images_labels_and_split(train_set, test_set):
    for s in (train_set, test_set):
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (1, 32, 32)
        assert s.name == "glyphs" and len(s.fonts) == len(s)
    assert train_set.class_names == test_set.class_names
    n = train_set.num_classes
    train_counts = torch.bincount(train_set.labels, minlength=n)
    test_counts = torch.bincount(test_set.labels, minlength=n)
    assert int(test_counts.min()) >= 1
    assert int((train_counts + test_counts).min()) >= glyphs.MIN_FONTS
    assert len(set(train_set.class_names)) == n  # one class per character
    # each (character, font) appears once, in one split
    pairs = set(zip(train_set.labels.tolist(), train_set.fonts))
    assert len(pairs) == len(train_set)
    assert not pairs & set(zip(test_set.labels.tolist(), test_set.fonts))


@needs_fonts
def test_no_two_classes_share_a_glyph_in_any_font(train_set, test_set):
    images = torch.cat([train_set.images, test_set.images]).flatten(1)
    labels = torch.cat([train_set.labels, test_set.labels])
    fonts = train_set.fonts + test_set.fonts
    seen: dict[tuple[str, bytes], int] = {}
    for img, label, font in zip(images, labels.tolist(), fonts):
        key = (font, img.numpy().tobytes())
        assert seen.setdefault(key, label) == label, f"{font}: two classes render identically"
    for ch in ("Α", "А", "ο", "о", "µ"):  # hand-listed look-alikes and NFKC twins are gone
        assert ch not in train_set.class_names


@needs_fonts
def test_scripts_are_grouped_and_windows_can_be_disjoint_alphabets(train_set):
    groups = train_set.class_groups
    assert list(groups)[:3] == ["digits", "latin_upper", "latin_lower"]
    assert {"greek_lower", "cyrillic_lower", "hebrew", "arabic"} <= set(groups)
    start = 0
    for script, ids in groups.items():  # consecutive blocks in class order
        assert ids == list(range(start, start + len(ids))), script
        start += len(ids)
    assert start == train_set.num_classes
    # a teacher window on digits + Latin, a student window on Greek: disjoint alphabets
    n_t = len(groups["digits"]) + len(groups["latin_upper"]) + len(groups["latin_lower"])
    order = list(range(train_set.num_classes))
    teacher = class_window(order, n_t, 0)
    student = class_window(order, len(groups["greek_lower"]), groups["greek_lower"][0])
    assert not set(teacher) & set(student)
    assert {train_set.class_scripts[c] for c in student} == {"greek_lower"}


# ------------------------------------------------------------------ controls, end to end


def test_teacher_ncm_reference_trains_nothing(config_file, capsys, tmp_path):
    code, res, err = run_cli(capsys, "run", config_file, "method=teacher_ncm")
    assert code == 0, err
    assert res["method"] == "teacher_ncm" and res["stage1_ncm_accuracy"] is None
    assert 0.0 <= res["test_accuracy"] <= 1.0 and 0.0 <= res["val_accuracy"] <= 1.0
    assert res["teacher_test_accuracy"] is not None
    run_dir = Path(res["run_dir"])
    assert not list(run_dir.glob("*.ckpt"))  # no stage ran
    metrics = run_dir / "metrics.csv"
    assert not metrics.exists() or len(metrics.read_text().splitlines()) <= 1


def test_random_teacher_ablation(config_file, capsys):
    cfg = make_config({"ablation": "random_teacher"})
    assert cfg.method == "refilled" and cfg.teacher.init == "random"
    code, res, err = run_cli(capsys, "run", config_file, "ablation=random_teacher")
    assert code == 0, err
    assert res["teacher"] == "random" and res["teacher_init"] == "random"
    assert 0.0 <= res["test_accuracy"] <= 1.0 and res["stage1_ncm_accuracy"] is not None
    assert "-randteacher" in Path(res["run_dir"]).name
