"""Reading pickled NumPy data files (CIFAR's python format) without running code from them.

``pickle.load`` calls whatever global a file names (``os.system``, ``builtins.exec``...), so a crafted data file
runs code the moment it is read. :func:`load_numpy_pickle` uses an ``Unpickler`` whose ``find_class`` admits only
what a pickled dict of ``ndarray``s needs, each mapped to NumPy's own function, never imported by the name the
file gives:

- ``numpy.core.multiarray._reconstruct`` (also ``numpy._core``; what ``ndarray.__reduce__`` returns, used by
  protocols 0-4, and by the Python 2 files CIFAR ships), ``numpy.ndarray`` (its only accepted subtype) and
  ``numpy.dtype`` (object dtypes refused: they would hold arbitrary Python objects);
- ``numpy.core.numeric._frombuffer`` (protocol 5's ``ndarray.__reduce_ex__``);
- ``_codecs.encode`` with the latin-1 codec only (how Python 3 writes ``bytes`` at protocols 0-2).

Containers, strings, numbers and bytes need no global. Anything else is refused with one line naming the file.
"""

from __future__ import annotations

import _codecs
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global that could run code; the message names the file and the global."""


def _dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dtype} (it would hold arbitrary Python objects)")
    return dtype


def _reconstruct(subtype: Any, *args: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r}")
    return _NUMPY_RECONSTRUCT(subtype, *args)


def _frombuffer(buffer: Any, dtype: Any, *args: Any) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"dtype {dtype!r}")
    return _NUMPY_FROMBUFFER(buffer, dtype, *args)


def _latin1_encode(text: Any, encoding: str = "utf-8", *args: Any) -> bytes:
    if encoding not in ("latin1", "latin-1") or args or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return _codecs.encode(text, "latin1")


#: NumPy's own functions, taken from what ndarray's reduce returns (the same on NumPy 1 and 2).
_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    **{(module, "_reconstruct"): _reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent id")


def load_numpy_pickle(path: str | Path, kind: str = "pickled NumPy file", encoding: str = "latin1") -> Any:
    """Unpickle ``path`` admitting only plain containers and NumPy arrays (``encoding``: for Python 2 ``str``).

    Raises ``ValueError`` (one line naming the file, ``kind`` says what it should be) for a file that names any
    other global, and for a truncated or foreign one."""
    try:
        with open(path, "rb") as f:
            return _NumpyUnpickler(f, encoding=encoding).load()
    except UnsafePickleError as e:
        raise ValueError(f"{str(path)!r} contains a pickled reference to {str(e)!r}, which could run code when "
                         f"loaded; refusing it (a {kind} holds only plain containers and NumPy arrays)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            UnicodeDecodeError, MemoryError) as e:
        raise ValueError(f"{str(path)!r} is truncated or not a {kind} "
                         f"({type(e).__name__}: {str(e)[:160]})") from None
