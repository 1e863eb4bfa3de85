"""neighborhood_attention_2d: Triton kernels (interpreted on CPU) against the PyTorch reference, the
reference against independent definitions (dense masked softmax, NATTEN), and input validation."""
import os
import sys
from pathlib import Path

import pytest
import torch

from attnzoo.kernels import _neighborhood_cpu, neighborhood_attention_2d, use_na_kernel
from attnzoo.kernels.neighborhood import neighborhood_attention_2d_reference, validate
from test_kernel_fuzz import (NeighborhoodCase, assert_matches, na_kernel,  # noqa: F401 (na_kernel: a fixture)
                              run_neighborhood_case, with_na_kernels)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tools'))   # benchlib: TransNeXt's call

CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if CUDA else 'cpu'
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}  # bf16 as NATTEN's own tests


def make_inputs(shape, kernel_size, rpb=False, n_extra=0, dtype=torch.float32, device='cpu', seed=0,
                rpb_dtype=torch.float32):
    """q, k, v and the optional rpb / extra tokens of one call, as leaves that need gradients."""
    batch, height, width, heads, head_dim = shape
    kernel_h, kernel_w = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    gen = torch.Generator().manual_seed(seed)

    def leaf(*size, dtype=dtype):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    inputs = dict(q=leaf(*shape), k=leaf(*shape), v=leaf(*shape))
    if rpb:
        inputs['rpb'] = leaf(heads, 2 * kernel_h - 1, 2 * kernel_w - 1, dtype=rpb_dtype)
    if n_extra:
        inputs['extra_k'] = leaf(batch, n_extra, heads, head_dim)
        inputs['extra_v'] = leaf(batch, n_extra, heads, head_dim)
    return inputs


def outputs_and_grads(fn, inputs, grad_out, **options):
    out = fn(**inputs, **options)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out.to(out.dtype))
    return [out] + list(grads)


def reference_in_float64(inputs, grad_out, **options):
    inputs64 = {name: t.detach().double().requires_grad_() for name, t in inputs.items()}
    return outputs_and_grads(neighborhood_attention_2d_reference, inputs64, grad_out.double(), **options)


def assert_close_to_reference(inputs, options, backend='triton'):
    grad_out = torch.randn(inputs['q'].shape, generator=torch.Generator().manual_seed(1)).to(inputs['q'].device)
    got = outputs_and_grads(neighborhood_attention_2d, inputs, grad_out, backend=backend, **options)
    expected = reference_in_float64(inputs, grad_out, **options)
    tol = TOLERANCE[inputs['q'].dtype]
    for name, g, e in zip(['out'] + list(inputs), got, expected):
        assert g.shape == e.shape and g.dtype == inputs.get(name, inputs['q']).dtype, name
        torch.testing.assert_close(g.double(), e, atol=tol, rtol=tol, msg=lambda m: f'{name}: {m}')


# ----------------------------------------------------------------------------- Triton (interpreter on CPU)

TRITON_CASES = [
    # shape (B, H, W, heads, D), kernel, dilation, border, rpb, extra tokens, dtype
    ((1, 13, 17, 1, 32), 5, 1, 'clamp', False, 0, torch.float32),
    ((1, 13, 17, 1, 24), 4, 2, 'zero', True, 0, torch.float32),
    ((1, 13, 17, 1, 32), (3, 4), (3, 2), 'clamp', True, 5, torch.float32),
    ((1, 12, 22, 2, 32), 7, 1, 'clamp', True, 0, torch.float16),   # inverse neighborhood wider than one block
    ((1, 11, 9, 1, 24), 3, 1, 'zero', False, 7, torch.float16),
    ((2, 9, 10, 1, 32), 6, (1, 1), 'zero', True, 3, torch.float16),
    # kernels of DiNAT-L (11) and beyond: a key tile that starts inside the first window of a clamped
    # border (column 8 < kernel) is seen by every query of that border, not only by its centred ones
    ((1, 10, 20, 1, 16), 9, 1, 'clamp', False, 0, torch.float32),
    ((1, 14, 26, 1, 16), 13, 1, 'clamp', True, 0, torch.float32),
    ((1, 23, 24, 1, 16), 11, (2, 2), 'clamp', True, 0, torch.float32),
]


@pytest.mark.parametrize('shape, kernel_size, dilation, border, rpb, n_extra, dtype, version',
                         with_na_kernels(TRITON_CASES, [f'case{i}' for i in range(len(TRITON_CASES))],
                                         v2_slow=(2, 3, 7, 8)))
def test_triton_matches_reference(shape, kernel_size, dilation, border, rpb, n_extra, dtype, version):
    inputs = make_inputs(shape, kernel_size, rpb, n_extra, dtype, DEVICE)
    with use_na_kernel(version):
        assert_close_to_reference(inputs, dict(kernel_size=kernel_size, dilation=dilation, border=border))


@pytest.mark.parametrize('dtype, head_dim, rpb_dtype, version',
                         with_na_kernels([(torch.bfloat16, 128, 'q'), (torch.float16, 64, 'q'),
                                          (torch.bfloat16, 32, torch.float32)],
                                         ['bf16-d128-rpb_bf16', 'fp16-d64-rpb_fp16', 'bf16-d32-rpb_fp32'],
                                         v2_slow=(0, 1)))
def test_triton_low_precision_and_wide_heads(dtype, head_dim, rpb_dtype, version):
    """bf16 / fp16 with head dims 64 and 128 (padded tiles of the other sizes are covered above), the rpb
    in q's dtype or float32; every gradient, rpb's included, against the float64 reference."""
    rpb_dtype = dtype if rpb_dtype == 'q' else rpb_dtype
    inputs = make_inputs((1, 9, 11, 2, head_dim), 5, rpb=True, n_extra=3, dtype=dtype, device=DEVICE,
                         rpb_dtype=rpb_dtype)
    with use_na_kernel(version):
        assert_close_to_reference(inputs, dict(kernel_size=5, dilation=(1, 2), border='clamp'))


def test_triton_strided_views_and_scale(na_kernel):
    """q, k, v as views into one qkv tensor (no copies), custom scale, rpb without gradient."""
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(1, 10, 12, 3, 1, 24, generator=gen).to(DEVICE).requires_grad_()
    q, k, v = qkv.unbind(3)
    rpb = torch.randn(1, 5, 5, generator=gen).to(DEVICE)
    options = dict(kernel_size=3, dilation=2, scale=0.3, rpb=rpb)
    grad_out = torch.randn(q.shape, generator=gen).to(DEVICE)
    out = neighborhood_attention_2d(q, k, v, backend='triton', **options)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    qkv64 = qkv.detach().double().requires_grad_()
    out64 = neighborhood_attention_2d_reference(*qkv64.unbind(3), **{**options, 'rpb': rpb.double()})
    (grad64,) = torch.autograd.grad(out64, qkv64, grad_out.double())
    torch.testing.assert_close(out.double(), out64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad.double(), grad64, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA,
                    reason='compiled kernels (autotuning, tensor-core dots) at model shapes need a CUDA GPU')
class TestGPU:
    @pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize('border, dilation, rpb, n_extra', [('clamp', 1, True, 0), ('clamp', 3, True, 0),
                                                                ('zero', 1, False, 49)])
    def test_matches_reference(self, dtype, border, dilation, rpb, n_extra):
        inputs = make_inputs((2, 56, 56, 2, 32), 7, rpb, n_extra, dtype, 'cuda')
        assert_close_to_reference(inputs, dict(kernel_size=7, dilation=dilation, border=border))

    @pytest.mark.parametrize('kernel_size, head_dim', [(3, 24), (6, 64), (5, 128)])
    def test_shapes(self, kernel_size, head_dim):
        inputs = make_inputs((2, 29, 35, 3, head_dim), kernel_size, True, 16, torch.bfloat16, 'cuda')
        assert_close_to_reference(inputs, dict(kernel_size=kernel_size, dilation=2, border='zero'))

    @pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize('size, heads, sr_ratio', [(56, 3, 8), (28, 6, 4), (14, 12, 2), (13, 5, 2)])
    def test_transnext_stages(self, dtype, size, heads, sr_ratio):
        """TransNeXt-Tiny's stages 1-3 at 224 px (7 x 7 pools) and an odd map: compiled kernels, every gradient."""
        inputs = transnext_call(size, size, heads, sr_ratio, dtype, 'cuda')
        options = dict(kernel_size=3, border='zero', scale=1.0)
        grad_out = torch.randn(inputs['q'].shape, generator=torch.Generator().manual_seed(1)).to('cuda')
        got = outputs_and_grads(neighborhood_attention_2d, inputs, grad_out, backend='triton', **options)
        expected = reference_in_float64(inputs, grad_out, **options)
        for name, g, e in zip(['out'] + list(inputs), got, expected):
            assert_matches(name, g, e, dtype)

    def test_default_backend_is_triton_on_cuda(self):
        inputs = make_inputs((1, 14, 14, 2, 32), 7, dtype=torch.float16, device='cuda')
        assert_close_to_reference(inputs, dict(kernel_size=7), backend=None)


# ----------------------------------------------------------------------------- reference vs independent definitions


def natten_axis_mask(length, kernel, dilation):
    """[length, length] key-in-window mask of one axis, written from NATTEN's own formulas."""
    left, right = kernel // 2, kernel // 2 + (kernel % 2 - 1)
    mask = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        group, index = i % dilation, i // dilation
        group_len = length // dilation + (1 if group < length % dilation else 0)
        start = max(index - left, 0) + (index + right >= group_len) * (group_len - right - index - 1)
        for j in range(group, length, dilation):
            mask[i, j] = start <= j // dilation < start + kernel
    return mask


def zero_pad_axis_mask(length, kernel, dilation):
    """[length, length] mask of a centred, zero-padded (dilated) window: keys outside are just absent."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    offset = j - i
    return (offset % dilation == 0) & (offset // dilation >= -(kernel // 2)) & (offset // dilation < kernel - kernel // 2)


def dense_attention(q, k, v, kernel_size, dilation, border, scale, rpb=None, extra_k=None, extra_v=None):
    """Full [HW, HW (+L)] softmax with the window as a mask and the rpb looked up by key - query offset."""
    batch, height, width, heads, head_dim = q.shape
    axis_mask = natten_axis_mask if border == 'clamp' else zero_pad_axis_mask
    mask = (axis_mask(height, kernel_size[0], dilation[0])[:, None, :, None]
            & axis_mask(width, kernel_size[1], dilation[1])[None, :, None, :]).reshape(height * width, height * width)
    logits = torch.einsum('bqhd,bkhd->bhqk', q.flatten(1, 2), k.flatten(1, 2)) * scale
    if rpb is not None:
        dy = (torch.arange(height)[None, :] - torch.arange(height)[:, None]) // dilation[0] + kernel_size[0] - 1
        dx = (torch.arange(width)[None, :] - torch.arange(width)[:, None]) // dilation[1] + kernel_size[1] - 1
        idx_y = dy.clamp(0, 2 * kernel_size[0] - 2)[:, None, :, None].expand(height, width, height, width)
        idx_x = dx.clamp(0, 2 * kernel_size[1] - 2)[None, :, None, :].expand(height, width, height, width)
        logits = logits + rpb[:, idx_y, idx_x].reshape(heads, height * width, height * width)
    logits = logits.masked_fill(~mask, float('-inf'))
    values = v.flatten(1, 2)
    if extra_k is not None:
        logits = torch.cat([logits, torch.einsum('bqhd,blhd->bhql', q.flatten(1, 2), extra_k) * scale], dim=-1)
        values = torch.cat([values, extra_v], dim=1)
    out = torch.einsum('bhqk,bkhd->bqhd', logits.softmax(-1), values)
    return out.reshape(q.shape)


@pytest.mark.parametrize('shape, kernel_size, dilation, border, rpb, n_extra', [
    ((1, 13, 17, 2, 16), (5, 5), (2, 3), 'clamp', True, 0),
    ((2, 12, 12, 1, 16), (4, 4), (1, 2), 'clamp', False, 3),
    ((1, 14, 14, 2, 16), (7, 7), (2, 1), 'clamp', True, 0),
    ((1, 9, 11, 1, 24), (3, 3), (1, 1), 'zero', True, 4),
    ((1, 13, 10, 1, 16), (4, 5), (3, 2), 'zero', True, 0),
])
def test_reference_matches_dense_masked_softmax(shape, kernel_size, dilation, border, rpb, n_extra):
    inputs = {name: t.detach().double() for name, t in make_inputs(shape, kernel_size, rpb, n_extra).items()}
    scale = 0.7
    out = neighborhood_attention_2d_reference(**inputs, kernel_size=kernel_size, dilation=dilation, border=border,
                                              scale=scale)
    expected = dense_attention(**inputs, kernel_size=kernel_size, dilation=dilation, border=border, scale=scale)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize('border, dilation', [('clamp', (1, 2)), ('zero', (2, 1))])
def test_reference_gradcheck(border, dilation):
    inputs = {name: t.detach().double().requires_grad_()
              for name, t in make_inputs((1, 6, 6, 1, 16), 3, rpb=True, n_extra=2).items()}

    def fn(q, k, v, rpb, extra_k, extra_v):
        return neighborhood_attention_2d_reference(q, k, v, 3, dilation, rpb=rpb, border=border, extra_k=extra_k,
                                                   extra_v=extra_v)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-6, fast_mode=True)


def test_reference_matches_natten():
    natten = pytest.importorskip('natten', reason='natten is not installed')
    for kernel_size, dilation, n_extra in [((7, 7), (1, 1), 0), ((5, 4), (2, 3), 0), ((3, 3), (1, 1), 4)]:
        inputs = {name: t.detach() for name, t in make_inputs((1, 13, 17, 2, 32), kernel_size, n_extra=n_extra,
                                                               device=DEVICE).items()}
        expected = natten.na2d(inputs['q'], inputs['k'], inputs['v'], kernel_size=kernel_size, dilation=dilation,
                               additional_keys=inputs.get('extra_k'), additional_values=inputs.get('extra_v'))
        out = neighborhood_attention_2d_reference(**inputs, kernel_size=kernel_size, dilation=dilation)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        through_dispatch = neighborhood_attention_2d(**inputs, kernel_size=kernel_size, dilation=dilation,
                                                     backend='natten')
        torch.testing.assert_close(through_dispatch, expected, atol=0, rtol=0)


# ----------------------------------------------------------------------------- dispatch and validation


def test_default_backend_on_cpu_is_the_cpu_kernels():
    inputs = {name: t.detach() for name, t in make_inputs((1, 8, 8, 1, 16), 3).items()}
    spec = validate(**inputs, kernel_size=3)
    expected, _ = _neighborhood_cpu.forward(inputs['q'], inputs['k'], inputs['v'], None, None, None, spec)
    torch.testing.assert_close(neighborhood_attention_2d(**inputs, kernel_size=3), expected, atol=0, rtol=0)


def test_natten_backend_rejects_what_natten_lacks():
    inputs = {name: t.detach() for name, t in make_inputs((1, 8, 8, 1, 16), 3, rpb=True).items()}
    with pytest.raises((RuntimeError, ValueError), match='natten|NATTEN'):
        neighborhood_attention_2d(**inputs, kernel_size=3, backend='natten')


def _bad_calls():
    q = torch.randn(1, 8, 9, 2, 32)
    ok = dict(q=q, k=q.clone(), v=q.clone(), kernel_size=3)
    return [
        (dict(ok, kernel_size=5, dilation=2), ValueError, 'kernel_size \\* dilation = 5 \\* 2 = 10 is larger than'),
        (dict(ok, kernel_size=(3, 10)), ValueError, 'larger than the feature map width 9'),
        (dict(ok, kernel_size=0), ValueError, 'kernel_size must be >= 1'),
        (dict(ok, kernel_size=(3, 3, 3)), TypeError, 'kernel_size must be an int or a pair'),
        (dict(ok, k=q[:, :7]), ValueError, 'k has shape'),
        (dict(ok, v=q.half()), TypeError, 'v is torch.float16 but q is torch.float32'),
        (dict(ok, q=q[..., 0]), ValueError, 'q must be \\[B, H, W, heads, head_dim\\]'),
        (dict(ok, q=q[..., :8], k=q[..., :8], v=q[..., :8]), ValueError, 'head_dim 8 is not supported'),
        (dict(ok, q=torch.randn(1, 8, 9, 2, 160), k=torch.randn(1, 8, 9, 2, 160), v=torch.randn(1, 8, 9, 2, 160)),
         ValueError, 'head_dim 160 is not supported'),
        (dict(ok, border='reflect'), ValueError, 'border must be one of'),
        (dict(ok, rpb=torch.zeros(2, 3, 3)), ValueError, 'rpb must have shape'),
        (dict(ok, rpb=torch.zeros(2, 5, 5, dtype=torch.float64)), TypeError, 'rpb must be float32'),
        (dict(ok, extra_k=torch.randn(1, 4, 2, 32)), ValueError, 'extra_k and extra_v must be given together'),
        (dict(ok, extra_k=torch.randn(1, 4, 3, 32), extra_v=torch.randn(1, 4, 3, 32)), ValueError,
         'extra_k must be \\[B, L, heads, head_dim\\]'),
        (dict(ok, extra_k=torch.randn(1, 4, 2, 32), extra_v=torch.randn(1, 5, 2, 32)), ValueError,
         'must have the same shape'),
        (dict(ok, extra_k=torch.randn(1, 4, 2, 32).half(), extra_v=torch.randn(1, 4, 2, 32).half()), TypeError,
         'extra_k is torch.float16'),
        (dict(ok, backend='cuda'), ValueError, 'unknown backend'),
        (dict(ok, scale='0.1'), TypeError, 'scale must be a float'),
    ]


@pytest.mark.parametrize('call, error, message', _bad_calls())
def test_bad_input_raises(call, error, message):
    with pytest.raises(error, match=message):
        neighborhood_attention_2d(**call)


def test_triton_rejects_float64():
    q = torch.randn(1, 8, 8, 1, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match='backend="triton" supports'):
        neighborhood_attention_2d(q, q, q, 3, backend='triton')


@pytest.mark.parametrize('name', ['k', 'v', 'rpb', 'extra_k'])
def test_mixed_devices_raise(name):
    inputs = {name: t.detach() for name, t in make_inputs((1, 8, 8, 1, 16), 3, rpb=True, n_extra=2).items()}
    inputs[name] = inputs[name].to('meta')
    with pytest.raises(ValueError, match=f'{name} is on meta but q is on cpu'):
        neighborhood_attention_2d(**inputs, kernel_size=3)


# ----------------------------------------------------------------------------- extra_bias and window_weight (TransNeXt)


def with_transnext_inputs(inputs, kernel_size, bias_layout='heads_tokens', seed=2):
    """Adds a per-query extra-token bias and a post-softmax window weight to ``inputs`` (leaves)."""
    batch, height, width, heads, _ = inputs['q'].shape
    n_extra = inputs['extra_k'].shape[1]
    kernel_h, kernel_w = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    gen = torch.Generator().manual_seed(seed)
    device, dtype = inputs['q'].device, inputs['q'].dtype
    bias_shape = {'heads_tokens': (heads, height * width, n_extra), 'full': (batch, heads, height, width, n_extra),
                  'broadcast': (1, heads, height, width, n_extra)}[bias_layout]
    inputs['extra_bias'] = torch.randn(*bias_shape, generator=gen).to(device).requires_grad_()
    inputs['window_weight'] = torch.randn(batch, height, width, heads, kernel_h * kernel_w, generator=gen).to(
        device=device, dtype=dtype).requires_grad_()
    return inputs


def dense_transnext_attention(q, k, v, kernel_size, dilation, scale, extra_k, extra_v, extra_bias, window_weight,
                              rpb=None):
    """The dense masked softmax (zero border) with the extra tokens' bias added to their logits and, after the
    softmax, each in-map window key's weight (looked up by its window position) added to its probability."""
    batch, height, width, heads, head_dim = q.shape
    (kernel_h, kernel_w), n = kernel_size, height * width
    out = dense_attention(q, k, v, kernel_size, dilation, 'zero', scale, rpb=rpb, extra_k=extra_k, extra_v=extra_v)
    # the extra bias changes the softmax: recompute that part densely
    mask = (zero_pad_axis_mask(height, kernel_h, dilation[0])[:, None, :, None]
            & zero_pad_axis_mask(width, kernel_w, dilation[1])[None, :, None, :]).reshape(n, n)
    logits = torch.einsum('bqhd,bkhd->bhqk', q.flatten(1, 2), k.flatten(1, 2)) * scale
    if rpb is not None:
        dy = (torch.arange(height)[None, :] - torch.arange(height)[:, None]) // dilation[0] + kernel_h - 1
        dx = (torch.arange(width)[None, :] - torch.arange(width)[:, None]) // dilation[1] + kernel_w - 1
        idx_y = dy.clamp(0, 2 * kernel_h - 2)[:, None, :, None].expand(height, width, height, width)
        idx_x = dx.clamp(0, 2 * kernel_w - 2)[None, :, None, :].expand(height, width, height, width)
        logits = logits + rpb[:, idx_y, idx_x].reshape(heads, n, n)
    logits = logits.masked_fill(~mask, float('-inf'))
    bias = extra_bias.reshape(-1, heads, n, extra_k.shape[1])
    extra = torch.einsum('bqhd,blhd->bhql', q.flatten(1, 2), extra_k) * scale + bias
    probs = torch.cat([logits, extra], dim=-1).softmax(-1)
    out = torch.einsum('bhqk,bkhd->bqhd', probs, torch.cat([v.flatten(1, 2), extra_v], dim=1))
    # window position of key j for query i: (offset_y // dil + kh // 2, offset_x // dil + kw // 2)
    pos_y = (torch.arange(height)[None, :] - torch.arange(height)[:, None]) // dilation[0] + kernel_h // 2
    pos_x = (torch.arange(width)[None, :] - torch.arange(width)[:, None]) // dilation[1] + kernel_w // 2
    pos = (pos_y.clamp(0, kernel_h - 1)[:, None, :, None] * kernel_w
           + pos_x.clamp(0, kernel_w - 1)[None, :, None, :]).reshape(n, n)
    weights = window_weight.flatten(1, 2).permute(0, 2, 1, 3)                   # [B, heads, n, kh * kw]
    dense_weights = torch.gather(weights, 3, pos.expand(batch, heads, n, n)) * mask
    out = out + torch.einsum('bhqk,bkhd->bqhd', dense_weights, v.flatten(1, 2))
    return out.reshape(q.shape)


@pytest.mark.parametrize('shape, kernel_size, dilation, n_extra, rpb, layout', [
    ((1, 9, 11, 2, 24), (3, 3), (1, 1), 6, True, 'heads_tokens'),      # TransNeXt's call
    ((2, 7, 8, 1, 16), (3, 5), (2, 1), 4, False, 'full'),
    ((2, 2, 3, 2, 16), (3, 3), (1, 1), 1, True, 'broadcast'),         # a map smaller than the window
])
def test_reference_extra_bias_and_window_weight_match_dense(shape, kernel_size, dilation, n_extra, rpb, layout):
    inputs = make_inputs(shape, kernel_size, rpb, n_extra)
    inputs = {name: t.detach().double() for name, t in with_transnext_inputs(inputs, kernel_size, layout).items()}
    scale = 0.8
    out = neighborhood_attention_2d_reference(**inputs, kernel_size=kernel_size, dilation=dilation, border='zero',
                                              scale=scale)
    expected = dense_transnext_attention(**inputs, kernel_size=kernel_size, dilation=dilation, scale=scale)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_reference_gradcheck_extra_bias_and_window_weight():
    inputs = with_transnext_inputs(make_inputs((1, 5, 4, 1, 16), 3, rpb=True, n_extra=3), 3)
    inputs = {name: t.detach().double().requires_grad_() for name, t in inputs.items()}
    names = list(inputs)

    def fn(*tensors):
        return neighborhood_attention_2d_reference(**dict(zip(names, tensors)), kernel_size=3, border='zero')

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize('border, layout', [('zero', 'heads_tokens'), ('clamp', 'full')])
def test_op_with_extra_bias_and_window_weight_matches_reference(border, layout):
    """Through the registered op and its autograd formula (every gradient), against the reference in float64."""
    inputs = with_transnext_inputs(make_inputs((2, 6, 7, 2, 16), 3, rpb=True, n_extra=5), 3, layout)
    assert_close_to_reference(inputs, dict(kernel_size=3, border=border, scale=0.5), backend=None)


def transnext_call(height, width, heads, sr_ratio, dtype, device, seed=3):
    """The arguments of TransNeXt's aggregated-attention call as the model makes them (heads-last views of the
    kv projections, ``L = (H // sr) * (W // sr)`` pooled tokens, tools/benchlib/transnext.py), batch 2, heads
    of 24, window weights of unit scale (so that their terms of the gradients are not small)."""
    from benchlib.transnext import make_call_inputs
    n_pool = (height // sr_ratio) * (width // sr_ratio)
    return make_call_inputs(2, height, width, heads, n_pool, seed, weight_std=1.0)(torch.device(device), dtype)


TRANSNEXT_SHAPES = [
    (8, 8, 2, 2, torch.float32),       # stage-1-like: a pool of (H / sr)^2 = 16 tokens
    (14, 10, 2, 2, torch.float32),     # non-square, L = 35 (slow)
    (7, 9, 1, 4, torch.float16),       # odd sizes: the pool floors, L = 1 x 2
    (6, 6, 2, 1, torch.bfloat16),      # L = 36: two blocks of extra tokens
]
TRANSNEXT_PATHS = {'triton': (DEVICE, 'triton', 'v1'), 'triton_v2': (DEVICE, 'triton', 'v2'),
                   'cpu_kernels': ('cpu', None, 'v1')}


def _transnext_params():
    """Every shape on every path; the non-square shape, and v2's runs but the first shape, under slow."""
    return [pytest.param(*shape, *path, id=f'{name}-{index}',
                         marks=[pytest.mark.slow] if index == 1 or (name == 'triton_v2' and index) else [])
            for index, shape in enumerate(TRANSNEXT_SHAPES) for name, path in TRANSNEXT_PATHS.items()]


@pytest.mark.parametrize('height, width, heads, sr_ratio, dtype, device, backend, version', _transnext_params())
def test_transnext_call_matches_reference(height, width, heads, sr_ratio, dtype, device, backend, version):
    """TransNeXt's call on the fused kernels (the interpreter on CPU) and on the CPU kernels: output and every
    gradient (q, the kv and pooled-kv projections through their views, local bias, pool bias, window weight)
    against the float64 reference."""
    inputs = transnext_call(height, width, heads, sr_ratio, dtype, device)
    options = dict(kernel_size=3, border='zero', scale=1.0)
    grad_out = torch.randn(inputs['q'].shape, generator=torch.Generator().manual_seed(1)).to(device)
    with use_na_kernel(version):
        got = outputs_and_grads(neighborhood_attention_2d, inputs, grad_out, backend=backend, **options)
    expected = reference_in_float64(inputs, grad_out, **options)
    for name, g, e in zip(['out'] + list(inputs), got, expected):
        assert g.dtype == inputs.get(name, inputs['q']).dtype, name
        assert_matches(name, g, e, dtype)   # the fuzz tests' rule: the window weight makes gradients large


@pytest.mark.parametrize('transnext', [False, True], ids=['nat', 'transnext'])
def test_flop_counter_counts_the_op_as_the_reference(transnext):
    """torch.utils.flop_counter sees the registered forward / backward ops (a model's GMACs on the default
    path): the same FLOPs as the reference's own products, forward and forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode
    if transnext:
        inputs, options = transnext_call(7, 6, 2, 2, torch.float32, 'cpu'), dict(kernel_size=3, border='zero')
    else:
        inputs, options = make_inputs((2, 9, 8, 2, 16), (5, 3), rpb=True, n_extra=3), dict(kernel_size=(5, 3))
    counts = {}
    for backend in (None, 'reference'):
        for mode in ('fwd', 'fwd+bwd'):
            with FlopCounterMode(display=False) as counter:
                out = neighborhood_attention_2d(**inputs, **options, backend=backend)
                if mode == 'fwd+bwd':
                    torch.autograd.grad(out, [t for t in inputs.values() if t.requires_grad], torch.ones_like(out))
            counts[backend, mode] = counter.get_total_flops()
    assert counts[None, 'fwd'] == counts['reference', 'fwd'] > 0
    assert counts[None, 'fwd+bwd'] == counts['reference', 'fwd+bwd'] == 3 * counts[None, 'fwd']


def test_zero_border_window_larger_than_the_map(na_kernel):
    """A centred window larger than the map sees only the map (TransNeXt's 3x3 window on 1x1 / 2x2 maps of
    small inputs): reference, CPU kernels and Triton kernels against the dense oracle."""
    inputs = {name: t.detach().double() for name, t in make_inputs((1, 2, 3, 1, 16), 5, n_extra=2).items()}
    out = neighborhood_attention_2d_reference(**inputs, kernel_size=5, border='zero')
    expected = dense_attention(**inputs, kernel_size=(5, 5), dilation=(1, 1), border='zero', scale=16 ** -0.5)
    torch.testing.assert_close(out, expected)
    for device, backend in (('cpu', None), (DEVICE, 'triton')):
        got = neighborhood_attention_2d(**{name: t.float().to(device) for name, t in inputs.items()}, kernel_size=5,
                                        border='zero', backend=backend)
        torch.testing.assert_close(got.double().cpu(), expected, atol=1e-5, rtol=1e-5)


def _bad_transnext_calls():
    q = torch.randn(1, 8, 9, 2, 32)
    extra = torch.randn(1, 4, 2, 32)
    ok = dict(q=q, k=q.clone(), v=q.clone(), kernel_size=3, border='zero', extra_k=extra, extra_v=extra.clone())
    return [
        (dict(ok, extra_k=None, extra_v=None, extra_bias=torch.zeros(2, 72, 4)), ValueError, 'pass extra_k'),
        (dict(ok, extra_bias=torch.zeros(2, 72, 5)), ValueError, 'extra_bias must be \\[heads, H \\* W, L\\]'),
        (dict(ok, extra_bias=torch.zeros(3, 2, 8, 9, 4)), ValueError, 'extra_bias must be'),
        (dict(ok, extra_bias=torch.zeros(2, 72, 4, dtype=torch.float64)), TypeError, 'extra_bias must be float32'),
        (dict(ok, window_weight=torch.zeros(1, 8, 9, 2, 8)), ValueError, 'window_weight must be \\[B, H, W, heads'),
        (dict(ok, window_weight=torch.zeros(1, 8, 9, 2, 9).half()), TypeError, 'window_weight must be float32'),
        (dict(ok, window_weight=torch.zeros(1, 8, 9, 2, 9), backend='natten'), ValueError, 'window weight'),
        (dict(ok, window_weight=[0.]), TypeError, 'window_weight must be a torch.Tensor'),
    ]


@pytest.mark.parametrize('call, error, message', _bad_transnext_calls())
def test_bad_extra_bias_or_window_weight_raises(call, error, message):
    with pytest.raises(error, match=message):
        neighborhood_attention_2d(**call)


# ----------------------------------------------------------------------------- the Triton kernel version (v1 / v2)


def test_na_kernel_switch_names_the_choices():
    from attnzoo.kernels import get_na_kernel, set_na_kernel
    assert get_na_kernel() in ('v1', 'v2')
    with pytest.raises(ValueError, match="unknown neighborhood-attention kernel 'v3'; choose one of \\('v1', 'v2'\\)"):
        set_na_kernel('v3')
    with use_na_kernel('v2'):
        assert get_na_kernel() == 'v2'
    assert get_na_kernel() == 'v1'


def test_na_kernel_environment_variable():
    import subprocess
    script = 'import attnzoo.kernels as k; print(k.get_na_kernel())'
    env = dict(os.environ, ATTNZOO_NA_KERNEL='v2')
    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == 'v2', result.stderr
    env['ATTNZOO_NA_KERNEL'] = 'v9'
    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and 'ATTNZOO_NA_KERNEL' in result.stderr and "'v9'" in result.stderr


def test_compiled_op_runs_the_chosen_kernels_forward_and_backward(monkeypatch):
    """The switch is read when the registered ops run: a compiled call follows it without recompiling."""
    from attnzoo.kernels import _neighborhood_triton, _neighborhood_triton_v2
    calls = []
    for version, module in (('v1', _neighborhood_triton), ('v2', _neighborhood_triton_v2)):
        for name in ('forward', 'backward'):
            def spy(*args, _original=getattr(module, name), _call=(version, name), **kwargs):
                calls.append(_call)
                return _original(*args, **kwargs)
            monkeypatch.setattr(module, name, spy)
    inputs = make_inputs((1, 6, 7, 1, 16), 3, device=DEVICE)
    compiled = torch.compile(lambda q, k, v: neighborhood_attention_2d(q, k, v, 3, backend='triton'), backend='eager',
                             fullgraph=True)
    for version in ('v1', 'v2'):
        calls.clear()
        with use_na_kernel(version):
            compiled(**inputs).sum().backward()
        # v2 reuses v1's launchers, which are then called from v2's
        assert calls[0] == (version, 'forward') and (version, 'backward') in calls
        assert all(call[0] == 'v1' for call in calls) if version == 'v1' else True
    calls.clear()   # eager: the backward runs the forward's version, wherever the switch is by then
    with use_na_kernel('v2'):
        out = neighborhood_attention_2d(**inputs, kernel_size=3, backend='triton')
    out.sum().backward()
    assert ('v2', 'backward') in calls


def test_v2_keeps_non_finite_keys_out_of_other_windows():
    """A NaN key, a NaN value and an Inf value reach exactly the queries whose windows hold them (and give them
    non-finite outputs and dQ); every other query's output and dQ, and every finite dK / dV of the reference,
    match it; in interior and border bands."""
    inputs = {name: t.detach().clone() for name, t in make_inputs((1, 12, 20, 1, 16), 3, rpb=True).items()}
    inputs['k'][0, 5, 11, 0, 3] = float('nan')   # in an interior band (the window table's), as the Inf
    inputs['v'][0, 6, 2, 0, 0] = float('nan')
    inputs['v'][0, 9, 9, 0, 1] = float('inf')
    grad_out = torch.randn(inputs['q'].shape, generator=torch.Generator().manual_seed(1))
    leaves = {name: t.to(DEVICE).requires_grad_() for name, t in inputs.items()}
    with use_na_kernel('v2'):
        out = neighborhood_attention_2d(**leaves, kernel_size=3, backend='triton')
        dq, dk, dv = torch.autograd.grad(out, [leaves[name] for name in 'qkv'], grad_out.to(DEVICE))
    leaves64 = {name: t.double().requires_grad_() for name, t in inputs.items()}
    out64 = neighborhood_attention_2d_reference(**leaves64, kernel_size=3)
    dq64, dk64, dv64 = torch.autograd.grad(out64, [leaves64[name] for name in 'qkv'], grad_out.double())
    for name, got, expected in (('dk', dk.cpu(), dk64), ('dv', dv.cpu(), dv64)):
        finite = torch.isfinite(expected)
        assert finite.any() and not finite.all(), name
        torch.testing.assert_close(got[finite].double(), expected[finite], atol=1e-4, rtol=1e-4, msg=name)
    for name, got, expected in (('out', out.cpu(), out64), ('dq', dq.cpu(), dq64)):
        finite = torch.isfinite(expected).all(-1)
        assert 27 <= (~finite).sum() < finite.numel() // 2, name   # three windows' queries (more at the clamp)
        torch.testing.assert_close(got[finite].double(), expected[finite], atol=1e-4, rtol=1e-4, msg=name)
        assert not torch.isfinite(got[~finite]).all(-1).any(), name


# v2's interior bands read the window mask and rpb from the window table, border bands compute them: maps where
# both occur (by the op's own window rule: design.v2_interior_bands), values and every gradient vs float64
V2_BAND_CASES = [
    # TransNeXt's call: 3 x 3 zero border, rpb, extra tokens with their per-query bias, window weights
    NeighborhoodCase((1, 11, 19, 1, 16), (3, 3), (1, 1), 'zero', torch.float32, 'contiguous', 'float32', 2,
                     ['q', 'k', 'v', 'rpb', 'extra_k', 'extra_v', 'extra_bias', 'window_weight'], extra_bias='full',
                     window_weight=True),
    NeighborhoodCase((1, 13, 35, 1, 16), (3, 3), (2, 2), 'clamp', torch.float16, 'transposed', 'q', 0,
                     ['q', 'k', 'v', 'rpb']),
    NeighborhoodCase((1, 13, 21, 2, 32), (5, 5), (1, 1), 'zero', torch.float32, 'qkv_views', 'float32', 0,
                     ['q', 'k', 'v', 'rpb'], scale=0.3),
    NeighborhoodCase((1, 15, 35, 1, 16), (6, 4), (1, 2), 'clamp', torch.float32, 'contiguous', 'float32', 0,
                     ['q', 'k', 'v', 'rpb']),
    NeighborhoodCase((1, 17, 21, 1, 16), (7, 7), (1, 1), 'clamp', torch.float32, 'contiguous', 'float32', 0,
                     ['q', 'k', 'v', 'rpb', 'window_weight'], window_weight=True),
    NeighborhoodCase((1, 19, 25, 1, 16), (9, 9), (1, 1), 'zero', torch.float32, 'contiguous', 'float32', 0,
                     ['q', 'k', 'v', 'rpb']),
    NeighborhoodCase((1, 21, 25, 1, 16), (11, 11), (1, 1), 'clamp', torch.float32, 'contiguous', 'float32', 0,
                     ['q', 'k', 'v', 'rpb']),
    NeighborhoodCase((1, 23, 27, 1, 16), (13, 13), (1, 1), 'clamp', torch.float32, 'contiguous', 'float32', 0,
                     ['q', 'k', 'v', 'rpb']),
    NeighborhoodCase((1, 13, 19, 1, 32), (5, 5), (2, 1), 'clamp', torch.bfloat16, 'contiguous', 'float32', 3,
                     ['q', 'k', 'v', 'rpb', 'extra_k', 'extra_v', 'extra_bias'], extra_bias='heads_tokens'),
]


def assert_interior_and_border_bands(case):
    from benchlib import design
    _, height, width, _, _ = case.shape
    interior, bands = design.v2_interior_bands(height, width, case.kernel_size, case.dilation, case.border)
    assert 0 < interior < bands, (interior, bands)


@pytest.mark.parametrize('case', [pytest.param(case, id=f'k{case.kernel_size[0]}x{case.kernel_size[1]}-dil'
                                               f'{case.dilation[0]}x{case.dilation[1]}-{case.border}',
                                               marks=[pytest.mark.slow] if index else [])
                                  for index, case in enumerate(V2_BAND_CASES)])
def test_v2_interior_and_border_bands_match_reference(case):
    assert_interior_and_border_bands(case)
    with use_na_kernel('v2'):
        run_neighborhood_case(case, seed=4)


@pytest.mark.parametrize('border', ['clamp', pytest.param('zero', marks=pytest.mark.slow)])
def test_v2_border_bands_next_to_interior_ones(border):
    """Each bound of the interior rule decides a band here: band rows 6-7 are interior, 8-9 are not (the window
    of row 9 ends on the map's last row, 10 would be off it); along x, dilation 2 gives groups of 17 and 16
    columns, and their columns 8-15 are interior in the first group only (column 15's window needs column 16),
    columns 0-7 in neither. A band of the interior path on the wrong side of a bound gets the wrong keys."""
    case = NeighborhoodCase((1, 10, 33, 1, 16), (3, 3), (1, 2), border, torch.float32, 'contiguous', 'float32', 0,
                            ['q', 'k', 'v', 'rpb'])
    assert_interior_and_border_bands(case)
    with use_na_kernel('v2'):
        run_neighborhood_case(case, seed=5)


def test_v2_window_table_holds_each_windows_rpb():
    """The window table against the op's own window rule: query (r, c) of a band sees the rectangle's keys
    (r .. r + k_h - 1, c .. c + k_w - 1) and each gets rpb[key - query + k - 1] in base 2; -inf elsewhere."""
    from attnzoo.kernels import _neighborhood_triton_v2 as v2
    from attnzoo.kernels._neighborhood_triton import LOG2E
    kernel_h, kernel_w = 5, 4
    rpb = torch.randn(2, 2 * kernel_h - 1, 2 * kernel_w - 1)
    rows, cols = v2.band_keys(kernel_h, kernel_w)
    table = v2.window_table(rpb, (kernel_h, kernel_w), 'cpu')
    assert table.shape == (2, v2.BAND * v2.TILE_W, sum(v2.band_pieces(kernel_h, kernel_w)))
    expected = torch.full(table.shape, float('-inf'))
    for query in range(v2.BAND * v2.TILE_W):
        r, c = divmod(query, v2.TILE_W)
        # the rectangle starts at the window of the band's first query: (r, c) is its row / column kernel // 2 on
        for dy in range(kernel_h):
            for dx in range(kernel_w):
                key = (r + dy) * cols + c + dx
                expected[:, query, key] = rpb[:, dy - kernel_h // 2 + kernel_h - 1,
                                              dx - kernel_w // 2 + kernel_w - 1] * LOG2E
    torch.testing.assert_close(table, expected)
    assert torch.equal(v2.window_table(None, (kernel_h, kernel_w), 'cpu').isfinite(), expected[:1].isfinite())


@pytest.mark.slow
@pytest.mark.parametrize('name, kwargs', [
    ('nat_mini', dict(depths=(1, 1, 1, 1))),
    ('dinat_mini', dict(depths=(2, 2, 1, 1), dilations=((1, 2), (1, 1), (1,), (1,)))),   # 16 x 16: k 7 x dilation 2 fits
    ('dat_pp_tiny', dict(stage_spec=('N', 'N', 'ND', 'D'))),
    ('transnext_micro', dict(depths=(1, 1, 1, 1), img_size=64)),
])
def test_models_agree_on_both_kernel_versions(name, kwargs):
    """A small model (64 px, few blocks) on the Triton path: the same output and parameter gradients on v2 as on v1."""
    import timm

    import attnzoo.backbones  # noqa: F401 (registers the families)
    from attnzoo.kernels import use_backend
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).to(DEVICE).train()
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    results = {}
    for version in ('v1', 'v2'):
        model.zero_grad()
        with use_backend('triton'), use_na_kernel(version):
            torch.manual_seed(1)   # drop path and the like draw the same
            out = model(x)
            out.square().sum().backward()
        results[version] = [out.detach()] + [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    assert len(results['v1']) == len(results['v2']) > 1
    for index, (a, b) in enumerate(zip(results['v1'], results['v2'])):
        assert_matches(f'tensor {index}', b, a.double(), torch.float32)
