"""Exactly resumable training data: a per-epoch seeded shuffle and a loader that remembers its position.

Lightning 2.6 restarts a plain ``DataLoader`` from its first batch (with a fresh random order) when a run
resumes from a mid-epoch checkpoint, so samples are seen twice or never. ``ResumableDataLoader`` exposes
``state_dict``/``load_state_dict`` (Lightning stores them in the checkpoint's loop state) and, on resume,
skips the batches the interrupted run had already trained on; ``EpochSeededSampler`` makes the order a pure
function of ``(seed, epoch)`` so the resumed epoch sees the same permutation.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSeededSampler(Sampler[int]):
    """Random permutation of ``range(n)`` drawn from ``seed + epoch`` (Lightning calls ``set_epoch``).

    ``seed=None`` uses ``torch.initial_seed()``, i.e. the run's ``seed_everything`` value.
    """

    def __init__(self, n: int, seed: int | None = None) -> None:
        self.n = n
        self.seed = torch.initial_seed() if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose state is the number of batches it has yielded in the current pass.

    After ``load_state_dict`` the next pass skips that many batches (they are still read, not trained on,
    so any deterministic sampler works). The order must be deterministic per epoch (``EpochSeededSampler``).
    Starting a pass draws nothing from the global torch RNG (a plain ``DataLoader`` draws its worker base seed
    there): a pass started on resume would otherwise shift the dropout masks of every later step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(torch.initial_seed())
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip, self._yielded = self._skip, 0, 0
        for i, batch in enumerate(super().__iter__()):
            self._yielded = i + 1
            if i >= skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # a checkpoint taken on the last batch of an epoch resumes at the start of the next one
        self._skip = state["batches_yielded"] % max(1, len(self))


class SplitLoaders:
    """The loaders of a LightningDataModule whose splits come from its ``load_split(name)``: training shuffled per
    epoch from the run's seed (``train_sampler``) and resumable mid-epoch, the other splits in order; ``predict``
    reads :meth:`predict_split_name`. Uses ``hparams.batch_size`` and ``hparams.num_workers``."""

    train_sampler: type[EpochSeededSampler] = EpochSeededSampler

    def predict_split_name(self) -> str:
        return "test"

    def _loader(self, split: str) -> DataLoader:
        hp = self.hparams  # type: ignore[attr-defined]
        return DataLoader(self.load_split(split), batch_size=hp.batch_size,  # type: ignore[attr-defined]
                          num_workers=hp.num_workers)  # keywords: Lightning re-creates the loader for predict

    def train_dataloader(self) -> DataLoader:
        hp, ds = self.hparams, self.load_split("train")  # type: ignore[attr-defined]
        return ResumableDataLoader(ds, batch_size=hp.batch_size, sampler=self.train_sampler(len(ds)),
                                   num_workers=hp.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split_name())
