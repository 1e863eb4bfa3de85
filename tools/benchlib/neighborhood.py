"""Benchmark cases of neighborhood_attention_2d, like for like.

Every case fixes one problem (shape, window, dilation, border, with or without rpb and extra tokens)
and times every implementation that computes exactly that problem:

- ``attnzoo-triton``: the fused kernels, v1; ``attnzoo-triton-v2``: the banded v2 kernels (``na_kernels``
  picks which of the two run; the backward runs the forward's version);
- ``natten``: ``natten.na2d`` (cases without rpb and with the clamped border only: NATTEN >= 0.20
  has no rpb), where NATTEN's CUDA library is installed;
- ``flex-tiled``: FlexAttention (compiled on CUDA) on tokens permuted into 8 x 8 spatial tiles, one
  64-token sparse block per tile, so a window touches few blocks; the permutation and its inverse
  are part of its time (as NATTEN's token permutation is part of NATTEN's). The baseline;
- ``flex-raster``: the same mask on raster-order tokens and 128-token blocks (what a direct port
  gets: a 2-D window touches many partial blocks);
- ``reference``: the PyTorch reference (the quick CPU smoke cases only; it gathers every window).

The rpb, where a case has one, is added by every implementation (a FlexAttention ``score_mod``).

Shapes: NAT-Tiny stages 1-3 at 224 px (batch 128, head dim 32) with kernels 7, 9 and 13, dilation 2
(DiNAT), DiNAT-L's 11 x 11 window at 384 px (batch 32), and TransNeXt-Tiny stages 1-3 (zero border,
3 x 3 window, 49 pooled tokens as extra keys, rpb). Then TransNeXt's whole aggregated attention (pool
bias and window weight too) against its official native sequence, calls and models
(``benchlib/transnext.py``; FlexAttention cannot add the window weight, so it has no row there).
"""
from dataclasses import dataclass
from functools import partial
from typing import List

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attnzoo.kernels import neighborhood_attention_2d, use_na_kernel
from attnzoo.kernels.neighborhood import axis_neighbors

from . import transnext
from .harness import KernelCase

SECTION = 'neighborhood'
# every case compiles flex_attention for its own mask and score mods, in grad and no-grad mode
FLEX_RECOMPILES = 64
TILE = 8                # flex-tiled: 8 x 8 token tiles, one 64-token sparse block each
RASTER_BLOCK = 128      # flex-raster: FlexAttention's default sparse block
NA_KERNELS = ('v1', 'v2')
FUSED = 'attnzoo-triton'
FUSED_NAMES = {'v1': FUSED, 'v2': f'{FUSED}-v2'}


@dataclass(frozen=True)
class NeighborhoodShape:
    name: str
    batch: int
    height: int
    width: int
    heads: int
    head_dim: int
    kernel: int
    dilation: int = 1
    border: str = 'clamp'
    rpb: bool = False
    n_extra: int = 0


def _axis_tables(length, kernel, dilation, border, device):
    """[query, key] tables of one axis: key in window, and the key's relative-position-bias index."""
    keys, valid, bias_index = axis_neighbors(length, kernel, dilation, border, device)
    allowed = torch.zeros(length, length, dtype=torch.bool, device=device)
    rel = torch.zeros(length, length, dtype=torch.long, device=device)
    rows = torch.arange(length, device=device)[:, None].expand_as(keys)
    allowed[rows[valid], keys[valid]] = True
    rel[rows[valid], keys[valid]] = bias_index[valid]
    return allowed, rel


class TokenOrder:
    """Where token ``(y, x)`` of the map sits in FlexAttention's sequence, and back.

    ``tile=None``: raster order. ``tile=t``: the map padded to multiples of ``t`` and cut into
    ``t x t`` tiles, tile after tile (raster order inside a tile); padded positions are tokens that
    no query attends to. ``coords(idx)`` gives (y, x, inside the map) of sequence positions.
    """

    def __init__(self, height, width, tile, device):
        self.height, self.width, self.tile = height, width, tile
        if tile is None:
            self.length = height * width
            self.gather = None
            return
        self.tiles_y, self.tiles_x = -(-height // tile), -(-width // tile)
        self.length = self.tiles_y * self.tiles_x * tile * tile
        y, x, inside = self.coords(torch.arange(self.length, device=device))
        # sequence position -> map token (padding reads the extra zero row appended by to_sequence)
        self.gather = torch.where(inside, y.clamp(max=height - 1) * width + x.clamp(max=width - 1), height * width)
        self.scatter = torch.nonzero(inside).flatten()   # map token t sits at position scatter[t]
        order = torch.argsort(self.gather[self.scatter])
        self.scatter = self.scatter[order]

    def coords(self, idx):
        if self.tile is None:
            return idx // self.width, idx % self.width, idx < self.length
        tile, within = idx // (self.tile * self.tile), idx % (self.tile * self.tile)
        y = (tile // self.tiles_x) * self.tile + within // self.tile
        x = (tile % self.tiles_x) * self.tile + within % self.tile
        return y, x, (y < self.height) & (x < self.width)

    def to_sequence(self, t):
        """``[B, H, W, heads, D]`` -> ``[B, heads, length, D]``."""
        t = t.flatten(1, 2)
        if self.gather is not None:
            t = F.pad(t, (0, 0, 0, 0, 0, 1))[:, self.gather]
        return t.transpose(1, 2)

    def from_sequence(self, t):
        t = t.transpose(1, 2)
        if self.gather is not None:
            t = t[:, self.scatter]
        return t.unflatten(1, (self.height, self.width))


class FlexNeighborhood:
    """FlexAttention with the window as a mask_mod and the rpb as a score_mod, extra tokens appended
    to the keys, in raster or tiled token order. Block mask and compiled function are built once per
    device."""

    def __init__(self, shape: NeighborhoodShape, tile):
        self.shape, self.tile = shape, tile
        self.built = {}

    def _build(self, device):
        s = self.shape
        order = TokenOrder(s.height, s.width, self.tile, device)
        rows, rel_rows = _axis_tables(s.height, s.kernel, s.dilation, s.border, device)
        cols, rel_cols = _axis_tables(s.width, s.kernel, s.dilation, s.border, device)
        length = order.length

        def key_coords(kv_idx):
            is_token = kv_idx < length
            ky, kx, inside = order.coords(torch.where(is_token, kv_idx, 0))
            return is_token, inside, ky.clamp(max=s.height - 1), kx.clamp(max=s.width - 1)

        def mask_mod(b, h, q_idx, kv_idx):
            qy, qx, _ = order.coords(q_idx)
            qy, qx = qy.clamp(max=s.height - 1), qx.clamp(max=s.width - 1)
            is_token, inside, ky, kx = key_coords(kv_idx)
            return ~is_token | (inside & rows[qy, ky] & cols[qx, kx])

        def bias_mod(rpb, score, b, h, q_idx, kv_idx):
            qy, qx, _ = order.coords(q_idx)
            qy, qx = qy.clamp(max=s.height - 1), qx.clamp(max=s.width - 1)
            is_token, _, ky, kx = key_coords(kv_idx)
            bias = rpb[h, rel_rows[qy, ky], rel_cols[qx, kx]]
            return score + torch.where(is_token, bias, 0.0)

        block = self.tile * self.tile if self.tile else RASTER_BLOCK
        block_mask = create_block_mask(mask_mod, None, None, length, length + s.n_extra, device=device,
                                       BLOCK_SIZE=block)
        options = None
        if device.type == 'cuda':
            # the compiled kernel's tiles must match the 64-token blocks of the tiled order
            fn = torch.compile(flex_attention, dynamic=False)
            options = {'BLOCK_M': block, 'BLOCK_N': block} if self.tile else None
        else:
            fn = flex_attention   # CPU smoke runs take the eager (dense) path
        return order, block_mask, bias_mod, fn, options

    def __call__(self, q, k, v, rpb=None, extra_k=None, extra_v=None):
        if q.device not in self.built:
            self.built[q.device] = self._build(q.device)
        order, block_mask, bias_mod, fn, options = self.built[q.device]
        if q.device.type == 'cpu' and not torch.is_grad_enabled():
            # FlexAttention refuses CPU inputs that require grad even under no_grad
            q, k, v, extra_k, extra_v = (t.detach() if t is not None else None for t in (q, k, v, extra_k, extra_v))
        k, v = order.to_sequence(k), order.to_sequence(v)
        if extra_k is not None:
            k = torch.cat([k, extra_k.transpose(1, 2)], dim=2)
            v = torch.cat([v, extra_v.transpose(1, 2)], dim=2)
        out = fn(order.to_sequence(q), k, v, score_mod=partial(bias_mod, rpb) if rpb is not None else None,
                 block_mask=block_mask, kernel_options=options)
        return order.from_sequence(out)


def natten_available():
    try:
        import natten
    except ImportError:
        return False
    return bool(natten.HAS_LIBNATTEN)


def make_inputs(s: NeighborhoodShape):
    def make(device, dtype):
        def leaf(*shape, dtype=dtype):
            return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
        qkv_shape = (s.batch, s.height, s.width, s.heads, s.head_dim)
        inputs = dict(q=leaf(*qkv_shape), k=leaf(*qkv_shape), v=leaf(*qkv_shape))
        if s.rpb:
            inputs['rpb'] = leaf(s.heads, 2 * s.kernel - 1, 2 * s.kernel - 1, dtype=torch.float32)
        if s.n_extra:
            inputs.update(extra_k=leaf(s.batch, s.n_extra, s.heads, s.head_dim),
                          extra_v=leaf(s.batch, s.n_extra, s.heads, s.head_dim))
        return inputs
    return make


def _min_bytes(inputs):
    """Every input read once, the output (q's shape and dtype) written once."""
    q = inputs['q']
    return sum(t.numel() * t.element_size() for t in inputs.values()) + q.numel() * q.element_size()


def kernel_case(s: NeighborhoodShape, natten: bool, with_reference: bool):
    options = dict(kernel_size=s.kernel, dilation=s.dilation, border=s.border)
    impls = {FUSED: partial(neighborhood_attention_2d, **options, backend='triton'),
             'flex-tiled': FlexNeighborhood(s, TILE),
             'flex-raster': FlexNeighborhood(s, None)}
    if natten and not s.rpb and s.border == 'clamp':
        impls['natten'] = partial(neighborhood_attention_2d, **options, backend='natten')
    if with_reference:
        impls['reference'] = partial(neighborhood_attention_2d, **options, backend='reference')
    return KernelCase(SECTION, s.name, make_inputs(s), impls, 'flex-tiled', _min_bytes)


def shapes(quick: bool) -> List[NeighborhoodShape]:
    if quick:
        return [NeighborhoodShape('nat 14x14 h1 d32 k7 b1', 1, 14, 14, 1, 32, 7),
                NeighborhoodShape('nat 14x14 h1 d32 k5 dil2 +rpb b1', 1, 14, 14, 1, 32, 5, dilation=2, rpb=True),
                NeighborhoodShape('transnext 9x9 h1 d24 k3 +4 b1', 1, 9, 9, 1, 24, 3, border='zero', rpb=True,
                                  n_extra=4)]
    # NAT-Tiny at 224 px, batch 128: stages 1-3 are 56, 28, 14 px with 2, 4, 8 heads of 32
    nat_stages = ((1, 56, 2), (2, 28, 4), (3, 14, 8))
    cases = [NeighborhoodShape(f'nat_tiny s{stage} {size}x{size} h{heads} d32 k7 b128', 128, size, size, heads, 32, 7)
             for stage, size, heads in nat_stages]
    cases += [NeighborhoodShape(f'nat_tiny s{stage} {size}x{size} h{heads} d32 k{kernel} b128', 128, size, size,
                                heads, 32, kernel)
              for kernel in (9, 13) for stage, size, heads in nat_stages[:2]]
    cases += [NeighborhoodShape(f'dinat_tiny s{stage} {size}x{size} h{heads} d32 k7 dil2 b128', 128, size, size,
                                heads, 32, 7, dilation=2)
              for stage, size, heads in nat_stages[:2]]
    cases += [NeighborhoodShape(f'nat_tiny s1 56x56 h2 d32 k{kernel} +rpb b128', 128, 56, 56, 2, 32, kernel, rpb=True)
              for kernel in (7, 13)]
    # DiNAT-L at 384 px with 11x11 windows: stage 1 is 96 px with 6 heads of 32
    cases.append(NeighborhoodShape('dinat_large_384_11x11 s1 96x96 h6 d32 k11 b32', 32, 96, 96, 6, 32, 11))
    # TransNeXt-Tiny at 224 px: 3x3 zero-padded window, 49 pooled tokens, heads of 24, batch 128
    cases += [NeighborhoodShape(f'transnext_tiny s{stage} {size}x{size} h{heads} d24 k3 +49 b128', 128, size, size,
                                heads, 24, 3, border='zero', rpb=True, n_extra=49)
              for stage, size, heads in ((1, 56, 3), (2, 28, 6), (3, 14, 12))]
    return cases


class _OnNaKernel:
    """The fused op on one version of the Triton kernels (its backward follows the forward's version)."""

    def __init__(self, version, fn):
        self.version, self.fn = version, fn

    def __call__(self, **inputs):
        with use_na_kernel(self.version):
            return self.fn(**inputs)


def _per_na_kernel(case: KernelCase, na_kernels) -> KernelCase:
    """The case with its fused implementation once per kernel version in ``na_kernels``."""
    fused = case.impls.pop(FUSED, None)
    if fused is not None:
        case.impls = {**{FUSED_NAMES[v]: _OnNaKernel(v, fused) for v in na_kernels}, **case.impls}
    return case


def cases(quick: bool, na_kernels=NA_KERNELS):
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILES)
    natten = natten_available()
    return [_per_na_kernel(case, na_kernels)
            for case in [kernel_case(s, natten, with_reference=quick) for s in shapes(quick)]
            + transnext.kernel_cases(quick)]
