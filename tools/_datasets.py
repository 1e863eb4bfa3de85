"""The data pipeline of tools/train.py and tools/eval.py: datasets, transforms and loaders.

Data sources (``--dataset``):

* ``digits``: scikit-learn's handwritten digits (1797 grayscale 8x8 images, 10 classes), which
  ship inside scikit-learn, so the tools run with no download. A fixed stratified 80/20 split
  (seed 0, independent of ``--seed``) gives 1437 training and 360 validation images. Images are
  upsampled bilinearly to ``--img-size`` and replicated to three channels, so every model,
  pretrained RGB weights and official checkpoints included, takes them unchanged; they are
  normalised with the model's own mean and std. No augmentation.
* a directory: an ImageFolder root with one folder per split (``ROOT/train/<class>/*.jpg``,
  ``ROOT/val/<class>/*.jpg``), transformed by timm's ``create_transform`` with the model's
  data config.

Loaders shard the data over the processes of a torchrun launch (``_runtime.DistInfo``).
"""
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from _runtime import DistInfo, ToolError

DIGITS = 'digits'
DIGITS_IMG_SIZE = 32  # 4x the 8x8 originals: enough for a transformer's stride-4 stem, cheap on a CPU
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2


def _load_digits_split(split: str):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_VAL_FRACTION, stratify=labels,
        random_state=DIGITS_SPLIT_SEED)
    idx = {'train': train_idx, 'val': val_idx}[split]
    return images[idx], labels[idx]


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits of one split, upsampled to ``img_size``, three channels, normalised."""

    num_classes = 10

    def __init__(self, split: str, img_size: int, mean, std):
        if split not in ('train', 'val'):
            raise ToolError(f"the digits dataset has splits 'train' and 'val', not {split!r}")
        images, labels = _load_digits_split(split)
        # pixel values are counts 0..16 of an original 32x32 bitmap
        small = torch.from_numpy(images).float().view(-1, 1, 8, 8) / 16.0
        self.images = F.interpolate(small, size=(img_size, img_size), mode='bilinear', align_corners=False)
        self.labels = torch.from_numpy(labels).long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = (self.images[index].expand(3, -1, -1) - self.mean) / self.std
        return image, self.labels[index]


def _split_dir(root: str, split: str) -> Path:
    path = Path(root) / split
    if not path.is_dir():
        raise ToolError(
            f'--dataset {root}: no folder {path}. An ImageFolder root holds one folder per split '
            f'(ROOT/train/<class>/*.jpg, ROOT/val/<class>/*.jpg); pass --dataset digits for the '
            f'embedded dataset, or name the split folders with --train-split / --val-split / --split')
    return path


def num_classes_of(dataset: str, split: str) -> int:
    if dataset == DIGITS:
        return DigitsDataset.num_classes
    classes, _ = find_classes(_split_dir(dataset, split))
    return len(classes)


def data_config(model: torch.nn.Module, dataset: str, img_size: Optional[int]) -> dict:
    """timm's data config of ``model``; the input size is ``img_size``, else ``DIGITS_IMG_SIZE``
    for digits, else the model's default."""
    if img_size is None and dataset == DIGITS:
        img_size = DIGITS_IMG_SIZE
    overrides = {'input_size': (3, img_size, img_size)} if img_size else {}
    return resolve_data_config(overrides, model=model)


def build_dataset(dataset: str, split: str, config: dict, training: bool) -> Dataset:
    """One split of ``--dataset`` (``digits`` or an ImageFolder root), transformed for ``config``."""
    if dataset == DIGITS:
        return DigitsDataset(split, config['input_size'][-1], config['mean'], config['std'])
    transform = create_transform(**config, is_training=training)
    return ImageFolder(str(_split_dir(dataset, split)), transform=transform)


def check_same_classes(dataset: str, train_split: str, val_split: str) -> None:
    if dataset == DIGITS:
        return
    train_classes, _ = find_classes(_split_dir(dataset, train_split))
    val_classes, _ = find_classes(_split_dir(dataset, val_split))
    if train_classes != val_classes:
        only = sorted(set(train_classes) ^ set(val_classes))
        raise ToolError(f'{dataset}: the {train_split} and {val_split} folders hold different classes '
                        f'(in one only: {only[:10]}); both splits need the same class folders')


def train_loader(dataset: Dataset, batch_size: int, workers: int, dist_info: DistInfo, seed: int) -> DataLoader:
    """Shuffled batches of this rank's shard; call ``loader.sampler.set_epoch(epoch)`` each epoch.

    The permutation depends on (seed, epoch) only, so a resumed run sees the same batches.
    """
    if len(dataset) < batch_size * dist_info.world_size:
        raise ToolError(f'the training split has {len(dataset)} images, fewer than one batch '
                        f'({batch_size} x {dist_info.world_size} processes); lower --batch-size')
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                 shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=dist_info.device.type == 'cuda', drop_last=True)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, dist_info: DistInfo) -> DataLoader:
    # every image exactly once over all ranks (DistributedSampler would pad with repeats)
    indices = range(dist_info.rank, len(dataset), dist_info.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers,
                      pin_memory=dist_info.device.type == 'cuda')
