"""CrossFormer and CrossFormer++: cross-scale embedding and long / short distance attention.

Papers:
    `CrossFormer: A Versatile Vision Transformer Based on Cross-scale Attention`
        - https://arxiv.org/abs/2108.00154 (ICLR 2022)
    `CrossFormer++: A Versatile Vision Transformer Hinging on Cross-scale Attention`
        - https://arxiv.org/abs/2303.06908 (TPAMI)

Official code and checkpoints: https://github.com/cheerss/CrossFormer (MIT); branch ``main`` holds
both generations, branch ``crossformer`` the code that produced the v1 checkpoints.

One family class serves both generations. The cross-scale embedding layer (CEL) concatenates the
outputs of convolutions of several kernel sizes (4, 8, 16, 32 in the stem; 2, 4 in the merges that
open stages 2-4). Blocks alternate short-distance attention (SDA: groups are contiguous G x G windows)
and long-distance attention (LDA: groups are G x G tokens taken ``interval`` apart). The attention
bias comes from the dynamic position bias (DPB), an MLP on relative offsets, so any group size gets
one. CrossFormer++ changes the group sizes per stage (4, 4, 14, 7 with intervals 4, 2, 1, 1) and adds
the activation cooling layer (a depthwise 3x3 conv and a LayerNorm, replacing the activations without a
residual) after every third block but the last of a stage.

Any input size works, with the official dense-task backbone's rules: a map that is not a multiple of
``G`` (SDA) or ``G * interval`` (LDA) is zero-padded at the bottom / right and the padded keys are
masked; a map no larger than ``G`` (its shorter side) is attended as a whole. Attention runs through
``F.scaled_dot_product_attention`` with the bias and the padding mask as one additive mask.

Activations stay channels-last ``[B, H, W, C]`` inside the model; the pyramid features of
``forward_intermediates`` / ``features_only`` are NCHW by default.
"""
import re
from typing import Dict, List, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import (
    ClassifierHead, DropPath, Mlp, calculate_drop_path_rates, register_notrace_function, use_fused_attn)
from timm.models import generate_default_cfgs, register_model

from ._checkpoint import (
    convert_checkpoint, rename_by_every_rule, require_downloadable_weights)
from ._layers import DepthwiseConvNhwc, pad_to_multiple
from ._pyramid import PyramidBackbone, PyramidStage, build_pyramid, pyramid_cfg

__all__ = ['CrossFormer']

# torch.fx.symbolic_trace records a wrapped function per calling module: _layers' wrap covers its own calls
torch.fx.wrap('pad_to_multiple')

# Added to the logits of padded keys. The official code adds -1e6, which overflows to -inf in fp16 (the
# rows of all-padding groups then become NaN, and the bias gradient with them); -1e4 is finite in every
# float format and still far enough below any logit that exp() of a masked one is exactly 0, so the
# output equals the official one.
MASK_VALUE = -1e4


def cross_scale_dims(dim: int, num_kernels: int) -> List[int]:
    """Output channels of the convolutions of a cross-scale layer, smallest kernel first: ``dim / 2``,
    ``dim / 4``, ... and the last one as wide as the one before it, so that they add up to ``dim``."""
    dims = [dim // 2 ** (i + 1) for i in range(num_kernels - 1)] + [dim // 2 ** max(num_kernels - 1, 0)]
    if num_kernels < 1 or sum(dims) != dim:
        raise ValueError(
            f'CrossFormer: a cross-scale layer of {num_kernels} kernels splits {dim} channels as {dims}, which do not '
            f'add up to {dim}; use a width divisible by {2 ** max(num_kernels - 1, 0)}')
    return dims


def cross_scale_convs(in_dim: int, out_dim: int, kernel_sizes: Sequence[int], stride: int, device=None, dtype=None):
    """Parallel strided convolutions whose outputs line up (padding ``(k - stride) / 2``) and concatenate
    to ``out_dim``."""
    for k in kernel_sizes:
        if k < stride or (k - stride) % 2:
            raise ValueError(
                f'CrossFormer: cross-scale kernel sizes {tuple(kernel_sizes)} must each be at least the stride '
                f'{stride} and differ from it by an even number, so that every conv gives the same map')
    dims = cross_scale_dims(out_dim, len(kernel_sizes))
    return nn.ModuleList([
        nn.Conv2d(in_dim, d, k, stride=stride, padding=(k - stride) // 2, device=device, dtype=dtype)
        for d, k in zip(dims, kernel_sizes)])


class CrossScaleEmbed(nn.Module):
    """The stem: cross-scale embedding of the image (CEL); NCHW image in, NHWC tokens out.

    Convolutions of stride 4 and kernels (4, 8, 16, 32) see the same centres at four scales; their
    outputs (C/2, C/4, C/8, C/8 channels) are concatenated and normalised. An image that is not a
    multiple of 4 is zero-padded at the bottom / right, so the map has ``ceil(H / 4)`` rows. Dropout
    (``pos_drop``, the official model's after its patch embedding) ends it.
    """

    def __init__(
            self,
            in_chans: int,
            dim: int,
            kernel_sizes: Sequence[int] = (4, 8, 16, 32),
            stride: int = 4,
            norm_layer=nn.LayerNorm,
            pos_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.stride = stride
        self.projs = cross_scale_convs(in_chans, dim, kernel_sizes, stride, device=device, dtype=dtype)
        self.norm = norm_layer(dim, device=device, dtype=dtype)
        self.pos_drop = nn.Dropout(pos_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, (self.stride, self.stride), channels_last=False)
        # concatenated channels-last: one copy gives the norm its contiguous NHWC input
        x = torch.cat([proj(x).permute(0, 2, 3, 1) for proj in self.projs], dim=-1)
        return self.pos_drop(self.norm(x))


class CrossScaleMerge(nn.Module):
    """Cross-scale merging (CEL with stride 2) that opens stages 2-4; NHWC in and out.

    LayerNorm first, then stride-2 convolutions of kernels (2, 4) whose outputs (``out_dim / 2`` each)
    are concatenated; no norm after. An odd map is zero-padded at the bottom / right after the norm.
    """

    def __init__(
            self,
            in_dim: int,
            out_dim: int,
            kernel_sizes: Sequence[int] = (2, 4),
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.norm = norm_layer(in_dim, device=device, dtype=dtype)
        self.reductions = cross_scale_convs(in_dim, out_dim, kernel_sizes, 2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = pad_map(x, x.shape[1] % 2, x.shape[2] % 2).permute(0, 3, 1, 2)
        return torch.cat([reduction(x).permute(0, 2, 3, 1) for reduction in self.reductions], dim=-1)


def relative_position_index(group_h: int, group_w: int, device: torch.device) -> torch.Tensor:
    """``[N, N]`` row of each (query, key) offset in the ``(2 group_h - 1) x (2 group_w - 1)`` offset table."""
    # a grid, not pos // group_w and pos % group_w: a whole-map group's size is symbolic in an exported graph, and
    # torch.onnx cannot translate the remainder of a tensor by a symbolic integer
    rows, cols = torch.meshgrid(torch.arange(group_h, device=device), torch.arange(group_w, device=device),
                                indexing='ij')
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    d_row = rows[:, None] - rows[None, :] + group_h - 1
    d_col = cols[:, None] - cols[None, :] + group_w - 1
    return d_row * (2 * group_w - 1) + d_col


class DynamicPosBias(nn.Module):
    """Dynamic position bias (DPB): an MLP from a relative offset (dy, dx) to one bias per head.

    ``Linear(2, dim)``, then three times ``LayerNorm, ReLU, Linear`` (the last one to ``num_heads``).
    It is evaluated on every offset of the group shape it is asked for, so the bias fits any group.
    """

    def __init__(self, dim: int, num_heads: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.proj = nn.Linear(2, dim, **dd)
        self.layers = nn.Sequential(*[
            nn.Sequential(nn.LayerNorm(dim, **dd), nn.ReLU(), nn.Linear(dim, out_dim, **dd))
            for out_dim in (dim, dim, num_heads)])

    def forward(self, group_h: int, group_w: int) -> torch.Tensor:
        """The bias ``[heads, N, N]`` of a ``group_h x group_w`` group (N tokens, row-major)."""
        weight = self.proj.weight
        offsets_h = torch.arange(1 - group_h, group_h, device=weight.device, dtype=weight.dtype)
        offsets_w = torch.arange(1 - group_w, group_w, device=weight.device, dtype=weight.dtype)
        offsets = torch.stack(torch.meshgrid([offsets_h, offsets_w], indexing='ij'), dim=-1).reshape(-1, 2)
        table = self.layers(self.proj(offsets))
        index = relative_position_index(group_h, group_w, weight.device)
        num_tokens = group_h * group_w
        # gathered head-major, so the bias is contiguous [heads, N, N] without a copy of its own
        return table.t()[:, index.reshape(-1)].reshape(-1, num_tokens, num_tokens)


@register_notrace_function  # reason: chooses the grouping from the map size
def group_layout(height: int, width: int, group_size: int, interval: int) -> Tuple[int, int, int]:
    """(group height, group width, interval) for an ``height x width`` map: ``group_size`` squares taken
    ``interval`` apart, or the whole map as one group when its shorter side is at most ``group_size``."""
    if min(height, width) <= group_size:
        return height, width, 1
    return group_size, group_size, interval


torch.fx.wrap('group_layout')  # the same for plain torch.fx.symbolic_trace


def partition_groups(x: torch.Tensor, group_h: int, group_w: int, interval: int) -> torch.Tensor:
    """``[B, Hp, Wp, C]`` -> ``[B, num_groups, group_h * group_w, C]``; Hp, Wp are multiples of the group
    times ``interval``. A group holds the tokens ``interval`` apart inside one region of
    ``group_h * interval`` rows and ``group_w * interval`` columns (interval 1: a contiguous window);
    groups are ordered region row, region column, row offset, column offset."""
    B, Hp, Wp, C = x.shape
    regions_h, regions_w = Hp // (group_h * interval), Wp // (group_w * interval)
    x = x.reshape(B, regions_h, group_h, interval, regions_w, group_w, interval, C)
    num_groups = regions_h * regions_w * interval * interval
    return x.permute(0, 1, 4, 3, 6, 2, 5, 7).reshape(B, num_groups, group_h * group_w, C)


def reverse_groups(x: torch.Tensor, height: int, width: int, group_h: int, group_w: int, interval: int) -> torch.Tensor:
    """The inverse of :func:`partition_groups`: ``[B, num_groups, N, C]`` -> ``[B, height, width, C]``."""
    B, C = x.shape[0], x.shape[-1]
    regions_h, regions_w = height // (group_h * interval), width // (group_w * interval)
    x = x.reshape(B, regions_h, regions_w, interval, interval, group_h, group_w, C)
    return x.permute(0, 1, 5, 3, 2, 6, 4, 7).reshape(B, height, width, C)


def padded_keys(height: int, width: int, pad_h: int, pad_w: int, group_h: int, group_w: int, interval: int,
                device: torch.device) -> torch.Tensor:
    """``[num_groups, N]``: True where a group's token is padding (bottom rows / right columns)."""
    rows = torch.arange(height + pad_h, device=device) >= height
    cols = torch.arange(width + pad_w, device=device) >= width
    padded = (rows[:, None] | cols[None, :])[None, :, :, None]
    return partition_groups(padded, group_h, group_w, interval)[0, :, :, 0]


@torch.fx.wrap
@register_notrace_function  # reason: skips a copy where the map needs no padding, a branch on the map size
def pad_map(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Zero-pads an NHWC map by ``pad_h`` rows at the bottom and ``pad_w`` columns at the right. An eager call
    returns ``x`` itself where there is nothing to pad (``F.pad`` copies even then); a compiled or exported
    graph pads for every size, so that it holds no branch on the map size."""
    if torch.compiler.is_compiling() or pad_h > 0 or pad_w > 0:   # in this order: no guard on a traced size
        return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


@torch.fx.wrap
@register_notrace_function  # reason: the padded-key mask exists only where the map is padded, a branch on its size
def mask_padded_keys(bias: torch.Tensor, batch: int, height: int, width: int, pad_h: int, pad_w: int, group_h: int,
                     group_w: int, interval: int, mask_value: float) -> torch.Tensor:
    """SDPA's additive mask for queries ``[batch * num_groups, heads, N, d]`` from the position bias
    ``[heads, N, N]``: the bias alone (``[1, heads, N, N]``, one for every group) where the map is not padded,
    else the bias plus ``mask_value`` on each group's padded keys, ``[batch * num_groups, heads, N, N]``. A
    compiled or exported graph takes the second form for every size (no branch on the map size)."""
    if not torch.compiler.is_compiling() and pad_h == 0 and pad_w == 0:   # in this order, as in pad_map
        return bias.unsqueeze(0)
    padded = padded_keys(height, width, pad_h, pad_w, group_h, group_w, interval, bias.device)
    mask = bias.unsqueeze(0) + padded[:, None, None, :].to(bias.dtype) * mask_value
    return mask.repeat(batch, 1, 1, 1)


class LongShortDistanceAttention(nn.Module):
    """Multi-head self-attention inside groups, with the dynamic position bias; NHWC in and out.

    ``interval == 1`` is SDA (contiguous ``group_size`` squares), ``interval > 1`` LDA (squares of tokens
    ``interval`` apart). The map is zero-padded at the bottom / right to a multiple of
    ``group_size * interval`` and the padded keys get ``MASK_VALUE`` added to their logits, as in the
    official code (padded queries are computed and cropped); a map whose shorter side is at most
    ``group_size`` is one group (full attention). The DPB MLP is ``dim / 16`` wide.
    """
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            group_size: int,
            interval: int = 1,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'LongShortDistanceAttention: dim {dim} is not divisible by num_heads {num_heads}')
        if group_size < 1 or interval < 1:
            raise ValueError(
                f'LongShortDistanceAttention: group_size and interval must be >= 1, got {group_size} and {interval}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.group_size = group_size
        self.interval = interval
        self.mask_value = MASK_VALUE
        self.fused_attn = use_fused_attn()
        self.pos = DynamicPosBias(dim // 16, num_heads, **dd)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention_mask(self, batch: int, height: int, width: int, pad_h: int, pad_w: int, group_h: int, group_w: int,
                       interval: int) -> torch.Tensor:
        """The position bias plus ``MASK_VALUE`` on padded keys, for queries ``[batch * num_groups, heads, N, d]``:
        ``[1, heads, N, N]`` where the map is not padded, else ``[batch * num_groups, heads, N, N]``."""
        return mask_padded_keys(self.pos(group_h, group_w), batch, height, width, pad_h, pad_w, group_h, group_w,
                                interval, self.mask_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        group_h, group_w, interval = group_layout(H, W, self.group_size, self.interval)
        pad_h, pad_w = (-H) % (group_h * interval), (-W) % (group_w * interval)
        # grouped before the projection, as the official code does: one copy of C channels, not of 3 C
        x = partition_groups(pad_map(x, pad_h, pad_w), group_h, group_w, interval)
        num_groups, num_tokens = x.shape[1], x.shape[2]
        # [B, groups, N, 3 C] -> 3 x [B * groups, heads, N, d]: strided views, which SDPA reads in place
        qkv = self.qkv(x).reshape(B * num_groups, num_tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        mask = self.attention_mask(B, H, W, pad_h, pad_w, group_h, group_w, interval).to(q.dtype)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v

        # an explicit copy: SDPA's CPU output layout depends on grad mode, and a reshape traced as a view under
        # one layout fails under the other in torch.onnx's decomposition passes
        x = x.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(B, num_groups, num_tokens, C)
        x = reverse_groups(x, H + pad_h, W + pad_w, group_h, group_w, interval)
        return self.proj_drop(self.proj(x[:, :H, :W]))

    def extra_repr(self) -> str:
        kind = 'SDA' if self.interval == 1 else f'LDA, interval={self.interval}'
        return f'num_heads={self.num_heads}, group_size={self.group_size}, {kind}'


class ActivationCooling(nn.Module):
    """CrossFormer++'s activation cooling layer (ACL): depthwise 3x3 conv, then norm; NHWC.

    It replaces the activations (no residual), damping their growth along the residual stream.
    """

    def __init__(self, dim: int, norm_layer=nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        self.conv = DepthwiseConvNhwc(dim, 3, device=device, dtype=dtype)
        self.norm = norm_layer(dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class CrossFormerBlock(nn.Module):
    """Pre-norm block: SDA or LDA, then MLP, then (CrossFormer++, some blocks) activation cooling; NHWC."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            group_size: int,
            interval: int = 1,
            activation_cooling: bool = False,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = LongShortDistanceAttention(
            dim, num_heads, group_size, interval, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.cooling = ActivationCooling(dim, norm_layer, **dd) if activation_cooling else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return self.cooling(x)


class CrossFormerStage(PyramidStage):
    """Optional cross-scale merge, then blocks alternating SDA (even index) and LDA (odd index); NHWC."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_heads: int,
            group_size: int,
            interval: int,
            downsample: bool = True,
            merge_kernel_sizes: Sequence[int] = (2, 4),
            activation_cooling: bool = False,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path_rates: Sequence[float] = (),
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(
            downsample=CrossScaleMerge(
                in_dim, dim, merge_kernel_sizes, norm_layer=norm_layer, **dd) if downsample else nn.Identity(),
            blocks=[
                CrossFormerBlock(
                    dim,
                    num_heads,
                    group_size,
                    interval=interval if i % 2 else 1,
                    # CrossFormer++: after every third block, but never after the stage's last one
                    activation_cooling=activation_cooling and (i + 1) % 3 == 0 and i < depth - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path_rates[i],
                    norm_layer=norm_layer,
                    **dd,
                )
                for i in range(depth)],
        )


class CrossFormer(PyramidBackbone):
    """CrossFormer / CrossFormer++: a four-stage hierarchical transformer on long / short distance attention.

    Args:
        in_chans: Number of input image channels.
        num_classes: Number of classes of the classifier head (0: no head).
        global_pool: Global pooling type of the head.
        embed_dim: Width of the first stage; it doubles at every stage.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        group_size: Group side G per stage (CrossFormer 7, 7, 7, 7; CrossFormer++ 4, 4, 14, 7). The
            official dense-task configs use 7, 7, 7, 7 for both generations.
        interval: LDA sampling interval per stage (CrossFormer 8, 4, 2, 1; CrossFormer++ 4, 2, 1, 1;
            the official dense-task configs 8, 4, 2, 1).
        stem_kernel_sizes: Kernels of the stem's cross-scale convolutions (stride 4).
        merge_kernel_sizes: Kernels of the cross-scale merges (stride 2).
        activation_cooling: CrossFormer++'s activation cooling layer after blocks 3, 6, ... of a
            stage (never after its last block).
        mlp_ratio: MLP hidden width over block width.
        qkv_bias: Bias in the qkv projection.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after the stem, after the attention projection and in the MLP (the
            official ``drop_rate``).
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, rising linearly over the blocks to this value.
    """
    family = 'CrossFormer'

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            group_size: Tuple[int, ...] = (7, 7, 7, 7),
            interval: Tuple[int, ...] = (8, 4, 2, 1),
            stem_kernel_sizes: Tuple[int, ...] = (4, 8, 16, 32),
            merge_kernel_sizes: Tuple[int, ...] = (2, 4),
            activation_cooling: bool = False,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        per_stage = dict(num_heads=num_heads, group_size=group_size, interval=interval)
        wrong = {name: len(value) for name, value in per_stage.items() if len(value) != num_stages}
        if wrong:
            raise ValueError(f'CrossFormer: {num_stages} stages (depths {tuple(depths)}) but {wrong} entries; '
                             f'give one per stage')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem_stride = 4
        self.stem = CrossScaleEmbed(
            in_chans, dims[0], stem_kernel_sizes, self.stem_stride, norm_layer=norm_layer, pos_drop=proj_drop_rate, **dd)
        # timm adapts every listed conv of a pretrained stem to another in_chans, not only pretrained_cfg's first
        self._traits = dict(first_conv=tuple(f'stem.projs.{i}' for i in range(len(stem_kernel_sizes))))
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            stages.append(CrossFormerStage(
                dims[max(i - 1, 0)],
                dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                group_size=group_size[i],
                interval=interval[i],
                downsample=i > 0,
                merge_kernel_sizes=merge_kernel_sizes,
                activation_cooling=activation_cooling,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path_rates=dpr[i],
                norm_layer=norm_layer,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=self.stem_stride * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt=self.output_fmt,
            **dd)
        self.apply(self._init_weights)


# The old v1 code registers the DPB's offset table and index as persistent buffers; we compute them.
_OFFICIAL_BUFFERS = re.compile(r'\.attn\.(biases|relative_position_index)$|\.attn_mask$')

# official key -> ours; applied in order, each to the result of the previous one
_OFFICIAL_KEY_RULES = (
    (r'^patch_embed\.', 'stem.'),
    (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'\.ex_conv\.', '.cooling.conv.'),
    (r'\.ex_ln\.', '.cooling.norm.'),
    (r'\.attn\.pos\.pos_proj\.', '.attn.pos.proj.'),
    (r'\.attn\.pos\.pos(\d)\.', lambda m: f'.attn.pos.layers.{int(m[1]) - 1}.'),
    (r'^head\.', 'head.fc.'),
)
# the official merge closes layer i; ours opens stage i + 1
_OFFICIAL_DOWNSAMPLE = re.compile(r'^layers\.(\d+)\.downsample\.')


def _convert_official_key(key: str) -> str:
    match = _OFFICIAL_DOWNSAMPLE.match(key)
    if match:
        return f'stages.{int(match[1]) + 1}.downsample.' + key[match.end():]
    return rename_by_every_rule(key, _OFFICIAL_KEY_RULES)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: CrossFormer) -> Dict[str, torch.Tensor]:
    """Converts an official CrossFormer / CrossFormer++ checkpoint (or one of ours) to this model's keys.

    Both official layouts load: the v1 checkpoints (old ``crossformer`` branch), whose persistent DPB
    buffers ``attn.biases`` / ``attn.relative_position_index`` are dropped (this model computes them for
    whatever group size it meets), and the CrossFormer++ checkpoints of the ``main`` branch. Accepts a
    plain state dict or one wrapped as the official files are (``{'model': ...}``; see
    :func:`~attnzoo.backbones._checkpoint.unwrap_checkpoint`). Classifier keys may differ (timm drops or
    re-creates the head when num_classes changes); any other mismatch raises a ValueError naming the keys.
    """
    return convert_checkpoint(
        state_dict, model, _convert_official_key, rebuilt=_OFFICIAL_BUFFERS,
        hint='(after converting official CrossFormer names) is it a classification checkpoint of this variant '
             '(depths; CrossFormer++ checkpoints need activation_cooling=True, v1 ones False)?')


def _create_crossformer(variant: str, pretrained: bool = False, **kwargs) -> CrossFormer:
    if pretrained:
        require_downloadable_weights(variant, kwargs, lambda url: url in _SHARE_PAGES.values())
    return build_pyramid(CrossFormer, variant, pretrained, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict:
    return pyramid_cfg(dict(
        # the official evaluation: resize to 256, center crop 224, bicubic
        url=url, first_conv='stem.projs.0', license='mit',
        origin_url='https://github.com/cheerss/CrossFormer'), **kwargs)


_V1_PAPER = dict(
    paper_ids='arXiv:2108.00154',
    paper_name='CrossFormer: A Versatile Vision Transformer Based on Cross-scale Attention')
_PP_PAPER = dict(
    paper_ids='arXiv:2303.06908',
    paper_name='CrossFormer++: A Versatile Vision Transformer Hinging on Cross-scale Attention')
_DRIVE = 'https://drive.google.com/file/d/{}/view?usp=sharing'
_BAIDU = 'https://pan.baidu.com/s/{}?pwd=crsf'
# the official README's links (classification, ImageNet-1K); ++-L and ++-H share one BaiduCloud page
_SHARE_PAGES = {
    'crossformer_tiny': _DRIVE.format('1YSkU9enn-ITyrbxLH13zNcBYvWSEidfq'),
    'crossformer_small': _DRIVE.format('1RAkigsgr33va0RZ85S2Shs2BhXYcS6U8'),
    'crossformer_base': _DRIVE.format('1bK8biVCi17nz_nkt7rBfio_kywUpllSU'),
    'crossformer_large': _DRIVE.format('1zRWByVW_KIZ87NgaBkDIm60DAsGJErdG'),
    'crossformer_pp_small': _BAIDU.format('1smc_kRoogd0Ig5vfqwuGTA'),
    'crossformer_pp_base': _BAIDU.format('13XVP0ebtNcyRMmkl11ALYg'),
    'crossformer_pp_large': _BAIDU.format('1xtPh-ndcOxRM7fPYYxIIRg'),
    'crossformer_pp_huge': _BAIDU.format('1xtPh-ndcOxRM7fPYYxIIRg'),
}

default_cfgs = generate_default_cfgs({
    f'{name}.in1k': _cfg(url, **(_PP_PAPER if '_pp_' in name else _V1_PAPER)) for name, url in _SHARE_PAGES.items()
})

# CrossFormer: G = 7 everywhere, LDA intervals 8, 4, 2, 1 (at 224 the stage maps are 56, 28, 14, 7)
_V1 = dict(group_size=(7, 7, 7, 7), interval=(8, 4, 2, 1))
# CrossFormer++: progressive group sizes, intervals 4, 2, 1, 1, activation cooling
_PP = dict(group_size=(4, 4, 14, 7), interval=(4, 2, 1, 1), activation_cooling=True)


@register_model
def crossformer_tiny(pretrained: bool = False, **kwargs) -> CrossFormer:
    model_args = dict(_V1, embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16))
    return _create_crossformer('crossformer_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_small(pretrained: bool = False, **kwargs) -> CrossFormer:
    model_args = dict(_V1, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_crossformer('crossformer_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_base(pretrained: bool = False, **kwargs) -> CrossFormer:
    model_args = dict(_V1, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_crossformer('crossformer_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_large(pretrained: bool = False, **kwargs) -> CrossFormer:
    model_args = dict(_V1, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_crossformer('crossformer_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_pp_small(pretrained: bool = False, **kwargs) -> CrossFormer:
    model_args = dict(_PP, embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16))
    return _create_crossformer('crossformer_pp_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_pp_base(pretrained: bool = False, **kwargs) -> CrossFormer:
    model_args = dict(_PP, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_crossformer('crossformer_pp_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_pp_large(pretrained: bool = False, **kwargs) -> CrossFormer:
    model_args = dict(_PP, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_crossformer('crossformer_pp_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_pp_huge(pretrained: bool = False, **kwargs) -> CrossFormer:
    model_args = dict(_PP, embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_crossformer('crossformer_pp_huge', pretrained=pretrained, **dict(model_args, **kwargs))
