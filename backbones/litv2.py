"""LITv2: Fast Vision Transformers with HiLo Attention.

Paper: `Fast Vision Transformers with HiLo Attention` - https://arxiv.org/abs/2205.13213 (NeurIPS 2022)

Official code and checkpoints: https://github.com/ziplab/LITv2 (Apache-2.0).

A four-stage pyramid whose first two stages have no attention at all: their blocks are only a
depthwise-conv MLP. Stages 3 and 4 add HiLo attention, which splits the heads of one layer in two
groups. The Hi-Fi heads attend inside non-overlapping ``window_size x window_size`` windows (high
frequencies, local detail); the Lo-Fi heads let every query attend to keys and values average-pooled
over the same windows (low frequencies, global structure). Their outputs are concatenated, Hi-Fi
first, with no shared output projection. Deformable token merging (DTM: a 2x2 stride-2 deformable
convolution, BatchNorm, GELU) opens stages 2-4.

Any input size works, as in the official dense-prediction backbones: the stem pads the image at the
bottom / right to a multiple of 4, HiLo pads its map at the bottom / right to a multiple of its window
and crops back, DTM floors odd maps. At 224 and 384 nothing is padded and the model computes what the
official classification model computes.

Activations stay channels-last ``[B, H, W, C]`` inside the model; the pyramid features of
``forward_intermediates`` / ``features_only`` are NCHW by default.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula
from torchvision.ops import deform_conv2d

from timm.layers import ClassifierHead, DropPath, PatchEmbed, calculate_drop_path_rates, use_fused_attn
from timm.models import generate_default_cfgs, register_model, register_notrace_function
from timm.models.pvt_v2 import MlpWithDepthwiseConv
from timm.optim import param_groups_weight_decay

from ._checkpoint import convert_checkpoint, rename_by_first_rule
from ._layers import pad_to_multiple
from ._pyramid import PyramidBackbone, PyramidStage, build_pyramid, pyramid_cfg

__all__ = ['LITv2', 'HiLo', 'DeformConv2dPack', 'DeformableTokenMerging', 'offset_lr_param_groups']

# torch.fx.symbolic_trace records a wrapped function per calling module: _layers' wrap covers its own calls
torch.fx.wrap('pad_to_multiple')

# The released models' split of heads: int(num_heads * alpha) Lo-Fi heads, the rest Hi-Fi.
DEFAULT_ALPHA = 0.9
# The alphas of the official sweep on LITv2-S (release v1.1), by pretrained tag.
ALPHA_SWEEP = {
    'alpha0_in1k': 0.0, 'alpha0_2_in1k': 0.2, 'alpha0_4_in1k': 0.4, 'alpha0_5_in1k': 0.5,
    'alpha0_7_in1k': 0.7, 'alpha0_9_in1k': 0.9, 'alpha1_in1k': 1.0,
}


class HiLo(nn.Module):
    """HiLo attention on a channels-last map: ``[B, H, W, C] -> [B, H, W, C]``.

    ``int(num_heads * alpha)`` Lo-Fi heads attend from every position to keys and values computed
    from the ``window_size``-average-pooled map; the other (Hi-Fi) heads attend inside
    non-overlapping ``window_size x window_size`` windows. Output: ``cat([hi_fi, lo_fi], -1)``, each
    branch with its own projection. ``window_size=1`` is plain multi-head self-attention on the
    Lo-Fi weights (every head Lo-Fi, no pooling), as in the official code.

    A map that is not a multiple of the window is zero-padded at the bottom / right and cropped back
    (the padded tokens are not masked: they take part in their window and in the pooled means, as in
    the official dense-prediction backbones).

    Args:
        dim: Channels of the input and output.
        num_heads: Attention heads; ``dim`` must be divisible by it.
        window_size: Hi-Fi window and Lo-Fi pooling size ``s``.
        alpha: Share of the heads that are Lo-Fi (0: all Hi-Fi, 1: all Lo-Fi).
        qkv_bias: Bias in the q / kv / qkv projections (the official module's default is False;
            LITv2 uses True).
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout on the output (the official module accepts and ignores both dropouts; the
            released models use 0).
    """
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            window_size: int = 2,
            alpha: float = 0.5,
            qkv_bias: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'HiLo: dim {dim} is not divisible by num_heads {num_heads}')
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f'HiLo: window_size must be an integer >= 1, got {window_size!r}')
        if not 0. <= alpha <= 1.:
            raise ValueError(f'HiLo: alpha is the share of Lo-Fi heads, between 0 and 1; got {alpha}')
        self.window_size = window_size
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        # window 1: every head attends globally, through the Lo-Fi weights
        self.l_heads = num_heads if window_size == 1 else int(num_heads * alpha)
        self.h_heads = num_heads - self.l_heads
        self.l_dim = self.l_heads * self.head_dim
        self.h_dim = self.h_heads * self.head_dim
        self.fused_attn = use_fused_attn()

        if self.h_heads:
            self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=qkv_bias, **dd)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim, **dd)
        else:
            self.h_qkv = self.h_proj = None
        if self.l_heads:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias, **dd)
            self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=qkv_bias, **dd)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim, **dd)
        else:
            self.l_q = self.l_kv = self.l_proj = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention of ``[N, heads, L, d]`` queries over ``[N, heads, S, d]`` keys / values."""
        if self.fused_attn:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        return self.attn_drop(attn.softmax(dim=-1)) @ v

    def hifi(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        ws = self.window_size
        num_h, num_w = H // ws, W // ws
        # [B, nh, ws, nw, ws, 3, heads, d] -> [3, B * nh * nw, heads, ws * ws, d]
        qkv = self.h_qkv(x).reshape(B, num_h, ws, num_w, ws, 3, self.h_heads, self.head_dim)
        qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B * num_h * num_w, self.h_heads, ws * ws, self.head_dim)
        q, k, v = qkv.unbind(0)
        x = self.attend(q, k, v)
        x = x.reshape(B, num_h, num_w, self.h_heads, ws, ws, self.head_dim)
        x = x.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, self.h_dim)
        return self.h_proj(x)

    def lofi(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q = self.l_q(x).reshape(B, H * W, self.l_heads, self.head_dim).transpose(1, 2)
        if self.window_size > 1:
            x = F.avg_pool2d(x.permute(0, 3, 1, 2), self.window_size).permute(0, 2, 3, 1)
        kv = self.l_kv(x).reshape(B, x.shape[1] * x.shape[2], 2, self.l_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        x = self.attend(q, k, v).transpose(1, 2).reshape(B, H, W, self.l_dim)
        return self.l_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        x = pad_to_multiple(x, (self.window_size, self.window_size))
        outs: List[torch.Tensor] = []
        # a branch without heads has no modules (None): TorchScript drops its call
        if self.h_qkv is not None:
            outs.append(self.hifi(x))
        if self.l_q is not None:
            outs.append(self.lofi(x))
        x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return self.proj_drop(x[:, :H, :W])

    def extra_repr(self) -> str:
        return f'window_size={self.window_size}, hifi_heads={self.h_heads}, lofi_heads={self.l_heads}'


@torch.fx.wrap
@register_notrace_function  # reason: torchvision's deform_conv2d checks and splits shapes in Python
def deform_conv2d_v1(
        x: torch.Tensor,
        offset: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        stride: int,
        padding: int,
) -> torch.Tensor:
    """torchvision's deformable convolution without modulation mask (DCNv1), square stride / padding.

    It runs in float32 (or wider) and returns ``x``'s dtype: torchvision has no bfloat16 CPU kernel, and under
    autocast the offsets, weights and input arrive in mixed dtypes (the official model runs its DCN in float32
    under AMP too). A non-finite offset never reaches torchvision's sampler, whose CPU kernel indexes memory
    with it and kills the process: the conv samples at offset 0 there instead, and every output at a position
    with a non-finite offset is NaN, so the fault stays visible, in its own sample (the official CUDA DCN
    samples zeros at such offsets and hides it).
    """
    finite = torch.isfinite(offset).all(dim=1, keepdim=True)
    offset = torch.where(finite, offset, 0.)
    dtype = torch.promote_types(x.dtype, torch.float32)
    out = deform_conv2d(x.to(dtype), offset.to(dtype), weight.to(dtype), bias.to(dtype),
                        stride=(stride, stride), padding=(padding, padding))
    return torch.where(finite, out, float('nan')).to(x.dtype)


@register_flop_formula(torch.ops.torchvision.deform_conv2d)
def _deform_conv2d_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of torchvision's deformable convolution for ``torch.utils.flop_counter`` (which has no formula
    for it): those of the convolution over the sampled values, as the official ``flops()`` counts them;
    the bilinear sampling itself is not counted."""
    batch, out_channels, out_h, out_w = out_shape
    _, in_channels_per_group, kernel_h, kernel_w = weight_shape
    return 2 * batch * out_channels * out_h * out_w * in_channels_per_group * kernel_h * kernel_w


class DeformConv2dPack(nn.Module):
    """Deformable convolution (DCNv1) that predicts its own offsets, like mmcv's ``DeformConv2dPack``.

    ``conv_offset``, a plain convolution of the same geometry, maps the input to ``2 * k * k`` offset
    channels per output position, laid out ``(dy, dx)`` per kernel tap in row-major order (the
    official DCN's layout, which ``torchvision.ops.deform_conv2d`` shares). It starts at zero, so the
    layer starts as a plain convolution. The official training used a lower learning rate for it: see
    :func:`offset_lr_param_groups`.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int,
            stride: int = 1,
            padding: int = 0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.stride = stride
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size, **dd))
        self.bias = nn.Parameter(torch.empty(out_channels, **dd))
        self.conv_offset = nn.Conv2d(
            in_channels, 2 * kernel_size * kernel_size, kernel_size, stride=stride, padding=padding, **dd)
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv2d's default initialisation (the official DCN and torchvision's DeformConv2d use it too)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return deform_conv2d_v1(x, self.conv_offset(x), self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        out_channels, in_channels, k, _ = self.weight.shape
        return f'{in_channels}, {out_channels}, kernel_size={k}, stride={self.stride}, padding={self.padding}'


class DeformableTokenMerging(nn.Module):
    """DTM: 2x2 stride-2 deformable convolution, BatchNorm, GELU; NHWC in and out (odd sides are floored)."""

    def __init__(self, in_dim: int, out_dim: int, act_layer=nn.GELU, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.dconv = DeformConv2dPack(in_dim, out_dim, kernel_size=2, stride=2, **dd)
        self.norm = nn.BatchNorm2d(out_dim, **dd)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(self.dconv(x.permute(0, 3, 1, 2))))
        return x.permute(0, 2, 3, 1)


class LITv2Block(nn.Module):
    """Pre-norm block, NHWC: HiLo attention (only where ``window_size > 0``), then the depthwise-conv MLP.

    Without attention the block is ``x + mlp(norm2(x))`` (the official ``ConvFFNBlock``).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int,
            alpha: float = DEFAULT_ALPHA,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer=nn.LayerNorm,
            act_layer=nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if window_size:
            self.norm1 = norm_layer(dim, **dd)
            self.attn = HiLo(
                dim, num_heads, window_size=window_size, alpha=alpha, qkv_bias=qkv_bias, attn_drop=attn_drop,
                proj_drop=proj_drop, **dd)
        else:
            self.norm1 = self.attn = None
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = MlpWithDepthwiseConv(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm1 is not None and self.attn is not None:
            x = x + self.drop_path1(self.attn(self.norm1(x)))
        B, H, W, C = x.shape
        y = self.mlp(self.norm2(x).reshape(B, H * W, C), [H, W])
        return x + self.drop_path2(y.reshape(B, H, W, C))


class LITv2Stage(PyramidStage):
    """Optional deformable token merging, then ``depth`` blocks; NHWC."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_heads: int,
            window_size: int,
            alpha: float = DEFAULT_ALPHA,
            downsample: bool = True,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path_rates: Optional[Sequence[float]] = None,
            norm_layer=nn.LayerNorm,
            act_layer=nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        drop_path_rates = [0.] * depth if drop_path_rates is None else drop_path_rates
        if len(drop_path_rates) != depth:
            raise ValueError(
                f'LITv2Stage: {len(drop_path_rates)} drop path rates for {depth} blocks; give one per block')
        super().__init__(
            downsample=DeformableTokenMerging(in_dim, dim, act_layer, **dd) if downsample else nn.Identity(),
            blocks=[
                LITv2Block(
                    dim,
                    num_heads,
                    window_size,
                    alpha=alpha,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path_rates[i],
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    **dd,
                )
                for i in range(depth)],
        )


def _stage_windows(window_size: Union[int, Sequence[int]], num_stages: int) -> Tuple[int, ...]:
    """Per-stage HiLo windows; an int is the official dense-task shorthand ``(0, ..., 0, ws, 1)``."""
    if isinstance(window_size, int):
        if num_stages < 2:
            raise ValueError('LITv2: an int window_size needs at least 2 stages; give one window per stage')
        window_size = (0,) * (num_stages - 2) + (window_size, 1)
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != num_stages
            or not all(isinstance(w, int) and w >= 0 for w in window_size)):
        raise ValueError(
            f'LITv2: window_size must be an int or one integer >= 0 per stage (0: no attention in that '
            f'stage), got {window_size!r} for {num_stages} stages')
    return tuple(window_size)


class LITv2(PyramidBackbone):
    """LITv2: a four-stage pyramid with attention-free early stages, HiLo attention and deformable token merging.

    Args:
        in_chans: Number of input image channels.
        num_classes: Number of classes of the classifier head (0: no head).
        global_pool: Global pooling type of the head.
        embed_dim: Width of the first stage; it doubles at every stage.
        depths: Blocks per stage.
        num_heads: Attention heads per stage (used where the stage has attention).
        window_size: HiLo window per stage; 0 means the stage has no attention (only the
            depthwise-conv MLP), 1 means plain global attention. The official models use
            ``(0, 0, 2, 1)``; an int ``ws`` stands for ``(0, 0, ws, 1)`` (the official detectors use 2
            and 4). Windows own no parameters: every window loads the same weights.
        alpha: Share of Lo-Fi heads in each HiLo layer (``int(num_heads * alpha)`` of them). It changes
            the parameter shapes: a checkpoint of the official alpha sweep needs its own alpha.
        mlp_ratio: MLP hidden width over block width.
        qkv_bias: Bias in the HiLo q / kv / qkv projections.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout in the MLP (the official ``drop_rate``) and after HiLo.
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, rising linearly over the blocks to this value (official
            training: 0.2 / 0.3 / 0.5 for S / M / B).
    """
    family = 'LITv2'

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            window_size: Union[int, Tuple[int, ...]] = (0, 0, 2, 1),
            alpha: float = DEFAULT_ALPHA,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer=nn.LayerNorm,
            act_layer=nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f'LITv2: {len(num_heads)} num_heads entries for {num_stages} stages')
        windows = _stage_windows(window_size, num_stages)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem_stride = 4
        # pads the image at the bottom / right to a multiple of 4, as the official dense backbones
        self.stem = PatchEmbed(
            img_size=None, patch_size=self.stem_stride, in_chans=in_chans, embed_dim=dims[0], norm_layer=norm_layer,
            output_fmt='NHWC', dynamic_img_pad=True, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            stages.append(LITv2Stage(
                dims[max(i - 1, 0)],
                dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                window_size=windows[i],
                alpha=alpha,
                downsample=i > 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path_rates=dpr[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=self.stem_stride * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt=self.output_fmt,
            **dd)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module):
        super()._init_weights(m)
        if isinstance(m, MlpWithDepthwiseConv):
            # the official DWMlp's depthwise conv: He-normal over its fan-out (k * k per channel)
            fan_out = m.dwconv.kernel_size[0] * m.dwconv.kernel_size[1] * m.dwconv.out_channels // m.dwconv.groups
            nn.init.normal_(m.dwconv.weight, 0., math.sqrt(2. / fan_out))
            nn.init.zeros_(m.dwconv.bias)


def offset_lr_param_groups(
        model: nn.Module,
        weight_decay: float = 0.05,
        offset_lr_scale: float = 0.01,
        no_weight_decay_list: Sequence[str] = (),
) -> List[Dict]:
    """timm's weight-decay parameter groups, with the DTM offset-conv weights in a group of their own
    whose ``lr_scale`` is ``offset_lr_scale``.

    The official training multiplies the learning rate of ``conv_offset`` weights by
    ``OFFSET_LR_MULTI = 0.01`` (every released config); its offset biases, being 1-D, fall in the
    no-decay group at the full rate first, and so do they here. timm's schedulers multiply each group's
    learning rate by its ``lr_scale``; with another scheduler, set that group's ``lr`` yourself. Use::

        from functools import partial
        from timm.optim import create_optimizer_v2
        optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05,
                                        param_group_fn=partial(offset_lr_param_groups, weight_decay=0.05))

    In OpenMMLab configs the same is ``paramwise_cfg=dict(custom_keys={'conv_offset.weight': dict(lr_mult=0.01)})``.
    """
    offset_weights = {id(p) for name, p in model.named_parameters() if name.endswith('conv_offset.weight')}
    groups = []
    offsets = []
    for group in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_list):
        params = [p for p in group['params'] if id(p) not in offset_weights]
        offsets += [p for p in group['params'] if id(p) in offset_weights]
        if params:
            groups.append(dict(group, params=params))
    if offsets:
        groups.append({'params': offsets, 'weight_decay': weight_decay, 'lr_scale': offset_lr_scale})
    return groups


# official key -> ours; the first rule whose pattern matches is applied. The official DTM closes
# layers.{i}; ours opens stages.{i + 1}.
_OFFICIAL_KEY_RULES = (
    (r'^patch_embed\.', 'stem.'),
    (r'^layers\.(\d+)\.downsample\.norm_layer\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.norm.'),
    (r'^layers\.(\d+)\.downsample\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.mlp\.dwconv\.dwconv\.', r'stages.\1.blocks.\2.mlp.dwconv.'),
    (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'^head\.', 'head.fc.'),
)


def _convert_official_key(key: str) -> str:
    return rename_by_first_rule(key, _OFFICIAL_KEY_RULES)


def _suggest_alpha(lofi_heads: int, num_heads: int) -> float:
    """An alpha giving ``lofi_heads`` of ``num_heads``: the official sweep's value if one does, else a midpoint."""
    for alpha in sorted(set(ALPHA_SWEEP.values())):
        if int(num_heads * alpha) == lofi_heads:
            return alpha
    return round((lofi_heads + 0.5) / num_heads, 3)


def _check_hilo_split(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``state_dict``, unchanged, if its HiLo layers split their heads as ``model``'s do. A checkpoint trained
    with another alpha has other HiLo shapes: the error says which alpha it needs."""
    for name, module in model.named_modules():
        if not isinstance(module, HiLo) or module.window_size == 1:
            continue
        lofi_weight = state_dict.get(f'{name}.l_q.weight')
        hifi_weight = state_dict.get(f'{name}.h_qkv.weight')
        if lofi_weight is None and hifi_weight is None:
            continue  # missing altogether: the key check names it
        num_heads = module.l_heads + module.h_heads
        if (lofi_weight if lofi_weight is not None else hifi_weight).shape[1] != module.head_dim * num_heads:
            continue  # a layer of another width (another variant): the shape check names it
        lofi_heads = 0 if lofi_weight is None else lofi_weight.shape[0] // module.head_dim
        if lofi_heads != module.l_heads:
            raise ValueError(
                f'checkpoint does not match LITv2: its HiLo layer {name} has {lofi_heads} Lo-Fi heads of '
                f'{num_heads}, this model {module.l_heads} (alpha sets int(num_heads * alpha) Lo-Fi heads); '
                f'create the model with alpha={_suggest_alpha(lofi_heads, num_heads)}, e.g. '
                f"timm.create_model('litv2_small', alpha={_suggest_alpha(lofi_heads, num_heads)}, ...)")
    return state_dict


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: LITv2) -> Dict[str, torch.Tensor]:
    """Converts an official LITv2 checkpoint (or one of ours) to this model's keys.

    Accepts a plain state dict or one wrapped as the official files are (``model``, or ``state_dict``
    as the detection loader accepts; see :func:`~attnzoo.backbones._checkpoint.unwrap_checkpoint`). Our own
    state dict passes through unchanged. A checkpoint of the official alpha sweep needs a model with
    its alpha (the error says which). Classifier keys may differ (timm drops or re-creates the head
    when num_classes changes); any other mismatch raises a ValueError naming the keys.
    """
    return convert_checkpoint(
        state_dict, model, _convert_official_key,
        hint='(after converting official LITv2 names) is it a classification checkpoint of this variant '
             '(depths, window_size 0 / non-zero per stage, alpha)?',
        adapt=_check_hilo_split)


def _create_litv2(variant: str, pretrained: bool = False, **kwargs) -> LITv2:
    return build_pyramid(LITv2, variant, pretrained, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict:
    return pyramid_cfg(dict(
        # the official evaluation: resize to 256 / 224 of the size, center crop, bicubic
        url=url, first_conv='stem.proj', license='apache-2.0', origin_url='https://github.com/ziplab/LITv2',
        paper_ids='arXiv:2205.13213', paper_name='Fast Vision Transformers with HiLo Attention'), **kwargs)


_URL = 'https://github.com/ziplab/LITv2/releases/download/{}'

default_cfgs = generate_default_cfgs({
    'litv2_small.in1k': _cfg(_URL.format('v1.0/litv2_s.pth')),
    **{f'litv2_small.{tag}': _cfg(_URL.format(f'v1.1/alpha_{alpha:g}.pth'), notes=(f'alpha={alpha:g}',))
       for tag, alpha in ALPHA_SWEEP.items()},
    'litv2_medium.in1k': _cfg(_URL.format('v1.0/litv2_m.pth')),
    'litv2_base.in1k': _cfg(_URL.format('v1.0/litv2_b.pth')),
    # fine-tuned at 384 and evaluated without a crop (TEST.CROP False: data/build.py resizes the whole image
    # to 384 x 384, timm's squash mode)
    'litv2_base_384.in1k': _cfg(_URL.format('v1.0/litv2_b_384.pth'), input_size=(3, 384, 384), pool_size=(12, 12),
                                crop_pct=1.0, crop_mode='squash'),
})

_SMALL = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_MEDIUM = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))


@register_model
def litv2_small(pretrained: bool = False, **kwargs) -> LITv2:
    # a tag of the alpha sweep (litv2_small.alpha0_5_in1k) builds the model with that alpha
    tag = kwargs.get('pretrained_cfg')
    if isinstance(tag, str) and tag in ALPHA_SWEEP:
        kwargs.setdefault('alpha', ALPHA_SWEEP[tag])
    return _create_litv2('litv2_small', pretrained=pretrained, **dict(_SMALL, **kwargs))


@register_model
def litv2_medium(pretrained: bool = False, **kwargs) -> LITv2:
    return _create_litv2('litv2_medium', pretrained=pretrained, **dict(_MEDIUM, **kwargs))


@register_model
def litv2_base(pretrained: bool = False, **kwargs) -> LITv2:
    return _create_litv2('litv2_base', pretrained=pretrained, **dict(_BASE, **kwargs))


@register_model
def litv2_base_384(pretrained: bool = False, **kwargs) -> LITv2:
    return _create_litv2('litv2_base_384', pretrained=pretrained, **dict(_BASE, **kwargs))
