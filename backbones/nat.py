"""NAT and DiNAT: Neighborhood Attention Transformer and its dilated variant.

Papers:
    `Neighborhood Attention Transformer` - https://arxiv.org/abs/2204.07143 (CVPR 2023)
    `Dilated Neighborhood Attention Transformer` - https://arxiv.org/abs/2209.15001

Official code and checkpoints: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer (MIT).

One family class serves both: DiNAT is NAT with a dilation per layer. Attention runs on
``attnzoo.kernels.neighborhood_attention_2d`` with the relative positional bias (RPB) the official
checkpoints were trained with; NATTEN >= 0.20 dropped RPB, so it cannot run these weights.

Activations stay channels-last ``[B, H, W, C]`` inside the model, as in the official code; the
pyramid features of ``forward_intermediates`` / ``features_only`` are NCHW by default.
"""
import re
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from timm.layers import ClassifierHead, DropPath, LayerScale, Mlp, calculate_drop_path_rates
from timm.models import generate_default_cfgs, register_model

from ._checkpoint import convert_checkpoint
from ._layers import ConvDownsample, NeighborhoodAttention
from ._pyramid import PyramidBackbone, PyramidStage, build_pyramid, pyramid_cfg

__all__ = ['NAT']

class ConvStem(nn.Module):
    """Two stride-2 3x3 convolutions (no activation between them), then LayerNorm; NCHW in, NHWC out."""

    def __init__(self, in_chans: int, dim: int, norm_layer=nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1, **dd)
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1, **dd)
        self.norm = norm_layer(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.conv1(x)).permute(0, 2, 3, 1))


class NATBlock(nn.Module):
    """Pre-norm transformer block: neighborhood attention and MLP, optional LayerScale; NHWC."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            layer_scale: Optional[float] = None,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer=nn.LayerNorm,
            act_layer=nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = NeighborhoodAttention(
            dim, num_heads, kernel_size=kernel_size, dilation=dilation, qkv_bias=qkv_bias, proj_drop=proj_drop, **dd)
        self.ls1 = LayerScale(dim, layer_scale, **dd) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, layer_scale, **dd) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class NATStage(PyramidStage):
    """Optional stride-2 downsample, then ``depth`` blocks; NHWC."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_heads: int,
            kernel_size: int,
            dilations: Sequence[int],
            downsample: bool,
            mlp_ratio: float,
            qkv_bias: bool,
            layer_scale: Optional[float],
            proj_drop: float,
            drop_path_rates: Sequence[float],
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        if len(dilations) != depth:
            raise ValueError(f'NATStage: {len(dilations)} dilations given for {depth} blocks; give one per block')
        super().__init__(
            downsample=ConvDownsample(in_dim, dim, norm_layer, **dd) if downsample else nn.Identity(),
            blocks=[
                NATBlock(
                    dim,
                    num_heads,
                    kernel_size=kernel_size,
                    dilation=dilations[i],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    layer_scale=layer_scale,
                    proj_drop=proj_drop,
                    drop_path=drop_path_rates[i],
                    norm_layer=norm_layer,
                    **dd,
                )
                for i in range(depth)],
        )


class NAT(PyramidBackbone):
    """NAT / DiNAT: a four-stage hierarchical transformer on (dilated) neighborhood attention.

    Args:
        in_chans: Number of input image channels.
        num_classes: Number of classes of the classifier head (0: no head).
        global_pool: Global pooling type of the head.
        embed_dim: Width of the first stage; it doubles at every stage.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        kernel_size: Neighborhood size (odd).
        dilations: Per stage, one dilation per block (DiNAT); None: dilation 1 everywhere (NAT).
        mlp_ratio: MLP hidden width over block width.
        qkv_bias: Bias in the qkv projection.
        layer_scale: Initial LayerScale value; None: no LayerScale.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after the attention projection and in the MLP.
        drop_path_rate: Stochastic depth, rising linearly over the blocks to this value.
    """
    family = 'NAT'
    no_weight_decay_keywords = ('.rpb',)

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depths: Tuple[int, ...] = (3, 4, 6, 5),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            kernel_size: int = 7,
            dilations: Optional[Tuple[Tuple[int, ...], ...]] = None,
            mlp_ratio: float = 3.,
            qkv_bias: bool = True,
            layer_scale: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f'NAT: {len(num_heads)} num_heads entries for {num_stages} stages')
        if dilations is None:
            dilations = tuple((1,) * d for d in depths)
        if len(dilations) != num_stages:
            raise ValueError(f'NAT: {len(dilations)} dilation lists for {num_stages} stages')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.stem_stride = 4
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem = ConvStem(in_chans, dims[0], norm_layer, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            stages.append(NATStage(
                dims[max(i - 1, 0)],
                dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                kernel_size=kernel_size,
                dilations=dilations[i],
                downsample=i > 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                layer_scale=layer_scale,
                proj_drop=proj_drop_rate,
                drop_path_rates=dpr[i],
                norm_layer=norm_layer,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=self.stem_stride * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt=self.output_fmt, **dd)
        self.apply(self._init_weights)


# official key -> ours; applied in order, each to the result of the previous one
_OFFICIAL_KEY_RULES = (
    (r'^patch_embed\.proj\.0\.', 'stem.conv1.'),
    (r'^patch_embed\.proj\.1\.', 'stem.conv2.'),
    (r'^patch_embed\.norm\.', 'stem.norm.'),
    (r'^levels\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'\.gamma1$', '.ls1.gamma'),
    (r'\.gamma2$', '.ls2.gamma'),
    (r'^head\.', 'head.fc.'),
)
# the official downsample closes level i; ours opens stage i + 1
_OFFICIAL_DOWNSAMPLE = re.compile(r'^levels\.(\d+)\.downsample\.(reduction|norm)\.')


def _convert_official_key(key: str) -> str:
    match = _OFFICIAL_DOWNSAMPLE.match(key)
    if match:
        layer = 'conv' if match.group(2) == 'reduction' else 'norm'
        return f'stages.{int(match.group(1)) + 1}.downsample.{layer}.' + key[match.end():]
    for pattern, replacement in _OFFICIAL_KEY_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: NAT) -> Dict[str, torch.Tensor]:
    """Converts an official NAT / DiNAT checkpoint (or one of ours) to this model's keys.

    Accepts a plain state dict or one wrapped as the official files are (see
    :func:`~attnzoo.backbones._checkpoint.unwrap_checkpoint`). Our own state dict passes through unchanged.
    Classifier keys may differ (timm drops or re-creates the head when num_classes changes); any other
    mismatch raises a ValueError naming the keys.
    """
    return convert_checkpoint(
        state_dict, model, _convert_official_key,
        hint='(after converting official NAT / DiNAT names) is it a checkpoint of this variant '
             '(depths, layer scale)?')


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    return build_pyramid(NAT, variant, pretrained, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict:
    return pyramid_cfg(dict(
        # the official evaluation used timm's defaults: 0.875 crop, bicubic
        url=url, first_conv='stem.conv1', license='mit',
        origin_url='https://github.com/SHI-Labs/Neighborhood-Attention-Transformer'), **kwargs)


_NAT_PAPER = dict(paper_ids='arXiv:2204.07143', paper_name='Neighborhood Attention Transformer')
_DINAT_PAPER = dict(paper_ids='arXiv:2209.15001', paper_name='Dilated Neighborhood Attention Transformer')
_NAT_URL = 'https://shi-labs.com/projects/nat/checkpoints/CLS/{}.pth'
_DINAT_URL = 'https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/{}.pth'
# the official 384 px fine-tuning evaluated with crop_pct 1.0 (classification/configs/dinat_large_384.yml)
_CFG_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)

default_cfgs = generate_default_cfgs({
    **{f'nat_{size}.in1k': _cfg(_NAT_URL.format(f'nat_{size}'), **_NAT_PAPER)
       for size in ('mini', 'tiny', 'small', 'base')},
    **{f'dinat_{size}.in1k': _cfg(_DINAT_URL.format(f'dinat_{size}_in1k_224'), **_DINAT_PAPER)
       for size in ('mini', 'tiny', 'small', 'base')},
    # DiNAT-Large: pre-trained on ImageNet-22k, fine-tuned on ImageNet-1k
    'dinat_large.in22k_ft_in1k': _cfg(_DINAT_URL.format('dinat_large_in22k_in1k_224'), **_DINAT_PAPER),
    'dinat_large_384.in22k_ft_in1k': _cfg(_DINAT_URL.format('dinat_large_in22k_in1k_384'), **_CFG_384,
                                          **_DINAT_PAPER),
    'dinat_large_384_11x11.in22k_ft_in1k': _cfg(_DINAT_URL.format('dinat_large_in22k_in1k_384_11x11'), **_CFG_384,
                                                **_DINAT_PAPER),
})

# DiNAT alternates dense (1) and dilated layers; dilations shrink with the map (56, 28, 14, 7 at 224)
_DINAT_DILATIONS_MINI = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1,) * 5)
_DINAT_DILATIONS = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1,) * 5)
# DiNAT-Large at 384 px with 7x7 windows: maps 96, 48, 24, 12, dilations grown to keep the reach
_DINAT_DILATIONS_384 = ((1, 13, 1), (1, 6, 1, 6), (1, 3) * 9, (1,) * 5)

_MINI = dict(depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.)
_TINY = dict(depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.)
_SMALL = dict(depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2.)
_BASE = dict(depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2., layer_scale=1e-5)
_LARGE = dict(depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2.)


@register_model
def nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    return _create_nat('nat_mini', pretrained=pretrained, **dict(_MINI, **kwargs))


@register_model
def nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    return _create_nat('nat_tiny', pretrained=pretrained, **dict(_TINY, **kwargs))


@register_model
def nat_small(pretrained: bool = False, **kwargs) -> NAT:
    model_args = dict(_SMALL, layer_scale=1e-5)
    return _create_nat('nat_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_base(pretrained: bool = False, **kwargs) -> NAT:
    return _create_nat('nat_base', pretrained=pretrained, **dict(_BASE, **kwargs))


@register_model
def dinat_mini(pretrained: bool = False, **kwargs) -> NAT:
    model_args = dict(_MINI, dilations=_DINAT_DILATIONS_MINI)
    return _create_nat('dinat_mini', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    model_args = dict(_TINY, dilations=_DINAT_DILATIONS)
    return _create_nat('dinat_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_small(pretrained: bool = False, **kwargs) -> NAT:
    # unlike NAT-Small, the official DiNAT-Small has no LayerScale
    model_args = dict(_SMALL, dilations=_DINAT_DILATIONS)
    return _create_nat('dinat_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_base(pretrained: bool = False, **kwargs) -> NAT:
    model_args = dict(_BASE, dilations=_DINAT_DILATIONS)
    return _create_nat('dinat_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large(pretrained: bool = False, **kwargs) -> NAT:
    model_args = dict(_LARGE, dilations=_DINAT_DILATIONS)
    return _create_nat('dinat_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs) -> NAT:
    model_args = dict(_LARGE, dilations=_DINAT_DILATIONS_384)
    return _create_nat('dinat_large_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_384_11x11(pretrained: bool = False, **kwargs) -> NAT:
    # 11x11 windows keep the 224 px dilations at 384 px (11 * 8 = 88 fits the 96 px stage-1 map)
    model_args = dict(_LARGE, kernel_size=11, dilations=_DINAT_DILATIONS)
    return _create_nat('dinat_large_384_11x11', pretrained=pretrained, **dict(model_args, **kwargs))
