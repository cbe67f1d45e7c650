"""Loading checkpoints without running code from them.

A full (non-weights-only) ``torch.load`` unpickles arbitrary objects, so a crafted file runs code the moment it
is loaded. :func:`safe_load` always uses ``weights_only=True``; the only extra classes it lets through are
*dataclasses defined in adaptlab's own packages* (e.g. :class:`models.lm.gpt.Config` kept in a checkpoint's
hyper-parameters), and only as data: the unpickler is given a stand-in under the class's name whose
``__new__`` makes a bare instance (``object.__new__``) and refuses arguments, so neither the way pickle writes
a dataclass (``NEWOBJ`` then ``BUILD`` filling ``__dict__``) nor a crafted ``REDUCE`` calling the class with
arguments runs its ``__init__``/``__post_init__`` or any other method (classes with their own ``__setstate__``
or ``__reduce__`` are not admitted). What a crafted file can do is set any fields of such an instance to
tensors, numbers, strings and plain containers. Anything else (a foreign class, a ``__reduce__`` payload) is
refused with one line.
"""

from __future__ import annotations

import dataclasses
import importlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

#: Modules whose dataclasses may appear in checkpoints (adaptlab's own packages only).
PROJECT_PREFIXES = ("models.", "lightning_modules.", "datamodules.", "callbacks.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read; the message is one line naming the file."""


def _project_dataclass(qualified: str) -> type | None:
    """The class named ``module.Class`` when it is a plain dataclass of an adaptlab package, else ``None``."""
    module_name, _, name = qualified.rpartition(".")
    if not module_name.startswith(PROJECT_PREFIXES) or not name.isidentifier():
        return None
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return None
    # A custom __setstate__/__reduce__ could run code while unpickling: only plain dataclasses pass.
    if any(attr in vars(cls) for attr in ("__setstate__", "__reduce__", "__reduce_ex__", "__getstate__")):
        return None
    return cls


def _bare_instance_maker(cls: type) -> type:
    """A stand-in for ``cls`` in the unpickler: calling it or its ``__new__`` gives ``object.__new__(cls)`` (no
    ``__init__``, no ``__post_init__``; the result is not an instance of the stand-in, so Python calls no
    ``__init__`` either), and any argument is refused."""

    def __new__(stand_in: type, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            raise pickle.UnpicklingError(f"{cls.__module__}.{cls.__qualname__} called with constructor arguments")
        return object.__new__(cls)

    return type(cls.__name__, (), {"__new__": __new__, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def safe_load(path: str | Path | BinaryIO, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` plus adaptlab's dataclasses; every failure is a
    :class:`CheckpointError` whose message names the file and says what is wrong in one line."""
    name = repr(str(path)) if isinstance(path, (str, Path)) else "(stream)"
    allowed: list[Any] = []
    if isinstance(path, (str, Path)):
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip checkpoint (legacy format, truncated, foreign): torch.load says which
            needed = []
        for qualified in needed:
            cls = _project_dataclass(qualified)
            if cls is None:
                raise CheckpointError(
                    f"{what} {name} contains a pickled object of type {qualified!r}, which could run code when "
                    "loaded; refusing it (only tensors, plain containers and adaptlab's own dataclasses are loaded)"
                )
            # the name resolves to the stand-in; the real class is admitted for BUILD under a name no file can
            # use (a global outside adaptlab's packages is refused above)
            allowed += [(_bare_instance_maker(cls), qualified), (cls, f"adaptlab.safe_load.instance.{qualified}")]
    is_zip = isinstance(path, (str, Path)) and Path(path).is_file() and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not is_zip and isinstance(path, (str, Path)):  # not torch's zip format: damaged or foreign bytes
            raise CheckpointError(f"{what} {name} is truncated or not a PyTorch checkpoint (not a torch zip "
                                  "archive)") from e
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        first = f"type {found[1]}" if found else reason[1].strip() if reason else type(e).__name__
        raise CheckpointError(
            f"{what} {name} holds objects that are not allowed when loading safely ({first[:200]}); refusing it"
        ) from e
    except FileNotFoundError as e:
        raise CheckpointError(f"{what} {name} does not exist") from e
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{what} {name} is truncated or not a PyTorch checkpoint ({type(e).__name__}: {detail})"
        ) from e
