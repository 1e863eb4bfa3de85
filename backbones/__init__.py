"""attnzoo.backbones: importing this registers every attnzoo family with timm."""
import difflib

import timm

from . import biformer, crossformer, cswin, dat, litv2, moat, nat, transnext
from ._timm_empty_batch import install_empty_batch_guards

install_empty_batch_guards()  # timm's MaxViT and HaloNet take an empty batch (see _timm_empty_batch.py)

__all__ = ['biformer', 'crossformer', 'cswin', 'dat', 'litv2', 'moat', 'nat', 'transnext',
           'close_model_names']


def close_model_names(name, n: int = 5):
    """The registered timm / attnzoo model names closest to ``name``, for 'did you mean' messages."""
    return difflib.get_close_matches(str(name), timm.list_models(), n=n, cutoff=0.6)
