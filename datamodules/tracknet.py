"""TrackNet clips: a folder per clip with frame images and a label CSV, as heat-map training samples.

Layout (searched recursively under ``data_root``): every folder holding ``label_file`` is a clip.
Both TrackNet column styles are read:

- v1: ``file name,visibility,x-coordinate,y-coordinate,status`` (``file name`` relative to the clip folder);
- v2/v3: ``Frame,Visibility,X,Y`` (``Frame`` = the integer in a frame file's name: ``0.png``, ``0007.jpg``).

Visibility 0 means "no ball" (coordinates ignored, may be empty); any other value (v1's 1/2/3) means the
labelled position is the target. A sample is ``num_frames`` consecutive frames stacked on channels, oldest
first and the labelled frame last (the first frames of a clip repeat frame 0), so every labelled frame has
exactly one sample. Targets are rendered at ``heatmap.size`` with coordinates rescaled from the clip's
source resolution; invisible frames give an all-zero map. Train/val/test are split by clip, never by frame.
Without ``data_root`` the procedural generator (:mod:`datamodules.tracknet_synthetic`) writes the default
clips under ``synthetic_dir`` first.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.tracknet_synthetic import GeneratorSpec, generate
from models.vision.tracknet import HeatmapConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: ImageNet statistics (timm ViT defaults) used to normalise every frame.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_V1 = ("file name", "visibility", "x-coordinate", "y-coordinate")
_V2 = ("frame", "visibility", "x", "y")


@dataclass
class ClipLabels:
    """One clip: frame files in label order, visibility (bool), ball centre in source pixels, source size."""

    name: str
    frames: list[Path]
    visible: np.ndarray
    xy: np.ndarray
    src_size: tuple[int, int]  # (width, height)
    frame_ids: list[int] = field(default_factory=list)


def _frame_index(clip_dir: Path) -> dict[int, Path]:
    """Frame number -> image file, from names whose stem ends in digits (``0.png``, ``img_0007.jpg``)."""
    out: dict[int, Path] = {}
    for p in clip_dir.iterdir():
        m = re.search(r"(\d+)$", p.stem)
        if p.suffix.lower() in IMAGE_SUFFIXES and m:
            out.setdefault(int(m.group(1)), p)
    return out


def read_label_csv(path: str | Path) -> ClipLabels:
    """Parse a TrackNet label CSV (either column style) and resolve its frame files.

    Raises:
        ValueError: unknown header, or a bad row (non-numeric or missing values, visible coordinates
            outside the image, duplicate frames); the message names the file and the line number.
        FileNotFoundError: a row names a frame image that does not exist (file and line named).
    """
    path = Path(path)
    clip_dir = path.parent
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError(f"{path}: empty label file")
    header = [h.strip().lower() for h in rows[0]]
    if all(c in header for c in _V1):
        style, cols = "v1", [header.index(c) for c in _V1]
        index: dict[int, Path] = {}
    elif all(c in header for c in _V2):
        style, cols = "v2", [header.index(c) for c in _V2]
        index = _frame_index(clip_dir)
    else:
        raise ValueError(
            f"{path}:1: unknown label header {rows[0]}; expected "
            "'file name,visibility,x-coordinate,y-coordinate,status' or 'Frame,Visibility,X,Y'"
        )
    frames: list[Path] = []
    frame_ids: list[int] = []
    vis: list[bool] = []
    xy: list[tuple[float, float]] = []
    seen: set[Path] = set()
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
            fid = len(frames)
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
            raise ValueError(f"{where}: frame {key!r} is labelled twice")
        seen.add(frame)
        frames.append(frame)
        frame_ids.append(fid)
        vis.append(v > 0)
        xy.append((x, y))
    if not frames:
        raise ValueError(f"{path}: no labelled frames")
    with Image.open(frames[0]) as im:
        size = im.size
    xy_arr = np.asarray(xy, np.float32).reshape(-1, 2)
    vis_arr = np.asarray(vis, bool)
    outside = vis_arr & ((xy_arr[:, 0] > size[0]) | (xy_arr[:, 1] > size[1]))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"{path}:{_line_of(rows, i)}: visible ball at ({xy_arr[i, 0]}, {xy_arr[i, 1]}) lies outside the "
            f"{size[0]}x{size[1]} frame"
        )
    return ClipLabels(clip_dir.name, frames, vis_arr, xy_arr, size, frame_ids)


def _line_of(rows: list[list[str]], k: int) -> int:
    """File line number of the k-th non-empty data row."""
    seen = -1
    for line, row in enumerate(rows[1:], start=2):
        if any(c.strip() for c in row):
            seen += 1
            if seen == k:
                return line
    return len(rows)


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
    """One sample per labelled frame: stacked frames, target heat map and the label for metrics/predict."""

    def __init__(self, clips: list[ClipLabels], num_frames: int, frame_size: tuple[int, int],
                 heatmap: HeatmapConfig, normalize: bool = True, cache_frames: bool = False) -> None:
        self.clips, self.num_frames, self.frame_size = clips, num_frames, tuple(frame_size)
        self.heatmap, self.normalize = heatmap, normalize
        self.index = [(c, i) for c, clip in enumerate(clips) for i in range(len(clip.frames))]
        self._cache: dict[Path, torch.Tensor] | None = {} if cache_frames else None
        self._mean = torch.tensor(MEAN).view(3, 1, 1)
        self._std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.index)

    def _load(self, path: Path) -> torch.Tensor:
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

    def __getitem__(self, k: int) -> dict[str, Any]:
        c, i = self.index[k]
        clip = self.clips[c]
        idx = [max(0, j) for j in range(i - self.num_frames + 1, i + 1)]
        frames = torch.stack([self._load(clip.frames[j]) for j in idx]).float() / 255.0
        if self.normalize:
            frames = (frames - self._mean) / self._std
        sw, sh = clip.src_size
        hw, hh = self.heatmap.size
        x, y = float(clip.xy[i, 0]) * hw / sw, float(clip.xy[i, 1]) * hh / sh
        visible = bool(clip.visible[i])
        return {
            "frames": frames.flatten(0, 1),  # (num_frames*3, H, W)
            "heatmap": render_heatmap(x, y, visible, (hw, hh), self.heatmap.sigma, self.heatmap.mode),
            "xy": torch.tensor([x, y] if visible else [0.0, 0.0]),
            "visible": torch.tensor(visible),
            "src_size": torch.tensor([sw, sh]),
            "clip": clip.name,
            "frame": clip.frame_ids[i],
        }


class TrackNetDataModule(L.LightningDataModule):
    """TrackNet clips (or generated ones) as ``{"frames", "heatmap", "xy", "visible", ...}`` batches.

    Args:
        data_root: folder searched recursively for clip folders holding ``label_file``; ``None`` = generate
            the default clips (``synthetic``) under ``synthetic_dir`` (reused when already there).
        label_file: label CSV name inside each clip folder.
        num_frames: consecutive frames stacked on channels (input has ``3 * num_frames`` channels).
        heatmap: target size ``[W, H]``, ``sigma`` (Gaussian std or disk radius, heat-map pixels), ``mode``.
            Must equal the model's ``heatmap`` (the TrackNet module checks).
        frame_size: input frame size ``[W, H]``; ``None`` = ``heatmap.size``.
        val_fraction: share of clips in the validation split.
        test_fraction: share of clips in the test split.
        val_clips: validation clips by name (instead of ``val_fraction``; the rest train).
        test_clips: test clips by name (instead of ``test_fraction``).
        split_seed: seed of the split by clip.
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
        num_frames: int = 3,
        heatmap: HeatmapConfig = HeatmapConfig(),
        frame_size: tuple[int, int] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        val_clips: list[str] | None = None,
        test_clips: list[str] | None = None,
        split_seed: int = 0,
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for key, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= frac < 1:
                raise ValueError(f"{key} must be in [0, 1), got {frac}")
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
        """Parse every clip under the root (sorted by relative folder path, which becomes the clip name)."""
        files = sorted(self.root.rglob(self.hparams.label_file))
        if not files:
            raise FileNotFoundError(f"no clip folders with {self.hparams.label_file!r} under {self.root}")
        clips = []
        for f in files:
            clip = read_label_csv(f)
            clip.name = f.parent.relative_to(self.root).as_posix() if f.parent != self.root else f.parent.name
            clips.append(clip)
        return clips

    def setup(self, stage: str | None = None) -> None:
        if self.clips:
            return
        hp = self.hparams
        clips = {c.name: c for c in self.discover()}
        if hp.val_clips is not None or hp.test_clips is not None:
            val, test = list(hp.val_clips or []), list(hp.test_clips or [])
            unknown = [n for n in val + test if n not in clips]
            if unknown:
                raise ValueError(f"val_clips/test_clips name unknown clips {unknown}; clips: {sorted(clips)[:20]}")
            train = sorted(set(clips) - set(val) - set(test))
        else:
            train, val, test = split_clips(list(clips), hp.val_fraction, hp.test_fraction, hp.split_seed)
        self.clips = {"train": [clips[n] for n in train], "val": [clips[n] for n in val],
                      "test": [clips[n] for n in test], "all": [clips[n] for n in sorted(clips)]}
        if not self.clips[hp.predict_split] and stage == "predict":
            raise ValueError(f"predict_split={hp.predict_split!r} has no clips (set test_fraction or predict_split)")

    def dataset(self, split: str) -> TrackNetClipDataset:
        hp = self.hparams
        return TrackNetClipDataset(self.clips[split], hp.num_frames, self.frame_size, self.heatmap, hp.normalize,
                                   hp.cache_frames)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        hp = self.hparams
        return DataLoader(self.dataset(split), batch_size=hp.batch_size, shuffle=shuffle, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.predict_split)
