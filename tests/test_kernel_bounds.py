"""What the Triton kernels read and how wide their offsets are, checked under the Triton interpreter.

- No masked-on load leaves the rpb table: the table is a view inside a buffer whose guard elements on both
  sides hold NaN, and every load the interpreter performs is checked against the guards (padding queries of
  partial tiles used to read before the table in the forward).
- ``h * s_h`` is 64-bit where ``WIDE``: the (image, head) helpers of both kernels' files, on a head stride
  whose product with the head overflows 32 bits.
"""
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from attnzoo.kernels import neighborhood_attention_2d
from attnzoo.kernels._neighborhood_triton import _image_and_head
from attnzoo.kernels._routing_triton import _resident_tokens

pytestmark = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1',
                                reason='counts the loads of the Triton interpreter')

GUARD = 256   # elements each side of the rpb table


class LoadCounter:
    """Counts the masked-on elements the interpreter loads from [start, end) byte ranges."""

    def __init__(self, monkeypatch, ranges):
        from triton.runtime import interpreter
        self.ranges, self.hits = ranges, 0
        original = interpreter.InterpreterBuilder.create_masked_load

        def counted(builder, ptrs, mask, *args):
            addresses = ptrs.data[mask.data.astype(bool)].astype(np.uint64)
            for start, end in self.ranges:
                self.hits += int(((addresses >= start) & (addresses < end)).sum())
            return original(builder, ptrs, mask, *args)

        monkeypatch.setattr(interpreter.InterpreterBuilder, 'create_masked_load', counted)


def guarded_rpb(heads, kernel, dtype=torch.float32):
    """An rpb table ``[heads, 2k - 1, 2k - 1]`` (random) as a view inside a NaN-filled buffer, and the byte
    ranges of the guards."""
    numel = heads * (2 * kernel - 1) ** 2
    buffer = torch.full((GUARD + numel + GUARD,), float('nan'), dtype=dtype)
    buffer[GUARD:GUARD + numel] = torch.randn(numel, generator=torch.Generator().manual_seed(1)).to(dtype)
    rpb = buffer[GUARD:GUARD + numel].view(heads, 2 * kernel - 1, 2 * kernel - 1)
    size = buffer.element_size()
    start = buffer.data_ptr()
    guards = [(start, start + GUARD * size), (start + (GUARD + numel) * size, start + (2 * GUARD + numel) * size)]
    return rpb, guards


@pytest.mark.parametrize('height, width, kernel, dilation', [(9, 11, 5, 1), (13, 10, 3, 2)])
def test_rpb_loads_stay_inside_the_table(monkeypatch, height, width, kernel, dilation):
    """Maps with partial tiles in both axes (the interpreter's tile is 16 x 8), fwd + bwd: no element of the
    guards is loaded, and output and gradients match the reference, NaN-free."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, height, width, 2, 16)
    q, k, v = (torch.randn(*shape, generator=gen).requires_grad_() for _ in range(3))
    rpb, guards = guarded_rpb(2, kernel)
    rpb.requires_grad_()
    options = dict(kernel_size=kernel, dilation=dilation, rpb=rpb)
    counter = LoadCounter(monkeypatch, guards)
    out = neighborhood_attention_2d(q, k, v, **options, backend='triton')
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v, rpb), grad_out)
    assert counter.hits == 0, f'{counter.hits} masked-on loads read the guards around the rpb table'
    expected = neighborhood_attention_2d(q, k, v, **options, backend='reference')
    expected_grads = torch.autograd.grad(expected, (q, k, v, rpb), grad_out)
    for name, got, want in zip(('out', 'dq', 'dk', 'dv', 'drpb'), (out, *grads), (expected, *expected_grads)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f'{name}: {m}')


HEAD_STRIDE = 2 ** 30 + 1    # passed as a 32-bit argument; head 2 and 3 times it overflow 32 bits
HEADS = 4


def _head_offsets(kernel, grid):
    out = torch.zeros(HEADS, dtype=torch.int64)
    kernel[grid](out, HEADS, HEAD_STRIDE, WIDE=True)
    return out.tolist()


@triton.jit
def neighborhood_head_offsets(out_ptr, heads, s_h, WIDE: tl.constexpr):
    _, h = _image_and_head(tl.program_id(0), heads, WIDE)
    tl.store(out_ptr + h, h * s_h)


@triton.jit
def routing_head_offsets(out_ptr, heads, s_h, WIDE: tl.constexpr):
    _, head, _, _, _, _ = _resident_tokens(1, 1, 4, 4, 16, WIDE)
    tl.store(out_ptr + head, head * s_h)


def test_neighborhood_head_offset_is_64_bit_when_wide():
    assert _head_offsets(neighborhood_head_offsets, (HEADS,)) == [h * HEAD_STRIDE for h in range(HEADS)]


def test_routing_head_offset_is_64_bit_when_wide():
    assert _head_offsets(routing_head_offsets, (1, HEADS, 1)) == [h * HEAD_STRIDE for h in range(HEADS)]
