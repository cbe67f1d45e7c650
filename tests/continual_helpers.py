"""Shared helpers for the continual-learning tests: tiny data folders and in-process CLI runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from tests.cli_helpers import REPO, run_cli  # noqa: F401  (re-exported for the continual tests)

#: A 1-block, 32-wide ViT on 16x16 inputs (4 patches): fast enough for whole task sequences in tests.
TINY_MODEL = ["--model.img_size", "16", "--model.patch_size", "8",
              "--model.backbone_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2, global_pool: avg}"]
#: Tiny glyph data (10 classes in 5 tasks of 2, 40 images each) and a tiny glyph pre-training (4 classes, 2 steps)
#: for the glyph configs; the backbone cache lands in the test's working directory.
TINY_DATA = ["--data.image_size", "16", "--data.epochs_per_task", "1", "--data.batch_size", "16",
             "--data.glyph_classes", "10", "--data.glyph_images_per_class", "40", "--data.init_cls", "2",
             "--data.increment", "2", "--model.num_classes", "10",
             "--model.pretrain.classes", "4", "--model.pretrain.images_per_class", "4", "--model.pretrain.steps", "2",
             "--model.pretrain.batch_size", "8"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1"]



def write_cifar100(root: Path, per_class_train: int = 3, per_class_test: int = 2, seed: int = 0) -> Path:
    """A tiny folder in torchvision's CIFAR-100 python layout (cifar-100-python/{train,test,meta})."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, per in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per)
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        data[:, :1024] = (labels[:, None] * 2).astype(np.uint8)  # red channel encodes the class
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    return root


def write_image_folder(root: Path, classes: int = 4, per_class: int = 5, size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            arr = rng.integers(0, 256, size=(size + k % 2, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"class_{c}" / f"{k}.png")
    return root
