"""TrackNet data: both CSV styles, bad rows, heat-map targets, frame stacking, generator, split by clip."""

import hashlib
import os
from pathlib import Path

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


def _grey_levels(sample, n):
    return [round(float(sample["frames"][3 * k].mean()) * 255) for k in range(n)]


def test_windows_follow_frame_numbers_not_row_order(tmp_path):
    clip_dir = tmp_path / "clip"
    _frames(clip_dir, 5)  # grey level 10 * frame number
    (clip_dir / "Label.csv").write_text("Frame,Visibility,X,Y\n3,1,4,4\n0,0,0,0\n4,1,5,5\n1,1,2,2\n2,0,0,0\n")
    clip = read_label_csv(clip_dir / "Label.csv")
    assert clip.frame_ids == [0, 1, 2, 3, 4] and [p.name for p in clip.frames] == [f"{i:04d}.png" for i in range(5)]
    assert clip.visible.tolist() == [False, True, False, True, True]
    np.testing.assert_allclose(clip.xy[3], [4, 4])
    ds = TrackNetClipDataset([clip], 3, (40, 20), HeatmapConfig((40, 20), 1.0), normalize=False)
    assert [s["frame"] for s in ds] == [0, 1, 2, 3, 4]
    assert [_grey_levels(ds[k], 3) for k in range(5)] == [[0, 0, 0], [0, 0, 10], [0, 10, 20], [10, 20, 30],
                                                          [20, 30, 40]]
    # v1: file names carry the numbers, so row order does not matter either
    (clip_dir / "Label.csv").write_text("file name,visibility,x-coordinate,y-coordinate,status\n"
                                        "0002.png,0,,,0\n0000.png,1,1,1,0\n0001.png,1,2,2,0\n")
    v1 = read_label_csv(clip_dir / "Label.csv")
    assert v1.frame_ids == [0, 1, 2] and sorted(v1.available) == [0, 1, 2, 3, 4]


def test_gaps_are_filled_or_skipped_and_logged(tmp_path, caplog):
    clip_dir = tmp_path / "clip"
    _frames(clip_dir, 7)
    for n in (2, 5):  # frames 2 and 5 are missing on disk
        (clip_dir / f"{n:04d}.png").unlink()
    Image.fromarray(np.full((20, 40, 3), 70, np.uint8)).save(clip_dir / "0007.png")  # unlabelled frame
    (clip_dir / "Label.csv").write_text("Frame,Visibility,X,Y\n0,0,0,0\n1,0,0,0\n3,0,0,0\n4,1,3,3\n6,0,0,0\n")
    clip = read_label_csv(clip_dir / "Label.csv")
    hm = HeatmapConfig((40, 20), 1.0)
    fill = TrackNetClipDataset([clip], 3, (40, 20), hm, normalize=False, gap_policy="fill")
    assert [s["frame"] for s in fill] == [0, 1, 3, 4, 6]
    assert [_grey_levels(s, 3) for s in fill] == [[0, 0, 0], [0, 0, 10], [10, 10, 30], [10, 30, 40], [40, 40, 60]]
    assert fill.gap_stats == {"missing_frames": 2, "filled_windows": 3, "skipped_windows": 0}
    skip = TrackNetClipDataset([clip], 3, (40, 20), hm, normalize=False, gap_policy="skip")
    assert [s["frame"] for s in skip] == [0, 1]
    assert skip.gap_stats == {"missing_frames": 2, "filled_windows": 0, "skipped_windows": 3}
    dm = TrackNetDataModule(data_root=str(tmp_path), heatmap={"size": [40, 20], "sigma": 1.0}, val_clips=[],
                            test_clips=[], gap_policy="skip", batch_size=2)
    dm.setup("fit")
    with caplog.at_level("INFO"):
        assert len(dm.dataset("train")) == 2
    assert "2 frame numbers missing inside clips; 3 windows skipped (gap_policy: skip)" in caplog.text
    with pytest.raises(ValueError, match="gap_policy"):
        TrackNetDataModule(gap_policy="drop")


def test_duplicate_frame_numbers_name_both_lines(tmp_path):
    clip = tmp_path / "clip"
    _frames(clip, 2, names=["0001.png", "img_1.png"])
    (clip / "Label.csv").write_text("file name,visibility,x-coordinate,y-coordinate,status\n"
                                    "0001.png,0,,,0\nimg_1.png,0,,,0\n")
    with pytest.raises(ValueError, match=r"Label\.csv:3: frame number 1 is labelled twice \(also on line 2\)"):
        read_label_csv(clip / "Label.csv")
    (clip / "Label.csv").write_text("Frame,Visibility,X,Y\n1,0,0,0\n\n1.0,1,2,2\n")
    with pytest.raises(ValueError, match=r"Label\.csv:4: frame '1.0' is labelled twice \(also on line 2\)"):
        read_label_csv(clip / "Label.csv")


def test_utf8_bom_headers_are_accepted(tmp_path):
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    _frames(v2, 2), _frames(v1, 2)
    (v2 / "Label.csv").write_bytes("\ufeffFrame,Visibility,X,Y\r\n0,1,3,4\r\n1,0,0,0\r\n".encode("utf-8"))
    (v1 / "Label.csv").write_bytes("\ufefffile name,visibility,x-coordinate,y-coordinate,status\n"
                                   "0000.png,1,3,4,0\n0001.png,0,,,0\n".encode("utf-8"))
    for clip in (read_label_csv(v2 / "Label.csv"), read_label_csv(v1 / "Label.csv")):
        assert clip.frame_ids == [0, 1] and clip.visible.tolist() == [True, False]
        np.testing.assert_allclose(clip.xy[0], [3, 4])


def test_tracknetv3_layout_beside_clip_folders(tmp_path):
    """``match*/csv/<rally>_ball.csv`` + ``match*/frame/<rally>/<n>.png`` (TrackNetV3), BOM included."""
    for match, rally in (("match1", "1_01_00"), ("match1", "1_02_03"), ("match2", "2_01_00")):
        _frames(tmp_path / "train" / match / "frame" / rally, 4, size=(64, 36), names=[f"{i}.png" for i in range(4)])
        csv_dir = tmp_path / "train" / match / "csv"
        csv_dir.mkdir(parents=True, exist_ok=True)
        (csv_dir / f"{rally}_ball.csv").write_bytes(
            "\ufeffFrame,Visibility,X,Y\n2,1,32,18\n0,0,0,0\n1,1,10,5\n3,0,0,0\n".encode("utf-8"))
    _frames(tmp_path / "train" / "plain_clip", 2, size=(64, 36))
    (tmp_path / "train" / "plain_clip" / "Label.csv").write_text("Frame,Visibility,X,Y\n0,0,0,0\n1,1,1,1\n")
    dm = TrackNetDataModule(data_root=str(tmp_path), heatmap={"size": [32, 18], "sigma": 1.0}, val_clips=[],
                            test_clips=["train/match2/2_01_00"], batch_size=4)
    dm.setup("fit")
    assert [c.name for c in dm.clips["all"]] == ["train/match1/1_01_00", "train/match1/1_02_03",
                                                "train/match2/2_01_00", "train/plain_clip"]
    clip = dm.clips["test"][0]
    assert clip.frame_ids == [0, 1, 2, 3] and clip.src_size == (64, 36)
    assert clip.frames[0] == tmp_path / "train" / "match2" / "frame" / "2_01_00" / "0.png"
    batch = next(iter(dm.test_dataloader()))
    assert batch["xy"][2].tolist() == [16.0, 9.0] and batch["frame"].tolist() == [0, 1, 2, 3]
    bad = tmp_path / "bad" / "m" / "csv"
    bad.mkdir(parents=True)
    (bad / "r_ball.csv").write_text("Frame,Visibility,X,Y\n0,0,0,0\n")
    with pytest.raises(FileNotFoundError, match="frame folder"):
        TrackNetDataModule(data_root=str(tmp_path / "bad")).setup("fit")


def test_v3_disk_targets_centre_on_the_truncated_label(tmp_path):
    """heatmap.centre: v3 draws V3's disk around int(x / (W_src / W)); exact draws it around the float label;
    xy_v3 carries the truncated label for peak_method: v3."""
    from datamodules.tracknet import ClipLabels

    frame = tmp_path / "0.png"
    Image.new("RGB", (40, 20)).save(frame)
    clip = ClipLabels("c", [frame, frame], np.array([True, True]), np.array([[13.9, 7.9], [0.7, 0.9]]), (40, 20),
                      [0, 1], {0: frame, 1: frame})
    size = (40, 20)
    v3 = TrackNetClipDataset([clip], 1, size, HeatmapConfig(size, 2.5, "disk", "v3"))
    exact = TrackNetClipDataset([clip], 1, size, HeatmapConfig(size, 2.5, "disk"))
    assert v3[0]["xy_v3"].tolist() == [13, 7]
    assert torch.equal(v3[0]["heatmap"], render_heatmap(13, 7, True, size, 2.5, "disk"))
    assert not torch.equal(exact[0]["heatmap"], v3[0]["heatmap"])
    assert torch.equal(exact[0]["heatmap"], render_heatmap(13.9, 7.9, True, size, 2.5, "disk"))
    assert v3[1]["heatmap"].sum() == 0 and v3[1]["visible"]  # truncates to (0, 0): V3 draws no ball


def _v3_tree(root, layout):
    """TrackNetV3's data layout: ``<split>/<match>/frame/<rally>/<n>.png`` + ``csv/<rally>_ball.csv``."""
    for split, match, rally in layout:
        _frames(root / split / match / "frame" / rally, 3, size=(64, 36), names=[f"{i}.png" for i in range(3)])
        (root / split / match / "csv").mkdir(parents=True, exist_ok=True)
        (root / split / match / "csv" / f"{rally}_ball.csv").write_text("Frame,Visibility,X,Y\n0,1,10,5\n1,0,0,0\n"
                                                                         "2,0,0,0\n")


def test_v3_folder_split_corrected_test_labels_and_glob_patterns(tmp_path):
    layout = [("train", "match1", "1_01_00"), ("train", "match2", "2_01_00"), ("val", "match1", "1_02_00"),
              ("test", "match3", "3_01_00"), ("test", "match3", "3_02_00")]
    _v3_tree(tmp_path, layout)
    corrected = tmp_path / "test" / "match3" / "corrected_csv"
    corrected.mkdir()
    (corrected / "3_01_00_ball.csv").write_text("Frame,Visibility,X,Y\n0,1,20,30\n1,1,2,3\n2,0,0,0\n")
    # a corrected file outside test/ is not V3's: csv/ stays the label there
    (tmp_path / "train" / "match1" / "corrected_csv").mkdir()
    (tmp_path / "train" / "match1" / "corrected_csv" / "1_01_00_ball.csv").write_text("Frame,Visibility,X,Y\n"
                                                                                       "0,0,0,0\n")
    kw = dict(data_root=str(tmp_path), heatmap={"size": [32, 18], "sigma": 1.0}, batch_size=2)
    dm = TrackNetDataModule(**kw)
    dm.setup("fit")
    names = {s: [c.name for c in dm.clips[s]] for s in ("train", "val", "test")}
    assert names == {"train": ["train/match1/1_01_00", "train/match2/2_01_00"], "val": ["val/match1/1_02_00"],
                     "test": ["test/match3/3_01_00", "test/match3/3_02_00"]}
    fixed = dm.clips["test"][0]
    assert fixed.visible.tolist() == [True, True, False] and fixed.xy[0].tolist() == [20.0, 30.0]
    only_test = TrackNetDataModule(**{**kw, "data_root": str(tmp_path / "test")}, val_fraction=0.0, test_fraction=0.0)
    only_test.setup("fit")  # data_root pointing at V3's test/ folder itself: corrected labels too
    assert only_test.clips["all"][0].xy[0].tolist() == [20.0, 30.0]
    assert dm.clips["train"][0].visible.tolist() == [True, False, False]
    # glob patterns override the folders; the rest trains
    dm = TrackNetDataModule(**kw, val_clips=["test/*"], test_clips=["*/match1/*"])
    dm.setup("fit")
    assert [c.name for c in dm.clips["val"]] == ["test/match3/3_01_00", "test/match3/3_02_00"]
    assert [c.name for c in dm.clips["test"]] == ["train/match1/1_01_00", "val/match1/1_02_00"]
    assert [c.name for c in dm.clips["train"]] == ["train/match2/2_01_00"]
    # split: random ignores the folders
    dm = TrackNetDataModule(**kw, split="random", val_fraction=0.2, test_fraction=0.2)
    dm.setup("fit")
    assert len(dm.clips["val"]) == 1 and len(dm.clips["test"]) == 1
    with pytest.raises(ValueError, match="test_clips: 'nope/\\*' matches no clip"):
        TrackNetDataModule(**kw, test_clips=["nope/*"]).setup("fit")
    flat = tmp_path / "flat"
    _v3_tree(flat, [("", "match1", "1_01_00"), ("", "match1", "1_02_00"), ("", "match1", "1_03_00")])
    with pytest.raises(ValueError, match="split: folders"):
        TrackNetDataModule(data_root=str(flat), split="folders").setup("fit")
    dm = TrackNetDataModule(data_root=str(flat), heatmap={"size": [32, 18], "sigma": 1.0}, val_fraction=0.34,
                            test_fraction=0.0)
    dm.setup("fit")  # no folders: random split by clip
    assert len(dm.clips["val"]) == 1 and len(dm.clips["train"]) == 2


_STREAM_SCRIPT = r"""
import resource, sys
import numpy as np
import av
from datamodules.tracknet import TrackNetDataModule

def write(path, n):
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 176, "yuv420p"
        base = np.indices((176, 320)).sum(0)
        for i in range(n):
            img = np.repeat(((base + 3 * i) % 256).astype(np.uint8)[:, :, None], 3, 2)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())

for n in (60, 480):
    write(f"{sys.argv[1]}/v{n}.mp4", n)
for n in (60, 480):  # the short video first: ru_maxrss is a high-water mark
    path = f"{sys.argv[1]}/v{n}.mp4"
    dm = TrackNetDataModule(heatmap={"size": [320, 176], "sigma": 2.0}, predict_path=path, batch_size=4)
    dm.preflight("predict")
    dm.setup("predict")
    frames = [f for batch in dm.predict_dataloader() for f in batch["frame"].tolist()]
    assert frames == list(range(n)), frames[:10]
    print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def test_video_predict_streams_with_memory_independent_of_length(tmp_path):
    """Peak memory of reading a whole video for predict does not grow with its length: after a 60-frame video,
    a 480-frame one at 320x176 would raise the peak by 71 MB if decoded up front (as before); streamed, < 16 MB."""
    pytest.importorskip("av")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    peak = dict(line.split() for line in out.stdout.strip().splitlines()[-2:])
    assert float(peak["480"]) - float(peak["60"]) < 16, peak


def test_video_frames_are_decoded_once_in_order_and_counted_without_decoding(tmp_path, monkeypatch):
    av = pytest.importorskip("av")
    import datamodules.tracknet as tn

    path = tmp_path / "v.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        for level in range(0, 250, 25):
            frame = av.VideoFrame.from_ndarray(np.full((32, 64, 3), level, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    calls = []
    real = tn.iter_video

    def counting(p, size):
        calls.append(p)
        yield from real(p, size)

    monkeypatch.setattr(tn, "iter_video", counting)
    assert tn.video_info(path) == (10, (64, 32)) and not calls  # counted from packets, nothing decoded
    dm = TrackNetDataModule(heatmap={"size": [64, 32], "sigma": 1.0}, predict_path=str(path), batch_size=3,
                            num_workers=0, normalize=False)
    dm.preflight("predict")
    dm.setup("predict")
    samples = [s for s in dm.dataset("unlabelled")]
    assert calls == [path]  # one decode of the video, frame by frame
    assert [s["frame"] for s in samples] == list(range(10)) and [s["clip_end"] for s in samples] == [False] * 9 + [True]
    assert samples[0]["window"].tolist() == [0, 0, 0] and samples[5]["window"].tolist() == [3, 4, 5]
    levels = [round(float(samples[5]["frames"][3 * k].mean()) * 255) for k in range(3)]
    assert all(abs(a - b) < 8 for a, b in zip(levels, [75, 100, 125]))
