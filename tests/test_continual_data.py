"""Class-incremental DataModule: class order, task splits, CIFAR-100 layout, image folders, errors."""

import numpy as np
import pytest
import torch

from datamodules.continual import ClassIncrementalDataModule, class_order, task_sizes
from datamodules.digits import load_digits_tensors
from tests.continual_helpers import write_cifar100, write_image_folder


def test_class_order_matches_pilot_convention():
    np.random.seed(1993)
    expected = np.random.permutation(100)
    assert np.array_equal(class_order(100, 1993), expected)
    assert np.array_equal(class_order(10, None), np.arange(10))


@pytest.mark.parametrize("n,init,inc,expected", [(100, 10, 10, [10] * 10), (10, 2, 2, [2] * 5),
                                                 (10, 4, 3, [4, 3, 3]), (10, 3, 4, [3, 4, 3]), (10, 10, 5, [10])])
def test_task_sizes(n, init, inc, expected):
    assert task_sizes(n, init, inc) == expected


def test_digits_tasks_remap_labels_and_split_by_task():
    dm = ClassIncrementalDataModule("digits", init_cls=2, increment=2, image_size=16)
    assert dm.num_tasks == 5 and dm.num_classes == 10
    order = class_order(10, 1993)
    from sklearn.datasets import load_digits
    raw = load_digits()
    x_all, _ = load_digits_tensors(16)
    for t in range(dm.num_tasks):
        train = dm.task_dataset("train", t)
        assert set(train.labels.tolist()) == {2 * t, 2 * t + 1}
        # the remapped label k is the original class order[k]: check one image against the raw data
        x0, y0 = train[0]
        matches = [i for i in range(len(raw.target)) if torch.equal(x_all[i], x0)]
        assert matches and raw.target[matches[0]] == order[int(y0)]
        val = dm.task_dataset("val", t, cumulative=True)
        assert set(val.labels.tolist()) == set(range(2 * t + 2))
    sizes = [len(dm.task_dataset(s, 0)) for s in ("train", "val", "test")]
    assert sum(sizes) == int((raw.target == order[0]).sum() + (raw.target == order[1]).sum())


def test_epoch_schedule_with_and_without_extra_phases():
    """One phase per task: epoch e trains task e // epochs_per_task. With phases (a method's extra training
    phases, e.g. SEMA layer by layer) the tasks' epoch runs lengthen and follow each other."""
    dm = ClassIncrementalDataModule("digits", init_cls=4, increment=3, epochs_per_task=2)  # tasks 4 + 3 + 3
    assert dm.num_epochs == 6 and [dm.first_epoch(t) for t in range(4)] == [0, 2, 4, 6]
    assert [dm.task_of_epoch(e) for e in range(8)] == [min(e // 2, 2) for e in range(8)]
    assert [dm.phase_of_epoch(e) for e in range(6)] == [0] * 6
    dm.schedule_phases([1, 3, 2])
    assert dm.num_epochs == 12 and [dm.first_epoch(t) for t in range(4)] == [0, 2, 8, 12]
    assert [dm.task_of_epoch(e) for e in range(13)] == [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert [dm.phase_of_epoch(e) for e in range(12)] == [0, 0, 0, 0, 1, 1, 2, 2, 0, 0, 1, 1]
    for bad in ([1, 1], [1, 0, 1]):
        with pytest.raises(ValueError, match="at least one phase"):
            dm.schedule_phases(bad)


def test_natural_order_without_shuffle():
    dm = ClassIncrementalDataModule("digits", shuffle=False, image_size=8)
    assert np.array_equal(dm.class_order, np.arange(10))


def test_cifar100_layout_is_read(tmp_path):
    root = write_cifar100(tmp_path / "cifar")
    dm = ClassIncrementalDataModule("cifar100", root=str(root), init_cls=10, increment=10, image_size=8,
                                    val_fraction=0.0, test_fraction=0.0)
    assert dm.num_tasks == 10 and dm.num_classes == 100
    order = class_order(100, 1993)
    test0 = dm.task_dataset("test", 0)
    assert len(test0) == 10 * 2 and set(test0.labels.tolist()) == set(range(10))
    x, y = test0[0]
    assert x.shape == (3, 8, 8)
    # the red channel encodes the original class: undo the normalisation and check the remapping
    red = test0.images[0][0, 0, 0].item()
    assert order[int(y)] == red // 2
    assert len(dm.task_dataset("train", 9)) == 10 * 3


def test_cifar100_missing_root_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        ClassIncrementalDataModule("cifar100", root=str(tmp_path / "nothing"))


def test_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=4, per_class=5)
    dm = ClassIncrementalDataModule("image_folder", root=str(root), init_cls=2, increment=2, image_size=10,
                                    val_fraction=0.2, test_fraction=0.2, batch_size=4)
    assert dm.num_classes == 4 and dm.num_tasks == 2
    batch_x, batch_y = next(iter(dm.loader(dm.task_dataset("train", 1))))
    assert batch_x.shape[1:] == (3, 10, 10) and set(batch_y.tolist()) <= {2, 3}
    assert len(dm.task_dataset("test", 1, cumulative=True)) == 4


@pytest.mark.parametrize("kwargs,key", [({"dataset": "mnist"}, "dataset"), ({"init_cls": 51}, "init_cls"),
                                        ({"glyph_classes": 1000}, "glyph_classes"),
                                        ({"glyph_images_per_class": 2}, "glyph_images_per_class"),
                                        ({"increment": 0}, "increment"), ({"batch_size": 0}, "batch_size"),
                                        ({"dataset": "image_folder"}, "root")])
def test_bad_arguments_are_named(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ClassIncrementalDataModule(**kwargs)


def test_cifar100_failed_download_names_the_root(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    dm = ClassIncrementalDataModule("cifar100", root=str(tmp_path / "cifar"), download=True)
    with pytest.raises(FileNotFoundError, match="download failed") as e:
        dm.prepare_data()
    assert str(tmp_path / "cifar") in str(e.value)


def test_train_augment_crops_and_flips_the_training_split_only(tmp_path):
    root = write_cifar100(tmp_path / "cifar")
    dm = ClassIncrementalDataModule("cifar100", root=str(root), image_size=12, val_fraction=0.2, train_augment=True,
                                    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    train, test = dm.task_dataset("train", 0), dm.task_dataset("test", 0)
    assert train.augment and not test.augment and not dm.task_dataset("val", 0).augment
    torch.manual_seed(0)
    a, b = train[0][0], train[0][0]
    assert a.shape == b.shape == (3, 12, 12) and not torch.equal(a, b)  # a new random crop each access
    assert torch.equal(test[0][0], test[0][0]) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0  # no normalisation


def test_eval_resize_is_bicubic_resize_then_centre_crop():
    from torchvision.transforms import v2

    from datamodules.continual import ImageTensorDataset

    img = torch.randint(0, 256, (1, 3, 12, 12), dtype=torch.uint8)
    ds = ImageTensorDataset(img, torch.zeros(1, dtype=torch.long), 8, (0, 0, 0), (1, 1, 1), eval_resize=10)
    ref = v2.CenterCrop(8)(v2.Resize(10, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(
        img[0].float() / 255)).clamp(0, 1)
    torch.testing.assert_close(ds[0][0], ref)
    assert ds.subset(torch.tensor([0])).eval_resize == 10
