"""Layer-wise learning-rate decay for OpenMMLab configs: ``LayerDecayOptimWrapperConstructor``.

Fine-tuning a pretrained backbone with layer-wise decay gives each backbone block the learning rate
``lr * layer_decay_rate ** (depth of the classifier - depth of the block)``: the stem learns slowest, the
last block almost at ``lr``, and the task's neck and heads (and the wrapper's output norms) at ``lr``. The
depths are timm's (``AttnzooBackbone.layer_ids``: the model's ``group_matcher``), so a backbone gets the
same scales as ``timm.optim.param_groups_layer_decay`` gives it in classification fine-tuning. Everything
else (``custom_keys``, ``norm_decay_mult``, ...) is mmengine's ``DefaultOptimWrapperConstructor``, applied
first; the layer scale multiplies the learning rate it sets::

    optim_wrapper = dict(
        type='OptimWrapper',
        constructor='LayerDecayOptimWrapperConstructor',
        optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
        paramwise_cfg=dict(layer_decay_rate=0.9, custom_keys={'norm': dict(decay_mult=0.)}))
"""
from typing import List, Optional

import torch.nn as nn
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

from .backbone import AttnzooBackbone

__all__ = ['LayerDecayOptimWrapperConstructor']


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor with layer-wise learning-rate decay over an ``AttnzooBackbone``.

    Args:
        optim_wrapper_cfg: The config's ``optim_wrapper``.
        paramwise_cfg: ``layer_decay_rate`` (in (0, 1]; 1 is no decay) and whatever
            ``DefaultOptimWrapperConstructor`` takes.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        # kept in paramwise_cfg: mmengine skips add_params (so the decay) when paramwise_cfg is empty
        rate = (paramwise_cfg or {}).get('layer_decay_rate')
        if not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(
                f'LayerDecayOptimWrapperConstructor: paramwise_cfg.layer_decay_rate must be a number in (0, 1] '
                f'(e.g. 0.9), got {rate!r}')
        self.layer_decay_rate = float(rate)
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '', is_dcn_module=None) -> None:
        super().add_params(params, module, prefix, is_dcn_module)
        if prefix:
            return  # mmengine recurses into the children; the scales are applied once, at the top
        backbone = getattr(module, 'backbone', None)
        if not isinstance(backbone, AttnzooBackbone):
            raise TypeError(
                f'LayerDecayOptimWrapperConstructor: the model\'s backbone is {type(backbone).__name__}, not an '
                f'AttnzooBackbone; layer-wise decay reads the depths of its blocks from timm (use mmseg\'s '
                f'LayerDecayOptimizerConstructor for mmseg\'s own backbones)')
        ids, classifier_depth = backbone.layer_ids()
        scales = {id(param): self.layer_decay_rate ** (classifier_depth - ids[name])
                  for name, param in backbone.named_parameters() if name in ids}
        for group in params:
            scale = scales.get(id(group['params'][0]), 1.)
            group['lr'] = group.get('lr', self.base_lr) * scale
