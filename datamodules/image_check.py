"""A cheap check that an image file is complete and decodable, for the DataModules' ``preflight``.

:func:`check_image` reads the header with PIL (an unknown or corrupt header fails) and then checks the file's
completeness without decoding its pixels where the format allows it:

- PNG: ``Image.verify()`` walks every chunk and checks its CRC (a truncated or damaged file fails);
- JPEG: the file must end with the end-of-image marker ``FF D9`` (trailing NUL padding allowed); when it does not
  (truncated, or extra bytes after the image), the image is decoded fully and only a decoding failure counts;
- any other format (BMP, GIF, WebP, TIFF): decoded fully.

A JPEG whose entropy-coded data is damaged but complete is not detected (only a full decode would); everything a
truncated copy or a non-image file produces is. :func:`decode_rgb` is the full decode used where the pixels are
needed anyway, with the same file-naming errors.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

_JPEG_EOI = b"\xff\xd9"


def _jpeg_complete(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 64))
        tail = f.read().rstrip(b"\x00")
    return tail.endswith(_JPEG_EOI)


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Turn PIL's decoding errors (which do not name the file) into one ``OSError`` that does."""
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise OSError(f"image {str(path)!r} cannot be read: {e.strerror or e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # UnidentifiedImageError is an OSError
        reason = str(e).split("\n", 1)[0] or type(e).__name__
        raise OSError(f"image {str(path)!r} is corrupt or truncated and cannot be decoded ({reason})") from e


def check_image(path: str | Path) -> None:
    """Raise ``OSError`` naming ``path`` when it is not a complete, decodable image (see the module docstring)."""
    path = Path(path)
    with _naming(path), Image.open(path) as im:
        if im.format == "PNG":
            im.verify()
        elif not (im.format == "JPEG" and _jpeg_complete(path)):
            im.load()


def decode_rgb(path: str | Path) -> np.ndarray:
    """The image as ``uint8 (H, W, 3)``; a corrupt or truncated file raises ``OSError`` naming it."""
    path = Path(path)
    with _naming(path), Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
