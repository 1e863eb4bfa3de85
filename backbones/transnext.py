"""TransNeXt: aggregated attention (a 3x3 window plus pooled tokens in one softmax) and ConvGLU.

Paper: `TransNeXt: Robust Foveal Visual Perception for Vision Transformers`
    - https://arxiv.org/abs/2311.17132 (CVPR 2024)

Official code and checkpoints: https://github.com/DaiShiResearch/TransNeXt (Apache-2.0).

Every query of stages 1-3 attends, in one softmax, to its zero-padded 3x3 neighbourhood (with a
``[heads, 9]`` bias, out-of-map keys masked) and to the map average-pooled to ``H // sr x W // sr``
tokens (with a length-scaled log-spaced continuous position bias, CPB, from a small MLP). Queries and
keys are L2-normalised (cosine attention) with a learned query embedding and a softplus temperature,
scaled by ``log(keys seen)``; after the softmax, ``q_norm @ learnable_tokens + learnable_bias`` is added
to the window weights. Stage 4 attends over the whole map with the same cosine attention and CPB.

Any input size works, as in the official dense-prediction code: the pool follows the map
(``H // sr``), the per-token length scale and the window mask are rebuilt for the map, and the CPB
bias is either bilinearly interpolated from the size the model was built for (``img_size``; the
official default) or recomputed for the new size (``is_extrapolation=True``). ``fixed_pool_size``
keeps the pool at one size whatever the input (the official "linear inference mode"). At the size the
model was built for, it computes what the official classification code computes.

Activations stay channels-last ``[B, H, W, C]`` inside the model; every stage ends with its own
LayerNorm (the official ``norm1`` ... ``norm4``), so the pyramid features are normalised, and the
classifier pools the normalised last stage. ``forward_intermediates`` / ``features_only`` give NCHW by
default.
"""
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import checkpoint, generate_default_cfgs, register_model
from timm.models import register_notrace_function

from attnzoo.kernels import neighborhood_attention_2d

from ._checkpoint import convert_checkpoint, rename_by_every_rule
from ._layers import DepthwiseConvNhwc
from ._pyramid import PyramidBackbone, build_pyramid, pyramid_cfg

__all__ = ['TransNeXt']

# one leaf call in FX graphs, not traced into; the helper, not the op's public function, so that a scripted FX
# graph compiles the helper's TorchScript branch (the registered op), not the public function's Python checks
torch.fx.wrap('aggregated_neighborhood_attention')

AGGREGATED_ATTENTION_IMPLS = ('fused', 'native')

# softplus(temperature) starts at 1 / 0.24 (official init)
INITIAL_TEMPERATURE = 1 / 0.24


# ----------------------------------------------------------------------------- geometry of a stage
#
# Everything that depends on the map size is computed by the small functions below, recorded by FX as
# one call each (the size is a proxy while tracing) and scriptable.

@torch.fx.wrap
@register_notrace_function  # reason: the pool size depends on the map size
def pool_size(x: torch.Tensor, sr_ratio: int, fixed_pool_size: Optional[int] = None) -> List[int]:
    """The pooled grid of an NHWC map: ``fixed_pool_size`` where given, else the map over ``sr_ratio``
    (at least one token; the official code would build an empty pool on maps under ``sr_ratio``)."""
    if fixed_pool_size is not None:
        return [fixed_pool_size, fixed_pool_size]
    return [max(1, x.shape[1] // sr_ratio), max(1, x.shape[2] // sr_ratio)]


def relative_position_cpb(
        query_size: List[int],
        key_size: List[int],
        pretrain_size: List[int],
        device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official ``get_relative_position_cpb``: ``(index, table)`` of the log-spaced relative
    coordinates between a query grid and a pooled key grid.

    Keys sit at the centres of their pooling windows (``adaptive_avg_pool1d`` of the pixel positions);
    ``(q - k) / (pretrain - 1) * 8`` per axis, then ``sign * log2(|x| + 1) / log2(8)``. The table holds
    each distinct coordinate pair once (the CPB MLP runs on the table, the bias is gathered by
    ``index``, ``[Nq * Nk]``, query-major). The official code finds the distinct pairs with
    ``torch.unique(dim=0)`` over all ``Nq * Nk`` pairs; the pairs are the product of the distinct values
    per axis, so taking them per axis gives the same table in the same (sorted) order, far cheaper.
    """
    coord_range = 8.  # a pretrain-size map spans [-8, 8], log-spaced to [-1, 1]
    values: List[torch.Tensor] = []
    inverses: List[torch.Tensor] = []
    for axis in range(2):
        axis_q = torch.arange(query_size[axis], dtype=torch.float32, device=device)
        axis_k = F.adaptive_avg_pool1d(axis_q.unsqueeze(0), key_size[axis]).squeeze(0)
        relative = (axis_q[:, None] - axis_k[None, :]) / (pretrain_size[axis] - 1) * coord_range
        unique, inverse = torch.unique(relative, sorted=True, return_inverse=True)
        values.append(unique)
        inverses.append(inverse)
    num_w = values[1].shape[0]
    # [qh, qw, kh, kw] -> pair (h, w), h-major as the official sorted unique rows
    index = inverses[0][:, None, :, None] * num_w + inverses[1][None, :, None, :]
    index = index.reshape(-1)
    grid_h, grid_w = torch.meshgrid(values[0], values[1], indexing='ij')
    table = torch.stack([grid_h, grid_w], dim=-1).reshape(-1, 2)
    log2_range = torch.log2(torch.tensor(coord_range, device=table.device))
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / log2_range
    return index, table


def local_window_context(
        height: int,
        width: int,
        window_size: int,
        pool_len: int,
        device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official ``get_seqlen_and_mask``: per token, ``log(in-map window keys + pool_len)``
    (``[N, 1]``) and which window positions fall outside the map (``[N, window ** 2]``, True = masked)."""
    ones = torch.ones(1, 1, height, width, device=device)
    window = F.unfold(ones, window_size, padding=window_size // 2)          # [1, window ** 2, N]
    local_len = window.sum(-2).squeeze(0).unsqueeze(-1)
    return torch.log(local_len + pool_len), window.squeeze(0).permute(1, 0) == 0


@torch.fx.wrap
@register_notrace_function  # reason: what is rebuilt depends on the map size
def stage_context(
        x: torch.Tensor,
        relative_pos_index: torch.Tensor,
        relative_coords_table: torch.Tensor,
        trained_size: List[int],
        pretrain_size: List[int],
        sr_ratio: int,
        window_size: int,
        fixed_pool_size: Optional[int],
        is_extrapolation: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """What every block of a stage shares for an NHWC map ``x``, as the official dense ``forward``
    builds it per stage: the CPB ``(index, table)`` (the buffers of the built size, unless
    extrapolating to another size), the length scale and, for aggregated attention
    (``window_size > 0``), the window mask."""
    height, width = x.shape[1], x.shape[2]
    pool = pool_size(x, sr_ratio, fixed_pool_size)
    if is_extrapolation and (height != trained_size[0] or width != trained_size[1]):
        relative_pos_index, relative_coords_table = relative_position_cpb(
            [height, width], pool, pretrain_size, device=x.device)
    if window_size > 0:
        seq_length_scale, padding_mask = local_window_context(height, width, window_size, pool[0] * pool[1], x.device)
        return relative_pos_index, relative_coords_table, seq_length_scale, padding_mask
    seq_length_scale = torch.log(torch.tensor(float(pool[0] * pool[1]), device=x.device))
    return relative_pos_index, relative_coords_table, seq_length_scale, None


@torch.fx.wrap
@register_notrace_function  # reason: whether and how far to resize depends on the map size
def shape_cpb_bias(
        bias: torch.Tensor,
        query_size: List[int],
        key_size: List[int],
        source_query_size: List[int],
        source_key_size: List[int],
) -> torch.Tensor:
    """``[heads, Nq * Nk]`` CPB bias of the source grids -> ``[heads, Nq, Nk]`` of the target grids,
    bilinearly resized over the keys, then over the queries, as the official dense code does when it
    does not extrapolate. Equal grids are only reshaped (a same-size bilinear resize is the identity)."""
    heads = bias.shape[0]
    source_q, source_k = source_query_size[0] * source_query_size[1], source_key_size[0] * source_key_size[1]
    num_q, num_k = query_size[0] * query_size[1], key_size[0] * key_size[1]
    if source_query_size == query_size and source_key_size == key_size:
        return bias.view(heads, num_q, num_k)
    bias = bias.reshape(heads, source_q, source_key_size[0], source_key_size[1])
    bias = F.interpolate(bias, (key_size[0], key_size[1]), mode='bilinear', align_corners=False)
    bias = bias.reshape(heads, source_q, num_k).transpose(-1, -2).reshape(
        heads, num_k, source_query_size[0], source_query_size[1])
    bias = F.interpolate(bias, (query_size[0], query_size[1]), mode='bilinear', align_corners=False)
    return bias.reshape(heads, num_k, num_q).transpose(-1, -2)


# ----------------------------------------------------------------------------- layers

class OverlapPatchEmbed(nn.Module):
    """Strided convolution, then LayerNorm; the stem (7x7, stride 4) on NCHW images and the downsample
    (3x3, stride 2) opening stages 2-4 on NHWC maps (``channels_last_input``). NHWC out."""

    def __init__(
            self,
            in_dim: int,
            out_dim: int,
            kernel_size: int,
            stride: int,
            channels_last_input: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.channels_last_input = channels_last_input
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size, stride=stride, padding=kernel_size // 2, **dd)
        # the official patch embeddings keep LayerNorm's default eps (1e-5); blocks use 1e-6
        self.norm = nn.LayerNorm(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvolutionalGLU(nn.Module):
    """ConvGLU: ``fc2(GELU(DWConv3x3(a)) * b)`` with ``(a, b) = fc1(x).chunk(2)``; NHWC.

    The hidden width is two thirds of ``hidden_features`` (same parameters as a plain MLP of that width).
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: int,
            act_layer=nn.GELU,
            drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        hidden_features = int(2 * hidden_features / 3)
        self.fc1 = nn.Linear(in_features, hidden_features * 2, **dd)
        self.dwconv = DepthwiseConvNhwc(hidden_features, 3, **dd)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.fc1(x).chunk(2, dim=-1)
        x = self.dwconv(x)
        x = self.drop(self.act(x) * gate)
        return self.drop(self.fc2(x))


class CosineAttentionBase(nn.Module):
    """What both TransNeXt attentions hold: the query embedding, the softplus temperature, the CPB MLP
    and the output projection, and the grids the model was built for (where the CPB buffers live)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            trained_size: Tuple[int, int],
            trained_key_size: Tuple[int, int],
            is_extrapolation: bool,
            attn_drop: float,
            proj_drop: float,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'TransNeXt attention: dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.trained_size = list(trained_size)
        self.trained_key_size = list(trained_key_size)
        self.is_extrapolation = is_extrapolation
        self.temperature = nn.Parameter(
            torch.full((num_heads, 1, 1), math.log(math.expm1(INITIAL_TEMPERATURE)), **dd))
        self.query_embedding = nn.Parameter(torch.empty(num_heads, 1, self.head_dim, **dd))
        self.cpb_fc1 = nn.Linear(2, 512, **dd)
        self.cpb_act = nn.ReLU()
        self.cpb_fc2 = nn.Linear(512, num_heads, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.query_embedding, std=.02)

    def cpb_bias(
            self,
            relative_pos_index: torch.Tensor,
            relative_coords_table: torch.Tensor,
            query_size: List[int],
            key_size: List[int],
    ) -> torch.Tensor:
        """``[heads, Nq, Nk]`` position bias for a query grid and key grid: the MLP on the table,
        gathered by the index, resized from the built grids unless the index was built for these."""
        bias = self.cpb_fc2(self.cpb_act(self.cpb_fc1(relative_coords_table))).transpose(0, 1)
        bias = bias[:, relative_pos_index.view(-1)]
        if self.is_extrapolation:
            return shape_cpb_bias(bias, query_size, key_size, query_size, key_size)
        return shape_cpb_bias(bias, query_size, key_size, self.trained_size, self.trained_key_size)

    def scaled_query(self, q_norm: torch.Tensor, seq_length_scale: torch.Tensor) -> torch.Tensor:
        # the length scale is float32 (built per map): the product keeps the activations' dtype
        return ((q_norm + self.query_embedding) * F.softplus(self.temperature) * seq_length_scale).to(q_norm.dtype)


class Attention(CosineAttentionBase):
    """Stage-4 attention over the whole map: length-scaled cosine attention plus the CPB bias; NHWC."""
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            trained_size: Tuple[int, int],
            is_extrapolation: bool = False,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__(dim, num_heads, trained_size, trained_size, is_extrapolation, attn_drop, proj_drop,
                         device=device, dtype=dtype)
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)

    def forward(
            self,
            x: torch.Tensor,
            relative_pos_index: torch.Tensor,
            relative_coords_table: torch.Tensor,
            seq_length_scale: torch.Tensor,
            padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3 * self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        q, k, v = qkv.chunk(3, dim=1)
        bias = self.cpb_bias(relative_pos_index, relative_coords_table, [H, W], [H, W])
        q = self.scaled_query(F.normalize(q, dim=-1), seq_length_scale)
        k = F.normalize(k, dim=-1)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype), dropout_p=self.attn_drop.p if self.training else 0.,
                scale=1.)
        else:
            attn = (q @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        # an explicit copy: SDPA's CPU output layout depends on grad mode, and a reshape traced as a view under
        # one layout fails under the other in torch.onnx's decomposition passes
        x = x.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(B, H, W, C)
        return self.proj_drop(self.proj(x))


def aggregated_neighborhood_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window_size: int,
        rpb: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        pool_bias: torch.Tensor,
        window_weight: torch.Tensor,
) -> torch.Tensor:
    """The window + pool softmax and the learnable tokens as one ``neighborhood_attention_2d`` call
    (zero border, logits pre-scaled): the registered op under TorchScript, the public function (one
    leaf call under FX) otherwise."""
    if torch.jit.is_scripting():
        return torch.ops.attnzoo.neighborhood_attention_2d(
            q, k, v, [window_size, window_size], [1, 1], 1., rpb, 'zero', k_pool, v_pool, None, pool_bias,
            window_weight)
    return neighborhood_attention_2d(
        q, k, v, window_size, scale=1., rpb=rpb, border='zero', extra_k=k_pool, extra_v=v_pool, extra_bias=pool_bias,
        window_weight=window_weight)


class AggregatedAttention(CosineAttentionBase):
    """Aggregated attention of stages 1-3: a zero-padded ``window_size`` window and the pooled map in one
    softmax, learnable tokens after it; NHWC.

    Two paths compute it (``attn_impl``):

    - ``'native'`` mirrors the official ``attention_native.py`` op by op (it unfolds every window, so its
      memory grows with ``window_size ** 2`` times the map): the ground truth of the fused path;
    - ``'fused'`` (default) is one ``attnzoo.kernels.neighborhood_attention_2d`` call on heads-last views
      of the q / kv projections: the ``[heads, 9]`` local bias as the op's relative position bias (the
      centre of a ``[heads, 2w - 1, 2w - 1]`` table: a zero border only sees offsets ``-w//2 .. w//2``),
      the pooled tokens as its extra tokens with the CPB bias as ``extra_bias``, and the learnable
      tokens as ``window_weight``. Attention dropout (0 in every official config) runs on the native path.
    """
    attn_impl: torch.jit.Final[str]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            trained_size: Tuple[int, int],
            trained_pool_size: Tuple[int, int],
            window_size: int = 3,
            sr_ratio: int = 8,
            fixed_pool_size: Optional[int] = None,
            is_extrapolation: bool = False,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            attn_impl: str = 'fused',
            device=None,
            dtype=None,
    ):
        super().__init__(dim, num_heads, trained_size, trained_pool_size, is_extrapolation, attn_drop, proj_drop,
                         device=device, dtype=dtype)
        dd = {'device': device, 'dtype': dtype}
        if window_size % 2 != 1:
            raise ValueError(f'AggregatedAttention: window_size must be odd (a centred window), got {window_size}')
        if attn_impl not in AGGREGATED_ATTENTION_IMPLS:
            raise ValueError(f'AggregatedAttention: attn_impl must be one of {AGGREGATED_ATTENTION_IMPLS}, '
                             f'got {attn_impl!r}')
        self.attn_impl = attn_impl
        self.window_size = window_size
        self.local_len = window_size ** 2
        self.sr_ratio = sr_ratio
        self.fixed_pool_size = fixed_pool_size
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        # pooled tokens: 1x1 conv, GELU, average pool, LayerNorm (default eps, as official)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1, **dd)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim, **dd)
        self.relative_pos_bias_local = nn.Parameter(torch.empty(num_heads, self.local_len, **dd))
        self.learnable_tokens = nn.Parameter(torch.empty(num_heads, self.head_dim, self.local_len, **dd))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, self.local_len, **dd))
        trunc_normal_(self.relative_pos_bias_local, std=.0004)
        trunc_normal_(self.learnable_tokens, std=.02)

    def forward(
            self,
            x: torch.Tensor,
            relative_pos_index: torch.Tensor,
            relative_coords_table: torch.Tensor,
            seq_length_scale: torch.Tensor,
            padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.attn_impl == 'fused' and not (self.training and self.attn_drop.p > 0.):
            return self.forward_fused(x, relative_pos_index, relative_coords_table, seq_length_scale)
        return self.forward_native(x, relative_pos_index, relative_coords_table, seq_length_scale, padding_mask)

    def forward_fused(
            self,
            x: torch.Tensor,
            relative_pos_index: torch.Tensor,
            relative_coords_table: torch.Tensor,
            seq_length_scale: torch.Tensor,
    ) -> torch.Tensor:
        B, H, W, C = x.shape
        heads, head_dim, window = self.num_heads, self.head_dim, self.window_size
        pool = pool_size(x, self.sr_ratio, self.fixed_pool_size)

        q_norm = F.normalize(self.q(x).view(B, H, W, heads, head_dim), dim=-1)
        q_scaled = ((q_norm + self.query_embedding.view(1, 1, 1, heads, head_dim))
                    * F.softplus(self.temperature).view(1, 1, 1, heads, 1)
                    * seq_length_scale.view(1, H, W, 1, 1)).to(q_norm.dtype)
        k, v = self.kv(x).view(B, H, W, 2, heads, head_dim).unbind(3)
        k = F.normalize(k, dim=-1)

        x_ = F.adaptive_avg_pool2d(self.act(self.sr(x.permute(0, 3, 1, 2))), (pool[0], pool[1]))
        x_ = self.norm(x_.flatten(2).transpose(1, 2))
        k_pool, v_pool = self.kv(x_).view(B, pool[0] * pool[1], 2, heads, head_dim).unbind(2)
        k_pool = F.normalize(k_pool, dim=-1)
        pool_bias = self.cpb_bias(relative_pos_index, relative_coords_table, [H, W], pool)

        pad = window // 2
        rpb = F.pad(self.relative_pos_bias_local.view(heads, window, window), (pad, pad, pad, pad))
        window_weight = (torch.einsum('byxhd,hdj->byxhj', q_norm, self.learnable_tokens)
                         + self.learnable_bias.view(heads, self.local_len))
        x = aggregated_neighborhood_attention(
            q_scaled, k, v, window, rpb, k_pool, v_pool, pool_bias, window_weight)
        return self.proj_drop(self.proj(x.reshape(B, H, W, C)))

    def forward_native(
            self,
            x: torch.Tensor,
            relative_pos_index: torch.Tensor,
            relative_coords_table: torch.Tensor,
            seq_length_scale: torch.Tensor,
            padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        assert padding_mask is not None  # stage_context builds it for every aggregated-attention stage
        B, H, W, C = x.shape
        pool = pool_size(x, self.sr_ratio, self.fixed_pool_size)
        N = H * W
        x = x.reshape(B, N, C)

        q_norm = F.normalize(self.q(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3), dim=-1)
        q_norm_scaled = self.scaled_query(q_norm, seq_length_scale)

        # unfolded (zero-padded) windows of L2-normalised keys and of values
        k_local, v_local = self.kv(x).chunk(2, dim=-1)
        k_local = F.normalize(k_local.reshape(B, N, self.num_heads, self.head_dim), dim=-1).reshape(B, N, C)
        kv_local = torch.cat([k_local, v_local], dim=-1).permute(0, 2, 1).reshape(B, 2 * C, H, W)
        k_local, v_local = F.unfold(kv_local, self.window_size, padding=self.window_size // 2).reshape(
            B, 2 * self.num_heads, self.head_dim, self.local_len, N).permute(0, 1, 4, 2, 3).chunk(2, dim=1)
        attn_local = ((q_norm_scaled.unsqueeze(-2) @ k_local).squeeze(-2)
                      + self.relative_pos_bias_local.unsqueeze(1)).masked_fill(padding_mask, float('-inf'))

        # pooled keys and values, from the same kv projection
        pool_len = pool[0] * pool[1]
        x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
        x_ = F.adaptive_avg_pool2d(self.act(self.sr(x_)), (pool[0], pool[1])).reshape(B, C, pool_len).permute(0, 2, 1)
        x_ = self.norm(x_)
        kv_pool = self.kv(x_).reshape(B, pool_len, 2 * self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        k_pool, v_pool = kv_pool.chunk(2, dim=1)
        pool_bias = self.cpb_bias(relative_pos_index, relative_coords_table, [H, W], pool)
        attn_pool = q_norm_scaled @ F.normalize(k_pool, dim=-1).transpose(-2, -1) + pool_bias

        # one softmax over window and pool; learnable tokens (with the unscaled q) after it
        attn = self.attn_drop(torch.cat([attn_local, attn_pool], dim=-1).softmax(dim=-1))
        attn_local, attn_pool = attn[..., :self.local_len], attn[..., self.local_len:]
        x_local = (((q_norm @ self.learnable_tokens) + self.learnable_bias + attn_local).unsqueeze(-2)
                   @ v_local.transpose(-2, -1)).squeeze(-2)
        x = (x_local + attn_pool @ v_pool).transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        pool = f'fixed_pool_size={self.fixed_pool_size}' if self.fixed_pool_size else f'sr_ratio={self.sr_ratio}'
        return f'num_heads={self.num_heads}, window_size={self.window_size}, {pool}, attn_impl={self.attn_impl}'


class TransNeXtBlock(nn.Module):
    """``x + attn(norm1(x))``, then ``x + ConvGLU(norm2(x))``; NHWC. The stage's shared geometry
    (CPB index and table, length scale, window mask) comes in with ``x``."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            trained_size: Tuple[int, int],
            trained_pool_size: Tuple[int, int],
            window_size: Optional[int],
            sr_ratio: int,
            fixed_pool_size: Optional[int],
            is_extrapolation: bool,
            mlp_ratio: float,
            qkv_bias: bool,
            proj_drop: float,
            attn_drop: float,
            drop_path: float,
            attn_impl: str = 'fused',
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        if window_size:
            self.attn = AggregatedAttention(
                dim, num_heads, trained_size, trained_pool_size, window_size=window_size, sr_ratio=sr_ratio,
                fixed_pool_size=fixed_pool_size, is_extrapolation=is_extrapolation, qkv_bias=qkv_bias,
                attn_drop=attn_drop, proj_drop=proj_drop, attn_impl=attn_impl, **dd)
        else:
            self.attn = Attention(
                dim, num_heads, trained_size, is_extrapolation=is_extrapolation, qkv_bias=qkv_bias,
                attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = ConvolutionalGLU(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(
            self,
            x: torch.Tensor,
            relative_pos_index: torch.Tensor,
            relative_coords_table: torch.Tensor,
            seq_length_scale: torch.Tensor,
            padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(
            self.norm1(x), relative_pos_index, relative_coords_table, seq_length_scale, padding_mask))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class TransNeXtStage(nn.Module):
    """Downsample (an identity in stage 1), blocks, LayerNorm; NHWC.

    Holds the CPB index and coordinate table of the grid the model was built for (non-persistent
    buffers: rebuilt, never loaded) and builds, once per forward, what its blocks share
    (:func:`stage_context`). Like :class:`~attnzoo.backbones._pyramid.PyramidStage` it checkpoints one
    block at a time, but its blocks take that shared geometry too (so they sit in a ModuleList, which
    TorchScript does not try to run as a one-argument Sequential) and it ends with the stage's norm.
    """

    def __init__(
            self,
            downsample: nn.Module,
            blocks: Sequence[TransNeXtBlock],
            norm: nn.Module,
            trained_size: Tuple[int, int],
            trained_pool_size: Tuple[int, int],
            pretrain_size: Tuple[int, int],
            window_size: Optional[int],
            sr_ratio: int,
            fixed_pool_size: Optional[int],
            is_extrapolation: bool,
            device=None,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.trained_size = list(trained_size)
        self.trained_pool_size = list(trained_pool_size)
        self.pretrain_size = list(pretrain_size)
        self.window_size = window_size or 0
        self.sr_ratio = sr_ratio
        self.fixed_pool_size = fixed_pool_size
        self.is_extrapolation = is_extrapolation
        self.register_buffer('relative_pos_index', torch.empty(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer('relative_coords_table', torch.empty(0, 2, device=device), persistent=False)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """(Re)builds the CPB buffers of the built grid, e.g. after creating the model on the meta device."""
        device = self.relative_pos_index.device
        # torch.unique has no meta implementation: build on the CPU, then move
        index, table = relative_position_cpb(
            self.trained_size, self.trained_pool_size, self.pretrain_size,
            device=torch.device('cpu') if device.type == 'meta' else device)
        self.relative_pos_index = index.to(device)
        self.relative_coords_table = table.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        relative_pos_index, relative_coords_table, seq_length_scale, padding_mask = stage_context(
            x, self.relative_pos_index, self.relative_coords_table, self.trained_size, self.pretrain_size,
            self.sr_ratio, self.window_size, self.fixed_pool_size, self.is_extrapolation)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, relative_pos_index, relative_coords_table, seq_length_scale, padding_mask)
            else:
                x = block(x, relative_pos_index, relative_coords_table, seq_length_scale, padding_mask)
        return self.norm(x)

    def extra_repr(self) -> str:
        return f'trained_size={self.trained_size}, is_extrapolation={self.is_extrapolation}'


class TransNeXt(PyramidBackbone):
    """TransNeXt: a four-stage hierarchical transformer on aggregated attention and ConvGLU.

    Args:
        img_size: The input size the model is built for (int or (H, W)): the CPB buffers are computed
            for its stage maps; other sizes resize (or, with ``is_extrapolation``, recompute) the bias.
        pretrain_size: The size of the pre-training that scales the CPB coordinates (the 384 px models
            use 224); defaults to ``img_size``, and with pretrained weights to the size they were
            trained at (224; 256 for ``transnext_micro_aaaa_256``).
        in_chans: Number of input image channels.
        num_classes: Number of classes of the classifier head (0: no head).
        global_pool: Global pooling type of the head.
        embed_dims: Width per stage.
        num_heads: Attention heads per stage.
        depths: Blocks per stage.
        mlp_ratios: ConvGLU hidden width (before the 2/3) over block width, per stage.
        sr_ratios: Per stage, the map over the pooled grid (``H // sr`` pooled tokens per axis).
        window_size: Per stage, the aggregated attention window (odd), or None for full attention.
        fixed_pool_size: A pooled grid of this size at any input size (official linear inference mode).
        is_extrapolation: At sizes other than ``img_size``, recompute the CPB bias for the new grid
            instead of bilinearly resizing the built one (the official dense-task flag).
        attn_impl: Aggregated attention on the ``'fused'`` neighborhood op (default) or the ``'native'``
            op-by-op mirror of the official attention_native.py (see :class:`AggregatedAttention`).
        qkv_bias: Bias in the q / kv / qkv projections.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after the attention projection and in ConvGLU (the official drop_rate).
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, rising linearly over the blocks to this value.
    """
    family = 'TransNeXt'
    # the official no_weight_decay_keywords
    no_weight_decay_keywords = ('query_embedding', 'relative_pos_bias_local', 'cpb', 'temperature')

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            pretrain_size: Optional[Union[int, Tuple[int, int]]] = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (48, 96, 192, 384),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            depths: Tuple[int, ...] = (2, 2, 15, 2),
            mlp_ratios: Tuple[float, ...] = (8, 8, 4, 4),
            sr_ratios: Tuple[int, ...] = (8, 4, 2, 1),
            window_size: Tuple[Optional[int], ...] = (3, 3, 3, None),
            fixed_pool_size: Optional[int] = None,
            is_extrapolation: bool = False,
            attn_impl: str = 'fused',
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        for name, values in (('embed_dims', embed_dims), ('num_heads', num_heads), ('mlp_ratios', mlp_ratios),
                             ('sr_ratios', sr_ratios), ('window_size', window_size)):
            if len(values) != num_stages:
                raise ValueError(f'TransNeXt: {len(values)} {name} entries for {num_stages} stages')
        for i, (window, sr) in enumerate(zip(window_size, sr_ratios)):
            if bool(window) != (sr > 1):
                raise ValueError(
                    f'TransNeXt: stage {i + 1} has window_size {window} and sr_ratio {sr}; aggregated attention '
                    f'needs both (an odd window and sr_ratio > 1), full attention neither (None and 1)')
        img_size = to_2tuple(img_size)
        pretrain_size = to_2tuple(pretrain_size or img_size)
        self.stem_stride = 4
        min_pretrain = self.stem_stride * 2 ** num_stages
        if min(pretrain_size) < min_pretrain or min(img_size) < self.stem_stride * 2 ** (num_stages - 1):
            raise ValueError(
                f'TransNeXt: img_size {img_size} / pretrain_size {pretrain_size} too small; the CPB coordinates '
                f'need at least two positions per axis at every stage (pretrain_size >= {min_pretrain})')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = embed_dims[-1]
        norm_layer = nn.LayerNorm
        block_norm = dict(eps=1e-6)

        self.stem = OverlapPatchEmbed(in_chans, embed_dims[0], kernel_size=7, stride=self.stem_stride, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            reduction = self.stem_stride * 2 ** i
            # the official stage grids: the built size floor-divided by the stride
            trained = (img_size[0] // reduction, img_size[1] // reduction)
            if fixed_pool_size is not None and sr_ratios[i] > 1:
                trained_pool = (fixed_pool_size, fixed_pool_size)
            else:
                trained_pool = (trained[0] // sr_ratios[i], trained[1] // sr_ratios[i])
            blocks = [
                TransNeXtBlock(
                    embed_dims[i],
                    num_heads[i],
                    trained_size=trained,
                    trained_pool_size=trained_pool,
                    window_size=window_size[i],
                    sr_ratio=sr_ratios[i],
                    fixed_pool_size=fixed_pool_size,
                    is_extrapolation=is_extrapolation,
                    mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i][j],
                    attn_impl=attn_impl,
                    norm_layer=lambda dim, **kw: norm_layer(dim, **block_norm, **kw),
                    **dd,
                )
                for j in range(depths[i])]
            downsample = OverlapPatchEmbed(
                embed_dims[i - 1], embed_dims[i], kernel_size=3, stride=2, channels_last_input=True,
                **dd) if i > 0 else nn.Identity()
            stages.append(TransNeXtStage(
                downsample,
                blocks,
                norm_layer(embed_dims[i], **block_norm, **dd),
                trained_size=trained,
                trained_pool_size=trained_pool,
                pretrain_size=(pretrain_size[0] // reduction, pretrain_size[1] // reduction),
                window_size=window_size[i],
                sr_ratio=sr_ratios[i],
                fixed_pool_size=fixed_pool_size if sr_ratios[i] > 1 else None,
                is_extrapolation=is_extrapolation,
                device=device,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        # every stage ends with its own norm: the last stage's output is already normalised
        self.norm = nn.Identity()
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt=self.output_fmt, **dd)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module):
        # the official init (PVT v2's); the attention's own parameters keep the init they were built with
        super()._init_weights(m)
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def init_non_persistent_buffers(self) -> None:
        for stage in self.stages:
            stage.init_non_persistent_buffers()


# official key -> ours; applied in order, each to the result of the previous one
_OFFICIAL_KEY_RULES = (
    (r'^patch_embed1\.', 'stem.'),
    (r'^patch_embed(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.downsample.'),
    (r'^block(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.'),
    (r'^norm(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.norm.'),
    (r'\.mlp\.dwconv\.dwconv\.', '.mlp.dwconv.'),
    (r'^head\.', 'head.fc.'),
)
# non-persistent in the official model too, but some files may carry them: rebuilt, never loaded
_OFFICIAL_BUFFERS = re.compile(r'(^|\.)(relative_pos_index\d|relative_coords_table\d|seq_length_scale|padding_mask)$')


def _convert_official_key(key: str) -> str:
    return rename_by_every_rule(key, _OFFICIAL_KEY_RULES)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: TransNeXt) -> Dict[str, torch.Tensor]:
    """Converts an official TransNeXt checkpoint (or one of ours) to this model's keys.

    Accepts a plain state dict or one wrapped as the official files may be (``{'model': ...}``; see
    :func:`~attnzoo.backbones._checkpoint.unwrap_checkpoint`). The CPB index / coordinate buffers are
    rebuilt by the model for its own size, never loaded. Classifier keys may differ (timm drops or
    re-creates the head when num_classes changes); any other mismatch raises a ValueError naming the keys.
    """
    return convert_checkpoint(
        state_dict, model, _convert_official_key, rebuilt=_OFFICIAL_BUFFERS,
        hint='(after converting official TransNeXt names) is it a checkpoint of this variant (depths, widths, '
             'window sizes)?')


def _create_transnext(variant: str, pretrained: bool = False, trained_at: int = 224, **kwargs) -> TransNeXt:
    if pretrained:
        # the weights' CPB coordinates are scaled for the size they were trained at (``trained_at``), whatever
        # img_size the model is built for (as the official dense-task configs pass pretrain_size=224)
        kwargs.setdefault('pretrain_size', trained_at)
    return build_pyramid(TransNeXt, variant, pretrained, **kwargs)


def _cfg(hub_id: str = '', **kwargs) -> Dict:
    return pyramid_cfg(dict(
        hf_hub_id=f'DaiShiResearch/{hub_id}' if hub_id else '',
        hf_hub_filename=f'{hub_id.replace("-", "_")}.pth' if hub_id else '',
        # official evaluation: resize to 256 and crop 224 (crop_pct 224 / 256), bicubic
        first_conv='stem.proj', license='apache-2.0', origin_url='https://github.com/DaiShiResearch/TransNeXt',
        paper_ids='arXiv:2311.17132',
        paper_name='TransNeXt: Robust Foveal Visual Perception for Vision Transformers'), **kwargs)


default_cfgs = generate_default_cfgs({
    'transnext_micro.in1k': _cfg('transnext-micro-224-1k'),
    'transnext_tiny.in1k': _cfg('transnext-tiny-224-1k'),
    'transnext_small.in1k': _cfg('transnext-small-224-1k'),
    'transnext_base.in1k': _cfg('transnext-base-224-1k'),
    # the official evaluation at 384 warps the whole image to 384 x 384 (classification/datasets.py:
    # "Warping ... (no cropping)"): timm's squash mode, not a short-side resize and crop
    'transnext_small_384.in1k_ft_in1k': _cfg(
        'transnext-small-384-1k-ft-1k', input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0,
        crop_mode='squash'),
    'transnext_base_384.in1k_ft_in1k': _cfg(
        'transnext-base-384-1k-ft-1k', input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0,
        crop_mode='squash'),
    'transnext_micro_aaaa_256.in1k': _cfg(
        'transnext-micro-AAAA-256-1k', input_size=(3, 256, 256), pool_size=(8, 8)),
})

_MICRO = dict(embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2))
_TINY = dict(embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(2, 2, 15, 2))
_SMALL = dict(embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(5, 5, 22, 5))
_BASE = dict(embed_dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32), depths=(5, 5, 23, 5))
# fine-tuned at 384 from the 224 models: CPB coordinates keep the 224 scale
_AT_384 = dict(img_size=384, pretrain_size=224)


@register_model
def transnext_micro(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create_transnext('transnext_micro', pretrained=pretrained, **dict(_MICRO, **kwargs))


@register_model
def transnext_tiny(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create_transnext('transnext_tiny', pretrained=pretrained, **dict(_TINY, **kwargs))


@register_model
def transnext_small(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create_transnext('transnext_small', pretrained=pretrained, **dict(_SMALL, **kwargs))


@register_model
def transnext_base(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create_transnext('transnext_base', pretrained=pretrained, **dict(_BASE, **kwargs))


@register_model
def transnext_small_384(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create_transnext('transnext_small_384', pretrained=pretrained, **dict(dict(_SMALL, **_AT_384), **kwargs))


@register_model
def transnext_base_384(pretrained: bool = False, **kwargs) -> TransNeXt:
    return _create_transnext('transnext_base_384', pretrained=pretrained, **dict(dict(_BASE, **_AT_384), **kwargs))


@register_model
def transnext_micro_aaaa_256(pretrained: bool = False, **kwargs) -> TransNeXt:
    # aggregated attention in all four stages ("A-A-A-A"), trained at 256
    model_args = dict(_MICRO, img_size=256, window_size=(3, 3, 3, 3), sr_ratios=(16, 8, 4, 2))
    return _create_transnext(
        'transnext_micro_aaaa_256', pretrained=pretrained, trained_at=256, **dict(model_args, **kwargs))
