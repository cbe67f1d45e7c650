"""TrackNet clips: frame images (or a video) with an optional label CSV, as heat-map training samples.

Layouts (searched recursively under ``data_root``):

- clip folders: every folder holding ``label_file`` (default ``Label.csv``) is a clip, its frames beside it;
- TrackNetV3: ``<match>/csv/<rally>_ball.csv`` with the frames in ``<match>/frame/<rally>/<n>.png`` (clip
  name ``<match>/<rally>``); for clips under a ``test/`` folder ``<match>/corrected_csv/<rally>_ball.csv`` is
  preferred when present (V3 evaluates on its corrected test labels).

Splits (``split``): with ``auto`` (default), a data root holding ``train/`` and ``val/`` and/or ``test/`` folders
(TrackNetV3's ``data/{train,val,test}/match*``) is split by those folders; otherwise clips are split at random by
clip (``val_fraction``/``test_fraction``, ``split_seed``). ``val_clips``/``test_clips`` (names or glob patterns
such as ``"test/*"`` or ``"*/match3/*"``) override both.

Both TrackNet column styles are read (a UTF-8 byte-order mark before the header is accepted):

- v1: ``file name,visibility,x-coordinate,y-coordinate,status`` (``file name`` relative to the clip folder);
- v2/v3: ``Frame,Visibility,X,Y`` (``Frame`` = the integer in a frame file's name: ``0.png``, ``0007.jpg``).

Visibility 0 means "no ball" (coordinates ignored, may be empty); any other value (v1's 1/2/3) means the
labelled position is the target.

Frame windows follow frame *numbers*, never the CSV's row order: rows are sorted by frame number (v1: the
number at the end of the file name; if any name has none, the row order numbers the frames), and a duplicate
frame number is an error naming both lines. A sample is the window ``f - num_frames + 1 .. f`` of frame
numbers, oldest first and the labelled frame ``f`` last, taken from every numbered image of the clip (labelled
or not). Numbers before the clip's first frame repeat the first frame. A number inside the clip with no image
is a gap: ``gap_policy: fill`` (default) puts the nearest earlier existing frame in its place (so every
labelled frame keeps exactly one sample), ``gap_policy: skip`` drops the windows that contain a gap; the
number of missing frames and of filled or skipped windows is logged once per split. Targets are rendered at
``heatmap.size`` with coordinates rescaled from the clip's source resolution; invisible frames give an
all-zero map. Train/val/test are split by clip, never by frame. Without ``data_root`` the procedural generator
(:mod:`datamodules.tracknet_synthetic`) writes the default clips under ``synthetic_dir`` first.

Inference on unlabelled input (``predict_path``): a video file, a folder of numbered frames, or a folder of
several of those; every frame gets a sample (see :func:`scan_unlabelled`), read in order by
:class:`TrackNetStream` (videos decoded frame by frame, once each, keeping only a window of frames).
"""

from __future__ import annotations

import bisect
import csv
import fnmatch
import hashlib
import io
import json
import re
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from datamodules.image_check import check_image
from datamodules.resumable import EpochSeededSampler, ResumableDataLoader
from datamodules.tracknet_synthetic import GeneratorSpec, generate
from models.metrics.tracknet import v3_truncate
from models.vision.tracknet import HeatmapConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
#: ImageNet statistics (timm ViT defaults) used to normalise every frame.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_V1 = ("file name", "visibility", "x-coordinate", "y-coordinate")
_V2 = ("frame", "visibility", "x", "y")
GapPolicy = Literal["fill", "skip"]


@dataclass
class ClipLabels:
    """One clip, sorted by frame number: labelled frame files, visibility (bool), ball centre in source pixels,
    source size ``(width, height)``, their frame numbers, and ``available``: every frame number of the clip
    that has an image (labelled or not) -> its file (or, for a video, its index in the decoded frames).
    ``labelled: false`` marks unlabelled input (all ``visible`` false, used by ``predict`` only)."""

    name: str
    frames: list[Path]
    visible: np.ndarray
    xy: np.ndarray
    src_size: tuple[int, int]  # (width, height)
    frame_ids: list[int] = field(default_factory=list)
    available: dict[int, Any] = field(default_factory=dict)
    labelled: bool = True
    video: Path | None = None


def _frame_number(path: Path) -> int | None:
    m = re.search(r"(\d+)$", path.stem)
    return int(m.group(1)) if m else None


def _frame_index(clip_dir: Path) -> dict[int, Path]:
    """Frame number -> image file, from names whose stem ends in digits (``0.png``, ``img_0007.jpg``)."""
    out: dict[int, Path] = {}
    for p in sorted(clip_dir.iterdir()):
        n = _frame_number(p)
        if p.suffix.lower() in IMAGE_SUFFIXES and n is not None:
            out.setdefault(n, p)
    return out


def read_label_csv(path: str | Path, frame_dir: str | Path | None = None) -> ClipLabels:
    """Parse a TrackNet label CSV (either column style, optional UTF-8 BOM) and resolve its frame files.

    Args:
        path: the CSV.
        frame_dir: folder of the frame images; ``None`` = the CSV's folder (TrackNetV3:
            ``<match>/frame/<rally>``).

    Rows come back sorted by frame number. Raises:
        ValueError: not UTF-8 or binary (NUL bytes), unknown header, or a bad row (non-numeric or missing values,
            visible coordinates outside the image, a frame number or file labelled twice); the message names the file
            (and line).
        FileNotFoundError: a row names a frame image that does not exist (file and line named).
    """
    path = Path(path)
    clip_dir = Path(frame_dir) if frame_dir is not None else path.parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
        if "\x00" in text:
            raise csv.Error("it contains NUL bytes: a binary file?")
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: label file is not valid UTF-8 (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start}); save it as UTF-8") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV label file ({e})") from None
    if not rows:
        raise ValueError(f"{path}: empty label file")
    header = [h.strip().lstrip("\ufeff").lower() for h in rows[0]]
    if all(c in header for c in _V1):
        style, cols = "v1", [header.index(c) for c in _V1]
        index: dict[int, Path] = {}
    elif all(c in header for c in _V2):
        style, cols = "v2", [header.index(c) for c in _V2]
        if not clip_dir.is_dir():
            raise FileNotFoundError(f"{path}: frame folder {clip_dir} does not exist")
        index = _frame_index(clip_dir)
    else:
        raise ValueError(
            f"{path}:1: unknown label header {rows[0]}; expected "
            "'file name,visibility,x-coordinate,y-coordinate,status' or 'Frame,Visibility,X,Y'"
        )
    entries: list[tuple[int | None, int, Path, bool, float, float]] = []  # (frame number, line, file, vis, x, y)
    seen: dict[Path, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        where = f"{path}:{line}"
        if len(row) <= max(cols):
            raise ValueError(f"{where}: expected at least {max(cols) + 1} columns, got {len(row)}: {row}")
        key, v_raw, x_raw, y_raw = (row[c].strip() for c in cols)
        try:
            v = int(float(v_raw))
        except ValueError:
            raise ValueError(f"{where}: visibility {v_raw!r} is not a number") from None
        if v < 0:
            raise ValueError(f"{where}: visibility must be >= 0, got {v}")
        x = y = 0.0
        if v > 0:
            try:
                x, y = float(x_raw), float(y_raw)
            except ValueError:
                raise ValueError(f"{where}: visible ball needs numeric x/y, got {x_raw!r}, {y_raw!r}") from None
            if not (np.isfinite(x) and np.isfinite(y)) or x < 0 or y < 0:
                raise ValueError(f"{where}: coordinates must be finite and >= 0, got ({x_raw}, {y_raw})")
        if style == "v1":
            frame = clip_dir / key
            fid = _frame_number(frame)
        else:
            try:
                fid = int(float(key))
            except ValueError:
                raise ValueError(f"{where}: Frame {key!r} is not an integer") from None
            if fid not in index:
                raise FileNotFoundError(f"{where}: no image for Frame {fid} in {clip_dir}")
            frame = index[fid]
        if not frame.is_file():
            raise FileNotFoundError(f"{where}: frame image {frame} does not exist")
        if frame in seen:
            raise ValueError(f"{where}: frame {key!r} is labelled twice (also on line {seen[frame]})")
        seen[frame] = line
        entries.append((fid, line, frame, v > 0, x, y))
    if not entries:
        raise ValueError(f"{path}: no labelled frames")
    if any(e[0] is None for e in entries):  # v1 names without numbers: the row order numbers the frames
        entries = [(k, *e[1:]) for k, e in enumerate(entries)]
    else:
        first_line: dict[int, int] = {}
        for fid, line, *_ in entries:
            if fid in first_line:
                raise ValueError(f"{path}:{line}: frame number {fid} is labelled twice "
                                 f"(also on line {first_line[fid]})")
            first_line[fid] = line
        entries.sort(key=lambda e: e[0])
    with Image.open(entries[0][2]) as im:
        size = im.size
    for fid, line, frame, vis, x, y in entries:
        if vis and (x > size[0] or y > size[1]):
            raise ValueError(f"{path}:{line}: visible ball at ({x}, {y}) lies outside the {size[0]}x{size[1]} frame")
    available: dict[int, Any] = dict(index) if style == "v2" else {}
    if style == "v1" and all(_frame_number(e[2]) is not None for e in entries):
        available = _frame_index(clip_dir)
    available.update({e[0]: e[2] for e in entries})
    return ClipLabels(
        clip_dir.name, [e[2] for e in entries], np.asarray([e[3] for e in entries], bool),
        np.asarray([(e[4], e[5]) for e in entries], np.float64).reshape(-1, 2), size, [e[0] for e in entries],
        dict(sorted(available.items())),
    )


def frame_window(clip: ClipLabels, fid: int, num_frames: int, gap_policy: GapPolicy = "fill",
                 ids: list[int] | None = None) -> tuple[list[int] | None, bool]:
    """The ``num_frames`` frame numbers of the window ending at frame number ``fid``, oldest first (their
    sources are ``clip.available[n]``).

    Numbers before the clip's first frame repeat the first frame; a missing number inside the clip is a gap:
    ``fill`` takes the nearest earlier existing frame, ``skip`` returns ``None``. Returns ``(numbers, gapped)``.
    ``ids`` = ``sorted(clip.available)`` (pass it when calling in a loop).
    """
    ids = ids if ids is not None else sorted(clip.available)
    out, gapped = [], False
    for g in range(fid - num_frames + 1, fid + 1):
        if g < ids[0]:
            g = ids[0]
        elif g not in clip.available:
            gapped = True
            if gap_policy == "skip":
                return None, True
            g = ids[bisect.bisect_left(ids, g) - 1]
        out.append(g)
    return out, gapped


def scan_unlabelled(path: str | Path) -> list[ClipLabels]:
    """Unlabelled clips for ``predict``: a video file (one clip), a folder of numbered frame images (one clip),
    or a folder holding videos and/or frame folders (one clip each, searched recursively)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"predict_path {str(path)!r} is neither a video ({', '.join(VIDEO_SUFFIXES)}) "
                             "nor a folder")
        return [_video_clip(path, path.stem)]
    if not path.is_dir():
        raise FileNotFoundError(f"predict_path {str(path)!r} does not exist")
    clips = []
    for folder in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
        index = _frame_index(folder)
        name = folder.relative_to(path).as_posix() if folder != path else path.name
        if index:
            first = next(iter(index.values()))
            with Image.open(first) as im:
                size = im.size
            n = len(index)
            clips.append(ClipLabels(name, list(index.values()), np.zeros(n, bool), np.zeros((n, 2), np.float32), size,
                                    list(index), dict(index), labelled=False))
        for video in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES):
            rel = video.relative_to(path).with_suffix("").as_posix()
            clips.append(_video_clip(video, rel))
    if not clips:
        raise FileNotFoundError(f"predict_path {str(path)!r} holds no numbered frame images and no videos "
                                f"({', '.join(VIDEO_SUFFIXES)})")
    return clips


def _video_clip(path: Path, name: str) -> ClipLabels:
    """A video as an unlabelled clip: frame numbers 0..n-1 (decoding happens in the dataset)."""
    n, size = video_info(path)
    return ClipLabels(name, list(range(n)), np.zeros(n, bool), np.zeros((n, 2), np.float32), size, list(range(n)),
                      {i: i for i in range(n)}, labelled=False, video=path)


def _av():
    try:
        import av
    except ImportError as err:
        raise ImportError("reading videos needs PyAV (pip install av, or pip install -e '.[video]'); "
                          "a folder of frame images works without it") from err
    return av


def video_info(path: Path) -> tuple[int, tuple[int, int]]:
    """(number of frames, (width, height)) of a video without decoding it: its non-empty video packets are
    counted (headers' frame counts are often missing or wrong); the size comes from the codec parameters."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"video {str(path)!r} has no video stream")
            stream = container.streams.video[0]
            size = (stream.codec_context.width, stream.codec_context.height)
            n = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except av.error.FFmpegError as err:
        raise ValueError(f"video {str(path)!r} cannot be read: {err}") from None
    if not n or min(size) < 1:
        raise ValueError(f"video {str(path)!r} has no frames")
    return n, size


def iter_video(path: Path, size: tuple[int, int]) -> Iterator[torch.Tensor]:
    """The frames of a video in order, each decoded once, as ``uint8 (3, H, W)`` resized to ``size = (W, H)``."""
    av = _av()
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            im = frame.to_image()  # PIL RGB
            if im.size != tuple(size):
                im = im.resize(tuple(size), Image.BILINEAR)
            yield torch.from_numpy(np.asarray(im, np.uint8).copy()).permute(2, 0, 1)


def read_video(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """All frames of a (short) video as ``uint8 (n, 3, H, W)``; predict streams instead (:class:`TrackNetStream`)."""
    return torch.stack(list(iter_video(path, size)))


def render_heatmap(x: float, y: float, visible: bool, size: tuple[int, int], sigma: float,
                   mode: Literal["gaussian", "disk"] = "gaussian") -> torch.Tensor:
    """Target map ``(1, H, W)`` for a ball at heat-map pixel ``(x, y)`` (``size = (W, H)``).

    ``gaussian``: ``exp(-d^2 / (2 sigma^2))`` (peak 1 at the label, TrackNet v1); ``disk``: 1 within radius
    ``sigma`` (TrackNetV2/V3). Invisible balls give all zeros.
    """
    w, h = size
    if not visible:
        return torch.zeros(1, h, w)
    yy = torch.arange(h, dtype=torch.float32)[:, None]
    xx = torch.arange(w, dtype=torch.float32)[None, :]
    d2 = (xx - x) ** 2 + (yy - y) ** 2
    if mode == "disk":
        return (d2 <= sigma**2).float()[None]
    return torch.exp(-d2 / (2 * sigma**2))[None]


def folder_split(names: list[str]) -> tuple[list[str], list[str], list[str]] | None:
    """TrackNetV3's split: clips named ``train/...``, ``val/...``, ``test/...`` go to that split (others train),
    when there are ``train/`` clips and ``val/`` or ``test/`` ones; else ``None``."""
    top = {n: n.split("/", 1)[0] if "/" in n else "" for n in names}
    if "train" not in top.values() or not {"val", "test"} & set(top.values()):
        return None
    val = sorted(n for n in names if top[n] == "val")
    test = sorted(n for n in names if top[n] == "test")
    return sorted(set(names) - set(val) - set(test)), val, test


def match_clips(names: list[str], patterns: list[str], key: str) -> list[str]:
    """Clip names matching any of ``patterns`` (exact names or ``fnmatch`` globs; ``*`` also crosses ``/``);
    a pattern that matches nothing is an error naming ``key``."""
    out: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"{key}: {pattern!r} matches no clip; clips: {sorted(names)[:20]}")
        out.update(hits)
    return sorted(out)


class TrackNetStream(IterableDataset):
    """The samples of :class:`TrackNetClipDataset` in order, with every video streamed: its frames are decoded
    once each, in order, and only the last ``num_frames`` are kept (memory does not grow with the video's length).
    Frame folders are read as by the map-style dataset. Every sample carries ``clip_end`` (the last of its clip).
    Iterated by one process: with DataLoader workers, worker 0 yields everything and the others nothing."""

    def __init__(self, base: TrackNetClipDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None and info.id > 0:
            return
        k = 0
        for c, clip in enumerate(self.base.clips):
            if clip.video is None:
                while k < len(self.base.index) and self.base.index[k][0] == c:
                    yield self.base[k]
                    k += 1
                continue
            k += sum(1 for entry in self.base.index if entry[0] == c)
            yield from self._video(c, clip)

    def _video(self, c: int, clip: ClipLabels) -> Iterator[dict[str, Any]]:
        n = self.base.num_frames
        recent: deque[torch.Tensor] = deque(maxlen=n)
        pending = None
        for i, frame in enumerate(iter_video(clip.video, self.base.frame_size)):
            if pending is not None:
                yield {**pending, "clip_end": False}
            if i >= len(clip.frame_ids):  # more frames than packets counted: grow the clip's tables
                clip.frame_ids.append(i)
                clip.available[i] = i
                clip.visible = np.append(clip.visible, False)
                clip.xy = np.vstack([clip.xy, np.zeros((1, 2))])
            recent.extend([frame] * (n if not recent else 1))
            window = [max(0, g) for g in range(i - n + 1, i + 1)]
            pending = self.base.sample(c, i, window, list(recent))
        if pending is not None:
            yield {**pending, "clip_end": True}


def split_clips(
    names: list[str], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """Deterministic split of clip names into train/val/test (each non-zero fraction gets >= 1 clip)."""
    order = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(order))
    order = [order[i] for i in perm]
    n_val = max(1, round(val_fraction * len(order))) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * len(order))) if test_fraction > 0 else 0
    if n_val + n_test >= len(order):
        raise ValueError(
            f"{len(order)} clips cannot be split with val_fraction={val_fraction}, test_fraction={test_fraction} "
            "(every split needs whole clips and train needs at least one)"
        )
    val, test = order[:n_val], order[n_val : n_val + n_test]
    return sorted(order[n_val + n_test :]), sorted(val), sorted(test)


class TrackNetClipDataset(Dataset):
    """One sample per labelled frame (per frame of an unlabelled clip): the window of stacked frames (see
    :func:`frame_window`), the target heat map and the label for metrics/predict.

    ``gap_stats``: ``missing_frames`` (numbers inside clips with no image), ``filled_windows`` and
    ``skipped_windows``. Every sample also carries ``window`` (the frame numbers of its frames) and, with
    ``output_frames: all``, ``heatmaps`` ``(num_frames, H, W)`` (one target per window frame) and ``target_mask``
    (1 where that frame is labelled and really sits at that position: not a repeat or a gap fill)."""

    def __init__(self, clips: list[ClipLabels], num_frames: int, frame_size: tuple[int, int],
                 heatmap: HeatmapConfig, normalize: bool = True, cache_frames: bool = False,
                 gap_policy: GapPolicy = "fill", output_frames: Literal["last", "all"] = "last") -> None:
        if gap_policy not in ("fill", "skip"):
            raise ValueError(f"gap_policy must be 'fill' or 'skip', got {gap_policy!r}")
        self.clips, self.num_frames, self.frame_size = clips, num_frames, tuple(frame_size)
        self.heatmap, self.normalize, self.output_frames = heatmap, normalize, output_frames
        self.index: list[tuple[int, int, list[int]]] = []
        self._rows = [{fid: i for i, fid in enumerate(clip.frame_ids)} for clip in clips]
        self.gap_stats = {"missing_frames": 0, "filled_windows": 0, "skipped_windows": 0}
        for c, clip in enumerate(clips):
            ids = sorted(clip.available)
            self.gap_stats["missing_frames"] += ids[-1] - ids[0] + 1 - len(ids)
            for i, fid in enumerate(clip.frame_ids):
                window, gapped = frame_window(clip, fid, num_frames, gap_policy, ids)
                if window is None:
                    self.gap_stats["skipped_windows"] += 1
                    continue
                self.gap_stats["filled_windows"] += int(gapped)
                self.index.append((c, i, window))
        self._cache: dict[Any, torch.Tensor] | None = {} if cache_frames else None
        self._clip_end = {k for k in range(len(self.index)) if k + 1 == len(self.index)
                          or self.index[k + 1][0] != self.index[k][0]}
        self._mean = torch.tensor(MEAN).view(3, 1, 1)
        self._std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.index)

    def _load(self, clip: ClipLabels, source: Any) -> torch.Tensor:
        if clip.video is not None:
            raise TypeError(f"{clip.video}: videos are read in order by TrackNetStream, not by index")
        path = source
        if self._cache is not None and path in self._cache:
            return self._cache[path]
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != self.frame_size:
                im = im.resize(self.frame_size, Image.BILINEAR)
            t = torch.from_numpy(np.asarray(im, np.uint8).copy()).permute(2, 0, 1)
        if self._cache is not None:
            self._cache[path] = t
        return t

    def _target(self, clip: ClipLabels, row: int) -> torch.Tensor:
        """Target map of a labelled row: centred on the rescaled label (``heatmap.centre: exact``) or on
        TrackNetV3's truncated one (``v3``: nothing drawn when it truncates to ``(0, 0)``, as V3)."""
        (sw, sh), (hw, hh), hm = clip.src_size, self.heatmap.size, self.heatmap
        visible = bool(clip.visible[row])
        x, y = float(clip.xy[row, 0]), float(clip.xy[row, 1])
        if hm.centre == "v3":
            cx, cy = v3_truncate(x, y, (sw, sh), (hw, hh))
            return render_heatmap(cx, cy, visible and (cx, cy) != (0, 0), (hw, hh), hm.sigma, hm.mode)
        return render_heatmap(x * hw / sw, y * hh / sh, visible, (hw, hh), hm.sigma, hm.mode)

    def __getitem__(self, k: int) -> dict[str, Any]:
        c, i, window = self.index[k]
        clip = self.clips[c]
        frames = [self._load(clip, clip.available[g]) for g in window]
        return {**self.sample(c, i, window, frames), "clip_end": k in self._clip_end}

    def sample(self, c: int, i: int, window: list[int], frames: list[torch.Tensor]) -> dict[str, Any]:
        """The sample of row ``i`` of clip ``c`` from its window's frame numbers and ``uint8`` frames."""
        clip = self.clips[c]
        frames = torch.stack(frames).float() / 255.0
        if self.normalize:
            frames = (frames - self._mean) / self._std
        sw, sh = clip.src_size
        hw, hh = self.heatmap.size
        x, y = float(clip.xy[i, 0]) * hw / sw, float(clip.xy[i, 1]) * hh / sh
        visible = bool(clip.visible[i])
        sample = {
            "frames": frames.flatten(0, 1),  # (num_frames*3, H, W)
            "heatmap": self._target(clip, i),
            "xy": torch.tensor([x, y] if visible else [0.0, 0.0]),
            "xy_v3": torch.tensor(v3_truncate(*clip.xy[i].tolist(), (sw, sh), (hw, hh)) if visible else (0, 0)),
            "visible": torch.tensor(visible),
            "src_size": torch.tensor([sw, sh]),
            "clip": clip.name,
            "frame": clip.frame_ids[i],
            "window": torch.tensor(window),
        }
        if self.output_frames == "all":
            maps, mask = [], []
            fid = clip.frame_ids[i]
            for pos, g in enumerate(window):
                row = self._rows[c].get(g)
                real = row is not None and clip.labelled and g == fid - len(window) + 1 + pos
                mask.append(float(real))
                if real and clip.visible[row]:
                    maps.append(self._target(clip, row)[0])
                else:
                    maps.append(torch.zeros(hh, hw))
            sample["heatmaps"], sample["target_mask"] = torch.stack(maps), torch.tensor(mask)
        return sample


class TrackNetDataModule(L.LightningDataModule):
    """TrackNet clips (or generated ones) as ``{"frames", "heatmap", "xy", "visible", ...}`` batches.

    Args:
        data_root: folder searched recursively for clip folders holding ``label_file`` and for TrackNetV3
            matches (``<match>/csv/<rally>_ball.csv`` + ``<match>/frame/<rally>/``); ``None`` = generate the
            default clips (``synthetic``) under ``synthetic_dir`` (reused when already there).
        label_file: label CSV name inside each clip folder.
        gap_policy: a frame number missing inside a clip: ``fill`` = the nearest earlier frame takes its place
            in the windows, ``skip`` = windows containing it are dropped (counts are logged).
        predict_path: unlabelled input for ``predict`` instead of ``predict_split``: a video file (PyAV), a
            folder of numbered frames, or a folder of several (one output CSV per clip). Read in order by one
            loader process (at most one worker); videos are streamed (:class:`TrackNetStream`).
        output_frames: ``last`` = one target map per sample (its last frame); ``all`` = one per window frame
            (``heatmaps``, ``target_mask``), for models that predict every frame (TrackNetV3 style; must equal
            the model's ``output_frames``).
        num_frames: consecutive frames stacked on channels (input has ``3 * num_frames`` channels).
        heatmap: target size ``[W, H]``, ``sigma`` (Gaussian std or disk radius, heat-map pixels), ``mode``.
            Must equal the model's ``heatmap`` (the TrackNet module checks).
        frame_size: input frame size ``[W, H]``; ``None`` = ``heatmap.size``.
        val_fraction: share of clips in the validation split.
        test_fraction: share of clips in the test split.
        val_clips: validation clips by name or glob pattern (``"val/*"``; instead of ``val_fraction``/the folder
            split; the rest train).
        test_clips: test clips by name or glob pattern (instead of ``test_fraction``/the folder split).
        split_seed: seed of the split by clip.
        split: ``auto`` = by the data root's ``train/``, ``val/``, ``test/`` folders when it has ``train/`` and one of
            the others, else ``random``; ``folders`` = by those folders (an error if missing); ``random`` = by
            ``val_fraction``/``test_fraction``. ``val_clips``/``test_clips`` take precedence.
        predict_split: clips used by ``predict``.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        cache_frames: keep decoded, resized frames in memory (fast for small data sets).
        normalize: normalise frames with ImageNet statistics.
        synthetic: settings of the generated default clips (``data_root: null``).
        synthetic_dir: folder of the generated clips (reused when its settings match).
    """

    def __init__(
        self,
        data_root: str | None = None,
        label_file: str = "Label.csv",
        gap_policy: GapPolicy = "fill",
        predict_path: str | None = None,
        output_frames: Literal["last", "all"] = "last",
        num_frames: int = 3,
        heatmap: HeatmapConfig = HeatmapConfig(),
        frame_size: tuple[int, int] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        val_clips: list[str] | None = None,
        test_clips: list[str] | None = None,
        split_seed: int = 0,
        split: Literal["auto", "folders", "random"] = "auto",
        predict_split: Literal["train", "val", "test", "all"] = "test",
        batch_size: int = 8,
        num_workers: int = 0,
        cache_frames: bool = True,
        normalize: bool = True,
        synthetic: GeneratorSpec = GeneratorSpec(),
        synthetic_dir: str = "data/tracknet_synthetic",
    ) -> None:
        super().__init__()
        if data_root is not None and not Path(data_root).expanduser().is_dir():
            raise FileNotFoundError(f"data_root {data_root!r} does not exist (use data_root: null for generated clips)")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if gap_policy not in ("fill", "skip"):
            raise ValueError(f"gap_policy must be 'fill' or 'skip', got {gap_policy!r}")
        if output_frames not in ("last", "all"):
            raise ValueError(f"output_frames must be 'last' or 'all', got {output_frames!r}")
        if predict_path is not None and not Path(predict_path).expanduser().exists():
            raise FileNotFoundError(f"predict_path {predict_path!r} does not exist (a video file or a folder of "
                                    "frames)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if split not in ("auto", "folders", "random"):
            raise ValueError(f"split must be 'auto', 'folders' or 'random', got {split!r}")
        for key, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= frac < 1:
                raise ValueError(f"{key} must be in [0, 1), got {frac}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction ({val_fraction}) + test_fraction ({test_fraction}) must be < 1 "
                             "(train needs clips)")
        heatmap = HeatmapConfig(**heatmap) if isinstance(heatmap, dict) else heatmap
        heatmap.validate()
        synthetic = GeneratorSpec(**synthetic) if isinstance(synthetic, dict) else synthetic
        synthetic.validate()
        if frame_size is not None and (len(frame_size) != 2 or min(frame_size) < 8):
            raise ValueError(f"frame_size must be [width, height] >= 8, got {frame_size}")
        self.save_hyperparameters()
        self.heatmap, self.synthetic = heatmap, synthetic
        self.frame_size = tuple(frame_size) if frame_size is not None else tuple(heatmap.size)
        self.clips: dict[str, list[ClipLabels]] = {}

    @property
    def root(self) -> Path:
        """The clips' folder: ``data_root``, or a generated folder named after the generator settings."""
        if self.hparams.data_root is not None:
            return Path(self.hparams.data_root).expanduser()
        key = hashlib.sha1(json.dumps(asdict(self.synthetic), sort_keys=True).encode()).hexdigest()[:8]
        return Path(self.hparams.synthetic_dir) / f"seed{self.synthetic.seed}_{key}"

    def prepare_data(self) -> None:
        if self.hparams.data_root is None:
            generate(self.root, **asdict(self.synthetic))

    def discover(self) -> list[ClipLabels]:
        """Parse every clip under the root: folders holding ``label_file`` (named by their relative path) and
        TrackNetV3 rallies ``<match>/csv/<rally>_ball.csv`` (named ``<match>/<rally>``), sorted by name."""
        clips = []
        for f in sorted(self.root.rglob(self.hparams.label_file)):
            clip = read_label_csv(f)
            clip.name = f.parent.relative_to(self.root).as_posix() if f.parent != self.root else f.parent.name
            clips.append(clip)
        rallies: dict[tuple[Path, str], dict[str, Path]] = {}
        for f in sorted(self.root.rglob("*_ball.csv")):
            if f.parent.name not in ("csv", "corrected_csv") or f.name == self.hparams.label_file:
                continue
            rallies.setdefault((f.parent.parent, f.name[: -len("_ball.csv")]), {})[f.parent.name] = f
        for (match, rally), files in sorted(rallies.items()):
            in_test = "test" in (self.root.name, *match.relative_to(self.root).parts)  # under a test/ folder
            f = files["corrected_csv"] if "corrected_csv" in files and (in_test or "csv" not in files) else files["csv"]
            clip = read_label_csv(f, match / "frame" / rally)
            clip.name = (match.relative_to(self.root) / rally).as_posix() if match != self.root else rally
            clips.append(clip)
        if not clips:
            where = f"data_root {str(self.root)!r}" if self.hparams.data_root is not None else str(self.root)
            raise FileNotFoundError(f"{where} holds no clip folders with label_file {self.hparams.label_file!r} and no "
                                    "TrackNetV3 '<match>/csv/<rally>_ball.csv' files")
        names = [c.name for c in clips]
        if len(set(names)) != len(names):
            raise ValueError(f"two clips under {self.root} have the same name: "
                             f"{sorted({n for n in names if names.count(n) > 1})}")
        return sorted(clips, key=lambda c: c.name)

    def preflight(self, stage: str) -> None:
        """Check the input before any run folder exists (``callbacks.protocols.DataPreflight``).

        With ``data_root`` (or ``predict_path`` for ``predict``): every label CSV is parsed (a non-UTF-8, binary or
        malformed file, a missing frame, names the file), the clips are split (``setup`` reuses all of it), and
        every frame image of the stage's clips is checked by :func:`datamodules.image_check.check_image` (a
        corrupt or truncated image names the file; PNG chunk CRCs and the JPEG end marker, no full decode).
        Videos are not decoded here: their packets are counted (``video_info``). The generated default
        (``data_root: null``) comes from adaptlab's generator: only the split of ``synthetic.num_clips`` clips is
        checked and nothing is generated here.
        """
        hp = self.hparams
        if stage == "predict" and hp.predict_path is not None:
            self.setup(stage)
            clips = self.clips["unlabelled"]
        elif hp.data_root is None:
            if hp.val_clips is None and hp.test_clips is None:
                split = dict(zip(("train", "val", "test"), split_clips(
                    [f"clip_{i:04d}" for i in range(self.synthetic.num_clips)], hp.val_fraction, hp.test_fraction,
                    hp.split_seed)))
                if stage == "predict" and hp.predict_split != "all" and not split[hp.predict_split]:
                    raise ValueError(f"predict_split={hp.predict_split!r} has no clips (set test_fraction or "
                                     "predict_split)")
            return
        else:
            self.setup(stage)
            splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, (hp.predict_split,))
            clips = [c for s in splits for c in self.clips[s]]
        for clip in clips:
            if clip.video is None:
                for path in clip.available.values():
                    check_image(path)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "predict" and hp.predict_path is not None:
            if "unlabelled" not in self.clips:
                self.clips["unlabelled"] = scan_unlabelled(hp.predict_path)
            return
        if {"train", "val", "test", "all"} <= set(self.clips):
            return
        clips = {c.name: c for c in self.discover()}
        folders = folder_split(list(clips))
        if hp.split == "folders" and folders is None:
            raise ValueError(f"split: folders, but data_root {str(self.root)!r} has no train/ folder with val/ or "
                             "test/ beside it")
        if hp.val_clips is not None or hp.test_clips is not None:
            val = match_clips(list(clips), hp.val_clips or [], "val_clips")
            test = match_clips(list(clips), hp.test_clips or [], "test_clips")
            both = sorted(set(val) & set(test))
            if both:
                raise ValueError(f"val_clips and test_clips both select {both[:10]}")
            train = sorted(set(clips) - set(val) - set(test))
        elif folders is not None and hp.split != "random":
            train, val, test = folders
            rank_zero_info(f"TrackNet data: split by the train/ val/ test/ folders of {self.root} ({len(train)} / "
                           f"{len(val)} / {len(test)} clips; val_fraction/test_fraction unused)")
        else:
            train, val, test = split_clips(list(clips), hp.val_fraction, hp.test_fraction, hp.split_seed)
        self.clips.update({"train": [clips[n] for n in train], "val": [clips[n] for n in val],
                           "test": [clips[n] for n in test], "all": [clips[n] for n in sorted(clips)]})
        if not self.clips[hp.predict_split] and stage == "predict":
            raise ValueError(f"predict_split={hp.predict_split!r} has no clips (set test_fraction or predict_split)")

    def dataset(self, split: str) -> TrackNetClipDataset | TrackNetStream:
        """The samples of one split (``train``, ``val``, ``test``, ``all``, or ``unlabelled``: a
        :class:`TrackNetStream`); logs one line when its clips have gaps in their frame numbers."""
        hp = self.hparams
        ds = TrackNetClipDataset(self.clips[split], hp.num_frames, self.frame_size, self.heatmap, hp.normalize,
                                 hp.cache_frames, hp.gap_policy, hp.output_frames)
        g = ds.gap_stats
        if g["missing_frames"]:
            done = (f"{g['filled_windows']} windows filled with the nearest earlier frame" if hp.gap_policy == "fill"
                    else f"{g['skipped_windows']} windows skipped")
            rank_zero_info(f"TrackNet data ({split}): {g['missing_frames']} frame numbers missing inside clips; "
                           f"{done} (gap_policy: {hp.gap_policy})")
        return TrackNetStream(ds) if split == "unlabelled" else ds

    def _loader(self, split: str) -> DataLoader:
        hp = self.hparams
        dataset = self.dataset(split)
        workers = hp.num_workers
        if isinstance(dataset, TrackNetStream):  # read in order by one process (bounded memory, one decode/frame)
            workers = min(workers, 1)
        return DataLoader(dataset, batch_size=hp.batch_size, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from the run's seed and resumable mid-epoch (see ``datamodules.resumable``)."""
        hp, ds = self.hparams, self.dataset("train")
        return ResumableDataLoader(ds, batch_size=hp.batch_size, sampler=EpochSeededSampler(len(ds)),
                                   num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("unlabelled" if self.hparams.predict_path is not None else self.hparams.predict_split)
