"""scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes) as ViT-ready tensors.

The embedded default image dataset: it ships inside scikit-learn, so it works offline on a fresh machine.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from callbacks.class_predictions import NamedSamples
from datamodules.resumable import EpochSeededSampler, ResumableDataLoader

#: Mean/std of the digits pixels after scaling to [0, 1] (computed over the whole 8x8 set).
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3761


def load_digits_tensors(image_size: int = 32, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as normalised float images ``(N, channels, image_size, image_size)`` and labels."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x - DIGITS_MEAN) / DIGITS_STD).expand(-1, channels, -1, -1).contiguous()
    return x, torch.tensor(data.target, dtype=torch.long)


def stratified_split(
    labels: torch.Tensor, fractions: tuple[float, ...], seed: int = 0
) -> list[torch.Tensor]:
    """Split indices into parts with the given fractions, per class, deterministically by ``seed``."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        bounds = torch.tensor((0.0,) + fractions).cumsum(0).mul(len(idx)).round().long().tolist()
        for k in range(len(fractions)):
            parts[k].append(idx[bounds[k] : bounds[k + 1]])
    return [torch.cat(p).sort().values for p in parts]


class DigitsDataModule(L.LightningDataModule):
    """All ten digit classes at once (plain classification); train/val/test split stratified by class.

    Args:
        image_size: side of the (square) model input; the 8x8 digits are resized to it.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        val_fraction: share of each class in the validation split.
        test_fraction: share of each class in the test split.
        split_seed: seed of the stratified split.
    """

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
                             "and leave samples for training")
        self.save_hyperparameters()
        self.num_classes = 10

    def preflight(self, stage: str) -> None:
        """Build the splits now (``callbacks.protocols.DataPreflight``); an empty split is an error."""
        self.setup(stage)
        for name, ds in (("train", self.train_set), ("val", self.val_set), ("test", self.test_set)):
            if len(ds) == 0 and (name == "train" or getattr(self.hparams, f"{name}_fraction") > 0):
                raise ValueError(f"the {name} split is empty; change val_fraction/test_fraction")

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):  # already built (by preflight or an earlier stage)
            return
        x, y = load_digits_tensors(self.hparams.image_size)
        hp = self.hparams
        train, val, test = stratified_split(
            y, (1 - hp.val_fraction - hp.test_fraction, hp.val_fraction, hp.test_fraction), hp.split_seed
        )
        self.train_set, self.val_set, self.test_set = (TensorDataset(x[i], y[i]) for i in (train, val, test))
        self.test_index = test

    def _loader(self, ds: TensorDataset, shuffle: bool) -> DataLoader:
        # keyword arguments only: Lightning re-creates the loader (e.g. to track predict indices)
        return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Seeded per epoch and resumable mid-epoch (see ``datamodules.resumable``)."""
        return ResumableDataLoader(
            self.train_set, batch_size=self.hparams.batch_size, sampler=EpochSeededSampler(len(self.train_set)),
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, each sample named ``digits:<index in scikit-learn's load_digits>``."""
        ids = [f"digits:{i}" for i in self.test_index.tolist()]
        return self._loader(NamedSamples(self.test_set, ids, [str(c) for c in range(10)]), False)
