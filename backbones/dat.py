"""DAT++: Vision Transformer with Deformable Attention, the spatially dynamic version.

Papers:
    `DAT++: Spatially Dynamic Vision Transformer with Deformable Attention` - https://arxiv.org/abs/2309.01430
    `Vision Transformer with Deformable Attention` - https://arxiv.org/abs/2201.00520 (CVPR 2022)

Official code and checkpoints: https://github.com/LeapLabTHU/DAT (Apache-2.0); dense-task backbones:
https://github.com/LeapLabTHU/DAT-Detection, https://github.com/LeapLabTHU/DAT-Segmentation.

Every stage interleaves two block types, as the official ``stage_spec`` gives them ('N', 'D'):

- 'N': 7x7 neighborhood attention with NATTEN's relative position bias, run by
  ``attnzoo.kernels.neighborhood_attention_2d`` (the official code calls NATTEN 0.14's QK+RPB / AV
  functions, which NATTEN >= 0.20 no longer has);
- 'D': deformable attention. An offset network (a strided depthwise conv, LayerNorm, GELU, a linear
  map to 2 channels, shared by the channel groups) moves a grid of ``H / stride x W / stride``
  reference points per group; keys and values are bilinearly sampled at the moved points and every
  pixel attends to them, with a relative position bias sampled from a continuous table at the
  query-to-point displacement.

Each block opens with a local perception unit (a residual depthwise 3x3 conv) and ends with an MLP
that has a residual depthwise 3x3 conv between its two layers.

Any input size works: the offset grid follows the conv arithmetic of the map, the position-bias
table (sized for ``img_size`` as in the official code) is sampled at normalised displacements, and
neighborhood attention pads maps smaller than its window at the bottom / right and crops back.

Activations stay channels-last ``[B, H, W, C]`` inside the model; the official 1x1 convs are
``nn.Linear`` here (``checkpoint_filter_fn`` reshapes their weights). The pyramid features of
``forward_intermediates`` / ``features_only`` are NCHW by default.
"""
import re
import warnings
from typing import Dict, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model, register_notrace_function

from ._checkpoint import (
    checkpoint_use_ema, convert_checkpoint, rename_by_every_rule, require_downloadable_weights, unwrap_checkpoint)
from ._layers import ConvDownsample, ConvStem, DepthwiseConvNhwc, NeighborhoodAttention
from ._pyramid import PyramidBackbone, PyramidStage, build_pyramid, pyramid_cfg

__all__ = ['DAT']

BLOCK_TYPES = ('N', 'D')


class DwConvMlp(nn.Module):
    """``fc1 -> x + dwconv3x3(x) -> GELU -> fc2`` on channels-last maps (the official TransformerMLPWithConv)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0., device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.drop1 = nn.Dropout(drop)
        self.dwconv = DepthwiseConvNhwc(hidden_dim, 3, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.fc1(x))
        x = self.act(x + self.dwconv(x))
        return self.drop2(self.fc2(x))


class OffsetNetwork(nn.Module):
    """Offsets of the sampling points of one channel group: a depthwise conv with the stage's kernel
    and stride, LayerNorm, GELU and a bias-free linear map to (dy, dx). One network serves all groups.

    ``[N, C, H, W]`` in, ``[N, Hk, Wk, 2]`` out, with ``Hk x Wk`` the conv's output grid.
    """

    def __init__(self, dim: int, kernel_size: int, stride: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        padding = kernel_size // 2 if kernel_size != stride else 0
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=padding, groups=dim, **dd)
        self.norm = nn.LayerNorm(dim, **dd)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, 2, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.norm(self.conv(x).permute(0, 2, 3, 1))))


@torch.fx.wrap
@register_notrace_function  # reason: its arange / meshgrid sizes are the map size, which FX's proxies do not have
def normalized_grid(height: int, width: int, first: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[height, width, 2]`` (x, y) points ``first + index`` per axis on grid_sample's
    ``align_corners=True`` scale, ``index / (length - 1) * 2 - 1``, as the official code computes
    its reference points (``first=0.5``) and query grid (``first=0``).

    A one-position axis, where the official code divides by zero (NaN for the query grid, the map
    edge for a reference point), puts its position at the centre, 0.
    """
    compute_dtype = torch.promote_types(dtype, torch.float32)  # half-precision coordinates would be coarse
    axes = []
    for length in (height, width):
        if length == 1:
            axes.append(torch.zeros(1, dtype=compute_dtype, device=device))
        else:
            positions = torch.arange(length, dtype=compute_dtype, device=device) + first
            axes.append(positions / (length - 1) * 2 - 1)
    ys, xs = torch.meshgrid(axes, indexing='ij')
    return torch.stack((xs, ys), dim=-1).to(dtype)


def split_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * groups, C / groups, H, W]``: each channel group as an image of its own."""
    B, H, W, C = x.shape
    return x.reshape(B, H, W, groups, C // groups).permute(0, 3, 4, 1, 2).reshape(B * groups, C // groups, H, W)


class DeformableAttention(nn.Module):
    """DAT++ deformable multi-head attention with the deformable relative position bias; NHWC in and out.

    Queries come from every pixel. The channels split into ``groups``; each group's offset network
    moves its grid of reference points, keys and values are sampled there (bilinear,
    ``align_corners=True``) and the group's heads attend to them. DAT++ leaves the offsets unbounded
    and clamps the moved points into the map (the official ``offset_range_factor=-1``).

    The bias of a query and a sampled point is read from ``rpe_table`` (``[heads, 2 * Hq - 1,
    2 * Wq - 1]``, ``Hq x Wq`` the stage's map at ``img_size``) by bilinear sampling at half their
    normalised displacement, so it is defined for any map size.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            groups: int,
            stride: int,
            offset_kernel_size: int,
            table_size: Tuple[int, int],
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads or num_heads % groups:
            raise ValueError(f'DeformableAttention: dim {dim} must split into num_heads {num_heads} heads and the '
                             f'heads into {groups} groups')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.groups = groups
        self.scale = self.head_dim ** -0.5
        self.proj_q = nn.Linear(dim, dim, **dd)
        self.proj_k = nn.Linear(dim, dim, **dd)
        self.proj_v = nn.Linear(dim, dim, **dd)
        self.offset = OffsetNetwork(dim // groups, offset_kernel_size, stride, **dd)
        self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * table_size[0] - 1, 2 * table_size[1] - 1, **dd))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_out = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.rpe_table, std=.01)

    def sample_points(self, q: torch.Tensor) -> torch.Tensor:
        """The moved sampling points of every group, ``[B * groups, Hk, Wk, 2]`` (x, y) in [-1, 1]."""
        offset = self.offset(split_groups(q, self.groups)).flip(-1)  # (dy, dx) -> (dx, dy), grid_sample's order
        reference = normalized_grid(offset.shape[1], offset.shape[2], 0.5, offset.dtype, offset.device)
        return (offset + reference).clamp(-1., 1.)

    def position_bias(self, points: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, heads, H * W, Hk * Wk]`` bias of every query pixel and sampled point."""
        batch_groups = points.shape[0]
        batch = batch_groups // self.groups
        num_points = points.shape[1] * points.shape[2]
        queries = normalized_grid(height, width, 0., points.dtype, points.device).reshape(1, -1, 1, 2)
        displacement = (queries - points.reshape(batch_groups, 1, num_points, 2)) * 0.5  # [B * g, HW, Ns, 2]
        table = self.rpe_table.to(points.dtype)
        group_heads, table_h, table_w = self.num_heads // self.groups, table.shape[-2], table.shape[-1]
        table = table.reshape(1, self.groups, group_heads, table_h, table_w).expand(batch, -1, -1, -1, -1)
        bias = F.grid_sample(table.reshape(batch_groups, group_heads, table_h, table_w), displacement,
                             mode='bilinear', align_corners=True)
        return bias.reshape(batch, self.num_heads, height * width, num_points)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q = self.proj_q(x)
        points = self.sample_points(q)
        sampled = F.grid_sample(split_groups(x, self.groups), points, mode='bilinear', align_corners=True)
        num_points = points.shape[1] * points.shape[2]
        sampled = sampled.reshape(B, C, num_points).transpose(1, 2)               # [B, Ns, C]
        k = self.proj_k(sampled).reshape(B, num_points, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.proj_v(sampled).reshape(B, num_points, self.num_heads, self.head_dim).transpose(1, 2)
        q = q.reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)   # [B, heads, HW, D]
        # The bias is a dense [B, heads, HW, Ns] tensor, as large as the scores, so a fused SDPA kernel
        # saves nothing here; and SDPA picks other kernels with and without autograd (on CPU), which
        # would make training and inference outputs differ in the last bits.
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.position_bias(points, H, W).to(q.dtype)
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj_out(x))

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, groups={self.groups}, table={tuple(self.rpe_table.shape[1:])}'


class DATBlock(nn.Module):
    """Local perception unit, then pre-norm attention ('N' neighborhood or 'D' deformable) and MLP; NHWC."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            block_type: str,
            groups: int,
            stride: int,
            offset_kernel_size: int,
            nat_kernel_size: int,
            table_size: Tuple[int, int],
            mlp_ratio: float = 4.,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.lpu = DepthwiseConvNhwc(dim, 3, **dd)
        self.norm1 = nn.LayerNorm(dim, **dd)
        if block_type == 'N':
            self.attn = NeighborhoodAttention(
                dim, num_heads, kernel_size=nat_kernel_size, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        elif block_type == 'D':
            self.attn = DeformableAttention(
                dim, num_heads, groups, stride, offset_kernel_size, table_size, attn_drop=attn_drop, proj_drop=proj_drop,
                **dd)
        else:
            raise ValueError(f'DATBlock: unknown block type {block_type!r}; DAT++ blocks are one of {BLOCK_TYPES}')
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = DwConvMlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.lpu(x)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class DATStage(PyramidStage):
    """Optional stride-2 downsample, then one block per letter of ``block_types``; NHWC."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            block_types: str,
            num_heads: int,
            groups: int,
            stride: int,
            offset_kernel_size: int,
            nat_kernel_size: int,
            table_size: Tuple[int, int],
            downsample: bool,
            mlp_ratio: float,
            attn_drop: float,
            proj_drop: float,
            drop_path_rates: Sequence[float],
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(
            downsample=ConvDownsample(in_dim, dim, **dd) if downsample else nn.Identity(),
            blocks=[
                DATBlock(
                    dim,
                    num_heads,
                    block_type,
                    groups=groups,
                    stride=stride,
                    offset_kernel_size=offset_kernel_size,
                    nat_kernel_size=nat_kernel_size,
                    table_size=table_size,
                    mlp_ratio=mlp_ratio,
                    attn_drop=attn_drop,
                    proj_drop=proj_drop,
                    drop_path=drop_path_rates[i],
                    **dd,
                )
                for i, block_type in enumerate(block_types)],
        )


class DAT(PyramidBackbone):
    """DAT++: a four-stage hierarchical transformer of neighborhood and deformable attention blocks.

    Args:
        img_size: Image size the deformable position-bias tables are sized for (the stage maps at this
            size); the model runs at any size.
        in_chans: Number of input image channels.
        num_classes: Number of classes of the classifier head (0: no head).
        global_pool: Global pooling type of the head.
        dims: Width of each stage (the stem's width is the first).
        stage_spec: Per stage, the block types in order, 'N' (neighborhood) or 'D' (deformable).
        num_heads: Attention heads per stage.
        groups: Offset groups of the deformable blocks per stage.
        strides: Per stage, the stride of the deformable sampling grid against the map.
        offset_kernel_sizes: Per stage, the offset network's depthwise kernel.
        nat_kernel_size: Neighborhood size of the 'N' blocks.
        mlp_ratio: MLP hidden width over block width.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after the attention projection and in the MLP.
        attn_drop_rate: Dropout on the attention probabilities of every block (the official
            ``attn_drop_rate``; 0 in every official config). The 'N' blocks then train on explicit
            probabilities instead of the fused op (see ``_layers.NeighborhoodAttention``).
        drop_path_rate: Stochastic depth, rising linearly over the blocks to this value.
    """
    family = 'DAT++'
    # the official optimizer exempts the deformable bias tables (and, as timm does, norms and biases)
    no_weight_decay_keywords = ('.rpe_table',)

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            dims: Tuple[int, ...] = (64, 128, 256, 512),
            stage_spec: Tuple[str, ...] = ('ND', 'NDND', 'ND' * 9, 'DD'),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            groups: Tuple[int, ...] = (1, 2, 4, 8),
            strides: Tuple[int, ...] = (8, 4, 2, 1),
            offset_kernel_sizes: Tuple[int, ...] = (9, 7, 5, 3),
            nat_kernel_size: int = 7,
            mlp_ratio: float = 4.,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(dims)
        for name, values in (('stage_spec', stage_spec), ('num_heads', num_heads), ('groups', groups),
                             ('strides', strides), ('offset_kernel_sizes', offset_kernel_sizes)):
            if len(values) != num_stages:
                raise ValueError(f'DAT: {len(values)} {name} entries for {num_stages} stages (dims {tuple(dims)})')
        for spec in stage_spec:
            unknown = sorted(set(spec) - set(BLOCK_TYPES))
            if unknown or not spec:
                raise ValueError(f'DAT: stage_spec {spec!r} must be a non-empty string of block types '
                                 f'{BLOCK_TYPES}; got {unknown}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.stem_stride = 4
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        img_size = to_2tuple(img_size)

        self.stem = ConvStem(in_chans, dims[0], norm_layer=nn.LayerNorm, norm_channels_last=True, **dd)
        depths = [len(spec) for spec in stage_spec]
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            reduction = self.stem_stride * 2 ** i
            stages.append(DATStage(
                dims[max(i - 1, 0)],
                dims[i],
                stage_spec[i],
                num_heads=num_heads[i],
                groups=groups[i],
                stride=strides[i],
                offset_kernel_size=offset_kernel_sizes[i],
                nat_kernel_size=nat_kernel_size,
                # the official stage map at img_size: floor divisions, as its rpe tables are sized
                table_size=(img_size[0] // reduction, img_size[1] // reduction),
                downsample=i > 0,
                mlp_ratio=mlp_ratio,
                attn_drop=attn_drop_rate,
                proj_drop=proj_drop_rate,
                drop_path_rates=dpr[i],
                **dd,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt=self.output_fmt, **dd)
        # no _init_weights: the official DAT++ keeps PyTorch's default initialisation of its linear
        # layers; only the deformable bias tables start truncated-normal (DeformableAttention)


# official key -> ours; applied in order, each to the result of the previous one
_OFFICIAL_KEY_RULES = (
    (r'^patch_proj\.0\.', 'stem.conv1.'),
    (r'^patch_proj\.1\.norm\.', 'stem.norm1.'),
    (r'^patch_proj\.3\.', 'stem.conv2.'),
    (r'^patch_proj\.4\.norm\.', 'stem.norm2.'),
    (r'^down_projs\.(\d+)\.0\.', lambda m: f'stages.{int(m.group(1)) + 1}.downsample.conv.'),
    (r'^down_projs\.(\d+)\.1\.norm\.', lambda m: f'stages.{int(m.group(1)) + 1}.downsample.norm.'),
    (r'\.local_perception_units\.(\d+)\.', r'.blocks.\1.lpu.'),
    # layer_norms 2d and 2d + 1 are the pre-attention and pre-MLP norms of block d
    (r'\.layer_norms\.(\d+)\.norm\.', lambda m: f'.blocks.{int(m.group(1)) // 2}.norm{int(m.group(1)) % 2 + 1}.'),
    (r'\.attns\.(\d+)\.conv_offset\.0\.', r'.blocks.\1.attn.offset.conv.'),
    (r'\.attns\.(\d+)\.conv_offset\.1\.norm\.', r'.blocks.\1.attn.offset.norm.'),
    (r'\.attns\.(\d+)\.conv_offset\.3\.', r'.blocks.\1.attn.offset.proj.'),
    (r'\.attns\.(\d+)\.', r'.blocks.\1.attn.'),
    (r'\.mlps\.(\d+)\.linear1\.0\.', r'.blocks.\1.mlp.fc1.'),
    (r'\.mlps\.(\d+)\.dwc\.', r'.blocks.\1.mlp.dwconv.'),
    (r'\.mlps\.(\d+)\.linear2\.0\.', r'.blocks.\1.mlp.fc2.'),
    (r'^cls_norm\.norm\.', 'norm.'),
    (r'^cls_head\.', 'head.fc.'),
)
# the dense-task backbones' LayerNorm on each returned level (DAT-Detection / DAT-Segmentation)
_DENSE_LEVEL_NORM = re.compile(r'^norms\.(\d+)\.norm\.')
_DENSE_PREFIX = 'backbone.'


def _convert_official_key(key: str) -> str:
    return rename_by_every_rule(key, _OFFICIAL_KEY_RULES)


def _dense_backbone(state_dict: Dict[str, torch.Tensor], num_stages: int) -> Dict[str, torch.Tensor]:
    """The classification-layout weights inside a DAT-Detection / DAT-Segmentation checkpoint.

    Only the ``backbone.`` weights of a detector / segmentor are the backbone. The dense backbone's
    LayerNorm on the last level is the layer the classification model's final norm is (one LayerNorm
    over the last stage's output) and becomes it; the LayerNorms on the other levels belong to the
    dense task, not to this model (attnzoo's ``AttnzooBackbone(out_norm=True)`` has them), and are
    left out with a warning.
    """
    if any(k.startswith(_DENSE_PREFIX) for k in state_dict):
        state_dict = {k[len(_DENSE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_DENSE_PREFIX)}
    converted, left_out = {}, []
    for key, value in state_dict.items():
        match = _DENSE_LEVEL_NORM.match(key)
        if match is None:
            converted[key] = value
        elif int(match.group(1)) == num_stages - 1:
            converted['cls_norm.norm.' + key[match.end():]] = value
        else:
            left_out.append(key)
    if left_out:
        warnings.warn(f'DAT checkpoint_filter_fn: the dense-task level norms {sorted(left_out)} have no counterpart '
                      f'in the timm model and are left out; AttnzooBackbone(out_norm=True) trains its own')
    return converted


def _resize_rpe_table(table: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A deformable bias table for another ``img_size``: bicubic, as the official loaders resize it."""
    return F.interpolate(table[None].float(), size=size, mode='bicubic')[0].to(table.dtype)


def _fit_official_layouts(state_dict: Dict[str, torch.Tensor], model: DAT) -> Dict[str, torch.Tensor]:
    """Official 1x1 conv weights as our linear ones; deformable bias tables of another ``img_size`` resized."""
    expected = model.state_dict()
    for key, value in state_dict.items():
        target = expected.get(key)
        if target is None:
            continue
        if value.ndim == 4 and target.ndim == 2:  # official 1x1 conv -> our linear
            state_dict[key] = value.flatten(1)
        elif key.endswith('.rpe_table') and value.shape != target.shape and value.shape[0] == target.shape[0]:
            state_dict[key] = _resize_rpe_table(value, tuple(target.shape[1:]))
    return state_dict


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: DAT) -> Dict[str, torch.Tensor]:
    """Converts an official DAT++ checkpoint (or one of ours) to this model's keys.

    Accepts the official classification checkpoints (plain or wrapped, see
    :func:`~attnzoo.backbones._checkpoint.unwrap_checkpoint`), DAT-Detection / DAT-Segmentation
    checkpoints (a whole detector or segmentor, whose ``backbone.`` weights are taken, or the
    backbone alone; see :func:`_dense_backbone`) and our own state dicts. The official 1x1 convs
    become linear weights; deformable bias tables trained at another ``img_size`` are resized
    bicubically, as the official loaders do. Classifier keys may differ (timm drops or re-creates
    the head when num_classes changes); any other mismatch raises a ValueError naming the keys.
    """
    state_dict = unwrap_checkpoint(state_dict, checkpoint_use_ema(model))
    if any(k.startswith(_DENSE_PREFIX) or _DENSE_LEVEL_NORM.match(k) for k in state_dict):
        state_dict = _dense_backbone(state_dict, len(model.stages))
    return convert_checkpoint(
        state_dict, model, _convert_official_key, adapt=_fit_official_layouts,
        hint='(after converting official DAT++ names) is it a checkpoint of this variant (dims, stage_spec)?')


def _create_dat(variant: str, pretrained: bool = False, **kwargs) -> DAT:
    if pretrained:
        require_downloadable_weights(variant, kwargs, lambda url: url.startswith(_SHARE_PAGE),
                                     also_at=', or the OneDrive links of github.com/LeapLabTHU/DAT')
    return build_pyramid(DAT, variant, pretrained, stages_arg='dims', **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict:
    return pyramid_cfg(dict(
        # the official evaluation: resize to a 256 square, centre crop 224, bicubic
        url=url, crop_mode='squash', first_conv='stem.conv1', license='apache-2.0',
        origin_url='https://github.com/LeapLabTHU/DAT', paper_ids='arXiv:2309.01430',
        paper_name='DAT++: Spatially Dynamic Vision Transformer with Deformable Attention'), **kwargs)


# the official release is on OneDrive / TsinghuaCloud share pages, which timm cannot download:
# pass the downloaded file with pretrained_cfg_overlay=dict(file=...)
_SHARE_PAGE = 'https://cloud.tsinghua.edu.cn/f/'
_TSINGHUA = _SHARE_PAGE + '{}/'

default_cfgs = generate_default_cfgs({
    'dat_pp_tiny.in1k': _cfg(_TSINGHUA.format('14c5ddae10b642e68089')),
    'dat_pp_small.in1k': _cfg(_TSINGHUA.format('4c2a76360c964fbd81d5')),
    'dat_pp_base.in1k': _cfg(_TSINGHUA.format('8e30492404d348d89f25')),
    # the official 384 evaluation resizes to 384 without a crop
    'dat_pp_base_384.in1k': _cfg(
        _TSINGHUA.format('032dc804cdf44bf18bb5'), input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
})

_TINY = dict(dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), groups=(1, 2, 4, 8))
_SMALL = dict(dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), groups=(1, 2, 3, 6))
_BASE = dict(dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), groups=(2, 4, 8, 16))


@register_model
def dat_pp_tiny(pretrained: bool = False, **kwargs) -> DAT:
    return _create_dat('dat_pp_tiny', pretrained=pretrained, **dict(_TINY, **kwargs))


@register_model
def dat_pp_small(pretrained: bool = False, **kwargs) -> DAT:
    return _create_dat('dat_pp_small', pretrained=pretrained, **dict(_SMALL, **kwargs))


@register_model
def dat_pp_base(pretrained: bool = False, **kwargs) -> DAT:
    return _create_dat('dat_pp_base', pretrained=pretrained, **dict(_BASE, **kwargs))


@register_model
def dat_pp_base_384(pretrained: bool = False, **kwargs) -> DAT:
    # the official configs/dat_base_384.yaml keeps MODEL.DAT.img_size 224 (only DATA.IMG_SIZE is 384):
    # the 384 model has the 224 model's bias tables, and its checkpoint's tables load unchanged
    return _create_dat('dat_pp_base_384', pretrained=pretrained, **dict(_BASE, **kwargs))
