"""BiFormer: vision transformer with bi-level routing attention.

Paper: `BiFormer: Vision Transformer with Bi-Level Routing Attention`
    - https://arxiv.org/abs/2303.08810 (CVPR 2023)

Official code and checkpoints: https://github.com/rayleizhu/BiFormer (MIT).

Stages 1-3 use bi-level routing attention (BRA): the map is split into ``n_win x n_win`` regions,
every query region routes to the ``topk`` key regions whose mean key best matches its mean query
(one routing shared by all heads), and its tokens attend to all tokens of those regions. The
attention runs on ``attnzoo.kernels.routing_attention`` (fused Triton on CUDA, the CPU kernels on
CPU, BiFormer's own gather formulation as its reference) with indices from ``attnzoo.kernels.routing_region_index``. Stage 4
(a 7 x 7 map at 224 px, too small to split) uses plain multi-head attention over the whole map.

This is the legacy architecture the released checkpoints were trained with (``ops/bra_legacy.py``),
quirks included: the BRA softmax scale is ``dim ** -0.5`` of the full width, not of a head; BRA's
LePE is a 5x5 depthwise conv on the values of the whole map, stage 4's on its input; stage 4 has 8
heads whatever its width; the classifier norm is a BatchNorm.

Any input size works: as the official dense-task backbones (``auto_pad=True``), every BRA layer
zero-pads its input at the bottom / right to a multiple of ``n_win`` before the qkv projection and
crops after attention. At the sizes the classification models were built for (224 px with
``n_win=7``) nothing is padded and the model computes what the official classification model
computes.

Activations stay channels-last ``[B, H, W, C]`` inside the model; the pyramid features of
``forward_intermediates`` / ``features_only`` are NCHW by default.
"""
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import ClassifierHead, DropPath, Mlp, calculate_drop_path_rates, use_fused_attn
from timm.layers import register_notrace_function
from timm.models import generate_default_cfgs, register_model

from attnzoo.kernels import routing_attention, routing_region_index

from ._checkpoint import convert_checkpoint, rename_by_first_rule
from ._layers import ConvStem, DepthwiseConvNhwc, pad_to_multiple
from ._pyramid import PyramidBackbone, PyramidStage, build_pyramid, pyramid_cfg

__all__ = ['BiFormer']

# torch.fx.symbolic_trace records a wrapped function per calling module: _layers' wrap covers its own calls
torch.fx.wrap('pad_to_multiple')


class ChannelsLastBatchNorm(nn.Module):
    """BatchNorm2d on channels-last ``[B, H, W, C]`` maps (the official classifier norm).

    The BatchNorm is a plain child (``bn``), so ``nn.SyncBatchNorm.convert_sync_batchnorm`` and
    mmengine's ``norm_eval`` handling find it.
    """

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvDownsample(nn.Module):
    """3x3 stride-2 conv (with bias) and BatchNorm; NHWC in and out."""

    def __init__(self, in_dim: int, out_dim: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1, **dd)
        self.norm = nn.BatchNorm2d(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


@torch.fx.wrap
@register_notrace_function  # reason: the ops check their arguments' shapes in Python; FX records one call
def bi_level_routing(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        regions: Tuple[int, int],
        topk: int,
        scale: float,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """Region routing, then attention of every query region over its routed regions; heads-last in and
    out. TorchScript calls the ops the kernels register with torch.library (``torch.ops.attnzoo``)
    with the same arguments."""
    if torch.jit.is_scripting():
        grid = [regions[0], regions[1]]
        region_index = torch.ops.attnzoo.routing_region_index(q, k, grid, topk, scale)
        out = torch.ops.attnzoo.routing_attention(q, k, v, region_index, grid, scale, backend)
    else:
        region_index = routing_region_index(q, k, regions, topk, scale=scale)
        out = routing_attention(q, k, v, region_index, regions, scale=scale, backend=backend)
    return out


def _region_grid(n_win: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    grid = (n_win, n_win) if isinstance(n_win, int) else tuple(n_win)
    if len(grid) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid):
        raise ValueError(f'BiFormer: n_win must be an int >= 1 or a pair (rows, columns) of them, got {n_win!r}')
    return grid


class BiLevelRoutingAttention(nn.Module):
    """BiFormer's bi-level routing attention (the legacy version of the released checkpoints); NHWC in and out.

    One linear gives q, k, v (``dim`` channels each); routing compares region means of the full-width
    q and k, attention runs per head over the ``topk`` routed regions with the full-width scale
    ``dim ** -0.5``; LePE (a depthwise conv of the values over the whole map) is added before the
    output projection. Any map size: zero-padded at the bottom / right to a multiple of the region
    grid before the qkv projection, cropped after attention; the padded tokens are ordinary tokens
    (their q, k, v are the qkv bias), as in the official ``auto_pad``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            n_win: Union[int, Tuple[int, int]] = 7,
            topk: int = 4,
            side_dwconv: int = 5,
            attn_backend: Optional[str] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'BiLevelRoutingAttention: dim {dim} is not divisible by num_heads {num_heads}')
        self.regions = _region_grid(n_win)
        n_regions = self.regions[0] * self.regions[1]
        if not 1 <= topk <= n_regions:
            raise ValueError(
                f'BiLevelRoutingAttention: topk {topk} routed regions, but n_win {n_win} gives {n_regions} regions; '
                f'use 1 <= topk <= {n_regions} or a larger n_win')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.topk = topk
        self.scale = dim ** -0.5  # the official qk_dim ** -0.5: the checkpoints were trained with it
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, dim * 3, **dd)
        self.lepe = DepthwiseConvNhwc(dim, side_dwconv, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = pad_to_multiple(x, self.regions)  # the official auto_pad
        Hp, Wp = x.shape[1], x.shape[2]
        # heads-last views of one qkv tensor: the op reads them without a permute copy
        q, k, v = self.qkv(x).view(B, Hp, Wp, 3, self.num_heads, self.head_dim).unbind(3)
        x = bi_level_routing(q, k, v, self.regions, self.topk, self.scale, self.attn_backend)
        x = x.reshape(B, Hp, Wp, C) + self.lepe(v.reshape(B, Hp, Wp, C))
        # per-token projection: cropping first gives what the official crop after it gives
        return self.proj(x[:, :H, :W])

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, regions={self.regions}, topk={self.topk}'


class GlobalAttention(nn.Module):
    """Multi-head attention over the whole map plus LePE on the input (the official stage-4 ``AttentionLePE``); NHWC."""
    fused_attn: torch.jit.Final[bool]

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'GlobalAttention: dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        self.lepe = DepthwiseConvNhwc(dim, side_dwconv, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(B, H, W, C) + self.lepe(x)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}'


class BiFormerBlock(nn.Module):
    """Depthwise 3x3 positional conv (residual), then pre-norm attention and MLP; NHWC in and out."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            topk: Optional[int],
            n_win: Union[int, Tuple[int, int]] = 7,
            mlp_ratio: float = 3.,
            side_dwconv: int = 5,
            drop_path: float = 0.,
            attn_backend: Optional[str] = None,
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.pos_embed = DepthwiseConvNhwc(dim, 3, **dd)
        self.norm1 = norm_layer(dim, **dd)
        if topk is None:
            self.attn = GlobalAttention(dim, num_heads, side_dwconv=side_dwconv, **dd)
        else:
            self.attn = BiLevelRoutingAttention(
                dim, num_heads, n_win=n_win, topk=topk, side_dwconv=side_dwconv, attn_backend=attn_backend, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class BiFormerStage(PyramidStage):
    """Optional stride-2 downsample, then ``depth`` blocks (``block_kwargs`` go to every block); NHWC in and out."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            downsample: bool,
            drop_path_rates: Sequence[float],
            device=None,
            dtype=None,
            **block_kwargs,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(
            downsample=ConvDownsample(in_dim, dim, **dd) if downsample else nn.Identity(),
            blocks=[BiFormerBlock(dim, drop_path=drop_path_rates[i], **block_kwargs, **dd) for i in range(depth)],
        )


class BiFormer(PyramidBackbone):
    """BiFormer: a four-stage hierarchical transformer on bi-level routing attention.

    Args:
        in_chans: Number of input image channels.
        num_classes: Number of classes of the classifier head (0: no head).
        global_pool: Global pooling type of the head.
        embed_dims: Width of each stage.
        depths: Blocks per stage.
        num_heads: Attention heads per stage (the official models: ``width // 32`` in the routing
            stages, 8 in the last).
        topks: Routed regions per query region in each stage; None: attention over the whole map
            (the official last stage).
        n_win: Regions per side of every routing stage's map, an int or (rows, columns). The
            official models use 7 for 224 px classification, 16 for detection and 8 for 512 px
            segmentation; it owns no parameters, so any value loads the same weights.
        mlp_ratio: MLP hidden width over block width.
        side_dwconv: Kernel size of the LePE depthwise convs.
        attn_backend: Backend of ``routing_attention``: None (the process-wide default of
            ``attnzoo.kernels.set_backend``; unset: fused Triton on CUDA, the CPU kernels on CPU),
            ``'triton'`` or ``'reference'``.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth, rising linearly over the blocks to this value.
    """
    family = 'BiFormer'

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (64, 128, 256, 512),
            depths: Tuple[int, ...] = (2, 2, 8, 2),
            num_heads: Tuple[int, ...] = (2, 4, 8, 8),
            topks: Tuple[Optional[int], ...] = (1, 4, 16, None),
            n_win: Union[int, Tuple[int, int]] = 7,
            mlp_ratio: float = 3.,
            side_dwconv: int = 5,
            attn_backend: Optional[str] = None,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        if not len(embed_dims) == len(num_heads) == len(topks) == num_stages:
            raise ValueError(
                f'BiFormer: embed_dims, depths, num_heads and topks need one entry per stage; got {len(embed_dims)}, '
                f'{num_stages}, {len(num_heads)} and {len(topks)}')
        if norm_layer is nn.LayerNorm:
            norm_layer = _layer_norm_eps_1e6
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = embed_dims[-1]

        self.stem_stride = 4
        self.stem = ConvStem(in_chans, embed_dims[0], **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            stages.append(BiFormerStage(
                embed_dims[max(i - 1, 0)],
                embed_dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                topk=topks[i],
                n_win=n_win,
                downsample=i > 0,
                mlp_ratio=mlp_ratio,
                side_dwconv=side_dwconv,
                drop_path_rates=dpr[i],
                attn_backend=attn_backend,
                norm_layer=norm_layer,
                **dd,
            ))
            self.feature_info.append(
                dict(num_chs=embed_dims[i], reduction=self.stem_stride * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = ChannelsLastBatchNorm(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt=self.output_fmt, **dd)
        self.apply(self._init_weights)


def _layer_norm_eps_1e6(dim: int, device=None, dtype=None) -> nn.LayerNorm:
    # the official blocks' LayerNorm(eps=1e-6) ("important to avoid attention collapsing")
    return nn.LayerNorm(dim, eps=1e-6, device=device, dtype=dtype)


# official key -> ours; the first rule whose pattern matches is applied. The official
# downsample_layers.0 is our stem, downsample_layers.i (i > 0) opens our stages.i.
_OFFICIAL_KEY_RULES = (
    (r'^downsample_layers\.0\.0\.', 'stem.conv1.'),
    (r'^downsample_layers\.0\.1\.', 'stem.norm1.'),
    (r'^downsample_layers\.0\.3\.', 'stem.conv2.'),
    (r'^downsample_layers\.0\.4\.', 'stem.norm2.'),
    (r'^downsample_layers\.(\d+)\.0\.', r'stages.\1.downsample.conv.'),
    (r'^downsample_layers\.(\d+)\.1\.', r'stages.\1.downsample.norm.'),
    (r'^stages\.(\d+)\.(\d+)\.attn\.qkv\.qkv\.', r'stages.\1.blocks.\2.attn.qkv.'),
    (r'^stages\.(\d+)\.(\d+)\.attn\.wo\.', r'stages.\1.blocks.\2.attn.proj.'),
    (r'^stages\.(\d+)\.(\d+)\.mlp\.0\.', r'stages.\1.blocks.\2.mlp.fc1.'),
    (r'^stages\.(\d+)\.(\d+)\.mlp\.3\.', r'stages.\1.blocks.\2.mlp.fc2.'),
    (r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'^norm\.', 'norm.bn.'),
    (r'^head\.', 'head.fc.'),
)


def _convert_official_key(key: str) -> str:
    return rename_by_first_rule(key, _OFFICIAL_KEY_RULES)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: BiFormer) -> Dict[str, torch.Tensor]:
    """Converts an official BiFormer checkpoint (or one of ours) to this model's keys.

    Accepts a plain state dict or one wrapped as the official files are (``{'model': ..., 'model_ema':
    ..., 'args': ...}``: ``model`` is taken, as the official ``load_release`` and dense initialisation
    take it; see :func:`~attnzoo.backbones._checkpoint.unwrap_checkpoint`). Our own state dict passes through
    unchanged. Classifier keys may differ (timm drops or re-creates the head when num_classes
    changes); any other mismatch raises a ValueError naming the keys.
    """
    return convert_checkpoint(
        state_dict, model, _convert_official_key,
        hint='(after converting official BiFormer names) is it a classification checkpoint of this variant '
             '(biformer_tiny / small / base, from models/biformer.py; the STL models are a different architecture)?')


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return build_pyramid(BiFormer, variant, pretrained, **kwargs)


def _cfg(url: str = '', file_name: str = '', **kwargs) -> Dict:
    return pyramid_cfg(dict(
        # (url, cache file name): the official OneDrive links all end in '/content'; the files pickle the
        # training arguments, which the model's load_pretrained (custom_load) allows
        url=(url, file_name), custom_load=True,
        # the official evaluation: resize to 256, center crop 224, bicubic (pyramid_cfg's)
        first_conv='stem.conv1', license='mit', origin_url='https://github.com/rayleizhu/BiFormer',
        paper_ids='arXiv:2303.08810',
        paper_name='BiFormer: Vision Transformer with Bi-Level Routing Attention'), **kwargs)


# the official model_urls (models/biformer.py); the official loader saves them as {variant}_in1k.pth
_ONEDRIVE = 'https://api.onedrive.com/v1.0/shares/{}/root/content'

default_cfgs = generate_default_cfgs({
    'biformer_tiny.in1k': _cfg(_ONEDRIVE.format('s!AkBbczdRlZvChHEOoGkgwgQzEDlM'), 'biformer_tiny_in1k.pth'),
    'biformer_small.in1k': _cfg(_ONEDRIVE.format('s!AkBbczdRlZvChHDyM-x9KWRBZ832'), 'biformer_small_in1k.pth'),
    'biformer_base.in1k': _cfg(_ONEDRIVE.format('s!AkBbczdRlZvChHI_XPhoadjaNxtO'), 'biformer_base_in1k.pth'),
})

# heads: width // 32 in the routing stages; the official stage 4 keeps AttentionLePE's default of 8
_TINY = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(2, 4, 8, 8))
_SMALL = dict(embed_dims=(64, 128, 256, 512), depths=(4, 4, 18, 4), num_heads=(2, 4, 8, 8))
_BASE = dict(embed_dims=(96, 192, 384, 768), depths=(4, 4, 18, 4), num_heads=(3, 6, 12, 8))


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    return _create_biformer('biformer_tiny', pretrained=pretrained, **dict(_TINY, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    return _create_biformer('biformer_small', pretrained=pretrained, **dict(_SMALL, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    return _create_biformer('biformer_base', pretrained=pretrained, **dict(_BASE, **kwargs))
