"""Tiny datasets in the file formats mmdet and mmseg read, drawn on the fly, and configs that train on them.

* COCO instance segmentation: ``<root>/{train,val}/*.png`` and ``<root>/annotations/{train,val}.json``
  with two categories, ``square`` and ``disc``; each image holds 2-3 filled shapes on a noisy background.
  A disc is drawn as the same 16-gon its annotation lists, so boxes and polygons are exact.
* ADE20K-style semantic segmentation: ``<root>/images/{training,validation}/*.jpg`` and
  ``<root>/annotations/{training,validation}/*.png`` label maps read with ``reduce_zero_label=True``:
  0 is "other" (ignored), 1 the background, 2 squares, 3 discs (ADE20K class indices 0, 1, 2 after the
  reduction).

:func:`derived_config` writes a config that inherits a repository config and points it at such a set,
with small images and a few iterations, the way a user adapts a config to their own data.
"""
import json
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
from mmengine.config import Config

COCO_CLASSES = ('square', 'disc')
ADE_LABELS = {'background': 1, 'square': 2, 'disc': 3}
IMAGE_SIZE = 64
DISC_VERTICES = 16


def _shape_polygon(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Vertices (x, y) of a square or a disc (a regular 16-gon) inside a ``size`` x ``size`` image."""
    extent = int(rng.integers(12, 26))
    x0, y0 = (int(v) for v in rng.integers(1, size - extent - 1, size=2))
    if kind == 'square':
        return np.array([[x0, y0], [x0 + extent, y0], [x0 + extent, y0 + extent], [x0, y0 + extent]], np.float64)
    radius, centre = extent / 2, np.array([x0 + extent / 2, y0 + extent / 2])
    angles = np.linspace(0, 2 * np.pi, DISC_VERTICES, endpoint=False)
    return np.round(centre + radius * np.stack([np.cos(angles), np.sin(angles)], 1), 1)


def _draw(size: int, rng: np.random.Generator) -> Tuple[np.ndarray, List[Tuple[str, np.ndarray, np.ndarray]]]:
    """A noisy image with 2-3 shapes; each shape: its kind, polygon and the mask of its visible pixels."""
    image = rng.integers(90, 130, size=(size, size, 3)).astype(np.uint8)
    shapes = []
    for kind in rng.choice(COCO_CLASSES, size=int(rng.integers(2, 4))):
        polygon = _shape_polygon(str(kind), rng, size)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)
        colour = rng.integers(0, 256, size=3) if kind == 'square' else 255 - rng.integers(0, 60, size=3)
        image[mask > 0] = colour
        for _, _, earlier in shapes:  # later shapes cover earlier ones
            earlier[mask > 0] = 0
        shapes.append((str(kind), polygon, mask))
    return image, [shape for shape in shapes if shape[2].any()]


def write_coco_instances(root: Path, num_train: int = 4, num_val: int = 2, size: int = IMAGE_SIZE,
                         seed: int = 0) -> Path:
    """Writes the COCO-format set under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(COCO_CLASSES)]
    for split, count in (('train', num_train), ('val', num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image, shapes = _draw(size, rng)
            file_name = f'{split}_{index:03d}.png'
            cv2.imwrite(str(root / split / file_name), image)
            image_id = index + 1
            images.append(dict(id=image_id, file_name=file_name, height=size, width=size))
            for kind, polygon, mask in shapes:
                ys, xs = np.nonzero(mask)
                x0, y0 = int(xs.min()), int(ys.min())
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=image_id, category_id=COCO_CLASSES.index(kind) + 1,
                    bbox=[x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], area=int(mask.sum()),
                    segmentation=[polygon.reshape(-1).tolist()], iscrowd=0))
        (root / 'annotations').mkdir(exist_ok=True)
        (root / 'annotations' / f'{split}.json').write_text(
            json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return root


def write_ade_segmentation(root: Path, num_train: int = 4, num_val: int = 2, size: int = IMAGE_SIZE,
                           seed: int = 1) -> Path:
    """Writes the ADE20K-format set under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, count in (('training', num_train), ('validation', num_val)):
        (root / 'images' / split).mkdir(parents=True, exist_ok=True)
        (root / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, shapes = _draw(size, rng)
            labels = np.full((size, size), ADE_LABELS['background'], np.uint8)
            for kind, _, mask in shapes:
                labels[mask > 0] = ADE_LABELS[kind]
            labels[0, :] = 0  # a strip of "other": ignored by training and evaluation alike
            cv2.imwrite(str(root / 'images' / split / f'{index:03d}.jpg'), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(str(root / 'annotations' / split / f'{index:03d}.png'), labels)
    return root


def _coco_overrides(root: Path, size: int) -> str:
    return f'''
metainfo = dict(classes={COCO_CLASSES!r}, palette=[(220, 20, 60), (0, 0, 142)])
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=({size}, {size}), keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=({size}, {size}), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(
    data_root='{root}/', metainfo=metainfo, ann_file='annotations/train.json', data_prefix=dict(img='train/'),
    pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(
    data_root='{root}/', metainfo=metainfo, ann_file='annotations/val.json', data_prefix=dict(img='val/'),
    pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file='{root}/annotations/val.json')
test_evaluator = val_evaluator
'''


def _ade_overrides(root: Path, size: int) -> str:
    return f'''
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(
    data_root='{root}', data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
    pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(
    data_root='{root}', data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
    pipeline=test_pipeline))
test_dataloader = val_dataloader
data_preprocessor = dict(size=({size}, {size}))
model = dict(data_preprocessor=data_preprocessor)
'''


def derived_config(path: Path, base: Path, data_root: Path, extra: str = '', size: int = IMAGE_SIZE) -> Path:
    """Writes ``path``: ``base`` (a repository config) on the tiny set at ``data_root``, then ``extra``.

    The format (COCO instances or ADE20K) follows from the base config's training set; the schedule,
    model size and intervals are left to ``extra``. The data overrides go into a config of their own
    (``<path stem>_data.py``) that ``path`` inherits: a name such as ``model`` assigned twice in one
    file keeps only its second value, where inheritance merges the two.
    """
    dataset = Config.fromfile(str(base)).train_dataloader.dataset.type
    if dataset == 'CocoDataset':
        overrides = _coco_overrides(data_root, size)
    elif dataset == 'ADE20KDataset':
        overrides = _ade_overrides(data_root, size)
    else:
        raise ValueError(f'{base}: trains on {dataset}, neither COCO nor ADE20K')
    data_config = path.with_name(f'{path.stem}_data.py')
    data_config.write_text(f"_base_ = '{base}'\n{overrides}\n")
    path.write_text(f"_base_ = '{data_config}'\n{extra}\n")
    return path


def config_text(**entries: Dict) -> str:
    """Python config lines ``name = value`` for ``entries`` (values written with repr)."""
    return '\n'.join(f'{name} = {value!r}' for name, value in entries.items())
