"""`data=image_folder data.path=DIR`: images in torchvision's ImageFolder layout, one
subfolder per class (DIR/cat/001.png, DIR/dog/xyz.jpg, ...; classes in sorted order).

Every image is resized to data.image_size squared, made RGB (data.channels=3) or grey (1),
scaled to [0, 1] and normalised with ImageNet's mean and standard deviation (or the
folder's own, or not at all). Decoding runs in the DataLoader's worker processes
(data.num_workers), not in the training loop. Validation images come from data.val_path,
else are split off the training folder by a permutation drawn from data.seed. Reading is
Pillow's (which matplotlib already installs), so nothing else is needed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from bigmodel_cli.data.dataset import TorchDataset
from bigmodel_cli.data.loaders import Reading
from bigmodel_cli.data.samples import batch_check
from bigmodel_cli.engine.files import user_path
from bigmodel_cli.errors import UserError, first_line

log = logging.getLogger("bigmodel")

#: the file endings torchvision's ImageFolder reads
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZE = ("imagenet", "folder", "none")
#: images read to estimate a folder's mean and standard deviation (normalize=folder)
STATS_SAMPLE = 256


def pillow():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - matplotlib depends on Pillow
        raise UserError("data=image_folder needs Pillow: pip install 'bigmodel[vision]'") from None
    return Image


def find_images(folder: Path, key: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(class names, [(image path, class index)]) of an ImageFolder-layout folder."""
    if not folder.is_dir():
        raise UserError(f"{key}={folder} is not a folder; give a folder with one subfolder of images per class")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{key}={folder} has no class subfolders; put each class's images in a subfolder "
                        f"named after it ({folder}/<class>/<image>.png)")
    samples = [(str(path), index) for index, name in enumerate(classes)
               for path in sorted((folder / name).rglob("*"))
               if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
    if not samples:
        raise UserError(f"{key}={folder} has class subfolders ({', '.join(classes[:5])}) but no images in them "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    return classes, samples


class ImageFiles(Dataset):
    """(image [C, size, size] float32, class index) for each image file of a folder."""

    def __init__(self, folder: Path, key: str, image_size: int, channels: int,
                 classes: Optional[List[str]] = None):
        found, self.samples = find_images(folder, key)
        if classes is not None and found != classes:  # the same index must mean the same class in every split
            raise UserError(f"{key}={folder} has classes {', '.join(found[:5])}, not those of data.path "
                            f"({', '.join(classes[:5])}); give it the same class subfolders")
        self.classes, self.targets = found, [label for _, label in self.samples]
        self.image_size, self.mode = image_size, "RGB" if channels == 3 else "L"
        self.mean = torch.zeros(channels, 1, 1)
        self.std = torch.ones(channels, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, index: int) -> torch.Tensor:
        """Image `index` resized, as [C, size, size] floats in [0, 1]."""
        path, _ = self.samples[index]
        with pillow().open(path) as image:
            image = image.convert(self.mode).resize((self.image_size, self.image_size), pillow().BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(array))

    def read_fix(self, index: int) -> str:
        """The fix bigmodel offers when image `index` cannot be read (data.samples.sample_at)."""
        return f"remove or replace the damaged image {self.samples[index][0]}"

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return (self.pixels(index) - self.mean) / self.std, self.targets[index]

    def normalise(self, mean, std) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)


class ImageFolder(TorchDataset):
    """Image folders as a TorchDataset: the loading, splitting, sharding and resume are its."""

    def __init__(self, path: Optional[str] = None, val_path: Optional[str] = None, test_path: Optional[str] = None,
                 batch_size: int = 64, image_size: int = 32, channels: int = 3, normalize: str = "imagenet",
                 val_fraction: float = 0.1, test_fraction: Optional[float] = None, seed: int = 0,
                 num_workers: int = 2):
        super().__init__(batch_size=batch_size, task="classification", val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, num_workers=num_workers)
        if not path:
            raise UserError("data=image_folder needs data.path=<folder with one subfolder of images per class>")
        if image_size < 1:
            raise UserError(f"data.image_size must be > 0 (got {image_size}); e.g. data.image_size=32")
        if channels not in (1, 3):
            raise UserError(f"data.channels must be 3 (RGB) or 1 (grey) (got {channels})")
        if normalize not in NORMALIZE:
            raise UserError(f"data.normalize={normalize} is not one of {', '.join(NORMALIZE)}")
        self.paths = {"train": user_path(path), "val": val_path and user_path(val_path),
                      "test": test_path and user_path(test_path)}
        self.image_size, self.channels, self.normalize = image_size, channels, normalize

    def label(self) -> str:
        return f"the image folder {self.paths['train']}"

    def load(self) -> dict:
        pillow()
        train = ImageFiles(self.paths["train"], "data.path", self.image_size, self.channels)
        if len(train.classes) < 2:
            raise UserError(f"data.path={self.paths['train']} has one class subfolder ({train.classes[0]}); "
                            "classification needs a subfolder for each of at least two classes")
        folders = {"train": train}
        for split in ("val", "test"):
            if self.paths[split]:
                folders[split] = ImageFiles(self.paths[split], f"data.{split}_path", self.image_size, self.channels,
                                            classes=train.classes)
        mean, std = self.statistics(train)
        for folder in folders.values():
            folder.normalise(mean, std)
        return folders

    def statistics(self, train: ImageFiles):
        """Per-channel mean and standard deviation to normalise with."""
        if self.normalize == "none":
            return (0.0,) * self.channels, (1.0,) * self.channels
        if self.normalize == "imagenet":
            if self.channels == 3:
                return IMAGENET_MEAN, IMAGENET_STD
            return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        count = min(len(train), STATS_SAMPLE)
        picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))[:count]
        pixels = torch.stack([folder_pixels(train, int(i)) for i in picked]).transpose(0, 1).flatten(1)
        log.info("normalising with the mean and standard deviation of %d images of %s", count, self.paths["train"])
        return pixels.mean(1).tolist(), pixels.std(1).clamp_min(1e-6).tolist()

    def reading(self) -> Reading:
        return Reading(self.num_workers, self.device, batch_check(self.spec, self.label()), self.label(),
                       "remove or replace the damaged image")


def folder_pixels(images: ImageFiles, index: int) -> torch.Tensor:
    """An image read for data.normalize=folder, or one line naming the damaged file."""
    try:
        return images.pixels(index)
    except Exception as err:  # Pillow's errors for a damaged or mislabelled file vary
        raise UserError(f"reading {images.samples[index][0]} for data.normalize=folder failed "
                        f"({type(err).__name__}: {first_line(err)}); {images.read_fix(index)}") from None
