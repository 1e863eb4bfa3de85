"""Bi-level routing attention (BiFormer's BRA core), heads-last, on a region grid.

The map ``[H, W]`` is split into ``regions = (p_h, p_w)`` regions of ``H / p_h x W / p_w`` tokens,
numbered row-major (``ry * p_w + rx``); inside a region tokens are row-major too. Every query of
region ``r`` attends, in one softmax, to all tokens of the ``topk`` regions
``region_index[b, r, :]`` (shared by all heads). A region listed twice counts twice, as in
BiFormer's gather formulation. No gradient flows into ``region_index``: BiFormer routes on
detached region descriptors (:func:`routing_region_index`).

Three implementations of one signature:

- :func:`routing_attention_reference`: BiFormer's own formulation (``ops/bra_legacy.py``: gather
  ``topk`` copies of the routed key/value regions, then dense attention per region), the ground
  truth of the tests;
- the fused Triton kernels (``_routing_triton.py``), which read the routed regions in place;
- the CPU kernels (``_routing_cpu.py``): whole routed regions gathered once, or dense masked
  flash attention where the routed regions are most of the map.

BiFormer pads the input *before* its qkv projection, so padded tokens are ordinary tokens here:
the caller pads the map to a multiple of the grid, and nothing is masked.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from timm.layers import register_notrace_function

from . import _routing_cpu
from ._dispatch import LIBRARY, device_backend, register_autocast, requested_backend
from ._validation import check_qkv, check_tensor, check_type, int_pair, softmax_scale

OP_NAME = 'routing_attention'
LOG2E = 1.4426950408889634
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


def check_index_values(region_index, n_regions):
    """Every routed region id lies in ``[0, n_regions)``: a ValueError on CPU, a device-side assert
    where reading the answer back would be a host sync (CUDA) or impossible (while compiling)."""
    message = (f'{OP_NAME}: region_index holds a region outside [0, {n_regions}); regions are numbered '
               f'row-major, ry * p_w + rx')
    in_range = ((region_index >= 0) & (region_index < n_regions)).all()
    if (region_index.device.type != 'cpu' or torch.compiler.is_compiling()
            or torch._subclasses.fake_tensor.is_fake(region_index)):
        torch._assert_async(in_range, message)
    elif not bool(in_range):
        raise ValueError(message)


def validate(q, k, v, region_index, regions, scale=None) -> RoutingSpec:
    """Checks the arguments of :func:`routing_attention` and returns the call's geometry.

    Shapes, dtypes and devices only; the region ids themselves are checked by
    :func:`check_index_values` where the values are read.
    """
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
        raise ValueError(f'{OP_NAME}: region_index lists topk = {topk} routed regions per query region, but the grid '
                         f'has {n_regions} regions; use 1 <= topk <= {n_regions}')
    scale = softmax_scale(OP_NAME, scale, head_dim)
    return RoutingSpec((p_h, p_w), (height // p_h, width // p_w), topk, scale)


def _region_means(x, regions):
    """``[B, H, W, C]`` -> ``[B, p_h * p_w, C]``, the mean of every region (row-major)."""
    batch, height, width, channels = x.shape
    p_h, p_w = regions
    x = x.reshape(batch, p_h, height // p_h, p_w, width // p_w, channels)
    return x.mean((2, 4)).reshape(batch, p_h * p_w, channels)


def _region_index_op(q, k, regions, topk, scale=None):
    # the registered op: checks, then BiFormer's TopkRouting on detached full-width region means
    name = 'routing_region_index'
    for label, tensor in (('q', q), ('k', k)):
        if tensor.dim() not in (4, 5):
            raise ValueError(f'{name}: {label} must be a [B, H, W, C] or [B, H, W, heads, D] tensor, got '
                             f'{tuple(tensor.shape)}')
    if q.shape != k.shape or q.device != k.device or q.dtype != k.dtype:
        raise ValueError(f'{name}: q ({tuple(q.shape)}, {q.dtype}, {q.device}) and k ({tuple(k.shape)}, {k.dtype}, '
                         f'{k.device}) must have one shape, dtype and device')
    q, k = q.detach().flatten(3), k.detach().flatten(3)
    regions = _region_grid(name, regions, q.shape[1], q.shape[2])
    n_regions = regions[0] * regions[1]
    if not 1 <= topk <= n_regions:
        raise ValueError(f'{name}: topk must be an int in [1, {n_regions}] (the number of regions), got {topk!r}')
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = (_region_means(q, regions) * scale) @ _region_means(k, regions).transpose(-2, -1)
    return torch.topk(logits, topk, dim=-1).indices


LIBRARY.define('routing_region_index(Tensor q, Tensor k, int[2] regions, int topk, float? scale=None) -> Tensor')
LIBRARY.impl('routing_region_index', _region_index_op, 'CompositeImplicitAutograd')


@register_notrace_function   # a leaf for timm's FX feature extraction
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

    The op is ``torch.ops.attnzoo.routing_region_index`` (same arguments, ``regions`` as a list), which
    TorchScript and ``torch.compile`` see as one op.
    """
    name = 'routing_region_index'
    for label, tensor in (('q', q), ('k', k)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f'{name}: {label} must be a [B, H, W, C] or [B, H, W, heads, D] tensor, got '
                             f'{type(tensor).__name__}')
    regions = int_pair(name, regions, 'regions', '(p_h, p_w): regions per column and per row of the map')
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise ValueError(f'{name}: topk must be an int (routed regions per query region), got {topk!r}')
    if scale is not None:
        scale = softmax_scale(name, scale, 1)
    return torch.ops.attnzoo.routing_region_index(q, k, regions, topk, scale)


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


def _attend(q, k, v, region_index, spec: RoutingSpec, with_lse=False):
    """The reference computation on checked arguments, as BiFormer computes it (``ops/bra_legacy.py``):
    gather the ``topk`` routed regions of K and V for every query region (``KVGather``: a
    ``topk``-fold copy), then dense attention inside every query region. With ``with_lse`` it also
    returns the base-2 log-sum-exp of every query's logits, ``[B, heads, H, W]`` float32."""
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
    out = _from_regions(torch.einsum('brhqk,brkhd->brqhd', probs, v_sel), spec)
    if not with_lse:
        return out
    lse = torch.logsumexp(logits.float(), dim=-1) * LOG2E                      # [B, n, heads, T]
    lse = _from_regions(lse.transpose(2, 3).unsqueeze(-1), spec)[..., 0]        # [B, H, W, heads]
    return out.contiguous(), lse.permute(0, 3, 1, 2).contiguous()


def routing_attention_reference(q, k, v, region_index, regions, scale=None):
    """Plain PyTorch routing attention, as BiFormer computes it: the ground truth of the tests (and
    what ``backend="reference"`` runs), differentiable to any order."""
    spec = validate(q, k, v, region_index, regions, scale)
    check_index_values(region_index, spec.n_regions)
    return _attend(q, k, v, region_index, spec)


def _spec(q, regions, topk, scale):
    p_h, p_w = regions
    return RoutingSpec((p_h, p_w), (q.shape[1] // p_h, q.shape[2] // p_w), topk, scale)


class _ReferenceKernels:
    """The op's forward / backward pair computed by the reference (the backward is its ``torch.func.vjp``).

    A kernels object (this class, or a module such as ``_routing_triton``) provides
    ``forward(q, k, v, region_index, regions, scale) -> (out, lse)`` and ``backward(grad_out, q, k, v,
    out, lse, region_index, regions, scale) -> (dq, dk, dv)``, outputs contiguous; ``region_index``
    arrives as contiguous int32 with checked values.
    """

    @staticmethod
    def forward(q, k, v, region_index, regions, scale):
        return _attend(q, k, v, region_index, _spec(q, regions, region_index.shape[-1], scale), with_lse=True)

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, region_index, regions, scale):
        spec = _spec(q, regions, region_index.shape[-1], scale)
        _, vjp = torch.func.vjp(lambda *qkv: _attend(*qkv, region_index, spec), q, k, v)
        return tuple(g.contiguous() for g in vjp(grad_out.to(q.dtype)))


def _cpu_kernels():
    """The kernels behind ``backend=None`` for CPU tensors (interface: :class:`_ReferenceKernels`):
    ``_routing_cpu``, which the tests hold to :class:`_ReferenceKernels` (the reference's own output, lse
    and gradients)."""
    return _routing_cpu


def _kernels(backend):
    if backend == 'triton':
        from . import _routing_triton   # triton is optional on CPU-only installs
        return _routing_triton
    return _cpu_kernels()


# ----------------------------------------------------------------------------- registered ops
#
# attnzoo::routing_attention            the public op (CompositeImplicitAutograd): checks the arguments,
#                                       picks the implementation, autocast rule
# attnzoo::routing_attention_forward    (out, lse) of the fused / CPU kernels; fake impl, autograd
# attnzoo::routing_attention_backward   (dq, dk, dv)


@torch.library.custom_op('attnzoo::routing_attention_forward', mutates_args=(), device_types=('cpu', 'cuda'))
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor, regions: List[int],
                scale: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output and base-2 log-sum-exp ``[B, heads, H, W]`` (float32) of checked arguments."""
    if q.shape[0] == 0:   # an empty batch: empty results, for every kernel (no launch)
        return _forward_fake(q, k, v, region_index, regions, scale, backend)
    check_index_values(region_index, regions[0] * regions[1])
    return _kernels(backend).forward(q, k, v, region_index.to(torch.int32).contiguous(), regions, scale)


@_forward_op.register_fake
def _forward_fake(q, k, v, region_index, regions, scale, backend):
    batch, height, width, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, height, width), dtype=torch.float32)


@torch.library.custom_op('attnzoo::routing_attention_backward', mutates_args=(), device_types=('cpu', 'cuda'))
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, region_index: torch.Tensor, regions: List[int], scale: float,
                 backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.shape[0] == 0:   # an empty batch: empty gradients, for every kernel (no launch)
        return _backward_fake(grad_out, q, k, v, out, lse, region_index, regions, scale, backend)
    return _kernels(backend).backward(grad_out, q, k, v, out, lse, region_index.to(torch.int32).contiguous(), regions,
                                      scale)


@_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, out, lse, region_index, regions, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _save_for_backward(ctx, inputs, output):
    q, k, v, region_index, regions, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, region_index)
    ctx.geometry = (regions, scale, backend)
    ctx.mark_non_differentiable(lse)


def _forward_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, region_index = ctx.saved_tensors
    regions, scale, backend = ctx.geometry
    dq, dk, dv = torch.ops.attnzoo.routing_attention_backward(grad_out, q, k, v, out, lse, region_index, regions,
                                                              scale, backend)
    return dq, dk, dv, None, None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(f'{OP_NAME}: gradients of gradients (double backward) are not implemented by the fused and '
                       f'CPU kernels; use backend="reference" (or attnzoo.kernels.use_backend("reference")), whose '
                       f'plain PyTorch ops differentiate to any order')


torch.library.register_autograd(_forward_op, _forward_backward, setup_context=_save_for_backward)
torch.library.register_autograd(_backward_op, _no_double_backward, setup_context=lambda ctx, inputs, output: None)

LIBRARY.define('routing_attention(Tensor q, Tensor k, Tensor v, Tensor region_index, int[2] regions, '
               'float? scale=None, str? backend=None) -> Tensor')


def _routing_op(q, k, v, region_index, regions, scale=None, backend=None):
    # the dispatcher leaves out trailing arguments equal to the schema's defaults
    spec = validate(q, k, v, region_index, regions, scale)
    backend = device_backend(OP_NAME, backend, q.device)
    if backend == 'reference':
        check_index_values(region_index, spec.n_regions)
        return _attend(q, k, v, region_index, spec)
    if backend == 'natten':
        raise ValueError(f'{OP_NAME}: NATTEN has no routing attention; use backend="triton" or "reference"')
    if backend == 'triton':
        if q.dtype not in KERNEL_DTYPES:
            raise TypeError(f'{OP_NAME}: backend="triton" supports {[str(t) for t in KERNEL_DTYPES]}, got '
                            f'{q.dtype}; use backend="reference" for other dtypes')
        if q.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f'{OP_NAME}: backend="triton" supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}; '
                             f'use backend="reference"')
    out, _ = torch.ops.attnzoo.routing_attention_forward(q, k, v, region_index, list(spec.regions), spec.scale,
                                                         backend)
    return out


LIBRARY.impl('routing_attention', _routing_op, 'CompositeImplicitAutograd')
register_autocast('routing_attention', cast=(0, 1, 2))


@register_notrace_function   # a leaf for timm's FX feature extraction
def routing_attention(q, k, v, region_index, regions, scale=None, backend: Optional[str] = None):
    """Bi-level routing attention: every query region attends to the tokens of its routed regions.

    Args:
        q, k, v: ``[B, H, W, heads, head_dim]`` (strided views accepted), one dtype (float32,
            float16, bfloat16; float64 off the Triton path); H and W multiples of the grid. Under
            ``torch.autocast`` they are cast to the autocast dtype.
        region_index: int32 / int64 ``[B, p_h * p_w, topk]``: the key regions of every query region
            (row-major ids ``ry * p_w + rx``), shared by all heads; e.g. from
            :func:`routing_region_index`. Not differentiated.
        regions: int or ``(p_h, p_w)``: the region grid (BiFormer's ``n_win``); regions may be
            any size, square or not.
        scale: logit scale, ``head_dim ** -0.5`` when None. BiFormer uses ``dim ** -0.5`` of the
            full width.
        backend: None (the process-wide default of :func:`attnzoo.kernels.use_backend`, else Triton
            on CUDA and the CPU kernels on CPU), ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, H, W, heads, head_dim]`` in q's dtype.

    The op is ``torch.ops.attnzoo.routing_attention`` (same arguments, ``regions`` as a list), which
    TorchScript and ``torch.compile`` see as one op.
    """
    for name, tensor in (('q', q), ('k', k), ('v', v), ('region_index', region_index)):
        check_type(OP_NAME, name, tensor)
    regions = int_pair(OP_NAME, regions, 'regions', '(p_h, p_w): regions per column and per row of the map')
    if scale is not None:
        scale = softmax_scale(OP_NAME, scale, 1)
    backend = requested_backend(OP_NAME, backend)
    return torch.ops.attnzoo.routing_attention(q, k, v, region_index, regions, scale, backend)
