"""CSWin Transformer: cross-shaped window self-attention.

Paper: `CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows`
    - https://arxiv.org/abs/2107.00652 (CVPR 2022)

Official code and checkpoints: https://github.com/microsoft/CSWin-Transformer (MIT).

Each block splits its heads in two halves: one attends inside vertical stripes (full height,
``split_size`` wide), the other inside horizontal stripes (``split_size`` high, full width); the two
halves together see a cross-shaped window. LePE (a depthwise 3x3 conv on the values, applied per
stripe, so its zero padding is at stripe borders) is added to the attention output. The last stage
attends over the whole map with all heads (a single branch).

Any input size works: a map that is not a multiple of the stripe width is zero-padded, centred,
and cropped back after attention, as the official segmentation backbone does. At the sizes the
official classification models were built for (224, 384) nothing is padded and the model computes
exactly what the official classification code computes.

Activations stay channels-last ``[B, H, W, C]`` inside the model; the pyramid features of
``forward_intermediates`` / ``features_only`` are NCHW by default.
"""
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import ClassifierHead, DropPath, Mlp, calculate_drop_path_rates, use_fused_attn
from timm.models import generate_default_cfgs, register_model

from ._checkpoint import convert_checkpoint, rename_by_first_rule
from ._pyramid import PyramidBackbone, PyramidStage, build_pyramid, pyramid_cfg

__all__ = ['CSWinTransformer']

STRIPE_ORIENTATIONS = ('vertical', 'horizontal', 'full')


class ConvEmbed(nn.Module):
    """Strided convolution, then LayerNorm over channels; NHWC out.

    The stem (7x7, stride 4, padding 2) on NCHW images, and the official ``Merge_Block`` (3x3,
    stride 2, padding 1) that opens stages 2-4, on channels-last maps (``channels_last_input``).
    """

    def __init__(
            self,
            in_dim: int,
            out_dim: int,
            kernel_size: int,
            stride: int,
            padding: int,
            channels_last_input: bool = False,
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.channels_last_input = channels_last_input
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride=stride, padding=padding, **dd)
        self.norm = norm_layer(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


def centered_padding(size: int, multiple: int) -> Tuple[int, int]:
    """(before, after) zero padding that makes ``size`` a multiple of ``multiple``; ``before`` is the smaller half."""
    total = (multiple - size % multiple) % multiple
    return total // 2, total - total // 2


class StripeAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows of one shape, plus LePE.

    One branch of a CSWin block; q, k, v come in as ``[B, H, W, 3, C]`` and the output is
    ``[B, H, W, C]``. The window is a vertical stripe (H x ``stripe_width``), a horizontal stripe
    (``stripe_width`` x W) or the whole map (``'full'``). Along the stripe axis the map is zero-padded
    to a multiple of ``stripe_width`` (centred) and cropped back afterwards. As in the official
    segmentation backbone the padded tokens are not masked: they are keys with logit 0 and value 0.
    """
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            orientation: str,
            stripe_width: int = 0,
            attn_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if orientation not in STRIPE_ORIENTATIONS:
            raise ValueError(f'StripeAttention: orientation must be one of {STRIPE_ORIENTATIONS}, got {orientation!r}')
        if orientation != 'full' and stripe_width < 1:
            raise ValueError(f'StripeAttention: {orientation} stripes need stripe_width >= 1, got {stripe_width}')
        if dim % num_heads:
            raise ValueError(f'StripeAttention: dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.orientation = orientation
        self.stripe_width = stripe_width
        self.fused_attn = use_fused_attn()
        self.lepe = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, device=device, dtype=dtype)
        self.attn_drop = nn.Dropout(attn_drop)

    def window_size(self, height: int, width: int) -> Tuple[int, int]:
        if self.orientation == 'vertical':
            return height, self.stripe_width
        if self.orientation == 'horizontal':
            return self.stripe_width, width
        return height, width

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        B, H, W, _, C = qkv.shape
        win_h, win_w = self.window_size(H, W)
        pad_top, pad_bottom = centered_padding(H, win_h)
        pad_left, pad_right = centered_padding(W, win_w)
        # unconditional (a no-op pad when the map fits): no branch on the map size, for FX
        qkv = F.pad(qkv, (0, 0, 0, 0, pad_left, pad_right, pad_top, pad_bottom))
        padded_h, padded_w = H + pad_top + pad_bottom, W + pad_left + pad_right
        num_h, num_w = padded_h // win_h, padded_w // win_w

        # [B, nh, wh, nw, ww, 3, heads, d] -> [3, B * nh * nw, heads, wh * ww, d]
        qkv = qkv.reshape(B, num_h, win_h, num_w, win_w, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, -1, self.num_heads, win_h * win_w, self.head_dim)
        q, k, v = qkv.unbind(0)

        # LePE sees one window at a time: its 3x3 zero padding sits at the stripe borders
        v_windows = v.transpose(-1, -2).reshape(-1, C, win_h, win_w)
        lepe = self.lepe(v_windows).reshape(-1, self.num_heads, self.head_dim, win_h * win_w).transpose(-1, -2)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x + lepe

        # [B * nh * nw, heads, wh * ww, d] -> [B, H, W, C]
        x = x.reshape(B, num_h, num_w, self.num_heads, win_h, win_w, self.head_dim)
        x = x.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, padded_h, padded_w, C)
        return x[:, pad_top:pad_top + H, pad_left:pad_left + W]

    def extra_repr(self) -> str:
        width = '' if self.orientation == 'full' else f', stripe_width={self.stripe_width}'
        return f'num_heads={self.num_heads}, orientation={self.orientation}{width}'


class CrossShapedWindowAttention(nn.Module):
    """qkv projection, then either two stripe branches on half the channels and heads each (channels
    ``[:C/2]`` vertical, ``[C/2:]`` horizontal) or one full-map branch, then the output projection."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            split_size: int,
            full_attention: bool = False,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if full_attention:
            branches = [StripeAttention(dim, num_heads, 'full', attn_drop=attn_drop, **dd)]
        else:
            if dim % 2 or num_heads % 2:
                raise ValueError(
                    f'CSWin stripe attention splits channels and heads between two branches; dim {dim} and '
                    f'num_heads {num_heads} must both be even')
            branches = [
                StripeAttention(dim // 2, num_heads // 2, orientation, split_size, attn_drop=attn_drop, **dd)
                for orientation in ('vertical', 'horizontal')
            ]
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.branches = nn.ModuleList(branches)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, C)
        parts = qkv.chunk(len(self.branches), dim=-1)
        outputs = []
        for i, branch in enumerate(self.branches):
            outputs.append(branch(parts[i]))
        return self.proj(torch.cat(outputs, dim=-1))


class CSWinBlock(nn.Module):
    """Pre-norm block: cross-shaped window attention, then MLP; NHWC in and out.

    The official block applies ``drop_rate`` only inside the MLP, not after the attention projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            split_size: int,
            full_attention: bool = False,
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
        self.attn = CrossShapedWindowAttention(
            dim, num_heads, split_size, full_attention=full_attention, qkv_bias=qkv_bias, attn_drop=attn_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class CSWinStage(PyramidStage):
    """Optional merge (stride-2 conv) then CSWin blocks; NHWC in and out."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            num_heads: int,
            split_size: int,
            full_attention: bool = False,
            downsample: bool = True,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path_rates: Tuple[float, ...] = (),
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(
            downsample=ConvEmbed(
                in_dim, dim, 3, stride=2, padding=1, channels_last_input=True, norm_layer=norm_layer, **dd,
            ) if downsample else nn.Identity(),
            blocks=[
                CSWinBlock(
                    dim,
                    num_heads,
                    split_size,
                    full_attention=full_attention,
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


class CSWinTransformer(PyramidBackbone):
    """CSWin Transformer: a four-stage hierarchical transformer on cross-shaped window attention.

    Args:
        in_chans: Number of input image channels.
        num_classes: Number of classes of the classifier head (0: no head).
        global_pool: Global pooling type of the head.
        embed_dim: Width of the first stage; it doubles at every stage.
        depths: Blocks per stage.
        num_heads: Attention heads per stage (split evenly between the two stripe branches).
        split_size: Stripe width per stage, in tokens of that stage. The official models use
            (1, 2, 7, 7) at 224 and (1, 2, 12, 12) at 384; dense tasks may use any widths.
        last_stage_full_attention: The last stage attends over the whole map with a single branch,
            at every input size (the official design; its checkpoints need it). False: the last
            stage uses stripes of ``split_size[-1]`` like the others.
        mlp_ratio: MLP hidden width over block width.
        qkv_bias: Bias in the qkv projection.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout in the MLP (the official ``drop_rate``).
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, rising linearly over the blocks to this value.
    """
    family = 'CSWin'
    # the official main.py evaluates the EMA weights: load_checkpoint(model, args.eval_checkpoint, args.model_ema),
    # --model-ema defaulting to True
    checkpoint_ema = True

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depths: Tuple[int, ...] = (1, 2, 21, 1),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            split_size: Tuple[int, ...] = (1, 2, 7, 7),
            last_stage_full_attention: bool = True,
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
        if len(num_heads) != num_stages or len(split_size) != num_stages:
            raise ValueError(
                f'CSWin: depths, num_heads and split_size need one entry per stage; got {len(depths)}, '
                f'{len(num_heads)} and {len(split_size)}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem_stride = 4
        self.stem = ConvEmbed(
            in_chans, dims[0], kernel_size=7, stride=self.stem_stride, padding=2, norm_layer=norm_layer, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            stages.append(CSWinStage(
                dims[max(i - 1, 0)],
                dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                split_size=split_size[i],
                full_attention=last_stage_full_attention and i == num_stages - 1,
                downsample=i > 0,
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
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt=self.output_fmt, **dd)
        self.apply(self._init_weights)


# official key -> ours; the first rule whose pattern matches is applied. Official stage{n} is our
# stages.{n-1}; official merge{n} opens official stage{n+1}, i.e. our stages.{n}.
_OFFICIAL_KEY_RULES = (
    (r'^stage1_conv_embed\.0\.', 'stem.conv.'),
    (r'^stage1_conv_embed\.2\.', 'stem.norm.'),
    (r'^merge(\d+)\.', lambda m: f'stages.{m[1]}.downsample.'),
    (r'^stage(\d+)\.(\d+)\.attns\.(\d+)\.get_v\.',
     lambda m: f'stages.{int(m[1]) - 1}.blocks.{m[2]}.attn.branches.{m[3]}.lepe.'),
    (r'^stage(\d+)\.(\d+)\.(qkv|proj)\.', lambda m: f'stages.{int(m[1]) - 1}.blocks.{m[2]}.attn.{m[3]}.'),
    (r'^stage(\d+)\.(\d+)\.', lambda m: f'stages.{int(m[1]) - 1}.blocks.{m[2]}.'),
    (r'^head\.', 'head.fc.'),
)


def _convert_official_key(key: str) -> str:
    return rename_by_first_rule(key, _OFFICIAL_KEY_RULES)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: CSWinTransformer) -> Dict[str, torch.Tensor]:
    """Converts an official CSWin checkpoint (or one of ours) to this model's keys.

    Accepts a plain state dict or one wrapped as the official files are (see
    :func:`~attnzoo.backbones._checkpoint.unwrap_checkpoint`). Our own state dict passes through unchanged.
    Classifier keys may differ (timm drops or re-creates the head when num_classes changes); any other
    mismatch raises a ValueError naming the keys.
    """
    return convert_checkpoint(
        state_dict, model, _convert_official_key,
        hint='(after converting official CSWin names) is it a classification checkpoint of this '
             'variant (depths, last_stage_full_attention)?')


def _create_cswin(variant: str, pretrained: bool = False, **kwargs) -> CSWinTransformer:
    return build_pyramid(CSWinTransformer, variant, pretrained, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict:
    return pyramid_cfg(dict(
        # the official cfgs: crop 0.9 at 224, 1.0 at 384; bicubic
        url=url, crop_pct=0.9, first_conv='stem.conv', license='mit',
        origin_url='https://github.com/microsoft/CSWin-Transformer', paper_ids='arXiv:2107.00652',
        paper_name='CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows'), **kwargs)


_URL = 'https://github.com/microsoft/CSWin-Transformer/releases/download/v0.1.0/{}.pth'
_AT_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)

default_cfgs = generate_default_cfgs({
    'cswin_tiny_224.ms_in1k': _cfg(_URL.format('cswin_tiny_224')),
    'cswin_small_224.ms_in1k': _cfg(_URL.format('cswin_small_224')),
    'cswin_base_224.ms_in1k': _cfg(_URL.format('cswin_base_224')),
    'cswin_base_384.ms_in1k': _cfg(_URL.format('cswin_base_384'), **_AT_384),
    'cswin_large_224.ms_in22k_ft_in1k': _cfg(_URL.format('cswin_large_224')),
    'cswin_large_384.ms_in22k_ft_in1k': _cfg(_URL.format('cswin_large_384'), **_AT_384),
})

_TINY = dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16))
_SMALL = dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16))
_BASE = dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32))
_LARGE = dict(embed_dim=144, depths=(2, 4, 32, 2), num_heads=(6, 12, 24, 24))
# stripe widths: 1 and 2 in the first two stages; 7 (224) or 12 (384) in the third, two stripes of a 14 / 24 map
_SPLIT_224 = (1, 2, 7, 7)
_SPLIT_384 = (1, 2, 12, 12)


@register_model
def cswin_tiny_224(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    model_args = dict(_TINY, split_size=_SPLIT_224)
    return _create_cswin('cswin_tiny_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cswin_small_224(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    model_args = dict(_SMALL, split_size=_SPLIT_224)
    return _create_cswin('cswin_small_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cswin_base_224(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    model_args = dict(_BASE, split_size=_SPLIT_224)
    return _create_cswin('cswin_base_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cswin_large_224(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    model_args = dict(_LARGE, split_size=_SPLIT_224)
    return _create_cswin('cswin_large_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cswin_base_384(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    model_args = dict(_BASE, split_size=_SPLIT_384)
    return _create_cswin('cswin_base_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cswin_large_384(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    model_args = dict(_LARGE, split_size=_SPLIT_384)
    return _create_cswin('cswin_large_384', pretrained=pretrained, **dict(model_args, **kwargs))
