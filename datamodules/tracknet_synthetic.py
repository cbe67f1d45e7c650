"""Procedural TrackNet-style clips: the embedded default data of the TrackNet family.

Writes real clips to disk in the TrackNet layout (a folder per clip with frame images and ``Label.csv``):
a ball in ballistic flight with bounces and new shots, motion blur, size varying with depth, varying
contrast over textured court-like backgrounds with court lines and a net, moving "player" occluders, and
spans where the ball is occluded or out of frame (visibility 0). Everything is deterministic by ``seed``
(each clip draws from its own ``SeedSequence([seed, clip_index])``).

    python -m datamodules.tracknet_synthetic --out data/tracknet_synthetic --clips 12 --frames 48
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

CsvStyle = Literal["v2", "v1"]
#: Column headers of the two TrackNet label styles.
V1_HEADER = ["file name", "visibility", "x-coordinate", "y-coordinate", "status"]
V2_HEADER = ["Frame", "Visibility", "X", "Y"]
MARKER = "generated.json"


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything that determines the generated clips (also written to ``generated.json``)."""

    num_clips: int = 12
    frames_per_clip: int = 48
    width: int = 256
    height: int = 144
    seed: int = 0
    image_format: Literal["png", "jpg"] = "png"
    csv_style: CsvStyle = "v2"

    def validate(self) -> None:
        if self.num_clips < 1 or self.frames_per_clip < 1:
            raise ValueError(
                f"num_clips and frames_per_clip must be >= 1, got {self.num_clips}, {self.frames_per_clip}"
            )
        if self.width < 32 or self.height < 32:
            raise ValueError(f"width and height must be >= 32 pixels, got {self.width}x{self.height}")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {self.image_format!r}")
        if self.csv_style not in ("v1", "v2"):
            raise ValueError(f"csv_style must be 'v1' or 'v2', got {self.csv_style!r}")


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency value noise in [-1, 1] (random grid, bilinearly upsampled)."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = Image.fromarray(rng.uniform(0, 255, (gh, gw)).astype(np.uint8))
    up = np.asarray(grid.resize((gw * cell, gh * cell), Image.BILINEAR), dtype=np.float32)
    return up[:h, :w] / 127.5 - 1.0


def _draw_line(
    img: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], width: float, color: np.ndarray
) -> None:
    """Anti-aliased straight line (distance-to-segment mask), drawn in place."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
    dist = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
    a = np.clip(width / 2 + 0.5 - dist, 0, 1)[..., None]
    img *= 1 - a
    img += a * color


def court_background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A textured court seen from behind: surface colour, grain, perspective lines and a net (float RGB 0..1)."""
    base = rng.choice(np.array([[0.20, 0.45, 0.25], [0.20, 0.35, 0.60], [0.65, 0.35, 0.22], [0.35, 0.40, 0.45]]))
    base = np.clip(base + rng.normal(0, 0.05, 3), 0.05, 0.9).astype(np.float32)
    img = np.ones((h, w, 3), np.float32) * base
    img *= 1 + 0.12 * _smooth_noise(rng, h, w, max(4, w // 8))[..., None]
    img += 0.04 * rng.normal(0, 1, (h, w, 1)).astype(np.float32)
    # Court outline as a trapezoid (far baseline narrow), service line, centre line, net.
    line = np.array([0.92, 0.92, 0.9], np.float32) * rng.uniform(0.8, 1.0)
    lw = max(1.0, w / 200)
    top, bot = rng.uniform(0.12, 0.25) * h, rng.uniform(0.88, 0.97) * h
    half_top, half_bot = rng.uniform(0.18, 0.28) * w, rng.uniform(0.38, 0.47) * w
    cx = w / 2 + rng.uniform(-0.04, 0.04) * w
    tl, tr, bl, br = (cx - half_top, top), (cx + half_top, top), (cx - half_bot, bot), (cx + half_bot, bot)
    for a, b in ((tl, tr), (bl, br), (tl, bl), (tr, br), ((cx, top), (cx, bot))):
        _draw_line(img, a, b, lw, line)
    net_y = top + 0.45 * (bot - top)
    net_half = half_top + 0.45 * (half_bot - half_top) + 0.03 * w
    _draw_line(img, (cx - net_half, net_y), (cx + net_half, net_y), 2.5 * lw, np.array([0.15, 0.15, 0.15], np.float32))
    # Surroundings above the far baseline: darker stands with some texture.
    stands = int(top * 0.8)
    if stands > 0:
        img[:stands] = img[:stands] * 0.45 + 0.1 * (1 + _smooth_noise(rng, stands, w, 3)[..., None])
    return np.clip(img, 0, 1)


@dataclass
class _Occluder:
    x: float
    y: float
    rx: float
    ry: float
    vx: float
    color: np.ndarray

    def mask(self, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        return ((xx - self.x) / self.rx) ** 2 + ((yy - self.y) / self.ry) ** 2 <= 1.0


def _trajectory(rng: np.random.Generator, n: int, w: int, h: int, sub: int) -> tuple[np.ndarray, np.ndarray]:
    """Ball centres at ``sub`` sub-steps per frame (``(n*sub, 2)``) and a per-frame status
    (0 flying, 1 hit, 2 bounce) following the TrackNet v1 ``status`` column. Shots are random; one hit
    between a third and half of the clip is a lob that leaves the frame (an out-of-frame span)."""
    g = rng.uniform(0.6, 1.0) * h / 144  # gravity in px / frame^2, y grows downwards
    ground = rng.uniform(0.75, 0.95) * h
    restitution = rng.uniform(0.55, 0.75)
    pos = np.array([rng.uniform(0.2, 0.8) * w, rng.uniform(0.3, 0.7) * h])

    def shot() -> np.ndarray:
        speed = rng.uniform(3, 9) * w / 256
        toward = rng.uniform(0.15, 0.85) * w - pos[0]
        return np.array([np.sign(toward) * speed * rng.uniform(0.4, 1.0), -rng.uniform(2, 7) * h / 144])

    def lob() -> np.ndarray:  # a high shot whose apex leaves the top of the frame for a few frames
        apex_above = rng.uniform(0.03, 0.1) * h
        return np.array([rng.uniform(-2, 2) * w / 256, -np.sqrt(2 * g * (max(pos[1], 0) + apex_above))])

    vel = shot()
    next_hit = int(rng.integers(12, 30))
    lob_at = int(rng.integers(n // 3, max(n // 3 + 1, n // 2)))  # this hit is a lob out of frame

    out = np.zeros((n * sub, 2))
    status = np.zeros(n, np.int64)
    for f in range(n):
        far = not (-0.15 * w < pos[0] < 1.15 * w) or pos[1] > 1.2 * h
        if far or f in (next_hit, lob_at):
            if far:  # far off frame: a new rally starts inside it
                pos = np.array([rng.uniform(0.2, 0.8) * w, rng.uniform(0.4, 0.8) * h])
            if far or (0 <= pos[0] < w and 0.4 * h <= pos[1] < h):
                vel = lob() if f == lob_at else shot()
                status[f] = 1
                next_hit = f + int(rng.integers(12, 30))
            else:  # high up or just outside the frame: nobody can hit it yet
                next_hit, lob_at = (f + 1, f + 1) if f == lob_at else (f + 1, lob_at)
        for s in range(sub):
            vel[1] += g / sub
            pos = pos + vel / sub
            if pos[1] > ground and vel[1] > 0:
                pos[1] = 2 * ground - pos[1]
                vel[1] = -vel[1] * restitution
                vel[0] *= 0.9
                status[f] = 2
            out[f * sub + s] = pos
    return out, status


def render_clip(
    rng: np.random.Generator, n: int, w: int, h: int
) -> tuple[list[np.ndarray], list[tuple[int, float, float, int]]]:
    """Frames (uint8 HxWx3) and labels ``(visibility, x, y, status)`` of one clip."""
    sub = 5  # sub-steps per frame; the exposure spans the sub-steps around the frame time
    bg = court_background(rng, w, h)
    path, status = _trajectory(rng, n, w, h, sub)
    base_r = rng.uniform(2.0, 3.5) * w / 256
    contrast = rng.uniform(0.35, 1.0)
    ball_tint = rng.choice(np.array([[1.0, 1.0, 0.55], [1.0, 1.0, 1.0], [0.85, 1.0, 0.3]])).astype(np.float32)
    exposure = rng.uniform(0.3, 1.0)  # fraction of the frame interval the shutter is open (blur length)
    occluders = [
        _Occluder(rng.uniform(0, w), rng.uniform(0.35, 0.8) * h, rng.uniform(0.04, 0.07) * w,
                  rng.uniform(0.12, 0.22) * h, rng.choice([-1, 1]) * rng.uniform(1.0, 3.0) * w / 256,
                  rng.uniform(0.05, 0.9, 3).astype(np.float32))
        for _ in range(int(rng.integers(1, 3)))
    ]
    # The first "player" walks through the ball's position at a frame of the middle half: an occluded span.
    f_occ = int(rng.integers(n // 4, max(n // 4 + 1, 3 * n // 4)))
    bx, by = path[f_occ * sub + sub // 2]
    oy = float(np.clip(by, 0.35 * h, 0.8 * h))  # players stand on the court
    if 0 <= bx < w and abs(by - oy) < 0.7 * occluders[0].ry:
        occluders[0].x, occluders[0].y = bx - occluders[0].vx * f_occ, oy
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames, labels = [], []
    for f in range(n):
        img = bg * (1 + rng.normal(0, 0.02))  # slight brightness flicker
        centre = path[f * sub + sub // 2]
        r = base_r * (0.6 + 0.8 * np.clip(centre[1] / h, 0, 1))  # nearer (lower) = larger
        times = np.linspace(-exposure / 2, exposure / 2, 7)
        k = np.clip(f * sub + sub // 2 + times * sub, 0, n * sub - 1)
        pts = np.stack([np.interp(k, np.arange(n * sub), path[:, i]) for i in (0, 1)], 1)
        x0, x1 = int(max(0, pts[:, 0].min() - r - 2)), int(min(w, pts[:, 0].max() + r + 3))
        y0, y1 = int(max(0, pts[:, 1].min() - r - 2)), int(min(h, pts[:, 1].max() + r + 3))
        if x0 < x1 and y0 < y1:  # motion blur: average of anti-aliased discs along the exposure
            bx, by = xx[y0:y1, x0:x1], yy[y0:y1, x0:x1]
            alpha = np.mean([np.clip(r + 0.5 - np.hypot(bx - px, by - py), 0, 1) for px, py in pts], 0)[..., None]
            patch = img[y0:y1, x0:x1]
            colour = patch.mean((0, 1)) * (1 - contrast) + ball_tint * contrast
            img[y0:y1, x0:x1] = patch * (1 - alpha) + alpha * colour
        hidden = False
        for o in occluders:
            m = o.mask(xx, yy)
            shade = o.color * (0.8 + 0.2 * (yy[m] / h))[:, None]
            img[m] = shade
            hidden |= bool(o.mask(np.array(centre[0]), np.array(centre[1])))
            o.x += o.vx
        img = img + rng.normal(0, 0.015, img.shape).astype(np.float32)
        frames.append((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
        inside = 0 <= centre[0] < w and 0 <= centre[1] < h
        if inside and not hidden:
            labels.append((1, float(centre[0]), float(centre[1]), int(status[f])))
        else:
            labels.append((0, 0.0, 0.0, int(status[f])))
    return frames, labels


def write_clip(clip_dir: Path, frames: list[np.ndarray], labels: list[tuple[int, float, float, int]],
               image_format: str, csv_style: CsvStyle) -> None:
    """Write frames as ``0000.png``... and ``Label.csv`` in the chosen column style."""
    clip_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i, frame in enumerate(frames):
        name = f"{i:04d}.{image_format}"
        kwargs = {"quality": 92} if image_format == "jpg" else {}
        Image.fromarray(frame).save(clip_dir / name, **kwargs)
        names.append(name)
    with open(clip_dir / "Label.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(V1_HEADER if csv_style == "v1" else V2_HEADER)
        for i, (vis, x, y, status) in enumerate(labels):
            if csv_style == "v1":
                writer.writerow([names[i], vis, f"{x:.2f}" if vis else "", f"{y:.2f}" if vis else "", status])
            else:
                writer.writerow([i, vis, f"{x:.2f}", f"{y:.2f}"])


def generate(out: str | Path, num_clips: int = 12, frames_per_clip: int = 48, width: int = 256, height: int = 144,
             seed: int = 0, image_format: Literal["png", "jpg"] = "png", csv_style: CsvStyle = "v2",
             progress: bool = True) -> list[Path]:
    """Write ``num_clips`` clips ``out/clip_0000``... and a ``generated.json`` marker; returns the clip folders.

    An existing folder generated with the same settings is reused as is (the marker is written last, so an
    interrupted run is regenerated). A non-empty folder without a matching marker is refused, so existing
    data is never overwritten.
    """
    spec = GeneratorSpec(num_clips, frames_per_clip, width, height, seed, image_format, csv_style)
    spec.validate()
    out = Path(out)
    marker = out / MARKER
    clips = [out / f"clip_{i:04d}" for i in range(num_clips)]
    if marker.is_file():
        if json.loads(marker.read_text()) == asdict(spec):
            return clips
        raise FileExistsError(f"{out} holds clips generated with other settings ({marker}); choose another --out")
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith("clip_")):
        raise FileExistsError(f"{out} is not empty and was not written by the generator; choose another --out")
    for i in tqdm(range(num_clips), desc="generating TrackNet clips", unit="clip", disable=not progress):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        frames, labels = render_clip(rng, frames_per_clip, width, height)
        write_clip(clips[i], frames, labels, image_format, csv_style)
    marker.write_text(json.dumps(asdict(spec), indent=1))
    return clips


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m datamodules.tracknet_synthetic")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per clip)")
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--frames", type=int, default=48, help="frames per clip")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=144)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    p.add_argument("--csv-style", choices=("v2", "v1"), default="v2",
                   help="v2: Frame,Visibility,X,Y; v1: file name,visibility,x-coordinate,y-coordinate,status")
    a = p.parse_args(argv)
    clips = generate(a.out, a.clips, a.frames, a.width, a.height, a.seed, a.format, a.csv_style)
    print(f"wrote {len(clips)} clips to {a.out}")


if __name__ == "__main__":
    main()
