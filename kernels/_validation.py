"""Argument checks shared by the attention ops; every message names the op and says what to do."""
import math

import torch


def check_type(op_name, name, value, optional=False):
    """``value`` is a tensor (or None, when ``optional``)."""
    if not isinstance(value, torch.Tensor) and not (optional and value is None):
        raise TypeError(f'{op_name}: {name} must be a torch.Tensor{" or None" if optional else ""}, got '
                        f'{type(value).__name__}')


def check_tensor(op_name, name, tensor, q):
    check_type(op_name, name, tensor)
    if tensor.device != q.device:
        raise ValueError(f'{op_name}: {name} is on {tensor.device} but q is on {q.device}; move all inputs '
                         f'to one device')


def check_qkv(op_name, q, k, v):
    """q, k, v: floating-point heads-last ``[B, H, W, heads, head_dim]`` tensors of one shape, dtype and device."""
    check_tensor(op_name, 'q', q, q)
    if q.dim() != 5:
        raise ValueError(f'{op_name}: q must be [B, H, W, heads, head_dim] (heads-last), got shape '
                         f'{tuple(q.shape)}')
    if not q.dtype.is_floating_point:
        raise TypeError(f'{op_name}: q must be a floating-point tensor, got {q.dtype}')
    for name, tensor in (('k', k), ('v', v)):
        check_tensor(op_name, name, tensor, q)
        if tensor.shape != q.shape:
            raise ValueError(f'{op_name}: {name} has shape {tuple(tensor.shape)} but q has {tuple(q.shape)}; '
                             f'q, k and v must have the same [B, H, W, heads, head_dim] shape')
        if tensor.dtype != q.dtype:
            raise TypeError(f'{op_name}: {name} is {tensor.dtype} but q is {q.dtype}; cast q, k, v to one dtype')


def int_pair(op_name, value, name, meaning='(rows, columns)'):
    """An int or a pair of ints >= 1, as a tuple of two."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f'{op_name}: {name} must be an int or a pair of ints {meaning}, got {value!r}')
    if min(value) < 1:
        raise ValueError(f'{op_name}: {name} must be >= 1, got {tuple(value)}')
    return tuple(value)


def softmax_scale(op_name, scale, head_dim):
    """``scale`` as a finite float; None means ``head_dim ** -0.5``."""
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f'{op_name}: scale must be a float or None (head_dim ** -0.5), got {type(scale).__name__}')
    if not math.isfinite(scale):   # a NaN scale would make every logit NaN, masked or not
        raise ValueError(f'{op_name}: scale must be a finite float, got {scale}; pass None for head_dim ** -0.5')
    return float(scale)
