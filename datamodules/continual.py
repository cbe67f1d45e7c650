"""Class-incremental task sequences (glyphs, digits, CIFAR-100, image folders) for continual learning.

The embedded default, ``glyphs``, renders the first ``glyph_classes`` characters of the glyph *sequence* pool
(``datamodules.glyphs``): classes no backbone built by ``datamodules.glyph_backbone`` has seen in pre-training.

Classes are permuted with ``class_order_seed`` (the PILOT/SEMA convention: ``np.random.seed(1993)``,
``np.random.permutation(n_classes)``) and labels are remapped to their position in that order, so task
``t`` always owns the contiguous label range ``[offset_t, offset_t + size_t)``. Task sizes are
``[init_cls] + [increment] * k`` plus a smaller last task when the classes do not divide evenly.

One ``fit`` runs the whole sequence: a task trains for ``epochs_per_task`` epochs (times the phases a continual
method asks for, :meth:`ClassIncrementalDataModule.schedule_phases`; epoch ``e`` trains task ``e //
epochs_per_task`` with one phase per task), the train loader is rebuilt every epoch, validation covers every
class seen so far, and :meth:`task_dataset` gives the per-task test sets for the accuracy matrix.
"""

from __future__ import annotations

from bisect import bisect_right
from pathlib import Path
from typing import Literal, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from callbacks.class_predictions import NamedSamples
from datamodules.digits import load_digits_tensors, stratified_split
from datamodules.image_check import decode_rgb
from datamodules.resumable import EpochSeededSampler, ResumableDataLoader
from models.utils.safe_pickle import load_numpy_pickle

DatasetName = Literal["glyphs", "multidomain", "digits", "cifar100", "image_folder"]
#: The ``multidomain`` sequence's domains, in task order: three renderings of disjoint glyph classes, then
#: scikit-learn's handwritten digits.
DOMAINS: tuple[str, ...] = ("glyphs-plain", "glyphs-inverted", "glyphs-shifted", "digits")
#: Per-channel mean/std used for uint8 sources (ImageNet statistics, what timm ViTs expect).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CIFAR100_DIR = "cifar-100-python"


def class_order(n_classes: int, seed: int | None) -> np.ndarray:
    """The class permutation of PILOT/SEMA (``np.random.seed(seed); np.random.permutation(n)``); None = natural."""
    if seed is None:
        return np.arange(n_classes)
    return np.random.RandomState(seed).permutation(n_classes)


def task_sizes(n_classes: int, init_cls: int, increment: int) -> list[int]:
    """``[init_cls] + [increment] * k`` plus the remainder as a last, smaller task."""
    if not 0 < init_cls <= n_classes:
        raise ValueError(f"init_cls must be in [1, {n_classes}] (the dataset's class count), got {init_cls}")
    if increment <= 0:
        raise ValueError(f"increment must be positive, got {increment}")
    sizes = [init_cls]
    while sum(sizes) + increment <= n_classes:
        sizes.append(increment)
    if sum(sizes) < n_classes:
        sizes.append(n_classes - sum(sizes))
    return sizes


class ImageTensorDataset(Dataset):
    """Images kept compactly (uint8 at native size, or ready float tensors) and resized/normalised on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 augment: bool = False, ids: Sequence[str] | None = None, eval_resize: int | None = None) -> None:
        self.images, self.labels, self.image_size, self.augment = images, labels, image_size, augment
        self.ids = list(ids) if ids is not None else [str(i) for i in range(len(labels))]  # names for predict
        self.eval_resize = eval_resize
        self.mean_std = (tuple(mean), tuple(std))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if x.dtype == torch.uint8:
            x = x.float().div(255.0)
            if self.augment:  # SEMA-CL's training augmentation: random resized crop (scale 0.05-1), h-flip
                from torchvision.transforms import v2

                x = v2.RandomResizedCrop(self.image_size, scale=(0.05, 1.0), antialias=True)(x)
                x = v2.RandomHorizontalFlip()(x)
            elif self.eval_resize:  # SEMA-CL's test transform: Resize(eval_resize, bicubic) + CenterCrop(image_size)
                from torchvision.transforms import v2

                x = v2.Resize(self.eval_resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(x)
                x = v2.CenterCrop(self.image_size)(x).clamp(0, 1)
            elif x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
                x = F.interpolate(x[None], size=(self.image_size,) * 2, mode="bilinear", align_corners=False)[0]
            x = (x - self.mean) / self.std
        return x, self.labels[i]

    def subset(self, index: torch.Tensor, augment: bool | None = None) -> "ImageTensorDataset":
        return ImageTensorDataset(self.images[index], self.labels[index], self.image_size, *self.mean_std,
                                  augment=self.augment if augment is None else augment,
                                  ids=[self.ids[i] for i in index.tolist()], eval_resize=self.eval_resize)


def load_cifar100(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read torchvision's CIFAR-100 python layout (``root/cifar-100-python/{train,test}``) as uint8 images."""
    path = root / CIFAR100_DIR / ("train" if train else "test")
    entry = load_numpy_pickle(path, kind="CIFAR-100 python file")  # a crafted file cannot run code
    if not isinstance(entry, dict):
        raise ValueError(f"{str(path)!r} is not a CIFAR-100 python file (a {type(entry).__name__}, not a dict)")
    try:
        images = torch.from_numpy(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
        labels = torch.tensor(entry["fine_labels"], dtype=torch.long)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a CIFAR-100 python file (needs 'data' (N, 3072) and 'fine_labels'; "
                         f"{type(e).__name__}: {e})") from None
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} fine_labels")
    return images, labels


def image_folder_files(root: Path) -> tuple[list[str], list[tuple[int, Path]]]:
    """Class names (sorted sub-folder names = label order) and ``(label, file)`` of every image, in reading order."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    out = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"image_folder class folder {str(root / name)!r} (under data.root) has no images "
                             f"({', '.join(IMAGE_SUFFIXES)})")
        out += [(label, p) for p in files]
    return classes, out


def load_image_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A folder of class sub-folders (sorted names = label order); every image is decoded fully as RGB (a corrupt
    or truncated file, or a class folder without images, raises naming it)."""
    classes, files = image_folder_files(root)
    images, labels = [], []
    sizes: set[tuple[int, int]] = set()
    for label, p in files:
        arr = decode_rgb(p)
        sizes.add(arr.shape[:2])
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        labels.append(label)
    if len(sizes) > 1:  # different sizes: bring them to the first one so they stack (resized again on access)
        h, w = images[0].shape[1:]
        images = [
            im if im.shape[1:] == (h, w) else
            F.interpolate(im[None].float(), size=(h, w), mode="bilinear").round().clamp(0, 255).byte()[0]
            for im in images
        ]
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), classes


class ClassIncrementalDataModule(L.LightningDataModule):
    """A class-incremental task sequence; one ``fit`` trains every task in turn.

    Args:
        dataset: ``glyphs`` (embedded default: characters rendered from matplotlib's fonts, classes disjoint
            from the pre-training pool of adaptlab's glyph backbone), ``digits`` (embedded: scikit-learn's
            digits), ``cifar100`` (torchvision's python layout under ``root``) or ``image_folder`` (``root``
            holds one sub-folder per class).
        root: data folder for ``cifar100``/``image_folder``.
        download: let torchvision download CIFAR-100 into ``root`` when it is missing.
        init_cls: classes in the first task.
        increment: classes in each later task.
        class_order_seed: seed of the class permutation (1993 as in PILOT/SEMA).
        shuffle: ``False`` keeps the natural class order.
        epochs_per_task: epochs per task (per training phase of a task, :meth:`schedule_phases`); the trainer's
            ``max_epochs`` is derived from it.
        image_size: side of the (square) model input.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        val_fraction: share of each class's training images held out for validation.
        test_fraction: share used as test set for sources without one (``digits``, ``image_folder``).
        split_seed: seed of the stratified train/val/test split.
        mean: per-channel mean of ``cifar100``/``image_folder`` images (ImageNet statistics by default;
            ``[0.5, 0.5, 0.5]`` for timm's augreg/in21k ViTs).
        std: per-channel standard deviation, as ``mean``.
        glyph_classes: classes of the ``glyphs`` sequence (the first ones of the glyph sequence pool).
        glyph_images_per_class: rendered images per ``glyphs`` class (split into train/val/test).
        glyph_seed: seed of the ``glyphs`` rendering.
        glyph_style: rendering of the ``glyphs`` sequence: ``plain`` (as the backbone's pre-training pool),
            ``inverted`` (dark on light) or ``shifted`` (dark on light, colour tints, mild texture; the main job's
            shifted sequence, see ``datamodules.glyphs``).
        domain_classes: classes per domain of ``multidomain`` (``DOMAINS`` order: plain, inverted and shifted
            glyphs of disjoint sequence-pool characters, then digits, at most 10); every domain boundary must be
            a task boundary. Classes are permuted within each domain, so the domains change at known tasks.
        eval_resize: validation/test images of uint8 sources are resized to this side (bicubic) and centre-cropped
            to ``image_size`` (SEMA-CL's CIFAR test transform: 256 then 224); ``None``: resized to ``image_size``.
        train_augment: SEMA-CL's training augmentation on the training split (random resized crop with
            scale 0.05-1 to ``image_size``, horizontal flip; for uint8 sources such as ``cifar100``).
    """

    def __init__(
        self,
        dataset: DatasetName = "glyphs",
        root: str | None = None,
        download: bool = False,
        init_cls: int = 5,
        increment: int = 5,
        class_order_seed: int = 1993,
        shuffle: bool = True,
        epochs_per_task: int = 1,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        glyph_classes: int = 50,
        glyph_images_per_class: int = 100,
        glyph_seed: int = 0,
        glyph_style: Literal["plain", "inverted", "shifted"] = "plain",
        domain_classes: Sequence[int] = (15, 15, 10, 10),
        eval_resize: int | None = None,
        train_augment: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in ("glyphs", "multidomain", "digits", "cifar100", "image_folder"):
            raise ValueError(f"dataset must be 'glyphs', 'multidomain', 'digits', 'cifar100' or 'image_folder', "
                             f"got {dataset!r}")
        from datamodules.glyphs import STYLES

        if glyph_style not in STYLES:
            raise ValueError(f"glyph_style must be one of {STYLES}, got {glyph_style!r}")
        for key, value in (("batch_size", batch_size), ("epochs_per_task", epochs_per_task),
                           ("image_size", image_size)):
            if value <= 0:
                raise ValueError(f"{key} must be positive, got {value}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std must have 3 values with std > 0, got mean={mean}, std={std}")
        if eval_resize is not None and eval_resize < image_size:
            raise ValueError(f"eval_resize ({eval_resize}) must be >= image_size ({image_size}): the centre crop "
                             "cannot be larger than the resized image")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must leave training data")
        if dataset == "glyphs":
            from datamodules.glyphs import pool_classes

            if glyph_images_per_class < 3:
                raise ValueError(f"glyph_images_per_class must be >= 3 (train/val/test), got {glyph_images_per_class}")
            n_pool = len(pool_classes("sequence"))
            if not 2 <= glyph_classes <= n_pool:
                raise ValueError(f"glyph_classes must be in [2, {n_pool}] (the glyph sequence pool), "
                                 f"got {glyph_classes}")
        elif dataset == "multidomain":
            domain_classes = [int(c) for c in domain_classes]
            if len(domain_classes) != len(DOMAINS) or min(domain_classes) < 0 or domain_classes[3] > 10:
                raise ValueError(f"domain_classes must give {len(DOMAINS)} class counts ({', '.join(DOMAINS)}; "
                                 f"digits at most 10), got {domain_classes}")
            if glyph_images_per_class < 3:
                raise ValueError(f"glyph_images_per_class must be >= 3 (train/val/test), got {glyph_images_per_class}")
        elif dataset != "digits":
            if root is None:
                raise ValueError(f"dataset={dataset!r} needs `root` (a local folder)")
            self._check_root(dataset, Path(root).expanduser(), download)
        self.save_hyperparameters()
        self.num_classes = {"glyphs": glyph_classes, "digits": 10, "cifar100": 100,
                            "multidomain": sum(domain_classes)}.get(dataset) or self._count_folder_classes()
        self.task_sizes = task_sizes(self.num_classes, init_cls, increment)
        self.class_order = class_order(self.num_classes, class_order_seed if shuffle else None)
        self.domain_tasks: list[int] = [0]  # first task of each domain (one domain unless ``multidomain``)
        if dataset == "multidomain":
            bounds = np.cumsum([0, *domain_classes])
            starts = np.cumsum([0, *self.task_sizes])
            bad = [int(b) for b in bounds[1:-1] if b not in starts]
            if bad:
                raise ValueError(f"domain_classes {list(domain_classes)} put a domain boundary inside a task (after "
                                 f"class {bad[0]}); task sizes are {self.task_sizes}")
            seed = class_order_seed if shuffle else None
            self.class_order = np.concatenate([lo + class_order(hi - lo, None if seed is None else seed + k)
                                               for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))])
            self.domain_tasks = [int(np.searchsorted(starts, b)) for b, n in zip(bounds[:-1], domain_classes) if n]
        self._sets: dict[str, ImageTensorDataset] = {}
        self._phases = [1] * self.num_tasks

    @staticmethod
    def _check_root(dataset: str, root: Path, download: bool) -> None:
        if dataset == "cifar100":
            missing = [f for f in ("train", "test") if not (root / CIFAR100_DIR / f).is_file()]
            if missing and not download:
                raise FileNotFoundError(
                    f"CIFAR-100 not found under root={str(root)!r}: missing {CIFAR100_DIR}/{' and '.join(missing)}. "
                    "Put torchvision's CIFAR-100 (python version) there or set download: true."
                )
        elif not root.is_dir() or not any(p.is_dir() for p in root.iterdir()):
            raise FileNotFoundError(f"image_folder root={str(root)!r} must be a folder with one sub-folder per class")

    def _count_folder_classes(self) -> int:
        return sum(1 for p in Path(self.hparams.root).expanduser().iterdir() if p.is_dir())

    # ------------------------------------------------------------------ task structure
    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    @property
    def epochs_per_task(self) -> int:
        return self.hparams.epochs_per_task

    def task_offset(self, task: int) -> int:
        """Label of the task's first class (labels are remapped to the class order)."""
        return sum(self.task_sizes[:task])

    def classes_seen(self, task: int) -> int:
        """Number of classes seen after training ``task`` (0-based)."""
        return sum(self.task_sizes[: task + 1])

    def schedule_phases(self, phases: Sequence[int]) -> None:
        """Train task ``t`` for ``phases[t]`` consecutive phases of ``epochs_per_task`` epochs (one each unless a
        continual method asks for more, e.g. SEMA layer by layer; the LightningModule sets this)."""
        phases = [int(p) for p in phases]
        if len(phases) != self.num_tasks or min(phases) < 1:
            raise ValueError(f"phases must give every one of the {self.num_tasks} tasks at least one phase, "
                             f"got {phases}")
        self._phases = phases

    def first_epoch(self, task: int) -> int:
        """First epoch of ``task`` (``first_epoch(num_tasks)``: the epochs of the whole sequence)."""
        return self.hparams.epochs_per_task * sum(self._phases[:task])

    @property
    def num_epochs(self) -> int:
        """Epochs of the whole sequence (what ``trainer.max_epochs`` is derived from)."""
        return self.first_epoch(self.num_tasks)

    def task_of_epoch(self, epoch: int) -> int:
        """Task trained in ``epoch`` (the last task beyond the sequence)."""
        starts = [self.first_epoch(t) for t in range(self.num_tasks)]
        return max(0, min(bisect_right(starts, epoch) - 1, self.num_tasks - 1))

    def phase_of_epoch(self, epoch: int) -> int:
        """Phase of its task that ``epoch`` trains (0 with one phase per task)."""
        task = self.task_of_epoch(epoch)
        return max(0, min((epoch - self.first_epoch(task)) // self.hparams.epochs_per_task, self._phases[task] - 1))

    def domain_of_task(self, task: int) -> int:
        """Index of the domain that ``task`` belongs to (0 for single-domain sequences)."""
        return int(np.searchsorted(self.domain_tasks, task, side="right")) - 1

    def current_task(self) -> int:
        """The task the trainer's current epoch trains (0 without a trainer)."""
        trainer = self.trainer
        return self.task_of_epoch(trainer.current_epoch) if trainer is not None else 0

    # ------------------------------------------------------------------ data
    def prepare_data(self) -> None:
        hp = self.hparams
        if hp.dataset == "cifar100" and hp.download:
            root = Path(hp.root).expanduser()
            if not (root / CIFAR100_DIR / "test").is_file():
                from torchvision.datasets import CIFAR100

                try:
                    CIFAR100(str(root), train=True, download=True)
                except Exception as e:  # no network or no space: say where the files were expected
                    raise FileNotFoundError(
                        f"CIFAR-100 is missing under root={str(root)!r} and the download failed ({e}); "
                        f"put {CIFAR100_DIR}/ there by hand"
                    ) from e

    def _load(self) -> tuple[ImageTensorDataset, ImageTensorDataset, ImageTensorDataset]:
        hp = self.hparams
        fractions = (1 - hp.val_fraction - hp.test_fraction, hp.val_fraction, hp.test_fraction)
        if hp.dataset == "cifar100":
            root = Path(hp.root).expanduser()
            self._check_root("cifar100", root, download=False)
            x, y = load_cifar100(root, train=True)
            x_test, y_test = load_cifar100(root, train=False)
            self._set_class_names([str(c) for c in range(100)])
            f_val = hp.val_fraction / (1 - hp.test_fraction)
            train_idx, val_idx = stratified_split(y, (1 - f_val, f_val), hp.split_seed)
            full = ImageTensorDataset(x, self._remap(y), hp.image_size, hp.mean, hp.std,
                                      ids=[f"cifar100-train:{i}" for i in range(len(y))], eval_resize=hp.eval_resize)
            test = ImageTensorDataset(x_test, self._remap(y_test), hp.image_size, hp.mean, hp.std,
                                      ids=[f"cifar100-test:{i}" for i in range(len(y_test))],
                                      eval_resize=hp.eval_resize)
            return full.subset(train_idx, hp.train_augment), full.subset(val_idx), test
        if hp.dataset == "glyphs":
            from datamodules.glyphs import render_pool

            x, y, chars = render_pool("sequence", hp.glyph_classes, hp.glyph_images_per_class, hp.image_size,
                                      hp.glyph_seed, style=hp.glyph_style)
            names = list(chars)
            ids = [f"glyph:U+{ord(names[c]):04X}:{i % hp.glyph_images_per_class}" for i, c in enumerate(y.tolist())]
        elif hp.dataset == "multidomain":
            x, y, names = self._load_multidomain()
            ids = [f"{names[c]}:{i}" for i, c in enumerate(y.tolist())]
        elif hp.dataset == "digits":
            x, y = load_digits_tensors(hp.image_size)
            names, ids = [str(c) for c in range(10)], [f"digits:{i}" for i in range(len(y))]
        else:
            root = Path(hp.root).expanduser()
            x, y, names = load_image_folder(root)
            ids = [str(f.relative_to(root)) for _, f in image_folder_files(root)[1]]
        self._set_class_names(names)
        full = ImageTensorDataset(x, self._remap(y), hp.image_size, hp.mean, hp.std, ids=ids,
                                  eval_resize=hp.eval_resize)
        parts = stratified_split(y, fractions, hp.split_seed)
        return full.subset(parts[0], hp.train_augment), full.subset(parts[1]), full.subset(parts[2])

    def _set_class_names(self, names: Sequence[str]) -> None:
        """Names by remapped label (position in the class order), for predictions."""
        self.class_names = [str(names[int(c)]) for c in self.class_order]

    def _load_multidomain(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """uint8 images, labels and class names of the domains in ``DOMAINS`` order (labels contiguous per
        domain; a name is ``<domain>/<class>``)."""
        from datamodules.glyphs import render_pool

        hp = self.hparams
        xs, ys, names, first, offset = [], [], [], 0, 0
        for name, n in zip(DOMAINS, hp.domain_classes):
            if n == 0:
                continue
            if name == "digits":
                from sklearn.datasets import load_digits

                data = load_digits()
                g = torch.Generator().manual_seed(hp.glyph_seed)
                keep = torch.cat([(torch.as_tensor(data.target) == c).nonzero().flatten()[
                    torch.randperm(int((torch.as_tensor(data.target) == c).sum()), generator=g)
                    [: hp.glyph_images_per_class]].sort().values for c in range(n)])
                img = torch.tensor(data.images[keep.numpy()], dtype=torch.float32)[:, None] / 16.0
                img = F.interpolate(img, size=(hp.image_size,) * 2, mode="bilinear", align_corners=False)
                x = img.mul(255).round().clamp(0, 255).byte().expand(-1, 3, -1, -1).contiguous()
                y = torch.as_tensor(data.target[keep.numpy()], dtype=torch.long)
                names += [f"{name}/{c}" for c in range(n)]
            else:
                x, y, chars = render_pool("sequence", n, hp.glyph_images_per_class, hp.image_size, hp.glyph_seed,
                                          style=name.split("-")[1], first=first)
                names += [f"{name}/U+{ord(ch):04X}" for ch in chars]
                first += n
            xs.append(x)
            ys.append(y + offset)
            offset += n
        return torch.cat(xs), torch.cat(ys), names

    def _remap(self, labels: torch.Tensor) -> torch.Tensor:
        """Original label -> its position in the class order."""
        if int(labels.max()) >= self.num_classes:
            raise ValueError(f"label {int(labels.max())} out of range for {self.num_classes} classes")
        position = torch.empty(self.num_classes, dtype=torch.long)
        position[torch.from_numpy(self.class_order).long()] = torch.arange(self.num_classes)
        return position[labels]

    def preflight(self, stage: str) -> None:
        """Read the data now (``callbacks.protocols.DataPreflight``), before any run folder exists; ``setup`` reuses it.

        ``image_folder``: every class folder must hold images and every image is decoded fully (what ``setup`` does
        anyway, it keeps them all in memory): a corrupt or truncated image, or an empty class folder, is named.
        ``cifar100``: both pickles are read (a truncated or foreign file is named), unless they are still to be
        downloaded (``download: true``; ``prepare_data`` does that, once per node). The embedded ``glyphs`` and
        ``digits`` are rendered by adaptlab itself and left to ``setup`` (preflight costs nothing for them).
        """
        hp = self.hparams
        if hp.dataset == "cifar100":
            root = Path(hp.root).expanduser() / CIFAR100_DIR
            if not all((root / f).is_file() for f in ("train", "test")):
                return
        if hp.dataset in ("image_folder", "cifar100"):
            self.setup(stage)

    def setup(self, stage: str | None = None) -> None:
        if not self._sets:
            self._sets = dict(zip(("train", "val", "test"), self._load()))

    def task_dataset(
        self, split: Literal["train", "val", "test"], task: int, cumulative: bool = False
    ) -> ImageTensorDataset:
        """Samples of task ``task`` (or of tasks ``0..task`` with ``cumulative``) from one split."""
        self.setup()
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} out of range (the sequence has {self.num_tasks} tasks)")
        ds = self._sets[split]
        lo = 0 if cumulative else self.task_offset(task)
        keep = ((ds.labels >= lo) & (ds.labels < self.classes_seen(task))).nonzero().flatten()
        return ds.subset(keep)

    def loader(self, ds: Dataset, shuffle: bool = False) -> DataLoader:
        hp = self.hparams
        # keyword arguments only: Lightning re-creates the loader (e.g. to track predict indices)
        return DataLoader(ds, batch_size=hp.batch_size, shuffle=shuffle, num_workers=hp.num_workers,
                          persistent_workers=False, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from the run's seed and resumable mid-epoch (see ``datamodules.resumable``)."""
        ds = self.task_dataset("train", self.current_task())
        return ResumableDataLoader(ds, self.hparams.batch_size, sampler=EpochSeededSampler(len(ds)),
                                   num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.task_dataset("val", self.current_task(), cumulative=True))

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.task_dataset("test", self.num_tasks - 1, cumulative=True))

    def predict_dataloader(self) -> DataLoader:
        """The test split of every task, each sample named (its image file for ``image_folder``)."""
        ds = self.task_dataset("test", self.num_tasks - 1, cumulative=True)
        return self.loader(NamedSamples(ds, ds.ids, self.class_names))
