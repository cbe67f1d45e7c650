"""TrackNet data: both CSV styles, bad rows, heat-map targets, frame stacking, generator, split by clip."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.tracknet import (
    TrackNetClipDataset,
    TrackNetDataModule,
    read_label_csv,
    render_heatmap,
    split_clips,
)
from datamodules.tracknet_synthetic import generate
from datamodules.tracknet_synthetic import main as generator_main
from models.vision.tracknet import HeatmapConfig


def _frames(clip, n=4, size=(40, 20), names=None):
    clip.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i:04d}.png" for i in range(n)]
    for i, name in enumerate(names):
        Image.fromarray(np.full((size[1], size[0], 3), 10 * i, np.uint8)).save(clip / name)
    return names


def test_both_csv_styles_parse_to_the_same_labels(tmp_path):
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    names = _frames(v1, 3)
    _frames(v2, 3, names=["0.jpg", "1.jpg", "2.jpg"])
    (v1 / "Label.csv").write_text(
        "file name,visibility,x-coordinate,y-coordinate,status\n"
        f"{names[0]},1,10.5,4,0\n{names[1]},0,,,0\n{names[2]},3,39,19.5,2\n"
    )
    (v2 / "Label.csv").write_text("Frame,Visibility,X,Y\n0,1,10.5,4\n1,0,0,0\n\n2,1,39,19.5\n")
    a, b = read_label_csv(v1 / "Label.csv"), read_label_csv(v2 / "Label.csv")
    for clip in (a, b):
        assert clip.visible.tolist() == [True, False, True]
        np.testing.assert_allclose(clip.xy, [[10.5, 4], [0, 0], [39, 19.5]])
        assert clip.src_size == (40, 20)
    assert [p.name for p in a.frames] == names and [p.name for p in b.frames] == ["0.jpg", "1.jpg", "2.jpg"]
    assert b.frame_ids == [0, 1, 2]


@pytest.mark.parametrize(
    "body, line, fragment",
    [
        ("Frame,Visibility,X,Y\n0,1,1,1\n1,1,abc,2\n", 3, "numeric x/y"),
        ("Frame,Visibility,X,Y\n0,1,1,1\n1,yes,1,2\n", 3, "visibility 'yes'"),
        ("Frame,Visibility,X,Y\n0,1,1,1\n7,1,1,2\n", 3, "no image for Frame 7"),
        ("Frame,Visibility,X,Y\n0,1,1,1\n1,1,1\n", 3, "columns"),
        ("Frame,Visibility,X,Y\n0,1,1,1\n0,1,1,1\n", 3, "labelled twice"),
        ("Frame,Visibility,X,Y\n0,1,1,1\n\n1,1,99,2\n", 4, "outside the 40x20 frame"),
        ("Frame,Visibility,X,Y\n0,1,-3,1\n", 2, ">= 0"),
        ("frame_id,vis,x,y\n0,1,1,1\n", 1, "unknown label header"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, body, line, fragment):
    clip = tmp_path / "clip"
    _frames(clip, 2)
    (clip / "Label.csv").write_text(body)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        read_label_csv(clip / "Label.csv")
    msg = str(e.value)
    assert f"{clip / 'Label.csv'}:{line}:" in msg and fragment in msg, msg


def test_v1_missing_image_is_named(tmp_path):
    clip = tmp_path / "clip"
    _frames(clip, 1)
    (clip / "Label.csv").write_text(
        "file name,visibility,x-coordinate,y-coordinate,status\n0000.png,0,,,0\nmissing.png,1,2,2,0\n"
    )
    with pytest.raises(FileNotFoundError, match=r"Label\.csv:3: frame image .*missing\.png"):
        read_label_csv(clip / "Label.csv")


@pytest.mark.parametrize("mode", ["gaussian", "disk"])
def test_heatmap_peak_at_label_and_empty_when_invisible(mode):
    hm = render_heatmap(17.0, 5.0, True, (32, 12), 2.0, mode)
    assert hm.shape == (1, 12, 32) and hm.max() == 1.0
    ys, xs = torch.nonzero(hm[0] == hm.max(), as_tuple=True)
    assert (17, 5) in list(zip(xs.tolist(), ys.tolist()))
    if mode == "gaussian":
        assert int(hm[0].flatten().argmax()) == 5 * 32 + 17
        assert hm[0, 5, 19] == pytest.approx(np.exp(-4 / 8))  # 2 px away: exp(-d^2 / 2 sigma^2)
    else:
        assert hm[0, 5, 19] == 1.0 and hm[0, 5, 20] == 0.0 and hm.sum() == 13  # radius-2 disk
    assert render_heatmap(17.0, 5.0, False, (32, 12), 2.0, mode).abs().sum() == 0


def test_dataset_rescales_coordinates_and_stacks_frames(tmp_path):
    clip_dir = tmp_path / "clip"
    _frames(clip_dir, 4, size=(80, 40))
    (clip_dir / "Label.csv").write_text("Frame,Visibility,X,Y\n0,1,40,20\n1,0,0,0\n2,1,60,10\n3,1,8,36\n")
    clip = read_label_csv(clip_dir / "Label.csv")
    ds = TrackNetClipDataset([clip], num_frames=3, frame_size=(16, 8), heatmap=HeatmapConfig((20, 10), 1.0),
                             normalize=False)
    assert len(ds) == 4
    s = ds[2]
    assert s["frames"].shape == (9, 8, 16) and s["heatmap"].shape == (1, 10, 20)
    # Frames are stacked oldest first: frames 0, 1, 2 (grey levels 0, 10, 20).
    assert [round(float(s["frames"][3 * k].mean()) * 255) for k in range(3)] == [0, 10, 20]
    assert s["xy"].tolist() == [15.0, 2.5]  # (60, 10) in an 80x40 source -> 20x10 heat map
    assert int(s["heatmap"][0].flatten().argmax()) in (2 * 20 + 15, 3 * 20 + 15)
    first = ds[0]  # the clip start repeats frame 0
    assert torch.equal(first["frames"][:3], first["frames"][6:])
    assert ds[1]["heatmap"].sum() == 0 and not ds[1]["visible"]
    assert ds[3]["frame"] == 3 and ds[3]["src_size"].tolist() == [80, 40]


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_generator_is_deterministic_and_realistic(tmp_path):
    kw = dict(num_clips=2, frames_per_clip=40, width=96, height=64, progress=False)
    a = generate(tmp_path / "a", seed=3, **kw)
    generate(tmp_path / "b", seed=3, **kw)
    generate(tmp_path / "c", seed=4, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    assert len(list(a[0].glob("*.png"))) == 40
    clips = [read_label_csv(c / "Label.csv") for c in a]
    vis = np.concatenate([c.visible for c in clips])
    assert 0.3 < vis.mean() < 1.0  # occluded / out-of-frame spans exist, but the ball is mostly seen
    # The ball stands out: at visible labels the frame differs from the same spot a few frames later.
    clip = clips[0]
    diffs = []
    for i in np.flatnonzero(clip.visible)[:10]:
        x, y = np.round(clip.xy[i]).astype(int)
        now = np.asarray(Image.open(clip.frames[i]), np.float32)[y, x]
        later = np.asarray(Image.open(clip.frames[(i + 8) % 40]), np.float32)[y, x]
        diffs.append(np.abs(now - later).max())
    assert np.median(diffs) > 10
    with pytest.raises(FileExistsError, match="other settings"):
        generate(tmp_path / "a", seed=5, **kw)


def test_generator_command_line_writes_v1_jpg(tmp_path, capsys):
    generator_main(["--out", str(tmp_path / "g"), "--clips", "1", "--frames", "5", "--width", "64", "--height",
                    "48", "--format", "jpg", "--csv-style", "v1"])
    assert "wrote 1 clips" in capsys.readouterr().out
    header = (tmp_path / "g" / "clip_0000" / "Label.csv").read_text().splitlines()[0]
    assert header == "file name,visibility,x-coordinate,y-coordinate,status"
    clip = read_label_csv(tmp_path / "g" / "clip_0000" / "Label.csv")
    assert len(clip.frames) == 5 and clip.frames[0].suffix == ".jpg" and clip.src_size == (64, 48)


def test_datamodule_generates_fallback_and_splits_by_clip(in_tmp):
    dm = TrackNetDataModule(heatmap={"size": [32, 16], "sigma": 1.5}, val_fraction=0.25, test_fraction=0.25,
                            batch_size=4, synthetic={"num_clips": 4, "frames_per_clip": 6, "width": 64, "height": 32})
    dm.prepare_data()
    dm.setup("fit")
    names = {s: {c.name for c in dm.clips[s]} for s in ("train", "val", "test")}
    assert all(names.values()) and not (names["train"] & names["val"]) and not (names["val"] & names["test"])
    assert len(names["train"] | names["val"] | names["test"]) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].shape == (4, 9, 16, 32) and batch["heatmap"].shape == (4, 1, 16, 32)
    assert (in_tmp / "data" / "tracknet_synthetic").is_dir()


def test_split_and_root_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_root"):
        TrackNetDataModule(data_root=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="cannot be split"):
        split_clips(["a", "b"], 0.5, 0.5, 0)
    with pytest.raises(ValueError, match="heatmap.sigma"):
        TrackNetDataModule(heatmap={"size": [32, 16], "sigma": 0})
    (tmp_path / "empty").mkdir()
    dm = TrackNetDataModule(data_root=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="Label.csv"):
        dm.setup("fit")
