"""2-D neighborhood attention (NAT, DiNAT, TransNeXt's local window, HaloNet-style zero padding).

Every query attends to a ``kernel_size`` window of keys around it (optionally dilated), plus an
optional set of global tokens shared by all queries, in one softmax. Tensors are heads-last,
``[B, H, W, heads, D]``, the layout a ``qkv`` Linear produces and NATTEN uses, so no permute copy
is needed; strided views are accepted.

Window rule per axis, for a query at position ``i`` of a map of length ``L`` with kernel ``k`` and
dilation ``d`` (NATTEN's rule): the axis splits into ``d`` interleaved groups (``i % d``); inside its
group the query sits at ``i' = i // d`` of ``L_g`` positions and sees the keys ``j'`` in
``[start, start + k)`` with ``start = i' - k // 2`` (so an even ``k = 2r`` sees ``r`` keys before and
``r - 1`` after), then

- ``border="clamp"`` (NATTEN): ``start`` is clamped into ``[0, L_g - k]``: the window shifts to
  stay inside the map and every query sees exactly ``k * k`` keys;
- ``border="zero"`` (TransNeXt, HaloNet): the window stays centred and keys outside the map are
  masked out, so border queries see fewer keys.

The relative position bias (NAT's ``rpb``, ``[heads, 2k - 1, 2k - 1]``) of a key is indexed by its
offset from the query in group coordinates, ``j' - i' + k - 1`` per axis (NATTEN < 0.20).

Implementations of one signature: :func:`neighborhood_attention_2d_reference` (a gather of every
query's window, the ground truth of the tests), the fused Triton kernels (the default on CUDA:
``_neighborhood_triton.py``, or the banded ``_neighborhood_triton_v2.py`` where
:func:`attnzoo.kernels.use_na_kernel` / ``ATTNZOO_NA_KERNEL`` pick ``"v2"``), the CPU kernels
(``_neighborhood_cpu.py``, the default on CPU: query tiles against the union of their windows, batched, no
per-query gather) and NATTEN (``backend="natten"``: clamp border, no rpb).

TransNeXt's aggregated attention adds two things: ``extra_bias``, a per-query bias on the logits of the
extra tokens (its pooled-key position bias), and ``window_weight``, weights added to the window's
attention probabilities *after* the softmax (its learnable tokens): ``out += sum_j w_j v_j`` over the
window positions ``j`` (row-major in the ``kh x kw`` window, the order of ``nn.Unfold``) that lie inside
the map; out-of-map positions contribute nothing, as the zero-padded values of the official code.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from timm.layers import register_notrace_function
from torch.utils.flop_counter import register_flop_formula

from . import _neighborhood_cpu
from ._dispatch import LIBRARY, device_backend, get_na_kernel, register_autocast, requested_backend, use_na_kernel
from ._validation import check_qkv, check_tensor, check_type, int_pair, softmax_scale

OP_NAME = 'neighborhood_attention_2d'
LOG2E = 1.4426950408889634
BORDERS = ('clamp', 'zero')
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class NeighborhoodSpec:
    """The window geometry and softmax scale of one call, per axis (rows, columns)."""
    kernel_size: Tuple[int, int]
    dilation: Tuple[int, int]
    scale: float
    border: str


def validate(q, k, v, kernel_size, dilation=1, scale=None, rpb=None, border='clamp', extra_k=None,
             extra_v=None, extra_bias=None, window_weight=None) -> NeighborhoodSpec:
    """Checks the arguments of :func:`neighborhood_attention_2d` and returns the call's geometry."""
    check_qkv(OP_NAME, q, k, v)
    batch, height, width, heads, head_dim = q.shape
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f'{OP_NAME}: head_dim {head_dim} is not supported; it must be between '
                         f'{MIN_HEAD_DIM} and {MAX_HEAD_DIM}')
    kernel_size = int_pair(OP_NAME, kernel_size, 'kernel_size')
    dilation = int_pair(OP_NAME, dilation, 'dilation')
    for axis, size, kernel, dil in (('height', height, kernel_size[0], dilation[0]),
                                    ('width', width, kernel_size[1], dilation[1])):
        # a zero border masks what falls outside the map, so its window may be larger than the map; the border
        # is read first so that an exported graph (a symbolic map size) of a zero border holds no bound on it
        if border != 'zero' and kernel * dil > size:
            raise ValueError(f'{OP_NAME}: kernel_size * dilation = {kernel} * {dil} = {kernel * dil} is larger than '
                             f'the feature map {axis} {size}; pad the feature map or use a smaller kernel_size '
                             f'or dilation')
    if border not in BORDERS:
        raise ValueError(f'{OP_NAME}: border must be one of {BORDERS}, got {border!r}')
    scale = softmax_scale(OP_NAME, scale, head_dim)
    if rpb is not None:
        check_tensor(OP_NAME, 'rpb', rpb, q)
        expected = (heads, 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
        if tuple(rpb.shape) != expected:
            raise ValueError(f'{OP_NAME}: rpb must have shape [heads, 2 * kernel_h - 1, 2 * kernel_w - 1] = '
                             f'{list(expected)}, got {list(rpb.shape)}')
        if rpb.dtype not in (q.dtype, torch.float32):
            raise TypeError(f'{OP_NAME}: rpb must be float32 or the dtype of q ({q.dtype}), got {rpb.dtype}')
    if (extra_k is None) != (extra_v is None):
        raise ValueError(f'{OP_NAME}: extra_k and extra_v must be given together (global keys and their values)')
    if extra_k is not None:
        for name, tensor in (('extra_k', extra_k), ('extra_v', extra_v)):
            check_tensor(OP_NAME, name, tensor, q)
            if (tensor.dim() != 4 or tensor.shape[0] != batch or tensor.shape[2:] != (heads, head_dim)
                    or tensor.shape[1] < 1):
                raise ValueError(f'{OP_NAME}: {name} must be [B, L, heads, head_dim] = [{batch}, L, {heads}, '
                                 f'{head_dim}] with L >= 1, got {tuple(tensor.shape)}')
            if tensor.dtype != q.dtype:
                raise TypeError(f'{OP_NAME}: {name} is {tensor.dtype} but q is {q.dtype}; cast it to q\'s dtype')
        if extra_k.shape != extra_v.shape:
            raise ValueError(f'{OP_NAME}: extra_k {tuple(extra_k.shape)} and extra_v {tuple(extra_v.shape)} '
                             f'must have the same shape')
    if extra_bias is not None:
        if extra_k is None:
            raise ValueError(f'{OP_NAME}: extra_bias is a bias on the extra tokens; pass extra_k and extra_v too')
        check_tensor(OP_NAME, 'extra_bias', extra_bias, q)
        full = (batch, heads, height, width, extra_k.shape[1])
        if extra_bias.dim() != 5 or any(s not in (1, f) for s, f in zip(extra_bias.shape, full)) \
                or tuple(extra_bias.shape[2:]) != full[2:]:
            raise ValueError(f'{OP_NAME}: extra_bias must be [heads, H * W, L] or broadcastable [B, heads, H, W, L] = '
                             f'{list(full)} (B and heads may be 1), got {tuple(extra_bias.shape)}')
        if extra_bias.dtype not in (q.dtype, torch.float32):
            raise TypeError(f'{OP_NAME}: extra_bias must be float32 or the dtype of q ({q.dtype}), got '
                            f'{extra_bias.dtype}')
    if window_weight is not None:
        check_tensor(OP_NAME, 'window_weight', window_weight, q)
        expected = (batch, height, width, heads, kernel_size[0] * kernel_size[1])
        if tuple(window_weight.shape) != expected:
            raise ValueError(f'{OP_NAME}: window_weight must be [B, H, W, heads, kernel_h * kernel_w] = '
                             f'{list(expected)}, got {tuple(window_weight.shape)}')
        if window_weight.dtype not in (q.dtype, torch.float32):
            raise TypeError(f'{OP_NAME}: window_weight must be float32 or the dtype of q ({q.dtype}), got '
                            f'{window_weight.dtype}')
    return NeighborhoodSpec(kernel_size, dilation, scale, border)


def axis_neighbors(length, kernel_size, dilation, border, device=None):
    """The window of every query along one axis.

    Returns ``keys`` (``[length, kernel_size]`` key positions, clamped into the map), ``valid``
    (which of them are inside the map; all of them for ``border="clamp"``) and ``bias_index`` (the
    column of the relative position bias, ``j' - i' + kernel_size - 1``).
    """
    query = torch.arange(length, device=device)
    group, query_g = query % dilation, query // dilation
    group_length = (length - group + dilation - 1) // dilation
    start = query_g - kernel_size // 2
    if border == 'clamp':
        start = torch.minimum(start.clamp(min=0), group_length - kernel_size)
    keys_g = start[:, None] + torch.arange(kernel_size, device=device)
    valid = (keys_g >= 0) & (keys_g < group_length[:, None])
    keys_g_inside = torch.minimum(keys_g.clamp(min=0), group_length[:, None] - 1)
    keys = keys_g_inside * dilation + group[:, None]
    bias_index = keys_g - query_g[:, None] + kernel_size - 1
    return keys, valid, bias_index


def _attend(q, k, v, spec: NeighborhoodSpec, rpb=None, extra_k=None, extra_v=None, with_lse=False, extra_bias=None,
            window_weight=None):
    """The reference computation on checked arguments (``extra_bias`` 5-D).

    Gathers every query's window (``[B, H, W, kh, kw, heads, D]``, so memory grows with the window
    size), masks keys outside the map, and takes one softmax over the window and the extra tokens;
    then adds the window weights' values.
    With ``with_lse`` it also returns what the fused forward keeps for its backward: the base-2
    log-sum-exp of every query's logits, ``[B, heads, H, W]`` float32.
    """
    (kernel_h, kernel_w), (dilation_h, dilation_w) = spec.kernel_size, spec.dilation
    _, height, width, _, _ = q.shape
    rows, rows_valid, rows_bias = axis_neighbors(height, kernel_h, dilation_h, spec.border, q.device)
    cols, cols_valid, cols_bias = axis_neighbors(width, kernel_w, dilation_w, spec.border, q.device)

    window_rows, window_cols = rows[:, None, :, None], cols[None, :, None, :]          # -> [H, W, kh, kw]
    k_window = k[:, window_rows, window_cols]                                            # [B, H, W, kh, kw, heads, D]
    v_window = v[:, window_rows, window_cols]
    logits = torch.einsum('byxhd,byxijhd->byxhij', q * spec.scale, k_window)
    if rpb is not None:
        bias = rpb[:, rows_bias[:, None, :, None], cols_bias[None, :, None, :]]          # [heads, H, W, kh, kw]
        logits = logits + bias.permute(1, 2, 0, 3, 4)
    inside = rows_valid[:, None, :, None] & cols_valid[None, :, None, :]               # [H, W, kh, kw]
    logits = logits.masked_fill(~inside[:, :, None], float('-inf')).flatten(-2)
    if extra_k is not None:
        extra_logits = torch.einsum('byxhd,blhd->byxhl', q * spec.scale, extra_k)
        if extra_bias is not None:
            extra_logits = extra_logits + extra_bias.permute(0, 2, 3, 1, 4)
        logits = torch.cat([logits, extra_logits], dim=-1)

    probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(q.dtype)
    window_probs = probs[..., :kernel_h * kernel_w].unflatten(-1, (kernel_h, kernel_w))
    out = torch.einsum('byxhij,byxijhd->byxhd', window_probs, v_window)
    if extra_v is not None:
        out = out + torch.einsum('byxhl,blhd->byxhd', probs[..., kernel_h * kernel_w:], extra_v)
    if window_weight is not None:
        weight = window_weight.unflatten(-1, (kernel_h, kernel_w)) * inside[:, :, None]
        out = out + torch.einsum('byxhij,byxijhd->byxhd', weight.to(probs.dtype), v_window.to(probs.dtype)).to(q.dtype)
    if not with_lse:
        return out
    lse = torch.logsumexp(logits.float(), dim=-1).permute(0, 3, 1, 2) * LOG2E
    return out.contiguous(), lse.contiguous()


def neighborhood_attention_2d_reference(q, k, v, kernel_size, dilation=1, scale=None, rpb=None, border='clamp',
                                        extra_k=None, extra_v=None, extra_bias=None, window_weight=None):
    """Plain PyTorch neighborhood attention: the ground truth of the tests (and what
    ``backend="reference"`` runs), differentiable to any order."""
    extra_bias = _as_5d_extra_bias(extra_bias, q)
    spec = validate(q, k, v, kernel_size, dilation, scale, rpb, border, extra_k, extra_v, extra_bias, window_weight)
    return _attend(q, k, v, spec, rpb, extra_k, extra_v, extra_bias=extra_bias, window_weight=window_weight)


def _as_5d_extra_bias(extra_bias: Optional[torch.Tensor], q: torch.Tensor) -> Optional[torch.Tensor]:
    """``[heads, H * W, L]`` (TransNeXt's layout) as ``[1, heads, H, W, L]``; other layouts unchanged."""
    if extra_bias is not None and extra_bias.dim() == 3 and q.dim() == 5 and extra_bias.shape[1] == q.shape[1] * q.shape[2]:
        return extra_bias.unflatten(1, (q.shape[1], q.shape[2])).unsqueeze(0)
    return extra_bias


class _ReferenceKernels:
    """The op's forward / backward pair computed by the reference (the backward is its ``torch.func.vjp``).

    A kernels object (this class, or a module such as ``_neighborhood_triton``) provides
    ``forward(q, k, v, rpb, extra_k, extra_v, spec, extra_bias=None, window_weight=None) -> (out, lse)`` and
    ``backward(grad_out, q, k, v, rpb, extra_k, extra_v, out, lse, spec, needs_rpb_grad, needs_extra_grad,
    extra_bias=None, window_weight=None, needs_extra_bias_grad=False, needs_window_weight_grad=False) ->
    (dq, dk, dv, d_rpb, d_extra_k, d_extra_v, d_extra_bias, d_window_weight)`` (None where not asked for), all
    outputs contiguous; ``extra_bias`` is 5-D (``[B or 1, heads or 1, H, W, L]``) and its gradient has its shape.
    """

    @staticmethod
    def forward(q, k, v, rpb, extra_k, extra_v, spec, extra_bias=None, window_weight=None):
        return _attend(q, k, v, spec, rpb, extra_k, extra_v, with_lse=True, extra_bias=extra_bias,
                       window_weight=window_weight)

    @staticmethod
    def backward(grad_out, q, k, v, rpb, extra_k, extra_v, out, lse, spec, needs_rpb_grad, needs_extra_grad,
                 extra_bias=None, window_weight=None, needs_extra_bias_grad=False, needs_window_weight_grad=False):
        wanted = dict(q=q, k=k, v=v)
        if rpb is not None and needs_rpb_grad:
            wanted['rpb'] = rpb
        if extra_k is not None and needs_extra_grad:
            wanted.update(extra_k=extra_k, extra_v=extra_v)
        if extra_bias is not None and needs_extra_bias_grad:
            wanted['extra_bias'] = extra_bias
        if window_weight is not None and needs_window_weight_grad:
            wanted['window_weight'] = window_weight
        fixed = dict(rpb=rpb, extra_k=extra_k, extra_v=extra_v, extra_bias=extra_bias, window_weight=window_weight)

        def attend(*tensors):
            args = {**fixed, **dict(zip(wanted, tensors))}
            return _attend(args['q'], args['k'], args['v'], spec, args['rpb'], args['extra_k'], args['extra_v'],
                           extra_bias=args['extra_bias'], window_weight=args['window_weight'])

        _, vjp = torch.func.vjp(attend, *wanted.values())
        grads = dict(zip(wanted, (g.contiguous() for g in vjp(grad_out.to(q.dtype)))))
        return tuple(grads.get(name) for name in
                     ('q', 'k', 'v', 'rpb', 'extra_k', 'extra_v', 'extra_bias', 'window_weight'))


def _cpu_kernels():
    """The kernels behind ``backend=None`` for CPU tensors (interface: :class:`_ReferenceKernels`):
    ``_neighborhood_cpu``, which the tests hold to :class:`_ReferenceKernels` (the reference's own output, lse
    and gradients)."""
    return _neighborhood_cpu


def _kernels(backend):
    if backend == 'triton':   # triton is optional on CPU-only installs: imported here
        if get_na_kernel() == 'v2':
            from . import _neighborhood_triton_v2
            return _neighborhood_triton_v2
        from . import _neighborhood_triton
        return _neighborhood_triton
    return _cpu_kernels()


def _natten(q, k, v, spec, rpb, extra_k, extra_v, extra_bias=None, window_weight=None):
    try:
        import natten
    except ImportError as exc:
        raise RuntimeError(f'{OP_NAME}: backend="natten" needs NATTEN installed (pip install natten); use '
                           f'backend="triton" or "reference"') from exc
    if rpb is not None or spec.border != 'clamp' or extra_bias is not None or window_weight is not None:
        raise ValueError(f'{OP_NAME}: NATTEN >= 0.20 has no relative position bias, extra-token bias or window '
                         f'weight, and only the clamped border; use backend="triton" or "reference" for rpb, '
                         f'extra_bias, window_weight or border="zero"')
    if q.shape[0] == 0:   # natten.na2d fails on an empty batch; the reference is the same attention
        return _attend(q, k, v, spec, extra_k=extra_k, extra_v=extra_v)
    return natten.na2d(q, k, v, kernel_size=spec.kernel_size, dilation=spec.dilation, scale=spec.scale,
                       additional_keys=extra_k, additional_values=extra_v)


# ----------------------------------------------------------------------------- registered ops
#
# attnzoo::neighborhood_attention_2d            the public op (CompositeImplicitAutograd): checks the
#                                               arguments, picks the implementation, autocast rule
# attnzoo::neighborhood_attention_2d_forward    (out, lse) of the fused / CPU kernels; fake impl, autograd
# attnzoo::neighborhood_attention_2d_backward   [dq, dk, dv (, d_rpb) (, d_extra_k, d_extra_v)]


def _spec(kernel_size, dilation, scale, border):
    return NeighborhoodSpec(tuple(kernel_size), tuple(dilation), scale, border)


@torch.library.custom_op('attnzoo::neighborhood_attention_2d_forward', mutates_args=(), device_types=('cpu', 'cuda'))
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: List[int], dilation: List[int],
                scale: float, rpb: Optional[torch.Tensor], border: str, extra_k: Optional[torch.Tensor],
                extra_v: Optional[torch.Tensor], backend: str, extra_bias: Optional[torch.Tensor] = None,
                window_weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output and base-2 log-sum-exp ``[B, heads, H, W]`` (float32) of checked arguments."""
    if q.shape[0] == 0:   # an empty batch: empty results, for every kernel (no launch, no 0-element reshape)
        return _forward_fake(q, k, v, kernel_size, dilation, scale, rpb, border, extra_k, extra_v, backend)
    spec = _spec(kernel_size, dilation, scale, border)
    return _kernels(backend).forward(q, k, v, rpb, extra_k, extra_v, spec, extra_bias, window_weight)


@_forward_op.register_fake
def _forward_fake(q, k, v, kernel_size, dilation, scale, rpb, border, extra_k, extra_v, backend, extra_bias=None,
                  window_weight=None):
    batch, height, width, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, height, width), dtype=torch.float32)


@torch.library.custom_op('attnzoo::neighborhood_attention_2d_backward', mutates_args=(), device_types=('cpu', 'cuda'))
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, kernel_size: List[int], dilation: List[int], scale: float,
                 rpb: Optional[torch.Tensor], border: str, extra_k: Optional[torch.Tensor],
                 extra_v: Optional[torch.Tensor], backend: str, rpb_grad: bool, extra_grad: bool,
                 extra_bias: Optional[torch.Tensor] = None, window_weight: Optional[torch.Tensor] = None,
                 extra_bias_grad: bool = False, window_weight_grad: bool = False) -> List[torch.Tensor]:
    """``[dq, dk, dv]``, then ``d_rpb`` if ``rpb_grad``, ``d_extra_k, d_extra_v`` if ``extra_grad``,
    ``d_extra_bias`` if ``extra_bias_grad``, ``d_window_weight`` if ``window_weight_grad``."""
    if q.shape[0] == 0:   # an empty batch: empty gradients, zero for what every image shares (rpb, a shared bias)
        return [torch.zeros_like(t) for t in _backward_fake(
            grad_out, q, k, v, out, lse, kernel_size, dilation, scale, rpb, border, extra_k, extra_v, backend, rpb_grad,
            extra_grad, extra_bias, window_weight, extra_bias_grad, window_weight_grad)]
    spec = _spec(kernel_size, dilation, scale, border)
    dq, dk, dv, d_rpb, d_extra_k, d_extra_v, d_extra_bias, d_window_weight = _kernels(backend).backward(
        grad_out, q, k, v, rpb, extra_k, extra_v, out, lse, spec, rpb_grad, extra_grad, extra_bias, window_weight,
        extra_bias_grad, window_weight_grad)
    return ([dq, dk, dv] + ([d_rpb] if rpb_grad else []) + ([d_extra_k, d_extra_v] if extra_grad else [])
            + ([d_extra_bias] if extra_bias_grad else []) + ([d_window_weight] if window_weight_grad else []))


@_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, out, lse, kernel_size, dilation, scale, rpb, border, extra_k, extra_v, backend,
                   rpb_grad, extra_grad, extra_bias=None, window_weight=None, extra_bias_grad=False,
                   window_weight_grad=False):
    grads = [q.new_empty(q.shape) for _ in range(3)]
    if rpb_grad:
        grads.append(rpb.new_empty(rpb.shape))
    if extra_grad:
        grads += [extra_k.new_empty(extra_k.shape, dtype=q.dtype), extra_v.new_empty(extra_v.shape, dtype=q.dtype)]
    if extra_bias_grad:
        grads.append(extra_bias.new_empty(extra_bias.shape))
    if window_weight_grad:
        grads.append(window_weight.new_empty(window_weight.shape))
    return grads


def _save_for_backward(ctx, inputs, output):
    q, k, v, kernel_size, dilation, scale, rpb, border, extra_k, extra_v, backend, extra_bias, window_weight = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, extra_k, extra_v, out, lse, extra_bias, window_weight)
    ctx.geometry = (kernel_size, dilation, scale, border, backend)
    ctx.na_kernel = get_na_kernel()   # eager: the backward runs the forward's version of the Triton kernels
    ctx.mark_non_differentiable(lse)


def _forward_backward(ctx, grad_out, grad_lse):
    q, k, v, rpb, extra_k, extra_v, out, lse, extra_bias, window_weight = ctx.saved_tensors
    kernel_size, dilation, scale, border, backend = ctx.geometry
    rpb_grad = rpb is not None and ctx.needs_input_grad[6]
    extra_grad = extra_k is not None and (ctx.needs_input_grad[8] or ctx.needs_input_grad[9])
    extra_bias_grad = extra_bias is not None and ctx.needs_input_grad[11]
    window_weight_grad = window_weight is not None and ctx.needs_input_grad[12]
    with use_na_kernel(ctx.na_kernel):
        grads = torch.ops.attnzoo.neighborhood_attention_2d_backward(
            grad_out, q, k, v, out, lse, kernel_size, dilation, scale, rpb, border, extra_k, extra_v, backend,
            rpb_grad, extra_grad, extra_bias, window_weight, extra_bias_grad, window_weight_grad)
    grads = list(grads)
    dq, dk, dv = grads[:3]
    rest = grads[3:]
    d_rpb = rest.pop(0) if rpb_grad else None
    d_extra_k, d_extra_v = (rest.pop(0), rest.pop(0)) if extra_grad else (None, None)
    d_extra_bias = rest.pop(0) if extra_bias_grad else None
    d_window_weight = rest.pop(0) if window_weight_grad else None
    return dq, dk, dv, None, None, None, d_rpb, None, d_extra_k, d_extra_v, None, d_extra_bias, d_window_weight


def _no_double_backward(ctx, *grads):
    raise RuntimeError(f'{OP_NAME}: gradients of gradients (double backward) are not implemented by the fused and '
                       f'CPU kernels; use backend="reference" (or attnzoo.kernels.use_backend("reference")), whose '
                       f'plain PyTorch ops differentiate to any order')


torch.library.register_autograd(_forward_op, _forward_backward, setup_context=_save_for_backward)
torch.library.register_autograd(_backward_op, _no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _matmul_units(q_shape, kernel_size, extra_k_shape, window_weight_shape):
    """Multiply-adds of one ``[queries x keys] x head_dim`` product per key of the call, summed over the window
    (every ``kh * kw`` position, as the reference's gather computes them), the extra tokens and the window
    weight's keys: ``(window, extra, weighted window)`` MACs."""
    batch, height, width, heads, head_dim = q_shape
    per_key = batch * height * width * heads * head_dim
    window = per_key * kernel_size[0] * kernel_size[1]
    extra = per_key * extra_k_shape[1] if extra_k_shape is not None else 0
    return window, extra, window if window_weight_shape is not None else 0


@register_flop_formula(torch.ops.attnzoo.neighborhood_attention_2d_forward)
def _forward_flops(q_shape, k_shape, v_shape, kernel_size, dilation, scale, rpb_shape, border, extra_k_shape,
                   extra_v_shape, backend, extra_bias_shape=None, window_weight_shape=None, out_shape=None,
                   **kwargs) -> int:
    """FLOPs of the forward for ``torch.utils.flop_counter`` (2 per multiply-add): logits and weighted sum over
    the window and the extra tokens, and the window weight's sum; what the reference's products count."""
    window, extra, weighted = _matmul_units(q_shape, kernel_size, extra_k_shape, window_weight_shape)
    return 2 * (2 * window + 2 * extra + weighted)


@register_flop_formula(torch.ops.attnzoo.neighborhood_attention_2d_backward)
def _backward_flops(grad_out_shape, q_shape, k_shape, v_shape, saved_out_shape, lse_shape, kernel_size, dilation,
                    scale, rpb_shape, border, extra_k_shape, extra_v_shape, backend, rpb_grad, extra_grad,
                    extra_bias_shape=None, window_weight_shape=None, extra_bias_grad=False, window_weight_grad=False,
                    out_shape=None, **kwargs) -> int:
    """FLOPs of the backward: two products per forward product (the gradients of both its operands), as
    autograd of the reference counts them; the kernels' recomputation of the logits is not counted."""
    window, extra, weighted = _matmul_units(q_shape, kernel_size, extra_k_shape, window_weight_shape)
    return 2 * 2 * (2 * window + 2 * extra + weighted)

# extra_bias and window_weight come after backend: positional callers of the earlier schema keep working
LIBRARY.define(
    'neighborhood_attention_2d(Tensor q, Tensor k, Tensor v, int[2] kernel_size, int[2] dilation=1, '
    'float? scale=None, Tensor? rpb=None, str border="clamp", Tensor? extra_k=None, Tensor? extra_v=None, '
    'str? backend=None, Tensor? extra_bias=None, Tensor? window_weight=None) -> Tensor')


def _neighborhood_op(q, k, v, kernel_size, dilation=(1, 1), scale=None, rpb=None, border='clamp', extra_k=None,
                     extra_v=None, backend=None, extra_bias=None, window_weight=None):
    # the dispatcher leaves out trailing arguments equal to the schema's defaults
    extra_bias = _as_5d_extra_bias(extra_bias, q)
    spec = validate(q, k, v, kernel_size, dilation, scale, rpb, border, extra_k, extra_v, extra_bias, window_weight)
    backend = device_backend(OP_NAME, backend, q.device)
    if backend == 'reference':
        return _attend(q, k, v, spec, rpb, extra_k, extra_v, extra_bias=extra_bias, window_weight=window_weight)
    if backend == 'natten':
        return _natten(q, k, v, spec, rpb, extra_k, extra_v, extra_bias, window_weight)
    if backend == 'triton' and q.dtype not in KERNEL_DTYPES:
        raise TypeError(f'{OP_NAME}: backend="triton" supports {[str(t) for t in KERNEL_DTYPES]}, got {q.dtype}; '
                        f'use backend="reference" for other dtypes')
    out, _ = torch.ops.attnzoo.neighborhood_attention_2d_forward(
        q, k, v, list(spec.kernel_size), list(spec.dilation), spec.scale, rpb, border, extra_k, extra_v, backend,
        extra_bias, window_weight)
    return out


LIBRARY.impl('neighborhood_attention_2d', _neighborhood_op, 'CompositeImplicitAutograd')
register_autocast('neighborhood_attention_2d', cast=(0, 1, 2, 8, 9), keep_float32=(6, 11, 12))


@register_notrace_function   # a leaf for timm's FX feature extraction
def neighborhood_attention_2d(q, k, v, kernel_size, dilation=1, scale=None, rpb: Optional[torch.Tensor] = None,
                              border: str = 'clamp', extra_k: Optional[torch.Tensor] = None,
                              extra_v: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                              extra_bias: Optional[torch.Tensor] = None, window_weight: Optional[torch.Tensor] = None):
    """Neighborhood attention over a 2-D map, heads-last.

    Args:
        q, k, v: ``[B, H, W, heads, head_dim]`` (strided views accepted), one dtype (float32,
            float16, bfloat16; float64 off the Triton path), ``16 <= head_dim <= 128``. Under
            ``torch.autocast`` they are cast to the autocast dtype (rpb to float32).
        kernel_size: window size, int or ``(rows, cols)``; odd or even.
        dilation: int or ``(rows, cols)``; ``kernel_size * dilation`` must fit in the map with
            ``border="clamp"`` (a zero border masks what falls outside).
        scale: logit scale, ``head_dim ** -0.5`` when None.
        rpb: optional relative position bias ``[heads, 2 * kh - 1, 2 * kw - 1]`` (float32 or q's
            dtype) added to the window logits (NAT / DiNAT).
        border: ``"clamp"`` (NATTEN: shifted window, always ``kh * kw`` keys) or ``"zero"``
            (centred window, out-of-map keys masked).
        extra_k, extra_v: optional global tokens ``[B, L, heads, head_dim]`` every query also attends
            to, in the same softmax.
        extra_bias: optional bias on the extra tokens' logits, per query: ``[heads, H * W, L]`` or
            ``[B, heads, H, W, L]`` (B and heads may be 1); float32 or q's dtype; differentiable.
        window_weight: optional ``[B, H, W, heads, kh * kw]`` (float32 or q's dtype) added to the window's
            probabilities after the softmax: ``out += sum_j w_j v_j`` over the in-map window positions
            (row-major in the window); differentiable (into ``w`` and ``v``).
        backend: None (the process-wide default of :func:`attnzoo.kernels.use_backend`, else Triton
            on CUDA and the CPU kernels on CPU), ``"triton"``, ``"reference"`` or ``"natten"``
            (``natten.na2d``; clamp border, no rpb).

    Returns:
        ``[B, H, W, heads, head_dim]`` in q's dtype.

    The op is ``torch.ops.attnzoo.neighborhood_attention_2d`` (same arguments, ``kernel_size`` and
    ``dilation`` as lists), which TorchScript and ``torch.compile`` see as one op.
    """
    for name, tensor in (('q', q), ('k', k), ('v', v)):
        check_type(OP_NAME, name, tensor)
    for name, tensor in (('rpb', rpb), ('extra_k', extra_k), ('extra_v', extra_v), ('extra_bias', extra_bias),
                         ('window_weight', window_weight)):
        check_type(OP_NAME, name, tensor, optional=True)
    kernel_size = int_pair(OP_NAME, kernel_size, 'kernel_size')
    dilation = int_pair(OP_NAME, dilation, 'dilation')
    if scale is not None:
        scale = softmax_scale(OP_NAME, scale, 1)
    if border not in BORDERS:
        raise ValueError(f'{OP_NAME}: border must be one of {BORDERS}, got {border!r}')
    backend = requested_backend(OP_NAME, backend, allowed=('triton', 'reference', 'natten'))
    return torch.ops.attnzoo.neighborhood_attention_2d(q, k, v, kernel_size, dilation, scale, rpb, border, extra_k,
                                                       extra_v, backend, extra_bias, window_weight)
