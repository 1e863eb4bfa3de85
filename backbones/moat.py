"""MOAT: alternating mobile convolution and attention.

Paper: `MOAT: Alternating Mobile Convolution and Attention Brings Strong Vision Models`
    - https://arxiv.org/abs/2210.01820 (ICLR 2023)

Official code and checkpoints (TensorFlow): https://github.com/google-research/deeplab2
(``model/pixel_encoder/moat.py``, ``model/layers/moat_blocks.py``, ``model/layers/moat_attention.py``;
Apache-2.0).

A convolutional stem (stride 2), two stages of MBConv blocks (with squeeze-and-excitation) and two
stages of MOAT blocks (stride 32 in all). A MOAT block is an MBConv block without SE followed by
multi-head self-attention (pre-LayerNorm, residual); there is no MLP after the attention. The head
averages the last map, applies a LayerNorm and a linear classifier (the official 1x1 conv).

Where it differs from timm's MaxViT / CoAtNet (``timm/models/maxxvit.py``), whose MBConv layout and
key names it follows: exact (erf) GELU, not the tanh approximation; BatchNorm eps 1e-3; SE only in the
MBConv stages; the shortcut pools with TensorFlow's 'SAME' average pooling (padding excluded from the
mean, pool 2 for classification, 3 for the official dense tasks), which timm's ``Downsample2d`` does
not compute at odd sizes or with pool 3; stochastic depth ``rate * i / num_blocks`` per block ``i``.

Attention is global (the whole map: classification) or inside non-overlapping windows per stage
(``window_size``: the official dense-task default is ``(None, None, 14, 7)``, global attention at the
end of each MOAT stage with ``global_attention_at_end_of_moat_stage``). Relative position
embeddings are stored for the official size (27x27 offsets at stride 16, 13x13 at stride 32) and
bilinearly resized to the window, as the official build does. A map that is not a multiple of the
window is zero-padded at the bottom / right, the padded keys are masked out, and the output is
cropped back; strided convolutions and pools use TensorFlow's 'SAME' padding. So any input size
works, and at the sizes the official models were built for, the model computes what the official
code computes.
"""
import re
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import BatchNormAct2d, DropPath, LayerNorm2d, NormMlpClassifierHead, SEModule, use_fused_attn
from timm.models import generate_default_cfgs, register_model, register_notrace_function

from ._checkpoint import check_checkpoint_keys, require_downloadable_weights, unwrap_checkpoint
from ._layers import pad_to_multiple
from ._pyramid import PyramidBackbone, PyramidStage, build_pyramid, pyramid_cfg

__all__ = ['Moat']

BLOCK_TYPES = ('mbconv', 'moat')


# ---------------------------------------------------------------- shape logic (one FX / notrace call each)

def tf_same_padding(size: int, kernel_size: int, stride: int) -> List[int]:
    """TensorFlow's 'SAME' padding of one axis as [before, after]; the odd pixel goes after."""
    total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
    return [total // 2, total - total // 2]


@torch.fx.wrap
@register_notrace_function  # reason: the padding depends on the concrete map size
def pad_tf_same(x: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    top, bottom = tf_same_padding(x.shape[-2], kernel_size, stride)
    left, right = tf_same_padding(x.shape[-1], kernel_size, stride)
    return F.pad(x, [left, right, top, bottom])


@torch.fx.wrap
@register_notrace_function  # reason: the padding depends on the concrete map size
def avg_pool_tf_same(x: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """``tf.keras.layers.AveragePooling2D(padding='same')``: padded pixels do not count in the mean."""
    top, bottom = tf_same_padding(x.shape[-2], kernel_size, stride)
    left, right = tf_same_padding(x.shape[-1], kernel_size, stride)
    if top + bottom + left + right == 0:
        return F.avg_pool2d(x, kernel_size, stride)
    padding = [left, right, top, bottom]
    summed = F.avg_pool2d(F.pad(x, padding), kernel_size, stride, divisor_override=1)
    counts = F.avg_pool2d(F.pad(torch.ones_like(x[:1, :1]), padding), kernel_size, stride, divisor_override=1)
    return summed / counts


@torch.fx.wrap
@register_notrace_function  # reason: the padding and window count depend on the concrete map size
def window_partition(x: torch.Tensor, win_h: int, win_w: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * windows, win_h * win_w, C], zero-padding H, W at the bottom / right."""
    x = pad_to_multiple(x, (win_h, win_w))
    B, H, W, C = x.shape
    x = x.reshape(B, H // win_h, win_h, W // win_w, win_w, C)
    return x.transpose(2, 3).reshape(-1, win_h * win_w, C)


@torch.fx.wrap
@register_notrace_function  # reason: the padding and window count depend on the concrete map size
def window_reverse(windows: torch.Tensor, height: int, width: int, win_h: int, win_w: int) -> torch.Tensor:
    """[B * windows, win_h * win_w, C] -> [B, height, width, C], cropping the padding away."""
    C = windows.shape[-1]
    num_h, num_w = -(-height // win_h), -(-width // win_w)
    x = windows.reshape(-1, num_h, num_w, win_h, win_w, C).transpose(2, 3)
    x = x.reshape(-1, num_h * win_h, num_w * win_w, C)
    return x[:, :height, :width]


def relative_position_bias(table: torch.Tensor, win_h: int, win_w: int) -> torch.Tensor:
    """[heads, 2p-1, 2p-1] table of offsets -> [heads, win_h * win_w, win_h * win_w] logit bias.

    The table is first resized to ``2 * window - 1`` offsets per axis when it has another size,
    bilinearly with half-pixel centres as ``tf.image.resize`` (the official build) does. Query
    ``(i, j)`` and key ``(k, l)`` get ``table[:, k - i + win_h - 1, l - j + win_w - 1]``.
    """
    size = [2 * win_h - 1, 2 * win_w - 1]
    if table.shape[-2] != size[0] or table.shape[-1] != size[1]:
        resized = F.interpolate(table.unsqueeze(0).float(), size=size, mode='bilinear', align_corners=False)
        table = resized.squeeze(0).to(table.dtype)
    rows = torch.arange(win_h, device=table.device)
    cols = torch.arange(win_w, device=table.device)
    row_offset = rows[None, :] - rows[:, None] + win_h - 1  # [query row, key row]
    col_offset = cols[None, :] - cols[:, None] + win_w - 1
    bias = table[:, row_offset[:, None, :, None], col_offset[None, :, None, :]]  # [heads, i, j, k, l]
    return bias.reshape(table.shape[0], win_h * win_w, win_h * win_w)


@torch.fx.wrap
@register_notrace_function  # reason: the window count and padding depend on the concrete map size
def attention_bias(
        x: torch.Tensor,
        table: Optional[torch.Tensor],
        win_h: int,
        win_w: int,
) -> Optional[torch.Tensor]:
    """The logit bias of window attention on ``x`` [B, H, W, C]: the relative position bias (if
    ``table``) plus -inf on the keys that padding added (if any); broadcastable to the logits
    [B * windows, heads, N, N], or None when there is neither."""
    B, H, W, _ = x.shape
    bias: Optional[torch.Tensor] = None
    if table is not None:
        bias = relative_position_bias(table, win_h, win_w).to(x.dtype)
    pad_h, pad_w = (win_h - H % win_h) % win_h, (win_w - W % win_w) % win_w
    if pad_h or pad_w:
        valid = torch.zeros(1, H + pad_h, W + pad_w, 1, dtype=x.dtype, device=x.device)
        valid[:, :H, :W] = 1.
        padded_keys = window_partition(valid, win_h, win_w).reshape(-1, 1, 1, win_h * win_w) == 0
        mask = torch.zeros(padded_keys.shape, dtype=x.dtype, device=x.device).masked_fill(padded_keys, float('-inf'))
        bias = mask if bias is None else mask + bias  # [windows, heads or 1, N, N]
        bias = bias.repeat(B, 1, 1, 1)
    return bias


@torch.fx.wrap
@register_notrace_function  # reason: the bias may be None
def add_bias(logits: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return logits if bias is None else logits + bias


# ---------------------------------------------------------------- layers

def tf_same_conv2d(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1, bias: bool = True,
                   device=None, dtype=None) -> nn.Conv2d:
    """A conv with TensorFlow's 'SAME' padding: symmetric when unstrided, else :class:`Conv2dTfSame`."""
    if stride == 1:
        return nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias,
                         device=device, dtype=dtype)
    return Conv2dTfSame(in_chs, out_chs, kernel_size, stride=stride, groups=groups, bias=bias,
                        device=device, dtype=dtype)


class Conv2dTfSame(nn.Conv2d):
    """A strided ``nn.Conv2d`` with TensorFlow's 'SAME' padding (the extra pixel at the bottom / right),
    which the official weights were trained with."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, groups: int = 1,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=0, groups=groups, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_tf_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Stem(nn.Module):
    """3x3 conv stride 2 (bias) -> BatchNorm -> GELU -> 3x3 conv (bias): the official stem."""

    def __init__(self, in_chs: int, out_chs: Tuple[int, int], norm_act_layer, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = Conv2dTfSame(in_chs, out_chs[0], 3, stride=2, **dd)
        self.norm1 = norm_act_layer(out_chs[0], **dd)
        self.conv2 = tf_same_conv2d(out_chs[0], out_chs[1], 3, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class Shortcut(nn.Module):
    """The MBConv shortcut: TF 'SAME' average pooling when strided, then a 1x1 conv (bias) when the
    width changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, pool_size: int, device=None, dtype=None):
        super().__init__()
        self.stride = stride
        self.pool_size = pool_size
        if in_chs != out_chs:
            self.expand = nn.Conv2d(in_chs, out_chs, 1, device=device, dtype=dtype)
        else:
            self.expand = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = avg_pool_tf_same(x, self.pool_size, self.stride)
        return self.expand(x)

    def extra_repr(self) -> str:
        return f'stride={self.stride}, pool_size={self.pool_size}'


class MbConvBlock(nn.Module):
    """Pre-norm inverted bottleneck: BN -> 1x1 (x expand_ratio of the output width) -> BN-GELU ->
    depthwise kxk (stride) -> BN-GELU -> [SE] -> 1x1 (bias), plus the shortcut. NCHW in and out.

    Layout and key names as timm's ``MbConvBlock``; the SE squeezes to ``se_ratio`` times the output
    width with SiLU, as the official ``SqueezeAndExcitation``.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            expand_ratio: float = 4.,
            se_ratio: Optional[float] = 0.25,
            kernel_size: int = 3,
            shortcut_pool_size: int = 2,
            drop_path: float = 0.,
            norm_act_layer=BatchNormAct2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        mid_chs = int(out_chs * expand_ratio)
        if stride > 1 or in_chs != out_chs:
            self.shortcut = Shortcut(in_chs, out_chs, stride, shortcut_pool_size, **dd)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = norm_act_layer(in_chs, apply_act=False, **dd)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False, **dd)
        self.norm1 = norm_act_layer(mid_chs, **dd)
        self.conv2_kxk = tf_same_conv2d(mid_chs, mid_chs, kernel_size, stride=stride, groups=mid_chs, bias=False, **dd)
        self.norm2 = norm_act_layer(mid_chs, **dd)
        if se_ratio:
            self.se = SEModule(mid_chs, rd_channels=max(1, int(out_chs * se_ratio)), act_layer=nn.SiLU, **dd)
        else:
            self.se = nn.Identity()
        self.conv3_1x1 = nn.Conv2d(mid_chs, out_chs, 1, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.norm1(self.conv1_1x1(self.pre_norm(x)))
        x = self.se(self.norm2(self.conv2_kxk(x)))
        return self.drop_path(self.conv3_1x1(x)) + shortcut


class MoatAttention(nn.Module):
    """Multi-head self-attention over the whole map or inside windows; NHWC in and out.

    q, k and v come from one ``qkv`` projection (the official separate q / k / v, each ``[C, heads,
    head_dim]``, one after the other); logits get the relative position bias (if any) and -inf on
    padded keys.
    """
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            head_dim: int = 32,
            window_size: Optional[Tuple[int, int]] = None,
            position_embedding_size: Optional[int] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % head_dim:
            raise ValueError(f'MOAT attention: width {dim} is not a multiple of head_dim {head_dim}')
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.window_size = window_size
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, 3 * dim, **dd)
        if position_embedding_size:
            offsets = 2 * position_embedding_size - 1
            self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_heads, offsets, offsets, **dd))
        else:
            self.register_parameter('relative_position_bias_table', None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, C = x.shape
        win_h, win_w = (H, W) if self.window_size is None else self.window_size
        windows = window_partition(x, win_h, win_w)
        qkv = self.qkv(windows).reshape(windows.shape[0], windows.shape[1], 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = attention_bias(x, self.relative_position_bias_table, win_h, win_w)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            logits = add_bias((q * self.scale) @ k.transpose(-2, -1), bias)
            out = self.attn_drop(logits.float().softmax(dim=-1).to(v.dtype)) @ v
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(windows.shape[0], windows.shape[1], C)))
        return window_reverse(out, H, W, win_h, win_w)

    def extra_repr(self) -> str:
        window = 'global' if self.window_size is None else f'{self.window_size[0]}x{self.window_size[1]}'
        return f'num_heads={self.num_heads}, window={window}'


class MoatBlock(nn.Module):
    """An MBConv block without SE (``conv``), then pre-LN attention with a residual; no MLP. NCHW."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            expand_ratio: float = 4.,
            head_dim: int = 32,
            window_size: Optional[Tuple[int, int]] = None,
            position_embedding_size: Optional[int] = None,
            shortcut_pool_size: int = 2,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            norm_act_layer=BatchNormAct2d,
            ln_eps: float = 1e-5,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = MbConvBlock(
            in_chs, out_chs, stride=stride, expand_ratio=expand_ratio, se_ratio=None,
            shortcut_pool_size=shortcut_pool_size, drop_path=drop_path, norm_act_layer=norm_act_layer, **dd)
        self.norm = nn.LayerNorm(out_chs, eps=ln_eps, **dd)
        self.attn = MoatAttention(
            out_chs, head_dim=head_dim, window_size=window_size, position_embedding_size=position_embedding_size,
            attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm(x)))
        return x.permute(0, 3, 1, 2)


def _stage_windows(
        window_size: Sequence[Union[None, int, Sequence[int]]],
        block_types: Sequence[str],
) -> List[Optional[Tuple[int, int]]]:
    """Per-stage window sizes as (height, width) or None (global attention), checked."""
    if len(window_size) != len(block_types):
        raise ValueError(
            f'MOAT: window_size needs one entry per stage ({len(block_types)}), got {list(window_size)}; '
            f'the official dense-task setting is (None, None, 14, 7)')
    windows: List[Optional[Tuple[int, int]]] = []
    for i, (window, block_type) in enumerate(zip(window_size, block_types)):
        if window is None:
            windows.append(None)
            continue
        if block_type != 'moat':
            raise ValueError(f'MOAT: stage {i} is a {block_type} stage without attention; its window_size must be '
                             f'None, got {window}')
        pair = (window, window) if isinstance(window, int) else tuple(window)
        if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
            raise ValueError(f'MOAT: window_size[{i}] must be None, a positive int or (height, width), got {window}')
        windows.append(pair)
    return windows


class Moat(PyramidBackbone):
    """MOAT: a convolutional stem, MBConv stages, then MOAT stages (MBConv + attention blocks).

    Args:
        in_chans: Number of input image channels.
        num_classes: Number of classes of the classifier head (0: no head).
        global_pool: Global pooling type of the head.
        stem_width: Output widths of the two stem convolutions.
        embed_dim: Width of each stage.
        depths: Blocks per stage.
        block_types: 'mbconv' or 'moat' per stage.
        head_dim: Channels per attention head.
        expand_ratio: MBConv inner width over the block's output width.
        se_ratio: SE squeeze width over the output width, in the MBConv stages.
        window_size: Attention window per stage: None (global attention over the whole map, the
            classification setting) or an int / (height, width). The official dense tasks use
            (None, None, 14, 7).
        global_attention_at_end_of_moat_stage: The last block of each MOAT stage attends globally
            whatever ``window_size`` says (the official flag of the same name).
        relative_position_embedding: Relative position bias in the attention (the official
            ``2d_multi_head``); False for the ``_no_pe`` checkpoints.
        position_embedding_size: Window size each stage's relative position table was made for
            (its 2p-1 offsets are resized to the actual window).
        shortcut_pool_size: Average-pool size of the strided shortcuts: 2 in classification, 3 in the
            official dense tasks (no parameters; the pretrained weights work with either).
        drop_rate: Dropout before the classifier.
        attn_drop_rate: Dropout on the attention weights.
        proj_drop_rate: Dropout after the attention projection.
        drop_path_rate: Stochastic depth of the last block + 1; block ``i`` of ``N`` drops with
            ``drop_path_rate * i / N`` (the official ``1 - survival_prob`` schedule).
        bn_eps: BatchNorm epsilon (Keras' default, 1e-3).
        ln_eps: LayerNorm epsilon.
    """
    family: torch.jit.Final[str] = 'MOAT'
    # forward_features returns [B, C, H, W] maps (MOAT computes NCHW; only attention goes channels last)
    output_fmt: torch.jit.Final[str] = 'NCHW'
    # feature 0 is the stem's map (stride 2), features 1-4 the stages' (strides 4 to 32), as timm's MaxViT
    stem_feature: torch.jit.Final[bool] = True
    # the official release has no EMA copies to choose from; a file that holds both gives its EMA weights
    checkpoint_ema: torch.jit.Final[bool] = True
    no_weight_decay_keywords = ('relative_position_bias_table',)

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            stem_width: Tuple[int, int] = (64, 64),
            embed_dim: Tuple[int, ...] = (96, 192, 384, 768),
            depths: Tuple[int, ...] = (2, 3, 7, 2),
            block_types: Tuple[str, ...] = ('mbconv', 'mbconv', 'moat', 'moat'),
            head_dim: int = 32,
            expand_ratio: float = 4.,
            se_ratio: float = 0.25,
            window_size: Sequence[Union[None, int, Sequence[int]]] = (None, None, None, None),
            global_attention_at_end_of_moat_stage: bool = False,
            relative_position_embedding: bool = True,
            position_embedding_size: Sequence[Optional[int]] = (None, None, 14, 7),
            shortcut_pool_size: int = 2,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            bn_eps: float = 1e-3,
            ln_eps: float = 1e-5,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        if len(embed_dim) != num_stages or len(block_types) != num_stages or len(position_embedding_size) != num_stages:
            raise ValueError(
                f'MOAT: depths, embed_dim, block_types and position_embedding_size need one entry per stage; got '
                f'{len(depths)}, {len(embed_dim)}, {len(block_types)} and {len(position_embedding_size)}')
        unknown = [t for t in block_types if t not in BLOCK_TYPES]
        if unknown:
            raise ValueError(f'MOAT: block_types must be among {BLOCK_TYPES}, got {unknown}')
        if len(stem_width) != 2:
            raise ValueError(f'MOAT: stem_width gives the widths of the two stem convs, got {stem_width}')
        windows = _stage_windows(window_size, block_types)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = embed_dim[-1]
        norm_act_layer = partial(BatchNormAct2d, eps=bn_eps, act_layer=nn.GELU)

        self.stem_stride = 2
        self.stem = Stem(in_chans, tuple(stem_width), norm_act_layer, **dd)
        self.feature_info = [dict(num_chs=stem_width[-1], reduction=2, module='stem')]
        num_blocks = sum(depths)
        block_idx = 0
        in_chs = stem_width[-1]
        stages = []
        for i in range(num_stages):
            blocks = []
            for j in range(depths[i]):
                drop_path = drop_path_rate * block_idx / num_blocks
                block_idx += 1
                stride = 2 if j == 0 else 1
                if block_types[i] == 'mbconv':
                    blocks.append(MbConvBlock(
                        in_chs, embed_dim[i], stride=stride, expand_ratio=expand_ratio, se_ratio=se_ratio,
                        shortcut_pool_size=shortcut_pool_size, drop_path=drop_path, norm_act_layer=norm_act_layer,
                        **dd))
                else:
                    global_at_end = global_attention_at_end_of_moat_stage and j == depths[i] - 1
                    blocks.append(MoatBlock(
                        in_chs, embed_dim[i], stride=stride, expand_ratio=expand_ratio, head_dim=head_dim,
                        window_size=None if global_at_end else windows[i],
                        position_embedding_size=position_embedding_size[i] if relative_position_embedding else None,
                        shortcut_pool_size=shortcut_pool_size, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate,
                        drop_path=drop_path, norm_act_layer=norm_act_layer, ln_eps=ln_eps, **dd))
                in_chs = embed_dim[i]
            # the first block strides, so no separate downsample
            stages.append(PyramidStage(nn.Identity(), blocks))
            self.feature_info.append(dict(num_chs=embed_dim[i], reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()  # the head norms the pooled vector
        # the official head: global mean, LayerNorm, 1x1 conv (a linear layer on the pooled vector)
        self.head = NormMlpClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=ln_eps), **dd)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self):
        """The official initialisation: normal(0, 0.02) kernels and tables, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, std=.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoatAttention) and module.relative_position_bias_table is not None:
                nn.init.normal_(module.relative_position_bias_table, std=.02)

    @torch.jit.ignore
    def prune_final_norm(self):
        self.head.norm = nn.Identity()


# ---------------------------------------------------------------- official checkpoints

# official TF variable names (deeplab2's Keras layer names, under the 'moat/' scope of a TF1 checkpoint)
_TF_SCOPE = 'moat/'
_TF_STEM_LAYERS = {'conv_0': 'stem.conv1', 'norm_0': 'stem.norm1', 'conv_1': 'stem.conv2'}
_TF_HEAD_LAYERS = {'final_layer_norm': 'head.norm', 'logits_head': 'head.fc'}
# a block's layers; in a MOAT block the MBConv layers are ours under 'conv.'
_TF_MBCONV_LAYERS = {
    'shortcut_conv': 'shortcut.expand',
    'pre_norm': 'pre_norm',
    'expand_conv': 'conv1_1x1',
    'expand_norm': 'norm1',
    'depthwise_conv': 'conv2_kxk',
    'depthwise_norm': 'norm2',
    'se/reduce_conv2d': 'se.fc1',
    'se/expand_conv2d': 'se.fc2',
    'shrink_conv': 'conv3_1x1',
}
_TF_ATTENTION_LAYERS = {'attention_norm': 'norm', 'attention/o': 'attn.proj'}
_TF_VARIABLES = {
    'kernel': 'weight', 'depthwise_kernel': 'weight', 'weight': 'weight', 'bias': 'bias',
    'gamma': 'weight', 'beta': 'bias', 'moving_mean': 'running_mean', 'moving_variance': 'running_var',
}
_TF_BLOCK = re.compile(r'^block_(\d+)_(\d+)/(.+)/([a-z_]+)$')


def _from_tf_layout(variable: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A TF variable in our layout: conv kernels [kh, kw, in, out] -> [out, in, kh, kw] (a 1x1 conv onto
    a linear layer: [out, in]), depthwise kernels [kh, kw, C, 1] -> [C, 1, kh, kw], the attention output
    projection [heads, head_dim, C] -> [C, heads * head_dim]."""
    if variable == 'kernel' and value.ndim == 4:
        value = value.permute(3, 2, 0, 1)
    elif variable == 'depthwise_kernel':
        value = value.permute(2, 3, 0, 1)
    elif variable == 'weight' and value.ndim == 3 and value.shape[-1] == shape[0]:
        value = value.reshape(-1, value.shape[-1]).t()
    return value.reshape(shape) if value.numel() == shape.numel() else value


def _tf_block_key(model_keys: set, stage: int, block: int, layer: str) -> Optional[str]:
    prefix = f'stages.{stage}.blocks.{block}.'
    in_moat_block = f'{prefix}norm.weight' in model_keys
    if layer in _TF_MBCONV_LAYERS:
        return prefix + ('conv.' if in_moat_block else '') + _TF_MBCONV_LAYERS[layer]
    if layer in _TF_ATTENTION_LAYERS:
        return prefix + _TF_ATTENTION_LAYERS[layer]
    return None


def _convert_tf_variables(variables: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official TF variables (``moat/...``, EMA copies already chosen) -> our state dict.

    Names outside the ``moat/`` scope (``global_step``, optimizer state) are not the model's and are
    left out; a ``moat/`` name that maps to nothing stays as it is, so the key check reports it.
    """
    model_state = model.state_dict()
    model_keys = set(model_state)
    state_dict: Dict[str, torch.Tensor] = {}
    qkv_parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, value in variables.items():
        name = name[:-2] if name.endswith(':0') else name
        if not name.startswith(_TF_SCOPE):
            continue
        path = name[len(_TF_SCOPE):]
        layer, _, variable = path.rpartition('/')
        target = None
        if layer.startswith('stem/') and layer[len('stem/'):] in _TF_STEM_LAYERS:
            target = _TF_STEM_LAYERS[layer[len('stem/'):]]
        elif layer in _TF_HEAD_LAYERS:
            target = _TF_HEAD_LAYERS[layer]
        elif path.count('/') >= 2 and _TF_BLOCK.match(path):
            stage, block, layer, variable = _TF_BLOCK.match(path).groups()
            prefix = f'stages.{int(stage)}.blocks.{int(block)}.'
            if layer in ('attention/q', 'attention/k', 'attention/v'):
                # [C, heads, head_dim] and [heads, head_dim], concatenated into qkv in the order q, k, v
                flat = value.reshape(value.shape[0], -1).t() if variable == 'weight' else value.reshape(-1)
                qkv_parts.setdefault(f'{prefix}attn.qkv.{variable}', {})[layer[-1]] = (name, flat)
                continue
            if layer == 'attention' and variable == 'relative_position_embedding':
                state_dict[f'{prefix}attn.relative_position_bias_table'] = value
                continue
            target = _tf_block_key(model_keys, int(stage), int(block), layer)
        if target is None or variable not in _TF_VARIABLES:
            state_dict[name] = value  # reported by the key check
            continue
        key = f'{target}.{_TF_VARIABLES[variable]}'
        state_dict[key] = _from_tf_layout(variable, value, model_state[key].shape) if key in model_state else value
    for key, parts in qkv_parts.items():
        if sorted(parts) == ['k', 'q', 'v']:
            state_dict[key] = torch.cat([parts[p][1] for p in 'qkv'])
        else:  # q, k or v missing: the key check reports the qkv key missing and these unexpected
            state_dict.update(dict(parts.values()))
    # PyTorch's BatchNorm counts its updates; TF does not
    for key, value in model_state.items():
        if key.endswith('num_batches_tracked') and key.rpartition('.')[0] + '.running_mean' in state_dict:
            state_dict[key] = torch.zeros_like(value, device='cpu')
    return state_dict


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Moat) -> Dict[str, torch.Tensor]:
    """Converts official MOAT weights (or our own state dict) to this model's keys.

    Official weights are the variables of a TF1 checkpoint (``moat/stem/...``, ``moat/block_SS_BB/...``,
    ``moat/final_layer_norm``, ``moat/logits_head``) as tensors in TF's layouts: what
    ``tools/convert.py`` reads from the ``.index`` / ``.data-*`` files (choosing the EMA copies) before
    it calls this. Our own state dict passes through unchanged. Classifier keys may differ (timm drops
    or re-creates the head when num_classes changes); any other mismatch raises a ValueError naming
    the keys.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if any(k.startswith(_TF_SCOPE) for k in state_dict):
        state_dict = _convert_tf_variables(state_dict, model)
    check_checkpoint_keys(
        state_dict, model,
        hint='is it a checkpoint of this variant? Checkpoints with relative position embedding load into '
             'moat_N / tiny_moat_N, those without (wo_position_embedding) into moat_N_no_pe / tiny_moat_N_no_pe')
    return state_dict


def _create_moat(variant: str, pretrained: bool = False, **kwargs) -> Moat:
    if pretrained:
        # the official weights are TensorFlow checkpoint archives, which timm cannot read
        require_downloadable_weights(
            variant, kwargs, lambda url: url.endswith('.tar.gz'), where='TensorFlow checkpoint archives',
            prepare=f'Download and unpack the archive, convert it with `python tools/convert.py <unpacked '
                    f'checkpoint prefix> --model {variant} -o {variant}.safetensors`',
            file_name=f'{variant}.safetensors')
    return build_pyramid(Moat, variant, pretrained, **kwargs)


# input normalisation of the official checkpoints: option 1 (ImageNet mean / std) or 2 ([-1, 1])
_NORM_IMAGENET = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
_NORM_SYMMETRIC = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_URL = 'https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/{}.tar.gz'


def _cfg(url: str = '', size: int = 224, **kwargs) -> Dict:
    return pyramid_cfg(dict(
        url=url, input_size=(3, size, size), pool_size=(size // 32, size // 32),
        # not stated by the official release; those of timm's TF MaxViT ports (0.95 below 384, 1.0 from 384)
        crop_pct=0.95 if size < 384 else 1.0, first_conv='stem.conv1', license='apache-2.0',
        origin_url='https://github.com/google-research/deeplab2', paper_ids='arXiv:2210.01820',
        paper_name='MOAT: Alternating Mobile Convolution and Attention Brings Strong Vision Models'), **kwargs)


def _official(name: str, data: str, size: int, norm: Dict) -> Dict:
    pe = 'wo' if name.endswith('_no_pe') else 'w'
    official = name.replace('_no_pe', '').replace('moat_', 'moat')
    return _cfg(_URL.format(f'{official}_imagenet_{data}_{size}_{pe}_position_embedding'), size=size, **norm)


_VARIANTS = {
    # name: (official data tag, input size, input normalisation, pretrained tag)
    'moat_0': ('1k', 224, _NORM_IMAGENET, 'tf_in1k'),
    'moat_1': ('1k', 224, _NORM_IMAGENET, 'tf_in1k'),
    'moat_2': ('22k_and_1k', 384, _NORM_SYMMETRIC, 'tf_in22k_ft_in1k'),
    'moat_3': ('22k_and_1k', 512, _NORM_SYMMETRIC, 'tf_in22k_ft_in1k'),
    'moat_4': ('22k_and_1k', 512, _NORM_SYMMETRIC, 'tf_in22k_ft_in1k'),
    'tiny_moat_0': ('1k', 256, _NORM_IMAGENET, 'tf_in1k'),
    'tiny_moat_1': ('1k', 256, _NORM_IMAGENET, 'tf_in1k'),
    'tiny_moat_2': ('1k', 256, _NORM_IMAGENET, 'tf_in1k'),
    'tiny_moat_3': ('1k', 256, _NORM_IMAGENET, 'tf_in1k'),
}

default_cfgs = generate_default_cfgs({
    f'{name}{suffix}.{tag}': _official(name + suffix, data, size, norm)
    for name, (data, size, norm, tag) in _VARIANTS.items()
    for suffix in ('', '_no_pe')
})

_ARCHS = {
    'moat_0': dict(stem_width=(64, 64), embed_dim=(96, 192, 384, 768), depths=(2, 3, 7, 2)),
    'moat_1': dict(stem_width=(64, 64), embed_dim=(96, 192, 384, 768), depths=(2, 6, 14, 2)),
    'moat_2': dict(stem_width=(128, 128), embed_dim=(128, 256, 512, 1024), depths=(2, 6, 14, 2)),
    'moat_3': dict(stem_width=(160, 160), embed_dim=(160, 320, 640, 1280), depths=(2, 12, 28, 2)),
    'moat_4': dict(stem_width=(256, 256), embed_dim=(256, 512, 1024, 2048), depths=(2, 12, 28, 2)),
    'tiny_moat_0': dict(stem_width=(32, 32), embed_dim=(32, 64, 128, 256), depths=(2, 3, 7, 2)),
    'tiny_moat_1': dict(stem_width=(40, 40), embed_dim=(40, 80, 160, 320), depths=(2, 3, 7, 2)),
    'tiny_moat_2': dict(stem_width=(56, 56), embed_dim=(56, 112, 224, 448), depths=(2, 3, 7, 2)),
    'tiny_moat_3': dict(stem_width=(80, 80), embed_dim=(80, 160, 320, 640), depths=(2, 3, 7, 2)),
}
# the official training's stochastic depth (1 - survival_prob); timm's default is none
OFFICIAL_DROP_PATH_RATE = {
    'moat_0': 0.2, 'moat_1': 0.3, 'moat_2': 0.3, 'moat_3': 0.6, 'moat_4': 0.7,
    'tiny_moat_0': 0., 'tiny_moat_1': 0., 'tiny_moat_2': 0., 'tiny_moat_3': 0.1,
}


def _moat(name: str, pretrained: bool, no_pe: bool, **kwargs) -> Moat:
    model_args = dict(_ARCHS[name], relative_position_embedding=not no_pe)
    return _create_moat(name + ('_no_pe' if no_pe else ''), pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def moat_0(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('moat_0', pretrained, no_pe=False, **kwargs)


@register_model
def moat_1(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('moat_1', pretrained, no_pe=False, **kwargs)


@register_model
def moat_2(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('moat_2', pretrained, no_pe=False, **kwargs)


@register_model
def moat_3(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('moat_3', pretrained, no_pe=False, **kwargs)


@register_model
def moat_4(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('moat_4', pretrained, no_pe=False, **kwargs)


@register_model
def tiny_moat_0(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('tiny_moat_0', pretrained, no_pe=False, **kwargs)


@register_model
def tiny_moat_1(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('tiny_moat_1', pretrained, no_pe=False, **kwargs)


@register_model
def tiny_moat_2(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('tiny_moat_2', pretrained, no_pe=False, **kwargs)


@register_model
def tiny_moat_3(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('tiny_moat_3', pretrained, no_pe=False, **kwargs)


@register_model
def moat_0_no_pe(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('moat_0', pretrained, no_pe=True, **kwargs)


@register_model
def moat_1_no_pe(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('moat_1', pretrained, no_pe=True, **kwargs)


@register_model
def moat_2_no_pe(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('moat_2', pretrained, no_pe=True, **kwargs)


@register_model
def moat_3_no_pe(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('moat_3', pretrained, no_pe=True, **kwargs)


@register_model
def moat_4_no_pe(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('moat_4', pretrained, no_pe=True, **kwargs)


@register_model
def tiny_moat_0_no_pe(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('tiny_moat_0', pretrained, no_pe=True, **kwargs)


@register_model
def tiny_moat_1_no_pe(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('tiny_moat_1', pretrained, no_pe=True, **kwargs)


@register_model
def tiny_moat_2_no_pe(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('tiny_moat_2', pretrained, no_pe=True, **kwargs)


@register_model
def tiny_moat_3_no_pe(pretrained: bool = False, **kwargs) -> Moat:
    return _moat('tiny_moat_3', pretrained, no_pe=True, **kwargs)
