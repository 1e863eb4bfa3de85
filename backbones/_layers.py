"""Building blocks that more than one attnzoo family uses alike.

A family file never imports another family's file: what two families share lives here (their own
blocks stay in their files). Maps are channels-last ``[B, H, W, C]`` unless a name or docstring says NCHW.
"""
from typing import Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from timm.models import register_notrace_function

__all__ = ['DepthwiseConvNhwc', 'ConvStem', 'pad_to_multiple']


@torch.fx.wrap
@register_notrace_function  # reason: the padding depends on the map size, which FX's proxies do not have
def pad_to_multiple(x: torch.Tensor, multiple: Tuple[int, int], channels_last: bool = True) -> torch.Tensor:
    """Zero-pads a map at the bottom / right so its height and width are multiples of ``multiple``
    (rows, columns); NHWC, or NCHW without ``channels_last``. The caller crops the padding away."""
    height, width = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    pad_h, pad_w = (-height) % multiple[0], (-width) % multiple[1]
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h) if channels_last else (0, pad_w, 0, pad_h))


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
