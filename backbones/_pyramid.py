"""What the pyramid backbones of attnzoo share.

A family built as ``stem -> stages -> norm -> head``, one stage per output stride, gets timm's model API
from :class:`PyramidBackbone` (channels-last ``[B, H, W, C]`` activations between stages, or NCHW where
the family computes NCHW), its stages' forward (and gradient checkpointing) from :class:`PyramidStage`,
and its timm build from :func:`build_pyramid`; its ``checkpoint_filter_fn`` is built on
``_checkpoint.convert_checkpoint``.

TorchScript, FX and ``torch.compile`` see the same model: Python control flow on tensor shapes lives
in small functions that FX records as one call (:func:`check_image` here; a family marks its own the
same way, with timm's ``register_notrace_function`` for timm's tracer and ``torch.fx.wrap`` at the top
level of its module for ``torch.fx.symbolic_trace``), and everything the forward reaches is scriptable.
"""
import inspect
import sys
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, register_notrace_function
from timm.models._features import feature_take_indices

from ._checkpoint import file_through_family_filter, load_pretrained_file


@torch.fx.wrap
@register_notrace_function  # reason: checks concrete shapes, which FX's proxies do not have
def check_image(x: torch.Tensor, family: str, in_chans: int, min_size: int) -> None:
    """Cheap shape checks, so a wrong image fails here and not deep inside a layer."""
    if x.ndim != 4:
        raise ValueError(f'{family} expects images [B, C, H, W]; got a tensor of shape {list(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'{family} was built for {in_chans}-channel images but got {x.shape[1]} channels '
            f'(input shape {list(x.shape)}); pass images [B, {in_chans}, H, W] or create the '
            f'model with in_chans={x.shape[1]}')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f'{family} needs images of at least {min_size}x{min_size} pixels (its total stride); '
            f'got {x.shape[2]}x{x.shape[3]}; resize the image up')


class PyramidStage(nn.Module):
    """One stage: ``downsample`` (an ``nn.Identity`` in the first stage), then ``blocks``; NHWC.

    Gradient checkpointing happens here and only here, one block at a time: with
    ``grad_checkpointing`` on, every block's forward runs twice per training step (the forward pass
    and its recomputation in the backward pass), never more.
    """

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class PyramidBackbone(nn.Module):
    """timm's model API around ``stem -> stages -> norm -> head``.

    A subclass sets ``family`` (its name in error messages) and builds ``in_chans``, ``stem_stride``,
    ``num_features``, ``head_hidden_size``, ``feature_info``, ``stem`` (NCHW image -> map in
    ``output_fmt``), ``stages`` (an ``nn.Sequential`` of :class:`PyramidStage`, each halving the map
    but the first, or every one where ``stem_feature``), ``norm`` (on the last map; ``nn.Identity`` where
    there is none) and ``head`` (a timm classifier head taking ``input_fmt=self.output_fmt`` maps). It
    initialises its weights itself: most families apply :meth:`_init_weights`, as their official
    models do; where the official model keeps PyTorch's default initialisation, the family says so.

    ``forward_features`` returns the last map in ``output_fmt``: ``[B, H, W, C]`` by default, declared as
    timm's channels-last models (Swin) declare it, or ``[B, C, H, W]`` for a family that computes NCHW;
    ``forward_intermediates`` and ``features_only`` give NCHW by default.
    """
    family: torch.jit.Final[str] = ''
    output_fmt: torch.jit.Final[str] = 'NHWC'
    # whether the stem's map is feature 0 and every stage, the first too, halves the map (timm's MaxViT);
    # otherwise the features are the stages' maps and the first stage keeps the stem's stride
    stem_feature: torch.jit.Final[bool] = False
    # of a file holding trained and EMA weights, the EMA ones? The family's official evaluation's choice:
    # the DeiT / Swin-style scripts of most families evaluate 'model' (see _checkpoint.checkpoint_use_ema)
    checkpoint_ema: torch.jit.Final[bool] = False
    # what the official optimizer exempts from weight decay besides norms and biases (position tables,
    # tokens), by a part of the parameter's name
    no_weight_decay_keywords: Tuple[str, ...] = ()

    def _init_weights(self, m: nn.Module):
        """Linear layers as the official models of most of these families (and timm's ViTs) start them."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str):
        """timm's loader of a pretrained file (``custom_load``; _checkpoint.file_through_family_filter):
        the whole file goes through the family module's ``checkpoint_filter_fn``."""
        load_pretrained_file(self, checkpoint_path, sys.modules[type(self).__module__].checkpoint_filter_fn)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The parameters named with one of ``no_weight_decay_keywords`` (timm's optimizer factory already
        exempts norms and biases)."""
        keywords = self.no_weight_decay_keywords
        return {name for name, _ in self.named_parameters() if any(k in name for k in keywords)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        """timm's parameter groups (layer-wise LR decay): the stem, then each stage's downsample and blocks."""
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.norm', (99999,)),  # a stage's own norm (TransNeXt), after its blocks
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, in_features=self.num_features)

    def check_input(self, x: torch.Tensor):
        # the last stage's reduction (stages may be pruned)
        num_halvings = len(self.stages) - 1 + int(self.stem_feature)
        check_image(x, self.family, self.in_chans, self.stem_stride << num_halvings)

    def as_format(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        """A map of this model (in ``self.output_fmt``) in ``output_fmt``, 'NCHW' or 'NHWC'."""
        if output_fmt == self.output_fmt:
            return x
        return x.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else x.permute(0, 2, 3, 1)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates.

        The features are the stages' maps, after the stem's (stride 2) where ``stem_feature``.

        Args:
            x: Input images [B, C, H, W].
            indices: Take last n features if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to the last stage's intermediate.
            stop_early: Stop iterating over stages when the last desired intermediate is reached.
            output_fmt: Layout of the intermediates, 'NCHW' or 'NHWC'.
            intermediates_only: Only return intermediate features.
        Returns:
            The intermediates, or (final features in ``self.output_fmt``, intermediates).
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"{self.family}.forward_intermediates: output_fmt must be 'NCHW' or 'NHWC', "
                             f"got '{output_fmt}'")
        self.check_input(x)
        intermediates = []
        first_stage_idx = int(self.stem_feature)  # the feature index of the first stage's map
        last_idx = len(self.stages) - 1 + first_stage_idx
        take_indices, max_index = feature_take_indices(last_idx + 1, indices)
        num_stages_run = max_index + 1 - first_stage_idx
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:num_stages_run]

        x = self.stem(x)
        feat_idx = 0
        if self.stem_feature and 0 in take_indices:
            intermediates.append(self.as_format(x, output_fmt))
        for stage_idx, stage in enumerate(stages):
            x = stage(x)
            feat_idx = stage_idx + first_stage_idx
            if feat_idx in take_indices:
                x_inter = self.norm(x) if norm and feat_idx == last_idx else x
                intermediates.append(self.as_format(x_inter, output_fmt))

        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    @torch.jit.ignore
    def prune_final_norm(self):
        """Drop the norm of the last stage's map (the head's, where the family norms after pooling)."""
        self.norm = nn.Identity()

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and optionally the final norm and head) not needed for ``indices``.

        As in timm's models, pruning stages drops the final norm and the classifier too (both are
        sized for the last stage), and ``num_features`` becomes the width of the last feature kept.
        """
        first_stage_idx = int(self.stem_feature)
        num_features = len(self.stages) + first_stage_idx
        take_indices, max_index = feature_take_indices(num_features, indices)
        prune_end = max_index < num_features - 1
        if prune_norm or prune_end:
            self.prune_final_norm()
        self.stages = self.stages[:max_index + 1 - first_stage_idx]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        # no checkpointing at this level: the stages checkpoint their blocks (PyramidStage)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def pyramid_cfg(family: Dict, **kwargs) -> Dict:
    """A pretrained cfg: the ImageNet-1k classifier at 224 px most official releases evaluate (resize to
    256 and centre crop 224, bicubic, ImageNet mean / std), the ``family``'s keys (its ``url``,
    ``first_conv``, license, paper and evaluation) over it, a variant's ``kwargs`` over those."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'classifier': 'head.fc', **family, **kwargs,
    }


def build_pyramid(model_cls, variant: str, pretrained: bool = False, stages_arg: str = 'depths',
                  **kwargs) -> PyramidBackbone:
    """timm's ``build_model_with_cfg`` of a family's ``variant``: the family module's
    ``checkpoint_filter_fn`` converts pretrained weights, a ``pretrained_cfg_overlay`` file goes through
    it too (``_checkpoint.file_through_family_filter``), and ``features_only`` takes the features of
    ``forward_intermediates``, all of them unless ``out_indices`` says (one per entry of the model's
    ``stages_arg`` argument, and the stem's where ``stem_feature``)."""
    kwargs = file_through_family_filter(kwargs)
    num_stages = len(kwargs.get(stages_arg, inspect.signature(model_cls).parameters[stages_arg].default))
    out_indices = kwargs.pop('out_indices', tuple(range(num_stages + int(model_cls.stem_feature))))
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=sys.modules[model_cls.__module__].checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )
