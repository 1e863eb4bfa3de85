"""Routing attention on CPU: routed regions read whole, or one dense masked attention.

The reference (BiFormer's ``KVGather``) gathers the routed regions from a tensor expanded over
every query region, so its backward scatters into ``[B, n, n, tokens, heads, D]`` before summing:
most of its time. Two paths here, chosen per call by :func:`prefers_dense`:

- *gathered* (few routed regions, the usual case): Q, K and V are laid out region-major with the
  heads outside (``[B * heads * n, tokens, D]``, one copy each); every query region's routed
  regions are taken with one ``index_select`` of whole regions, then a batched matmul, softmax,
  matmul per query region. The backward recomputes the probabilities the same way and adds the
  routed regions' gradients back with one ``index_add`` of whole regions;
- *dense* (routed regions a large share of the grid, e.g. BiFormer's third stage: 16 of 49
  regions of 2x2 tokens): attention over the whole map by PyTorch's fused CPU flash attention
  (forward and backward) with an additive mask built from the routing: ``log(count)`` for a
  region listed ``count`` times (it enters the softmax that many times, as gathering it that
  many times does), ``-inf`` for regions not listed. The mask is ``[B, HW, HW]``.

The op's kernels interface (as the Triton kernels'): :func:`forward` returns the output and the
base-2 log-sum-exp of every query, :func:`backward` the gradients of q, k and v.
"""
import torch

LOG2E = 1.4426950408889634   # the op's lse is base 2 (the fused kernels' exp2 domain)


def prefers_dense(n_regions, heads, topk):
    """The dense path when its ``[HW, HW]`` mask is no larger than the gathered path's logits
    (``heads * HW * topk * tokens``), so memory stays below the reference's; measured faster there
    too (the CPU section of tools/benchmark.py)."""
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


class _Routed:
    """The gathered problem of one call: scaled region-major queries, every query region's routed keys
    and values back to back (``[B * heads * n, topk * tokens, D]``) and the softmax over them."""

    def __init__(self, q, k, v, region_index, regions, scale):
        batch, _, _, heads, head_dim = q.shape
        self.regions, n_regions, topk = regions, regions[0] * regions[1], region_index.shape[-1]
        # routed region j of query region r for batch b and head h, on the [B * heads * n] region axis
        offsets = torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1) * n_regions
        self.routed = (region_index.long()[:, None] + offsets).flatten()
        self.queries = _region_major(q, regions) * scale
        self.keys, self.values = self._gather(k), self._gather(v)
        logits = torch.bmm(self.queries, self.keys.transpose(1, 2))
        self.probs = logits.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32))
        self.logits = logits

    def _gather(self, x):
        x = _region_major(x, self.regions)
        return x.index_select(0, self.routed).view(x.shape[0], -1, x.shape[2])

    def scatter(self, grad, shape):
        """Adjoint of the gather: ``[B * heads * n, topk * tokens, D]`` -> ``[B, H, W, heads, D]``."""
        tokens = self.queries.shape[1]
        regions = grad.new_zeros(self.queries.shape)
        regions.index_add_(0, self.routed, grad.view(-1, tokens, grad.shape[-1]))
        return _from_region_major(regions, shape, self.regions)


def _gathered_forward(q, k, v, region_index, regions, scale):
    routed = _Routed(q, k, v, region_index, regions, scale)
    out = torch.bmm(routed.probs.to(q.dtype), routed.values)
    # log-sum-exp read off the largest probability (no second pass of exp)
    lse = routed.logits.amax(-1, keepdim=True).to(routed.probs.dtype) - routed.probs.amax(-1, keepdim=True).log()
    batch, height, width, heads, _ = q.shape
    lse = _from_region_major(lse, (batch, height, width, heads, 1), regions)[..., 0].permute(0, 3, 1, 2)
    return _from_region_major(out, q.shape, regions), lse


def _gathered_backward(grad_out, q, k, v, out, region_index, regions, scale):
    routed = _Routed(q, k, v, region_index, regions, scale)
    probs = routed.probs
    grad_regions = _region_major(grad_out, regions)                                        # [B * heads * n, T, D]
    delta = _region_major((grad_out.to(probs.dtype) * out.to(probs.dtype)).sum(-1, keepdim=True), regions)
    grad_logits = torch.bmm(grad_regions, routed.values.transpose(1, 2)).to(probs.dtype).sub_(delta).mul_(probs)
    probs, grad_logits = probs.to(q.dtype), grad_logits.to(q.dtype)
    dq = _from_region_major(torch.bmm(grad_logits, routed.keys).mul_(scale), q.shape, regions)
    dk = routed.scatter(torch.bmm(grad_logits.transpose(1, 2), routed.queries), q.shape)
    dv = routed.scatter(torch.bmm(probs.transpose(1, 2), grad_regions), q.shape)
    return dq, dk, dv


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
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*_sequences(q, k, v), 0.0, False,
                                                                          attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(q.shape), lse.view(batch, heads, height, width)


def _dense_backward(grad_out, q, k, v, out, lse, region_index, regions, scale):
    _, height, width, _, _ = q.shape
    mask = _routing_mask(region_index, regions, height, width, q.dtype)
    if q.dtype == torch.float64:   # the op's lse is float32: recompute it at full precision
        _, lse = _dense_forward(q, k, v, region_index, regions, scale)
    else:
        lse = lse / LOG2E
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *_sequences(grad_out, q, k, v, out), lse.flatten(2).contiguous(), 0.0, False, attn_mask=mask, scale=scale)
    return tuple(g.transpose(1, 2).reshape(q.shape).contiguous() for g in grads)


# ----------------------------------------------------------------------------- kernels interface


def _is_dense(q, region_index, regions, dense):
    return prefers_dense(regions[0] * regions[1], q.shape[3], region_index.shape[-1]) if dense is None else dense


@torch.no_grad()
def forward(q, k, v, region_index, regions, scale, dense=None):
    """Output ``[B, H, W, heads, D]`` and base-2 log-sum-exp ``[B, heads, H, W]`` (float32) of checked
    arguments (``regions`` a pair, ``scale`` a float). ``dense``: force a path (None: :func:`prefers_dense`)."""
    dense = _is_dense(q, region_index, regions, dense)
    out, lse = (_dense_forward if dense else _gathered_forward)(q, k, v, region_index, regions, scale)
    return out.contiguous(), (lse * LOG2E).float().contiguous()


@torch.no_grad()
def backward(grad_out, q, k, v, out, lse, region_index, regions, scale, dense=None):
    """``(dq, dk, dv)``, contiguous, from the forward's output (and, on the dense path, its log-sum-exp)."""
    grad_out = grad_out.to(q.dtype)
    if _is_dense(q, region_index, regions, dense):
        return _dense_backward(grad_out, q, k, v, out, lse, region_index, regions, scale)
    return _gathered_backward(grad_out, q, k, v, out, region_index, regions, scale)
