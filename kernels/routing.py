"""Bi-level routing attention (BiFormer's BRA core), heads-last, on a region grid.

The map ``[H, W]`` is split into ``regions = (p_h, p_w)`` regions of ``H / p_h x W / p_w`` tokens,
numbered row-major (``ry * p_w + rx``); inside a region tokens are row-major too. Every query of
region ``r`` attends, in one softmax, to all tokens of the ``topk`` regions
``region_index[b, r, :]`` (shared by all heads). A region listed twice counts twice, as in
BiFormer's gather formulation. No gradient flows into ``region_index``: BiFormer routes on
detached region descriptors (:func:`routing_region_index`).

Two implementations of one signature:

- :func:`routing_attention_reference`: BiFormer's own formulation (``ops/bra_legacy.py``: gather
  ``topk`` copies of the routed key/value regions, then dense attention per region), the CPU path
  and the ground truth of the tests;
- the fused Triton kernels (``_routing_triton.py``), which read the routed regions in place.

BiFormer pads the input *before* its qkv projection, so padded tokens are ordinary tokens here:
the caller pads the map to a multiple of the grid, and nothing is masked.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ._dispatch import resolve_backend
from ._validation import check_qkv, check_tensor, int_pair, softmax_scale

OP_NAME = 'routing_attention'
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 128


@dataclass(frozen=True)
class RoutingSpec:
    """The region grid of one call and its softmax scale."""
    regions: Tuple[int, int]       # (p_h, p_w): regions per column and per row of the map
    region_size: Tuple[int, int]   # tokens per region along rows and columns
    topk: int
    scale: float

    @property
    def n_regions(self):
        return self.regions[0] * self.regions[1]


def _region_grid(op_name, regions, height, width):
    """``regions`` as ``(p_h, p_w)``, checked against the map size."""
    p_h, p_w = int_pair(op_name, regions, 'regions', '(p_h, p_w): regions per column and per row of the map')
    if height % p_h or width % p_w:
        raise ValueError(f'{op_name}: the map {height}x{width} does not split into {p_h}x{p_w} regions; pad it to '
                         f'a multiple of the region grid first (BiFormer pads before its qkv projection)')
    return p_h, p_w


def _check_index_values(region_index, n_regions):
    message = (f'{OP_NAME}: region_index holds a region outside [0, {n_regions}); regions are numbered '
               f'row-major, ry * p_w + rx')
    in_range = ((region_index >= 0) & (region_index < n_regions)).all()
    if region_index.is_cuda:
        torch._assert_async(in_range, message)   # no host sync in the forward pass
    elif not bool(in_range):
        raise ValueError(message)


def validate(q, k, v, region_index, regions, scale=None) -> RoutingSpec:
    """Checks the arguments of :func:`routing_attention` and returns the call's geometry."""
    check_qkv(OP_NAME, q, k, v)
    batch, height, width, _, head_dim = q.shape
    p_h, p_w = _region_grid(OP_NAME, regions, height, width)
    n_regions = p_h * p_w

    check_tensor(OP_NAME, 'region_index', region_index, q)
    if region_index.dtype not in INDEX_DTYPES:
        raise TypeError(f'{OP_NAME}: region_index must be int32 or int64, got {region_index.dtype}')
    if region_index.dim() != 3 or region_index.shape[:2] != (batch, n_regions):
        raise ValueError(f'{OP_NAME}: region_index must be [B, p_h * p_w, topk] = [{batch}, {n_regions}, topk], '
                         f'got {tuple(region_index.shape)}')
    topk = region_index.shape[2]
    if not 1 <= topk <= n_regions:
        raise ValueError(f'{OP_NAME}: topk = {topk} routed regions per query region, but the grid has '
                         f'{n_regions} regions; use 1 <= topk <= {n_regions}')
    _check_index_values(region_index, n_regions)

    scale = softmax_scale(OP_NAME, scale, head_dim)
    return RoutingSpec((p_h, p_w), (height // p_h, width // p_w), topk, scale)


def _region_means(x, regions):
    """``[B, H, W, C]`` -> ``[B, p_h * p_w, C]``, the mean of every region (row-major)."""
    batch, height, width, channels = x.shape
    p_h, p_w = regions
    x = x.reshape(batch, p_h, height // p_h, p_w, width // p_w, channels)
    return x.mean((2, 4)).reshape(batch, p_h * p_w, channels)


def routing_region_index(q, k, regions, topk: int, scale: Optional[float] = None):
    """BiFormer's region-to-region routing (``TopkRouting`` with ``diff_routing=False``).

    Region descriptors are the means of the detached full-width queries and keys over each region;
    every query region routes to the ``topk`` key regions with the largest scaled dot product.
    Routing is shared by all heads, so it runs on all channels.

    Args:
        q, k: ``[B, H, W, C]`` (channels-last, the qkv projection's output) or heads-last
            ``[B, H, W, heads, D]`` (flattened to ``C = heads * D``); H, W multiples of the grid.
        regions: int or ``(p_h, p_w)``.
        topk: routed regions per query region, ``1 <= topk <= p_h * p_w``.
        scale: logit scale, ``C ** -0.5`` when None (BiFormer's ``qk_dim ** -0.5``); it only
            matters for ties and rounding, as in the official code.

    Returns:
        int64 ``[B, p_h * p_w, topk]`` region ids, largest logit first; no gradient.
    """
    name = 'routing_region_index'
    for label, tensor in (('q', q), ('k', k)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (4, 5):
            raise ValueError(f'{name}: {label} must be a [B, H, W, C] or [B, H, W, heads, D] tensor, got '
                             f'{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}')
    if q.shape != k.shape or q.device != k.device or q.dtype != k.dtype:
        raise ValueError(f'{name}: q ({tuple(q.shape)}, {q.dtype}, {q.device}) and k ({tuple(k.shape)}, {k.dtype}, '
                         f'{k.device}) must have one shape, dtype and device')
    q, k = q.detach().flatten(3), k.detach().flatten(3)
    regions = _region_grid(name, regions, q.shape[1], q.shape[2])
    n_regions = regions[0] * regions[1]
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= n_regions:
        raise ValueError(f'{name}: topk must be an int in [1, {n_regions}] (the number of regions), got {topk!r}')
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = (_region_means(q, regions) * scale) @ _region_means(k, regions).transpose(-2, -1)
    return torch.topk(logits, topk, dim=-1).indices


def _to_regions(x, spec):
    """``[B, H, W, heads, D]`` -> ``[B, n_regions, tokens, heads, D]`` (region-major copy)."""
    batch, _, _, heads, head_dim = x.shape
    (p_h, p_w), (region_h, region_w) = spec.regions, spec.region_size
    x = x.reshape(batch, p_h, region_h, p_w, region_w, heads, head_dim).permute(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(batch, p_h * p_w, region_h * region_w, heads, head_dim)


def _from_regions(x, spec):
    batch, _, _, heads, head_dim = x.shape
    (p_h, p_w), (region_h, region_w) = spec.regions, spec.region_size
    x = x.reshape(batch, p_h, p_w, region_h, region_w, heads, head_dim).permute(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(batch, p_h * region_h, p_w * region_w, heads, head_dim)


def routing_attention_reference(q, k, v, region_index, regions, scale=None):
    """Plain PyTorch routing attention, as BiFormer computes it: the CPU path and the ground truth.

    Gathers the ``topk`` routed regions of K and V for every query region (``KVGather``: a
    ``topk``-fold copy, and a backward through ``gather`` of an expanded tensor), then runs dense
    attention inside every query region.
    """
    spec = validate(q, k, v, region_index, regions, scale)
    batch, _, _, heads, head_dim = q.shape
    n_regions, tokens, topk = spec.n_regions, spec.region_size[0] * spec.region_size[1], spec.topk
    q_pix, k_pix, v_pix = (_to_regions(t, spec) for t in (q, k, v))
    index = region_index.long().view(batch, n_regions, topk, 1, 1, 1).expand(-1, -1, -1, tokens, heads, head_dim)

    def gather_routed(x):   # [B, n, T, heads, D] -> [B, n, topk * T, heads, D]
        every_region = x.unsqueeze(1).expand(-1, n_regions, -1, -1, -1, -1)
        return torch.gather(every_region, 2, index).reshape(batch, n_regions, topk * tokens, heads, head_dim)

    k_sel, v_sel = gather_routed(k_pix), gather_routed(v_pix)
    logits = torch.einsum('brqhd,brkhd->brhqk', q_pix * spec.scale, k_sel)
    probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(q.dtype)
    out = torch.einsum('brhqk,brkhd->brqhd', probs, v_sel)
    return _from_regions(out, spec)


class _RoutingAttention(torch.autograd.Function):
    """Fused Triton forward (online softmax over the routed regions) and backward."""

    @staticmethod
    def forward(ctx, q, k, v, region_index, spec):
        from . import _routing_triton as kernels   # triton is optional on CPU-only installs
        out, lse = kernels.forward(q, k, v, region_index, spec.regions, spec.scale)
        ctx.save_for_backward(q, k, v, out, lse, region_index)
        ctx.spec = spec
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        from . import _routing_triton as kernels
        q, k, v, out, lse, region_index = ctx.saved_tensors
        dq, dk, dv = kernels.backward(grad_out, q, k, v, out, lse, region_index, ctx.spec.regions, ctx.spec.scale)
        return dq, dk, dv, None, None


def routing_attention(q, k, v, region_index, regions, scale=None, backend: Optional[str] = None):
    """Bi-level routing attention: every query region attends to the tokens of its routed regions.

    Args:
        q, k, v: ``[B, H, W, heads, head_dim]`` (strided views accepted), one dtype (float32,
            float16, bfloat16; float64 on the reference only); H and W multiples of the grid.
        region_index: int32 / int64 ``[B, p_h * p_w, topk]``: the key regions of every query region
            (row-major ids ``ry * p_w + rx``), shared by all heads; e.g. from
            :func:`routing_region_index`. Not differentiated.
        regions: int or ``(p_h, p_w)``: the region grid (BiFormer's ``n_win``); regions may be
            any size, square or not.
        scale: logit scale, ``head_dim ** -0.5`` when None. BiFormer uses ``dim ** -0.5`` of the
            full width.
        backend: None (Triton on CUDA, reference on CPU), ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, H, W, heads, head_dim]`` in q's dtype.
    """
    spec = validate(q, k, v, region_index, regions, scale)
    backend = resolve_backend(OP_NAME, backend, q)
    if backend == 'reference':
        return routing_attention_reference(q, k, v, region_index, spec.regions, spec.scale)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f'{OP_NAME}: backend="triton" supports {[str(t) for t in KERNEL_DTYPES]}, got {q.dtype}; '
                        f'use backend="reference" for other dtypes')
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f'{OP_NAME}: backend="triton" supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}; '
                         f'use backend="reference"')
    index = region_index.to(torch.int32).contiguous()
    return _RoutingAttention.apply(q, k, v, index, spec)
