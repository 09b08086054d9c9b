"""``glyphs``: a many-class dataset of character glyphs rendered from Debian's font packages.

One class per character, one image per (character, font) whose font really holds the
character; classes are grouped into scripts so that teacher and student can take disjoint
alphabets (like Omniglot). Nothing is downloaded: the fonts come from the Debian packages

=====================  ===========================  ==========================================
package                folder (under /usr/share/fonts) licence (/usr/share/doc/<pkg>/copyright)
=====================  ===========================  ==========================================
fonts-dejavu-core      truetype/dejavu              Bitstream Vera licence; DejaVu changes
                                                    public domain
fonts-freefont-ttf     truetype/freefont            GPL-3+ with the FreeFont font exception
fonts-liberation2      truetype/liberation2         SIL OFL 1.1
fonts-urw-base35       opentype/urw-base35          AGPL-3 with font exception
fonts-noto-core        truetype/noto                SIL OFL 1.1
=====================  ===========================  ==========================================

(``sudo apt-get install -y fonts-dejavu-core fonts-freefont-ttf fonts-liberation2
fonts-urw-base35 fonts-noto-core``); a missing one is a
:class:`~refilled.errors.DatasetNotFoundError` naming it. Every ``.ttf`` / ``.otf`` file of
those folders is used except the two symbol-encoded URW fonts (:data:`SYMBOL_FONTS`: their
cmaps map ASCII letters to dingbats and Greek). Other Noto packages that install into
``truetype/noto`` add fonts and change the dataset; the cache key follows the file list.

Rendering (deterministic, Pillow's BASIC layout, so Arabic letters come out in their isolated
form): each font is scaled so that its ascent + descent fills 90% of the canvas height, the
glyph is drawn at 4x on a fixed baseline, centred horizontally on its ink, and box-downsampled
to ``image_size`` (32) grey levels, white ink on black. Keeping the font's own scale keeps o / O,
c / C, comma / apostrophe and hyphen / underscore apart. A glyph wider or taller than the canvas
is shrunk to fit. A (character, font) is used only if the font's cmap maps the character to a
real glyph (not ``.notdef``) that renders some ink and does not equal the font's rendered
``.notdef`` box.

Look-alikes. No two classes may share a glyph:

1. a hand list (:data:`HOMOGLYPHS`) drops the Greek and Cyrillic letters that are drawn like a
   Latin letter (Greek Alpha, Cyrillic A, omicron, Cyrillic o, ...), and a character whose NFKC
   form is another class is dropped (MICRO SIGN = Greek mu);
2. then, in every font, two classes whose renders differ nowhere by more than :data:`SAME_TOL`
   (0.25 of the grey range, at the final resolution) *collide* in that font. A pair that collides in at
   least :data:`CLASS_COLLISION_SHARE` of the fonts holding both drops the later class (class
   order below: the earlier script wins, e.g. digit 0 over Latin O if they collided);
3. any remaining collision drops only that font's image of the later class;
4. classes left with fewer than ``min_fonts`` (default 8) fonts are dropped.

Class order (``data.teacher_classes`` / ``data.student_offset`` windows take consecutive
classes): scripts in the order of :data:`SCRIPTS`, characters in code-point order inside each.
The classes of each script are in ``GlyphSet.class_groups`` (script -> class ids) and
``GlyphSet.class_scripts``. Counts for the packages installed here are recorded in
``benchmarks/glyphs_dataset.md``.

Split: per class, a fixed seeded permutation of its fonts; the last ``round(25%)`` (at least one)
are the test images, the others the training images (validation is carved from train by the
protocol). The full rendered set is cached once under ``root`` (default
``~/.cache/refilled/glyphs``) with an atomic write.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from refilled.data.common import ImageSet, _check_split
from refilled.errors import DatasetNotFoundError

__all__ = ["GlyphSet", "load_glyphs", "render_glyph", "font_files", "SCRIPTS", "FONT_PACKAGES"]

FONT_DIR = "/usr/share/fonts"
FONT_PACKAGES: dict[str, str] = {
    "fonts-dejavu-core": "truetype/dejavu",
    "fonts-freefont-ttf": "truetype/freefont",
    "fonts-liberation2": "truetype/liberation2",
    "fonts-urw-base35": "opentype/urw-base35",
    "fonts-noto-core": "truetype/noto",
}
# Fonts with a legacy symbol encoding: their cmap maps ASCII letters to dingbats / Greek.
SYMBOL_FONTS = frozenset({"D050000L.otf", "StandardSymbolsPS.otf"})
CACHE_DIR = "~/.cache/refilled/glyphs"
CACHE_VERSION = 1  # bump when rendering or selection changes


def _span(first: int, last: int, skip: tuple[int, ...] = ()) -> str:
    return "".join(chr(c) for c in range(first, last + 1) if c not in skip)


# Scripts in class order. Latin-1 and ASCII symbols come last: they are the most font-dependent.
SCRIPTS: tuple[tuple[str, str], ...] = (
    ("digits", _span(0x30, 0x39)),
    ("latin_upper", _span(0x41, 0x5A)),
    ("latin_lower", _span(0x61, 0x7A)),
    ("greek_upper", _span(0x391, 0x3A9, skip=(0x3A2,))),
    ("greek_lower", _span(0x3B1, 0x3C9)),
    ("cyrillic_upper", _span(0x410, 0x42F)),
    ("cyrillic_lower", _span(0x430, 0x44F)),
    ("armenian_upper", _span(0x531, 0x556)),
    ("armenian_lower", _span(0x561, 0x586)),
    ("georgian", _span(0x10D0, 0x10F0)),
    ("hebrew", _span(0x5D0, 0x5EA)),
    ("arabic", _span(0x621, 0x63A) + _span(0x641, 0x64A)),
    ("devanagari", _span(0x905, 0x914) + _span(0x915, 0x939)),
    ("thai", _span(0xE01, 0xE2E)),
    ("symbols", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" + "¡¢£¤¥¦§©«¬®°±µ¶·¿×÷€"),
)

# Letters drawn like a Latin letter (or like each other) in most fonts: dropped by hand.
HOMOGLYPHS = frozenset(
    "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ"  # Greek capitals = Latin A B E Z H I K M N O P T Y X
    "ο"  # omicron = Latin o
    "АВЕКМНОРСТХ"  # Cyrillic capitals = Latin A B E K M H O P C T X
    "аеорсух"  # Cyrillic small = Latin a e o p c y x
)
SAME_TOL = 0.25  # two renders of one font are one glyph if no pixel differs by more than this
CLASS_COLLISION_SHARE = 0.25  # collide in this share of the common fonts -> drop the later class
MIN_FONTS = 8
SCALE = 4  # supersampling factor


@dataclass
class GlyphSet(ImageSet):
    """An :class:`ImageSet` whose classes belong to scripts; ``fonts[i]`` is image i's font file."""

    class_scripts: list[str] = field(default_factory=list)  # script of each class
    fonts: list[str] = field(default_factory=list)  # font file name of each image

    @property
    def class_groups(self) -> dict[str, list[int]]:
        """Script -> its class ids (consecutive, in class order)."""
        groups: dict[str, list[int]] = {}
        for c, script in enumerate(self.class_scripts):
            groups.setdefault(script, []).append(c)
        return groups


# ----------------------------------------------------------------------------- fonts


def _install_hint(packages) -> str:
    return f"install them with `sudo apt-get install -y {' '.join(packages)}`"


def font_files(font_dir=None) -> list[Path]:
    """Every .ttf / .otf file of the five font packages, sorted; refuses a missing package."""
    base = Path(font_dir or FONT_DIR)
    missing, files = [], []
    for package, folder in FONT_PACKAGES.items():
        found = sorted(p for p in (base / folder).glob("*") if p.suffix.lower() in (".ttf", ".otf"))
        if not found:
            missing.append(package)
        files += [p for p in found if p.name not in SYMBOL_FONTS]
    if missing:
        looked = ", ".join(str(base / FONT_PACKAGES[p]) for p in missing)
        raise DatasetNotFoundError(
            f"glyphs: font package(s) {', '.join(missing)} not installed (no .ttf/.otf in {looked}); "
            f"{_install_hint(missing)}"
        )
    return files


def _cmap(path: Path) -> dict[int, str]:
    from fontTools.ttLib import TTFont  # a dependency of matplotlib

    try:
        with TTFont(path, lazy=True) as font:
            return dict(font.getBestCmap() or {})
    except Exception as e:  # noqa: BLE001 - any unreadable font file is reported the same way
        raise DatasetNotFoundError(f"glyphs: cannot read font {path}: {type(e).__name__}: {e}") from e


def _load_font(path: Path, size: int):
    """The font at the pixel size where its ascent + descent fill 90% of ``size * SCALE``."""
    from PIL import ImageFont

    basic = ImageFont.Layout.BASIC
    ref = 200
    ascent, descent = ImageFont.truetype(str(path), ref, layout_engine=basic).getmetrics()
    em = max(1, round(ref * 0.9 * size * SCALE / max(1, ascent + descent)))
    return ImageFont.truetype(str(path), em, layout_engine=basic)


def render_glyph(font, char: str, size: int = 32) -> np.ndarray | None:
    """``char`` in ``font`` (from :func:`_load_font`) as a uint8 (size, size) image; None if no ink."""
    from PIL import Image, ImageDraw

    s = size * SCALE
    ascent, descent = font.getmetrics()
    baseline = (s - ascent - descent) // 2 + ascent  # row of the baseline inside the canvas
    canvas = Image.new("L", (5 * s, 5 * s), 0)  # the nominal canvas is the middle square
    ImageDraw.Draw(canvas).text((2 * s, 2 * s + baseline), char, font=font, fill=255, anchor="ls")
    ink = canvas.getbbox()
    if ink is None:
        return None
    x0, y0, x1, y1 = ink
    left = (x0 + x1) // 2 - s // 2
    box = (left, 2 * s, left + s, 3 * s)  # nominal rows, centred on the ink horizontally
    if x0 < box[0] or y0 < box[1] or x1 > box[2] or y1 > box[3]:  # too big: a square holding both
        u0, v0, u1, v1 = min(x0, box[0]), min(y0, box[1]), max(x1, box[2]), max(y1, box[3])
        side = max(u1 - u0, v1 - v0)
        cx, cy = (u0 + u1) // 2, (v0 + v1) // 2
        box = (cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side)
    out = canvas.crop(box).resize((size, size), Image.BOX)
    return np.asarray(out, dtype=np.uint8)


# ----------------------------------------------------------------------------- building


def candidates() -> list[tuple[str, str]]:
    """(character, script) of every candidate class, in class order, before the font checks:
    :data:`SCRIPTS` less :data:`HOMOGLYPHS` and less the characters whose NFKC form is another
    candidate (MICRO SIGN = Greek mu)."""
    chars = [(ch, script) for script, text in SCRIPTS for ch in text if ch not in HOMOGLYPHS]
    present = {ch for ch, _ in chars}
    return [(ch, s) for ch, s in chars
            if unicodedata.normalize("NFKC", ch) == ch or unicodedata.normalize("NFKC", ch) not in present]


def _render_all(files: list[Path], size: int):
    """Renders of every (class, font) the font covers: images, class ids, font ids."""
    chars = candidates()
    images, classes, fonts = [], [], []
    for f, path in enumerate(files):
        cmap = _cmap(path)
        covered = [c for c, (ch, _) in enumerate(chars) if cmap.get(ord(ch), ".notdef") != ".notdef"]
        if not covered:
            continue
        font = _load_font(path, size)
        notdef_cp = next(cp for cp in range(0xE000, 0xF900) if cp not in cmap)  # private use
        notdef = render_glyph(font, chr(notdef_cp), size)
        for c in covered:
            img = render_glyph(font, chars[c][0], size)
            if img is None or (notdef is not None and np.array_equal(img, notdef)):
                continue
            images.append(img)
            classes.append(c)
            fonts.append(f)
    return chars, np.stack(images), np.array(classes), np.array(fonts)


def _collisions(images: np.ndarray, classes: np.ndarray, fonts: np.ndarray):
    """(image i, image j) pairs of one font, classes i < j, whose renders are one glyph: no pixel
    differs by more than :data:`SAME_TOL` of the grey range."""
    pairs = []
    x = torch.from_numpy(images.reshape(len(images), -1)).to(torch.int16)
    tol = int(SAME_TOL * 255)
    for f in np.unique(fonts):
        idx = np.flatnonzero(fonts == f)
        xf = x[idx]
        for start in range(0, len(idx), 64):  # chunks keep the (rows, n, pixels) tensor small
            same = (xf[start : start + 64, None] - xf[None]).abs().amax(-1) <= tol
            a, b = torch.nonzero(same, as_tuple=True)
            a = a + start
            for i, j in zip(idx[a[a < b].numpy()], idx[b[a < b].numpy()]):
                pairs.append((i, j) if classes[i] < classes[j] else (j, i))
    return pairs


def _select(chars, images, classes, fonts, min_fonts: int):
    """Apply rules 2-4 of the module docstring; return the kept images and the new class ids."""
    pairs = _collisions(images, classes, fonts)
    font_sets = [set(fonts[classes == c].tolist()) for c in range(len(chars))]
    counts: dict[tuple[int, int], int] = {}
    for i, j in pairs:
        key = (int(classes[i]), int(classes[j]))
        counts[key] = counts.get(key, 0) + 1
    dropped_classes = {
        b for (a, b), n in counts.items() if n >= CLASS_COLLISION_SHARE * len(font_sets[a] & font_sets[b])
    }
    keep = ~np.isin(classes, list(dropped_classes))
    for i, j in pairs:  # rule 3: a remaining collision costs the later class that font's image
        if classes[i] not in dropped_classes and classes[j] not in dropped_classes:
            keep[j] = False
    n_fonts = np.bincount(classes[keep], minlength=len(chars))
    kept_classes = [c for c in range(len(chars)) if n_fonts[c] >= min_fonts]
    keep &= np.isin(classes, kept_classes)
    remap = np.full(len(chars), -1)
    remap[kept_classes] = np.arange(len(kept_classes))
    return keep, remap, kept_classes, sorted(dropped_classes)


def _cache_key(files: list[Path], size: int, min_fonts: int) -> str:
    import PIL

    h = hashlib.sha1(f"v{CACHE_VERSION}:{size}:{min_fonts}:{PIL.__version__}:{SCRIPTS}".encode())
    h.update(f"{sorted(HOMOGLYPHS)}:{sorted(SYMBOL_FONTS)}:{SAME_TOL}:{CLASS_COLLISION_SHARE}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.parent.name}/{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def build_glyphs(font_dir=None, image_size: int = 32, min_fonts: int = MIN_FONTS) -> dict:
    """Render and select the whole dataset (both splits): the dict that is cached."""
    files = font_files(font_dir)
    chars, images, classes, fonts = _render_all(files, image_size)
    keep, remap, kept, dropped = _select(chars, images, classes, fonts, min_fonts)
    return {
        "images": torch.from_numpy(images[keep]).unsqueeze(1),
        "labels": torch.from_numpy(remap[classes[keep]]).long(),
        "font_ids": torch.from_numpy(fonts[keep]).long(),
        "class_names": [chars[c][0] for c in kept],
        "class_scripts": [chars[c][1] for c in kept],
        "font_names": [p.name for p in files],
        "collision_drops": [chars[c][0] for c in dropped],
    }


def _cached(root, font_dir, image_size: int, min_fonts: int) -> dict:
    cache_dir = Path(root or CACHE_DIR).expanduser()
    files = font_files(font_dir)
    cache = cache_dir / f"glyphs_{image_size}px_{_cache_key(files, image_size, min_fonts)}.pt"
    if cache.is_file():
        try:
            return torch.load(cache, weights_only=True)
        except Exception:  # noqa: BLE001 - unreadable cache: rebuild it below
            pass
    data = build_glyphs(font_dir, image_size, min_fonts)
    try:  # atomic: a crash never leaves a half-written cache
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
        os.replace(tmp, cache)
    except OSError:  # read-only cache folder: work without a cache
        pass
    return data


def split_mask(labels: torch.Tensor, seed: int = 0, test_fraction: float = 0.25) -> torch.Tensor:
    """True for the test images: per class, ``max(1, round(test_fraction * n))`` of its n fonts,
    chosen by one seeded permutation (a fixed split for a given seed)."""
    gen = torch.Generator().manual_seed(seed)
    rank = torch.empty(len(labels), dtype=torch.long)
    order = torch.randperm(len(labels), generator=gen)
    order = order[torch.sort(labels[order], stable=True).indices]  # grouped by class, random inside
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank[order] = torch.arange(len(labels)) - starts[labels[order]]
    n_test = (counts.double() * test_fraction).round().long().clamp(min=1)
    return rank < n_test[labels]


def load_glyphs(root=None, split: str = "train", image_size: int = 32, seed: int = 0,
                test_fraction: float = 0.25, min_fonts: int = MIN_FONTS, font_dir=None) -> GlyphSet:
    """The glyph dataset's ``split``; ``root`` is the cache folder (default ~/.cache/refilled/glyphs)."""
    _check_split(split)
    d = _cached(root, font_dir, image_size, min_fonts)
    test = split_mask(d["labels"], seed, test_fraction)
    idx = torch.nonzero(test if split == "test" else ~test).flatten()
    return GlyphSet(
        images=d["images"][idx],
        labels=d["labels"][idx],
        class_names=list(d["class_names"]),
        name="glyphs",
        class_scripts=list(d["class_scripts"]),
        fonts=[d["font_names"][int(f)] for f in d["font_ids"][idx]],
    )

