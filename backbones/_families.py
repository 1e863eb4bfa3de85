"""The families attnzoo supports, its own and timm's, and the filter that converts each family's official
checkpoints to a model's keys (what ``tools/convert.py`` and ``tools/eval.py`` run).

A family is named by the module that registers its models: attnzoo's (``biformer``, ``cswin``, ...) and
the timm modules of the timm-native families (``maxxvit``, ``davit``, ``shvit``, ``byoanet``). An attnzoo
family's filter is its ``checkpoint_filter_fn``; a timm-native family's is timm's own, which reads the
files timm publishes (the official MaxViT and HaloNet weights are those; DaViT's filter also converts
Microsoft's release files). timm's SHViT filter leaves the official release files' layout
(``blocks1`` .. ``blocks3``, the downsampling inside them) unconverted: :func:`shvit_checkpoint_filter_fn`
converts it first.
"""
import os
import pkgutil
import re
import sys
from typing import Callable, Dict, List, Optional

import timm
import torch
from timm.models import model_entrypoint
from timm.models import shvit as timm_shvit

from ._checkpoint import rename_by_first_rule, unwrap_checkpoint

# timm module -> the variants attnzoo supports (the papers' models)
TIMM_NATIVE_FAMILIES = {
    'maxxvit': ['maxvit_tiny_tf_224', 'maxvit_tiny_tf_384', 'maxvit_tiny_tf_512', 'maxvit_small_tf_224',
                'maxvit_base_tf_224', 'maxvit_large_tf_224'],
    'davit': ['davit_tiny', 'davit_small', 'davit_base'],
    'shvit': ['shvit_s1', 'shvit_s2', 'shvit_s3', 'shvit_s4'],
    'byoanet': ['halonet_h1', 'halonet26t', 'sehalonet33ts', 'halonet50ts', 'eca_halonext26ts'],
}

CheckpointFilter = Callable[[Dict[str, torch.Tensor], torch.nn.Module], Dict[str, torch.Tensor]]


def attnzoo_families() -> Dict[str, List[str]]:
    """attnzoo family module name -> its registered variants (the package registered them on import)."""
    families = {}
    for info in pkgutil.iter_modules([os.path.dirname(__file__)]):
        variants = [] if info.name.startswith('_') else timm.list_models(module=info.name)
        if variants:
            families[info.name] = variants
    return families


def supported_families() -> Dict[str, List[str]]:
    """Every family attnzoo supports (its own, then the timm-native ones) -> its variants."""
    return {**attnzoo_families(), **TIMM_NATIVE_FAMILIES}


def family_of(model_name: str) -> str:
    """The module name of the family that registers ``model_name``."""
    return model_entrypoint(model_name).__module__.rsplit('.', 1)[-1]


# official SHViT (model/shvit.py of ysj9909/SHViT): blocksN of stage N-1; in stages 1 and 2 its first three
# modules are the downsampling (dw conv + FFN, PatchMerging, dw conv + FFN), timm's downsample.0 .. 4
_SHVIT_OFFICIAL_KEY_RULES = (
    (r'^blocks1\.', 'stages.0.blocks.'),
    (r'^blocks([23])\.0\.([01])\.', lambda m: f'stages.{int(m[1]) - 1}.downsample.{m[2]}.'),
    (r'^blocks([23])\.1\.', lambda m: f'stages.{int(m[1]) - 1}.downsample.2.'),
    (r'^blocks([23])\.2\.([01])\.', lambda m: f'stages.{int(m[1]) - 1}.downsample.{int(m[2]) + 3}.'),
    (r'^blocks([23])\.(\d+)\.', lambda m: f'stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 3}.'),
)


def shvit_checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """An official SHViT release file (or timm's) in timm's SHViT layout, through timm's own filter."""
    state_dict = unwrap_checkpoint(state_dict)
    if any(re.match(r'blocks\d\.', k) for k in state_dict):
        state_dict = {rename_by_first_rule(k, _SHVIT_OFFICIAL_KEY_RULES): v for k, v in state_dict.items()}
    return timm_shvit.checkpoint_filter_fn(state_dict, model)


_EXTENDED_FILTERS = {'shvit': shvit_checkpoint_filter_fn}


def checkpoint_filter_of(model_name: str) -> Optional[CheckpointFilter]:
    """The filter that converts official checkpoints of ``model_name``'s family; None where the family
    has none (its checkpoints are already in the model's layout)."""
    family = family_of(model_name)
    if family in _EXTENDED_FILTERS:
        return _EXTENDED_FILTERS[family]
    return getattr(sys.modules[model_entrypoint(model_name).__module__], 'checkpoint_filter_fn', None)
