"""Skip-Cache: per-sample storage of a frozen backbone's outputs, so later epochs skip its forward pass.

Skip2-LoRA (Matsutani et al., ASP-DAC 2025) trains only branches that read frozen activations, so each
sample's activations are the same every epoch. :class:`SkipCache` stores them by the sample's stable
integer index, in memory or in disk-backed ``numpy.memmap`` files under ``cache_dir``.

Storage precision: ``float32`` is exact. ``bfloat16``/``float16`` halve the size and round every value
to nearest: relative error at most 2**-8 (~0.39%) for bfloat16 and 2**-11 (~0.049%) for float16
(float16 additionally overflows above 65504, which is refused). Rows are rounded the same way on the
epoch they are computed, so every epoch trains on identical features; the approximation is only against
an uncached float32 run (see ``tests/test_gpt_skip_cache.py``, which measures it).

The cache is valid only while everything upstream is frozen and deterministic: :func:`check_cacheable`
refuses (naming the reason) when something upstream trains, carries standard LoRA or has active dropout, and
:func:`weights_fingerprint` (a SHA-256 of the frozen weights) is recorded with the cache: a cache whose frozen
weights have changed since it was filled is refused (:class:`SkipCacheStale`) instead of serving stale features.

On disk, every cache lives in its own folder ``<cache_dir>/skipcache-<host>-<pid>-<random>/`` (with an
``owner.json``), so two runs sharing a ``cache_dir`` never touch each other's files. The folder is deleted by
:meth:`SkipCache.close`, at interpreter exit, and, after a crash (SIGKILL), by the next cache created on that host
in the same ``cache_dir`` (folders whose process is gone).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from models.adapters.lora import LoRALinear

CacheDtype = Literal["float32", "bfloat16", "float16"]
Storage = Literal["auto", "memory", "disk"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: numpy has no bfloat16: its bits are stored as int16 and viewed back.
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": np.int16, "float16": np.float16}
#: Worst-case relative rounding error of one stored value (round to nearest).
RELATIVE_ROUNDING_ERROR = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}


class SkipCacheRefused(ValueError):
    """The model is not eligible for caching; the message names the reason."""


class SkipCacheStale(ValueError):
    """The frozen weights changed after the cache was filled; its features are stale."""


@torch.no_grad()
def weights_fingerprint(modules: dict[str, nn.Module]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every parameter and buffer of ``modules``."""
    h = hashlib.sha256()
    for prefix, module in sorted(modules.items()):
        for name, t in sorted(module.state_dict(prefix=prefix + ".").items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_HOST = socket.gethostname().replace("-", "_")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale_caches(cache_dir: str | Path) -> list[Path]:
    """Delete cache folders under ``cache_dir`` left by crashed processes of this host; returns them."""
    removed = []
    for folder in Path(cache_dir).glob(f"skipcache-{_HOST}-*-*"):
        parts = folder.name.split("-")
        if len(parts) == 4 and parts[2].isdigit() and int(parts[2]) != os.getpid() and not _pid_alive(int(parts[2])):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def refusal_reasons(upstream: dict[str, nn.Module], training: bool = True) -> list[str]:
    """Why caching the output of ``upstream`` (name -> module) would be wrong; empty when it is safe."""
    lora, dropout, trainable = [], [], []
    for prefix, module in upstream.items():
        for name, m in module.named_modules(prefix=prefix):
            if isinstance(m, LoRALinear):
                lora.append(name)
            # nn.Dropout modules, and functional attention dropout kept as a float ``dropout`` attribute.
            p = m.p if isinstance(m, nn.Dropout) else getattr(m, "dropout", None)
            if training and m.training and isinstance(p, float) and p > 0:
                dropout.append(f"{name} (p={p})")
        trainable += [f"{prefix}.{n}" for n, p in module.named_parameters() if p.requires_grad]
    reasons = []
    if lora:
        reasons.append(f"standard LoRA is enabled upstream of the cache point on {_names(lora)}")
    if trainable:
        reasons.append(f"parameters upstream of the cache point are trainable (unfrozen block or embedding): "
                       f"{_names(trainable)}")
    if dropout:
        reasons.append(f"dropout is active in the frozen path at {_names(dropout)}")
    return reasons


def check_cacheable(upstream: dict[str, nn.Module], training: bool = True) -> None:
    """Raise :class:`SkipCacheRefused` listing every reason the cache would be invalid."""
    reasons = refusal_reasons(upstream, training)
    if reasons:
        raise SkipCacheRefused("Skip-Cache refused: " + "; ".join(reasons)
                               + ". Turn the cache off, or freeze/disable these (dropout: set it to 0).")


class SkipCache:
    """Per-sample feature cache keyed by integer sample index.

    Args:
        num_samples: keys are ``0 .. num_samples-1``.
        shapes: per-sample shape of each named feature, e.g. ``{"final": (T, C), "skip": (K, T, C)}``.
        dtype: storage precision (see the module docstring for the rounding error).
        cache_dir: folder for disk-backed arrays (used when ``storage`` is ``disk``, or ``auto`` over budget).
        max_memory_mb: in-memory budget. ``auto``: over budget -> disk if ``cache_dir`` is set, else an error.
        storage: ``auto``, ``memory`` or ``disk``.
        tag: file name prefix on disk (e.g. the DDP rank).
        fingerprint: :func:`weights_fingerprint` of the frozen weights whose outputs are cached
            (:meth:`check_fingerprint` refuses a cache filled from other weights).

    Raises:
        MemoryError: the cache does not fit the budget (or the disk) and there is nowhere else to put it;
            raised here, before anything is filled.
    """

    def __init__(
        self,
        num_samples: int,
        shapes: dict[str, tuple[int, ...]],
        dtype: CacheDtype = "float32",
        cache_dir: str | Path | None = None,
        max_memory_mb: float = 2048.0,
        storage: Storage = "auto",
        tag: str = "",
        fingerprint: str | None = None,
    ) -> None:
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"cache dtype must be one of {list(TORCH_DTYPES)}, got {dtype!r}")
        if storage not in ("auto", "memory", "disk"):
            raise ValueError(f"cache storage must be 'auto', 'memory' or 'disk', got {storage!r}")
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples, self.shapes, self.dtype = num_samples, {k: tuple(v) for k, v in shapes.items()}, dtype
        itemsize = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
        self.nbytes = sum(num_samples * int(np.prod(s)) * itemsize for s in self.shapes.values())
        size = f"{self.nbytes / 2**20:.1f} MiB ({num_samples} samples x {self.shapes}, {dtype})"
        over = self.nbytes > max_memory_mb * 2**20
        if storage == "disk" or (storage == "auto" and over and cache_dir is not None):
            if cache_dir is None:
                raise ValueError("Skip-Cache storage 'disk' needs `cache_dir`")
            self.storage = "disk"
        elif over:
            raise MemoryError(
                f"Skip-Cache needs {size}, over the budget of {max_memory_mb} MiB; set `cache_dir` to keep it "
                "on disk, raise the budget, use cache dtype bfloat16/float16, or use fewer samples"
            )
        else:
            self.storage = "memory"
        self.files: list[Path] = []
        self.folder: Path | None = None
        self.fingerprint = fingerprint
        if self.storage == "disk":
            root = Path(cache_dir).expanduser()
            root.mkdir(parents=True, exist_ok=True)
            clean_stale_caches(root)
            free = shutil.disk_usage(root).free
            if self.nbytes > free:
                raise MemoryError(
                    f"Skip-Cache needs {size} on disk but {str(root)!r} has {free / 2**20:.0f} MiB free"
                )
            self.folder = root / f"skipcache-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.folder.mkdir()
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "fingerprint": fingerprint, "dtype": dtype,
                     "num_samples": num_samples, "shapes": {k: list(v) for k, v in self.shapes.items()}}
            (self.folder / "owner.json").write_text(json.dumps(owner, indent=1))
            self.files = [self.folder / f"{tag}{name}.{dtype}.bin" for name in self.shapes]
            atexit.register(self.close)
        self.data: dict[str, torch.Tensor] = {}
        for i, (name, shape) in enumerate(self.shapes.items()):
            if self.storage == "disk":
                arr = np.memmap(self.files[i], dtype=NUMPY_DTYPES[dtype], mode="w+", shape=(num_samples, *shape))
                t = torch.from_numpy(arr)
                self.data[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
            else:
                self.data[name] = torch.empty((num_samples, *shape), dtype=TORCH_DTYPES[dtype])
        self.filled = torch.zeros(num_samples, dtype=torch.bool)
        self.hits = self.misses = 0

    def __len__(self) -> int:
        """Number of filled entries."""
        return int(self.filled.sum())

    @property
    def hit_rate(self) -> float:
        """Share of samples served from the cache since the last :meth:`reset_stats`."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def reset_stats(self) -> None:
        self.hits = self.misses = 0

    def _check_keys(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.detach().to("cpu", torch.long).flatten()
        if len(keys) and (int(keys.min()) < 0 or int(keys.max()) >= self.num_samples):
            raise IndexError(f"sample index out of the cache's range [0, {self.num_samples}): {keys.tolist()[:8]}")
        return keys

    def put(self, keys: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
        """Store rows for ``keys`` (float16 overflow raises instead of storing inf)."""
        keys = self._check_keys(keys)
        for name, shape in self.shapes.items():
            value = features[name].detach()
            if tuple(value.shape) != (len(keys), *shape):
                raise ValueError(f"cache feature {name!r}: expected {(len(keys), *shape)}, got {tuple(value.shape)}")
            stored = value.to("cpu", TORCH_DTYPES[self.dtype])
            if self.dtype == "float16" and not torch.isfinite(stored).all() and torch.isfinite(value).all():
                raise OverflowError(f"cache feature {name!r} exceeds the float16 range (65504); use bfloat16")
            self.data[name][keys] = stored
        self.filled[keys] = True

    def get(self, keys: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Stored rows for ``keys`` as float32 on ``device``; every key must be filled."""
        keys = self._check_keys(keys)
        if not self.filled[keys].all():
            raise KeyError(f"samples not cached yet: {keys[~self.filled[keys]].tolist()[:8]}")
        return {name: t[keys].to(device=device, dtype=torch.float32) for name, t in self.data.items()}

    def lookup(
        self,
        keys: torch.Tensor,
        compute: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Features for a batch: cached rows are read, the others come from ``compute(positions)`` (called
        without gradients, only for the missing batch positions) and are stored. Every row is returned
        at storage precision, so all epochs see identical values."""
        keys = self._check_keys(keys)
        hit = self.filled[keys]
        n_hit = int(hit.sum())
        self.hits += n_hit
        self.misses += len(keys) - n_hit
        if n_hit == len(keys):
            return self.get(keys, device)
        miss_pos = (~hit).nonzero().flatten()
        with torch.no_grad():
            computed = compute(miss_pos.to(device))
        self.put(keys[miss_pos], computed)
        if n_hit == 0:  # the whole batch was just computed (epoch 1): no copy into a new batch tensor
            return {name: computed[name].detach().to(TORCH_DTYPES[self.dtype]).float() for name in self.shapes}
        out = {}
        for name, shape in self.shapes.items():
            value = computed[name].detach()
            full = torch.empty((len(keys), *shape), dtype=torch.float32, device=value.device)
            full[miss_pos.to(value.device)] = value.to(TORCH_DTYPES[self.dtype]).float()
            hit_pos = hit.nonzero().flatten()
            full[hit_pos.to(value.device)] = self.data[name][keys[hit_pos]].to(value.device, torch.float32)
            out[name] = full
        return out

    def check_fingerprint(self, fingerprint: str) -> None:
        """Raise :class:`SkipCacheStale` when the frozen weights are not the ones the cache was filled from."""
        if self.fingerprint is not None and fingerprint != self.fingerprint and len(self):
            raise SkipCacheStale(
                f"Skip-Cache refused: the frozen weights changed after {len(self)} samples were cached (fingerprint "
                f"{self.fingerprint[:12]} -> {fingerprint[:12]}); the cached features are stale. Something modified "
                "the frozen backbone during training: keep it frozen, or turn skip_cache off"
            )

    def close(self) -> None:
        """Drop the arrays and delete the disk files (the cache's own folder)."""
        self.data.clear()
        for f in self.files:
            f.unlink(missing_ok=True)
        self.files = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        atexit.unregister(self.close)
