"""One OpenMMLab backbone for every timm / attnzoo model: ``AttnzooBackbone``.

It builds ``timm.create_model(model_name, features_only=True, out_indices=...)`` and returns the
selected pyramid levels as a tuple of NCHW maps, which is what mmdet / mmseg necks and decode heads
take. Level indices are timm's ``feature_info`` indices: for the attnzoo families (and DaViT)
index 0 is the stride-4 stage, for models whose stem is a feature level (timm's ResNets, MaxViT)
index 0 is the stride-2 stem and the stride-4..32 stages are ``(1, 2, 3, 4)``.

Any input size: timm's MaxViT partitions every stage map into fixed 7 x 7 windows and grids, and its
HaloNet attends in fixed 8 x 8 blocks, so each accepts only sizes whose stage maps are multiples of
those (224 and 256 px multiples for their ImageNet models). The wrapper pads such inputs (bottom and
right, with zeros: the normalised mean colour, as mmdet / mmseg pad a batch) to the smallest size the
model takes and crops every returned map back to the input's extent (``ceil(size / stride)``).
Families that handle any size themselves (the attnzoo ones, DaViT, SHViT) are not padded.
"""
import math
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from timm.layers import Format, LayerNorm2d, to_2tuple
from timm.layers.halo_attn import HaloAttn
from timm.models import group_parameters
from timm.models.maxxvit import ParallelPartitionAttention, PartitionAttention2d, PartitionAttentionCl
from torch.nn.modules.batchnorm import _BatchNorm

from attnzoo.backbones import close_model_names  # importing it registers the attnzoo families with timm
from attnzoo.backbones._checkpoint import load_checkpoint_file, pretrained_weights_source

__all__ = ['AttnzooBackbone']

# set by the wrapper itself; a config that passes them would silently change what it builds
_RESERVED_MODEL_KWARGS = ('features_only', 'pretrained_cfg_overlay', 'checkpoint_path')


def _check_model_name(model_name: str):
    if not isinstance(model_name, str) or not timm.is_model(model_name):
        close = close_model_names(model_name, n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else ''
        raise ValueError(
            f'AttnzooBackbone: unknown model_name {model_name!r}: neither timm nor attnzoo registers it{hint} '
            f'(timm.list_models() lists the names)')


def _level_table(feature_info: List[Dict]) -> str:
    return ', '.join(f'{i}: {info["num_chs"]} ch / stride {info["reduction"]}' for i, info in enumerate(feature_info))


def _check_out_indices(out_indices) -> Tuple[int, ...]:
    if (not isinstance(out_indices, (list, tuple)) or not out_indices
            or not all(isinstance(i, int) and i >= 0 for i in out_indices)):
        raise ValueError(
            f'AttnzooBackbone: out_indices must be a non-empty sequence of feature-level indices (0, 1, ...), '
            f'got {out_indices!r}')
    if list(out_indices) != sorted(set(out_indices)):
        raise ValueError(f'AttnzooBackbone: out_indices must be increasing without repeats, got {out_indices!r}')
    return tuple(out_indices)


def _create_features(model_name: str, out_indices: Tuple[int, ...], model_kwargs: Dict, pretrained: bool = False,
                     checkpoint: Optional[str] = None) -> nn.Module:
    """timm's feature-extraction model (with the weights of ``checkpoint``, or timm's own with ``pretrained``);
    an out-of-range level index becomes an error that lists the levels."""
    if checkpoint is not None:
        # timm loads the file through the family's checkpoint_filter_fn, so official checkpoints load unchanged
        model_kwargs = dict(model_kwargs, pretrained_cfg_overlay=dict(file=checkpoint))
    try:
        return timm.create_model(
            model_name, pretrained=pretrained or checkpoint is not None, features_only=True, out_indices=out_indices,
            **model_kwargs)
    except (AssertionError, IndexError) as error:
        # timm reports a bad level index as one of these, deep inside its feature wrappers; the full
        # model tells whether that was the cause (and how many levels there are)
        feature_info = timm.create_model(model_name, **model_kwargs).feature_info
        if all(0 <= i < len(feature_info) for i in out_indices):
            raise
        raise ValueError(
            f'AttnzooBackbone: out_indices {out_indices} are outside the feature levels of {model_name}: '
            f'{_level_table(feature_info)}') from error


def _download_error(model_name: str, model_kwargs: Dict, error: OSError) -> RuntimeError:
    """What to do when timm cannot fetch the pretrained weights of ``model_name`` (offline, or a moved file)."""
    return RuntimeError(
        f'AttnzooBackbone: cannot download the pretrained weights of {model_name} from '
        f'{pretrained_weights_source(model_name, model_kwargs)} ({type(error).__name__}: '
        f'{error}). Download the file where the network reaches it and pass it as a local file: '
        f"checkpoint='/path/to/file.pth' with pretrained=False (in a config: model.backbone.checkpoint, e.g. "
        f'--cfg-options model.backbone.pretrained=False model.backbone.checkpoint=/path/to/file.pth)')


def _resolve_module_name(net: nn.Module, feature_module: str) -> str:
    """Where a ``feature_info`` module (a name in the original model) lives inside timm's feature wrapper.

    The getter wrapper keeps the model under ``model.``, the hook wrapper under ``body.`` or flattened,
    the list / dict wrappers flatten the first Sequential level (``stages.0`` -> ``stages_0``).
    """
    parts = feature_module.split('.')
    candidates = [feature_module, f'model.{feature_module}', f'body.{feature_module}']
    if len(parts) > 1:
        candidates.append('.'.join(['_'.join(parts[:2])] + parts[2:]))
    names = dict(net.named_modules())
    for name in candidates:
        if name in names:
            return name
    raise RuntimeError(
        f'AttnzooBackbone: cannot find feature module {feature_module!r} inside {type(net).__name__} '
        f'(tried {candidates}); frozen_stages needs it: leave frozen_stages=-1 for this model')


def _is_ancestor(name: str, of: str) -> bool:
    return name == '' or of.startswith(name + '.')


def _frozen_modules(net: nn.Module, feature_info: List[Dict], frozen_stages: int) -> List[nn.Module]:
    """The modules that compute feature levels ``0 .. frozen_stages - 1`` (0: the stem only).

    Relies on timm's own assumption for its feature wrappers: modules are registered in the order
    they run. The stem is everything registered before level 0's module.
    """
    order = [name for name, _ in net.named_modules()]
    if frozen_stages == 0:
        cut = _resolve_module_name(net, feature_info[0]['module'])
        in_range = order[:order.index(cut)]
    else:
        cut = _resolve_module_name(net, feature_info[frozen_stages - 1]['module'])
        last = max(i for i, name in enumerate(order) if name == cut or name.startswith(cut + '.'))
        in_range = order[:last + 1]
    # the cut module's ancestors (the wrapper, the model, a stage list) also hold unfrozen levels
    frozen = [name for name in in_range if not _is_ancestor(name, cut)]
    # keep the outermost ones (whose parent is not frozen): eval() and requires_grad_ reach their children
    frozen_set = set(frozen)
    outermost = [name for name in frozen if name.rpartition('.')[0] not in frozen_set]
    return [net.get_submodule(name) for name in outermost]


def _partitioned_modules(net: nn.Module) -> Iterator[Tuple[nn.Module, Tuple[int, int], Tuple[int, int]]]:
    """The modules of timm models that split their input map into fixed partitions: each with its partition
    size and the dimensions of its input that hold the map (channels-last MaxViT blocks: 1, 2)."""
    for module in net.modules():
        if isinstance(module, HaloAttn):
            yield module, to_2tuple(module.block_size), (2, 3)
        elif isinstance(module, (PartitionAttentionCl, ParallelPartitionAttention)):
            yield module, to_2tuple(module.partition_size), (1, 2)
        elif isinstance(module, PartitionAttention2d):
            yield module, to_2tuple(module.partition_size), (2, 3)


def _input_multiple(net: nn.Module, model_name: str, out_indices: Tuple[int, ...], model_kwargs: Dict) -> Tuple[int, int]:
    """The (height, width) every input must be a multiple of: over the partitioned modules, the stride of
    the map each one reads times its partition. Measured by running a copy of the model on the meta device
    (no memory, no compute) at its pretrained input size, which it takes by construction."""
    if next(_partitioned_modules(net), None) is None:
        return 1, 1
    with torch.device('meta'):
        meta = timm.create_model(model_name, features_only=True, out_indices=out_indices, **model_kwargs)
    size = tuple(meta.pretrained_cfg['input_size'][1:])
    multiple = [1, 1]

    def record(partition, dims):
        def hook(module, args):
            for axis in range(2):
                stride = size[axis] // args[0].shape[dims[axis]]
                multiple[axis] = math.lcm(multiple[axis], stride * partition[axis])
        return hook

    handles = [module.register_forward_pre_hook(record(partition, dims))
               for module, partition, dims in _partitioned_modules(meta)]
    with torch.no_grad():
        meta(torch.empty(1, meta.pretrained_cfg['input_size'][0], *size, device='meta'))
    for handle in handles:
        handle.remove()
    return multiple[0], multiple[1]


def _full_model_name(feature_name: str, full_names: Dict[str, int]) -> str:
    """A parameter's name in the full timm model from its name in timm's feature wrapper, which keeps the
    model under ``model.`` / ``body.`` or flattens its first Sequential level (``stages.0`` -> ``stages_0``)."""
    candidates = [feature_name] + [feature_name[len(p):] for p in ('model.', 'body.') if feature_name.startswith(p)]
    first, _, rest = feature_name.partition('.')
    flattened = re.fullmatch(r'(.+)_(\d+)', first)
    if flattened:
        candidates.append(f'{flattened[1]}.{flattened[2]}.{rest}')
    for name in candidates:
        if name in full_names:
            return name
    raise RuntimeError(f'AttnzooBackbone: parameter {feature_name!r} of the feature model has no counterpart in '
                       f'the full model (tried {candidates}); layer-wise decay cannot place it')


class AttnzooBackbone(BaseModule):
    """A timm / attnzoo model as an mmdet / mmseg backbone: a tuple of NCHW pyramid maps.

    Args:
        model_name: A timm model name; ``import attnzoo.backbones`` (done here) adds the attnzoo
            families (``cswin_tiny_224``, ``nat_mini``, ...).
        out_indices: Feature levels to return, indices into the model's ``feature_info``
            (see the module docstring for which index is which stride).
        pretrained: Load the model's default pretrained weights through timm (downloads them) in
            :meth:`init_weights`, as OpenMMLab backbones load theirs: a Runner's training calls it, its test
            (whose checkpoint holds the trained weights) does not.
        checkpoint: Path of a classification checkpoint (official or attnzoo/timm, ``.pth`` or
            ``.safetensors``), converted by the family's ``checkpoint_filter_fn``; loaded in :meth:`init_weights`
            after the file is verified (``attnzoo.backbones._checkpoint``). Implies pretrained.
        out_norm: Add a LayerNorm over channels on every returned map, as the official dense-task
            backbones of Swin and CSWin do (randomly initialised, trained with the task).
        frozen_stages: Freeze (no gradient, eval mode) the stem and the modules of the first
            ``frozen_stages`` feature levels; 0 freezes the stem only, -1 nothing.
        norm_eval: Keep the BatchNorm layers in eval mode while training (frozen statistics).
        with_cp: Gradient checkpointing inside the model (less memory, slower).
        init_cfg: mmengine initialisation; ``dict(type='Pretrained', checkpoint=..., prefix='backbone.')``
            loads a checkpoint saved with this wrapper (an mmdet / mmseg model). Cannot be combined
            with ``pretrained`` / ``checkpoint``, which already initialise the weights.
        **model_kwargs: Passed to ``timm.create_model`` (``drop_path_rate``, ``split_size``, ``img_size``, ...).

    Attributes:
        out_channels: Channels of each returned map (what the neck's ``in_channels`` must list).
        out_strides: Stride of each returned map.
        input_multiple: (height, width) the model needs its input to be a multiple of; other sizes are
            padded to it and the maps cropped back (see the module docstring). ``(1, 1)``: any size as is.
    """

    def __init__(
            self,
            model_name: str,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            pretrained: bool = False,
            checkpoint: Optional[str] = None,
            out_norm: bool = False,
            frozen_stages: int = -1,
            norm_eval: bool = False,
            with_cp: bool = False,
            init_cfg: Optional[Union[Dict, List[Dict]]] = None,
            **model_kwargs,
    ):
        super().__init__(init_cfg=init_cfg)
        _check_model_name(model_name)
        out_indices = _check_out_indices(out_indices)
        if not isinstance(pretrained, bool):
            raise TypeError(
                f'AttnzooBackbone: pretrained is a bool (timm\'s default weights), got {pretrained!r}; '
                f'give a checkpoint file as checkpoint=... (mmseg: keep model.pretrained=None)')
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f'AttnzooBackbone: checkpoint is the path of a file, got {checkpoint!r}')
        if init_cfg is not None and (pretrained or checkpoint is not None):
            raise ValueError(
                'AttnzooBackbone: give either pretrained / checkpoint (classification weights, converted by timm) '
                'or init_cfg (mmengine initialisation, e.g. a checkpoint of this wrapper), not both: init_cfg '
                'would overwrite the pretrained weights')
        reserved = sorted(set(model_kwargs) & set(_RESERVED_MODEL_KWARGS))
        if reserved:
            raise ValueError(
                f'AttnzooBackbone: {reserved} are set by the wrapper; use out_indices / checkpoint / pretrained')

        self.model_name = model_name
        self.pretrained = pretrained
        self.checkpoint = checkpoint
        self.features = _create_features(model_name, out_indices, model_kwargs)
        feature_info = self.features.feature_info
        self.out_indices = out_indices
        self.out_channels = tuple(feature_info.channels())
        self.out_strides = tuple(feature_info.reduction())
        self._nhwc_features = Format(getattr(self.features, 'output_fmt', 'NCHW')) == Format.NHWC
        self.input_multiple = _input_multiple(self.features, model_name, out_indices, model_kwargs)
        self._model_kwargs = model_kwargs
        self.out_norms = nn.ModuleList([LayerNorm2d(c) for c in self.out_channels]) if out_norm else None

        num_levels = len(feature_info.info)
        if not -1 <= frozen_stages <= num_levels:
            raise ValueError(
                f'AttnzooBackbone: frozen_stages must be -1 (nothing), 0 (the stem) or up to the {num_levels} '
                f'feature levels of {model_name}, got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._frozen = []
        if frozen_stages >= 0:
            self._frozen = _frozen_modules(self.features, feature_info.info, frozen_stages)
            if self.out_norms is not None:
                self._frozen += [norm for level, norm in zip(out_indices, self.out_norms) if level < frozen_stages]
            for module in self._frozen:
                module.requires_grad_(False)
        if with_cp:
            # timm's getter wrapper (the attnzoo families) has no switch of its own: it runs the model's
            # forward_intermediates, so the model's switch is the one that matters
            target = self.features if hasattr(self.features, 'set_grad_checkpointing') else self.features.model
            target.set_grad_checkpointing(True)

    def init_weights(self):
        """Loads ``checkpoint`` (verified first) or timm's pretrained weights into the feature model, or, without
        them, runs mmengine's ``init_cfg``. A failed download names the URL and how to pass a local file."""
        if not self.pretrained and self.checkpoint is None:
            return super().init_weights()
        if self.checkpoint is not None:
            if not os.path.isfile(self.checkpoint):
                raise FileNotFoundError(f'AttnzooBackbone: checkpoint {self.checkpoint!r} is not a file')
            load_checkpoint_file(self.checkpoint)  # CRCs, sizes and finite values, before timm's loader reads it
        try:
            loaded = _create_features(self.model_name, self.out_indices, self._model_kwargs, self.pretrained,
                                      self.checkpoint)
        except OSError as error:
            if self.checkpoint is not None:
                raise
            raise _download_error(self.model_name, self._model_kwargs, error) from error
        self.features.load_state_dict(loaded.state_dict())
        self._is_init = True

    def layer_ids(self) -> Tuple[Dict[str, int], int]:
        """The depth of each parameter (by name in this module) as timm's layer-wise learning-rate decay
        (``timm.optim.param_groups_layer_decay``) counts it: the model's ``group_matcher`` at block level, so
        0 for the stem, then one per block in the order they run; and the depth of the classifier, which
        the feature model does not have and which parameters outside the model (the output norms here,
        a task's neck and heads) share."""
        with torch.device('meta'):
            full = timm.create_model(self.model_name, **self._model_kwargs)
        full_ids = group_parameters(full, full.group_matcher(coarse=False), reverse=True)
        ids = {}
        for name, _ in self.features.named_parameters():
            full_name = _full_model_name(name, full_ids)
            ids[f'features.{name}'] = full_ids[full_name]
        return ids, max(full_ids.values())

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height % self.input_multiple[0]), (-width % self.input_multiple[1])
        features = self.features(F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x)
        if self._nhwc_features:
            features = [f.permute(0, 3, 1, 2) for f in features]
        if pad_h or pad_w:
            features = [f[..., :-(-height // stride), :-(-width // stride)]
                        for f, stride in zip(features, self.out_strides)]
        if self.out_norms is not None:
            features = [norm(f) for norm, f in zip(self.out_norms, features)]
        return tuple(features)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:
            module.eval()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self
