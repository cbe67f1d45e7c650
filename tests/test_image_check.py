"""Image checks of the DataModules' preflight: damaged files are named, complete files pass, PNG/JPEG are checked
without decoding their pixels, and preflight reads only what ``setup`` would (and ``setup`` reuses it)."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

import datamodules.continual as continual
import datamodules.glyphs as glyphs
from datamodules.continual import ClassIncrementalDataModule
from datamodules.image_check import check_image, decode_rgb
from datamodules.tracknet import TrackNetDataModule
from tests.continual_helpers import write_image_folder

FORMATS = ["PNG", "JPEG", "BMP", "GIF", "WEBP"]


def _encoded(fmt: str, size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_complete_images_pass_and_damaged_ones_are_named(tmp_path, fmt):
    data = _encoded(fmt)
    good, half, garbage = tmp_path / f"good.{fmt}", tmp_path / f"half.{fmt}", tmp_path / f"junk.{fmt}"
    good.write_bytes(data)
    half.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(b"\x00" * 10 + data[10:])  # the header destroyed
    check_image(good)
    assert decode_rgb(good).shape == (32, 48, 3)
    for bad in (half, garbage):
        with pytest.raises(OSError, match=f"image '{bad}' is corrupt or truncated"):
            check_image(bad)
        with pytest.raises(OSError, match=f"image '{bad}' is corrupt or truncated"):
            decode_rgb(bad)


def test_jpeg_cut_before_its_end_marker_fails_and_trailing_bytes_after_it_pass(tmp_path):
    data = _encoded("JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[:-2])  # only the end-of-image marker missing
    (tmp_path / "trailer.jpg").write_bytes(data + b"camera trailer")  # complete image, bytes after the marker
    (tmp_path / "padded.jpg").write_bytes(data + b"\x00" * 16)
    with pytest.raises(OSError, match="cut.jpg"):
        check_image(tmp_path / "cut.jpg")
    check_image(tmp_path / "trailer.jpg")
    check_image(tmp_path / "padded.jpg")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(OSError, match="missing.png' cannot be read"):
        check_image(tmp_path / "missing.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_complete_png_and_jpeg_are_checked_without_decoding_pixels(tmp_path, monkeypatch, fmt):
    (tmp_path / "ok").write_bytes(_encoded(fmt))

    def no_decode(self):
        raise AssertionError("decoded the pixels")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    check_image(tmp_path / "ok")
    with pytest.raises(AssertionError, match="decoded the pixels"):  # the patch does stop a full decode
        decode_rgb(tmp_path / "ok")


def _clip(folder, n=3, size=(32, 16)):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "Label.csv").write_text("Frame,Visibility,X,Y\n" + "".join(f"{i},1,5,5\n" for i in range(n)))


def test_tracknet_preflight_checks_the_stage_clips_and_setup_reuses_them(tmp_path, monkeypatch):
    for name in ("a", "b", "c"):
        _clip(tmp_path / name)
    data = (tmp_path / "c" / "1.png").read_bytes()
    (tmp_path / "c" / "1.png").write_bytes(data[: len(data) // 2])
    dm = TrackNetDataModule(data_root=str(tmp_path), heatmap={"size": [32, 16], "sigma": 1.0}, val_clips=["b"],
                            test_clips=["c"])
    dm.preflight("fit")  # clip c is only in the test split
    monkeypatch.setattr(dm, "discover", lambda: pytest.fail("setup parsed the label files again"))
    dm.setup("fit")
    assert [c.name for c in dm.clips["train"]] == ["a"]
    with pytest.raises(OSError, match="c/1.png' is corrupt or truncated"):
        dm.preflight("test")


def test_tracknet_preflight_of_generated_clips_writes_nothing(in_tmp):
    dm = TrackNetDataModule(synthetic={"num_clips": 4}, val_fraction=0.25, test_fraction=0.25)
    dm.preflight("fit")
    assert not (in_tmp / "data").exists()
    with pytest.raises(ValueError, match="2 clips cannot be split"):
        TrackNetDataModule(synthetic={"num_clips": 2}, val_fraction=0.25, test_fraction=0.25).preflight("fit")


def test_continual_preflight_reads_image_folders_once_and_renders_no_glyphs(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=5)
    dm = ClassIncrementalDataModule("image_folder", root=str(root), init_cls=1, increment=1, image_size=8)
    dm.preflight("fit")
    monkeypatch.setattr(continual, "load_image_folder", lambda root: pytest.fail("setup read the images again"))
    dm.setup("fit")
    assert len(dm.task_dataset("train", 1)) > 0
    monkeypatch.setattr(glyphs, "render_pool", lambda *a, **k: pytest.fail("preflight rendered the glyphs"))
    ClassIncrementalDataModule("glyphs", glyph_classes=10, init_cls=5).preflight("fit")


def test_tracknet_predict_path_frames_are_checked(tmp_path):
    _clip(tmp_path / "video_frames")
    data = (tmp_path / "video_frames" / "2.png").read_bytes()
    (tmp_path / "video_frames" / "2.png").write_bytes(data[:-40])
    dm = TrackNetDataModule(predict_path=str(tmp_path / "video_frames"), heatmap={"size": [32, 16], "sigma": 1.0})
    with pytest.raises(OSError, match="video_frames/2.png' is corrupt or truncated"):
        dm.preflight("predict")
