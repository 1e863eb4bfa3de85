"""Routing attention on CPU: routed regions read whole, or one dense masked attention.

The reference (BiFormer's ``KVGather``) gathers the routed regions from a tensor expanded over
every query region, so its backward scatters into ``[B, n, n, tokens, heads, D]`` before summing:
most of its time. Two paths here, chosen per call by :func:`prefers_dense`:

- *gathered* (few routed regions, the usual case): Q, K and V are laid out region-major with the
  heads outside (``[B * heads * n, tokens, D]``, one copy each); every query region's routed
  regions are taken with one ``index_select`` of whole regions, and each query region attends to
  them in PyTorch's fused CPU flash attention (forward and backward; measured 15-30% faster than
  batched matmuls and a softmax). The backward adds the routed regions' gradients back with one
  ``index_add`` of whole regions;
- *dense* (routed regions a large share of the grid, e.g. BiFormer's third stage: 16 of 49
  regions of 2x2 tokens): attention over the whole map by PyTorch's fused CPU flash attention
  with an additive mask built from the routing: ``log(count)`` for a
  region listed ``count`` times (it enters the softmax that many times, as gathering it that
  many times does), ``-inf`` for regions not listed. The mask is ``[B, HW, HW]``.

The op's kernels interface (as the Triton kernels'): :func:`forward` returns the output and the
base-2 log-sum-exp of every query, :func:`backward` the gradients of q, k and v.
"""
import functools

import torch

LOG2E = 1.4426950408889634   # the op's lse is base 2 (the fused kernels' exp2 domain)


def prefers_dense(n_regions, heads, topk):
    """The dense path when its ``[HW, HW]`` mask is no larger than ``heads * HW * topk * tokens`` (a
    ``head_dim``-th of the gathered path's copies of K), so memory stays below the reference's. That is
    also where it is faster (forward + backward, CPU ms, one thread, batch 8, 7x7 regions, head_dim 32):

    ==========================  ========  =====
    map, heads, topk            gathered  dense
    ==========================  ========  =====
    28x28, 4, 4 (BiFormer s2)   68        148
    14x14, 8, 16 (BiFormer s3)  139       24
    14x14, 8, 8                 89        30
    28x28, 4, 16                333       204
    ==========================  ========  =====
    """
    return n_regions <= heads * topk


# ----------------------------------------------------------------------------- gathered


def _region_major(x, regions):
    """``[B, H, W, heads, C]`` -> ``[B * heads * n, tokens, C]`` (a copy): heads outside, regions row-major."""
    batch, height, width, heads, channels = x.shape
    p_h, p_w = regions
    x = x.view(batch, p_h, height // p_h, p_w, width // p_w, heads, channels).permute(0, 5, 1, 3, 2, 4, 6)
    return x.reshape(batch * heads * p_h * p_w, (height // p_h) * (width // p_w), channels)


def _from_region_major(x, shape, regions):
    """Inverse of :func:`_region_major`, contiguous ``[B, H, W, heads, C]``."""
    batch, height, width, heads, channels = shape
    p_h, p_w = regions
    x = x.view(batch, heads, p_h, p_w, height // p_h, width // p_w, channels).permute(0, 2, 4, 3, 5, 1, 6)
    return x.reshape(shape).contiguous()   # a view when regions are single tokens


def _flash_forward(q, k, v, scale, mask=None):
    """PyTorch's fused CPU flash attention on ``[batch, heads, L, D]``: output and natural-log lse."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)


def _flash_backward(grad_out, q, k, v, out, lse, scale, mask=None):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)


class _Routed:
    """The gathered problem of one call: every query region (``[B * heads * n, 1, tokens, D]``, one
    attention head each) and its routed keys and values back to back (``[.., 1, topk * tokens, D]``)."""

    def __init__(self, q, k, v, region_index, regions):
        batch, _, _, heads, _ = q.shape
        self.regions, self.shape = regions, q.shape
        # routed region j of query region r for batch b and head h, on the [B * heads * n] region axis
        offsets = torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1) * regions[0] * regions[1]
        self.routed = (region_index.long()[:, None] + offsets).flatten()
        self.queries = _region_major(q, regions).unsqueeze(1)
        self.keys, self.values = self._gather(k), self._gather(v)

    def _gather(self, x):
        x = _region_major(x, self.regions)
        return x.index_select(0, self.routed).view(x.shape[0], 1, -1, x.shape[2])

    def to_regions(self, x):
        """``[B, H, W, heads, C]`` -> ``[B * heads * n, 1, tokens, C]``."""
        return _region_major(x, self.regions).unsqueeze(1)

    def from_regions(self, x):
        return _from_region_major(x.squeeze(1), self.shape[:4] + x.shape[-1:], self.regions)

    def scatter(self, grad):
        """Adjoint of the gather: ``[B * heads * n, 1, topk * tokens, D]`` -> ``[B, H, W, heads, D]``."""
        tokens, head_dim = self.queries.shape[2:]
        regions = grad.new_zeros(self.queries.shape[0], tokens, head_dim)
        regions.index_add_(0, self.routed, grad.reshape(-1, tokens, head_dim))
        return _from_region_major(regions, self.shape, self.regions)


def _gathered_forward(q, k, v, region_index, regions, scale):
    routed = _Routed(q, k, v, region_index, regions)
    out, lse = _flash_forward(routed.queries, routed.keys, routed.values, scale)
    return routed.from_regions(out), routed.from_regions(lse.unsqueeze(-1))[..., 0].permute(0, 3, 1, 2)


def _gathered_backward(grad_out, q, k, v, out, lse, region_index, regions, scale):
    routed = _Routed(q, k, v, region_index, regions)
    if q.dtype == torch.float64:   # the op's lse is float32: recompute it at full precision
        _, lse = _flash_forward(routed.queries, routed.keys, routed.values, scale)
    else:
        lse = routed.to_regions((lse / LOG2E).permute(0, 2, 3, 1).unsqueeze(-1)).squeeze(-1)
    dq, dk, dv = _flash_backward(routed.to_regions(grad_out), routed.queries, routed.keys, routed.values,
                                 routed.to_regions(out), lse, scale)
    return routed.from_regions(dq), routed.scatter(dk), routed.scatter(dv)


# ----------------------------------------------------------------------------- dense


def _routing_mask(region_index, regions, height, width, dtype):
    """``[B, 1, HW, HW]`` additive mask: ``log(count)`` of the key's region in the query region's list."""
    batch, n_regions, _ = region_index.shape
    p_h, p_w = regions
    device = region_index.device
    counts = torch.zeros(batch, n_regions, n_regions, device=device, dtype=torch.promote_types(dtype, torch.float32))
    counts.scatter_add_(2, region_index.long(), counts.new_ones(region_index.shape))
    region_of_token = ((torch.arange(height, device=device) // (height // p_h))[:, None] * p_w
                       + torch.arange(width, device=device) // (width // p_w)).flatten()
    return counts.log()[:, region_of_token][:, :, region_of_token].unsqueeze(1).to(dtype)


def _sequences(*tensors):
    """``[B, H, W, heads, D]`` -> ``[B, heads, HW, D]`` views (the fused kernel reads strides)."""
    return [t.flatten(1, 2).transpose(1, 2) for t in tensors]


def _dense_forward(q, k, v, region_index, regions, scale):
    batch, height, width, heads, head_dim = q.shape
    mask = _routing_mask(region_index, regions, height, width, q.dtype)
    out, lse = _flash_forward(*_sequences(q, k, v), scale, mask)
    return out.transpose(1, 2).reshape(q.shape), lse.view(batch, heads, height, width)


def _dense_backward(grad_out, q, k, v, out, lse, region_index, regions, scale):
    _, height, width, _, _ = q.shape
    mask = _routing_mask(region_index, regions, height, width, q.dtype)
    if q.dtype == torch.float64:   # the op's lse is float32: recompute it at full precision
        _, lse = _dense_forward(q, k, v, region_index, regions, scale)
    else:
        lse = lse / LOG2E
    grads = _flash_backward(*_sequences(grad_out, q, k, v, out), lse.flatten(2).contiguous(), scale, mask)
    return tuple(g.transpose(1, 2).reshape(q.shape).contiguous() for g in grads)


# ----------------------------------------------------------------------------- kernels interface


def _is_dense(q, region_index, regions, dense):
    return prefers_dense(regions[0] * regions[1], q.shape[3], region_index.shape[-1]) if dense is None else dense


def _nonfinite_images(*tensors):
    """``[B]`` bool: the images with a non-finite value in one of ``tensors`` (``[B, ...]``); None when all
    are finite. Such images take the reference's computation: the dense path scores every key of the map,
    so a non-finite key or value of a region that is not routed would reach the query (NaN - inf is NaN;
    0 * NaN in P @ V), and the fused flash kernels treat an infinite logit otherwise than the reference's
    softmax. A sum is cheap next to the attention."""
    sums = sum(t.sum(tuple(range(1, t.dim())), dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors)
    faulty = ~torch.isfinite(sums)
    return faulty if bool(faulty.any()) else None


def _reference_kernels():
    from .routing import _ReferenceKernels   # the op's module imports this one
    return _ReferenceKernels


@torch.no_grad()
def forward(q, k, v, region_index, regions, scale, dense=None):
    """Output ``[B, H, W, heads, D]`` and base-2 log-sum-exp ``[B, heads, H, W]`` (float32) of checked
    arguments (``regions`` a pair, ``scale`` a float). ``dense``: force a path (None: :func:`prefers_dense`).
    Images with a non-finite key or value take the reference's computation (:func:`_nonfinite_images`)."""
    faulty = _nonfinite_images(k, v)
    if faulty is not None:
        out, lse = q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[3]) + q.shape[1:3], dtype=torch.float32)
        for images, kernels_forward in ((~faulty, functools.partial(forward, dense=dense)),
                                        (faulty, _reference_kernels().forward)):
            if images.any():
                out[images], lse[images] = kernels_forward(q[images], k[images], v[images], region_index[images],
                                                           regions, scale)
        return out, lse
    dense = _is_dense(q, region_index, regions, dense)
    out, lse = (_dense_forward if dense else _gathered_forward)(q, k, v, region_index, regions, scale)
    return out.contiguous(), (lse * LOG2E).float().contiguous()


@torch.no_grad()
def backward(grad_out, q, k, v, out, lse, region_index, regions, scale, dense=None):
    """``(dq, dk, dv)``, contiguous, from the forward's output and log-sum-exp (images with a non-finite query,
    key, value or output gradient: the reference's backward, as in :func:`forward`)."""
    grad_out = grad_out.to(q.dtype)
    faulty = _nonfinite_images(q, k, v, grad_out)
    if faulty is not None:
        grads = [torch.empty_like(q) for _ in range(3)]
        for images, kernels_backward in ((~faulty, functools.partial(backward, dense=dense)),
                                         (faulty, _reference_kernels().backward)):
            if images.any():
                part = kernels_backward(grad_out[images], q[images], k[images], v[images], out[images], lse[images],
                                        region_index[images], regions, scale)
                for grad, image_grad in zip(grads, part):
                    grad[images] = image_grad
        return tuple(grads)
    if _is_dense(q, region_index, regions, dense):
        return _dense_backward(grad_out, q, k, v, out, lse, region_index, regions, scale)
    return _gathered_backward(grad_out, q, k, v, out, lse, region_index, regions, scale)
