"""Every variant's eval preprocessing (``pretrained_cfg``: input size, crop_pct, crop_mode, interpolation,
mean / std) gives, through timm's own ``resolve_data_config`` / ``create_transform``, the tensor the
official evaluation pipeline gives, on synthetic images of other aspect ratios (where a short-side resize
and crop differs from a warp).

The official pipelines are rebuilt here from the official settings with torchvision, one builder per
kind of pipeline, each naming the official file it follows.
"""
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from torchvision import transforms

import attnzoo.backbones  # noqa: F401  (registers the models)
from attnzoo.backbones._families import attnzoo_families, family_of

BICUBIC = transforms.InterpolationMode.BICUBIC


def _finish(resize, size):
    return transforms.Compose(resize + [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN,
                                                                                    IMAGENET_DEFAULT_STD)])


def swin_style(size, test_crop=True, square_resize=False):
    """Swin's data/build.py as CrossFormer (data/build.py), LITv2 (classification/data/build.py) and DAT++
    (data/build.py) keep it: TEST.CROP resizes to 256 / 224 of the size (DAT++: a square, ``Resize((s, s))``;
    the others the short side) and centre-crops; without TEST.CROP the whole image is resized to size x size.
    Bicubic (DATA.INTERPOLATION), ImageNet mean / std."""
    if not test_crop:
        return _finish([transforms.Resize((size, size), interpolation=BICUBIC)], size)
    scale = int((256 / 224) * size)
    return _finish([transforms.Resize((scale, scale) if square_resize else scale, interpolation=BICUBIC),
                    transforms.CenterCrop(size)], size)


def deit_style(size):
    """BiFormer's datasets.py (DeiT's build_transform): Resize(int(256 / 224 * size), interpolation=3), crop."""
    return _finish([transforms.Resize(int((256 / 224) * size), interpolation=BICUBIC), transforms.CenterCrop(size)],
                   size)


def transnext_style(size):
    """TransNeXt's classification/datasets.py: from 384 "Warping ... (no cropping)" to size x size; below,
    crop_pct = 224 / 256, Resize(int(size / crop_pct), interpolation=3), CenterCrop."""
    if size >= 384:
        return _finish([transforms.Resize((size, size), interpolation=BICUBIC)], size)
    return _finish([transforms.Resize(int(size / (224 / 256)), interpolation=BICUBIC), transforms.CenterCrop(size)],
                   size)


def timm_script_style(size, crop_pct):
    """The timm training / validation scripts CSWin (main.py, finetune.py) and NAT / DiNAT (validate.py)
    evaluate with: timm's eval transform of their day, Resize(floor(size / crop_pct)) of the short side
    and CenterCrop, with the official model cfg's crop_pct (CSWin models/cswin.py: .9, 1.0 for
    'cswin_384'; NAT: timm's default 0.875, DiNAT-L 384: crop_pct 1.0 in configs/dinat_large_384.yml)."""
    return _finish([transforms.Resize(math.floor(size / crop_pct), interpolation=BICUBIC),
                    transforms.CenterCrop(size)], size)


def official_pipeline(name):
    """The official eval transform of ``name`` at its pretrained input size."""
    family = family_of(name)
    size = timm.models.get_pretrained_cfg(name).input_size[-1]
    if family == 'biformer':
        return deit_style(size)
    if family == 'crossformer':
        return swin_style(size)                       # configs/crossformer*/*.yaml keep TEST.CROP True
    if family == 'litv2':
        return swin_style(size, test_crop=size < 384)  # litv2-base-finetune-384.yaml: TEST.CROP False
    if family == 'dat':
        return swin_style(size, test_crop=size < 384, square_resize=True)  # dat_base_384.yaml: TEST.CROP False
    if family == 'transnext':
        return transnext_style(size)
    if family == 'cswin':
        return timm_script_style(size, 1.0 if size >= 384 else 0.9)
    if family == 'nat':  # NAT and DiNAT
        return timm_script_style(size, 1.0 if size >= 384 else 0.875)
    raise KeyError(name)


# MOAT's official release (TensorFlow, deeplab2) states only the input normalisation of each checkpoint
# (README "input normalization option": 1 = ImageNet mean / std, 2 = [-1, 1]), not its resize and crop
MOAT_NORMALISATION = {'moat_0': 1, 'moat_1': 1, 'moat_2': 2, 'moat_3': 2, 'moat_4': 2,
                      'tiny_moat_0': 1, 'tiny_moat_1': 1, 'tiny_moat_2': 1, 'tiny_moat_3': 1}
IMAGES = [(333, 500), (520, 300)]  # (width, height): portrait and landscape, neither a multiple of anything


@pytest.fixture(scope='module')
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in IMAGES]


def split(transform):
    """(the resize and crop steps as one transform of PIL images, (mean, std) of the normalisation): the
    tensor conversion in between is the same ToTensor in both (and slow on a loaded machine)."""
    *geometry, to_tensor, normalize = transform.transforms
    assert 'ToTensor' in type(to_tensor).__name__ and isinstance(normalize, transforms.Normalize)
    return transforms.Compose(geometry), (_float32(normalize.mean), _float32(normalize.std))


def _float32(values):
    return tuple(torch.as_tensor(values, dtype=torch.float32).tolist())


@pytest.mark.parametrize('family', sorted(set(attnzoo_families()) - {'moat'}))
def test_timm_eval_transform_equals_the_official_pipeline(family, images):
    for name in attnzoo_families()[family]:
        config = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
        (ours, our_norm), (official, official_norm) = split(create_transform(**config)), split(official_pipeline(name))
        assert our_norm == official_norm, name
        for image in images:
            np.testing.assert_array_equal(np.asarray(ours(image)), np.asarray(official(image)), err_msg=name)


@pytest.mark.parametrize('name', sorted(MOAT_NORMALISATION))
def test_moat_normalisation_is_the_official_option(name):
    for variant in (name, name + '_no_pe'):
        cfg = timm.models.get_pretrained_cfg(variant)
        expected = ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if MOAT_NORMALISATION[name] == 1
                    else ((0.5,) * 3, (0.5,) * 3))
        assert (tuple(cfg.mean), tuple(cfg.std)) == expected
