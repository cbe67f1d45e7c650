"""Glyph images rendered from the fonts that ship inside matplotlib: an offline, reproducible class pool.

Classes are characters (Latin, Latin-1, Latin Extended, Greek, Cyrillic, box drawing, a few symbols)
that all 16 fonts cover: DejaVu Sans, Sans Mono and Serif (4 styles each) and STIX General (4 styles).
Characters that look alike (Latin ``A`` and Greek ``Α``, ``o`` and ``O`` once cropped, ``l`` and ``|`` in
most fonts) are merged: two characters whose glyphs, cropped to their ink box and resized to 16x16, differ by
less than ``DEDUP_THRESHOLD`` (mean absolute difference) in at least half of the fonts count as one, and
only the first (in code-point order) is kept.

The kept classes are shuffled once with ``SPLIT_SEED`` and cut in two halves: the first half is the
**sequence pool** (class-incremental tasks, ``ClassIncrementalDataModule(dataset="glyphs")``), the second
half the **pre-training pool** (the backbone of ``datamodules.glyph_backbone``). The halves never share a
class, whatever counts are taken from each.

An image is drawn from its own generator seeded by ``(seed, pool, class, index)``, so it does not depend on
how many classes or images are rendered: random font (16), size (50-80% of the canvas), rotation (+-12 deg),
stroke (extra boldness 0-2 px at 2x resolution), shift (+-8%), grey levels of glyph and background (contrast
at least 0.4, bright glyph on a dark background), a flat or gradient background, and Gaussian pixel noise.
Rendered at twice the output size and downsampled (box filter), as uint8 ``(3, size, size)`` with the grey
image on all three channels (grayscale-as-RGB). Random colours and polarity were tried first: a ViT trained
from scratch on the CPU budget barely learned them (loss 3.36 vs 1.80 for grey after 600 steps, 30 classes),
so colour is left out of the pre-training pool.

Styles (``render_glyph(style=...)``; the pre-training pool is always ``plain``): ``plain`` is the rendering
above; ``inverted`` is its photographic negative (dark glyph on a light background); ``shifted`` is the
continual sequence's default: dark-on-light with a colour tint per image (a light background colour and a
dark glyph colour, each channel drawn separately: background 0.75-1, glyph 0-0.3) and a mild texture (a
sinusoidal grating of random orientation, frequency and phase, amplitude 0.02-0.05). The extra draws come
after the plain ones, so the glyph's shape, position and grey levels are the same in every style. A stronger
tint (background 0.55-1, glyph 0-0.45, texture up to 0.08) left a joint linear probe on the frozen glyph
backbone at 12% (50 classes), too far from the backbone for 3 epochs per task; this one gives 21% (inverted
alone 29%, plain 70%).
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)
#: Unicode ranges searched for characters every font covers.
CHAR_RANGES: tuple[tuple[int, int], ...] = (
    (0x21, 0x7F), (0xA1, 0x180), (0x180, 0x250), (0x391, 0x3CA), (0x410, 0x450), (0x2500, 0x2580),
)
DEDUP_THRESHOLD = 0.08
SPLIT_SEED = 0
Pool = Literal["sequence", "pretrain"]
Style = Literal["plain", "inverted", "shifted"]
STYLES: tuple[str, ...] = ("plain", "inverted", "shifted")
#: ``shifted``: ranges of the background and glyph colour channels and of the texture amplitude
SHIFT_LIGHT, SHIFT_DARK, SHIFT_TEXTURE = (0.75, 1.0), (0.0, 0.3), (0.02, 0.05)
POOL_INDEX = {"sequence": 0, "pretrain": 1}


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder (matplotlib is an adaptlab dependency)."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - matplotlib is in pyproject's dependencies
        raise ImportError("the glyph data set renders matplotlib's bundled fonts: pip install matplotlib") from e
    return Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"


def font_paths() -> list[Path]:
    paths = [font_dir() / f for f in FONT_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"matplotlib's fonts are missing: {missing}")
    return paths


@lru_cache(maxsize=1)
def fonts_digest() -> str:
    """SHA-256 (first 16 hex digits) of the font files: part of every cache key built on glyphs."""
    h = hashlib.sha256()
    for p in font_paths():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def _font(index: int, size: int):  # noqa: ANN202 - PIL type
    from PIL import ImageFont

    return ImageFont.truetype(str(font_paths()[index]), size)


def _covered_chars() -> list[str]:
    from fontTools.ttLib import TTFont

    common: set[int] | None = None
    for p in font_paths():
        cmap = set(TTFont(str(p), lazy=True).getBestCmap())
        common = cmap if common is None else common & cmap
    assert common is not None
    return [chr(c) for lo, hi in CHAR_RANGES for c in range(lo, hi) if c in common and not chr(c).isspace()]


def _normalised_glyph(ch: str, font_index: int, size: int = 48, out: int = 16) -> np.ndarray | None:
    """The glyph cropped to its ink box and resized to ``out x out`` (None when it draws nothing)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (2 * size, 2 * size), 0)
    ImageDraw.Draw(canvas).text((size, size), ch, fill=255, font=_font(font_index, size), anchor="mm")
    box = canvas.getbbox()
    if box is None or (box[2] - box[0]) * (box[3] - box[1]) < 4:
        return None
    return np.asarray(canvas.crop(box).resize((out, out), Image.BILINEAR), dtype=np.float32) / 255.0


@lru_cache(maxsize=1)
def glyph_classes() -> tuple[str, ...]:
    """Every kept class (a character), in code-point order, after merging look-alikes (see module docstring)."""
    n_fonts = len(FONT_FILES)
    kept: list[str] = []
    kept_glyphs: list[np.ndarray] = []  # (n_fonts, 16, 16) each
    for ch in _covered_chars():
        glyphs = [_normalised_glyph(ch, f) for f in range(n_fonts)]
        if any(g is None for g in glyphs):
            continue
        g = np.stack(glyphs)
        if kept_glyphs:
            diff = np.abs(np.stack(kept_glyphs) - g[None]).mean(axis=(2, 3))  # (kept, fonts)
            if ((diff < DEDUP_THRESHOLD).sum(axis=1) * 2 >= n_fonts).any():
                continue
        kept.append(ch)
        kept_glyphs.append(g)
    return tuple(kept)


def class_pools() -> dict[str, tuple[str, ...]]:
    """The kept classes shuffled with ``SPLIT_SEED`` and cut into the disjoint sequence and pre-training halves."""
    classes = glyph_classes()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(classes))
    shuffled = tuple(classes[i] for i in order)
    half = len(shuffled) // 2
    return {"sequence": shuffled[:half], "pretrain": shuffled[half:]}


def pool_classes(pool: Pool, n: int | None = None) -> tuple[str, ...]:
    """The first ``n`` classes of a pool (all of them with ``None``)."""
    if pool not in POOL_INDEX:
        raise ValueError(f"glyph pool must be 'sequence' or 'pretrain', got {pool!r}")
    chars = class_pools()[pool]
    if n is not None and not 0 < n <= len(chars):
        raise ValueError(f"the glyph {pool} pool has {len(chars)} classes; asked for {n}")
    return chars if n is None else chars[:n]


def render_glyph(ch: str, rng: np.random.Generator, size: int = 32, style: Style = "plain") -> np.ndarray:
    """One augmented image of ``ch`` as uint8 ``(3, size, size)``: grey levels repeated on the three channels
    (``plain``), their negative (``inverted``) or tinted and textured dark-on-light (``shifted``; see the module
    docstring)."""
    if style not in STYLES:
        raise ValueError(f"glyph style must be one of {STYLES}, got {style!r}")
    from PIL import Image, ImageDraw

    big = 2 * size
    font_index = int(rng.integers(len(FONT_FILES)))
    font_size = max(4, int(round(big * rng.uniform(0.5, 0.8))))
    stroke = int(rng.choice([0, 0, 1, 2]))
    angle = float(rng.uniform(-12.0, 12.0))
    shift = rng.uniform(-0.08, 0.08, size=2) * big
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).text((big / 2 + shift[0], big / 2 + shift[1]), ch, fill=255,
                              font=_font(font_index, font_size), anchor="mm", stroke_width=stroke, stroke_fill=255)
    mask = mask.rotate(angle, resample=Image.BILINEAR).resize((size, size), Image.BOX)
    m = np.asarray(mask, dtype=np.float32) / 255.0
    # grey levels: a dark background (flat or a linear gradient) and a brighter glyph, contrast >= 0.4
    bg = np.full((size, size), rng.uniform(0.0, 0.35), dtype=np.float64)
    if rng.random() < 0.5:
        theta = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        bg = bg + rng.uniform(-0.15, 0.15) * ((xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta))
    fg = rng.uniform(float(bg.mean()) + 0.4, 1.0)
    img = bg * (1 - m) + fg * m
    img = img + rng.normal(0, rng.uniform(0, 0.06), img.shape)
    if style == "plain":
        grey = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
        return np.repeat(grey[None], 3, axis=0)
    img = 1.0 - np.clip(img, 0.0, 1.0)  # dark glyph on a light background
    if style == "inverted":
        return np.repeat(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)[None], 3, axis=0)
    light = rng.uniform(*SHIFT_LIGHT, size=3)  # background tint
    dark = rng.uniform(*SHIFT_DARK, size=3)  # glyph tint
    theta, freq, phase = rng.uniform(0, math.pi), rng.uniform(2.0, 6.0), rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    texture = rng.uniform(*SHIFT_TEXTURE) * np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta))
                                               + phase)
    colour = dark[:, None, None] + (light - dark)[:, None, None] * img[None] + texture[None]
    return np.clip(np.rint(colour * 255), 0, 255).astype(np.uint8)


def render_pool(pool: Pool, n_classes: int | None, per_class: int, size: int = 32, seed: int = 0,
                progress: bool = False, style: Style = "plain", first: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Images ``(N, 3, size, size)`` uint8 and labels (0-based from class ``first``) of a pool's classes
    ``first .. first + n_classes - 1`` (``n_classes`` None: the rest of the pool), ``per_class`` images each in
    ``style``, deterministic in ``(seed, pool, class, index)``. The last few results are kept in memory (a
    benchmark renders the same sequence for every run); callers must not modify them in place."""
    return _render_pool(pool, n_classes, per_class, size, seed, progress, style, first)


@lru_cache(maxsize=4)
def _render_pool(pool: Pool, n_classes: int | None, per_class: int, size: int, seed: int, progress: bool,
                 style: Style, first: int) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    if pool == "pretrain" and style != "plain":
        raise ValueError("the glyph pre-training pool is rendered plain only")
    if per_class <= 0 or size <= 0:
        raise ValueError(f"per_class and size must be positive, got {per_class} and {size}")
    chars = pool_classes(pool)[first:]
    if n_classes is not None:
        if not 0 < n_classes <= len(chars):
            raise ValueError(f"the glyph {pool} pool has {len(chars)} classes from class {first}; "
                             f"asked for {n_classes}")
        chars = chars[:n_classes]
    images = np.empty((len(chars) * per_class, 3, size, size), dtype=np.uint8)
    from tqdm.auto import tqdm

    for c, ch in enumerate(tqdm(chars, desc=f"rendering {pool} glyphs", disable=not progress, leave=False)):
        for i in range(per_class):
            rng = np.random.default_rng([seed, POOL_INDEX[pool], first + c, i])
            images[c * per_class + i] = render_glyph(ch, rng, size, style)
    labels = torch.arange(len(chars)).repeat_interleave(per_class)
    return torch.from_numpy(images), labels, chars
