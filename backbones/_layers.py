"""Building blocks that more than one attnzoo family uses alike.

A family file never imports another family's file: what two families share lives here (their own
blocks stay in their files). Maps are channels-last ``[B, H, W, C]`` unless a name or docstring says NCHW.
"""
from typing import Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import trunc_normal_
from timm.models import register_notrace_function

from attnzoo.kernels import neighborhood_attention_2d
from attnzoo.kernels.neighborhood import axis_neighbors

__all__ = ['DepthwiseConvNhwc', 'ConvStem', 'ConvDownsample', 'NeighborhoodAttention', 'pad_to_multiple']


@torch.fx.wrap
@register_notrace_function  # reason: the padding depends on the map size, which FX's proxies do not have
def pad_to_multiple(x: torch.Tensor, multiple: Tuple[int, int], channels_last: bool = True) -> torch.Tensor:
    """Zero-pads a map at the bottom / right so its height and width are multiples of ``multiple``
    (rows, columns); NHWC, or NCHW without ``channels_last``. The caller crops the padding away."""
    height, width = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    pad_h, pad_w = (-height) % multiple[0], (-width) % multiple[1]
    # eager: x itself where nothing is padded (F.pad copies even then); a compiled graph pads for every size,
    # so that it holds no branch on the map size (in this order: no guard on a traced size)
    if not torch.compiler.is_compiling() and pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, [0, 0, 0, pad_w, 0, pad_h] if channels_last else [0, pad_w, 0, pad_h])


class DepthwiseConvNhwc(nn.Conv2d):
    """Depthwise ``kernel_size`` conv (stride 1, same padding, bias) on channels-last maps.

    A Conv2d subclass, so its parameters keep the official names (``lepe.weight``, ``dwconv.weight``) and
    a family's Conv2d initialisation reaches it. The permuted view is a channels_last NCHW tensor, which
    the conv keeps, so neither permute copies.
    """

    def __init__(self, dim: int, kernel_size: int, device=None, dtype=None):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x.permute(0, 3, 1, 2), self.weight, self.bias).permute(0, 2, 3, 1)


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convs (bias), each followed by a norm, GELU between them; NCHW image in, NHWC map
    out. The norms take NCHW maps (BiFormer's BatchNorm) or, with ``norm_channels_last``, NHWC maps
    (DAT++'s LayerNorm), and GELU runs in that layout too."""
    norm_channels_last: torch.jit.Final[bool]

    def __init__(self, in_chans: int, dim: int, norm_layer=nn.BatchNorm2d, norm_channels_last: bool = False,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm_channels_last = norm_channels_last
        self.conv1 = nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1, **dd)
        self.norm1 = norm_layer(dim // 2, **dd)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1, **dd)
        self.norm2 = norm_layer(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.norm_channels_last:
            x = self.act(self.norm1(x.permute(0, 2, 3, 1)))
            return self.norm2(self.conv2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        x = self.act(self.norm1(x))
        return self.norm2(self.conv2(x)).permute(0, 2, 3, 1)


# ---------------------------------------------------------------- NAT's neighborhood attention layer and
# downsampling, which DAT++'s neighborhood ('N') blocks and stages use too

# one leaf call in FX graphs, not traced into: the helper, whose TorchScript branch is the registered op (a
# scripted FX graph would otherwise compile the public function's Python checks)
torch.fx.wrap('neighborhood_attention')


@torch.fx.wrap
@register_notrace_function  # reason: the padding depends on the map size, which FX's proxies do not have
def pad_to_at_least(x: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-pads an NHWC map at the bottom / right to at least ``window`` rows and columns."""
    if torch.jit.is_scripting():   # TorchScript has no sym_max
        pad_h, pad_w = max(0, window - x.shape[1]), max(0, window - x.shape[2])
    else:
        # sym_max, not a Python branch on the size: an exported graph pads by a (possibly zero) symbolic amount,
        # so it holds for every map size, not only for those on the traced size's side of the window
        pad_h, pad_w = torch.sym_max(0, window - x.shape[1]), torch.sym_max(0, window - x.shape[2])
    if not torch.compiler.is_compiling() and pad_h == 0 and pad_w == 0:
        return x   # eager: x itself (F.pad copies even where it pads nothing)
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))


@torch.fx.wrap
@register_notrace_function  # reason: the crop depends on the map size, which FX's proxies do not have
def crop_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The top-left ``height`` x ``width`` of an NHWC map (what :func:`pad_to_at_least` padded), contiguous."""
    if torch.compiler.is_compiling():
        # a slice's contiguity depends on whether anything was padded, and a traced graph would hold a guard on it
        # (fake tensors evaluate it); the gathered rows and columns are contiguous whatever the size
        rows, cols = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
        return x.index_select(1, rows).index_select(2, cols)
    return x[:, :height, :width].contiguous()


def neighborhood_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rpb: torch.Tensor,
        kernel_size: int,
        dilation: int,
) -> torch.Tensor:
    """The attention call of :class:`NeighborhoodAttention`: the registered op under TorchScript (which
    cannot compile the public function's Python argument checks), the public function (one leaf call under
    FX) otherwise."""
    if torch.jit.is_scripting():
        return torch.ops.attnzoo.neighborhood_attention_2d(q, k, v, kernel_size, dilation, None, rpb)
    return neighborhood_attention_2d(q, k, v, kernel_size, dilation=dilation, rpb=rpb)


class ConvDownsample(nn.Module):
    """Stride-2 3x3 convolution without bias, then LayerNorm; NHWC in and out."""

    def __init__(self, in_dim: int, out_dim: int, norm_layer=nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False, **dd)
        self.norm = norm_layer(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NeighborhoodAttention(nn.Module):
    """2D (dilated) neighborhood attention with relative positional bias, NHWC in and out.

    A map smaller than ``kernel_size * dilation`` along an axis is zero-padded at the bottom / right
    before the qkv projection and cropped back after attention, as NATTEN's NeighborhoodAttention2D
    (< 0.17) did for the official checkpoints: the padded tokens take part in the attention of the
    real ones (their keys and values are the qkv bias).

    ``attn_drop`` drops attention probabilities in training, as that module's ``attn_drop`` (which
    DAT++'s official neighborhood blocks use): the op has no dropout, so a training step with
    ``attn_drop > 0`` computes the probabilities explicitly (:meth:`attend_with_dropout`); in eval, or
    with ``attn_drop=0``, the op runs.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'NeighborhoodAttention: dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1, **dd))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.rpb, std=.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = pad_to_at_least(x, self.kernel_size * self.dilation)
        # heads-last views of one qkv tensor: the op reads them without a permute copy
        q, k, v = self.qkv(x).view(B, x.shape[1], x.shape[2], 3, self.num_heads, self.head_dim).unbind(3)
        if self.training and self.attn_drop.p > 0.:
            x = self.attend_with_dropout(q, k, v)
        else:
            x = neighborhood_attention(q, k, v, self.rpb, self.kernel_size, self.dilation)
        x = crop_to(x.flatten(3), H, W)
        return self.proj_drop(self.proj(x))

    @torch.jit.unused
    def attend_with_dropout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The op's attention (clamped windows, rpb, ``head_dim ** -0.5`` scale) from explicit probabilities,
        ``attn_drop`` applied to them; ``[B, H, W, heads, head_dim]`` in and out."""
        rows, _, rows_bias = axis_neighbors(q.shape[1], self.kernel_size, self.dilation, 'clamp', q.device)
        cols, _, cols_bias = axis_neighbors(q.shape[2], self.kernel_size, self.dilation, 'clamp', q.device)
        window_rows, window_cols = rows[:, None, :, None], cols[None, :, None, :]  # [H, W, kernel, kernel]
        k_window = k[:, window_rows, window_cols].flatten(3, 4)  # [B, H, W, kernel * kernel, heads, head_dim]
        v_window = v[:, window_rows, window_cols].flatten(3, 4)
        logits = torch.einsum('byxhd,byxjhd->byxhj', q * self.head_dim ** -0.5, k_window)
        bias = self.rpb[:, rows_bias[:, None, :, None], cols_bias[None, :, None, :]]  # [heads, H, W, kernel, kernel]
        logits = logits + bias.permute(1, 2, 0, 3, 4).flatten(-2)
        probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(q.dtype)
        return torch.einsum('byxhj,byxjhd->byxhd', self.attn_drop(probs), v_window)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}'
